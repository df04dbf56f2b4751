//! `identity::resolve` and `evaluate_http` with real certificates, as Envoy
//! hands them over: the connection's digest, and XFCC text a client can shape.

use rcgen::{CertificateParams, KeyPair, SanType};
use trustweave_filter::engine::annotate::NodeFacts;
use trustweave_filter::engine::certificate::{sha256_hex, url_encode_pem, CertCache};
use trustweave_filter::engine::config::{self, Config};
use trustweave_filter::engine::decide::Reason;
use trustweave_filter::engine::headers::Headers;
use trustweave_filter::engine::identity::{resolve, EnvoyCertificates, PeerFacts, Resolved};
use trustweave_filter::engine::{evaluate_http, HttpInput, XFCC};

const PEER: &str = "spiffe://gcp.company.com/ns/billing/sa/invoicer";
const ORCHESTRATOR: &str = "spiffe://aws.company.com/ns/ops/sa/orchestrator";
const GATEWAY: &str = "spiffe://gcp.company.com/ns/istio-system/sa/istio-eastwestgateway";
const LOCAL: &str = "spiffe://gcp.company.com/region/gcp-us-central1/worker-1";

/// A certificate with exactly these URI SANs: (PEM, digest).
fn cert(uris: &[&str]) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("ASCII")))
        .collect();
    let cert = params.self_signed(&key).expect("certificate");
    (cert.pem(), sha256_hex(cert.der()))
}

/// The element Envoy appends for a peer (`set_current_client_cert_details` uri + cert).
fn element(by: &str, pem: &str, digest: &str, uris: &[&str]) -> String {
    let mut e = format!("By={by};Hash={digest};Cert=\"{}\"", url_encode_pem(pem));
    for uri in uris {
        e.push_str(&format!(";URI={uri}"));
    }
    e
}

fn config(json: &str) -> Config {
    config::parse(json.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

fn resolve_with(config: &Config, digest: &str, xfcc: &str) -> Resolved {
    let mut cache = CertCache::default();
    resolve(
        config,
        &mut EnvoyCertificates {
            peer: PeerFacts::Digest(Some(digest.to_string())),
            cache: &mut cache,
        },
        &Headers::from_text(&[(XFCC, xfcc)]),
    )
}

#[test]
fn the_peer_is_its_certificate_wherever_envoy_wrote_it() {
    let c = config("{}");
    let (pem, digest) = cert(&[PEER]);
    let own = element(LOCAL, &pem, &digest, &[PEER]);
    for client_text in [
        String::new(),
        format!("URI={ORCHESTRATOR};x=\"") + ",",
        format!("URI={ORCHESTRATOR},"),
        "\"\"\",;;==,".to_string(),
    ] {
        let r = resolve_with(&c, &digest, &format!("{client_text}{own}"));
        assert_eq!(
            r.caller.as_ref().map(|c| c.as_str()),
            Some(PEER),
            "{client_text:?}"
        );
    }
}

#[test]
fn ambiguous_or_invalid_certificates_have_no_identity() {
    let c = config("{}");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![PEER.into(), ORCHESTRATOR.into()], "2 URI SANs"),
        (
            vec![format!("{PEER},URI={ORCHESTRATOR}")],
            "not a SPIFFE ID",
        ),
        (vec!["spiffe://gcp.company.com".into()], "not a workload"),
        (vec![], "0 URI SANs"),
    ];
    for (uris, why) in cases {
        let uris: Vec<&str> = uris.iter().map(String::as_str).collect();
        let (pem, digest) = cert(&uris);
        // The client even prepends a text element naming one clean URI SAN.
        let xfcc = format!("URI={PEER};x=\",{}", element(LOCAL, &pem, &digest, &uris));
        let r = resolve_with(&c, &digest, &xfcc);
        assert_eq!(r.caller, None, "{uris:?}");
        let reason = r.no_identity.expect("reason");
        assert!(reason.contains(why), "{reason}");
    }
}

#[test]
fn a_certificate_that_cannot_be_located_is_no_identity() {
    let c = config("{}");
    let (pem, digest) = cert(&[PEER]);
    let (_, other_digest) = cert(&[PEER]);
    // A copy of a real certificate under another connection's digest proves nothing.
    let r = resolve_with(&c, &other_digest, &element(LOCAL, &pem, &digest, &[PEER]));
    assert_eq!(r.caller, None);
    assert!(r
        .no_identity
        .expect("reason")
        .contains("matching the peer's digest"));
    let mut cache = CertCache::default();
    let none = resolve(
        &c,
        &mut EnvoyCertificates {
            peer: PeerFacts::Digest(None),
            cache: &mut cache,
        },
        &Headers::default(),
    );
    assert_eq!(none.no_identity.as_deref(), Some("no peer certificate"));
}

