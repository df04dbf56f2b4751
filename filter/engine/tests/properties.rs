//! Property tests: the parsers never panic on arbitrary input, and the compiled
//! engine decides exactly as naive reference implementations of the rules.
//! A short run (proptest's default case count) is part of `make test`.

use proptest::prelude::*;
use trustweave_engine::annotate::NodeFacts;
use trustweave_engine::certificate::{
    forwarded_by_gateway, locate_peer, own_element, pem_to_der, percent_decode, CertCache,
};
use trustweave_engine::config;
use trustweave_engine::headers::Headers;
use trustweave_engine::identity::{EnvoyCertificates, PeerFacts, StatedCertificates};
use trustweave_engine::pattern::PatternSet;
use trustweave_engine::spiffe_id::{SpiffeId, MAX_LEN};
use trustweave_engine::{evaluate_http, HttpInput};

/// The SPIFFE ID standard, written as plainly as possible.
fn reference_spiffe_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let (td, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let td_ok = !td.is_empty()
        && td
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c));
    let path_ok = path.is_empty()
        || path[1..].split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        });
    s.len() <= MAX_LEN && td_ok && path_ok
}

/// Istio's string patterns, one at a time.
fn reference_pattern(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

fn id_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "(spiffe://)?[a-zA-Z0-9._%:@-]{0,12}(/[a-zA-Z0-9._%-]{0,6}){0,3}/?",
        any::<String>(),
    ]
}

fn pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_string()),
        "[ab/]{1,4}",
        "[ab/]{1,4}\\*",
        "\\*[ab/]{1,4}",
    ]
}

