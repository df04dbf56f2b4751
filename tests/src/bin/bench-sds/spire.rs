//! The same fan-out on the real SPIRE 1.13, side by side: spire-agent's own
//! SDS (on its Workload API socket), trustweave-sds per pod (reading that
//! Workload API) and trustweave-sds per node (the agent's authorized
//! delegate), each with a fresh server and agent of its own.
//!
//! Updates come from SPIRE's own commands, so nothing is timed from a
//! moment the benchmark controls (the agent acts at its next sync, within
//! 5 s): a bundle change is `localauthority x509 prepare` (a new root in the
//! bundle), a rotation is `activate` then `taint` of the old authority (the
//! agent re-signs every SVID it signed). Each is timed from the first client
//! stream's receipt to each other's (the fan-out spread), with the CPU the
//! serving process and the agent spent from the command to the last receipt.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::mpsc;
use trustweave_e2e::bench_filter::cpu_micros;
use trustweave_e2e::bench_sds::{percentiles, rss_kib, ENDED};
use trustweave_e2e::real_spire::{self, SpireAgent, SpireServer};

use super::{
    first_secret, receipts, sibling, spawn_sds, ClientProcesses, Receipts, POD_ID, SDS_ID,
};

const TD: &str = "aws.company.com";
const AGENT_ID: &str = "spiffe://aws.company.com/node/bench";
/// How long one SPIRE-driven update may take to reach every stream (sync included).
const SPIRE_UPDATE_LIMIT: Duration = Duration::from_secs(30);

/// Which process serves SDS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// spire-agent's own SDS.
    SpireAgent,
    /// trustweave-sds reading the agent's Workload API.
    TrustweavePod,
    /// trustweave-sds on the agent's Delegated Identity API.
    TrustweaveNode,
}

impl Server {
    /// Every server, in report order.
    pub const ALL: [Server; 3] = [
        Server::SpireAgent,
        Server::TrustweavePod,
        Server::TrustweaveNode,
    ];

    fn label(self) -> &'static str {
        match self {
            Server::SpireAgent => "spire-agent SDS",
            Server::TrustweavePod => "trustweave-sds per pod",
            Server::TrustweaveNode => "trustweave-sds per node",
        }
    }
}

/// One SPIRE-driven update.
struct Spread {
    /// p50, p99, max from the first stream's receipt, ms.
    latency: (f64, f64, f64),
    /// Live streams that neither got it nor ended.
    missed: usize,
    /// Streams the server ended instead of updating.
    ended: usize,
    server_cpu_ms: f64,
    agent_cpu_ms: f64,
}

/// One row of the side-by-side table.
pub struct SpireRow {
    server: Server,
    clients: usize,
    workloads: usize,
    rss_per_stream_kib: f64,
    rotation: Vec<Spread>,
    bundle: Vec<Spread>,
}

impl SpireRow {
    /// Streams left behind (not updated, not ended).
    pub fn missed(&self) -> usize {
        self.total(|s| s.missed)
    }

    /// Streams the server ended.
    pub fn ended(&self) -> usize {
        self.total(|s| s.ended)
    }

    /// `count` summed over every update of the row.
    fn total(&self, count: impl Fn(&Spread) -> usize) -> usize {
        self.rotation.iter().chain(&self.bundle).map(count).sum()
    }

    /// For the plots: the server's label, clients, median server CPU per
    /// pushed stream on a rotation (µs) and RSS per stream (KiB).
    pub fn plot_point(&self) -> (&'static str, f64, f64, f64) {
        let server = median(self.rotation.iter().map(|s| s.server_cpu_ms).collect());
        (
            self.server.label(),
            self.clients as f64,
            server * 1000.0 / self.clients as f64,
            self.rss_per_stream_kib,
        )
    }

    /// Whether trustweave-sds serves it (the smoke run holds those to no stream lost).
    pub fn is_trustweave(&self) -> bool {
        self.server != Server::SpireAgent
    }
}

