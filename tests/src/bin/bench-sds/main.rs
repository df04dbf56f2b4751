//! `bench-sds`: SDS fan-out of the real `trustweave-sds` binary, per pod and per node.
//!
//! For each mode and each N: one server process; N Envoy-like clients (one
//! connection each, a SotW stream per name — `default` and `ROOTCA` — every
//! response ACKed) spread over client processes, each process one workload
//! (one PID, attested on its own in node mode); and two real Envoys as a
//! sanity check. Then an SVID rotation and a federated bundle change at the
//! stand-in, each timed from the update to every client stream's receipt.
//! Reported: p50/p99/max, streams left behind, server CPU per update, server
//! RSS per stream, and time from server start to first secret served.
//! Then the same clients side by side on the real SPIRE ([`spire`]):
//! spire-agent's own SDS and trustweave-sds per pod and per node.
//! `--output BENCHMARKS.md` writes the `sds` section; `--smoke` runs tiny N.

mod spire;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use trustweave_e2e::bench_filter::{cpu_micros, machine_facts, write_section};
use trustweave_e2e::bench_sds::{
    now_nanos, peak_rss_kib, percentiles, rss_kib, run_clients, ENDED, UPDATE_TIMEOUT,
};
use trustweave_e2e::delegated_api::DelegatedApiStandIn;
use trustweave_e2e::envoy::{self, normalize_serial, Envoy};
use trustweave_e2e::pki::{IssuedSvid, TrustDomainCa};
use trustweave_e2e::sds::SotwClient;
use trustweave_e2e::workload_api::WorkloadApiStandIn;

const POD_ID: &str = "spiffe://aws.company.com/ns/bench/sa/pod";
const SDS_ID: &str = "spiffe://aws.company.com/ns/spire/sa/trustweave-sds";
const TTL: Duration = Duration::from_secs(3600);

#[derive(Parser, Debug)]
#[command(name = "bench-sds")]
struct Args {
    #[command(subcommand)]
    role: Option<Role>,
    /// Client counts (one connection, two streams each).
    #[arg(long, value_delimiter = ',', default_values_t = vec![100, 1_000, 10_000])]
    sizes: Vec<usize>,
    /// Modes to run: `pod`, `node`.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["pod".to_string(), "node".to_string()])]
    modes: Vec<String>,
    /// Client counts of the side-by-side runs on the real SPIRE.
    #[arg(long, value_delimiter = ',', default_values_t = vec![100, 1_000])]
    spire_sizes: Vec<usize>,
    /// Most client processes (workloads) per run.
    #[arg(long, default_value_t = 100)]
    workloads: usize,
    /// Tiny sizes, to keep the harness working (`make test`).
    #[arg(long)]
    smoke: bool,
    /// Write the results into this file's `sds` section.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Role {
    /// Internal: run Envoy-like clients (one workload process).
    Client {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        connections: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Pod,
    Node,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Pod => "per pod (Workload API)",
            Mode::Node => "per node (Delegated Identity API)",
        }
    }
}

/// The agent stand-in of one run.
enum Agent {
    Pod(Arc<WorkloadApiStandIn>),
    Node(Arc<DelegatedApiStandIn>),
}

/// What one update cost.
struct Update {
    /// p50, p99, max from update to receipt, ms.
    latency: (f64, f64, f64),
    /// Client streams that never got it.
    missed: usize,
    /// Server CPU for the update, ms.
    cpu_ms: f64,
}

/// Updates of one kind over the rounds: medians, the p99 range, the worst max.
struct Summary {
    /// Median p50, median p99, largest max, ms.
    latency: (f64, f64, f64),
    /// Smallest and largest p99, ms.
    p99_range: (f64, f64),
    /// Streams left behind, summed.
    missed: usize,
    /// Median server CPU per update, ms.
    cpu_ms: f64,
}

