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

use std::net::SocketAddr;

use trustweave_e2e::envoy::{normalize_serial, Envoy};
use trustweave_e2e::http;
use trustweave_e2e::mesh::netns::Site;
use trustweave_e2e::mesh::{Mesh, MeshOptions, Workload};
use trustweave_e2e::wait::wait_until;

const ORCHESTRATOR: &str = "spiffe://aws.company.com/ns/ops/sa/orchestrator";
const SEARCH_WORKER: &str = "spiffe://gcp.company.com/ns/search/sa/search-worker";
const PROCESSOR: &str = "spiffe://azure.company.com/ns/processing/sa/processor";
const FEDERATED: [&str; 3] = ["aws", "gcp", "azure"];
/// SVID lifetime of the fault test's mesh.
const SVID_TTL: Duration = Duration::from_secs(60);

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
    let trip = mesh
        .round_trip(&[("baggage", "userId=alice")])
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

    // 4. On-prem federates with nobody: every handshake between it and a cloud
    // fails (its sidecar holds no cloud's root, no cloud holds its root); its
    // spoofed header reaches nobody.
    let before: Vec<usize> = FEDERATED
        .iter()
        .map(|c| mesh.cloud(c).service().app.received())
        .collect();
    let legacy = &mesh.cloud("onprem").caller().sidecar;
    assert_eq!(
        legacy
            .ca_serials()
            .await
            .into_iter()
            .collect::<BTreeSet<_>>()
            .len(),
        1,
        "on-prem's sidecar trusts its own root only"
    );
    for to in FEDERATED {
        let service = mesh.cloud(to).service();
        let host = service.plan.host();
        let refusals = format!("cluster.outbound|8080||{host}.ssl.fail_verify_error");
        let refused_before = legacy.counter(&refusals).await;
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
        // On-prem's sidecar refused the cloud's certificate in the handshake.
        assert_eq!(legacy.counter(&refusals).await, refused_before + 1, "{to}");
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
            .find(|s| s.service == service && s.attributes.contains_key("cloud.provider"))
            .unwrap_or_else(|| panic!("no tagged span from {service}: {spans:#?}"));
        assert_eq!(inbound.attributes["cloud.provider"], cloud);
        assert_eq!(inbound.attributes["cloud.region"], region);
        assert_eq!(inbound.attributes["trustweave.caller.cloud"], caller_cloud);
    }
}

