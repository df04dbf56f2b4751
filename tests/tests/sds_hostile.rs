//! trustweave-sds against hostile and broken SDS clients, while 100 normal
//! streams stay open and must receive the next rotation: nothing a client does
//! takes the server down, delays the others, or holds shutdown.
//!
//! Uses the Workload API stand-in: the test rotates the SVID at moments it
//! chooses, 50 times in a row, which the real SPIRE agent cannot be made to do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use trustweave_e2e::http;
use trustweave_e2e::pki::TrustDomainCa;
use trustweave_e2e::sds::{self, report, SotwClient, StalledClient};
use trustweave_e2e::wait::wait_until;
use trustweave_e2e::workload_api::WorkloadApiStandIn;
use trustweave_sds::listener::Limits;
use trustweave_sds::RunningServer;

const ID: &str = "spiffe://gcp.company.com/ns/shop/sa/api";
const NORMAL: usize = 100;

struct World {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    agent: Arc<WorkloadApiStandIn>,
    server: RunningServer,
    normal: Vec<SotwClient>,
}

impl World {
    async fn start(limits: Limits) -> Self {
        let dir = sds::socket_dir();
        let agent = WorkloadApiStandIn::start(
            sds::path_in(&dir, "agent.sock"),
            Arc::new(TrustDomainCa::new("gcp.company.com")),
            ID,
            Duration::from_secs(3600),
        )
        .await;
        let socket = sds::path_in(&dir, "sds.sock");
        let mut config = sds::test_config(&socket, &agent.endpoint());
        config.limits = limits;
        let server = sds::start_ready(config).await;
        let mut normal = Vec::with_capacity(NORMAL);
        for _ in 0..NORMAL {
            let mut client = SotwClient::open(&socket).await;
            client.request(&["default"], None).await;
            client.next().await;
            client.request(&["default"], None).await;
            normal.push(client);
        }
        Self {
            _dir: dir,
            socket,
            agent,
            server,
            normal,
        }
    }

    /// Rotates once; every normal stream receives the new serial. Returns the slowest delay.
    async fn every_normal_stream_gets_the_next_rotation(&mut self) -> Duration {
        let serial = self.agent.rotate_now().serial_hex;
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        for client in &mut self.normal {
            let response = client.next().await;
            slowest = slowest.max(started.elapsed());
            let got = report(&response.resources[0]).certificates[0]
                .serial
                .clone();
            assert_eq!(
                trustweave_e2e::envoy::normalize_serial(&got),
                trustweave_e2e::envoy::normalize_serial(&serial)
            );
            client.request(&["default"], None).await;
        }
        slowest
    }

    async fn metric(&self, line: &str) -> bool {
        let admin = self.server.admin_addr().expect("admin");
        http::get(admin, "/metrics", &[])
            .await
            .map(|r| r.body.contains(line))
            .unwrap_or(false)
    }
}

fn limits() -> Limits {
    Limits {
        max_connections: 400,
        idle_timeout: Duration::from_secs(3),
        keepalive: Duration::from_secs(1),
        ..Limits::default()
    }
}

