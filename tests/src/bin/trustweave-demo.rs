//! `trustweave-demo` (`make demo`): the cross-cloud mesh on this machine, as
//! the users' multi-cloud guide runs it on three clusters.
//!
//! AWS, GCP and Azure — each its own SPIFFE trust domain with its own real
//! SPIRE (server and node agent, built by `scripts/setup.sh`), federated
//! through SPIFFE bundle endpoints (`https_spiffe`) — and on-prem, which
//! federates with nobody. Per cloud: one node-level trustweave-sds (the
//! agent's authorized delegate), two workloads behind real Envoy sidecars
//! running trustweave-filter with the configuration `istio/clouds/<cloud>/`
//! ships, and an east-west gateway. Everything listens on loopback
//! (`127.<subnet>.<cloud>.<host>`). As root each sidecar runs as its own user
//! (SPIRE selects it by `unix:uid:N`); otherwise by its own binary path.
//!
//! Prints a table of calls (from → to, action, decision, latency), what each
//! service received on a round trip AWS → GCP → Azure → AWS, and what each
//! node's trustweave-sds serves each Envoy (`trustweave-sds inspect`).
//! `--once` exits after the report; otherwise it keeps running and says how
//! to call into it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::Value;
use trustweave_e2e::mesh::{ports, report, Call, Mesh, MeshOptions};

/// The cross-cloud mesh on one machine, with a report.
#[derive(Parser, Debug)]
struct Args {
    /// Working directory for sockets, configurations and logs.
    #[arg(long, default_value = "/tmp/trustweave-demo")]
    dir: PathBuf,
    /// The trustweave-sds binary (default: next to this one).
    #[arg(long, env = "TRUSTWEAVE_SDS_BIN")]
    sds_bin: Option<PathBuf>,
    /// Second octet of every address (127.<subnet>.<cloud>.<host>).
    #[arg(long, default_value_t = 77)]
    subnet: u8,
    /// Exit after the report instead of running until Ctrl-C.
    #[arg(long)]
    once: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    let mut options = MeshOptions::new(&args.dir, args.subnet);
    // The demo runs as a normal user: loopback addresses, no namespaces.
    options.namespaces = false;
    if let Some(bin) = args.sds_bin {
        options.sds_bin = bin;
    }
    let started = Instant::now();
    let spire_version = trustweave_e2e::real_spire::version()
        .await
        .context("SPIRE (scripts/setup.sh builds it)")?;
    step(&format!(
        "Starting the mesh: {spire_version} and its agent ×4, trustweave-sds ×4 (--source delegated), Envoy ×10"
    ));
    let mesh = Mesh::start(options).await.context("starting the mesh")?;
    for cloud in &mesh.clouds {
        let federation = if cloud.plan.federated {
            format!("federated with {}", cloud.federates_with.join(", "))
        } else {
            "federates with nobody".to_string()
        };
        println!(
            "  {:<6} {:<19} {:<12} bundle endpoint {}  {federation}",
            cloud.plan.name,
            cloud.plan.trust_domain,
            cloud.plan.region,
            cloud.spire.server.bundle_endpoint_url().unwrap_or_default(),
        );
        for w in &cloud.workloads {
            println!(
                "         {:<52} sidecar outbound {}  SPIRE selector {}",
                w.spiffe_id,
                w.outbound,
                w.selector.selector()
            );
        }
        if cloud.gateway.is_some() {
            println!(
                "         east-west gateway {} (AUTO_PASSTHROUGH)",
                cloud.gateway_addr
            );
        }
    }
    println!("  ready in {:.1} s", started.elapsed().as_secs_f64());

