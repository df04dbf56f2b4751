//! The cross-cloud mesh on one machine (`trustweave_e2e::mesh`): AWS, GCP and
//! Azure federated through their SPIRE bundle endpoints, on-prem federated
//! with nobody; per cloud a node-level trustweave-sds, two workloads behind
//! real Envoy sidecars with the filter from `istio/clouds/<cloud>/`, and an
//! `AUTO_PASSTHROUGH` east-west gateway. The users' multi-cloud scenario,
//! step by step, and the faults it must survive.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use trustweave_e2e::mesh::{Mesh, MeshOptions};
use trustweave_e2e::wait::wait_until;

const ORCHESTRATOR: &str = "spiffe://aws.company.com/ns/ops/sa/orchestrator";
const SEARCH_WORKER: &str = "spiffe://gcp.company.com/ns/search/sa/search-worker";
const PROCESSOR: &str = "spiffe://azure.company.com/ns/processing/sa/processor";
const FEDERATED: [&str; 3] = ["aws", "gcp", "azure"];

async fn mesh(subnet: u8) -> (tempfile::TempDir, Mesh) {
    let dir = tempfile::Builder::new()
        .prefix("tw-mesh-")
        .tempdir_in("/tmp")
        .expect("dir");
    let mesh = Mesh::start(MeshOptions::new(dir.path(), subnet))
        .await
        .expect("mesh starts");
    (dir, mesh)
}

