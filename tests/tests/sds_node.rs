//! Node mode with real Envoy 1.40: one trustweave-sds serves every Envoy on
//! the node from one socket, each its own SVID, attested by its PID through
//! the SPIRE agent's Delegated Identity API (the stand-in: one workload's
//! rotation on cue and an agent outage on cue are what the real agent cannot
//! be made to do; SPIRE itself: `spire_node.rs`).
//!
//! Topology: a server Envoy (aws), a client Envoy in the same trust domain, a
//! client Envoy in gcp (federated both ways), and a client Envoy whose PID no
//! registration entry matches. The agent also holds azure's bundle, which no
//! workload federates with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;
use trustweave_e2e::delegated_api::DelegatedApiStandIn;
use trustweave_e2e::envoy::{self, normalize_serial, Envoy, PEER_HEADER};
use trustweave_e2e::http;
use trustweave_e2e::pki::TrustDomainCa;
use trustweave_e2e::sds;
use trustweave_e2e::wait::wait_until;
use trustweave_sds::metrics::{ProtocolLabel, RefusalLabel};
use trustweave_sds::RunningServer;

const SDS_ID: &str = "spiffe://aws.company.com/ns/trustweave/sa/trustweave-sds";
const SERVER_ID: &str = "spiffe://aws.company.com/ns/orders/sa/server";
const SAME_TD_ID: &str = "spiffe://aws.company.com/ns/checkout/sa/client";
const GCP_ID: &str = "spiffe://gcp.company.com/ns/search/sa/worker";

struct Node {
    dir: TempDir,
    agent: Arc<DelegatedApiStandIn>,
    sds: RunningServer,
    gcp: Arc<TrustDomainCa>,
    server: Envoy,
    same_td: Envoy,
    cross_td: Envoy,
    unregistered: Envoy,
}

fn pid(envoy: &Envoy) -> u32 {
    envoy.pid().expect("Envoy running")
}

async fn node() -> Node {
    let dir = sds::socket_dir();
    let aws = Arc::new(TrustDomainCa::new("aws.company.com"));
    let gcp = Arc::new(TrustDomainCa::new("gcp.company.com"));
    let azure = TrustDomainCa::new("azure.company.com");
    let agent = DelegatedApiStandIn::start(
        sds::path_in(&dir, "admin.sock"),
        std::process::id(),
        SDS_ID,
        &[&aws, &gcp, &azure],
        Duration::from_secs(3600),
    )
    .await;
    let socket = sds::path_in(&dir, "socket");
    let sds = sds::start_ready(sds::node_config(&socket, &agent.endpoint())).await;

    let server = Envoy::start(
        "server",
        dir.path(),
        &envoy::server_bootstrap("server", &socket),
    )
    .await;
    agent.register(pid(&server), &aws, SERVER_ID, &["gcp.company.com"]);
    server.wait_live().await;
    let upstream = server.listener(envoy::MTLS_LISTENER).await;
    let client = |name: &'static str| {
        let bootstrap =
            envoy::client_bootstrap(name, &socket, upstream, "spiffe://aws.company.com/");
        let dir = dir.path().to_path_buf();
        async move { Envoy::start(name, &dir, &bootstrap).await }
    };
    let same_td = client("same-td").await;
    agent.register(pid(&same_td), &aws, SAME_TD_ID, &[]);
    let cross_td = client("cross-td").await;
    agent.register(pid(&cross_td), &gcp, GCP_ID, &["aws.company.com"]);
    let unregistered = client("unregistered").await;
    for envoy in [&same_td, &cross_td] {
        envoy.wait_live().await;
    }
    Node {
        dir,
        agent,
        sds,
        gcp,
        server,
        same_td,
        cross_td,
        unregistered,
    }
}

async fn call(envoy: &Envoy) -> http::HttpResponse {
    let addr: SocketAddr = envoy.listener(envoy::PLAIN_LISTENER).await;
    http::get(addr, "/", &[])
        .await
        .expect("request through client Envoy")
}

/// The serial of the one SVID this node serves `pid`, per the server's report.
fn served_serial(sds: &RunningServer, pid: u32) -> Option<String> {
    sds.workloads()
        .into_iter()
        .find(|w| w.pid == pid)
        .and_then(|w| w.serial)
}