proptest! {
    #[test]
    fn spiffe_ids_parse_exactly_as_the_standard_says(s in id_like()) {
        let parsed = SpiffeId::parse(&s);
        prop_assert_eq!(parsed.is_ok(), reference_spiffe_id(&s), "{:?}", s);
        if let Ok(id) = parsed {
            prop_assert_eq!(id.as_str(), s.as_str());
            prop_assert_eq!(format!("spiffe://{}{}", id.trust_domain(), id.path()), s);
        }
    }

    #[test]
    fn compiled_patterns_match_exactly_as_each_pattern_alone(
        patterns in prop::collection::vec(pattern(), 0..8),
        value in "[ab/]{0,6}",
    ) {
        let set = PatternSet::compile(&patterns).expect("valid patterns");
        let naive = patterns.iter().any(|p| reference_pattern(p, &value));
        prop_assert_eq!(set.matches(&value), naive, "{:?} {:?}", patterns, value);
    }

    #[test]
    fn certificate_parsing_never_panics(text in any::<String>(), digest in "[0-9a-f]{0,64}") {
        let _ = percent_decode(&text);
        let _ = pem_to_der(text.as_bytes());
        let _ = locate_peer(Some(&text), &digest);
        let _ = own_element(Some(&text), &digest);
        if let Ok(forwarded) = forwarded_by_gateway(&text, "spiffe://a/b") {
            let _ = forwarded.sans();
            let _ = forwarded.check_rest(None);
        }
        let quoted = format!("By=spiffe://a/b;Hash={digest};Cert=\"{text}\";URI=x");
        if let Ok(forwarded) = forwarded_by_gateway(&quoted, "spiffe://a/b") {
            prop_assert!(forwarded.sans().is_err());
        }
        // Envoy's own element after any client text is always found.
        let own = format!("{text},By=spiffe://a/me;Hash={digest:0>64};Cert=\"c\"");
        if !text.contains(&format!("Hash={digest:0>64}")) {
            prop_assert_eq!(own_element(Some(&own), &format!("{digest:0>64}")).map(|e| e.cert), Ok("\"c\""));
        }
    }

    #[test]
    fn configuration_parsing_never_panics(bytes in any::<Vec<u8>>(), text in any::<String>()) {
        let _ = config::parse(&bytes);
        let _ = config::parse(text.as_bytes());
        let shaped = format!(r#"{{"policies":[{{"name":"p","action":"ALLOW","rules":[{text}]}}]}}"#);
        let _ = config::parse(shaped.as_bytes());
    }

    #[test]
    fn any_request_is_decided_without_panic(
        headers in prop::collection::vec(("[a-z:-]{1,12}", any::<Vec<u8>>()), 0..12),
        xfcc in any::<String>(),
        digest in prop::option::of("[0-9a-f]{64}"),
    ) {
        let config = config::parse(include_bytes!("../../examples/multi-cloud-policy.json"))
            .expect("example");
        let mut cache = CertCache::default();
        let mut headers = headers;
        headers.push(("x-forwarded-client-cert".into(), xfcc.into_bytes()));
        let outcome = evaluate_http(
            &config,
            HttpInput { headers: Headers::new(headers), ..HttpInput::default() },
            &mut EnvoyCertificates {
                peer: PeerFacts::Digest(digest),
                cache: &mut cache,
            },
        );
        // Nothing in that text is a certificate with a matching digest: no identity.
        prop_assert!(outcome.caller.is_none());
    }
}

/// One generated policy: action, and one rule over principals, paths and methods.
#[derive(Clone, Debug)]
struct GenPolicy {
    deny: bool,
    principals: Vec<String>,
    paths: Vec<String>,
    methods: Vec<&'static str>,
}

fn gen_policy() -> impl Strategy<Value = GenPolicy> {
    (
        any::<bool>(),
        prop::collection::vec(
            prop_oneof![
                Just("spiffe://a.org/x".to_string()),
                Just("spiffe://a.org/*".to_string()),
                Just("*/y".to_string()),
                Just("*".to_string()),
            ],
            0..3,
        ),
        prop::collection::vec(
            prop_oneof![
                Just("*".to_string()),
                "/[ab/]{0,3}",
                "/[ab/]{0,3}\\*",
                "\\*[ab/]{1,3}",
            ],
            0..3,
        ),
        prop::collection::vec(prop_oneof![Just("GET"), Just("POST")], 0..2),
    )
        .prop_map(|(deny, principals, paths, methods)| GenPolicy {
            deny,
            principals,
            paths,
            methods,
        })
}

/// Istio's order, written naively over the generated policies.
fn reference_decision(
    policies: &[GenPolicy],
    caller: Option<&str>,
    method: &str,
    path: &str,
) -> bool {
    let matches = |p: &GenPolicy| {
        let from = p.principals.is_empty()
            || caller.is_some_and(|c| p.principals.iter().any(|x| reference_pattern(x, c)));
        let paths = p.paths.is_empty() || p.paths.iter().any(|x| reference_pattern(x, path));
        let methods = p.methods.is_empty() || p.methods.contains(&method);
        from && paths && methods
    };
    if policies.iter().any(|p| p.deny && matches(p)) {
        return false;
    }
    let allows: Vec<&GenPolicy> = policies.iter().filter(|p| !p.deny).collect();
    if !allows.is_empty() {
        return allows.iter().any(|p| matches(p));
    }
    // Only DENY policies (none matched): allow; no policy at all: the default, DENY.
    !policies.is_empty()
}

proptest! {
    #[test]
    fn decisions_agree_with_a_naive_reference(
        policies in prop::collection::vec(gen_policy(), 0..5),
        caller in prop::option::of(prop_oneof![
            Just("spiffe://a.org/x"), Just("spiffe://a.org/y"), Just("spiffe://b.org/y")
        ]),
        method in prop_oneof![Just("GET"), Just("POST")],
        path in "/[ab/]{0,5}",
    ) {
        let json = serde_json::json!({
            "policies": policies.iter().enumerate().map(|(i, p)| serde_json::json!({
                "name": format!("p{i}"),
                "action": if p.deny { "DENY" } else { "ALLOW" },
                "rules": [{
                    "from": { "principals": p.principals },
                    "to": { "paths": p.paths, "methods": p.methods },
                }],
            })).collect::<Vec<_>>(),
        });
        let config = config::parse(json.to_string().as_bytes()).expect("generated config");
        let headers = Headers::from_text(&[(":method", method), (":path", path.as_str())]);
        let mut certs = StatedCertificates {
            peer: caller.map(|c| Ok(vec![c.to_string()])),
            forwarded: None,
        };
        let outcome = evaluate_http(
            &config,
            HttpInput { headers, node: NodeFacts::default(), ..HttpInput::default() },
            &mut certs,
        );
        prop_assert_eq!(
            outcome.decision.allowed,
            reference_decision(&policies, caller, method, &path),
            "{}", json
        );
    }
}
