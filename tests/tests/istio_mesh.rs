//! The real Istio control plane configuring real Envoys with our resources.
//!
//! Per cluster: etcd and kube-apiserver, Istio's CRDs, our `istio/` install
//! ("WasmPlugin, file") and istiod with our Helm values' mesh config, each
//! in a network namespace of the cluster. Per workload: a VM proxy
//! (pilot-agent + the PyPI Envoy, its own network namespace and user) whose
//! certificates come from the node's trustweave-sds (node mode, attested by
//! the cloud's real SPIRE), and an app behind it. What is asserted is seen
//! from outside: pilot-agent used our socket, Envoy's `/certs` holds SPIRE's
//! SVID, our EnvoyFilters and WasmPlugin are in Envoy's `/config_dump`,
//! Envoy rejected nothing and istiod saw every push ACKed, and the guide's
//! calls are allowed and denied by trustweave-filter.
//!
//! Needs root (network namespaces, users); `make test` runs as root in CI.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use trustweave_e2e::istio::mesh::{start_node, start_spire, IstioMesh, CLOUDS, PROXIES};
use trustweave_e2e::istio::vm::{ProxyKind, VmProxy};
use trustweave_e2e::mesh::workload_uid;

const SUBNET: u8 = 80;
const ORCHESTRATOR: &str = "spiffe://aws.company.com/ns/ops/sa/orchestrator";
const SEARCH_WORKER: &str = "spiffe://gcp.company.com/ns/search/sa/search-worker";
const PROCESSOR: &str = "spiffe://azure.company.com/ns/processing/sa/processor";

/// Every listener, cluster and extension config name in a config dump, with
/// every filter name under them: what istiod sent, flattened for searching.
fn filter_names(dump: &Value) -> Vec<String> {
    let mut names = Vec::new();
    fn walk(value: &Value, names: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(name)) = map.get("name") {
                    names.push(name.clone());
                }
                for v in map.values() {
                    walk(v, names);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, names)),
            _ => {}
        }
    }
    walk(dump, &mut names);
    names
}

/// `from` calls `host` for `action`: allowed, and the filter at the backend named `caller`.
async fn assert_allowed(running: &IstioMesh, from: &str, host: &str, action: &str, caller: &str) {
    let (status, text, body) = running.call(from, host, action).await.expect("call");
    assert_eq!(status, 200, "{from} → {host} {action}: {text}");
    assert_eq!(
        body["headers"]["x-trustweave-caller"][0].as_str(),
        Some(caller),
        "{from} → {host} {action}: {body}"
    );
}

/// Connections a gateway opened to `host`'s endpoints through its
/// AUTO_PASSTHROUGH (SNI-routed) cluster, from its `/clusters` host counters
/// (Istio's stats inclusion list hides listener and cluster stats).
async fn passthrough_connections(gateway: &VmProxy, host: &str) -> u64 {
    let clusters = gateway.admin_get("/clusters").await.expect("/clusters");
    let prefix = format!("outbound_.8080_._.{host}::");
    clusters
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.split_once("::cx_total::"))
        .filter_map(|(_, n)| n.trim().parse::<u64>().ok())
        .sum()
}

