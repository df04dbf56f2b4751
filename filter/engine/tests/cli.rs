//! `trustweave-policy` as operators run it: output and exit codes.

use std::process::Command;

fn policy(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trustweave-policy"))
        .args(args)
        .output()
        .expect("run trustweave-policy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/multi-cloud-policy.json"
);

#[test]
fn validate_lists_every_error_with_its_field_path() {
    let (code, out, _) = policy(&["validate", EXAMPLE]);
    assert_eq!(code, 0);
    assert!(out.contains("valid (6 policies)"), "{out}");

    let dir = std::env::temp_dir().join(format!("tw-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"policies":[{"name":"a","action":"ALLOW","rules":[{"from":{"principals":["spiffe://A.com/x"]},"to":{"paths":["/a*b"]}}]}]}"#,
    )
    .expect("write");
    let (code, _, err) = policy(&["validate", bad.to_str().expect("utf8")]);
    assert_eq!(code, 2);
    assert!(
        err.contains("policies[0].rules[0].from.principals[0]"),
        "{err}"
    );
    assert!(err.contains("policies[0].rules[0].to.paths[0]"), "{err}");
    let (code, _, _) = policy(&[
        "check",
        bad.to_str().expect("utf8"),
        "--principal",
        "spiffe://a.org/x",
    ]);
    assert_eq!(code, 2, "check on an invalid file is 2");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_prints_decision_policy_rule_and_annotations() {
    let (code, out, _) = policy(&[
        "check",
        EXAMPLE,
        "--principal",
        "spiffe://aws.company.com/ns/shop/sa/catalog",
        "--path",
        "/items",
        "--header",
        "x-trustweave-action=inventory.read",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("decision: ALLOW"), "{out}");
    assert!(
        out.contains("policy:   federated-capabilities (rule 0)"),
        "{out}"
    );
    assert!(out.contains("x-trustweave-caller-cloud: aws"), "{out}");
    assert!(
        out.contains(
            "baggage: cloud.provider=gcp,cloud.region=us-central1,trustweave.hops=gcp:us-central1"
        ),
        "{out}"
    );

    let (code, out, _) = policy(&[
        "check",
        EXAMPLE,
        "--principal",
        "spiffe://aws.company.com/ns/shop/sa/catalog",
        "--header",
        "x-trustweave-action=inventory.write",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("decision: DENY"), "{out}");
    assert!(out.contains("RBAC: access denied"), "{out}");

    // Through the trusted east-west gateway, the forwarded caller is decided on.
    let (code, out, _) = policy(&[
        "check",
        EXAMPLE,
        "--principal",
        "spiffe://aws.company.com/ns/ops/sa/orchestrator",
        "--via-gateway",
        "spiffe://gcp.company.com/ns/istio-system/sa/istio-eastwestgateway",
        "--local-principal",
        "spiffe://gcp.company.com/region/gcp-us-central1/worker-3",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("orchestrator-to-central-workers"), "{out}");
}