async fn wait_for_serial(envoy: &Envoy, serial: &str) {
    let serial = normalize_serial(serial);
    wait_until(
        &format!("serial {serial} in /certs"),
        Duration::from_secs(10),
        || async { envoy.cert_serials().await.contains(&serial) },
    )
    .await;
}

/// Waits until the node serves `envoy` an SVID and Envoy holds it; its serial.
async fn served_and_held(sds: &RunningServer, envoy: &Envoy) -> String {
    let mut serial = None;
    wait_until(
        "the workload's SVID served",
        Duration::from_secs(10),
        || {
            serial = served_serial(sds, pid(envoy));
            let found = serial.is_some();
            async move { found }
        },
    )
    .await;
    let serial = serial.expect("serial");
    wait_for_serial(envoy, &serial).await;
    serial
}

/// `version_info` of the `ROOTCA` secret Envoy holds.
async fn rootca_version(envoy: &Envoy) -> String {
    let dump: Value = serde_json::from_str(
        &envoy
            .admin_get("/config_dump?resource=dynamic_active_secrets")
            .await,
    )
    .expect("config dump");
    dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "ROOTCA")
        .and_then(|s| s["version_info"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn sotw_pushes(sds: &RunningServer) -> u64 {
    sds.metrics()
        .pushes
        .get_or_create(&ProtocolLabel { protocol: "sotw" })
        .get()
}

fn attestation_failures(sds: &RunningServer, reason: &'static str) -> u64 {
    sds.metrics()
        .attestation_failures
        .get_or_create(&RefusalLabel { reason })
        .get()
}

#[tokio::test]
async fn each_envoy_on_one_node_socket_holds_its_own_svid() {
    let n = node().await;
    let expected = [
        (&n.server, SERVER_ID),
        (&n.same_td, SAME_TD_ID),
        (&n.cross_td, GCP_ID),
    ];
    let mut serials = Vec::new();
    for (envoy, id) in expected {
        let serial = served_and_held(&n.sds, envoy).await;
        let report = n.sds.workloads();
        let entry = report.iter().find(|w| w.pid == pid(envoy)).expect("listed");
        assert_eq!(entry.spiffe_id.as_deref(), Some(id));
        serials.push(normalize_serial(&serial));
    }
    // Nobody holds anybody else's SVID.
    for (i, (envoy, _)) in expected.iter().enumerate() {
        let held = envoy.cert_serials().await;
        for (j, serial) in serials.iter().enumerate() {
            assert_eq!(
                held.contains(serial),
                i == j,
                "Envoy {i} and SVID {j}: {held:?}"
            );
        }
    }

    // mTLS within the trust domain and across the federation.
    let ok = call(&n.same_td).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.header(PEER_HEADER), Some(SAME_TD_ID));
    let ok = call(&n.cross_td).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.header(PEER_HEADER), Some(GCP_ID));

    // Each trusts exactly its own domain and its federation (the agent also holds azure's).
    let trusts = |p: u32| {
        n.sds
            .workloads()
            .into_iter()
            .find(|w| w.pid == p)
            .map(|w| w.trust_domains)
            .unwrap_or_default()
    };
    assert_eq!(
        trusts(pid(&n.server)),
        ["aws.company.com", "gcp.company.com"]
    );
    assert_eq!(trusts(pid(&n.same_td)), ["aws.company.com"]);
    assert_eq!(
        trusts(pid(&n.cross_td)),
        ["aws.company.com", "gcp.company.com"]
    );
}

/// Envoy's readiness: `LIVE` only once every listener and cluster has its secrets.
/// Waits until the process `pid` has an SDS connection to the node's server.
async fn wait_connected(sds: &RunningServer, pid: u32) {
    wait_until(
        &format!("PID {pid} connected"),
        Duration::from_secs(10),
        || async { sds.workloads().iter().any(|w| w.pid == pid) },
    )
    .await;
}

async fn is_live(envoy: &Envoy) -> bool {
    envoy.admin_get("/ready").await.trim() == "LIVE"
}

