//! `trustweave-sds doctor` in the one-machine mesh with real SPIRE: each link
//! broken on purpose, and the doctor names exactly that link (and nothing
//! else) — a peer's bundle endpoint unreachable through a CA rotation, a
//! stale Envoy behind a dead trustweave-sds, a gateway without the MSS clamp,
//! a federation removed on one side only — then nothing once it is mended.
//! `doctor call` explains allowed and refused calls hop by hop.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use trustweave_e2e::mesh::netns::Site;
use trustweave_e2e::mesh::{node_sds, Mesh, MeshOptions};

const AWS: &str = "aws.company.com";
const GCP: &str = "gcp.company.com";
const AZURE: &str = "azure.company.com";
const ORCHESTRATOR: &str = "spiffe://aws.company.com/ns/ops/sa/orchestrator";
const LEGACY: &str = "spiffe://onprem.company.com/ns/legacy/sa/client";

/// One doctor run: its exit status and its report.
struct Run {
    status: i32,
    report: Value,
    stderr: String,
}

impl Run {
    /// `(holder, subject, status)` of every broken check.
    fn broken(&self) -> BTreeSet<(String, String, String)> {
        self.report["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| !["in_step", "ok"].contains(&c["status"].as_str().unwrap_or_default()))
            .map(|c| {
                (
                    c["holder"].as_str().unwrap_or_default().to_string(),
                    c["subject"].as_str().unwrap_or_default().to_string(),
                    c["status"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// The check of `holder` about `subject`.
    fn check(&self, holder: &str, subject: &str) -> &Value {
        self.report["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["holder"] == holder && c["subject"] == subject)
            .unwrap_or_else(|| panic!("no check of {holder} about {subject}: {:#}", self.report))
    }
}

async fn run_doctor(site: &Site, args: &[&str]) -> Run {
    let mut all = vec!["doctor"];
    all.extend_from_slice(args);
    all.push("--json");
    let output = site
        .command(node_sds::binary())
        .args(&all)
        .output()
        .await
        .expect("trustweave-sds doctor runs");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor {args:?} printed no JSON ({e}): {}{stderr}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    Run {
        status: output.status.code().unwrap_or(-1),
        report,
        stderr,
    }
}

/// Runs `doctor --config` until its broken checks are exactly `expected` (60 s at most).
async fn wait_for_broken(config: &Path, what: &str, expected: &[(&str, &str, &str)]) -> Run {
    let expected: BTreeSet<(String, String, String)> = expected
        .iter()
        .map(|(h, s, st)| (h.to_string(), s.to_string(), st.to_string()))
        .collect();
    let config = config.display().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let run = run_doctor(&Site::Host, &["--config", &config]).await;
        let broken = run.broken();
        if broken == expected {
            assert_eq!(
                run.status,
                i32::from(!expected.is_empty()),
                "{what}: exit status; {}",
                run.stderr
            );
            return run;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{what}: the doctor reports {broken:#?}, expected {expected:#?}; report {:#}",
                run.report
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The human table: whether nothing is broken, and the text.
async fn table(config: &Path) -> (bool, String) {
    let output = Site::Host
        .command(node_sds::binary())
        .arg("doctor")
        .arg("--config")
        .arg(config)
        .output()
        .await
        .expect("doctor");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
    )
}

fn endpoint(peer: &str, from: &str) -> String {
    format!("bundle endpoint of {peer} from {from}")
}

fn server(td: &str) -> String {
    format!("spire-server {td}")
}

/// `federation update` of `peer` on `mesh`'s cloud `on`, to `url`.
async fn point_federation(mesh: &Mesh, on: &str, peer: &str, url: &str) {
    let server_id = format!("spiffe://{peer}/spire/server");
    mesh.cloud(on)
        .spire
        .server
        .cli(&[
            "federation",
            "update",
            "-trustDomain",
            peer,
            "-bundleEndpointURL",
            url,
            "-bundleEndpointProfile",
            "https_spiffe",
            "-endpointSpiffeID",
            &server_id,
        ])
        .await
        .expect("federation update");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doctor_names_the_broken_link() {
    let dir = tempfile::Builder::new()
        .prefix("tw-doctor-")
        .tempdir_in("/tmp")
        .expect("dir");
    let mut mesh = Mesh::start(MeshOptions::new(dir.path(), 74))
        .await
        .expect("mesh starts");
    let setup = mesh.doctor_setup().await;
    let config: PathBuf = dir.path().join("doctor.json");
    std::fs::write(&config, setup.config.to_string()).expect("write config");
    let config_arg = config.display().to_string();

    // A healthy mesh: every link in step, exit 0; the table says so.
    let healthy = wait_for_broken(&config, "healthy mesh", &[]).await;
    assert_eq!(
        healthy.check(&endpoint(GCP, AWS), GCP)["status"],
        "ok",
        "{:#}",
        healthy.report
    );
    assert_eq!(
        healthy.check(&format!("envoy {GCP}/node-1/search"), AWS)["status"],
        "in_step"
    );
    let (success, text) = table(&config).await;
    eprintln!("doctor on the healthy mesh:\n{text}");
    assert!(success, "{text}");
    assert!(
        text.starts_with("STATUS") && text.contains("nothing broken"),
        "{text}"
    );

    // doctor call: allowed, refused by the filter (with the rule), refused
    // for trust, refused by the gateway's SNI allowlist.
    let call = |caller: &'static str, callee: &'static str, action: &'static str| {
        let config_arg = config_arg.clone();
        async move {
            run_doctor(
                &Site::Host,
                &[
                    "call",
                    "--config",
                    &config_arg,
                    caller,
                    callee,
                    "--action",
                    action,
                ],
            )
            .await
        }
    };
    let allowed = call(ORCHESTRATOR, "search", "search").await;
    assert_eq!(allowed.status, 0, "{:#}", allowed.report);
    let filter = allowed.check(&format!("envoy {GCP}/node-1/search"), "trustweave-filter");
    assert!(
        filter["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("allowed: policy")),
        "{filter}"
    );
    let gateway = allowed.check(
        &format!("gateway {GCP}/eastwest"),
        "outbound_.8080_._.search.search.svc.cluster.local",
    );
    assert_eq!(gateway["status"], "ok");
    let denied = call(ORCHESTRATOR, "search", "process").await;
    assert_eq!(denied.status, 1);
    assert_eq!(
        denied.broken(),
        BTreeSet::from([(
            format!("envoy {GCP}/node-1/search"),
            "trustweave-filter".to_string(),
            "refused".to_string()
        )]),
        "{:#}",
        denied.report
    );
    let onprem = call(LEGACY, "search", "ping").await;
    let trust = onprem.check(&format!("envoy {GCP}/node-1/search"), "onprem.company.com");
    assert_eq!(trust["status"], "refused", "{:#}", onprem.report);
    let indexer = call(ORCHESTRATOR, "indexer", "ping").await;
    assert_eq!(
        indexer.broken(),
        BTreeSet::from([(
            format!("gateway {GCP}/eastwest"),
            "outbound_.8080_._.indexer.search.svc.cluster.local".to_string(),
            "refused".to_string()
        )]),
        "{:#}",
        indexer.report
    );

    // 1. GCP's bundle endpoint unreachable from its peers through a CA
    // rotation: their copies go stale; exactly those links are named.
    let gcp_url = mesh
        .cloud("gcp")
        .spire
        .server
        .bundle_endpoint_url()
        .expect("gcp serves a bundle endpoint");
    let blocked = gcp_url.rsplit_once(':').expect("port").0.to_string() + ":9";
    for on in ["aws", "azure"] {
        point_federation(&mesh, on, GCP, &blocked).await;
    }
    let gcp = &mesh.cloud("gcp").spire.server;
    let next = gcp.prepare_authority().await.expect("prepare");
    gcp.activate_authority(&next).await.expect("activate");
    let run = wait_for_broken(
        &config,
        "gcp's endpoint unreachable through a rotation",
        &[
            (&endpoint(GCP, AWS), GCP, "unreachable"),
            (&endpoint(GCP, AZURE), GCP, "unreachable"),
            (&server(AWS), GCP, "stale"),
            (&server(AZURE), GCP, "stale"),
        ],
    )
    .await;
    eprintln!(
        "doctor, gcp's endpoint unreachable:\n{}",
        table(&config).await.1
    );
    let unreachable = run.check(&endpoint(GCP, AWS), GCP);
    assert!(
        unreachable["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&blocked) && d.contains("TCP")),
        "{unreachable}"
    );
    let stale = run.check(&server(AWS), GCP);
    assert!(
        stale["detail"]
            .as_str()
            .is_some_and(|d| d.contains("lacks root")),
        "{stale}"
    );
    assert!(
        stale["fix"]
            .as_str()
            .is_some_and(|f| f.contains("federation refresh -id gcp.company.com")),
        "{stale}"
    );
    for on in ["aws", "azure"] {
        point_federation(&mesh, on, GCP, &gcp_url).await;
        mesh.cloud(on)
            .spire
            .refresh(GCP)
            .await
            .expect("gcp's endpoint reachable again");
    }
    wait_for_broken(&config, "gcp's endpoint mended", &[]).await;

    // 2. A stale Envoy: GCP's trustweave-sds is down while AWS publishes a
    // new root; GCP's SPIRE has it, GCP's Envoys do not.
    mesh.cloud_mut("gcp").sds.stop().await.expect("stop");
    mesh.cloud("aws")
        .spire
        .server
        .prepare_authority()
        .await
        .expect("prepare");
    for on in ["gcp", "azure"] {
        mesh.cloud(on).spire.refresh(AWS).await.expect("refresh");
    }
    let stale_envoys = wait_for_broken(
        &config,
        "gcp's Envoys stale",
        &[
            (&format!("trustweave-sds {GCP}/node-1"), GCP, "unreachable"),
            (&format!("envoy {GCP}/node-1/search"), AWS, "stale"),
            (&format!("envoy {GCP}/node-1/indexer"), AWS, "stale"),
        ],
    )
    .await;
    eprintln!("doctor, gcp's Envoys stale:\n{}", table(&config).await.1);
    let envoy = stale_envoys.check(&format!("envoy {GCP}/node-1/search"), AWS);
    assert!(
        envoy["detail"]
            .as_str()
            .is_some_and(|d| d.contains("lacks root") && d.contains("does not answer")),
        "{envoy}"
    );
    mesh.cloud_mut("gcp")
        .sds
        .restart()
        .await
        .expect("trustweave-sds restarts");
    wait_for_broken(&config, "gcp's trustweave-sds back", &[]).await;

    // 3. The MSS at GCP's gateway, from AWS's network: clamped, then not.
    let gateway = mesh.cloud("gcp").gateway_addr.to_string();
    let sni = "outbound_.8080_._.search.search.svc.cluster.local";
    let mtu = |mesh: &Mesh| {
        let site = mesh.cloud("aws").site.clone();
        let gateway = gateway.clone();
        async move { run_doctor(&site, &["mtu", &gateway, "--sni", sni]).await }
    };
    let clamped = mtu(&mesh).await;
    assert_eq!(clamped.status, 0, "{:#}", clamped.report);
    let detail = clamped.report["checks"][0]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        (detail.starts_with("MSS 1288") || detail.starts_with("MSS 1300"))
            && detail.contains("certificate chain"),
        "{detail}"
    );
    mesh.set_gateway_mss_clamp("gcp", false).await;
    let unclamped = mtu(&mesh).await;
    assert_eq!(unclamped.status, 1, "{:#}", unclamped.report);
    let check = &unclamped.report["checks"][0];
    assert_eq!(check["status"], "no_clamp", "{check}");
    assert!(
        check["fix"]
            .as_str()
            .is_some_and(|f| f.contains("envoyfilter-gateway-mss.yaml")),
        "{check}"
    );
    mesh.set_gateway_mss_clamp("gcp", true).await;
    assert_eq!(mtu(&mesh).await.status, 0);

    // 4. AWS ends its federation with GCP; GCP still federates with AWS.
    mesh.cloud("aws")
        .spire
        .server
        .end_federation(GCP)
        .await
        .expect("end the federation on aws");
    let run = wait_for_broken(
        &config,
        "federation removed on aws only",
        &[(&server(AWS), GCP, "one_sided")],
    )
    .await;
    let one_sided = run.check(&server(AWS), GCP);
    assert!(
        one_sided["fix"]
            .as_str()
            .is_some_and(|f| f.contains("federation create -trustDomain gcp.company.com")),
        "{one_sided}"
    );
    let call = call(ORCHESTRATOR, "search", "search").await;
    let caller_side = call.check(&format!("envoy {AWS}/node-1/orchestrator"), GCP);
    assert_eq!(caller_side["status"], "refused", "{:#}", call.report);
    drop(setup);
}
