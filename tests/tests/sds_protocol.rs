//! SDS protocol behaviour, with the test playing Envoy through the envoy-types
//! client stubs against trustweave-sds fed by the Workload API stand-in.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, SpiffeCertValidatorConfig,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use prost::Message;
use sha2::Digest;
use tempfile::TempDir;
use trustweave_e2e::pki::TrustDomainCa;
use trustweave_e2e::sds::{self, decode_secret, report, DeltaClient, SotwClient};
use trustweave_e2e::workload_api::WorkloadApiStandIn;
use trustweave_sds::render::SECRET_TYPE_URL;
use trustweave_sds::RunningServer;

const AWS: &str = "aws.company.com";
const GCP: &str = "gcp.company.com";
const AZURE: &str = "azure.company.com";
const WORKLOAD: &str = "spiffe://aws.company.com/ns/payments/sa/api";
/// Long enough that nothing arriving is not a race, short enough to keep the suite quick.
const QUIET: Duration = Duration::from_millis(400);

struct World {
    _dir: TempDir,
    agent: Arc<WorkloadApiStandIn>,
    gcp: TrustDomainCa,
    azure: TrustDomainCa,
    server: RunningServer,
    socket: std::path::PathBuf,
}

/// An AWS workload federated with GCP, served by trustweave-sds.
async fn world() -> World {
    let dir = sds::socket_dir();
    let aws = Arc::new(TrustDomainCa::new(AWS));
    let gcp = TrustDomainCa::new(GCP);
    let azure = TrustDomainCa::new(AZURE);
    let agent = WorkloadApiStandIn::start(
        sds::path_in(&dir, "agent.sock"),
        aws,
        WORKLOAD,
        Duration::from_secs(3600),
    )
    .await;
    agent.federate_with(&gcp);
    let socket = sds::path_in(&dir, "sds.sock");
    let server = sds::start_ready(sds::test_config(&socket, &agent.endpoint())).await;
    World {
        _dir: dir,
        agent,
        gcp,
        azure,
        server,
        socket,
    }
}

fn names_of(
    response: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Vec<String> {
    response.resources.iter().map(|r| report(r).name).collect()
}

fn trust_domains(any: &envoy_types::pb::google::protobuf::Any) -> Vec<String> {
    report(any)
        .trust_domains
        .into_iter()
        .map(|t| t.trust_domain)
        .collect()
}

fn serial(any: &envoy_types::pb::google::protobuf::Any) -> String {
    report(any).certificates[0].serial.clone()
}

#[tokio::test]
async fn default_and_rootca_are_typed_secrets_with_exactly_the_requested_name() {
    let w = world().await;
    let mut svid = SotwClient::open(&w.socket).await;
    svid.request(&["default"], None).await;
    let response = svid.next().await;
    assert_eq!(response.type_url, SECRET_TYPE_URL);
    assert_eq!(names_of(&response), vec!["default"]);
    let tls = report(&response.resources[0]);
    assert_eq!(tls.kind, "tls_certificate");
    assert_eq!(tls.certificates[0].spiffe_ids, vec![WORKLOAD]);
    assert_eq!(
        tls.certificates[0].serial,
        w.agent.current_svid().serial_hex
    );

    let mut trust = SotwClient::open(&w.socket).await;
    trust.request(&["ROOTCA"], None).await;
    let response = trust.next().await;
    assert_eq!(names_of(&response), vec!["ROOTCA"]);
    // Own and federated domains, sorted, one entry each, SPIFFE validator, no SAN matchers.
    assert_eq!(trust_domains(&response.resources[0]), vec![AWS, GCP]);
    let secret = sds::decode_secret(&response.resources[0]);
    let Some(secret::Type::ValidationContext(context)) = secret.r#type else {
        panic!("ROOTCA must be a validation context");
    };
    assert!(context.match_typed_subject_alt_names.is_empty());
    let validator = context.custom_validator_config.expect("custom validator");
    assert_eq!(validator.name, "envoy.tls.cert_validator.spiffe");
    let config =
        SpiffeCertValidatorConfig::decode(validator.typed_config.expect("config").value.as_slice())
            .expect("SPIFFE validator config");
    assert_eq!(config.trust_domains.len(), 2);

    // ALL is the same aggregate; spiffe://<td> one domain's bundle; the SVID under its SPIFFE ID.
    let mut other = SotwClient::open(&w.socket).await;
    let gcp_name = format!("spiffe://{GCP}");
    other.request(&["ALL", &gcp_name, WORKLOAD], None).await;
    let response = other.next().await;
    let mut names = names_of(&response);
    names.sort();
    let mut expected = vec!["ALL".to_string(), gcp_name.clone(), WORKLOAD.to_string()];
    expected.sort();
    assert_eq!(names, expected);
    for any in &response.resources {
        match report(any).name.as_str() {
            "ALL" => assert_eq!(trust_domains(any), vec![AWS, GCP]),
            n if n == gcp_name => assert_eq!(trust_domains(any), vec![GCP]),
            _ => assert_eq!(report(any).certificates[0].spiffe_ids, vec![WORKLOAD]),
        }
    }
    w.server.shutdown().await;
}