impl Summary {
    fn of(updates: &[Update]) -> Self {
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let p99s: Vec<f64> = updates.iter().map(|u| u.latency.1).collect();
        Self {
            latency: (
                median(updates.iter().map(|u| u.latency.0).collect()),
                median(p99s.clone()),
                updates.iter().map(|u| u.latency.2).fold(0.0, f64::max),
            ),
            p99_range: (
                p99s.iter().copied().fold(f64::INFINITY, f64::min),
                p99s.iter().copied().fold(0.0, f64::max),
            ),
            missed: updates.iter().map(|u| u.missed).sum(),
            cpu_ms: median(updates.iter().map(|u| u.cpu_ms).collect()),
        }
    }
}

/// Rotations and bundle changes per run.
const ROUNDS: usize = 3;

struct Row {
    mode: Mode,
    clients: usize,
    workloads: usize,
    first_secret_ms: f64,
    rss_per_stream_kib: f64,
    rotation: Summary,
    bundle: Summary,
    envoys_ok: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Role::Client {
        socket,
        connections,
    }) = &args.role
    {
        return run_clients(socket, *connections).await;
    }
    let sizes = if args.smoke {
        vec![4, 20]
    } else {
        args.sizes.clone()
    };
    let mut rows = Vec::new();
    let modes: Vec<Mode> = args
        .modes
        .iter()
        .map(|m| match m.as_str() {
            "pod" => Ok(Mode::Pod),
            "node" => Ok(Mode::Node),
            other => Err(anyhow::anyhow!(
                "--modes: {other:?} is neither pod nor node"
            )),
        })
        .collect::<Result<_, _>>()?;
    for mode in modes {
        for &n in &sizes {
            eprintln!("bench-sds: {} with {n} clients", mode.label());
            let row = run(mode, n, args.workloads.min(n)).await?;
            eprintln!("{}", format_row(&row));
            rows.push(row);
        }
    }
    let (spire_sizes, spire_rounds) = if args.smoke {
        (vec![4], 1)
    } else {
        (args.spire_sizes.clone(), 2)
    };
    let mut spire_rows = Vec::new();
    for &n in &spire_sizes {
        for server in spire::Server::ALL {
            eprintln!("bench-sds: {server:?} on the real SPIRE with {n} clients");
            spire_rows.push(spire::run(server, n, args.workloads.min(n), spire_rounds).await?);
        }
    }
    eprintln!("bench-sds: one hostile connection");
    let hostile = hostile_connection().await?;
    let mut report = report(&rows) + &spire::report(&spire_rows).await;
    if let Some(output) = &args.output {
        report.push_str(&plots(output, &rows, &spire_rows)?);
    }
    report.push_str(&hostile.to_markdown());
    println!("{report}");
    if hostile.refused != hostile.streams - 1 {
        bail!(
            "the hostile connection: {} of {} streams refused, expected all but one",
            hostile.refused,
            hostile.streams
        );
    }
    if args.smoke {
        let missed: usize = rows
            .iter()
            .map(|r| r.rotation.missed + r.bundle.missed)
            .sum();
        // trustweave-sds loses no stream on the real SPIRE either; spire-agent's are reported.
        let missed = missed
            + spire_rows
                .iter()
                .filter(|r| r.is_trustweave())
                .map(|r| r.missed() + r.ended())
                .sum::<usize>();
        if missed > 0 || rows.iter().any(|r| r.envoys_ok != 2) {
            bail!("streams were left behind in the smoke run");
        }
    }
    if let Some(output) = &args.output {
        write_section(output, "sds", &report)?;
        eprintln!("wrote the sds section of {}", output.display());
    }
    Ok(())
}

/// What one hostile connection cost the server (per-pod server, stand-in agent).
struct Hostile {
    streams: usize,
    refused: usize,
    rss_growth_kib: u64,
    peak_growth_kib: u64,
}