/// The listener of `dump` named `name` (`0.0.0.0_15443`), as Envoy runs it.
fn listener<'a>(dump: &'a Value, name: &str) -> Option<&'a Value> {
    dump["configs"]
        .as_array()?
        .iter()
        .filter_map(|c| c["dynamic_listeners"].as_array())
        .flatten()
        .find(|l| l["name"] == name)
        .map(|l| &l["active_state"]["listener"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clusters_multi_primary_with_istiod_configuring_our_filters_and_spire_identities() {
    let tempdir = tempfile::Builder::new()
        .prefix("tw-istio-")
        .tempdir_in("/tmp")
        .expect("dir");
    // For a failure's post-mortem: TRUSTWEAVE_KEEP=1 keeps the directory (logs, config dumps).
    let (_guard, dir) = if std::env::var_os("TRUSTWEAVE_KEEP").is_some() {
        let path = tempdir.keep();
        eprintln!("keeping {}", path.display());
        (None, path)
    } else {
        let path = tempdir.path().to_path_buf();
        (Some(tempdir), path)
    };
    let mut running = IstioMesh::start(&dir, SUBNET)
        .await
        .expect("the mesh starts");

    for (cloud, _, proxy) in &running.proxies {
        let spec = proxy.spec();
        let name = format!("{}/{}", CLOUDS[*cloud].0, spec.name);
        // The SVID in Envoy is SPIRE's, of its cloud's trust domain (pilot-agent
        // did not fall back to istiod's CA, whose trust domain is istiod's).
        let certs = proxy.admin_get("/certs").await.expect("/certs");
        let id = format!(
            "spiffe://{}/ns/{}/sa/{}",
            CLOUDS[*cloud].1, spec.namespace, spec.service_account
        );
        assert!(certs.contains(&id), "{name}: {certs}");
        // Our resources are in what istiod sent.
        let dump = proxy.config_dump().await.expect("config_dump");
        std::fs::write(
            proxy.log_path().with_file_name("config_dump.json"),
            serde_json::to_string_pretty(&dump).expect("json"),
        )
        .expect("write");
        let names = filter_names(&dump);
        let text = dump.to_string();
        match spec.kind {
            ProxyKind::Sidecar => {
                // envoyfilter-sidecar-network.yaml's network filter; the WasmPlugin as istiod
                // names its ECDS resource (`extensions.istio.io/.../istio-system.wasmplugin-file~...`);
                // envoyfilter-sidecar-hcm.yaml's XFCC and the tcp_proxy patch.
                for expected in [
                    "envoy.filters.network.wasm",
                    "/istio-system.wasmplugin-file~",
                ] {
                    assert!(
                        names.iter().any(|n| n.contains(expected)),
                        "{name}: no {expected} in config_dump: {names:?}"
                    );
                }
                assert!(text.contains("APPEND_FORWARD"), "{name}: no XFCC patch");
                assert!(
                    text.contains("ON_DOWNSTREAM_DATA"),
                    "{name}: no tcp_proxy patch"
                );
            }
            ProxyKind::Router => {
                // The AUTO_PASSTHROUGH listener with envoyfilter-gateway-sni.yaml's
                // filter and envoyfilter-gateway-mss.yaml's TCP_MAXSEG.
                let passthrough = listener(&dump, "0.0.0.0_15443")
                    .unwrap_or_else(|| panic!("{name}: no 15443 listener: {names:?}"));
                let listener_text = passthrough.to_string();
                assert!(
                    listener_text.contains("envoy.filters.network.wasm"),
                    "{name}: {listener_text}"
                );
                assert!(
                    listener_text.contains("sni_allowlist"),
                    "{name}: {listener_text}"
                );
                assert!(
                    passthrough["socket_options"]
                        .as_array()
                        .is_some_and(|o| o.iter().any(|o| o["int_value"] == "1300")),
                    "{name}: no MSS clamp: {listener_text}"
                );
            }
        }
        // Nothing rejected, by Envoy or as istiod saw it.
        assert_eq!(proxy.updates_rejected().await.expect("stats"), 0, "{name}");
    }
    for (i, cluster) in running.clusters.iter().enumerate() {
        let status = cluster.istiod.sync_status().await.expect("syncz");
        let local = running.proxies.iter().filter(|(c, _, _)| *c == i).count();
        assert_eq!(status.len(), local, "{}: {status:?}", cluster.cloud);
        for proxy in &status {
            for (kind, state) in &proxy.types {
                assert!(
                    state == "SYNCED" || state == "NOT SENT",
                    "{}: {kind} {state}",
                    proxy.proxy
                );
            }
        }
    }

    // The guide's calls, decided by trustweave-filter at the destination:
    // within aws (same trust domain) ...
    assert_allowed(
        &running,
        "orchestrator",
        "collector.ops.svc.cluster.local",
        "collect",
        ORCHESTRATOR,
    )
    .await;
    // ... from aws to gcp through gcp's east-west gateway (istiod of aws learnt
    // gcp's service and gateway through the remote secret): the filter at gcp
    // sees the aws caller, and allows the workflow's action only.
    let search = "search.search.svc.cluster.local";
    let gcp_gateway = &running
        .proxies
        .iter()
        .find(|(cloud, _, p)| *cloud == 1 && p.spec().kind == ProxyKind::Router)
        .expect("gcp's gateway")
        .2;
    let before = passthrough_connections(gcp_gateway, search).await;
    assert_allowed(&running, "orchestrator", search, "search", ORCHESTRATOR).await;
    assert!(
        passthrough_connections(gcp_gateway, search).await > before,
        "the call did not pass gcp's gateway"
    );
    for (from, action) in [("orchestrator", "delete"), ("collector", "search")] {
        let (status, text, _) = running.call(from, search, action).await.expect("call");
        assert_eq!(status, 403, "{from} {action}: {text}");
        assert_eq!(text, "RBAC: access denied", "{from} {action}");
    }
    // ... and back from gcp to aws through aws's gateway (health is open to every cloud).
    assert_allowed(
        &running,
        "search",
        "collector.ops.svc.cluster.local",
        "ping",
        SEARCH_WORKER,
    )
    .await;

    a_trust_domain_added_at_run_time(&mut running, &dir).await;
}

/// A third trust domain joins the running mesh: azure's SPIRE federates with
/// gcp's, gcp's search entry federates with azure, and a workload of azure's
/// trust domain (its own node, SPIRE agent and trustweave-sds) joins the gcp
/// cluster. Nothing of istiod changes: trust comes from trustweave-sds
/// (`ROOTCA` gains azure's bundle), not from istiod's `caCertificates`; calls
/// *into* azure's workload pass Istio's server-SAN check only because our
/// values list azure in `trustDomainAliases` (the SAN list istiod sends is
/// asserted).
async fn a_trust_domain_added_at_run_time(running: &mut IstioMesh, dir: &Path) {
    let (td, uid) = ("azure.company.com", workload_uid(SUBNET, 2, 0));
    let mut azure = start_spire(dir, SUBNET, 2, "azure", td)
        .await
        .expect("azure's spire-server");
    let gcp = &mut running.spires[1];
    gcp.federate_with(&azure)
        .await
        .expect("gcp federates with azure");
    azure
        .federate_with(gcp)
        .await
        .expect("azure federates with gcp");
    let (_, sds) = start_node(
        dir,
        SUBNET,
        2,
        "azure",
        &mut azure,
        &[(PROCESSOR.to_string(), uid)],
        &["gcp.company.com"],
    )
    .await
    .expect("azure's node");

    // gcp's search federates with azure too: its Envoy's ROOTCA gains azure's CA, by SDS alone.
    let search = PROXIES
        .iter()
        .position(|p| p.name == "search")
        .expect("search");
    running.spires[1]
        .server
        .set_entry_federation(&running.entries[search], &["aws.company.com", td])
        .await
        .expect("entry update");
    let started = std::time::Instant::now();
    let (_, _, search_proxy) = running.proxy("search").expect("search");
    trustweave_e2e::real_spire::wait_until_ok(Duration::from_secs(60), || async {
        let certs = search_proxy.admin_get("/certs").await?;
        anyhow::ensure!(
            certs.contains("spiffe://azure.company.com"),
            "no azure CA yet"
        );
        Ok(())
    })
    .await
    .expect("azure's bundle reaches search's Envoy through SDS");
    eprintln!(
        "istio_mesh: azure's bundle in search's Envoy {} ms after the entry update (SPIRE's entry sync included)",
        started.elapsed().as_millis()
    );

    // A workload of azure's trust domain joins the gcp cluster.
    let proxy = running
        .add_late_vm(uid, &dir.join("azure/vm-processor"), sds.socket())
        .await
        .expect("processor's proxy");
    let certs = proxy.admin_get("/certs").await.expect("/certs");
    assert!(certs.contains(PROCESSOR), "{certs}");

    // From azure into gcp: the filter at search sees azure's caller.
    assert_allowed(
        running,
        "processor",
        "search.search.svc.cluster.local",
        "ping",
        PROCESSOR,
    )
    .await;
    // From gcp into azure's workload: Istio checks the server's SAN against the
    // service account in istiod's trust domain and each alias.
    let (_, _, search_proxy) = running.proxy("search").expect("search");
    let dump = search_proxy
        .config_dump()
        .await
        .expect("config_dump")
        .to_string();
    let processor_cluster = dump
        .find("outbound|8080||processor.processing.svc.cluster.local")
        .expect("search's Envoy has processor's cluster");
    assert!(
        dump[processor_cluster..].contains(PROCESSOR),
        "the SAN list istiod sends for processor has no azure identity"
    );
    assert_allowed(
        running,
        "search",
        "processor.processing.svc.cluster.local",
        "ping",
        SEARCH_WORKER,
    )
    .await;
    drop((azure, sds));
}