#[tokio::test]
async fn several_names_share_one_stream() {
    let w = world().await;
    let mut stream = SotwClient::open(&w.socket).await;
    stream.request(&["default", "ROOTCA"], None).await;
    let response = stream.next().await;
    let mut names = names_of(&response);
    names.sort();
    assert_eq!(names, vec!["ROOTCA", "default"]);
    w.server.shutdown().await;
}

fn node_asking_for_pem(value: Kind) -> Node {
    Node {
        id: "sidecar~10.0.0.1~api.payments~payments.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: [(
                "disable_spiffe_cert_validation".to_string(),
                Value { kind: Some(value) },
            )]
            .into_iter()
            .collect(),
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn node_is_kept_from_the_first_request_and_may_be_absent() {
    let w = world().await;
    for flag in [Kind::BoolValue(true), Kind::StringValue("true".into())] {
        let mut pem = SotwClient::open(&w.socket).await;
        pem.request(&["ROOTCA", "ALL"], Some(node_asking_for_pem(flag)))
            .await;
        let response = pem.next().await;
        let by_name = |response: &DiscoveryResponse, name: &str| {
            let any = response
                .resources
                .iter()
                .find(|a| decode_secret(a).name == name)
                .unwrap_or_else(|| panic!("{name} in the response"));
            (trust_domains(any), report(any).trust_domains[0].ca_count)
        };
        // PEM cannot scope a root to its domain: ROOTCA is the own domain only.
        assert_eq!(by_name(&response, "ROOTCA"), (vec!["*".to_string()], 1));
        assert_eq!(by_name(&response, "ALL"), (vec!["*".to_string()], 2));
        // Later requests carry no node; the format chosen by the first one stays.
        pem.request(&["ROOTCA", "ALL"], None).await;
        w.agent.federate_with(&w.azure);
        let response = pem.next().await;
        assert_eq!(by_name(&response, "ROOTCA"), (vec!["*".to_string()], 1));
        assert_eq!(by_name(&response, "ALL"), (vec!["*".to_string()], 3));
        w.agent.remove_federation(AZURE);
    }
    // No node at all: accepted, SPIFFE validator.
    let mut plain = SotwClient::open(&w.socket).await;
    plain.request(&["ROOTCA"], None).await;
    let response = plain.next().await;
    assert_eq!(trust_domains(&response.resources[0]), vec![AWS, GCP]);
    w.server.shutdown().await;
}

#[tokio::test]
async fn empty_first_request_is_a_wildcard_and_later_empty_names_unsubscribe() {
    let w = world().await;
    let mut stream = SotwClient::open(&w.socket).await;
    stream.request(&[], None).await;
    let response = stream.next().await;
    let mut names = names_of(&response);
    names.sort();
    let mut expected = vec![
        "ALL".to_string(),
        "ROOTCA".into(),
        "default".into(),
        format!("spiffe://{AWS}"),
        format!("spiffe://{GCP}"),
        WORKLOAD.into(),
    ];
    expected.sort();
    assert_eq!(names, expected);

    let mut explicit = SotwClient::open(&w.socket).await;
    explicit.request(&["default"], None).await;
    explicit.next().await;
    explicit.request(&[], None).await;
    w.agent.rotate_now();
    explicit.expect_nothing(QUIET).await;
    // Subscribing again is answered at once, with the rotated SVID.
    explicit.request(&["default"], None).await;
    let response = explicit.next().await;
    assert_eq!(
        serial(&response.resources[0]),
        w.agent.current_svid().serial_hex
    );
    w.server.shutdown().await;
}