#[tokio::test]
async fn an_unregistered_envoy_gets_no_certificate_and_no_handshake() {
    let n = node().await;
    let unregistered = pid(&n.unregistered);
    wait_connected(&n.sds, unregistered).await;
    // Counted (the others may have been too, for the moment between their
    // start and their registration).
    wait_until(
        "unattested PID counted",
        Duration::from_secs(10),
        || async { attestation_failures(&n.sds, "no_identity") >= 1 },
    )
    .await;
    let listed = n.sds.workloads();
    let entry = listed
        .iter()
        .find(|w| w.pid == unregistered)
        .expect("listed");
    assert_eq!(entry.spiffe_id, None);
    // Its mTLS cluster never gets a certificate, so Envoy never finishes
    // initializing: no listener serves, no handshake can happen.
    assert!(n.unregistered.cert_serials().await.is_empty());
    assert!(!is_live(&n.unregistered).await);
    // Meanwhile the registered ones are served.
    assert_eq!(call(&n.same_td).await.status, 200);
    assert!(
        n.unregistered.cert_serials().await.is_empty(),
        "never another workload's SVID"
    );

    // Registered later: the same stream pushes its SVID, and it can call.
    let late = n.agent.register(
        pid(&n.unregistered),
        &n.gcp,
        "spiffe://gcp.company.com/ns/late/sa/client",
        &["aws.company.com"],
    );
    wait_for_serial(&n.unregistered, &late.serial_hex).await;
    n.unregistered.wait_live().await;
    let ok = call(&n.unregistered).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(
        ok.header(PEER_HEADER),
        Some("spiffe://gcp.company.com/ns/late/sa/client")
    );
}

#[tokio::test]
async fn rotation_reaches_only_its_workload_and_a_bundle_change_reaches_every_envoy() {
    let n = node().await;
    let initial: Vec<String> = {
        let mut all = Vec::new();
        for envoy in [&n.server, &n.same_td, &n.cross_td] {
            all.push(normalize_serial(&served_and_held(&n.sds, envoy).await));
        }
        all
    };
    let pushes = sotw_pushes(&n.sds);
    let rotated = n.agent.rotate(pid(&n.same_td));
    wait_for_serial(&n.same_td, &rotated.serial_hex).await;
    assert_eq!(
        sotw_pushes(&n.sds) - pushes,
        1,
        "one push: the rotated workload's `default` stream only"
    );
    assert!(n.server.cert_serials().await.contains(&initial[0]));
    assert!(n.cross_td.cert_serials().await.contains(&initial[2]));
    assert_eq!(call(&n.same_td).await.status, 200);

    // GCP's CA rotates: the agent's bundle holds old and new roots.
    let before: Vec<String> =
        futures::future::join_all([&n.server, &n.same_td, &n.cross_td].map(rootca_version)).await;
    let new_gcp = Arc::new(TrustDomainCa::new("gcp.company.com"));
    let new_root = new_gcp.root_der().to_vec();
    n.agent.update(|state| {
        state
            .bundles
            .get_mut("gcp.company.com")
            .expect("gcp bundle")
            .push(new_root);
    });
    // Every Envoy that trusts gcp gets the new trust; the one that does not, nothing.
    for (envoy, old) in [(&n.server, &before[0]), (&n.cross_td, &before[2])] {
        wait_until("new ROOTCA in Envoy", Duration::from_secs(10), || async {
            rootca_version(envoy).await != *old
        })
        .await;
    }
    assert_eq!(
        rootca_version(&n.same_td).await,
        before[1],
        "same_td does not trust gcp"
    );
    // A gcp SVID from the new CA is accepted by the aws server.
    let reissued = n
        .agent
        .register(pid(&n.cross_td), &new_gcp, GCP_ID, &["aws.company.com"]);
    wait_for_serial(&n.cross_td, &reissued.serial_hex).await;
    let ok = call(&n.cross_td).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.header(PEER_HEADER), Some(GCP_ID));
}

