//! Rego mode's input document is OPA-Envoy's: the real `opa-envoy-plugin`
//! (v1.10.0-envoy, built by `scripts/setup.sh` from `tests/opa-envoy/`) runs
//! as Envoy's `ext_authz` gRPC server in the same connection manager as
//! trustweave-filter's Rego build. Both evaluate one module that allows every
//! request and hands its whole `input` (and a verdict over it) to the
//! upstream as headers, so for each request the header echo receives both
//! documents: every field the filter gives equals OPA-Envoy's, apart from the
//! documented extra fields and the headers the filter withholds
//! (`WITHHELD_HEADERS`); the fields OPA-Envoy has and the filter does not give
//! are exactly `NOT_GIVEN`; and the verdicts are equal.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use trustweave_e2e::envoy::Envoy;
use trustweave_e2e::filter;
use trustweave_e2e::filter_fixture::*;
use trustweave_e2e::http::HttpResponse;
use trustweave_e2e::sds;
use trustweave_e2e::tls_client;
use trustweave_e2e::wait::wait_until;

/// One module for both engines: allow, and pass on the input and a verdict.
const MODULE: &str = r#"package parity

import rego.v1

result := {"allowed": true, "headers": {
	sprintf("x-input-%s", [data.who]): base64.encode(json.marshal(input)),
	sprintf("x-verdict-%s", [data.who]): sprintf("%v", [verdict]),
}}

default verdict := false

verdict if {
	input.parsed_path[0] == "orders"
	input.attributes.request.http.method == "GET"
}

verdict if input.parsed_query.lang == ["en"]

verdict if {
	startswith(input.attributes.source.principal, "spiffe://aws.company.com/")
	input.attributes.request.http.headers["x-r"] == "1,2"
}
"#;

/// Fields of the filter's document that OPA-Envoy does not have
/// (docs/filter.md, "Rego mode: the input document").
const EXTRA_FIELDS: &[&str] = &[
    "caller",
    "agent",
    "action",
    "request",
    "caller_spiffe_id",
    "callee_spiffe_id",
];

/// Request headers the filter does not give Rego: XFCC holds client-written
/// text before Envoy's element (the verified caller is
/// `attributes.source.principal`); `x-trustweave-*` is the filter's own.
const WITHHELD_HEADERS: &[&str] = &["x-forwarded-client-cert"];

/// OPA-Envoy's fields the filter does not give (docs/filter.md).
const NOT_GIVEN: &[&str] = &[
    ".attributes.destination.address",
    ".attributes.metadataContext",
    ".attributes.request.http.id",
    ".attributes.request.http.protocol",
    ".attributes.request.http.scheme",
    ".attributes.request.time",
    ".attributes.routeMetadataContext",
    ".attributes.source.address",
    ".version",
];

fn opa_envoy_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/opa-envoy/opa-envoy-plugin");
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup.sh (it builds opa-envoy-plugin from tests/opa-envoy)",
        path.display()
    );
    path
}