/// Whether the server closed `stream` (read returns end or error) within 10 s.
async fn closed_by_server(mut stream: UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_http1_half_open_and_idle_connections_are_closed() {
    let mut w = World::start(limits()).await;
    let garbage = {
        let mut s = UnixStream::connect(&w.socket).await.expect("connect");
        s.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(64))
            .await
            .expect("write");
        s
    };
    let http1 = {
        let mut s = UnixStream::connect(&w.socket).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nhost: sds\r\n\r\n")
            .await
            .expect("write");
        s
    };
    let idle = UnixStream::connect(&w.socket).await.expect("connect");
    let preface_only = {
        let mut s = UnixStream::connect(&w.socket).await.expect("connect");
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("write");
        s
    };
    let partial_frame = {
        let mut s = UnixStream::connect(&w.socket).await.expect("connect");
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04")
            .await
            .expect("write");
        s
    };
    for (what, stream) in [
        ("garbage", garbage),
        ("HTTP/1", http1),
        ("idle", idle),
        ("preface only", preface_only),
        ("partial frame", partial_frame),
    ] {
        assert!(
            closed_by_server(stream).await,
            "{what} connection left open"
        );
    }
    w.every_normal_stream_gets_the_next_rotation().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_unknown_names_are_refused_and_counted() {
    let mut w = World::start(limits()).await;
    // Past 64 KiB a request is not even read.
    let huge = "spiffe://gcp.company.com/".to_string() + &"a".repeat(1 << 20);
    let mut one_mib = SotwClient::open(&w.socket).await;
    one_mib.request(&[&huge], None).await;
    let code = one_mib.refused().await.code();
    assert!(
        matches!(
            code,
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{code:?}"
    );
    let long = "spiffe://gcp.company.com/".to_string() + &"a".repeat(4096);
    let mut long_name = SotwClient::open(&w.socket).await;
    long_name.request(&[&long], None).await;
    assert_eq!(
        long_name.refused().await.code(),
        tonic::Code::InvalidArgument
    );
    // 20,000 one-byte names fit in 60 KB: refused from the wire bytes, before
    // 20,000 strings are allocated.
    let many = vec!["*"; 20_000];
    let mut twenty_thousand = SotwClient::open(&w.socket).await;
    twenty_thousand.request(&many, None).await;
    assert_eq!(
        twenty_thousand.refused().await.code(),
        tonic::Code::InvalidArgument
    );
    let mut unknown = SotwClient::open(&w.socket).await;
    unknown.request(&["file-cert:/etc/passwd"], None).await;
    assert_eq!(unknown.refused().await.code(), tonic::Code::InvalidArgument);
    for reason in [
        "request_too_large",
        "name_too_long",
        "too_many_names",
        "unknown_name",
    ] {
        let line = format!("trustweave_sds_refused_total{{reason=\"{reason}\"}} 1");
        assert!(w.metric(&line).await, "{line}");
    }
    w.every_normal_stream_gets_the_next_rotation().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_versions_and_one_connections_streams_are_bounded_together() {
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    use tokio_stream::wrappers::ReceiverStream;

    let mut w = World::start(limits()).await;
    // initial_resource_versions is bounded like names.
    let mut delta = sds::DeltaClient::open(&w.socket).await;
    delta
        .send(DeltaDiscoveryRequest {
            type_url: trustweave_sds::render::SECRET_TYPE_URL.into(),
            resource_names_subscribe: vec!["default".into()],
            initial_resource_versions: (0..1000).map(|i| (format!("n{i}"), "v".into())).collect(),
            ..Default::default()
        })
        .await;
    assert_eq!(delta.refused().await.code(), tonic::Code::InvalidArgument);
    assert!(
        w.metric("trustweave_sds_refused_total{reason=\"too_many_names\"} 1")
            .await,
        "initial_resource_versions counted"
    );

    // Streams of one connection share one budget of held names: two streams
    // of 40 KiB of names each pass alone, not together.
    let client = sds::client(&w.socket).await;
    let names = |stream: usize| -> Vec<String> {
        (0..20)
            .map(|i| format!("spiffe://s{stream}n{i}.example/{}", "a".repeat(2000)))
            .collect()
    };
    let mut streams = Vec::new();
    for stream in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(DiscoveryRequest {
            resource_names: names(stream),
            type_url: trustweave_sds::render::SECRET_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .expect("queue");
        let responses = client
            .clone()
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .expect("open")
            .into_inner();
        streams.push((tx, responses));
    }
    let [(tx_a, mut a), (tx_b, mut b)]: [_; 2] = streams.try_into().map_err(|_| ()).expect("two");
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            ended = a.message() => (ended, true),
            ended = b.message() => (ended, false),
        }
    })
    .await
    .expect("one stream is refused within 10 s");
    let (ended, a_refused) = first;
    assert_eq!(
        ended.expect_err("refused").code(),
        tonic::Code::ResourceExhausted
    );
    assert!(
        w.metric("trustweave_sds_refused_total{reason=\"connection_budget\"} 1")
            .await,
        "counted"
    );
    // The other stream lives on and is served.
    let (tx, survivor) = if a_refused {
        (tx_b, &mut b)
    } else {
        (tx_a, &mut a)
    };
    tx.send(DiscoveryRequest {
        resource_names: vec!["default".into()],
        type_url: trustweave_sds::render::SECRET_TYPE_URL.into(),
        ..Default::default()
    })
    .await
    .expect("send");
    let response = tokio::time::timeout(Duration::from_secs(10), survivor.message())
        .await
        .expect("served within 10 s")
        .expect("not refused")
        .expect("a response");
    assert_eq!(response.resources.len(), 1);
    w.every_normal_stream_gets_the_next_rotation().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_and_the_connection_cap_leave_nothing_behind() {
    let mut w = World::start(Limits {
        max_connections: NORMAL + 20,
        ..limits()
    })
    .await;
    for _ in 0..1000 {
        drop(UnixStream::connect(&w.socket).await.expect("connect"));
    }
    // Every churned connection is reaped before the cap is filled: under load
    // the server may see the closes late, and a slot it still counts would
    // refuse one of the connections below.
    wait_until(
        "churned connections reaped",
        Duration::from_secs(15),
        || async {
            w.metric(&format!("trustweave_sds_connections_open {NORMAL}"))
                .await
        },
    )
    .await;
    // Fill the cap with live clients (they answer keepalives, so no idle
    // timeout frees a slot meanwhile): the next connection is refused, and counted.
    let mut filling = Vec::new();
    for _ in 0..20 {
        let mut client = SotwClient::open(&w.socket).await;
        client.request(&["default"], None).await;
        client.next().await;
        filling.push(client);
    }
    assert!(
        w.metric(&format!("trustweave_sds_connections_open {}", NORMAL + 20))
            .await,
        "the cap is reached"
    );
    let over = UnixStream::connect(&w.socket).await.expect("connect");
    assert!(closed_by_server(over).await, "over the cap: closed at once");
    assert!(
        w.metric("trustweave_sds_refused_total{reason=\"connections\"}")
            .await
    );
    // Closed clients give their slots back.
    drop(filling);
    wait_until("slots given back", Duration::from_secs(15), || async {
        w.metric(&format!("trustweave_sds_connections_open {NORMAL}"))
            .await
    })
    .await;
    w.every_normal_stream_gets_the_next_rotation().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_never_delay_the_others_nor_hold_shutdown() {
    let mut w = World::start(limits()).await;
    // 100 clients that subscribe and never read (1 KiB stream windows).
    let mut stalled = Vec::new();
    for _ in 0..100 {
        stalled.push(StalledClient::open(&w.socket, &["default", "ROOTCA"]).await);
    }
    let mut slowest = Duration::ZERO;
    for _ in 0..50 {
        slowest = slowest.max(w.every_normal_stream_gets_the_next_rotation().await);
    }
    println!("slowest delivery to a normal stream across 50 rotations: {slowest:?}");
    let started = Instant::now();
    w.server.shutdown().await;
    assert!(
        started.elapsed() < trustweave_sds::SHUTDOWN_GRACE + Duration::from_secs(3),
        "shutdown took {:?}",
        started.elapsed()
    );
    drop(stalled);
}

/// CPU seconds a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    ticks as f64 / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_descriptors_back_off_instead_of_spinning_and_recover() {
    let dir = sds::socket_dir();
    let socket = sds::path_in(&dir, "sds.sock");
    let log = sds::path_in(&dir, "sds.log");
    // Built next to these tests by `make test` (`cargo build --workspace --bins`).
    let binary = trustweave_e2e::mesh::node_sds::binary();
    assert!(
        binary.exists(),
        "{} missing: cargo build --workspace --bins",
        binary.display()
    );
    // 40 descriptors: a few dozen connections exhaust them.
    let mut server = tokio::process::Command::new("prlimit")
        .args(["--nofile=40:40", "--"])
        .arg(&binary)
        .arg("--workload-api-socket")
        .arg(sds::path_in(&dir, "no-agent.sock"))
        .arg("--sds-socket")
        .arg(&socket)
        .args(["--admin-addr", "off", "--max-connections", "4096"])
        .stderr(std::fs::File::create(&log).expect("log"))
        .kill_on_drop(true)
        .spawn()
        .expect("run trustweave-sds under prlimit");
    let pid = server.id().expect("pid");
    wait_until("socket", Duration::from_secs(10), || async {
        UnixStream::connect(&socket).await.is_ok()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(
            UnixStream::connect(&socket)
                .await
                .expect("connect (backlog)"),
        );
    }
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("accept errors logged", Duration::from_secs(10), || async {
        read_log().contains("cannot accept SDS connections; backing off")
    })
    .await;
    let before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let burnt = cpu_seconds(pid) - before;
    assert!(
        burnt < 0.3,
        "{burnt} CPU seconds in one second of EMFILE: spinning"
    );
    drop(held);
    wait_until("accepting again", Duration::from_secs(10), || async {
        read_log().contains("accepting SDS connections again")
    })
    .await;
    // Logged once per episode, not per failed accept: each "backing off" is
    // followed by "accepting again" before the next (the server's own
    // reconnect attempts free descriptors now and then, starting a new episode).
    let log_text = read_log();
    let mut in_episode = false;
    for line in log_text.lines() {
        if line.contains("cannot accept SDS connections; backing off") {
            assert!(!in_episode, "logged twice in one episode:\n{log_text}");
            in_episode = true;
        } else if line.contains("accepting SDS connections again") {
            in_episode = false;
        }
    }
    assert!(
        server.try_wait().expect("status").is_none(),
        "still running"
    );
    let _ = server.kill().await;
}
