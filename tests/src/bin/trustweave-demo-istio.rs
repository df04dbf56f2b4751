//! `trustweave-demo-istio` (`make demo-istio`): the guide's mesh with the real
//! Istio control plane, as `tests/tests/istio_mesh.rs` runs it: aws and gcp
//! multi-primary, each cluster its own etcd, kube-apiserver and istiod, its
//! own SPIRE and node trustweave-sds, and VM proxies (pilot-agent + Envoy,
//! each in its own network namespace, as its own user).
//!
//! Prints the identities each Envoy holds (from trustweave-sds, not istiod),
//! the guide's calls with what the filter decided and the caller it saw, each
//! federation's first refresh and what each node's trustweave-sds serves (as
//! `make demo` does), and the control plane's view (`istioctl proxy-status`-like, from each istiod's
//! `/debug/syncz`). `--once` exits after the report; otherwise it keeps
//! running and says how to call into it. Needs root.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use serde_json::Value;
use trustweave_e2e::istio::mesh::IstioMesh;
use trustweave_e2e::mesh::app::ACTION_HEADER;
use trustweave_e2e::mesh::{node_sds, report};

/// The guide's mesh on the real Istio control plane, with a report.
#[derive(Parser, Debug)]
struct Args {
    /// Working directory for sockets, configurations and logs.
    #[arg(long, default_value = "/tmp/trustweave-demo-istio")]
    dir: PathBuf,
    /// Second octet of every address (10.<subnet>.<cloud>.<host>, in network namespaces).
    #[arg(long, default_value_t = 78)]
    subnet: u8,
    /// Exit after the report instead of running until Ctrl-C.
    #[arg(long)]
    once: bool,
}

/// The guide's calls: from (a proxy), to (a host), action.
const CALLS: [(&str, &str, &str); 5] = [
    ("orchestrator", "collector.ops.svc.cluster.local", "collect"),
    ("orchestrator", "search.search.svc.cluster.local", "search"),
    ("orchestrator", "search.search.svc.cluster.local", "delete"),
    ("collector", "search.search.svc.cluster.local", "search"),
    ("search", "collector.ops.svc.cluster.local", "ping"),
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let started = Instant::now();
    step(&format!(
        "Starting two clusters multi-primary (kube-apiserver {}, istiod and pilot-agent from tests/istio, SPIRE, trustweave-sds node mode)",
        trustweave_e2e::kube::KUBERNETES_VERSION
    ));
    let mesh = IstioMesh::start(&args.dir, args.subnet)
        .await
        .context("starting the mesh (scripts/setup.sh builds its parts; it needs root)")?;
    for cluster in &mesh.clusters {
        let config = &cluster.istiod.config;
        println!(
            "  {:<4} cluster {:<16} network {:<12} trust domain {:<16} istiod {}",
            cluster.cloud,
            config.cluster_id,
            config.network,
            config.trust_domain(),
            cluster.istiod.xds_addr()
        );
    }
    println!("  ready in {:.1} s", started.elapsed().as_secs_f64());

    step("Identities in each Envoy (/certs: served by trustweave-sds from SPIRE, not by istiod)");
    for (_, _, proxy) in &mesh.proxies {
        let certs: Value = serde_json::from_str(&proxy.admin_get("/certs").await?)
            .context("/certs is not JSON")?;
        let (id, serial) = workload_certificate(&certs);
        println!("  {:<22} {:<64} serial {serial}", proxy.spec().name, id);
    }

    step("Calls (through each caller's sidecar; aws ↔ gcp through the east-west gateways)");
    println!(
        "  {:<50} {:<8} {:<16} {:<52} {:>8}",
        "from → to", "action", "decision", "caller at the backend", "latency"
    );
    for (from, host, action) in CALLS {
        let begin = Instant::now();
        let (status, text, body) = mesh.call(from, host, action).await?;
        let decision = match status {
            200 => "allowed (200)".to_string(),
            403 => "denied (403)".to_string(),
            other => format!(
                "HTTP {other}: {}",
                text.chars().take(40).collect::<String>()
            ),
        };
        let caller = body["headers"]["x-trustweave-caller"][0]
            .as_str()
            .unwrap_or("-");
        println!(
            "  {:<50} {:<8} {:<16} {:<52} {:>5.1} ms",
            format!("{from} → {host}"),
            action,
            decision,
            caller,
            begin.elapsed().as_secs_f64() * 1000.0
        );
    }

    step("Federation: `spire-server federation refresh` of each peer's bundle endpoint (https_spiffe)");
    for (cluster, spire) in mesh.clusters.iter().zip(&mesh.spires) {
        report::print_federation(&cluster.cloud, spire);
    }

    step("What each node's trustweave-sds serves its Envoys (trustweave-sds inspect --workloads)");
    for (cluster, sds) in mesh.clusters.iter().zip(&mesh.sds) {
        report::print_inspect(&node_sds::binary(), &cluster.cloud, sds.admin()).await?;
    }

    step(
        "Control plane: each istiod's view of its proxies (/debug/syncz, as istioctl proxy-status)",
    );
    for cluster in &mesh.clusters {
        for proxy in cluster.istiod.sync_status().await? {
            let types: Vec<String> = proxy
                .types
                .iter()
                .map(|(kind, state)| format!("{kind} {state}"))
                .collect();
            println!(
                "  {:<16} {:<38} {}",
                cluster.istiod.config.cluster_id,
                proxy.proxy,
                types.join(", ")
            );
        }
    }
    println!("\n  logs and configurations: {}", args.dir.display());

    if args.once {
        return Ok(());
    }
    println!(
        "\nRunning. Call through the orchestrator's sidecar, for example:\n  ip netns exec tw{}-aws-orches curl -s -H 'host: search.search.svc.cluster.local' -H '{ACTION_HEADER}: search' http://127.0.0.1:8080/\nCtrl-C stops everything.",
        args.subnet
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// The workload certificate's URI SAN and serial in Envoy's `/certs`.
fn workload_certificate(certs: &Value) -> (String, String) {
    for entry in certs["certificates"].as_array().into_iter().flatten() {
        for cert in entry["cert_chain"].as_array().into_iter().flatten() {
            let uri = cert["subject_alt_names"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|san| san["uri"].as_str());
            if let Some(uri) = uri {
                let serial = cert["serial_number"].as_str().unwrap_or("-");
                return (uri.to_string(), serial.to_string());
            }
        }
    }
    ("-".to_string(), "-".to_string())
}

fn step(title: &str) {
    println!("\n== {title}");
}
