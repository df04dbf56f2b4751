//! trustweave-sds against a broken or hostile Workload API: the last good
//! identity is kept, bad material is never served, and logs and metrics say
//! what is wrong.
//!
//! Uses the Workload API stand-in: malformed, mismatched and hostile material,
//! a flapping agent and one that never answers are what the real SPIRE agent
//! never sends.

use std::sync::Arc;
use std::time::Duration;

use trustweave_e2e::envoy::normalize_serial;
use trustweave_e2e::http;
use trustweave_e2e::pki::TrustDomainCa;
use trustweave_e2e::sds::{self, report, SotwClient};
use trustweave_e2e::wait::wait_until;
use trustweave_e2e::workload_api::{Material, WorkloadApiStandIn};
use trustweave_sds::RunningServer;

const ID: &str = "spiffe://gcp.company.com/ns/shop/sa/api";

async fn metrics(server: &RunningServer) -> String {
    http::get(server.admin_addr().expect("admin"), "/metrics", &[])
        .await
        .expect("metrics")
        .body
}

async fn served_serial(client: &mut SotwClient) -> String {
    let response = client.next().await;
    client.request(&["default"], None).await;
    normalize_serial(&report(&response.resources[0]).certificates[0].serial)
}

struct World {
    _dir: tempfile::TempDir,
    agent: Arc<WorkloadApiStandIn>,
    server: RunningServer,
    client: SotwClient,
    serial: String,
}

async fn world() -> World {
    let dir = sds::socket_dir();
    let agent = WorkloadApiStandIn::start(
        sds::path_in(&dir, "agent.sock"),
        Arc::new(TrustDomainCa::new("gcp.company.com")),
        ID,
        Duration::from_secs(3600),
    )
    .await;
    let socket = sds::path_in(&dir, "sds.sock");
    let server = sds::start_ready(sds::test_config(&socket, &agent.endpoint())).await;
    let mut client = SotwClient::open(&socket).await;
    client.request(&["default"], None).await;
    let serial = served_serial(&mut client).await;
    World {
        _dir: dir,
        agent,
        server,
        client,
        serial,
    }
}

impl World {
    /// Waits until `reason` is counted, then checks the last good SVID is still served:
    /// a good rotation afterwards is the next thing the client receives.
    async fn refused_and_last_good_kept(
        &mut self,
        reason: &str,
        repair: impl FnOnce(&mut Material),
    ) {
        let line = format!("trustweave_sds_workload_api_rejected_total{{reason=\"{reason}\"}}");
        let server = &self.server;
        wait_until(
            &format!("{reason} counted"),
            Duration::from_secs(10),
            || async { metrics(server).await.contains(&line) },
        )
        .await;
        assert!(self.server.is_ready(), "the last good SVID is kept");
        self.agent.update(repair);
        let good = self.agent.rotate_now();
        assert_eq!(
            served_serial(&mut self.client).await,
            normalize_serial(&good.serial_hex),
            "nothing of the bad material reached the client"
        );
        self.serial = normalize_serial(&good.serial_hex);
    }
}

#[tokio::test]
async fn a_key_that_is_not_the_certificates_is_refused() {
    let mut w = world().await;
    let other = w.agent.ca().issue_svid(ID, Duration::from_secs(3600));
    w.agent.update(|m| {
        m.svid = w.agent.ca().issue_svid(ID, Duration::from_secs(3600));
        m.svid.key_der = other.key_der.clone();
    });
    w.refused_and_last_good_kept("key_mismatch", |_| {}).await;
}

#[tokio::test]
async fn an_expired_svid_is_never_served() {
    let mut w = world().await;
    let now = time::OffsetDateTime::now_utc();
    let expired = w.agent.ca().issue_with_validity(
        &[ID],
        now - time::Duration::hours(2),
        now - time::Duration::hours(1),
    );
    w.agent.serve_svid(expired);
    w.refused_and_last_good_kept("expired", |_| {}).await;
}

#[tokio::test]
async fn an_unparsable_bundle_or_a_missing_own_bundle_is_refused() {
    let mut w = world().await;
    w.agent.update(|m| {
        m.federated.insert(
            "aws.company.com".into(),
            vec![b"not a certificate".to_vec()],
        );
    });
    w.refused_and_last_good_kept("invalid_response", |m| m.federated.clear())
        .await;
    w.agent.update(|m| {
        m.federated.clear();
        m.own_roots.clear();
    });
    wait_until("refused", Duration::from_secs(10), || async {
        let body = metrics(&w.server).await;
        body.contains("reason=\"no_bundle\"") || body.contains("reason=\"invalid_response\"} 2")
    })
    .await;
    assert!(w.server.is_ready());
    let roots = vec![w.agent.ca().root_der().to_vec()];
    w.agent.update(|m| m.own_roots = roots);
    let good = w.agent.rotate_now();
    assert_eq!(
        served_serial(&mut w.client).await,
        normalize_serial(&good.serial_hex)
    );
}

#[tokio::test]
async fn a_thousand_federated_trust_domains_are_served() {
    let w = world().await;
    let cas: Vec<TrustDomainCa> = (0..1000)
        .map(|i| TrustDomainCa::new(&format!("td{i}.example")))
        .collect();
    w.agent.update(|m| {
        for ca in &cas {
            m.federated
                .insert(ca.trust_domain().to_string(), vec![ca.root_der().to_vec()]);
        }
    });
    let mut rootca = SotwClient::open(&sds::path_in(&w._dir, "sds.sock")).await;
    rootca.request(&["ROOTCA"], None).await;
    wait_until("1001 trust domains", Duration::from_secs(20), || async {
        w.server.snapshots().borrow().snapshot.bundles.len() == 1001
    })
    .await;
    let mut domains = 0;
    while domains != 1001 {
        let response = rootca.next().await;
        rootca.request(&["ROOTCA"], None).await;
        domains = report(&response.resources[0]).trust_domains.len();
    }
}

#[tokio::test]
async fn a_flapping_agent_keeps_the_last_good_svid_throughout() {
    let mut w = world().await;
    for _ in 0..15 {
        w.agent.stop_serving().await;
        assert!(
            w.server.is_ready(),
            "serving the last good SVID while the agent is down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        w.agent.start_serving();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(w.server.is_ready());
    }
    let good = w.agent.rotate_now();
    let serial = normalize_serial(&good.serial_hex);
    // The rotation arrives once the server has reconnected.
    loop {
        if served_serial(&mut w.client).await == serial {
            break;
        }
    }
}

#[tokio::test]
async fn an_agent_that_accepts_and_never_answers_is_retried() {
    let dir = sds::socket_dir();
    let path = sds::path_in(&dir, "silent.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            connections.push(stream);
        }
    });
    let socket = sds::path_in(&dir, "sds.sock");
    let server = trustweave_sds::start(sds::test_config(
        &socket,
        &format!("unix:{}", path.display()),
    ))
    .await
    .expect("start");
    wait_until(
        "two timed-out attempts",
        Duration::from_secs(15),
        || async {
            let body = metrics(&server).await;
            body.lines().any(|l| {
                l.starts_with("trustweave_sds_workload_api_rejected_total{reason=\"timeout\"}")
                    && l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()) >= Some(2)
            })
        },
    )
    .await;
    assert!(!server.is_ready());
    assert!(metrics(&server)
        .await
        .contains("trustweave_sds_workload_api_connected 0"));
    server.shutdown().await;
    held.abort();
}
