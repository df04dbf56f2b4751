//! Operating trustweave-sds: readiness, expiry, Workload API reconnects,
//! peer-credential checks and the Prometheus metrics.
//!
//! Uses the Workload API stand-in: expiry without rotation, an agent that
//! stops and returns on cue, and rotations timed by the test are faults the
//! real agent cannot be made to produce (SPIRE itself: `spire_node.rs`).

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use trustweave_e2e::http;
use trustweave_e2e::pki::TrustDomainCa;
use trustweave_e2e::sds::{self, SotwClient};
use trustweave_e2e::wait::wait_until;
use trustweave_e2e::workload_api::WorkloadApiStandIn;
use trustweave_sds::render::SECRET_TYPE_URL;

const ID: &str = "spiffe://gcp.company.com/ns/inventory/sa/server";

async fn status(addr: std::net::SocketAddr, path: &str) -> u16 {
    http::get(addr, path, &[])
        .await
        .map(|r| r.status)
        .unwrap_or(0)
}

async fn metrics(admin: std::net::SocketAddr) -> String {
    http::get(admin, "/metrics", &[])
        .await
        .map(|r| r.body)
        .unwrap_or_default()
}

async fn fetch_default(socket: &std::path::Path) -> Result<usize, tonic::Status> {
    sds::client(socket)
        .await
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec!["default".into()],
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().resources.len())
}