impl Hostile {
    fn to_markdown(&self) -> String {
        format!(
            "\n### One hostile connection\n\nOne connection opens {} streams: half send 60 KB of one-byte names (20,000 names, refused from the wire bytes before decoding), half try to hold 40 KB of 2,000-byte names each (the connection's 64 KiB budget of held names refuses all but the first). Streams refused: {} of {}. Server `VmRSS` growth after it: {} KiB; peak (`VmHWM`) growth: {} KiB. SECURITY.md states the bound.\n",
            self.streams, self.refused, self.streams, self.rss_growth_kib, self.peak_growth_kib
        )
    }
}

/// Runs one connection with 100 hostile streams against a per-pod server and
/// measures the server's memory growth.
async fn hostile_connection() -> anyhow::Result<Hostile> {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use trustweave_sds::render::SECRET_TYPE_URL;

    let dir = tempfile::Builder::new()
        .prefix("tw-bench-hostile-")
        .tempdir_in("/tmp")?;
    let aws = Arc::new(TrustDomainCa::new("aws.company.com"));
    let standin = WorkloadApiStandIn::start(dir.path().join("agent.sock"), aws, POD_ID, TTL).await;
    let socket = dir.path().join("socket");
    let started = Instant::now();
    let server = Command::new(sibling("trustweave-sds")?)
        .args(["--workload-api-socket", &standin.endpoint()])
        .arg("--sds-socket")
        .arg(&socket)
        .args(["--admin-addr", "off"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("run trustweave-sds")?;
    let pid = server.id().context("server pid")?;
    first_secret(&socket, started).await?;
    let (rss, peak) = (rss_kib(pid), peak_rss_kib(pid));
    let client = trustweave_e2e::sds::client(&socket).await;
    let streams = 100;
    let mut tasks = Vec::new();
    for i in 0..streams {
        let names: Vec<String> = if i % 2 == 0 {
            vec!["*".to_string(); 20_000]
        } else {
            (0..20)
                .map(|n| format!("spiffe://s{i}n{n}.example/{}", "a".repeat(2000)))
                .collect()
        };
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = mpsc::channel(1);
            let request = DiscoveryRequest {
                resource_names: names,
                type_url: SECRET_TYPE_URL.into(),
                ..Default::default()
            };
            if tx.send(request).await.is_err() {
                return false;
            }
            let ended = tokio::time::timeout(Duration::from_secs(5), async {
                let mut stream = client
                    .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                stream.message().await
            })
            .await;
            matches!(ended, Ok(Err(_)))
        }));
    }
    let mut refused = 0;
    for task in tasks {
        if task.await.unwrap_or(false) {
            refused += 1;
        }
    }
    drop(client);
    Ok(Hostile {
        streams,
        refused,
        rss_growth_kib: rss_kib(pid).saturating_sub(rss),
        peak_growth_kib: peak_rss_kib(pid).saturating_sub(peak),
    })
}