/// Runs `server` with `clients` Envoy-like clients over `workloads` processes, `rounds` updates of each kind.
pub async fn run(
    server: Server,
    clients: usize,
    workloads: usize,
    rounds: usize,
) -> anyhow::Result<SpireRow> {
    let dir = tempfile::Builder::new()
        .prefix("tw-bsp-")
        .tempdir_in("/tmp")?;
    let spire = SpireServer::start(&dir.path().join("srv"), TD).await?;
    let agent = SpireAgent::start(&spire, &dir.path().join("ag"), AGENT_ID, &[SDS_ID]).await?;
    let uid = rustix::process::geteuid().as_raw();
    // Every client process runs as this user: one identity (per pod, as Istio runs a pod).
    spire
        .create_entry(AGENT_ID, POD_ID, &[&format!("unix:uid:{uid}")], &[])
        .await?;
    let sds_bin = std::fs::canonicalize(sibling("trustweave-sds")?)?;
    if server == Server::TrustweaveNode {
        spire
            .create_entry(
                AGENT_ID,
                SDS_ID,
                &[&format!("unix:path:{}", sds_bin.display())],
                &[],
            )
            .await?;
    }
    agent.wait_for_svid(Duration::from_secs(30)).await?;
    let agent_pid = agent.pid().context("agent pid")?;

    let socket = dir.path().join("sds.sock");
    let log = dir.path().join("sds.log");
    let mut sds = None;
    let (socket, server_pid) = match server {
        Server::SpireAgent => (Path::new(&agent.workload_socket()).to_path_buf(), agent_pid),
        Server::TrustweavePod | Server::TrustweaveNode => {
            let source = if server == Server::TrustweavePod {
                vec![
                    "--workload-api-socket".to_string(),
                    format!("unix:{}", agent.workload_socket()),
                ]
            } else {
                vec![
                    "--source".to_string(),
                    "delegated".to_string(),
                    "--admin-socket".to_string(),
                    format!("unix:{}", agent.admin_socket()),
                ]
            };
            let child = spawn_sds(&sds_bin, &source, &socket, clients, &log)?;
            let pid = child.id().context("trustweave-sds pid")?;
            sds = Some(child);
            first_secret(&socket, Instant::now()).await?;
            (socket, pid)
        }
    };
    let baseline_rss = rss_kib(server_pid);
    let mut processes = ClientProcesses::spawn(&socket, clients, workloads)?;
    processes.wait_ready(&log).await?;
    let rss_per_stream_kib =
        rss_kib(server_pid).saturating_sub(baseline_rss) as f64 / (clients * 2) as f64;
    let mut events = processes.take_events();

    let mut rotation = Vec::new();
    let mut bundle = Vec::new();
    // Streams of each name the server has ended so far (never reopened).
    let mut live = LiveStreams {
        default: clients,
        rootca: clients,
    };
    for _ in 0..rounds {
        let old = spire.active_authority().await?;
        live.drain(&mut events);
        let meter = Meter::start(server_pid, agent_pid);
        let next = spire.prepare_authority().await?;
        bundle.push(meter.finish(&mut events, "ROOTCA", &mut live).await);

        spire.activate_authority(&next).await?;
        live.drain(&mut events);
        let meter = Meter::start(server_pid, agent_pid);
        spire.taint_authority(&old).await?;
        rotation.push(meter.finish(&mut events, "default", &mut live).await);

        // The old root leaves the bundle: every stream gets it before the next round.
        live.drain(&mut events);
        let meter = Meter::start(server_pid, agent_pid);
        spire.revoke_authority(&old).await?;
        let revoked = meter.finish(&mut events, "ROOTCA", &mut live).await;
        if revoked.missed > 0 && server != Server::SpireAgent {
            bail!(
                "{}: {} streams missed the revocation",
                server.label(),
                revoked.missed
            );
        }
    }
    processes.stop().await;
    drop(sds);
    Ok(SpireRow {
        server,
        clients,
        workloads,
        rss_per_stream_kib,
        rotation,
        bundle,
    })
}

/// CPU of the serving process and the agent from a command on.
struct Meter {
    server_pid: u32,
    agent_pid: u32,
    server_cpu_us: u64,
    agent_cpu_us: u64,
}

impl Meter {
    fn start(server_pid: u32, agent_pid: u32) -> Self {
        Self {
            server_pid,
            agent_pid,
            server_cpu_us: cpu_micros(server_pid),
            agent_cpu_us: cpu_micros(agent_pid),
        }
    }

