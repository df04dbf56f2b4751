//! Node mode serves exactly what SPIRE grants right now, seen by SDS clients
//! of the node socket: a withdrawn entry, an SVID that expires while its
//! subscription stays open, bundle changes while the SVID stream is down, a
//! revoked delegation, `FetchSecrets`, the agent's PID namespace, and who may
//! read `/debug/workloads`.
//!
//! Uses the Delegated Identity API stand-in: the faults here (an agent that
//! keeps an SVID past its expiry without rotating, SVID subscriptions failing
//! while bundles flow) are ones the real agent cannot be made to produce on
//! demand. The same withdrawal, revocation and fetch are also checked against
//! the real SPIRE agent in `spire_node.rs`.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryRequest};
use tempfile::TempDir;
use trustweave_e2e::delegated_api::DelegatedApiStandIn;
use trustweave_e2e::http;
use trustweave_e2e::pki::TrustDomainCa;
use trustweave_e2e::sds::{self, report, DeltaClient};
use trustweave_e2e::wait::wait_until;
use trustweave_sds::render::SECRET_TYPE_URL;
use trustweave_sds::RunningServer;

const SDS_ID: &str = "spiffe://aws.company.com/ns/spire/sa/trustweave-sds";
const ID: &str = "spiffe://aws.company.com/ns/orders/sa/api";
const GCP: &str = "gcp.company.com";

struct Node {
    _dir: TempDir,
    socket: std::path::PathBuf,
    agent: Arc<DelegatedApiStandIn>,
    sds: RunningServer,
    gcp: Arc<TrustDomainCa>,
}

/// A node whose one workload is this test process, issued SVIDs of `svid_ttl`.
async fn node(svid_ttl: Duration) -> Node {
    let dir = sds::socket_dir();
    let aws = Arc::new(TrustDomainCa::new("aws.company.com"));
    let gcp = Arc::new(TrustDomainCa::new(GCP));
    let agent = DelegatedApiStandIn::start(
        sds::path_in(&dir, "admin.sock"),
        std::process::id(),
        SDS_ID,
        &[&aws, &gcp],
        svid_ttl,
    )
    .await;
    agent.register(std::process::id(), &aws, ID, &[GCP]);
    let socket = sds::path_in(&dir, "socket");
    let sds = sds::start_ready(sds::node_config(&socket, &agent.endpoint())).await;
    Node {
        _dir: dir,
        socket,
        agent,
        sds,
        gcp,
    }
}

/// A Delta stream on `default` and `ROOTCA`, after its first response holds both.
async fn delta(node: &Node) -> DeltaClient {
    let mut client = DeltaClient::open(&node.socket).await;
    client.change(&["default", "ROOTCA"], &[]).await;
    let mut names = Vec::new();
    while names.len() < 2 {
        let response = client.next().await;
        names.extend(response.resources.iter().map(|r| r.name.clone()));
        client.change(&[], &[]).await;
    }
    client
}

/// Reads Delta responses until one satisfies `done`; returns it.
async fn delta_until(
    client: &mut DeltaClient,
    what: &str,
    done: impl Fn(&DeltaDiscoveryResponse) -> bool,
) -> DeltaDiscoveryResponse {
    for _ in 0..20 {
        let response = client.next().await;
        client.change(&[], &[]).await;
        if done(&response) {
            return response;
        }
    }
    panic!("no Delta response with {what}");
}

fn removes(response: &DeltaDiscoveryResponse, name: &str) -> bool {
    response.removed_resources.iter().any(|n| n == name)
}

/// The trust domains and root fingerprints of a `ROOTCA` resource.
fn rootca_roots(response: &DeltaDiscoveryResponse) -> Option<Vec<(String, Vec<String>)>> {
    let resource = response.resources.iter().find(|r| r.name == "ROOTCA")?;
    let secret = report(resource.resource.as_ref()?);
    Some(
        secret
            .trust_domains
            .into_iter()
            .map(|td| (td.trust_domain, td.sha256))
            .collect(),
    )
}

