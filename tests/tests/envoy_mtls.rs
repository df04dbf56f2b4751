//! Real Envoy 1.40 gets its identity and federated trust from trustweave-sds:
//! cross-domain mTLS, rotation without restart, federation removal, Workload
//! API outage and SDS server restart.
//!
//! Topology: a GCP server Envoy (mTLS listener), an AWS client Envoy federated
//! with GCP, and an Azure client Envoy that GCP does not federate with. Each has
//! its own SPIRE agent stand-in and its own trustweave-sds, as in a pod: the
//! stand-in because the test rotates on cue and times each rotation to Envoy's
//! `/certs`, which the real agent cannot be made to do (the same paths on real
//! SPIRE: `mesh.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use trustweave_e2e::envoy::{self, normalize_serial, Envoy, PEER_HEADER, SELF_HEADER};
use trustweave_e2e::http;
use trustweave_e2e::pki::TrustDomainCa;
use trustweave_e2e::sds;
use trustweave_e2e::wait::wait_until;
use trustweave_e2e::workload_api::WorkloadApiStandIn;
use trustweave_sds::RunningServer;

const SERVER_ID: &str = "spiffe://gcp.company.com/ns/inventory/sa/server";
const CLIENT_ID: &str = "spiffe://aws.company.com/ns/checkout/sa/client";
const ROGUE_ID: &str = "spiffe://azure.company.com/ns/unknown/sa/rogue";

/// One workload: its agent stand-in, its trustweave-sds, its Envoy.
struct Workload {
    agent: Arc<WorkloadApiStandIn>,
    sds: Option<RunningServer>,
    sds_socket: PathBuf,
}

impl Workload {
    async fn start(dir: &TempDir, name: &str, ca: Arc<TrustDomainCa>, id: &str) -> Self {
        let agent = WorkloadApiStandIn::start(
            sds::path_in(dir, &format!("{name}-agent.sock")),
            ca,
            id,
            Duration::from_secs(3600),
        )
        .await;
        let sds_socket = sds::path_in(dir, &format!("{name}-sds.sock"));
        Self {
            agent,
            sds: None,
            sds_socket,
        }
    }

    async fn start_sds(&mut self) {
        let config = sds::test_config(&self.sds_socket, &self.agent.endpoint());
        self.sds = Some(sds::start_ready(config).await);
    }

    fn sds(&self) -> &RunningServer {
        self.sds.as_ref().expect("sds running")
    }
}

struct Mesh {
    dir: TempDir,
    server: Workload,
    client: Workload,
    server_envoy: Envoy,
    client_envoy: Envoy,
    rogue_envoy: Envoy,
    _rogue: Workload,
}

async fn mesh() -> Mesh {
    mesh_with(TrustDomainCa::new("gcp.company.com")).await
}

/// The mesh, with the GCP trust domain's CA given.
async fn mesh_with(gcp: TrustDomainCa) -> Mesh {
    let dir = sds::socket_dir();
    let aws = Arc::new(TrustDomainCa::new("aws.company.com"));
    let gcp = Arc::new(gcp);
    let azure = Arc::new(TrustDomainCa::new("azure.company.com"));

    let mut server = Workload::start(&dir, "server", Arc::clone(&gcp), SERVER_ID).await;
    server.agent.federate_with(&aws);
    let mut client = Workload::start(&dir, "client", Arc::clone(&aws), CLIENT_ID).await;
    client.agent.federate_with(&gcp);
    let mut rogue = Workload::start(&dir, "rogue", Arc::clone(&azure), ROGUE_ID).await;
    rogue.agent.federate_with(&gcp);
    for w in [&mut server, &mut client, &mut rogue] {
        w.start_sds().await;
    }

    let server_envoy = Envoy::start(
        "server",
        dir.path(),
        &envoy::server_bootstrap("server", &server.sds_socket),
    )
    .await;
    server_envoy.wait_live().await;
    let upstream = server_envoy.listener(envoy::MTLS_LISTENER).await;
    let gcp_prefix = "spiffe://gcp.company.com/";
    let client_envoy = Envoy::start(
        "client",
        dir.path(),
        &envoy::client_bootstrap("client", &client.sds_socket, upstream, gcp_prefix),
    )
    .await;
    let rogue_envoy = Envoy::start(
        "rogue",
        dir.path(),
        &envoy::client_bootstrap("rogue", &rogue.sds_socket, upstream, gcp_prefix),
    )
    .await;
    client_envoy.wait_live().await;
    rogue_envoy.wait_live().await;
    Mesh {
        dir,
        server,
        client,
        server_envoy,
        client_envoy,
        rogue_envoy,
        _rogue: rogue,
    }
}

