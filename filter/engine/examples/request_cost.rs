//! One request as the shim hands it to the engine (realistic headers, a 2 KiB
//! XFCC with the peer's certificate, a warm certificate cache), evaluated in a
//! loop: the native cost of `evaluate_http`, for profiling with
//! `valgrind --tool=callgrind target/release/examples/request_cost 2000`.
//! A second argument `rego` evaluates the users' federated guide policy in
//! Rego mode (`filter/examples/rego-federated.json`) instead of the JSON
//! multi-cloud policy; `make bench-instructions` counts both.

use std::time::Instant;

use trustweave_engine::annotate::NodeFacts;
use trustweave_engine::certificate::CertCache;
use trustweave_engine::config;
use trustweave_engine::headers::Headers;
use trustweave_engine::identity::{EnvoyCertificates, PeerFacts};
use trustweave_engine::{evaluate_http, HttpInput};

const DIGEST: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let rego = std::env::args().nth(2).as_deref() == Some("rego");
    let config = if rego {
        config::parse(include_bytes!("../../examples/rego-federated.json")).expect("example")
    } else {
        config::parse(include_bytes!("../../examples/multi-cloud-policy.json")).expect("example")
    };
    let xfcc = format!(
        "By=spiffe://gcp.company.com/region/gcp-us-central1/worker-1;Hash={DIGEST};Cert=\"{}\";URI=spiffe://gcp.company.com/ns/billing/sa/invoicer",
        "A".repeat(2000)
    );
    let raw: Vec<(String, Vec<u8>)> = [
        (":authority", "inventory.gcp.internal"),
        (":path", "/invoices"),
        (":method", "GET"),
        (":scheme", "https"),
        ("user-agent", "wrk"),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "6a1b3f0e-8a0e-4c1e-9d0e-3f7a2b1c0d9e"),
        ("x-trustweave-action", "inventory.read"),
        ("x-forwarded-client-cert", xfcc.as_str()),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
    .collect();
    let mut cache = CertCache::default();
    // Warm: the peer's certificate was parsed on the connection's first request.
    let _ = cache.get_or_insert(DIGEST, || {
        Ok(vec![
            "spiffe://gcp.company.com/ns/billing/sa/invoicer".to_string()
        ])
    });
    let node = NodeFacts {
        region: Some("us-central1".into()),
        cloud: Some("gcp".into()),
        local_uri_san: Some("spiffe://gcp.company.com/ns/inventory/sa/api".into()),
        ..NodeFacts::default()
    };
    let start = Instant::now();
    let mut allowed = 0usize;
    for _ in 0..rounds {
        let headers = Headers::new(std::hint::black_box(raw.clone()));
        let outcome = evaluate_http(
            &config,
            HttpInput {
                headers,
                port: None,
                sni: None,
                node: node.clone(),
                unreadable: None,
            },
            &mut EnvoyCertificates {
                peer: PeerFacts::Digest(Some(DIGEST.to_string())),
                cache: &mut cache,
            },
        );
        allowed += usize::from(outcome.decision.allowed);
    }
    assert_eq!(allowed, rounds);
    println!(
        "{:.0} ns per request (headers copied, evaluated)",
        start.elapsed().as_nanos() as f64 / rounds as f64
    );
}
