//! `make demo` keeps working: the node-mode demo runs to its end and shows a
//! cross-domain call and a rotation (trustweave-sds is built by `make test`'s
//! `cargo build --workspace --bins`, next to the demo binary).

#[tokio::test]
async fn the_node_mode_demo_runs_to_completion() {
    let dir = tempfile::Builder::new()
        .prefix("tw-demo-")
        .tempdir_in("/tmp")
        .expect("dir");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_trustweave-demo"))
        .arg("--dir")
        .arg(dir.path())
        .output()
        .await
        .expect("run the demo");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "--source delegated",
        "2 SDS streams",
        "default: spiffe://gcp.company.com/ns/inventory/sa/server",
        "default: spiffe://aws.company.com/ns/checkout/sa/client",
        "HTTP 200",
        "server saw caller  spiffe://aws.company.com/ns/checkout/sa/client",
        "request after rotation: HTTP 200",
        "demo complete",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
}