async fn metric(sds: &RunningServer, line: &str) -> bool {
    http::get(sds.admin_addr().expect("admin"), "/metrics", &[])
        .await
        .map(|r| r.body.contains(line))
        .unwrap_or(false)
}

async fn wait_metric(sds: &RunningServer, line: &str) {
    wait_until(line, Duration::from_secs(10), || metric(sds, line)).await;
}

fn served_serial(sds: &RunningServer) -> Option<String> {
    sds.workloads()
        .into_iter()
        .find(|w| w.pid == std::process::id())
        .and_then(|w| w.serial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_svid_expiring_while_its_first_subscription_is_open_is_withdrawn_and_trust_still_follows(
) {
    // The stand-in never rotates: the SVID expires on the open subscription.
    let n = node(Duration::from_secs(3)).await;
    let mut client = delta(&n).await;
    assert!(served_serial(&n.sds).is_some());
    delta_until(&mut client, "default removed at notAfter", |r| {
        removes(r, "default")
    })
    .await;
    assert_eq!(served_serial(&n.sds), None, "inspect no longer reports it");
    // After the default expired, a bundle change still reaches ROOTCA.
    let next_gcp = TrustDomainCa::new(GCP);
    n.agent.set_bundle(GCP, vec![next_gcp.root_der().to_vec()]);
    let response = delta_until(&mut client, "ROOTCA with gcp's new root", |r| {
        rootca_roots(r).is_some()
    })
    .await;
    let roots = rootca_roots(&response).expect("ROOTCA");
    assert_eq!(
        roots.iter().map(|(td, _)| td.as_str()).collect::<Vec<_>>(),
        ["aws.company.com", GCP]
    );
    // A new stream gets no expired certificate.
    let mut fresh = sds::SotwClient::open(&n.socket).await;
    fresh.request(&["default"], None).await;
    fresh.expect_nothing(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_entry_withdraws_the_svid_and_its_federation_at_once() {
    let n = node(Duration::from_secs(3600)).await;
    let mut client = delta(&n).await;
    n.agent.delete(std::process::id());
    let response = delta_until(&mut client, "default removed", |r| removes(r, "default")).await;
    assert!(
        removes(&response, "ROOTCA"),
        "the withdrawn identity's trust goes with it"
    );
    assert_eq!(served_serial(&n.sds), None);
    wait_metric(
        &n.sds,
        "trustweave_sds_attestation_failures_total{reason=\"withdrawn\"} 1",
    )
    .await;
    // Registered again: served again on the same stream.
    let aws = Arc::new(TrustDomainCa::new("aws.company.com"));
    n.agent.add_bundle(&aws);
    n.agent.register(std::process::id(), &aws, ID, &[]);
    delta_until(&mut client, "default again", |r| {
        r.resources.iter().any(|res| res.name == "default")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_changes_reach_a_workload_whose_svid_stream_is_down() {
    let n = node(Duration::from_secs(3600)).await;
    let mut client = delta(&n).await;
    n.agent.update(|state| state.svids_unavailable = true);
    wait_metric(
        &n.sds,
        "trustweave_sds_attestation_failures_total{reason=\"unavailable\"}",
    )
    .await;
    // gcp's root is replaced (a compromised root removed) while the workload's
    // SVID subscription is failing and backing off.
    let next_gcp = TrustDomainCa::new(GCP);
    n.agent.set_bundle(GCP, vec![next_gcp.root_der().to_vec()]);
    let response = delta_until(&mut client, "ROOTCA with gcp's new root only", |r| {
        rootca_roots(r).is_some()
    })
    .await;
    let old = sha256_hex(n.gcp.root_der());
    let roots = rootca_roots(&response).expect("ROOTCA");
    let gcp_roots = &roots.iter().find(|(td, _)| td == GCP).expect("gcp").1;
    assert!(
        !gcp_roots.contains(&old),
        "the replaced root is not trusted"
    );
    assert!(!removes(&response, "default"), "last good SVID kept");
    assert!(served_serial(&n.sds).is_some());
}

fn sha256_hex(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_delegation_serves_nothing_not_even_last_good() {
    let n = node(Duration::from_secs(3600)).await;
    let mut client = delta(&n).await;
    n.agent.update(|state| state.authorized_delegates.clear());
    let response = delta_until(&mut client, "default removed", |r| removes(r, "default")).await;
    assert!(removes(&response, "ROOTCA"));
    wait_metric(
        &n.sds,
        "trustweave_sds_attestation_failures_total{reason=\"permission_denied\"}",
    )
    .await;
    wait_until("not ready", Duration::from_secs(10), || async {
        !n.sds.is_ready()
    })
    .await;
    let mut fresh = sds::SotwClient::open(&n.socket).await;
    fresh.request(&["default", "ROOTCA"], None).await;
    fresh.expect_nothing(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_secrets_serves_node_mode_and_reuses_one_subscription() {
    let n = node(Duration::from_secs(3600)).await;
    let mut client = sds::client(&n.socket).await;
    for _ in 0..5 {
        let response = client
            .fetch_secrets(DiscoveryRequest {
                resource_names: vec!["default".into()],
                type_url: SECRET_TYPE_URL.into(),
                ..Default::default()
            })
            .await
            .expect("fetched")
            .into_inner();
        let secret = report(&response.resources[0]);
        assert_eq!(secret.certificates[0].spiffe_ids, [ID]);
    }
    assert_eq!(
        n.agent.svid_subscriptions(),
        1,
        "five fetches, one subscription"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workload_map_is_served_on_loopback_only() {
    let dir = sds::socket_dir();
    let aws = Arc::new(TrustDomainCa::new("aws.company.com"));
    let agent = DelegatedApiStandIn::start(
        sds::path_in(&dir, "admin.sock"),
        std::process::id(),
        SDS_ID,
        &[&aws],
        Duration::from_secs(3600),
    )
    .await;
    let mut config = sds::node_config(&sds::path_in(&dir, "socket"), &agent.endpoint());
    // As the DaemonSet binds it: every interface (reached here on loopback).
    config.admin_addr = Some("0.0.0.0:0".parse().expect("addr"));
    config.debug_addr = Some("127.0.0.1:0".parse().expect("addr"));
    let server = sds::start_ready(config).await;
    let port = server.admin_addr().expect("admin").port();
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let metrics = http::get(admin, "/metrics", &[]).await.expect("metrics");
    assert_eq!(metrics.status, 200);
    let debug = http::get(admin, "/debug/workloads", &[])
        .await
        .expect("debug");
    assert_eq!(debug.status, 404, "not on the pod-reachable admin port");
    let debug_addr = server.debug_addr().expect("debug");
    let workloads = http::get(debug_addr, "/debug/workloads", &[])
        .await
        .expect("debug");
    assert_eq!(workloads.status, 200);
    let healthz = http::get(debug_addr, "/healthz", &[])
        .await
        .expect("healthz");
    assert_eq!(healthz.status, 404, "the debug listener serves /debug only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_in_another_pid_namespace_is_refused_at_start() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: unshare --pid needs root");
        return;
    }
    let dir = sds::socket_dir();
    let admin = sds::path_in(&dir, "admin.sock");
    // Something listening on the admin socket from a PID namespace of its own.
    let mut agent = tokio::process::Command::new("unshare")
        .args(["--pid", "--fork", "python3", "-c"])
        .arg(
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8)\n\
             while True: s.accept()",
        )
        .arg(&admin)
        .kill_on_drop(true)
        .spawn()
        .expect("unshare");
    wait_until("the admin socket exists", Duration::from_secs(10), || {
        let exists = admin.exists();
        async move { exists }
    })
    .await;
    let output = tokio::process::Command::new(trustweave_e2e::mesh::node_sds::binary())
        .args(["--source", "delegated", "--admin-socket"])
        .arg(&admin)
        .arg("--sds-socket")
        .arg(sds::path_in(&dir, "socket"))
        .args(["--admin-addr", "off"])
        .output()
        .await
        .expect("run trustweave-sds");
    let _ = agent.kill().await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--admin-socket") && stderr.contains("PID namespace"),
        "{stderr}"
    );
}