#[tokio::test]
async fn nack_is_counted_not_resent_and_the_next_change_is_pushed() {
    let w = world().await;
    let mut stream = SotwClient::open(&w.socket).await;
    stream.request(&["default"], None).await;
    let first = stream.next().await;
    stream.nack(&["default"], "rejected by test").await;
    stream.expect_nothing(QUIET).await;
    let metrics = w.server.metrics().encode();
    assert!(
        metrics.contains("trustweave_sds_nacks_total{protocol=\"sotw\"} 1"),
        "{metrics}"
    );
    let rotated = w.agent.rotate_now();
    let second = stream.next().await;
    assert_eq!(serial(&second.resources[0]), rotated.serial_hex);
    assert_ne!(second.version_info, first.version_info);
    assert_ne!(second.nonce, first.nonce);
    w.server.shutdown().await;
}

#[tokio::test]
async fn stale_nonce_is_ignored_ack_is_silent_and_new_names_are_sent_at_once() {
    let w = world().await;
    let mut stream = SotwClient::open(&w.socket).await;
    stream.request(&["default"], None).await;
    stream.next().await;
    // A request answering some other response: ignored, even though it adds a name.
    stream
        .send(DiscoveryRequest {
            resource_names: vec!["default".into(), "ROOTCA".into()],
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: "not-the-latest".into(),
            ..Default::default()
        })
        .await;
    stream.expect_nothing(QUIET).await;
    // ACK with unchanged names: nothing.
    stream.request(&["default"], None).await;
    stream.expect_nothing(QUIET).await;
    // A newly added name on a current request: sent at once.
    stream.request(&["default", "ROOTCA"], None).await;
    let response = stream.next().await;
    let mut names = names_of(&response);
    names.sort();
    assert_eq!(names, vec!["ROOTCA", "default"]);
    w.server.shutdown().await;
}

#[tokio::test]
async fn unavailable_name_is_held_open_and_answered_when_it_appears() {
    let w = world().await;
    let mut stream = SotwClient::open(&w.socket).await;
    let azure_name = format!("spiffe://{AZURE}");
    stream.request(&[&azure_name], None).await;
    stream.expect_nothing(QUIET).await;
    w.agent.federate_with(&w.azure);
    let response = stream.next().await;
    assert_eq!(names_of(&response), vec![azure_name.clone()]);
    assert_eq!(trust_domains(&response.resources[0]), vec![AZURE]);
    w.server.shutdown().await;
}

#[tokio::test]
async fn pushes_only_when_requested_bytes_change_with_fresh_nonce_and_version() {
    let w = world().await;
    let mut svid = SotwClient::open(&w.socket).await;
    svid.request(&["default"], None).await;
    let first = svid.next().await;
    svid.request(&["default"], None).await;
    let mut trust = SotwClient::open(&w.socket).await;
    trust.request(&["ROOTCA"], None).await;
    let before = trust.next().await;
    trust.request(&["ROOTCA"], None).await;

    // A trust change reaches ROOTCA only.
    w.agent.federate_with(&w.azure);
    let after = trust.next().await;
    assert_eq!(trust_domains(&after.resources[0]), vec![AWS, AZURE, GCP]);
    assert_ne!(after.version_info, before.version_info);
    assert_ne!(after.nonce, before.nonce);
    svid.expect_nothing(QUIET).await;

    // Rotation reaches default only.
    trust.request(&["ROOTCA"], None).await;
    let rotated = w.agent.rotate_now();
    let second = svid.next().await;
    assert_eq!(serial(&second.resources[0]), rotated.serial_hex);
    assert_ne!(second.version_info, first.version_info);
    assert_ne!(second.nonce, first.nonce);
    trust.expect_nothing(QUIET).await;
    w.server.shutdown().await;
}

