//! `identity::resolve` and `evaluate_http` with real certificates, as Envoy
//! hands them over: the connection's digest, and XFCC text a client can shape.

use rcgen::{CertificateParams, KeyPair, SanType};
use trustweave_engine::annotate::NodeFacts;
use trustweave_engine::certificate::{sha256_hex, url_encode_pem, CertCache};
use trustweave_engine::config::{self, Config};
use trustweave_engine::decide::Reason;
use trustweave_engine::headers::Headers;
use trustweave_engine::identity::{resolve, EnvoyCertificates, PeerFacts, Resolved};
use trustweave_engine::{evaluate_http, HttpInput, XFCC};

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
fn a_certificate_that_cannot_be_located_is_unverifiable() {
    let c = config("{}");
    let (pem, digest) = cert(&[PEER]);
    let (_, other_digest) = cert(&[PEER]);
    // A copy of a real certificate under another connection's digest proves nothing.
    let r = resolve_with(&c, &other_digest, &element(LOCAL, &pem, &digest, &[PEER]));
    assert_eq!(r.caller, None);
    assert!(r
        .unverifiable
        .expect("unverifiable")
        .contains("no element of Envoy's for the peer's digest"));
    // Envoy's element without its Cert (the HCM lacks `cert` details).
    let r = resolve_with(&c, &digest, &format!("By={LOCAL};Hash={digest};URI={PEER}"));
    assert!(r.unverifiable.expect("unverifiable").contains("no Cert"));
    // The right Hash with another certificate's Cert.
    let (other_pem, _) = cert(&[PEER]);
    let r = resolve_with(&c, &digest, &element(LOCAL, &other_pem, &digest, &[PEER]));
    assert!(r
        .unverifiable
        .expect("unverifiable")
        .contains("does not match"));
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
    // Nothing forwarded: only Envoy's own element for the gateway.
    let r = resolve_with(&c, &gw_digest, &own);
    assert_eq!(r.caller, None);
    assert_eq!(
        r.forwarded_refused.as_deref(),
        Some("the trusted gateway forwarded no caller")
    );
    // A forwarded certificate that does not match its Hash is refused.
    let (_, wrong) = cert(&[ORCHESTRATOR]);
    let lying = element(GATEWAY, &caller_pem, &wrong, &[ORCHESTRATOR]);
    let r = resolve_with(&c, &gw_digest, &format!("{lying},{own}"));
    assert_eq!(r.caller, None);
    assert!(r.forwarded_refused.is_some());
    // A gateway with APPEND_FORWARD: the client's forged element comes first,
    // the gateway's own after it. Not one element: no forwarded caller.
    let (forged_pem, forged_digest) = cert(&[ORCHESTRATOR]);
    let (client_pem, client_digest) = cert(&[PEER]);
    let forged = element(GATEWAY, &forged_pem, &forged_digest, &[ORCHESTRATOR]);
    let appended = element(GATEWAY, &client_pem, &client_digest, &[PEER]);
    let r = resolve_with(&c, &gw_digest, &format!("{forged},{appended},{own}"));
    assert_eq!(r.caller, None);
    assert!(r
        .forwarded_refused
        .expect("refused")
        .contains("not one element"));
    // The element must be By= the gateway itself.
    let by_other = element(PEER, &caller_pem, &caller_digest, &[ORCHESTRATOR]);
    let r = resolve_with(&c, &gw_digest, &format!("{by_other},{own}"));
    assert_eq!(r.caller, None);
    // Forwarded once (cached), the shape is still checked on the next request.
    let mut cache = CertCache::default();
    let mut certs = EnvoyCertificates {
        peer: PeerFacts::Digest(Some(gw_digest.clone())),
        cache: &mut cache,
    };
    let first = resolve(
        &c,
        &mut certs,
        &Headers::from_text(&[(XFCC, &format!("{forwarded},{own}"))]),
    );
    assert_eq!(
        first.caller.as_ref().map(|c| c.as_str()),
        Some(ORCHESTRATOR)
    );
    let tail = format!("{forwarded};URI=spiffe://x/y,{own}");
    let second = resolve(&c, &mut certs, &Headers::from_text(&[(XFCC, &tail)]));
    assert_eq!(second.caller, None);
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
            &mut trustweave_engine::identity::StatedCertificates::default(),
        )
        .decision
    };
    use trustweave_engine::decide::Shadow;
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