/// OPA-Envoy serving `MODULE` on a Unix socket in `dir`, decision logs on.
async fn start_opa_envoy(dir: &Path) -> (tokio::process::Child, PathBuf) {
    let socket = dir.join("opa.sock");
    let config = dir.join("opa.yaml");
    std::fs::write(
        &config,
        format!(
            "plugins:\n  envoy_ext_authz_grpc:\n    addr: unix://{}\n    path: parity/result\n    \
             skip-request-body-parse: true\ndecision_logs:\n  console: true\n",
            socket.display()
        ),
    )
    .expect("opa.yaml");
    let policy = dir.join("parity.rego");
    std::fs::write(&policy, MODULE).expect("policy");
    let data = dir.join("data.json");
    std::fs::write(&data, r#"{"who":"opa"}"#).expect("data");
    let log = std::fs::File::create(dir.join("opa-envoy.log")).expect("log");
    let child = tokio::process::Command::new(opa_envoy_binary())
        .arg("run")
        .arg("--server")
        .arg(format!(
            "--addr=unix://{}",
            dir.join("opa-http.sock").display()
        ))
        .arg(format!("--config-file={}", config.display()))
        .arg("--disable-telemetry")
        .arg(&policy)
        .arg(&data)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("opa-envoy-plugin starts");
    wait_until(
        "opa-envoy-plugin listens",
        Duration::from_secs(30),
        || async { socket.exists() },
    )
    .await;
    (child, socket)
}

/// The two documents and verdicts the echo received.
struct Seen {
    opa: Value,
    ours: Value,
    opa_verdict: String,
    our_verdict: String,
}

fn seen(response: &HttpResponse) -> Seen {
    let headers = received(response);
    let document = |name: &str| -> Value {
        let encoded = one(&headers, name).unwrap_or_else(|| panic!("no {name}: {headers:?}"));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64");
        serde_json::from_slice(&raw).expect("JSON input")
    };
    let verdict = |name: &str| one(&headers, name).unwrap_or_default().to_string();
    Seen {
        opa: document("x-input-opa"),
        ours: document("x-input-trustweave"),
        opa_verdict: verdict("x-verdict-opa"),
        our_verdict: verdict("x-verdict-trustweave"),
    }
}

/// Where `ours` differs from `opa`: every field `ours` has must equal
/// OPA-Envoy's (objects compared by the keys `ours` has, except the
/// headers map, compared whole).
fn differences(
    at: &str,
    ours: &Value,
    opa: &Value,
    out: &mut Vec<String>,
    not_given: &mut std::collections::BTreeSet<String>,
) {
    match (ours, opa) {
        (Value::Object(ours), Value::Object(opa)) if !at.ends_with(".headers") => {
            for key in opa.keys().filter(|k| !ours.contains_key(*k)) {
                not_given.insert(format!("{at}.{key}"));
            }
            for (key, value) in ours {
                let here = format!("{at}.{key}");
                if at.is_empty() && EXTRA_FIELDS.contains(&key.as_str()) {
                    continue;
                }
                match opa.get(key) {
                    Some(theirs) => differences(&here, value, theirs, out, not_given),
                    None => out.push(format!("{here}: ours {value}, OPA-Envoy has none")),
                }
            }
        }
        _ if ours == opa => {}
        _ => out.push(format!("{at}: ours {ours}, OPA-Envoy {opa}")),
    }
}

/// `document`'s request headers without those `drop` names.
fn without_headers(mut document: Value, drop: impl Fn(&str) -> bool) -> Value {
    if let Some(headers) = document
        .pointer_mut("/attributes/request/http/headers")
        .and_then(Value::as_object_mut)
    {
        headers.retain(|name, _| !drop(name));
    }
    document
}

#[tokio::test]
async fn the_rego_input_document_and_decisions_are_opa_envoys() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (_opa, socket) = start_opa_envoy(dir.path()).await;
    let config = json!({
        "placement": "sidecar",
        "layer": "http",
        "rego": {
            "modules": { "parity.rego": MODULE },
            "data": { "who": "trustweave" },
            "query": "data.parity.result"
        }
    });
    let echo = trustweave_e2e::upstream::start_header_echo().await;
    let bootstrap = filter::sidecar_beside_ext_authz(
        &pki.svid(WORKER),
        &pki.all(),
        &socket,
        filter::rego_filter(&config.to_string()),
        echo,
    );
    let envoy = Envoy::start("parity", dir.path(), &bootstrap).await;
    envoy.wait_live().await;
    let mtls = envoy.listener(filter::LISTENER).await;
    let plaintext = envoy.listener("plaintext").await;

    let paths = [
        "/",
        "/orders",
        "/orders/",
        "/orders/42/items",
        "/a/b%20c/%7Euser",
        "/a%2Fb",
        "/p?lang=en",
        "/p?lang=en&lang=fr&x=%26y",
        "/q?x=a+b&empty=&flag",
        "/q?a=1;b=2",
        "/p?lang=%65n",
        "/%E2%82%AC/x%2By",
    ];
    let mut requests: Vec<(String, Option<&str>, String, Vec<u8>)> = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let method = ["GET", "POST", "DELETE"][i % 3];
        let caller = [Some(GCP_PEER), Some(CATALOG), None][i % 3];
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: inventory.gcp.internal\r\nconnection: close\r\n\
             x-r: 1\r\nx-r: 2\r\ncontent-length: 0\r\n\r\n"
        );
        requests.push((
            format!("{method} {path}"),
            caller,
            path.to_string(),
            head.into_bytes(),
        ));
    }
    let mut report = Vec::new();
    let mut not_given = std::collections::BTreeSet::new();
    for (what, caller, _, head) in &requests {
        let response = match caller {
            Some(id) => tls_client::request_raw(mtls, &pki.svid(id), head)
                .await
                .expect("mTLS request"),
            None => {
                let raw = raw_plaintext(plaintext, head).await;
                trustweave_e2e::http::parse(&raw).expect("HTTP response")
            }
        };
        if response.status != 200 {
            report.push(format!("{what} (caller {caller:?}): {response:?}"));
            continue;
        }
        let seen = seen(&response);
        let mut found = Vec::new();
        // The headers ext_authz added before the filter ran are not the client's.
        let ours = without_headers(seen.ours.clone(), |name| {
            name == "x-input-opa" || name == "x-verdict-opa"
        });
        let opa = without_headers(seen.opa.clone(), |name| WITHHELD_HEADERS.contains(&name));
        differences("", &ours, &opa, &mut found, &mut not_given);
        if seen.opa_verdict != seen.our_verdict {
            found.push(format!(
                "verdict: ours {}, OPA-Envoy {}",
                seen.our_verdict, seen.opa_verdict
            ));
        }
        if !found.is_empty() {
            report.push(format!(
                "{what} (caller {caller:?}):\n  {}\n  OPA-Envoy's input: {}",
                found.join("\n  "),
                seen.opa
            ));
        }
    }
    assert!(
        report.is_empty(),
        "the filter's Rego input differs from OPA-Envoy's:\n{}",
        report.join("\n")
    );
    let listed: std::collections::BTreeSet<String> =
        NOT_GIVEN.iter().map(|f| f.to_string()).collect();
    assert_eq!(
        not_given, listed,
        "OPA-Envoy's fields the filter does not give"
    );
}

async fn raw_plaintext(addr: std::net::SocketAddr, head: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("answered within 10 s")
        .expect("read");
    out
}
