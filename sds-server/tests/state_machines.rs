//! The SotW and Delta state machines driven directly (no gRPC, no waiting):
//! each request and each snapshot yields exactly the response asserted here.
//! Property tests: every response carries exactly the requested names that
//! exist; versions change iff content changes; arbitrary request sequences
//! never panic.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status;
use proptest::prelude::*;
use trustweave_sds::render::{Rendered, SecretNames, TrustFormat};
use trustweave_sds::sds::delta::DeltaStream;
use trustweave_sds::sds::sotw::SotwStream;
use trustweave_sds::sds::{NonceSource, RequestVerdict};
use trustweave_sds::snapshot::{CertFacts, IdentitySnapshot, PrivateKeyDer, Svid, TrustBundle};

const ID: &str = "spiffe://gcp.company.com/ns/a/sa/w";
const OTHER: &str = "spiffe://gcp.company.com/ns/a/sa/second";

fn svid(id: &str, serial: u8) -> Svid {
    let now = SystemTime::now();
    Svid {
        spiffe_id: id.into(),
        chain_der: vec![vec![serial, 1, 2, 3]],
        private_key: PrivateKeyDer::new(vec![serial, 9, 9]),
        leaf: CertFacts {
            serial_hex: format!("{serial:02x}"),
            not_before: now,
            not_after: now + Duration::from_secs(3600),
        },
    }
}