fn evaluate(
    c: &Config,
    headers: Headers,
    digest: Option<&str>,
    unreadable: Option<&str>,
) -> trustweave_engine::HttpOutcome {
    let mut cache = CertCache::default();
    evaluate_http(
        c,
        HttpInput {
            headers,
            unreadable: unreadable.map(str::to_string),
            ..HttpInput::default()
        },
        &mut EnvoyCertificates {
            peer: PeerFacts::Digest(digest.map(str::to_string)),
            cache: &mut cache,
        },
    )
}

#[test]
fn refusals_come_before_any_policy() {
    let allow_all = config(r#"{"default_action":"ALLOW"}"#);
    let (pem, digest) = cert(&[PEER]);
    let own = element(LOCAL, &pem, &digest, &[PEER]);
    let base = |extra: &[(&str, &str)]| {
        let mut h = vec![(":path", "/"), (":method", "GET"), (":authority", "shop")];
        h.extend_from_slice(extra);
        Headers::from_text(&h)
    };
    let ok = evaluate(&allow_all, base(&[(XFCC, &own)]), Some(&digest), None);
    assert!(ok.decision.allowed, "{:?}", ok.decision);
    // A certificate presented and not located.
    let hidden = evaluate(&allow_all, base(&[(XFCC, "Cert=\"")]), Some(&digest), None);
    assert!(matches!(
        hidden.decision.reason,
        Reason::UnverifiablePeer(_)
    ));
    assert!(hidden.unverifiable.is_some());
    // A host call that failed.
    let failed = evaluate(
        &allow_all,
        base(&[(XFCC, &own)]),
        Some(&digest),
        Some("request headers"),
    );
    assert!(matches!(failed.decision.reason, Reason::Unreadable(_)));
    // Two hosts, or one with a comma.
    let same = evaluate(
        &allow_all,
        base(&[("host", "SHOP"), (XFCC, &own)]),
        Some(&digest),
        None,
    );
    assert!(same.decision.allowed, "the same host twice is one host");
    for extra in [vec![("host", "x")], vec![(":authority", "b")]] {
        let mut all = extra.clone();
        all.push((XFCC, &own));
        let two = evaluate(&allow_all, base(&all), Some(&digest), None);
        assert_eq!(two.decision.reason, Reason::AmbiguousHost, "{extra:?}");
    }
    let merged = Headers::from_text(&[
        (":path", "/"),
        (":authority", "admin.example.com,x"),
        (XFCC, &own),
    ]);
    assert_eq!(
        evaluate(&allow_all, merged, Some(&digest), None)
            .decision
            .reason,
        Reason::AmbiguousHost
    );
    // A denial still removes a claimed caller (the access log reads the request after us).
    let deny = config(
        r#"{"policies":[{"name":"none","action":"ALLOW","rules":[{"to":{"paths":["/never"]}}]}]}"#,
    );
    let denied = evaluate(
        &deny,
        base(&[
            (XFCC, &own),
            ("x-trustweave-caller", ORCHESTRATOR),
            ("x_trustweave_caller", ORCHESTRATOR),
        ]),
        Some(&digest),
        None,
    );
    assert!(!denied.decision.allowed);
    assert!(denied.remove.contains(&"x-trustweave-caller".to_string()));
    assert!(denied.remove.contains(&"x_trustweave_caller".to_string()));
    assert!(denied
        .set
        .contains(&("x-trustweave-caller".to_string(), PEER.to_string())));
}

#[test]
fn a_duplicate_key_names_itself() {
    let errors = config::parse(
        br#"{"policies":[{"name":"a","action":"DENY","rules":[{}],"action":"ALLOW"}]}"#,
    )
    .expect_err("duplicate");
    assert!(
        errors
            .to_string()
            .contains("duplicate key `policies[0].action`"),
        "{errors}"
    );
    assert!(config::parse(br#"{"local":{"cloud":"a"},"local":{}}"#).is_err());
    assert!(config::parse(br#"{"policies":[{"name":"a","action":"DENY","rules":[{}]},{"name":"b","action":"DENY","rules":[{}]}]}"#).is_ok());
}