#[tokio::test]
async fn an_agent_outage_keeps_every_svid_and_an_exiting_envoy_frees_its_subscription() {
    let mut n = node().await;
    for envoy in [&n.server, &n.same_td, &n.cross_td] {
        served_and_held(&n.sds, envoy).await;
    }
    let held: Vec<Vec<String>> =
        futures::future::join_all([&n.server, &n.same_td, &n.cross_td].map(|e| e.cert_serials()))
            .await;
    n.agent.stop_serving().await;
    wait_until("outage seen", Duration::from_secs(10), || async {
        n.sds.metrics().delegated_api_connected.get() == 0
    })
    .await;
    for _ in 0..3 {
        assert_eq!(call(&n.same_td).await.status, 200);
        assert_eq!(call(&n.cross_td).await.status, 200);
    }
    for (envoy, serials) in [&n.server, &n.same_td, &n.cross_td].iter().zip(&held) {
        assert_eq!(&envoy.cert_serials().await, serials, "last good SVID kept");
    }
    n.agent.start_serving();
    wait_until("agent back", Duration::from_secs(10), || async {
        n.sds.metrics().delegated_api_connected.get() == 1
    })
    .await;
    let rotated = n.agent.rotate(pid(&n.same_td));
    wait_for_serial(&n.same_td, &rotated.serial_hex).await;

    // An Envoy that exits: its subscription ends, at the server and at the agent.
    let gone = pid(&n.cross_td);
    let subscriptions = n.agent.svid_subscriptions();
    let workloads = n.sds.metrics().workloads.get();
    n.cross_td = Envoy::start(
        "placeholder",
        n.dir.path(),
        &envoy::server_bootstrap("placeholder", &n.dir.path().join("nowhere.sock")),
    )
    .await;
    wait_until("subscription freed", Duration::from_secs(10), || async {
        !n.sds.workloads().iter().any(|w| w.pid == gone)
            && n.agent.svid_subscriptions() < subscriptions
    })
    .await;
    assert_eq!(n.sds.metrics().workloads.get(), workloads - 1);
}

#[tokio::test]
async fn inspect_lists_each_workload_and_the_identity_it_is_served() {
    let n = node().await;
    for envoy in [&n.server, &n.same_td, &n.cross_td] {
        served_and_held(&n.sds, envoy).await;
    }
    let unregistered = pid(&n.unregistered);
    wait_connected(&n.sds, unregistered).await;
    let admin = n.sds.admin_addr().expect("admin");
    // Built by `make test` (`cargo build --workspace --bins`) before the tests run.
    let binary = trustweave_e2e::mesh::node_sds::binary();
    let output = tokio::process::Command::new(binary)
        .args(["inspect", "--workloads", "--admin-addr", &admin.to_string()])
        .output()
        .await
        .expect("run inspect");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    for (envoy, id) in [
        (&n.server, SERVER_ID),
        (&n.same_td, SAME_TD_ID),
        (&n.cross_td, GCP_ID),
    ] {
        let serial = served_serial(&n.sds, pid(envoy)).expect("serial");
        assert!(
            text.contains(&format!("workload pid {}", pid(envoy))),
            "{text}"
        );
        assert!(
            text.contains(&format!("default: {id} serial {serial}")),
            "{text}"
        );
    }
    assert!(
        text.contains(&format!("workload pid {}", pid(&n.unregistered))),
        "{text}"
    );
    assert!(!text.contains("PRIVATE KEY"));
}

#[tokio::test]
async fn a_delegate_the_agent_does_not_authorize_serves_no_identity() {
    let dir = sds::socket_dir();
    let aws = Arc::new(TrustDomainCa::new("aws.company.com"));
    // The agent attests this process as a workload that is not in `authorized_delegates`.
    let agent = DelegatedApiStandIn::start(
        sds::path_in(&dir, "admin.sock"),
        std::process::id(),
        SDS_ID,
        &[&aws],
        Duration::from_secs(3600),
    )
    .await;
    agent.update(|state| {
        state.authorized_delegates.clear();
        state
            .authorized_delegates
            .insert("spiffe://aws.company.com/ns/spire/sa/someone-else".into());
    });
    agent.register(std::process::id(), &aws, SAME_TD_ID, &[]);
    let socket = sds::path_in(&dir, "socket");
    let server = trustweave_sds::start(sds::node_config(&socket, &agent.endpoint()))
        .await
        .expect("start");
    // This test process is the SDS client (and registered): still nothing is served.
    let client = sds::SotwClient::open(&socket).await;
    client.request(&["default"], None).await;
    wait_until("refusal counted", Duration::from_secs(10), || async {
        attestation_failures(&server, "permission_denied") >= 1
    })
    .await;
    assert!(!server.is_ready(), "no bundles without authorization");
    let me = server
        .workloads()
        .into_iter()
        .find(|w| w.pid == std::process::id())
        .expect("this process is listed");
    assert_eq!(me.spiffe_id, None);
    assert_eq!(
        sotw_pushes(&server),
        0,
        "nothing was ever sent on the stream"
    );
    drop(client);
    server.shutdown().await;
}