/// Starts trustweave-sds with `source` flags (the agent it reads) on `socket`,
/// room for `clients` connections, logging warnings to `log`.
fn spawn_sds(
    bin: &Path,
    source: &[String],
    socket: &Path,
    clients: usize,
    log: &Path,
) -> anyhow::Result<Child> {
    Command::new(bin)
        .args(source)
        .arg("--sds-socket")
        .arg(socket)
        .args([
            "--admin-addr",
            "off",
            "--max-connections",
            &(clients + 64).to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .kill_on_drop(true)
        .spawn()
        .context("run trustweave-sds (cargo build --workspace --bins)")
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?.with_file_name(name))
}

async fn run(mode: Mode, clients: usize, workloads: usize) -> anyhow::Result<Row> {
    let dir = tempfile::Builder::new()
        .prefix("tw-bench-sds-")
        .tempdir_in("/tmp")?;
    let aws = Arc::new(TrustDomainCa::new("aws.company.com"));
    let gcp = Arc::new(TrustDomainCa::new("gcp.company.com"));
    let socket = dir.path().join("socket");
    let agent = match mode {
        Mode::Pod => {
            let standin = WorkloadApiStandIn::start(
                dir.path().join("agent.sock"),
                Arc::clone(&aws),
                POD_ID,
                TTL,
            )
            .await;
            standin.federate_with(&gcp);
            Agent::Pod(standin)
        }
        Mode::Node => Agent::Node(
            DelegatedApiStandIn::start(
                dir.path().join("admin.sock"),
                std::process::id(),
                SDS_ID,
                &[&aws, &gcp],
                TTL,
            )
            .await,
        ),
    };
    let source: Vec<String> = match &agent {
        Agent::Pod(standin) => vec!["--workload-api-socket".into(), standin.endpoint()],
        Agent::Node(standin) => vec![
            "--source".into(),
            "delegated".into(),
            "--admin-socket".into(),
            standin.endpoint(),
        ],
    };
    let started = Instant::now();
    let server = spawn_sds(
        &sibling("trustweave-sds")?,
        &source,
        &socket,
        clients,
        &dir.path().join("sds.log"),
    )?;
    let server_pid = server.id().context("server pid")?;
    let mut registered: BTreeMap<u32, IssuedSvid> = BTreeMap::new();
    if let Agent::Node(standin) = &agent {
        standin.update(|s| {
            s.callers.insert(server_pid, SDS_ID.to_string());
        });
        // The probe below is this process: a workload of its own.
        let svid = standin.register(
            std::process::id(),
            &aws,
            "spiffe://aws.company.com/ns/bench/sa/probe",
            &[],
        );
        registered.insert(std::process::id(), svid);
    }
    let first_secret_ms = first_secret(&socket, started).await?;
    let baseline_rss = rss_kib(server_pid);

    // Clients, one process per workload.
    let mut clients_of = ClientProcesses::spawn(&socket, clients, workloads)?;
    if let Agent::Node(standin) = &agent {
        for (w, pid) in clients_of.pids.iter().enumerate() {
            let svid = standin.register(
                *pid,
                &aws,
                &format!("spiffe://aws.company.com/ns/bench/sa/w{w}"),
                &["gcp.company.com"],
            );
            registered.insert(*pid, svid);
        }
    }
    clients_of.wait_ready(&dir.path().join("sds.log")).await?;
    let mut events = clients_of.take_events();
    let rss_per_stream_kib =
        rss_kib(server_pid).saturating_sub(baseline_rss) as f64 / (clients * 2) as f64;

    // Two real Envoys on the same socket, as a sanity check.
    let mut envoys = Vec::new();
    for name in ["envoy-a", "envoy-b"] {
        let e = Envoy::start(name, dir.path(), &envoy::server_bootstrap(name, &socket)).await;
        if let Agent::Node(standin) = &agent {
            let pid = e.pid().context("envoy pid")?;
            let svid = standin.register(
                pid,
                &aws,
                &format!("spiffe://aws.company.com/ns/bench/sa/{name}"),
                &["gcp.company.com"],
            );
            registered.insert(pid, svid);
        }
        e.wait_live().await;
        envoys.push(e);
    }
    while events.try_recv().is_ok() {}

    let mut rotations = Vec::new();
    let mut bundles = Vec::new();
    let mut envoys_ok = usize::MAX;
    for round in 0..ROUNDS {
        // SVID rotation: every workload at once (per pod: the one identity).
        let rotation = match &agent {
            Agent::Pod(standin) => {
                timed(server_pid, clients, "default", &mut events, || {
                    standin.rotate_now();
                })
                .await
            }
            Agent::Node(standin) => {
                let fresh: BTreeMap<u32, IssuedSvid> = registered
                    .iter()
                    .map(|(pid, svid)| (*pid, aws.issue_svid(&svid.spiffe_id, TTL)))
                    .collect();
                let update = timed(server_pid, clients, "default", &mut events, || {
                    standin.update(|s| {
                        for (pid, svid) in &fresh {
                            if let Some(entry) = s.workloads.get_mut(pid) {
                                entry.svids[0] = svid.clone();
                            }
                        }
                    });
                })
                .await;
                registered = fresh;
                update
            }
        };
        rotations.push(rotation);
        let mut rotated = 0;
        for e in &envoys {
            let expected = match &agent {
                Agent::Pod(standin) => standin.current_svid().serial_hex,
                Agent::Node(_) => registered
                    .get(&e.pid().unwrap_or_default())
                    .map(|s| s.serial_hex.clone())
                    .unwrap_or_default(),
            };
            let expected = normalize_serial(&expected);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if e.cert_serials().await.contains(&expected) {
                    rotated += 1;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        envoys_ok = envoys_ok.min(rotated);
        while events.try_recv().is_ok() {}

        // A federated bundle change: GCP's CA rotates (old and new roots overlap).
        let roots = vec![
            gcp.root_der().to_vec(),
            TrustDomainCa::new("gcp.company.com").root_der().to_vec(),
        ];
        let bundle = timed(
            server_pid,
            clients,
            "ROOTCA",
            &mut events,
            || match &agent {
                Agent::Pod(standin) => standin.update(|m| {
                    m.federated.insert("gcp.company.com".into(), roots.clone());
                }),
                Agent::Node(standin) => standin.update(|s| {
                    s.bundles.insert("gcp.company.com".into(), roots.clone());
                }),
            },
        )
        .await;
        bundles.push(bundle);
        while events.try_recv().is_ok() {}
        eprintln!(
            "  round {round}: rotation p99 {:.1} ms, bundle change p99 {:.1} ms",
            rotations[round].latency.1, bundles[round].latency.1
        );
    }
    let rotation = Summary::of(&rotations);
    let bundle = Summary::of(&bundles);

    clients_of.stop().await;
    drop(server);
    Ok(Row {
        mode,
        clients,
        workloads,
        first_secret_ms,
        rss_per_stream_kib,
        rotation,
        bundle,
        envoys_ok,
    })
}

/// From spawning the server to one client's first `default` (the server
/// connects to the agent, attests, renders, serves).
async fn first_secret(socket: &Path, started: Instant) -> anyhow::Result<f64> {
    loop {
        if socket.exists() {
            let mut probe = SotwClient::open(socket).await;
            probe.request(&["default"], None).await;
            if probe.try_next().await.is_some() {
                return Ok(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("no secret served within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Makes `change` and waits until `expected` client streams of `name` received it.
async fn timed(
    server_pid: u32,
    expected: usize,
    name: &str,
    events: &mut mpsc::UnboundedReceiver<(String, u128)>,
    change: impl FnOnce(),
) -> Update {
    let cpu_before = cpu_micros(server_pid);
    let at = now_nanos();
    change();
    let received = receipts(expected, name, events, UPDATE_TIMEOUT)
        .await
        .received;
    let cpu_ms = cpu_micros(server_pid).saturating_sub(cpu_before) as f64 / 1000.0;
    let mut latencies: Vec<f64> = received
        .iter()
        .map(|when| when.saturating_sub(at) as f64 / 1e6)
        .collect();
    Update {
        missed: expected - latencies.len(),
        latency: percentiles(&mut latencies),
        cpu_ms,
    }
}

/// What `expected` live streams of one name did within a time limit.
struct Receipts {
    /// When each stream that got the update received it (unix nanos).
    received: Vec<u128>,
    /// Streams the server ended instead.
    ended: usize,
}

/// Waits until each of `expected` client streams of `name` received an update or ended, within `limit`.
async fn receipts(
    expected: usize,
    name: &str,
    events: &mut mpsc::UnboundedReceiver<(String, u128)>,
    limit: Duration,
) -> Receipts {
    let mut out = Receipts {
        received: Vec::with_capacity(expected),
        ended: 0,
    };
    let deadline = Instant::now() + limit;
    while out.received.len() + out.ended < expected {
        match tokio::time::timeout_at(deadline.into(), events.recv()).await {
            Ok(Some((got, when))) if got == name => out.received.push(when),
            Ok(Some((got, _))) if got.strip_prefix(ENDED) == Some(name) => out.ended += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    out
}

/// Envoy-like client processes, each one workload (`bench-sds client`).
struct ClientProcesses {
    processes: Vec<Child>,
    /// Their PIDs, in order.
    pids: Vec<u32>,
    events: Option<mpsc::UnboundedReceiver<(String, u128)>>,
}

impl ClientProcesses {
    /// Spreads `clients` connections to `socket` over `workloads` processes.
    fn spawn(socket: &Path, clients: usize, workloads: usize) -> anyhow::Result<Self> {
        let (events_tx, events) = mpsc::unbounded_channel::<(String, u128)>();
        let mut processes = Vec::new();
        let mut pids = Vec::new();
        for w in 0..workloads {
            let connections = clients / workloads + usize::from(w < clients % workloads);
            let mut child = Command::new(std::env::current_exe()?)
                .args(["client", "--socket"])
                .arg(socket)
                .args(["--connections", &connections.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            pids.push(child.id().context("client pid")?);
            let stdout = child.stdout.take().context("client stdout")?;
            let tx = events_tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut parts = line.splitn(2, ' ');
                    let name = parts.next().unwrap_or_default().to_string();
                    let at = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                    let _ = tx.send((name, at));
                }
            });
            processes.push(child);
        }
        Ok(Self {
            processes,
            pids,
            events: Some(events),
        })
    }

    /// Waits until every process's streams got their first response; `log` is quoted otherwise.
    async fn wait_ready(&mut self, log: &Path) -> anyhow::Result<()> {
        let workloads = self.processes.len();
        let events = self.events.as_mut().context("events taken")?;
        let mut ready = 0;
        let deadline = Instant::now() + UPDATE_TIMEOUT;
        while ready < workloads {
            match tokio::time::timeout_at(deadline.into(), events.recv()).await {
                Ok(Some((name, _))) if name == "ready" => ready += 1,
                Ok(Some((name, _))) if name.starts_with(ENDED) => {
                    bail!("a client stream ended ({name}); see {}", log.display())
                }
                Ok(Some(_)) => {}
                _ => {
                    let text = std::fs::read_to_string(log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(20).collect();
                    bail!(
                        "{ready}/{workloads} client processes ready after {UPDATE_TIMEOUT:?}; {}, last lines first:\n{}",
                        log.display(),
                        tail.join("\n")
                    )
                }
            }
        }
        Ok(())
    }

    /// Their receipts from now on.
    fn take_events(&mut self) -> mpsc::UnboundedReceiver<(String, u128)> {
        self.events.take().expect("events taken once")
    }

    /// Ends every process.
    async fn stop(self) {
        for mut p in self.processes {
            drop(p.stdin.take());
            let _ = p.kill().await;
        }
    }
}

/// Per-stream push CPU and RSS per stream against clients (SVG beside `output`),
/// and the Markdown that shows them.
fn plots(output: &Path, rows: &[Row], spire_rows: &[spire::SpireRow]) -> anyhow::Result<String> {
    use std::collections::BTreeMap;
    use trustweave_e2e::bench_plot::{line_chart, Axis, Series};
    // name → (clients, cpu per stream, rss per stream)
    let mut lines: BTreeMap<String, Vec<(f64, f64, f64)>> = BTreeMap::new();
    for r in spire_rows {
        let (label, clients, cpu, rss) = r.plot_point();
        lines
            .entry(format!("{label} (real SPIRE)"))
            .or_default()
            .push((clients, cpu, rss));
    }
    for r in rows {
        lines
            .entry(format!(
                "trustweave-sds {} (stand-in agent)",
                r.mode.label()
            ))
            .or_default()
            .push((
                r.clients as f64,
                r.rotation.cpu_ms * 1000.0 / r.clients as f64,
                r.rss_per_stream_kib,
            ));
    }
    let series = |pick: fn(&(f64, f64, f64)) -> f64| -> Vec<Series> {
        lines
            .iter()
            .map(|(name, points)| Series {
                name: name.clone(),
                points: points.iter().map(|p| (p.0, pick(p))).collect(),
            })
            .collect()
    };
    let cpu = output.with_file_name("docs/bench/sds-push-cpu.svg");
    line_chart(
        &cpu,
        "Server CPU per pushed stream on a rotation",
        Axis::log("clients (one connection, two streams each)"),
        Axis::log("µs per pushed stream"),
        &series(|p| p.1),
    )?;
    let rss = output.with_file_name("docs/bench/sds-rss.svg");
    line_chart(
        &rss,
        "Server memory per stream",
        Axis::log("clients (one connection, two streams each)"),
        Axis::linear("KiB RSS per stream"),
        &series(|p| p.2),
    )?;
    eprintln!("wrote {} and {}", cpu.display(), rss.display());
    Ok("\n![Server CPU per pushed stream against clients](docs/bench/sds-push-cpu.svg)\n\n![Server RSS per stream against clients](docs/bench/sds-rss.svg)\n".to_string())
}

fn format_row(r: &Row) -> String {
    let streams = r.clients * 2;
    format!(
        "| {} | {} ({} workloads) | {:.1} / {:.1} ({:.1}–{:.1}) / {:.1} ms | {:.1} / {:.1} ({:.1}–{:.1}) / {:.1} ms | {} | {:.1} ms ({:.1} µs per pushed stream) | {:.1} KiB ({streams} streams) | {:.0} ms | {}/2 |",
        r.mode.label(),
        r.clients,
        r.workloads,
        r.rotation.latency.0,
        r.rotation.latency.1,
        r.rotation.p99_range.0,
        r.rotation.p99_range.1,
        r.rotation.latency.2,
        r.bundle.latency.0,
        r.bundle.latency.1,
        r.bundle.p99_range.0,
        r.bundle.p99_range.1,
        r.bundle.latency.2,
        r.rotation.missed + r.bundle.missed,
        r.rotation.cpu_ms,
        r.rotation.cpu_ms * 1000.0 / r.clients as f64,
        r.rss_per_stream_kib,
        r.first_secret_ms,
        r.envoys_ok,
    )
}

fn report(rows: &[Row]) -> String {
    let mut out = String::from("## SDS fan-out (`make bench-sds`)\n\n");
    out.push_str(&format!(
        "Machine: {}. One `trustweave-sds` process (debug logging off); N Envoy-like clients, each its own Unix-socket connection with one SotW stream per name (`default`, `ROOTCA`) and every response ACKed, spread over client processes — each process one workload, attested by its own PID in node mode; two real Envoys on the same socket as a sanity check. Updates are made at the SPIRE agent stand-in and timed to each client stream's receipt (wall clock shared by the processes). Rotation: every workload's SVID at once; bundle change: a new second root in the federated `gcp.company.com` bundle; three of each per run, reported as median p50 / median p99 (p99 range) / worst max, and the median server CPU. Server CPU: scheduler run time of its threads during the update. RSS per stream: server `VmRSS` with the clients connected minus before, over 2N streams. Clients and server share the machine's cores.\n\n",
        machine_facts()
    ));
    out.push_str("| mode | clients | rotation p50 / p99 (range) / max | bundle change p50 / p99 (range) / max | streams left behind | server CPU per rotation | server RSS per stream | start → first secret | real Envoys rotated |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format_row(r));
        out.push('\n');
    }
    out
}