/// A snapshot: SVID serial `serial` (plus a second SVID), bundles of `domains`.
fn snapshot(serial: u8, domains: &[&str]) -> IdentitySnapshot {
    let first = svid(ID, serial);
    IdentitySnapshot {
        default: Some(first.clone()),
        svids: vec![first, svid(OTHER, serial)],
        own_trust_domain: Some("gcp.company.com".into()),
        bundles: domains
            .iter()
            .map(|td| {
                (
                    td.to_string(),
                    TrustBundle {
                        roots_der: vec![td.as_bytes().to_vec()],
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
    }
}

fn rendered(serial: u8, domains: &[&str]) -> Rendered {
    Rendered::new(&snapshot(serial, domains), &SecretNames::default())
}

fn sotw_request(names: &[&str], nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn nack(names: &[&str], nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(Status {
            message: "rejected".into(),
            ..Default::default()
        }),
        ..sotw_request(names, nonce)
    }
}

fn names_of(response: &DiscoveryResponse) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|any| {
            <envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret as prost::Message>::decode(
                any.value.as_slice(),
            )
            .expect("secret")
            .name
        })
        .collect()
}

#[test]
fn sotw_answers_exactly_what_is_asked_once_per_change() {
    let nonces = NonceSource::default();
    let mut s = SotwStream::new(TrustFormat::Spiffe);
    let v1 = rendered(1, &["gcp.company.com"]);
    assert!(
        s.response(&v1, &nonces).is_none(),
        "nothing before a request"
    );
    assert_eq!(
        s.on_request(&sotw_request(&["default"], "")),
        RequestVerdict::Apply
    );
    let first = s.response(&v1, &nonces).expect("first answer");
    assert_eq!(names_of(&first), vec!["default"]);
    // The ACK changes nothing: no response.
    assert_eq!(
        s.on_request(&sotw_request(&["default"], &first.nonce)),
        RequestVerdict::Apply
    );
    assert!(s.response(&v1, &nonces).is_none());
    // A bundle change does not concern `default`.
    assert!(s
        .response(
            &rendered(1, &["gcp.company.com", "aws.company.com"]),
            &nonces
        )
        .is_none());
    // A rotation does, once.
    let v2 = rendered(2, &["gcp.company.com"]);
    let second = s.response(&v2, &nonces).expect("rotation");
    assert_ne!(second.version_info, first.version_info);
    assert!(s.response(&v2, &nonces).is_none());
    // A request answering the older nonce is stale.
    assert_eq!(
        s.on_request(&sotw_request(&["default", "ROOTCA"], &first.nonce)),
        RequestVerdict::Stale
    );
    // A NACK of the latest is reported; the same content is not resent.
    assert!(matches!(
        s.on_request(&nack(&["default"], &second.nonce)),
        RequestVerdict::Nack { .. }
    ));
    assert!(s.response(&v2, &nonces).is_none());
    // A name not yet available is held, then answered when it appears.
    assert_eq!(
        s.on_request(&sotw_request(
            &["default", "spiffe://aws.company.com"],
            &second.nonce
        )),
        RequestVerdict::Apply
    );
    let held = s.response(&v2, &nonces);
    assert!(held.is_none(), "default unchanged, the other name absent");
    let appears = s
        .response(
            &rendered(2, &["gcp.company.com", "aws.company.com"]),
            &nonces,
        )
        .expect("answered when it appears");
    assert_eq!(
        names_of(&appears),
        vec!["default", "spiffe://aws.company.com"]
    );
}

#[test]
fn sotw_wildcard_unsubscribe_and_multi_svid_contexts() {
    let nonces = NonceSource::default();
    let mut s = SotwStream::new(TrustFormat::Spiffe);
    s.on_request(&sotw_request(&[], ""));
    let all = s
        .response(&rendered(1, &["gcp.company.com"]), &nonces)
        .expect("wildcard");
    assert_eq!(
        names_of(&all),
        vec![
            "ALL",
            "ROOTCA",
            "default",
            "spiffe://gcp.company.com",
            OTHER,
            ID
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
    );
    // A later empty request unsubscribes: nothing more is sent.
    s.on_request(&sotw_request(&[], &all.nonce));
    assert!(s
        .response(&rendered(2, &["gcp.company.com"]), &nonces)
        .is_none());
    // Re-subscribing is answered at once.
    s.on_request(&sotw_request(&[OTHER], &all.nonce));
    let other = s
        .response(&rendered(2, &["gcp.company.com"]), &nonces)
        .expect("named SVID");
    assert_eq!(names_of(&other), vec![OTHER]);
}

#[test]
fn delta_subscriptions_apply_even_in_a_stale_nack() {
    let nonces = NonceSource::default();
    let mut d = DeltaStream::new(TrustFormat::Spiffe);
    let v1 = rendered(1, &["gcp.company.com"]);
    d.on_request(&DeltaDiscoveryRequest {
        resource_names_subscribe: vec!["default".into()],
        ..Default::default()
    });
    let first = d.response(&v1, &nonces).expect("first");
    let second_nonce = {
        let v2 = rendered(2, &["gcp.company.com"]);
        d.response(&v2, &nonces).expect("rotation").nonce
    };
    assert_ne!(first.nonce, second_nonce);
    // A NACK of the *older* response that also subscribes to ROOTCA.
    let verdict = d.on_request(&DeltaDiscoveryRequest {
        resource_names_subscribe: vec!["ROOTCA".into()],
        response_nonce: first.nonce.clone(),
        error_detail: Some(Status::default()),
        ..Default::default()
    });
    assert_eq!(
        verdict,
        RequestVerdict::Apply,
        "the subscription is not dropped with the stale NACK"
    );
    let answer = d
        .response(&rendered(2, &["gcp.company.com"]), &nonces)
        .expect("ROOTCA now");
    let names: Vec<&str> = answer.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["ROOTCA"]);
    // A stale NACK with nothing new is ignored.
    let verdict = d.on_request(&DeltaDiscoveryRequest {
        response_nonce: first.nonce.clone(),
        error_detail: Some(Status::default()),
        ..Default::default()
    });
    assert_eq!(verdict, RequestVerdict::Stale);
}

#[test]
fn delta_reconnect_with_initial_versions_and_removals() {
    let nonces = NonceSource::default();
    let v = rendered(1, &["gcp.company.com", "aws.company.com"]);
    let mut d = DeltaStream::new(TrustFormat::Spiffe);
    d.on_request(&DeltaDiscoveryRequest {
        resource_names_subscribe: vec!["default".into(), "spiffe://aws.company.com".into()],
        ..Default::default()
    });
    let first = d.response(&v, &nonces).expect("first");
    let versions: std::collections::HashMap<String, String> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    // A reconnecting Envoy reports what it holds: nothing is resent.
    let mut again = DeltaStream::new(TrustFormat::Spiffe);
    again.on_request(&DeltaDiscoveryRequest {
        resource_names_subscribe: vec!["default".into(), "spiffe://aws.company.com".into()],
        initial_resource_versions: versions,
        ..Default::default()
    });
    assert!(again.response(&v, &nonces).is_none());
    // The federation goes away: removed.
    let gone = again
        .response(&rendered(1, &["gcp.company.com"]), &nonces)
        .expect("removal");
    assert_eq!(gone.removed_resources, vec!["spiffe://aws.company.com"]);
    assert!(gone.resources.is_empty());
}

#[test]
fn pinned_default_is_withdrawn_at_expiry_never_replaced() {
    let now = SystemTime::now();
    let mut first = svid(ID, 1);
    first.leaf.not_after = now + Duration::from_secs(10);
    let second = svid(OTHER, 1);
    let s = IdentitySnapshot {
        default: Some(first.clone()),
        svids: vec![first, second],
        own_trust_domain: Some("gcp.company.com".into()),
        bundles: BTreeMap::new(),
    };
    assert_eq!(s.default_svid().map(|s| s.spiffe_id.as_str()), Some(ID));
    let later = s.without_expired(now + Duration::from_secs(11));
    assert!(later.default_svid().is_none(), "never another SPIFFE ID");
    assert_eq!(
        later.svids.len(),
        1,
        "the second SVID is still served by its name"
    );
    let r = Rendered::new(&later, &SecretNames::default());
    assert!(r.get("default", TrustFormat::Spiffe).is_none());
    assert!(r.get(OTHER, TrustFormat::Spiffe).is_some());
}

/// One step of a generated session.
#[derive(Clone, Debug)]
enum Step {
    Request(Vec<&'static str>, bool, bool),
    Snapshot(u8, bool),
}

fn step() -> impl Strategy<Value = Step> {
    let name = prop_oneof![
        Just("default"),
        Just("ROOTCA"),
        Just("ALL"),
        Just("spiffe://aws.company.com"),
        Just(ID),
        Just("spiffe://absent.example"),
    ];
    prop_oneof![
        (
            prop::collection::vec(name, 0..4),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(n, latest, nack)| Step::Request(n, latest, nack)),
        (0u8..3, any::<bool>()).prop_map(|(serial, aws)| Step::Snapshot(serial, aws)),
    ]
}

proptest! {
    #[test]
    fn sotw_responses_carry_exactly_the_requested_names_that_exist(steps in prop::collection::vec(step(), 1..25)) {
        // The subscription model: the first request with no names is a wildcard,
        // later requests replace the names; stale requests change nothing.
        enum Model { Pending, Wildcard, Names(Vec<&'static str>) }
        let nonces = NonceSource::default();
        let mut s = SotwStream::new(TrustFormat::Spiffe);
        let mut current = rendered(0, &["gcp.company.com"]);
        let mut last: Option<DiscoveryResponse> = None;
        let mut model = Model::Pending;
        for step in steps {
            match step {
                Step::Request(names, latest, is_nack) => {
                    let nonce = match (&last, latest) {
                        (Some(r), true) => r.nonce.clone(),
                        _ => "0".into(),
                    };
                    let request = if is_nack { nack(&names, &nonce) } else { sotw_request(&names, &nonce) };
                    if s.on_request(&request) != RequestVerdict::Stale {
                        model = match (&model, names.is_empty()) {
                            (Model::Pending, true) => Model::Wildcard,
                            _ => Model::Names(names.clone()),
                        };
                    }
                }
                Step::Snapshot(serial, aws) => {
                    let domains: &[&str] = if aws { &["gcp.company.com", "aws.company.com"] } else { &["gcp.company.com"] };
                    current = rendered(serial, domains);
                }
            }
            if let Some(response) = s.response(&current, &nonces) {
                let mut expected: Vec<String> = match &model {
                    Model::Pending => Vec::new(),
                    Model::Wildcard => current.available().to_vec(),
                    Model::Names(names) => names
                        .iter()
                        .filter(|n| current.get(n, TrustFormat::Spiffe).is_some())
                        .map(|n| n.to_string())
                        .collect(),
                };
                expected.sort();
                expected.dedup();
                let mut got = names_of(&response);
                got.sort();
                prop_assert_eq!(got, expected);
                if let Some(previous) = &last {
                    prop_assert_ne!(&previous.nonce, &response.nonce);
                }
                last = Some(response);
            }
        }
    }

    #[test]
    fn versions_change_iff_content_changes(a in 0u8..4, b in 0u8..4, aws_a: bool, aws_b: bool) {
        let domains = |aws: bool| if aws { vec!["gcp.company.com", "aws.company.com"] } else { vec!["gcp.company.com"] };
        let (ra, rb) = (rendered(a, &domains(aws_a)), rendered(b, &domains(aws_b)));
        for name in ["default", "ROOTCA", ID] {
            let (va, vb) = (ra.get(name, TrustFormat::Spiffe), rb.get(name, TrustFormat::Spiffe));
            if let (Some(va), Some(vb)) = (va, vb) {
                prop_assert_eq!(va.version == vb.version, va.any.value == vb.any.value, "{}", name);
            }
        }
    }

    #[test]
    fn delta_never_panics_on_arbitrary_requests(
        requests in prop::collection::vec((prop::collection::vec("[a-zA-Z*:/.]{0,12}", 0..4), prop::collection::vec("[a-zA-Z*:/.]{0,12}", 0..3), "[0-9]{0,2}", any::<bool>()), 1..20)
    ) {
        let nonces = NonceSource::default();
        let mut d = DeltaStream::new(TrustFormat::Pem);
        let r = rendered(1, &["gcp.company.com", "aws.company.com"]);
        for (subscribe, unsubscribe, nonce, nack) in requests {
            let _ = d.on_request(&DeltaDiscoveryRequest {
                resource_names_subscribe: subscribe,
                resource_names_unsubscribe: unsubscribe,
                response_nonce: nonce,
                error_detail: nack.then(Status::default),
                ..Default::default()
            });
            if let Some(response) = d.response(&r, &nonces) {
                prop_assert!(response.resources.iter().all(|res| r.get(&res.name, TrustFormat::Pem).is_some()));
            }
        }
    }
}
