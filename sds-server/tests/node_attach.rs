//! Node mode's pure parts: which process a connection's identity is bound to,
//! and what the Delegated Identity API's messages may carry.

use std::sync::Arc;
use std::time::Duration;

use spire_api::pb::spire::api::agent::delegatedidentity::v1::{
    SubscribeToX509BundlesResponse, SubscribeToX509sviDsResponse, X509svidWithKey,
};
use spire_api::pb::spire::api::types::{Spiffeid, X509svid};
use tokio::sync::watch;
use trustweave_sds::delegated::{
    parse_bundles, parse_workload_update, AgentDataError, DelegatedConfig, NodeIdentities,
};
use trustweave_sds::metrics::Metrics;
use trustweave_sds::peer::ProcessHandle;
use trustweave_sds::published::Published;
use trustweave_sds::render::SecretNames;
use trustweave_sds::snapshot::IdentitySnapshot;

fn node() -> Arc<NodeIdentities> {
    let names = SecretNames::default();
    let (tx, rx) = watch::channel(Arc::new(Published::now(
        IdentitySnapshot::default(),
        &names,
    )));
    let config = DelegatedConfig {
        endpoint: "/nonexistent/admin.sock".into(),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(100),
    };
    let (node, _task) = NodeIdentities::start(config, names, Arc::new(Metrics::new(rx)), tx);
    node
}

#[tokio::test]
async fn streams_of_one_live_process_share_one_subscription() {
    let node = node();
    let me = Arc::new(ProcessHandle::open(std::process::id()).expect("pidfd"));
    let first = node.attach(&me).expect("attached");
    let again = Arc::new(ProcessHandle::open(std::process::id()).expect("pidfd"));
    let second = node.attach(&again).expect("attached");
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(node.report().len(), 1);
    assert_eq!(node.report()[0].streams, 2);
    drop(first);
    drop(second);
    assert!(
        node.report().is_empty(),
        "the last stream's end ends the subscription"
    );
}

#[tokio::test]
async fn an_exited_process_is_never_attached() {
    let node = node();
    let mut child = tokio::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn");
    let pid = child.id().expect("pid");
    let pinned = Arc::new(ProcessHandle::open(pid).expect("pidfd"));
    let lease = node.attach(&pinned).expect("attached while alive");
    assert!(!pinned.has_exited());
    child.kill().await.expect("kill");
    pinned.exited().await;
    assert!(pinned.has_exited());
    // Whoever holds the PID next, the exited process's handle attaches nothing;
    // a new holder connecting would be pinned by its own pidfd, which is alive.
    assert!(node.attach(&pinned).is_none());
    assert!(
        ProcessHandle::open(pid).is_err(),
        "a reaped PID cannot be pinned"
    );
    drop(lease);
    assert!(node.report().is_empty());
}

fn svid_message(claimed: &str, uri: &str) -> SubscribeToX509sviDsResponse {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().expect("uri"))];
    let cert = params.self_signed(&key).expect("cert");
    let rest = claimed.strip_prefix("spiffe://").expect("id");
    let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    SubscribeToX509sviDsResponse {
        x509_svids: vec![X509svidWithKey {
            x509_svid: Some(X509svid {
                cert_chain: vec![cert.der().to_vec().into()],
                id: Some(Spiffeid {
                    trust_domain: td.into(),
                    path: path.into(),
                }),
                expires_at: 0,
                hint: String::new(),
            }),
            x509_svid_key: key.serialize_der().into(),
        }],
        federates_with: vec!["spiffe://gcp.company.com".into()],
    }
}

#[test]
fn an_svid_is_the_identity_in_its_certificate_not_the_one_claimed_beside_it() {
    let id = "spiffe://aws.company.com/ns/a/sa/b";
    let update = parse_workload_update(&svid_message(id, id)).expect("valid");
    assert_eq!(update.svids[0].spiffe_id, id);
    assert_eq!(
        update.federates_with.iter().collect::<Vec<_>>(),
        ["gcp.company.com"]
    );
    let forged = svid_message("spiffe://aws.company.com/ns/admin/sa/root", id);
    assert!(matches!(
        parse_workload_update(&forged),
        Err(AgentDataError::IdMismatch { .. })
    ));
}

#[test]
fn bundle_keys_must_be_trust_domains_and_certificates_must_parse() {
    let bad_key = SubscribeToX509BundlesResponse {
        ca_certificates: [("spiffe://a.com/not-a-td".to_string(), Vec::new().into())].into(),
    };
    let error = parse_bundles(&bad_key).expect_err("path in key");
    assert!(error.to_string().starts_with("ca_certificates"), "{error}");
    let garbage = SubscribeToX509BundlesResponse {
        ca_certificates: [("spiffe://a.com".to_string(), vec![0x30, 0x82, 0xff].into())].into(),
    };
    assert!(matches!(
        parse_bundles(&garbage),
        Err(AgentDataError::Certificate { .. })
    ));
}