    step("Calls (through each caller's sidecar; cross-cloud through the east-west gateways)");
    println!(
        "  {:<34} {:<14} {:<28} {:>8}",
        "from → to", "action", "decision", "latency"
    );
    let calls: &[(&str, &str, &str, &str)] = &[
        ("aws", "orchestrator", "gcp", "search"),
        ("aws", "orchestrator", "azure", "process"),
        ("aws", "orchestrator", "gcp", "process"),
        ("aws", "orchestrator", "azure", "search"),
        ("gcp", "indexer", "azure", "ping"),
        ("azure", "reporter", "aws", "health_check"),
        ("aws", "orchestrator", "gcp", "status"),
        ("onprem", "legacy", "gcp", "ping"),
        ("onprem", "legacy", "azure", "ping"),
    ];
    for (from, workload, to, action) in calls {
        let target = mesh.cloud(to).service();
        let host = target.plan.host();
        let begin = Instant::now();
        let call = mesh.call_from(from, workload, &host, action, &[]).await?;
        let decision = decision(&call);
        println!(
            "  {:<34} {:<14} {:<28} {:>5.1} ms",
            format!("{from}/{workload} → {to}/{}", target.plan.name),
            action,
            decision,
            begin.elapsed().as_secs_f64() * 1000.0
        );
    }

    step("Round trip AWS → GCP → Azure → AWS: what each service received");
    let begin = Instant::now();
    let trip = mesh.round_trip(&[("baggage", "userId=alice")]).await?;
    println!(
        "  HTTP {} in {:.1} ms",
        trip.status,
        begin.elapsed().as_secs_f64() * 1000.0
    );
    let mut hop = &trip.body;
    let mut trace = String::new();
    while hop.is_object() {
        let h = |name: &str| hop["headers"][name][0].as_str().unwrap_or("-").to_string();
        println!("  {}", hop["service"].as_str().unwrap_or("?"));
        println!("    caller        {}", h("x-trustweave-caller"));
        println!(
            "    caller place  {} / {} / {}",
            h("x-trustweave-caller-trust-domain"),
            h("x-trustweave-caller-cloud"),
            h("x-trustweave-caller-region")
        );
        println!(
            "    here          {} / {}",
            h("x-trustweave-cloud"),
            h("x-trustweave-region")
        );
        println!("    traceparent   {}", h("traceparent"));
        println!("    baggage       {}", h("baggage"));
        trace = h("traceparent").split('-').nth(1).unwrap_or("").to_string();
        hop = &hop["next"]["answer"];
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut spans = mesh.otlp.trace(&trace);
    while spans.len() < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        spans = mesh.otlp.trace(&trace);
    }
    let mut services: Vec<String> = spans.iter().map(|s| s.service.clone()).collect();
    services.sort();
    services.dedup();
    println!(
        "  trace {trace}: {} spans at the OTLP receiver from {}",
        spans.len(),
        services.join(", ")
    );

    step("Federation: `spire-server federation refresh` of each peer's bundle endpoint (https_spiffe)");
    for cloud in &mesh.clouds {
        report::print_federation(cloud.plan.name, &cloud.spire);
    }

    step("What each node's trustweave-sds serves its Envoys (trustweave-sds inspect --workloads)");
    for cloud in &mesh.clouds {
        report::print_inspect(&mesh.options.sds_bin, cloud.plan.name, cloud.sds.admin()).await?;
    }

    if !args.once {
        let aws = mesh.cloud("aws").caller().outbound;
        let gcp = mesh.cloud("gcp").service().plan.host();
        step("Running; Ctrl-C to stop. Call into it as the AWS orchestrator:");
        println!("  curl -H 'host: {gcp}' -H 'x-trustweave-action: search' http://{aws}/");
        println!("  curl -H 'host: {gcp}' -H 'x-trustweave-action: delete' http://{aws}/   # 403");
        println!(
            "  trustweave-sds admin: http://{}/debug/workloads (and /metrics)",
            mesh.cloud("aws").sds.admin()
        );
        println!(
            "  logs and configurations: {} (bundle endpoints on :{})",
            args.dir.display(),
            ports::BUNDLE_ENDPOINT
        );
        tokio::signal::ctrl_c().await?;
    }
    println!("\ndemo complete");
    Ok(())
}

fn decision(call: &Call) -> String {
    match call.status {
        200 => "allowed (200)".to_string(),
        403 => format!(
            "denied (403{})",
            call.response
                .header("x-trustweave-denied-by")
                .map(|p| format!(", {p}"))
                .unwrap_or_default()
        ),
        503 => "refused at handshake (503)".to_string(),
        other => format!("HTTP {other}: {}", first_line(&call.body)),
    }
}

fn first_line(body: &Value) -> String {
    body.to_string().chars().take(60).collect()
}

fn step(title: &str) {
    println!("\n== {title}");
}