#[tokio::test]
async fn ready_only_with_a_valid_svid_and_an_expired_svid_is_never_served() {
    let dir = sds::socket_dir();
    let agent_socket = sds::path_in(&dir, "agent.sock");
    let socket = sds::path_in(&dir, "sds.sock");
    // The agent is not there yet: the server starts, retries, and is not ready.
    let server = trustweave_sds::start(sds::test_config(
        &socket,
        &format!("unix:{}", agent_socket.display()),
    ))
    .await
    .expect("start");
    let admin = server.admin_addr().expect("admin");
    assert_eq!(status(admin, "/healthz").await, 200);
    assert_eq!(status(admin, "/readyz").await, 503);
    assert_eq!(
        fetch_default(&socket)
            .await
            .expect_err("nothing yet")
            .code(),
        tonic::Code::NotFound
    );
    // A stream asking for `default` is held open until the identity arrives.
    let mut stream = SotwClient::open(&socket).await;
    stream.request(&["default"], None).await;

    let ca = Arc::new(TrustDomainCa::new("gcp.company.com"));
    let agent = WorkloadApiStandIn::start(
        &agent_socket,
        Arc::clone(&ca),
        ID,
        Duration::from_secs(3600),
    )
    .await;
    let first = stream.next().await;
    assert_eq!(first.resources.len(), 1);
    wait_until("ready", Duration::from_secs(10), || async {
        status(admin, "/readyz").await == 200
    })
    .await;

    // An SVID about to expire, then the agent goes away: served until expiry, never after.
    agent.serve_svid(ca.issue_svid(ID, Duration::from_secs(2)));
    let short = stream.next().await;
    stream.request(&["default"], None).await;
    assert_ne!(short.version_info, first.version_info);
    agent.stop_serving().await;
    wait_until(
        "not ready after expiry",
        Duration::from_secs(10),
        || async { status(admin, "/readyz").await == 503 },
    )
    .await;
    assert_eq!(
        fetch_default(&socket).await.expect_err("expired").code(),
        tonic::Code::NotFound
    );
    assert!(!server.is_ready());

    // The agent returns with a fresh SVID: pushed on the same stream, ready again.
    agent.start_serving();
    let fresh = agent.rotate_now();
    let pushed = stream.next().await;
    assert_eq!(
        sds::report(&pushed.resources[0]).certificates[0].serial,
        fresh.serial_hex
    );
    wait_until("ready again", Duration::from_secs(10), || async {
        status(admin, "/readyz").await == 200
    })
    .await;
    server.shutdown().await;
    assert!(!socket.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn peers_outside_allowed_uids_are_refused() {
    let dir = sds::socket_dir();
    let me = std::fs::metadata(dir.path()).expect("meta").uid();
    let ca = Arc::new(TrustDomainCa::new("gcp.company.com"));
    let agent = WorkloadApiStandIn::start(
        sds::path_in(&dir, "agent.sock"),
        ca,
        ID,
        Duration::from_secs(3600),
    )
    .await;

    let refused_socket = sds::path_in(&dir, "refused.sock");
    let mut config = sds::test_config(&refused_socket, &agent.endpoint());
    config.allowed_uids = vec![me.wrapping_add(4242)];
    let refusing = sds::start_ready(config).await;
    let mode = std::fs::metadata(&refused_socket).expect("socket").mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        fetch_default(&refused_socket).await.is_err(),
        "other UIDs are refused"
    );

    let allowed_socket = sds::path_in(&dir, "allowed.sock");
    let mut config = sds::test_config(&allowed_socket, &agent.endpoint());
    config.allowed_uids = vec![me];
    let allowing = sds::start_ready(config).await;
    assert_eq!(fetch_default(&allowed_socket).await.expect("allowed"), 1);
    refusing.shutdown().await;
    allowing.shutdown().await;
}

#[tokio::test]
async fn metrics_cover_streams_pushes_latency_expiry_bundles_and_the_workload_api() {
    let dir = sds::socket_dir();
    let gcp = Arc::new(TrustDomainCa::new("gcp.company.com"));
    let aws = TrustDomainCa::new("aws.company.com");
    let agent = WorkloadApiStandIn::start(
        sds::path_in(&dir, "agent.sock"),
        gcp,
        ID,
        Duration::from_secs(3600),
    )
    .await;
    agent.federate_with(&aws);
    let socket = sds::path_in(&dir, "sds.sock");
    let server = sds::start_ready(sds::test_config(&socket, &agent.endpoint())).await;
    let mut stream = SotwClient::open(&socket).await;
    stream.request(&["default"], None).await;
    stream.next().await;
    let admin = server.admin_addr().expect("admin");
    let scraped = metrics(admin).await;
    // The first answer to a new subscription says nothing about propagation.
    assert!(
        scraped.contains("trustweave_sds_push_latency_seconds_count 0"),
        "{scraped}"
    );
    agent.rotate_now();
    stream.next().await;
    let scraped = metrics(admin).await;
    for expected in [
        "trustweave_sds_streams_open{protocol=\"sotw\"} 1",
        "trustweave_sds_pushes_total{protocol=\"sotw\"} 2",
        "trustweave_sds_push_latency_seconds_count 1",
        "trustweave_sds_workload_api_connected 1",
        "trustweave_sds_trust_bundle_cas{trust_domain=\"aws.company.com\"} 1",
        "trustweave_sds_trust_bundle_cas{trust_domain=\"gcp.company.com\"} 1",
    ] {
        assert!(
            scraped.contains(expected),
            "missing {expected:?} in\n{scraped}"
        );
    }
    let expiry: f64 = scraped
        .lines()
        .find_map(|l| l.strip_prefix("trustweave_sds_svid_expiry_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .expect("expiry gauge");
    assert!((3500.0..=3600.0).contains(&expiry), "{expiry}");

    // A removed federation disappears from the per-domain gauge.
    agent.remove_federation("aws.company.com");
    wait_until(
        "aws bundle gone from metrics",
        Duration::from_secs(5),
        || async {
            let body = metrics(admin).await;
            !body.contains("aws.company.com") && body.contains("gcp.company.com")
        },
    )
    .await;
    drop(stream);
    wait_until(
        "stream closed in metrics",
        Duration::from_secs(5),
        || async {
            let body = metrics(admin).await;
            body.contains("trustweave_sds_streams_open{protocol=\"sotw\"} 0")
        },
    )
    .await;
    server.shutdown().await;
}