    /// Waits until every live stream of `name` got the update or ended; the spread and the CPU spent.
    async fn finish(
        self,
        events: &mut mpsc::UnboundedReceiver<(String, u128)>,
        name: &str,
        live: &mut LiveStreams,
    ) -> Spread {
        let count = live.of(name);
        let Receipts { received, ended } = receipts(*count, name, events, SPIRE_UPDATE_LIMIT).await;
        let expected = *count;
        *count -= ended;
        let first = received.iter().copied().min().unwrap_or(0);
        let mut latencies: Vec<f64> = received
            .iter()
            .map(|when| when.saturating_sub(first) as f64 / 1e6)
            .collect();
        Spread {
            latency: percentiles(&mut latencies),
            missed: expected - received.len() - ended,
            ended,
            server_cpu_ms: cpu_micros(self.server_pid).saturating_sub(self.server_cpu_us) as f64
                / 1000.0,
            agent_cpu_ms: cpu_micros(self.agent_pid).saturating_sub(self.agent_cpu_us) as f64
                / 1000.0,
        }
    }
}

/// Client streams still open, per name.
struct LiveStreams {
    default: usize,
    rootca: usize,
}

impl LiveStreams {
    /// Drops the receipts so far, counting the streams that ended meanwhile.
    fn drain(&mut self, events: &mut mpsc::UnboundedReceiver<(String, u128)>) {
        while let Ok((name, _)) = events.try_recv() {
            if let Some(name) = name.strip_prefix(ENDED) {
                *self.of(name) = self.of(name).saturating_sub(1);
            }
        }
    }

    fn of(&mut self, name: &str) -> &mut usize {
        if name == "default" {
            &mut self.default
        } else {
            &mut self.rootca
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn summary(spreads: &[Spread], clients: usize, serving_agent: bool) -> String {
    let p50 = median(spreads.iter().map(|s| s.latency.0).collect());
    let p99 = median(spreads.iter().map(|s| s.latency.1).collect());
    let max = spreads.iter().map(|s| s.latency.2).fold(0.0, f64::max);
    let server = median(spreads.iter().map(|s| s.server_cpu_ms).collect());
    let agent = median(spreads.iter().map(|s| s.agent_cpu_ms).collect());
    let per_stream = server * 1000.0 / clients as f64;
    if serving_agent {
        format!("{p50:.1} / {p99:.1} / {max:.1} ms | {server:.1} ms ({per_stream:.1} µs per pushed stream), agent = server")
    } else {
        format!("{p50:.1} / {p99:.1} / {max:.1} ms | {server:.1} ms ({per_stream:.1} µs per pushed stream), agent {agent:.1} ms")
    }
}

/// The side-by-side section.
pub async fn report(rows: &[SpireRow]) -> String {
    let version = real_spire::version()
        .await
        .unwrap_or_else(|e| format!("SPIRE: {e}"));
    let mut out = format!(
        "\n### Side by side on the real SPIRE ({version})\n\nThe same Envoy-like clients (one connection each, `default` and `ROOTCA` streams, every response ACKed, all as one user: one identity) against spire-agent's own SDS and trustweave-sds per pod and per node, each on a fresh SPIRE server and agent. Updates are SPIRE's own commands, acted on at the agent's next sync: a bundle change is `localauthority x509 prepare`, a rotation is `activate` then `taint` of the old authority. Times are the fan-out spread, from the first stream's receipt to each other's (p50 / p99 / max, median of the rounds); CPU is the serving process's (and the agent's) from the command to the last receipt; RSS per stream is the serving process's growth with the clients connected, over 2N streams. spire-agent pushes every stream on every change of its cache, so its first push after the command is the one timed. A stream the server ends is counted and not reopened (Envoy would reopen it after its retry backoff).\n\n| server | clients | rotation spread | CPU per rotation | bundle change spread | CPU per bundle change | RSS per stream | streams left behind | streams ended by the server |\n|---|---|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        let agent_serves = r.server == Server::SpireAgent;
        out.push_str(&format!(
            "| {} | {} ({} workloads) | {} | {} | {:.1} KiB | {} | {} |\n",
            r.server.label(),
            r.clients,
            r.workloads,
            summary(&r.rotation, r.clients, agent_serves),
            summary(&r.bundle, r.clients, agent_serves),
            r.rss_per_stream_kib,
            r.missed(),
            r.ended(),
        ));
    }
    out
}
