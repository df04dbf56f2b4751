//! `workload-api-standin`: a SPIFFE Workload API server standing in for SPIRE agents.
//!
//! Serves one workload identity per socket, each from a real CA of its trust
//! domain (one CA per trust domain, shared by the agents of that domain).
//! Trust domains listed together in `--federate` receive each other's bundles.
//!
//! Example (two clouds, federated, rotating every 30 s):
//!
//! ```text
//! workload-api-standin \
//!   --agent /tmp/tw/aws-agent.sock=spiffe://aws.company.com/ns/demo/sa/client \
//!   --agent /tmp/tw/gcp-agent.sock=spiffe://gcp.company.com/ns/demo/sa/server \
//!   --federate aws.company.com,gcp.company.com --rotate-every-secs 30
//! ```
//!
//! Signals: `SIGHUP` rotates every SVID now; `SIGTERM`/`SIGINT` stop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use trustweave_e2e::pki::TrustDomainCa;
use trustweave_e2e::workload_api::WorkloadApiStandIn;

/// SPIFFE Workload API stand-in for the SPIRE agent.
#[derive(Parser, Debug)]
#[command(name = "workload-api-standin", version)]
struct Args {
    /// `SOCKET=SPIFFE_ID`: serve this workload identity on this Unix socket (repeatable).
    #[arg(long = "agent", required = true)]
    agents: Vec<String>,
    /// Comma-separated trust domains that federate with each other (repeatable).
    #[arg(long, value_delimiter = ';')]
    federate: Vec<String>,
    /// Lifetime of each issued X.509-SVID, in seconds.
    #[arg(long, default_value_t = 3600)]
    svid_ttl_secs: u64,
    /// Rotate every SVID at this interval, in seconds (0: only on SIGHUP).
    #[arg(long, default_value_t = 0)]
    rotate_every_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ttl = Duration::from_secs(args.svid_ttl_secs);
    let mut cas: BTreeMap<String, Arc<TrustDomainCa>> = BTreeMap::new();
    let mut agents = Vec::new();
    for spec in &args.agents {
        let (socket, id) = spec
            .split_once('=')
            .with_context(|| format!("--agent {spec:?}: expected SOCKET=SPIFFE_ID"))?;
        let Some(td) = id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split('/').next())
        else {
            bail!("--agent {spec:?}: {id:?} is not a SPIFFE ID");
        };
        let ca = Arc::clone(
            cas.entry(td.to_string())
                .or_insert_with(|| Arc::new(TrustDomainCa::new(td))),
        );
        let agent = WorkloadApiStandIn::start(PathBuf::from(socket), ca, id, ttl).await;
        println!(
            "serving {id} on {socket} (serial {})",
            agent.current_svid().serial_hex
        );
        agents.push(agent);
    }
    for group in &args.federate {
        let domains: Vec<&str> = group
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        for td in &domains {
            if !cas.contains_key(*td) {
                bail!("--federate {group:?}: no --agent is in trust domain {td:?}");
            }
        }
        for agent in &agents {
            let own = agent.ca().trust_domain().to_string();
            if !domains.contains(&own.as_str()) {
                continue;
            }
            for peer in domains.iter().filter(|td| **td != own) {
                agent.federate_with(&cas[*peer]);
            }
        }
        println!("federated: {}", domains.join(" <-> "));
    }
    let rotations: Vec<_> = if args.rotate_every_secs > 0 {
        agents
            .iter()
            .map(|a| a.rotate_every(Duration::from_secs(args.rotate_every_secs)))
            .collect()
    } else {
        Vec::new()
    };
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                for agent in &agents {
                    let svid = agent.rotate_now();
                    println!("rotated {} (serial {})", svid.spiffe_id, svid.serial_hex);
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    for task in rotations {
        task.abort();
    }
    for agent in &agents {
        agent.stop_serving().await;
    }
    Ok(())
}
