//! `sds-soak`: trustweave-sds (the real binary) under churn for a while, its
//! RSS sampled throughout. Each second: 50 connections opened and dropped, 20
//! streams that subscribe, read and go away, 5 refused oversized requests, and
//! (from the stand-in) a rotation. 100 streams stay open and must receive every
//! rotation. Prints RSS over time; `--seconds` sets the length (600 for the
//! 10-minute soak, a few for a smoke run).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::process::Command;
use trustweave_e2e::bench_sds::rss_kib;
use trustweave_e2e::sds::SotwClient;

#[derive(Parser, Debug)]
#[command(name = "sds-soak")]
struct Args {
    /// How long to churn.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// RSS sample interval.
    #[arg(long, default_value_t = 30)]
    sample_secs: u64,
}

fn sibling(name: &str) -> std::path::PathBuf {
    let me = std::env::current_exe().expect("own path");
    me.with_file_name(name)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let agent_socket = dir.path().join("agent.sock");
    let sds_socket = dir.path().join("sds.sock");
    let mut agent = Command::new(sibling("workload-api-standin"))
        .arg("--agent")
        .arg(format!(
            "{}=spiffe://gcp.company.com/ns/soak/sa/api",
            agent_socket.display()
        ))
        .arg("--agent")
        .arg(format!(
            "{}=spiffe://aws.company.com/ns/soak/sa/peer",
            dir.path().join("aws-agent.sock").display()
        ))
        .args([
            "--federate",
            "gcp.company.com,aws.company.com",
            "--rotate-every-secs",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut server = Command::new(sibling("trustweave-sds"))
        .arg("--workload-api-socket")
        .arg(&agent_socket)
        .arg("--sds-socket")
        .arg(&sds_socket)
        .args(["--admin-addr", "off", "--max-connections", "4096"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = server
        .id()
        .ok_or_else(|| anyhow::anyhow!("server exited"))?;
    wait_for_socket(&sds_socket).await;
    let mut steady = Vec::new();
    for _ in 0..100 {
        let mut client = SotwClient::open(&sds_socket).await;
        client.request(&["default"], None).await;
        client.next().await;
        client.request(&["default"], None).await;
        steady.push(client);
    }
    let started = Instant::now();
    let mut next_sample = Duration::ZERO;
    let mut samples = Vec::new();
    let huge = "spiffe://x/".to_string() + &"a".repeat(64 * 1024);
    while started.elapsed() < Duration::from_secs(args.seconds) {
        if started.elapsed() >= next_sample {
            let rss = rss_kib(pid);
            println!("t={:>4}s rss={:>7} KiB", started.elapsed().as_secs(), rss);
            samples.push(rss);
            next_sample += Duration::from_secs(args.sample_secs);
        }
        for _ in 0..50 {
            drop(tokio::net::UnixStream::connect(&sds_socket).await?);
        }
        for _ in 0..20 {
            let mut client = SotwClient::open(&sds_socket).await;
            client.request(&["default", "ROOTCA"], None).await;
            client.next().await;
        }
        for _ in 0..5 {
            let mut client = SotwClient::open(&sds_socket).await;
            client.request(&[&huge], None).await;
            let _ = client.refused().await;
        }
        // Every steady stream keeps receiving rotations (about one a second).
        for client in &mut steady {
            while let Ok(Some(response)) =
                tokio::time::timeout(Duration::from_millis(1), client.try_next()).await
            {
                let _ = response;
                client.request(&["default"], None).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss = rss_kib(pid);
    samples.push(rss);
    let first = samples.get(1).copied().unwrap_or(samples[0]);
    let max = samples.iter().copied().max().unwrap_or(0);
    println!(
        "sds-soak: {} s, RSS after warm-up {first} KiB, at end {rss} KiB, max {max} KiB",
        args.seconds
    );
    anyhow::ensure!(
        server.try_wait()?.is_none(),
        "trustweave-sds exited during the soak"
    );
    let _ = server.kill().await;
    let _ = agent.kill().await;
    Ok(())
}

async fn wait_for_socket(path: &Path) {
    for _ in 0..500 {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} never answered", path.display());
}
