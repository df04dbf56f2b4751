//! `trustweave-demo`: the whole stack on one machine, as on a Kubernetes node.
//!
//! A SPIRE agent stand-in (its Delegated Identity API, holding the bundles of
//! `aws.company.com` and `gcp.company.com`, federated) → one node-mode
//! `trustweave-sds` process → two real Envoys on its one socket, each attested
//! by its PID and served its own SVID. Prints what the node serves each
//! workload (`trustweave-sds inspect --workloads`) and what each Envoy holds
//! (`/certs`), a cross-domain mTLS request, and a live rotation of one
//! workload. `--hold` keeps everything running until Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::Value;
use tokio::process::{Child, Command};
use trustweave_e2e::delegated_api::DelegatedApiStandIn;
use trustweave_e2e::envoy::{self, Envoy};
use trustweave_e2e::http;
use trustweave_e2e::pki::TrustDomainCa;

const CLIENT_ID: &str = "spiffe://aws.company.com/ns/checkout/sa/client";
const SERVER_ID: &str = "spiffe://gcp.company.com/ns/inventory/sa/server";
const SDS_ID: &str = "spiffe://aws.company.com/ns/spire/sa/trustweave-sds";
const ADMIN: &str = "127.0.0.1:15201";

/// Local node-mode demo of trustweave-sds with real Envoy, two federated trust domains.
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

    step("SPIRE agent stand-in (Delegated Identity API): aws.company.com and gcp.company.com bundles");
    let aws = Arc::new(TrustDomainCa::new("aws.company.com"));
    let gcp = Arc::new(TrustDomainCa::new("gcp.company.com"));
    // The delegate's PID is only known once it runs; until then nobody is authorized.
    let agent = DelegatedApiStandIn::start(
        dir.join("admin-sockets/admin.sock"),
        0,
        SDS_ID,
        &[&aws, &gcp],
        Duration::from_secs(3600),
    )
    .await;
    println!(
        "  admin socket {} (authorized delegate {SDS_ID})",
        agent.endpoint()
    );

    step("trustweave-sds, one per node (--source delegated)");
    let sds_socket = dir.join("sds/socket");
    let sds = spawn_sds(&sds_bin, dir, &agent, &sds_socket).await?;

    step("Envoy 1.40 ×2 on the one node socket: GCP server (mTLS listener), AWS client");
    let server = Envoy::start(
        "gcp-server",
        dir,
        &envoy::server_bootstrap("gcp-server", &sds_socket),
    )
    .await;
    let server_pid = server.pid().context("server Envoy PID")?;
    agent.register(server_pid, &gcp, SERVER_ID, &["aws.company.com"]);
    server.wait_live().await;
    let upstream = server.listener(envoy::MTLS_LISTENER).await;
    let client = Envoy::start(
        "aws-client",
        dir,
        &envoy::client_bootstrap(
            "aws-client",
            &sds_socket,
            upstream,
            "spiffe://gcp.company.com/",
        ),
    )
    .await;
    let client_pid = client.pid().context("client Envoy PID")?;
    agent.register(client_pid, &aws, CLIENT_ID, &["gcp.company.com"]);
    client.wait_live().await;
    println!("  gcp-server pid {server_pid} registered as {SERVER_ID}");
    println!("  aws-client pid {client_pid} registered as {CLIENT_ID}");

    step("What the node serves each workload (trustweave-sds inspect --workloads)");
    let inspect = Command::new(&sds_bin)
        .args(["inspect", "--workloads", "--admin-addr", ADMIN])
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

    step("Rotation: the agent issues the GCP server a new SVID; only its Envoy gets it, without restart");
    let rotated = agent.rotate(server_pid);
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
        println!("  admin: trustweave-sds {ADMIN} (/metrics, /readyz, /debug/workloads)");
        tokio::signal::ctrl_c().await?;
    }
    drop(sds);
    println!("\ndemo complete");
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

async fn spawn_sds(
    bin: &Path,
    dir: &Path,
    agent: &DelegatedApiStandIn,
    sds_socket: &Path,
) -> anyhow::Result<Child> {
    let log_path = dir.join("trustweave-sds.log");
    let log = std::fs::File::create(&log_path)?;
    let child = Command::new(bin)
        .args(["--source", "delegated", "--admin-socket"])
        .arg(agent.endpoint())
        .arg("--sds-socket")
        .arg(sds_socket)
        .args(["--admin-addr", ADMIN])
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {} (build it with cargo build)", bin.display()))?;
    // The agent attests its delegate by PID: this one is trustweave-sds.
    let pid = child.id().context("trustweave-sds PID")?;
    agent.update(|state| {
        state.callers.insert(pid, SDS_ID.to_string());
    });
    let addr = ADMIN.parse()?;
    let started = Instant::now();
    loop {
        if let Ok(r) = http::get(addr, "/readyz", &[]).await {
            if r.status == 200 {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(15) {
            bail!("trustweave-sds not ready; see {}", log_path.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "  {} ready (pid {pid}, admin {ADMIN}, bundles from the agent)",
        sds_socket.display()
    );
    Ok(child)
}
