//! SPIRE's own SDS (on the agent's Workload API socket) and trustweave-sds
//! (per pod, reading the same agent's Workload API) side by side, asked the
//! same questions by the same client: the comparison table of docs/sds.md
//! ("trustweave-sds and SPIRE's own SDS") is this test's expectations.
//!
//! Real SPIRE 1.13: an aws server federated (bundles exchanged in SPIFFE
//! format, as SPIRE's federation suites bootstrap) with a gcp server; this
//! test process is the workload, registered by its binary's path with
//! `-federatesWith spiffe://gcp.company.com`.

use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{node::UserAgentVersionType, BuildVersion, Node};
use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use trustweave_e2e::real_spire::{SpireAgent, SpireServer};
use trustweave_e2e::sds::{self, report};
use trustweave_e2e::wait::wait_until;
use trustweave_sds::render::SECRET_TYPE_URL;

const AGENT_ID: &str = "spiffe://aws.company.com/agent/node-1";
const WORKLOAD_ID: &str = "spiffe://aws.company.com/ns/orders/sa/api";

/// Envoy 1.40's node, as Envoy sends it (SPIRE picks the SPIFFE validator from its version).
fn envoy_node() -> Node {
    Node {
        id: "sidecar~10.0.0.1~api.orders~orders.svc.cluster.local".into(),
        user_agent_name: "envoy".into(),
        user_agent_version_type: Some(UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
            version: Some(SemanticVersion {
                major_number: 1,
                minor_number: 40,
                patch: 0,
            }),
            metadata: None,
        })),
        ..Default::default()
    }
}

/// What a server answers for one name: the SPIFFE ID of a certificate, the
/// trust domains of a validation context, or how the stream ended.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Svid(String),
    Trusts(Vec<String>),
    Refused(tonic::Code),
    HeldOpen,
}

async fn ask(socket: &Path, name: &str) -> Answer {
    // The first request is queued before the call: grpc-go (SPIRE) sends the
    // response headers only with its first answer.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(DiscoveryRequest {
        node: Some(envoy_node()),
        resource_names: vec![name.to_string()],
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    })
    .await
    .expect("queue");
    let answer = tokio::time::timeout(Duration::from_secs(2), async {
        let mut stream = sds::client(socket)
            .await
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        stream
            .message()
            .await?
            .ok_or_else(|| tonic::Status::ok("stream ended"))
    })
    .await;
    drop(tx);
    match answer {
        Err(_) => Answer::HeldOpen,
        Ok(Err(status)) => Answer::Refused(status.code()),
        Ok(Ok(response)) => {
            let secret = report(&response.resources[0]);
            match secret.certificates.first() {
                Some(cert) => Answer::Svid(cert.spiffe_ids[0].clone()),
                None => Answer::Trusts(
                    secret
                        .trust_domains
                        .into_iter()
                        .map(|td| td.trust_domain)
                        .collect(),
                ),
            }
        }
    }
}

async fn delta_answer(socket: &Path) -> Result<usize, tonic::Code> {
    let mut client = sds::client(socket).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(DeltaDiscoveryRequest {
        node: Some(envoy_node()),
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["default".into()],
        ..Default::default()
    })
    .await
    .expect("queue");
    let opened = tokio::time::timeout(
        Duration::from_secs(10),
        client.delta_secrets(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("DeltaSecrets answers");
    let mut stream = match opened {
        Ok(stream) => stream.into_inner(),
        Err(status) => return Err(status.code()),
    };
    drop(tx);
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(response))) => Ok(response.resources.len()),
        Ok(Err(status)) => Err(status.code()),
        other => panic!("Delta: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trustweave_sds_and_spire_agent_sds_side_by_side() {
    let root = sds::socket_dir();
    let aws = SpireServer::start(&root.path().join("aws"), "aws.company.com")
        .await
        .expect("aws spire-server");
    let gcp = SpireServer::start(&root.path().join("gcp"), "gcp.company.com")
        .await
        .expect("gcp spire-server");
    let gcp_bundle = root.path().join("gcp.spiffe.json");
    std::fs::write(
        &gcp_bundle,
        gcp.cli(&["bundle", "show", "-format", "spiffe"])
            .await
            .expect("gcp bundle"),
    )
    .expect("write bundle");
    aws.cli(&[
        "bundle",
        "set",
        "-format",
        "spiffe",
        "-id",
        "spiffe://gcp.company.com",
        "-path",
        &gcp_bundle.display().to_string(),
    ])
    .await
    .expect("bundle set");
    let agent = SpireAgent::start(&aws, &root.path().join("ag"), AGENT_ID, &[])
        .await
        .expect("spire-agent");
    let exe = std::fs::canonicalize(std::env::current_exe().expect("exe")).expect("exe");
    aws.create_entry(
        AGENT_ID,
        WORKLOAD_ID,
        &[&format!("unix:path:{}", exe.display())],
        &["spiffe://gcp.company.com"],
    )
    .await
    .expect("entry");

    let spire = std::path::PathBuf::from(agent.workload_socket());
    let socket = sds::path_in(&root, "tw.sock");
    let ours = trustweave_sds::start(sds::test_config(
        &socket,
        &format!("unix:{}", agent.workload_socket()),
    ))
    .await
    .expect("trustweave-sds");
    wait_until(
        "both serve the workload's SVID",
        Duration::from_secs(30),
        || async { ours.is_ready() && ask(&spire, "default").await != Answer::HeldOpen },
    )
    .await;

    let both = ["aws.company.com".to_string(), "gcp.company.com".to_string()];
    let aws_only = vec!["aws.company.com".to_string()];
    let gcp_only = vec!["gcp.company.com".to_string()];
    // name: (SPIRE's agent, trustweave-sds) — docs/sds.md's table, row by row.
    let table = [
        (
            "default",
            Answer::Svid(WORKLOAD_ID.into()),
            Answer::Svid(WORKLOAD_ID.into()),
        ),
        (
            "ROOTCA",
            Answer::Trusts(aws_only.clone()),
            Answer::Trusts(both.to_vec()),
        ),
        (
            "ALL",
            Answer::Trusts(both.to_vec()),
            Answer::Trusts(both.to_vec()),
        ),
        (
            "spiffe://gcp.company.com",
            Answer::Trusts(gcp_only.clone()),
            Answer::Trusts(gcp_only.clone()),
        ),
        (
            WORKLOAD_ID,
            Answer::Svid(WORKLOAD_ID.into()),
            Answer::Svid(WORKLOAD_ID.into()),
        ),
        (
            "spiffe://azure.company.com",
            Answer::Refused(tonic::Code::InvalidArgument),
            Answer::HeldOpen,
        ),
    ];
    for (name, spire_answer, our_answer) in table {
        assert_eq!(
            ask(&spire, name).await,
            spire_answer,
            "SPIRE's agent, {name}"
        );
        assert_eq!(
            ask(&socket, name).await,
            our_answer,
            "trustweave-sds, {name}"
        );
    }
    assert_eq!(
        delta_answer(&spire).await,
        Err(tonic::Code::Unimplemented),
        "SPIRE's agent has no DeltaSecrets"
    );
    assert_eq!(delta_answer(&socket).await, Ok(1));
    drop(agent);
}