fn trace_id(traceparent: Option<&str>) -> String {
    traceparent
        .and_then(|t| t.split('-').nth(1))
        .unwrap_or_else(|| panic!("no traceparent: {traceparent:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_multi_cloud_scenario_across_three_federated_clouds() {
    let (_dir, mesh) = mesh(71).await;

    // 1. The AWS orchestrator: `search` on GCP and `process` on Azure, nothing else.
    let search = mesh.call("aws", "gcp", "search").await.expect("call");
    assert_eq!(search.status, 200, "{:?}", search.response);
    assert_eq!(search.received("x-trustweave-caller"), Some(ORCHESTRATOR));
    let process = mesh.call("aws", "azure", "process").await.expect("call");
    assert_eq!(process.status, 200, "{:?}", process.response);
    for (to, action) in [("gcp", "process"), ("azure", "search"), ("gcp", "delete")] {
        let denied = mesh.call("aws", to, action).await.expect("call");
        assert_eq!(
            denied.status, 403,
            "{action} on {to}: {:?}",
            denied.response
        );
        assert_eq!(denied.response.body, "RBAC: access denied");
    }

    // 2. Health capabilities from every federated cloud to every other.
    for from in FEDERATED {
        for to in FEDERATED.iter().filter(|to| **to != from) {
            for action in ["ping", "health_check", "status"] {
                let call = mesh.call(from, to, action).await.expect("call");
                assert_eq!(
                    call.status, 200,
                    "{action} {from} → {to}: {:?}",
                    call.response
                );
            }
        }
    }

    // 3. The round trip AWS → GCP → Azure → AWS: each hop sees its caller.
    let collector = mesh.cloud("aws").service().plan.host();
    let processor = mesh.cloud("azure").service().plan.host();
    let hops = format!("{processor}/process,{collector}/report");
    let trip = mesh
        .call_from(
            "aws",
            "orchestrator",
            &mesh.cloud("gcp").service().plan.host(),
            "search",
            &[("x-hops", &hops), ("baggage", "userId=alice")],
        )
        .await
        .expect("round trip");
    assert_eq!(trip.status, 200, "{:?}", trip.response);
    let hop1 = &trip.body;
    let hop2 = &hop1["next"]["answer"];
    let hop3 = &hop2["next"]["answer"];
    assert_eq!(hop1["next"]["status"], 200, "{hop1}");
    assert_eq!(hop2["next"]["status"], 200, "{hop2}");
    let header =
        |hop: &serde_json::Value, name: &str| hop["headers"][name][0].as_str().map(str::to_string);
    for (hop, service, caller, td, cloud, region, here) in [
        (
            hop1,
            "search.gcp",
            ORCHESTRATOR,
            "aws.company.com",
            "aws",
            "us-east-1",
            "gcp",
        ),
        (
            hop2,
            "processor.azure",
            SEARCH_WORKER,
            "gcp.company.com",
            "gcp",
            "us-central1",
            "azure",
        ),
        (
            hop3,
            "collector.aws",
            PROCESSOR,
            "azure.company.com",
            "azure",
            "eastus",
            "aws",
        ),
    ] {
        assert_eq!(hop["service"], service, "{hop}");
        assert_eq!(
            header(hop, "x-trustweave-caller").as_deref(),
            Some(caller),
            "{hop}"
        );
        assert_eq!(
            header(hop, "x-trustweave-caller-trust-domain").as_deref(),
            Some(td)
        );
        assert_eq!(
            header(hop, "x-trustweave-caller-cloud").as_deref(),
            Some(cloud)
        );
        assert_eq!(
            header(hop, "x-trustweave-caller-region").as_deref(),
            Some(region)
        );
        assert_eq!(header(hop, "x-trustweave-cloud").as_deref(), Some(here));
    }
    let trace = trace_id(header(hop1, "traceparent").as_deref());
    for hop in [hop2, hop3] {
        assert_eq!(
            trace_id(header(hop, "traceparent").as_deref()),
            trace,
            "one trace"
        );
    }
    let baggage = header(hop3, "baggage").expect("baggage at the last hop");
    assert!(baggage.contains("userId=alice"), "{baggage}");
    assert!(
        baggage.contains("trustweave.hops=gcp:us-central1>azure:eastus>aws:us-east-1"),
        "{baggage}"
    );
    assert!(
        header(hop2, "baggage")
            .is_some_and(|b| b.contains("trustweave.hops=gcp:us-central1>azure:eastus")),
        "{hop2}"
    );

    // 4. On-prem is refused at the handshake everywhere; its spoofed header reaches nobody.
    let before: Vec<usize> = FEDERATED
        .iter()
        .map(|c| mesh.cloud(c).service().app.received())
        .collect();
    for to in FEDERATED {
        let service = mesh.cloud(to).service();
        let host = service.plan.host();
        let refusals = format!(
            "listener.{}_15006.ssl.fail_verify_error",
            service.outbound.ip()
        );
        let refused_before = service.sidecar.counter(&refusals).await;
        let refused = mesh
            .call_from(
                "onprem",
                "legacy",
                &host,
                "ping",
                &[("x-trustweave-caller", ORCHESTRATOR)],
            )
            .await
            .expect("call");
        assert_eq!(refused.status, 503, "onprem → {to}: {:?}", refused.response);
        // The destination sidecar refused on-prem's certificate in the handshake.
        assert_eq!(
            service.sidecar.counter(&refusals).await,
            refused_before + 1,
            "{to}"
        );
    }
    let after: Vec<usize> = FEDERATED
        .iter()
        .map(|c| mesh.cloud(c).service().app.received())
        .collect();
    assert_eq!(before, after, "no request from on-prem reached a service");

    // The gateway passes only exported services: GCP's indexer is not one.
    let indexer = mesh.cloud("gcp").workload("indexer");
    let (host, seen) = (indexer.plan.host(), indexer.app.received());
    let hidden = mesh
        .call_from("aws", "orchestrator", &host, "ping", &[])
        .await
        .expect("call");
    assert_eq!(hidden.status, 503, "{:?}", hidden.response);
    assert_eq!(indexer.app.received(), seen);

    // 5. Traces: one trace across the three clouds, spans tagged with the filter's annotations.
    let expected: BTreeSet<&str> = [
        "orchestrator.aws",
        "search.gcp",
        "processor.azure",
        "collector.aws",
    ]
    .into();
    wait_until("the round trip's spans", Duration::from_secs(20), || {
        let services: BTreeSet<String> = mesh
            .otlp
            .trace(&trace)
            .into_iter()
            .map(|s| s.service)
            .collect();
        let done = expected.iter().all(|s| services.contains(*s));
        async move { done }
    })
    .await;
    let spans = mesh.otlp.trace(&trace);
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<_> = spans
        .iter()
        .filter(|s| !ids.contains(s.parent_span_id.as_str()))
        .collect();
    assert_eq!(
        roots.len(),
        1,
        "one root, every other span's parent in the trace: {spans:#?}"
    );
    for (service, cloud, region, caller_cloud) in [
        ("search.gcp", "gcp", "us-central1", "aws"),
        ("processor.azure", "azure", "eastus", "gcp"),
        ("collector.aws", "aws", "us-east-1", "azure"),
    ] {
        let inbound = spans
            .iter()
            .find(|s| s.service == service && s.attributes.get("cloud.provider").is_some())
            .unwrap_or_else(|| panic!("no tagged span from {service}: {spans:#?}"));
        assert_eq!(inbound.attributes["cloud.provider"], cloud);
        assert_eq!(inbound.attributes["cloud.region"], region);
        assert_eq!(inbound.attributes["trustweave.caller.cloud"], caller_cloud);
    }
}

/// Calls `from` → `to` in a loop until stopped; counts successes and failures.
struct Traffic {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Traffic {
    fn start(
        mesh: &Arc<Mesh>,
        pairs: &[(&'static str, &'static str)],
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let traffic = Self {
            ok: Arc::default(),
            failed: Arc::default(),
            failures: Arc::default(),
        };
        let (ok, failed, failures) = (
            Arc::clone(&traffic.ok),
            Arc::clone(&traffic.failed),
            Arc::clone(&traffic.failures),
        );
        let (mesh, pairs) = (Arc::clone(mesh), pairs.to_vec());
        let task = tokio::spawn(async move {
            while !*stop.borrow() {
                for (from, to) in &pairs {
                    match mesh.call(from, to, "ping").await {
                        Ok(call) if call.status == 200 => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        other => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            failures
                                .lock()
                                .expect("failures")
                                .push(format!("{from} → {to}: {other:?}"));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        (traffic, task)
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    fn assert_nothing_failed(&self) {
        let failures = self.failures.lock().expect("failures");
        assert!(
            failures.is_empty(),
            "{} failed calls: {:#?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }
}
