//! `trustweave-demo`: the whole stack on one machine, two federated trust domains.
//!
//! SPIRE agent stand-ins (AWS client, GCP server) → two `trustweave-sds`
//! processes → two real Envoys. Prints what each Envoy received (via
//! `trustweave-sds inspect` and Envoy's `/certs`), a cross-domain mTLS request,
//! and a live rotation. `--hold` keeps everything running until Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::Value;
use tokio::process::{Child, Command};
use trustweave_e2e::envoy::{self, Envoy};
use trustweave_e2e::http;
use trustweave_e2e::pki::TrustDomainCa;
use trustweave_e2e::workload_api::WorkloadApiStandIn;

const CLIENT_ID: &str = "spiffe://aws.company.com/ns/checkout/sa/client";
const SERVER_ID: &str = "spiffe://gcp.company.com/ns/inventory/sa/server";

/// Local two-trust-domain demo of trustweave-sds with real Envoy.
#[derive(Parser, Debug)]
struct Args {
    /// Working directory for sockets, configs and logs.
    #[arg(long, default_value = "/tmp/trustweave-demo")]
    dir: PathBuf,
    /// The trustweave-sds binary (default: next to this one).
    #[arg(long, env = "TRUSTWEAVE_SDS_BIN")]
    sds_bin: Option<PathBuf>,
    /// Keep running after the demo until Ctrl-C.
    #[arg(long)]
    hold: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sds_bin = match args.sds_bin {
        Some(bin) => bin,
        None => std::env::current_exe()?
            .parent()
            .context("executable directory")?
            .join("trustweave-sds"),
    };
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let dir = args.dir.as_path();

    step("SPIRE agent stand-ins: aws.company.com and gcp.company.com, federated");
    let aws = Arc::new(TrustDomainCa::new("aws.company.com"));
    let gcp = Arc::new(TrustDomainCa::new("gcp.company.com"));
    let client_agent = WorkloadApiStandIn::start(
        dir.join("aws-agent.sock"),
        Arc::clone(&aws),
        CLIENT_ID,
        Duration::from_secs(3600),
    )
    .await;
    let server_agent = WorkloadApiStandIn::start(
        dir.join("gcp-agent.sock"),
        Arc::clone(&gcp),
        SERVER_ID,
        Duration::from_secs(3600),
    )
    .await;
    client_agent.federate_with(&gcp);
    server_agent.federate_with(&aws);
    println!("  {CLIENT_ID} on {}", client_agent.socket().display());
    println!("  {SERVER_ID} on {}", server_agent.socket().display());

    step("trustweave-sds, one per workload (as beside istio-proxy in a pod)");
    let client_sds = dir.join("aws-sds.sock");
    let server_sds = dir.join("gcp-sds.sock");
    let _client_proc = spawn_sds(
        &sds_bin,
        dir,
        "aws",
        &client_agent,
        &client_sds,
        "127.0.0.1:15201",
    )
    .await?;
    let _server_proc = spawn_sds(
        &sds_bin,
        dir,
        "gcp",
        &server_agent,
        &server_sds,
        "127.0.0.1:15202",
    )
    .await?;

    step("Envoy 1.40: GCP server (mTLS listener) and AWS client, secrets from SDS");
    let server = Envoy::start(
        "gcp-server",
        dir,
        &envoy::server_bootstrap("gcp-server", &server_sds),
    )
    .await;
    server.wait_live().await;
    let upstream = server.listener(envoy::MTLS_LISTENER).await;
    let client = Envoy::start(
        "aws-client",
        dir,
        &envoy::client_bootstrap(
            "aws-client",
            &client_sds,
            upstream,
            "spiffe://gcp.company.com/",
        ),
    )
    .await;
    client.wait_live().await;

    step("What trustweave-sds serves the GCP Envoy (trustweave-sds inspect)");
    let inspect = Command::new(&sds_bin)
        .args(["inspect", "--sds-socket"])
        .arg(&server_sds)
        .output()
        .await?;
    print!("{}", String::from_utf8_lossy(&inspect.stdout));

    step("What each Envoy holds (admin /certs)");
    for (name, e) in [("gcp-server", &server), ("aws-client", &client)] {
        let certs: Value = serde_json::from_str(&e.admin_get("/certs").await)?;
        for chain in certs["certificates"].as_array().into_iter().flatten() {
            for cert in chain["cert_chain"].as_array().into_iter().flatten() {
                let sans: Vec<&str> = cert["subject_alt_names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["uri"].as_str())
                    .collect();
                println!(
                    "  {name}: serial {} {} expires {}",
                    cert["serial_number"].as_str().unwrap_or("?"),
                    sans.join(","),
                    cert["expiration_time"].as_str().unwrap_or("?")
                );
            }
        }
    }

    step("Cross-domain mTLS request: AWS client → GCP server");
    let listener = client.listener(envoy::PLAIN_LISTENER).await;
    let response = http::get(listener, "/", &[]).await?;
    println!("  HTTP {}", response.status);
    println!(
        "  server saw caller  {}",
        response.header(envoy::PEER_HEADER).unwrap_or("-")
    );
    println!(
        "  server presented   {}",
        response.header(envoy::SELF_HEADER).unwrap_or("-")
    );
    if response.status != 200 {
        bail!("cross-domain request failed: {}", response.body);
    }

    step("Rotation: the GCP agent issues a new SVID; Envoy picks it up without restart");
    let rotated = server_agent.rotate_now();
    let started = Instant::now();
    let serial = envoy::normalize_serial(&rotated.serial_hex);
    while !server.cert_serials().await.contains(&serial) {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("rotation did not reach Envoy");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "  new serial {serial} in Envoy /certs after {:?}",
        started.elapsed()
    );
    let again = http::get(listener, "/", &[]).await?;
    println!("  request after rotation: HTTP {}", again.status);

    if args.hold {
        step("Running; Ctrl-C to stop");
        println!("  curl http://{listener}/   (through the AWS client Envoy)");
        println!("  admin: trustweave-sds 127.0.0.1:15201 / 127.0.0.1:15202 (/metrics, /readyz)");
        tokio::signal::ctrl_c().await?;
    }
    println!("\ndemo complete");
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

async fn spawn_sds(
    bin: &Path,
    dir: &Path,
    name: &str,
    agent: &WorkloadApiStandIn,
    sds_socket: &Path,
    admin: &str,
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}-sds.log")))?;
    let child = Command::new(bin)
        .arg("--workload-api-socket")
        .arg(agent.endpoint())
        .arg("--sds-socket")
        .arg(sds_socket)
        .args(["--admin-addr", admin])
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {} (build it with cargo build)", bin.display()))?;
    let addr = admin.parse()?;
    let started = Instant::now();
    loop {
        if let Ok(r) = http::get(addr, "/readyz", &[]).await {
            if r.status == 200 {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(15) {
            bail!(
                "trustweave-sds {name} not ready; see {}",
                dir.join(format!("{name}-sds.log")).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("  {name}: {} ready (admin {admin})", sds_socket.display());
    Ok(child)
}
