//! Rego mode in real Envoy 1.40 (`trustweave_filter_rego.wasm`): the users'
//! guide policies decide inside the proxy; OPA-Envoy object results set the
//! status, body and headers; a policy that cannot decide denies and is
//! counted; a module that does not compile is refused naming module and line.

use std::time::Duration;

use serde_json::json;
use trustweave_e2e::filter;
use trustweave_e2e::filter_fixture::*;
use trustweave_e2e::sds;
use trustweave_e2e::wait::wait_until;

const ORCHESTRATOR_BY_REGION: &str = "spiffe://aws.company.com/region/aws-us-east-1/orchestrator";

fn example(name: &str) -> String {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../filter/examples")
        .join(name);
    std::fs::read_to_string(path).expect("example")
}

#[tokio::test]
async fn the_guide_policies_decide_inside_envoy() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (_authz, authz) =
        sidecar(&dir, &pki, filter::rego_filter(&example("rego-authz.json"))).await;
    // The AWS orchestrator may call GCP workers; the caller is annotated as in JSON mode.
    let seen = received(&call(authz, &pki.svid(ORCHESTRATOR_BY_REGION), "/jobs", &[]).await);
    assert_eq!(
        one(&seen, "x-trustweave-caller"),
        Some(ORCHESTRATOR_BY_REGION)
    );
    assert_eq!(one(&seen, "x-trustweave-caller-cloud"), Some("aws"));
    let eastus = pki.svid("spiffe://azure.company.com/region/azure-eastus/agent");
    let denied = call(authz, &eastus, "/jobs", &[]).await;
    assert_eq!(
        (denied.status, denied.body.as_str()),
        (403, "RBAC: access denied")
    );
    received(
        &call(
            authz,
            &eastus,
            "/status",
            &[("x-trustweave-action", "ping")],
        )
        .await,
    );

    let (_fed, fed) = sidecar(
        &dir,
        &pki,
        filter::rego_filter(&example("rego-federated.json")),
    )
    .await;
    let catalog = pki.svid(CATALOG);
    received(
        &call(
            fed,
            &catalog,
            "/items",
            &[("x-trustweave-action", "inventory.read")],
        )
        .await,
    );
    assert_eq!(
        call(
            fed,
            &catalog,
            "/items",
            &[("x-trustweave-action", "inventory.write")]
        )
        .await
        .status,
        403
    );
    received(&call(fed, &pki.svid(GCP_PEER), "/anything", &[]).await);
}

#[tokio::test]
async fn object_results_and_failures_are_honoured_and_counted() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let module = r#"package edge
import rego.v1
default decision := {"allowed": false, "http_status": 429, "body": "slow down", "headers": {"retry-after": "7"}}
decision := {"allowed": true, "headers": {"x-authz": "rego"}} if input.action == "go"
# Two different values for one complete rule: a conflict OPA reports as an error.
conflict := 1 if input.action == "clash"
conflict := 2 if input.action == "clash"
"#;
    let config = |query: &str| {
        json!({"placement": "sidecar", "layer": "http", "action_header": "x-trustweave-action",
               "rego": {"modules": {"edge.rego": module}, "query": query}})
        .to_string()
    };
    let (envoy, addr) = sidecar(
        &dir,
        &pki,
        filter::rego_filter(&config("data.edge.decision")),
    )
    .await;
    let peer = pki.svid(GCP_PEER);
    let limited = call(addr, &peer, "/", &[]).await;
    assert_eq!((limited.status, limited.body.as_str()), (429, "slow down"));
    assert_eq!(limited.header("retry-after"), Some("7"));
    let seen = received(&call(addr, &peer, "/", &[("x-trustweave-action", "go")]).await);
    assert_eq!(one(&seen, "x-authz"), Some("rego"));

    let (errs, err_addr) = sidecar(
        &dir,
        &pki,
        filter::rego_filter(&config("data.edge.conflict")),
    )
    .await;
    assert_eq!(
        call(err_addr, &peer, "/", &[("x-trustweave-action", "clash")])
            .await
            .status,
        403
    );
    assert_eq!(
        call(err_addr, &peer, "/", &[]).await.status,
        403,
        "undefined denies"
    );
    wait_until("rego errors counted", Duration::from_secs(5), || async {
        errs.admin_get("/stats?filter=trustweave.rego_errors")
            .await
            .contains("trustweave.rego_errors: 2")
    })
    .await;
    drop(envoy);
}

#[tokio::test]
async fn a_module_that_does_not_compile_is_refused_naming_module_and_line() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let config =
        json!({"rego": {"modules": {"broken.rego": "package x\nallow if {\n  input.a ==\n}\n"},
                                  "query": "data.x.allow"}})
        .to_string();
    let log = refused_configuration(&dir, &pki, "broken", filter::rego_filter(&config)).await;
    assert!(log.contains("rego.modules.broken.rego"), "{log}");
    assert!(log.contains("broken.rego:4"), "{log}");
}

/// A module whose decision calls `builtin` on the request's `x-n` header.
fn module_calling(builtin: &str) -> String {
    let module = format!(
        "package guard\nimport rego.v1\ndefault allow := false\nallow if {{\n  n := to_number(input.attributes.request.http.headers[\"x-n\"])\n  {builtin}\n}}\n"
    );
    json!({ "rego": { "modules": { "guard.rego": module }, "query": "data.guard.allow" } })
        .to_string()
}

#[tokio::test]
async fn no_request_can_crash_or_stall_a_builtin() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let peer = pki.svid(GCP_PEER);
    for (name, builtin) in [
        ("range", "count(numbers.range(1, n)) > 0"),
        ("range-step", "count(numbers.range_step(1, n, 1)) > 0"),
        (
            "cidr",
            "count(net.cidr_expand(sprintf(\"10.0.0.0/%d\", [n]))) > 0",
        ),
        (
            "sprintf",
            "count(sprintf(sprintf(\"%%0%dd\", [n]), [1])) > 0",
        ),
        ("count", "strings.count(\"abc\", \"\") == n"),
    ] {
        let (envoy, addr) =
            sidecar(&dir, &pki, filter::rego_filter(&module_calling(builtin))).await;
        // A reasonable argument decides; a hostile one denies and is counted; the VM lives on.
        let small = if name == "count" {
            "4"
        } else if name == "cidr" {
            "30"
        } else {
            "8"
        };
        let hostile = if name == "cidr" { "8" } else { "1e18" };
        let ok = call(addr, &peer, "/", &[("x-n", small)]).await;
        assert_eq!(ok.status, 200, "{name} with {small}: {ok:?}");
        if name != "count" {
            let denied = call(addr, &peer, "/", &[("x-n", hostile)]).await;
            assert_eq!(denied.status, 403, "{name} with {hostile}");
            assert_eq!(
                filter_counter(&envoy, "trustweave.rego_errors").await,
                1,
                "{name}"
            );
        }
        assert_eq!(
            call(addr, &peer, "/", &[("x-n", small)]).await.status,
            200,
            "{name} after"
        );
        let log = envoy.log();
        assert!(
            !log.contains("proxy_on_request_headers failed"),
            "{name}: the VM trapped:\n{log}"
        );
        drop(envoy);
    }
}