#[tokio::test]
async fn removed_federation_leaves_rootca_and_is_a_removed_resource_on_delta() {
    let w = world().await;
    let gcp_name = format!("spiffe://{GCP}");
    let mut sotw = SotwClient::open(&w.socket).await;
    sotw.request(&["ROOTCA"], None).await;
    assert_eq!(
        trust_domains(&sotw.next().await.resources[0]),
        vec![AWS, GCP]
    );
    sotw.request(&["ROOTCA"], None).await;

    let mut delta = DeltaClient::open(&w.socket).await;
    delta.change(&["ROOTCA", &gcp_name, "default"], &[]).await;
    let initial = delta.next().await;
    let mut names: Vec<String> = initial.resources.iter().map(|r| r.name.clone()).collect();
    names.sort();
    let mut expected = vec!["ROOTCA".to_string(), "default".into(), gcp_name.clone()];
    expected.sort();
    assert_eq!(names, expected);
    assert!(initial.resources.iter().all(|r| !r.version.is_empty()));
    delta.change(&[], &[]).await;

    w.agent.remove_federation(GCP);
    assert_eq!(trust_domains(&sotw.next().await.resources[0]), vec![AWS]);
    let update = delta.next().await;
    assert_eq!(update.removed_resources, vec![gcp_name.clone()]);
    let changed: Vec<&str> = update.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        changed,
        vec!["ROOTCA"],
        "default did not change and is not resent"
    );
    assert_eq!(
        trust_domains(update.resources[0].resource.as_ref().expect("resource")),
        vec![AWS]
    );
    w.server.shutdown().await;
}

#[tokio::test]
async fn delta_honours_initial_versions_and_nacks() {
    let w = world().await;
    let mut first = DeltaClient::open(&w.socket).await;
    first.change(&["default", "ROOTCA"], &[]).await;
    let initial = first.next().await;
    let versions: std::collections::HashMap<String, String> = initial
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();

    // A reconnecting Envoy that already holds ROOTCA gets only default.
    let mut again = DeltaClient::open(&w.socket).await;
    again
        .send(DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: vec!["default".into(), "ROOTCA".into()],
            initial_resource_versions: [("ROOTCA".to_string(), versions["ROOTCA"].clone())]
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .await;
    let response = again.next().await;
    let names: Vec<&str> = response.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["default"]);

    // NACK: counted, not resent; the next rotation is pushed.
    again
        .send(DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(envoy_types::pb::google::rpc::Status {
                code: 3,
                message: "bad key".into(),
                details: Vec::new(),
            }),
            ..Default::default()
        })
        .await;
    let rotated = w.agent.rotate_now();
    let pushed = again.next().await;
    assert_eq!(pushed.resources.len(), 1);
    assert_eq!(
        serial(pushed.resources[0].resource.as_ref().expect("resource")),
        rotated.serial_hex
    );
    let metrics = w.server.metrics().encode();
    assert!(
        metrics.contains("trustweave_sds_nacks_total{protocol=\"delta\"} 1"),
        "{metrics}"
    );
    w.server.shutdown().await;
}

#[tokio::test]
async fn fetch_is_unary_with_empty_version_and_nonce() {
    let w = world().await;
    let mut client = sds::client(&w.socket).await;
    let response = client
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec!["default".into()],
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .expect("fetch")
        .into_inner();
    assert_eq!(response.version_info, "");
    assert_eq!(response.nonce, "");
    assert_eq!(response.type_url, SECRET_TYPE_URL);
    assert_eq!(names_of(&response), vec!["default"]);

    let missing = client
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec!["spiffe://nowhere.example".into()],
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown name");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let wrong_type = client
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec!["default".into()],
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            ..Default::default()
        })
        .await
        .expect_err("wrong type");
    assert_eq!(wrong_type.code(), tonic::Code::InvalidArgument);
    w.server.shutdown().await;
}

#[tokio::test]
async fn gcp_bundle_is_served_under_its_trust_domain_id() {
    let w = world().await;
    let reports = trustweave_sds::inspect::inspect(&w.socket, &[format!("spiffe://{GCP}")])
        .await
        .expect("inspect");
    assert_eq!(reports[0].trust_domains[0].trust_domain, GCP);
    assert_eq!(reports[0].trust_domains[0].ca_count, 1);
    let fingerprint = hex::encode(sha2::Sha256::digest(w.gcp.root_der()));
    assert_eq!(reports[0].trust_domains[0].sha256, vec![fingerprint]);
    w.server.shutdown().await;
}
