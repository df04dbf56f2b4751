//! Benchmark: per-request decision cost against policy size.
//!
//! `cargo run --release -p trustweave-engine --example policy_size_bench`
//! prints, side by side, the mean cost of one full HTTP evaluation (identity,
//! decision, annotation) for policies holding 10 to 100 000 principals, as
//! exact IDs, prefixes and suffixes. With hash sets keyed by value and by
//! prefix/suffix length, the figures should stay flat as the policy grows.

use std::time::Instant;

use trustweave_engine::annotate::NodeFacts;
use trustweave_engine::headers::Headers;
use trustweave_engine::identity::StatedCertificates;
use trustweave_engine::{config, evaluate_http, HttpInput};

fn policy(n: usize) -> String {
    let exact: Vec<String> = (0..n)
        .map(|i| format!("\"spiffe://aws.company.com/ns/n{i}/sa/s{i}\""))
        .collect();
    let prefixes: Vec<String> = (0..n)
        .map(|i| format!("\"spiffe://gcp.company.com/ns/p{i}/*\""))
        .collect();
    let suffixes: Vec<String> = (0..n).map(|i| format!("\"*/sa/suffix{i}\"")).collect();
    format!(
        r#"{{"policies":[{{"name":"big","action":"ALLOW","rules":[
            {{"from":{{"principals":[{}]}}}},
            {{"from":{{"principals":[{}]}}}},
            {{"from":{{"principals":[{}]}}}}]}}]}}"#,
        exact.join(","),
        prefixes.join(","),
        suffixes.join(",")
    )
}

fn main() {
    let callers = [
        ("exact hit", "spiffe://aws.company.com/ns/n7/sa/s7"),
        ("prefix hit", "spiffe://gcp.company.com/ns/p7/sa/x"),
        ("suffix hit", "spiffe://azure.company.com/ns/q/sa/suffix7"),
        ("miss", "spiffe://onprem.company.com/ns/none/sa/none"),
    ];
    println!(
        "{:>10} {:>12} {:>12} {:>12} {:>12}",
        "principals", "exact hit", "prefix hit", "suffix hit", "miss"
    );
    for n in [10, 1_000, 100_000] {
        let compiled = config::parse(policy(n).as_bytes()).expect("valid policy");
        let mut row = format!("{:>10}", n * 3);
        for (_, caller) in callers {
            let headers = Headers::from_text(&[
                (":method", "GET"),
                (":path", "/items"),
                (":authority", "inventory"),
            ]);
            let input = HttpInput {
                headers,
                port: Some(8080),
                sni: None,
                node: NodeFacts::default(),
                unreadable: None,
            };
            // The peer certificate as the shim's cache hands it over after the first request.
            let mut certs = StatedCertificates {
                peer: Some(Ok(vec![caller.to_string()])),
                forwarded: None,
            };
            let rounds = 50_000;
            let start = Instant::now();
            let mut allowed = 0;
            for _ in 0..rounds {
                allowed += usize::from(
                    evaluate_http(&compiled, std::hint::black_box(input.clone()), &mut certs)
                        .decision
                        .allowed,
                );
            }
            let per = start.elapsed().as_nanos() as f64 / rounds as f64;
            assert!(allowed == 0 || allowed == rounds);
            row.push_str(&format!(" {:>9.0} ns", per));
        }
        println!("{row}");
    }
}