#[test]
fn a_trusted_gateway_vouches_for_the_caller_it_forwarded_never_for_itself() {
    let c = config(&format!(r#"{{"trusted_gateways":["{GATEWAY}"]}}"#));
    let (caller_pem, caller_digest) = cert(&[ORCHESTRATOR]);
    let (gw_pem, gw_digest) = cert(&[GATEWAY]);
    let forwarded = element(GATEWAY, &caller_pem, &caller_digest, &[ORCHESTRATOR]);
    let own = element(LOCAL, &gw_pem, &gw_digest, &[GATEWAY]);
    let r = resolve_with(&c, &gw_digest, &format!("{forwarded},{own}"));
    assert_eq!(r.caller.as_ref().map(|c| c.as_str()), Some(ORCHESTRATOR));
    assert!(r.via_gateway);
    // Nothing forwarded: the first element is Envoy's own for the gateway.
    let r = resolve_with(&c, &gw_digest, &own);
    assert_eq!(r.caller, None);
    assert_eq!(
        r.no_identity.as_deref(),
        Some("trusted gateway forwarded no caller")
    );
    // A forwarded certificate that does not match its Hash is refused.
    let (_, wrong) = cert(&[ORCHESTRATOR]);
    let lying = element(GATEWAY, &caller_pem, &wrong, &[ORCHESTRATOR]);
    let r = resolve_with(&c, &gw_digest, &format!("{lying},{own}"));
    assert_eq!(r.caller, None);
    // A forwarded certificate with two URI SANs is no identity.
    let (two_pem, two_digest) = cert(&[ORCHESTRATOR, PEER]);
    let two = element(GATEWAY, &two_pem, &two_digest, &[ORCHESTRATOR, PEER]);
    let r = resolve_with(&c, &gw_digest, &format!("{two},{own}"));
    assert_eq!(r.caller, None);
}

#[test]
fn evaluate_http_strips_only_present_spoofable_headers_and_annotates() {
    let c = config(
        r#"{"policies":[{"name":"same-td","action":"ALLOW","rules":[{"from":{"same_trust_domain":true}}]}],
            "local":{"cloud":"gcp","region":"us-central1","trust_domain":"gcp.company.com"}}"#,
    );
    let (pem, digest) = cert(&[PEER]);
    let xfcc = element(LOCAL, &pem, &digest, &[PEER]);
    let headers = Headers::new(vec![
        (":method".into(), b"GET".to_vec()),
        (":path".into(), b"/invoices?x=1".to_vec()),
        (":authority".into(), b"inventory".to_vec()),
        (
            "x-trustweave-caller".into(),
            ORCHESTRATOR.as_bytes().to_vec(),
        ),
        (XFCC.into(), xfcc.clone().into_bytes()),
        ("x-junk".into(), vec![0xFF]),
    ]);
    let mut cache = CertCache::default();
    let outcome = evaluate_http(
        &c,
        HttpInput {
            headers,
            node: NodeFacts::default(),
            ..HttpInput::default()
        },
        &mut EnvoyCertificates {
            peer: PeerFacts::Digest(Some(digest.clone())),
            cache: &mut cache,
        },
    );
    assert!(outcome.decision.allowed, "{:?}", outcome.decision);
    assert_eq!(outcome.decision.reason, Reason::AllowedByPolicy);
    assert_eq!(
        outcome.remove,
        vec!["x-trustweave-caller".to_string(), XFCC.to_string()]
    );
    let set: Vec<(&str, &str)> = outcome
        .set
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert!(set.contains(&("x-trustweave-caller", PEER)), "{set:?}");
    assert!(set.contains(&("x-trustweave-region", "us-central1")));
    assert!(set.contains(&(
        "baggage",
        "cloud.provider=gcp,cloud.region=us-central1,trustweave.hops=gcp:us-central1"
    )));
    assert_eq!(cache.parsed, 1);
    assert_eq!(
        cache.len(),
        1,
        "the next request of this connection skips the parse"
    );
}

#[cfg(feature = "rego")]
#[test]
fn rego_dry_run_reports_and_never_enforces() {
    let c = config(
        r#"{"rego":{"dry_run":true,"modules":{"a.rego":"package a\nimport rego.v1\ndefault allow := false\nallow if input.action == \"ok\"\n"},"query":"data.a.allow"}}"#,
    );
    let evaluate = |action: &str| {
        evaluate_http(
            &c,
            HttpInput {
                headers: Headers::from_text(&[(":path", "/"), ("x-trustweave-action", action)]),
                ..HttpInput::default()
            },
            &mut trustweave_filter::engine::identity::StatedCertificates::default(),
        )
        .decision
    };
    use trustweave_filter::engine::decide::Shadow;
    let denied = evaluate("nope");
    assert!(denied.allowed, "dry run never enforces");
    assert_eq!(
        denied.dry_run,
        vec![("rego".to_string(), Shadow::WouldDeny)]
    );
    assert_eq!(
        evaluate("ok").dry_run,
        vec![("rego".to_string(), Shadow::WouldAllow)]
    );
}
