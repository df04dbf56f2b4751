//! `make demo` and `make demo-istio` keep working: the cross-cloud demo runs
//! on real SPIRE to its report and shows the SPIRE it runs, each bundle endpoint and federation
//! refresh, the guide's decisions, the round trip's annotations and what each
//! node serves (trustweave-sds is built by `make test`'s `cargo build
//! --workspace --bins`, next to the demo binary).

/// The two demos run one after the other (each is a whole mesh; 2 cores).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a demo binary with `--once` in a directory of its own on `subnet`;
/// its report, after checking it succeeded and holds every `expected` line.
async fn report_holds(binary: &str, subnet: &str, expected: &[&str]) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::Builder::new()
        .prefix("tw-demo-")
        .tempdir_in("/tmp")
        .expect("dir");
    let output = tokio::process::Command::new(binary)
        .arg("--dir")
        .arg(dir.path())
        .args(["--subnet", subnet, "--once"])
        .output()
        .await
        .expect("run the demo");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in expected {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
}

#[tokio::test]
async fn the_cross_cloud_demo_prints_its_report() {
    report_holds(
        env!("CARGO_BIN_EXE_trustweave-demo"),
        "73",
        &[
            "aws/orchestrator → gcp/search      search         allowed (200)",
            "aws/orchestrator → gcp/search      process        denied (403)",
            "onprem/legacy → gcp/search         ping           refused at handshake (503)",
            "caller        spiffe://azure.company.com/ns/processing/sa/processor",
            "trustweave.hops=gcp:us-central1>azure:eastus>aws:us-east-1",
            "spans at the OTLP receiver from collector.aws, orchestrator.aws, processor.azure, search.gcp",
            "Starting the mesh: spire-server 1.13.3",
            "bundle endpoint https://127.73.2.2:8443",
            "aws    ← gcp.company.com     https://127.73.2.2:8443      refreshed",
            "onprem ← nobody",
            "default: spiffe://gcp.company.com/ns/search/sa/search-worker",
            "trusts:  aws.company.com, azure.company.com, gcp.company.com",
            "trusts:  onprem.company.com",
            "demo complete",
        ],
    )
    .await;
}

/// `make demo-istio` keeps working (as root, as CI runs): the multi-primary
/// mesh on the real Istio control plane to its report, with each istiod's view.
#[tokio::test]
async fn the_istio_demo_prints_its_report_with_the_control_plane_view() {
    report_holds(
        env!("CARGO_BIN_EXE_trustweave-demo-istio"),
        "79",
        &[
            "aws  cluster eks-us-east-1    network network-aws",
            "orchestrator → search.search.svc.cluster.local     search   allowed (200)    spiffe://aws.company.com/ns/ops/sa/orchestrator",
            "orchestrator → search.search.svc.cluster.local     delete   denied (403)",
            "aws    ← gcp.company.com     https://127.79.2.2:8443      refreshed",
            "default: spiffe://gcp.company.com/ns/search/sa/search-worker",
            "trusts:  aws.company.com, gcp.company.com",
            "gke-us-central1  search.search                          CDS SYNCED, ECDS SYNCED, EDS SYNCED, LDS SYNCED, RDS SYNCED",
        ],
    )
    .await;
}