/// `ping` calls between clouds in a loop until dropped; every failure is kept,
/// with when it happened among the test's own steps (`mark`).
struct Traffic {
    ok: Arc<AtomicU64>,
    started: tokio::time::Instant,
    /// `(time since start, what)`: failed calls and the test's steps, in order.
    timeline: Arc<std::sync::Mutex<Vec<(Duration, String)>>>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    /// Calls each `(from, to)` pair's service in turn, until dropped.
    fn start(mesh: &Mesh, pairs: &[(&str, &str)]) -> Self {
        let targets: Vec<(String, Site, SocketAddr, String)> = pairs
            .iter()
            .map(|(from, to)| {
                (
                    format!("{from} → {to}"),
                    mesh.cloud(from).site.clone(),
                    mesh.cloud(from).caller().outbound,
                    mesh.cloud(to).service().plan.host(),
                )
            })
            .collect();
        let started = tokio::time::Instant::now();
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let timeline: Arc<std::sync::Mutex<Vec<(Duration, String)>>> = Arc::default();
        let (ok_count, failed_count, events) =
            (Arc::clone(&ok), Arc::clone(&failed), Arc::clone(&timeline));
        let task = tokio::spawn(async move {
            loop {
                for (label, site, outbound, host) in &targets {
                    let headers = [("host", host.as_str()), ("x-trustweave-action", "ping")];
                    let response = match site.connect(*outbound).await {
                        Ok(stream) => http::request_on(stream, "GET", "/", &headers).await,
                        Err(e) => Err(e),
                    };
                    match response {
                        Ok(r) if r.status == 200 => {
                            ok_count.fetch_add(1, Ordering::SeqCst);
                        }
                        other => {
                            failed_count.fetch_add(1, Ordering::SeqCst);
                            let detail = match other {
                                Ok(r) => format!("{} {}", r.status, r.body),
                                Err(e) => e.to_string(),
                            };
                            events
                                .lock()
                                .expect("timeline")
                                .push((started.elapsed(), format!("FAILED {label}: {detail}")));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self {
            ok,
            started,
            timeline,
            failed,
            task,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Records one of the test's steps in the timeline.
    fn mark(&self, step: &str) {
        self.timeline
            .lock()
            .expect("timeline")
            .push((self.started.elapsed(), step.to_string()));
    }

    /// Waits until `n` more calls have succeeded.
    async fn wait_for_successes(&self, n: u64) {
        let target = self.ok() + n;
        wait_until("calls succeeding", Duration::from_secs(20), || {
            let done = self.ok() >= target;
            async move { done }
        })
        .await;
    }

    /// Stops and asserts that no call failed; on failure prints the timeline.
    fn stop_and_assert_nothing_failed(self, what: &str) {
        self.task.abort();
        let failed = self.failed.load(Ordering::SeqCst);
        if failed == 0 {
            return;
        }
        let timeline = self.timeline.lock().expect("timeline");
        // Between two steps, equal failures fold into their first line.
        let mut folded: Vec<(Duration, Duration, String, u64)> = Vec::new();
        let mut since_step = 0;
        for (at, event) in timeline.iter() {
            let same = folded
                .iter_mut()
                .skip(since_step)
                .find(|(_, _, previous, _)| previous == event);
            match same {
                Some((_, last, _, n)) => {
                    *last = *at;
                    *n += 1;
                }
                None => {
                    if !event.starts_with("FAILED") {
                        since_step = folded.len();
                    }
                    folded.push((*at, *at, event.clone(), 1));
                }
            }
        }
        let lines: Vec<String> = folded
            .iter()
            .map(|(first, last, event, n)| {
                if *n == 1 {
                    format!("{:>8.3}s  {event}", first.as_secs_f64())
                } else {
                    format!(
                        "{:>8.3}s  {event} (×{n}, until {:.3}s)",
                        first.as_secs_f64(),
                        last.as_secs_f64()
                    )
                }
            })
            .collect();
        panic!(
            "{what}: {failed} calls failed ({} succeeded) in {:.1}s:\n{}",
            self.ok(),
            self.started.elapsed().as_secs_f64(),
            lines.join("\n")
        );
    }
}

fn serial_of(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).expect("cert");
    normalize_serial(&cert.raw_serial_as_string().replace(':', ""))
}

/// Waits until every workload Envoy of the federated clouds trusts exactly `roots` for gcp.
async fn wait_for_trust(mesh: &Mesh, present: &str, absent: Option<&str>) {
    for cloud in FEDERATED {
        for w in &mesh.cloud(cloud).workloads {
            wait_until(
                &format!("{} trusts the new GCP root", w.plan.name),
                Duration::from_secs(30),
                || async {
                    let roots = w.sidecar.ca_serials().await;
                    roots.iter().any(|r| r == present)
                        && absent.is_none_or(|a| !roots.iter().any(|r| r == a))
                },
            )
            .await;
        }
    }
}

/// Exactly one process (`which`) differs between the two lists of PIDs.
fn assert_one_restarted(before: &[Option<u32>], after: &[Option<u32>], which: &str) {
    let changed = before.iter().zip(after).filter(|(b, a)| b != a).count();
    assert_eq!(changed, 1, "only {which} restarted: {before:?} → {after:?}");
}

/// Every process of the mesh: SDS servers, sidecars, gateways.
fn all_pids(mesh: &Mesh) -> Vec<Option<u32>> {
    let mut pids = Vec::new();
    for cloud in &mesh.clouds {
        pids.push(cloud.sds.pid());
        pids.extend(cloud.workloads.iter().map(|w| w.sidecar.pid()));
        pids.push(cloud.gateway.as_ref().and_then(Envoy::pid));
    }
    pids
}

/// The serials of the roots in a PEM bundle.
fn root_serials(pem: &str) -> BTreeSet<String> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| serial_of(&p.expect("PEM").contents))
        .collect()
}

/// AWS and Azure fetch GCP's bundle now (what the refresh hint would bring within a minute).
async fn refresh_peers(mesh: &Mesh) {
    for peer in ["aws", "azure"] {
        mesh.cloud(peer)
            .spire
            .refresh("gcp.company.com")
            .await
            .expect("federation refresh");
    }
}

/// Waits until `w`'s sidecar holds an SVID other than `before` (the agent rotated it).
async fn wait_for_new_svid(w: &Workload, before: &[String], what: &str) -> Vec<String> {
    wait_until(
        &format!("{} holds a new SVID ({what})", w.plan.name),
        Duration::from_secs(60),
        || async {
            let now = w.sidecar.cert_serials().await;
            !now.is_empty() && now != before
        },
    )
    .await;
    w.sidecar.cert_serials().await
}

/// Waits until `w`'s sidecar holds an SVID issued after `when` (one that
/// expires a full `SVID_TTL` after it); its serials.
async fn wait_for_svid_issued_after(w: &Workload, when: std::time::SystemTime) -> Vec<String> {
    // `expiration_time` has whole seconds.
    let expected = when + SVID_TTL - Duration::from_secs(1);
    wait_until(
        &format!(
            "{} holds an SVID issued after the entry update",
            w.plan.name
        ),
        Duration::from_secs(30),
        || async {
            let expirations = w.sidecar.cert_expirations().await;
            !expirations.is_empty() && expirations.iter().all(|at| *at >= expected)
        },
    )
    .await;
    w.sidecar.cert_serials().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_survives_ca_rotation_outages_and_restarts() {
    let dir = tempfile::Builder::new()
        .prefix("tw-mesh-")
        .tempdir_in("/tmp")
        .expect("dir");
    let mut options = MeshOptions::new(dir.path(), 72);
    // Short SVIDs: the agents rotate every 30 s, so outages outlast a half-life.
    options.svid_ttl = SVID_TTL;
    let mut mesh = Mesh::start(options).await.expect("mesh starts");
    let everywhere = [
        ("aws", "gcp"),
        ("gcp", "azure"),
        ("azure", "aws"),
        ("gcp", "aws"),
        ("azure", "gcp"),
    ];

    // A GCP CA rotation with SPIRE's own commands: nothing fails at any step.
    let traffic = Traffic::start(&mesh, &everywhere);
    let gcp = &mesh.cloud("gcp").spire.server;
    let old = gcp.active_authority().await.expect("active authority");
    let roots_before = root_serials(&gcp.bundle_pem().await.expect("bundle"));
    let next = gcp.prepare_authority().await.expect("prepare");
    let roots_prepared = root_serials(&gcp.bundle_pem().await.expect("bundle"));
    let new_roots: Vec<&String> = roots_prepared.difference(&roots_before).collect();
    assert_eq!(
        new_roots.len(),
        1,
        "prepare publishes one new root: {roots_prepared:?}"
    );
    let (new_root, old_root) = (
        new_roots[0].clone(),
        roots_before.first().cloned().expect("root"),
    );
    traffic.mark("gcp prepared a new authority");
    refresh_peers(&mesh).await;
    traffic.mark("peers refreshed gcp");
    wait_for_trust(&mesh, &new_root, None).await;
    traffic.mark("every Envoy trusts the new root");
    traffic.wait_for_successes(10).await;
    gcp.activate_authority(&next).await.expect("activate");
    traffic.mark("activated");
    let held: Vec<Vec<String>> = {
        let mut held = Vec::new();
        for w in &mesh.cloud("gcp").workloads {
            held.push(w.sidecar.cert_serials().await);
        }
        held
    };
    gcp.taint_authority(&old).await.expect("taint");
    traffic.mark("tainted");
    for (w, before) in mesh.cloud("gcp").workloads.iter().zip(&held) {
        wait_for_new_svid(w, before, "the tainted CA's SVID replaced").await;
    }
    traffic.wait_for_successes(10).await;
    traffic.mark("every gcp SVID replaced");
    gcp.revoke_authority(&old).await.expect("revoke");
    refresh_peers(&mesh).await;
    traffic.mark("revoked, peers refreshed");
    wait_for_trust(&mesh, &new_root, Some(&old_root)).await;
    traffic.mark("the old root left every Envoy");
    traffic.wait_for_successes(10).await;
    traffic.stop_and_assert_nothing_failed("CA rotation");

    // Azure's SPIRE server stops for longer than an SVID's half-life: its
    // agent keeps serving, its bundle endpoint is unreachable (a refresh
    // fails, the last bundle is kept), no handshake fails; rotation resumes.
    //
    // Every azure SVID is re-issued first (an entry update bumps its
    // revision), so all of them outlive the outage by the same margin. SPIRE
    // rotates at half-life and, after failed syncs, retries on a 1.5× backoff
    // (5, 7.5, 11, 17 s… ±10 %): with the outage ending at half-life + 2 s
    // the first sync after the restart comes ~8 s later, with ~20 s of every
    // SVID left. Without the re-issue an SVID already near its half-life
    // would lapse during the outage: SPIRE's behaviour, not trustweave's.
    let traffic = Traffic::start(&mesh, &everywhere);
    let azure = mesh.cloud("azure");
    let reissued = std::time::SystemTime::now();
    for w in &azure.workloads {
        azure
            .spire
            .server
            .reissue_entry(&w.entry_id)
            .await
            .expect("entry update");
    }
    let mut fresh = Vec::new();
    for w in &azure.workloads {
        fresh.push(wait_for_svid_issued_after(w, reissued).await);
    }
    traffic.mark("every azure SVID re-issued");
    let aws_spire = &mesh.cloud("aws").spire;
    let azure_bundle = aws_spire
        .server
        .federated_bundle_pem("azure.company.com")
        .await
        .expect("azure's bundle at aws");
    mesh.cloud_mut("azure").spire.server.stop().await;
    traffic.mark("azure spire-server stopped");
    let outage = tokio::time::Instant::now() + SVID_TTL / 2 + Duration::from_secs(2);
    let aws_spire = &mesh.cloud("aws").spire;
    let refused = aws_spire.refresh("azure.company.com").await;
    assert!(
        refused.is_err(),
        "a refresh from a stopped bundle endpoint fails"
    );
    traffic.mark("aws's refresh of azure failed");
    tokio::time::sleep_until(outage).await;
    assert_eq!(
        aws_spire
            .server
            .federated_bundle_pem("azure.company.com")
            .await
            .expect("azure's bundle at aws"),
        azure_bundle,
        "the last bundle is kept"
    );
    mesh.cloud_mut("azure")
        .spire
        .server
        .restart()
        .await
        .expect("spire-server restarts");
    traffic.mark("azure spire-server restarted");
    for (w, before) in mesh.cloud("azure").workloads.iter().zip(&fresh) {
        wait_for_new_svid(w, before, "rotation resumed").await;
    }
    traffic.mark("every azure SVID rotated");
    mesh.cloud("aws")
        .spire
        .refresh("azure.company.com")
        .await
        .expect("the bundle endpoint is back");
    traffic.mark("aws refreshed azure");
    traffic.wait_for_successes(10).await;
    traffic.stop_and_assert_nothing_failed("SPIRE server outage");

    // AWS's agent restarts: trustweave-sds reconnects, the Envoys get the new agent's SVIDs.
    let traffic = Traffic::start(&mesh, &everywhere);
    let orchestrator = mesh.cloud("aws").caller();
    let before = orchestrator.sidecar.cert_serials().await;
    {
        let cloud = mesh.cloud_mut("aws");
        let spire = &mut cloud.spire;
        let agent = spire.agent.as_mut().expect("agent");
        agent
            .restart(&spire.server)
            .await
            .expect("spire-agent restarts");
    }
    traffic.mark("aws spire-agent restarted");
    let orchestrator = mesh.cloud("aws").caller();
    wait_for_new_svid(orchestrator, &before, "from the restarted agent").await;
    traffic.wait_for_successes(10).await;
    traffic.stop_and_assert_nothing_failed("agent restart");

    // An SDS server restarts: Envoys keep their certificates, nothing else restarts.
    let traffic = Traffic::start(&mesh, &everywhere);
    let before = all_pids(&mesh);
    let gcp_sds_pid = mesh.cloud("gcp").sds.pid();
    mesh.cloud_mut("gcp").sds.restart().await.expect("restart");
    traffic.mark("gcp trustweave-sds restarted");
    let sds = &mesh.cloud("gcp").sds;
    wait_until(
        "the new trustweave-sds serves both GCP workloads",
        Duration::from_secs(20),
        || async { sds.metric("trustweave_sds_workloads").await == Some(2.0) },
    )
    .await;
    traffic.wait_for_successes(10).await;
    traffic.stop_and_assert_nothing_failed("SDS restart");
    let after = all_pids(&mesh);
    assert_ne!(mesh.cloud("gcp").sds.pid(), gcp_sds_pid);
    assert_one_restarted(&before, &after, "the SDS server");

    // An east-west gateway restarts: calls through it resume, nothing else restarts.
    let before = all_pids(&mesh);
    mesh.restart_gateway("azure").await;
    for from in ["aws", "gcp"] {
        let call = mesh.call(from, "azure", "process").await.expect("call");
        assert_ne!(
            call.status, 503,
            "{from} → azure after the gateway restart: {:?}",
            call.response
        );
    }
    let call = mesh.call("aws", "azure", "process").await.expect("call");
    assert_eq!(call.status, 200, "{:?}", call.response);
    let after = all_pids(&mesh);
    assert_one_restarted(&before, &after, "the gateway");

    // MTU: the gateway's sockets are clamped to MSS 1300 (`ss -ti` in the gateway's network).
    let gcp_cloud = mesh.cloud("gcp");
    let gateway = gcp_cloud.gateway_addr;
    let held = mesh
        .cloud("aws")
        .site
        .connect(gateway)
        .await
        .expect("connect");
    let ss = gcp_cloud
        .site
        .command("ss")
        .args([
            "-tinH",
            "state",
            "established",
            &format!("( sport = :{} )", gateway.port()),
        ])
        .output()
        .await
        .expect("ss");
    drop(held);
    let text = String::from_utf8_lossy(&ss.stdout);
    let advmss: Vec<u32> = text
        .split_whitespace()
        .filter_map(|field| field.strip_prefix("advmss:")?.parse().ok())
        .collect();
    // 1300, or 1288 where TCP timestamps take 12 bytes of each segment.
    assert!(
        !advmss.is_empty() && advmss.iter().all(|mss| [1300, 1288].contains(mss)),
        "the gateway's accepted sockets advertise MSS 1300: {text}"
    );

    // The federation AWS → GCP ended on purpose (`federation delete`, the
    // bundle deleted, entries dissociated): AWS ↔ GCP fail at the handshake.
    mesh.cloud("aws")
        .spire
        .server
        .end_federation("gcp.company.com")
        .await
        .expect("end the federation");
    let orchestrator = mesh.cloud("aws").caller();
    let refused = "cluster.outbound|8080||search.search.svc.cluster.local.ssl.fail_verify_error";
    wait_until(
        "AWS no longer trusts GCP",
        Duration::from_secs(20),
        || async {
            let call = mesh.call("aws", "gcp", "ping").await.expect("call");
            call.status == 503 && orchestrator.sidecar.counter(refused).await > 0
        },
    )
    .await;
    let ok = mesh.call("aws", "azure", "ping").await.expect("call");
    assert_eq!(
        ok.status, 200,
        "AWS ↔ Azure still federated: {:?}",
        ok.response
    );
}