async fn call(envoy: &Envoy) -> http::HttpResponse {
    let addr: SocketAddr = envoy.listener(envoy::PLAIN_LISTENER).await;
    http::get(addr, "/", &[])
        .await
        .expect("request through client Envoy")
}

/// Waits until the Envoy's `/certs` lists `serial`; returns how long that took.
async fn wait_for_serial(envoy: &Envoy, serial: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    let serial = normalize_serial(serial);
    wait_until(&format!("serial {serial} in /certs"), timeout, || async {
        envoy.cert_serials().await.contains(&serial)
    })
    .await;
    started.elapsed()
}

#[tokio::test]
async fn federated_domains_complete_mtls_and_an_unfederated_domain_is_refused() {
    let m = mesh().await;
    let ok = call(&m.client_envoy).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(
        ok.header(PEER_HEADER),
        Some(CLIENT_ID),
        "server saw the AWS caller"
    );
    assert_eq!(
        ok.header(SELF_HEADER),
        Some(SERVER_ID),
        "server presented its GCP SVID"
    );
    // Both identities came from our SDS: the SVIDs' serials are what each Envoy holds.
    for (envoy, agent) in [
        (&m.server_envoy, &m.server.agent),
        (&m.client_envoy, &m.client.agent),
    ] {
        let serial = normalize_serial(&agent.current_svid().serial_hex);
        assert!(envoy.cert_serials().await.contains(&serial));
    }

    let verify_failures = "listener.127.0.0.1_0.ssl.fail_verify_error";
    assert_eq!(m.server_envoy.counter(verify_failures).await, 0);
    let refused = call(&m.rogue_envoy).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(
        refused.body.contains("connection failure"),
        "{}",
        refused.body
    );
    assert_eq!(
        m.server_envoy.counter(verify_failures).await,
        1,
        "the server refused the Azure certificate at the handshake"
    );
}

#[tokio::test]
async fn rotation_reaches_envoy_within_a_second_without_restart() {
    let mut m = mesh().await;
    let pid = m.server_envoy.pid();
    for round in 0..3 {
        let rotated = m.server.agent.rotate_now();
        let took =
            wait_for_serial(&m.server_envoy, &rotated.serial_hex, Duration::from_secs(1)).await;
        eprintln!("rotation {round}: new serial in Envoy /certs after {took:?}");
        let old = m.server_envoy.cert_serials().await;
        assert_eq!(
            old.iter()
                .filter(|s| s.as_str() == normalize_serial(&rotated.serial_hex))
                .count(),
            1
        );
        let response = call(&m.client_envoy).await;
        assert_eq!(
            response.status, 200,
            "requests keep succeeding after rotation {round}"
        );
    }
    let rotated = m.client.agent.rotate_now();
    wait_for_serial(&m.client_envoy, &rotated.serial_hex, Duration::from_secs(1)).await;
    assert_eq!(call(&m.client_envoy).await.status, 200);
    assert!(m.server_envoy.is_running());
    assert_eq!(m.server_envoy.pid(), pid, "Envoy was not restarted");
}

#[tokio::test]
async fn removing_federation_refuses_new_connections_from_that_domain() {
    let m = mesh().await;
    assert_eq!(call(&m.client_envoy).await.status, 200);
    m.server.agent.remove_federation("aws.company.com");
    wait_until("AWS caller refused", Duration::from_secs(5), || async {
        call(&m.client_envoy).await.status == 503
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            call(&m.client_envoy).await.status,
            503,
            "every new connection is refused"
        );
    }
}

#[tokio::test]
async fn workload_api_outage_keeps_the_last_good_svid_and_rotation_resumes() {
    let m = mesh().await;
    let held = m.server.agent.current_svid();
    m.server.agent.stop_serving().await;
    let admin = m.server.sds().admin_addr().expect("admin");
    wait_until(
        "Workload API marked disconnected",
        Duration::from_secs(5),
        || async {
            http::get(admin, "/metrics", &[])
                .await
                .map(|r| r.body.contains("trustweave_sds_workload_api_connected 0"))
                .unwrap_or(false)
        },
    )
    .await;
    // Several seconds without the agent: every handshake still succeeds on the last good SVID.
    let outage = Instant::now();
    let mut handshakes = 0;
    while outage.elapsed() < Duration::from_secs(3) {
        let response = call(&m.client_envoy).await;
        assert_eq!(
            response.status, 200,
            "handshake during outage: {response:?}"
        );
        handshakes += 1;
    }
    assert!(handshakes > 1);
    assert_eq!(
        http::get(admin, "/readyz", &[])
            .await
            .expect("readyz")
            .status,
        200
    );
    assert!(m
        .server_envoy
        .cert_serials()
        .await
        .contains(&normalize_serial(&held.serial_hex)));

    m.server.agent.start_serving();
    let rotated = m.server.agent.rotate_now();
    wait_for_serial(
        &m.server_envoy,
        &rotated.serial_hex,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(call(&m.client_envoy).await.status, 200);
}

#[tokio::test]
async fn envoy_reconnects_after_the_sds_server_restarts() {
    let mut m = mesh().await;
    m.server.sds.take().expect("sds").shutdown().await;
    // While SDS is down Envoy keeps its secrets and keeps serving.
    assert_eq!(call(&m.client_envoy).await.status, 200);
    m.server.start_sds().await;
    let rotated = m.server.agent.rotate_now();
    wait_for_serial(
        &m.server_envoy,
        &rotated.serial_hex,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(call(&m.client_envoy).await.status, 200);
    let _ = &m.dir;
}

#[tokio::test]
async fn svids_signed_by_an_intermediate_reach_envoy_as_full_chains() {
    let gcp = TrustDomainCa::with_intermediate("gcp.company.com");
    let intermediate = gcp_intermediate_serial(&gcp);
    let m = mesh_with(gcp).await;
    let ok = call(&m.client_envoy).await;
    assert_eq!(
        ok.status, 200,
        "the AWS client verifies leaf → intermediate → GCP root: {ok:?}"
    );
    // What SDS hands Envoy: leaf then intermediate (Envoy's /certs shows only the leaf).
    let reports = trustweave_sds::inspect::inspect(&m.server.sds_socket, &["default".into()])
        .await
        .expect("inspect");
    let chain: Vec<String> = reports[0]
        .certificates
        .iter()
        .map(|c| normalize_serial(&c.serial))
        .collect();
    let leaf = normalize_serial(&m.server.agent.current_svid().serial_hex);
    assert_eq!(chain, vec![leaf.clone(), intermediate]);
    assert!(m.server_envoy.cert_serials().await.contains(&leaf));
}

fn gcp_intermediate_serial(ca: &TrustDomainCa) -> String {
    let svid = ca.issue_svid(SERVER_ID, Duration::from_secs(60));
    let der = &svid.intermediates_der[0];
    let report = trustweave_sds::snapshot::CertFacts::from_der(der).expect("intermediate parses");
    normalize_serial(&report.serial_hex)
}
