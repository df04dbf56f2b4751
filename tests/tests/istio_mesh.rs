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

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use trustweave_e2e::istio::cluster::{self, Cluster};
use trustweave_e2e::istio::vm::{ProxyKind, VmProxy, VmSpec};
use trustweave_e2e::mesh::app::{App, ACTION_HEADER};
use trustweave_e2e::mesh::netns::{Namespaces, NetNs, Site};
use trustweave_e2e::mesh::node_sds::{self, NodeSds};
use trustweave_e2e::mesh::spire::{CloudSpire, WorkloadSelector};
use trustweave_e2e::mesh::{self, workload_uid};

const SUBNET: u8 = 80;
const ORCHESTRATOR: &str = "spiffe://aws.company.com/ns/ops/sa/orchestrator";
const SEARCH_WORKER: &str = "spiffe://gcp.company.com/ns/search/sa/search-worker";

/// A proxy of this test: cloud index, name, namespace, service account, last octet, kind.
struct Planned {
    cloud: usize,
    name: &'static str,
    namespace: &'static str,
    service_account: &'static str,
    host: u8,
    kind: ProxyKind,
}

const fn sidecar(
    cloud: usize,
    name: &'static str,
    namespace: &'static str,
    sa: &'static str,
    host: u8,
) -> Planned {
    Planned {
        cloud,
        name,
        namespace,
        service_account: sa,
        host,
        kind: ProxyKind::Sidecar,
    }
}

const fn gateway(cloud: usize) -> Planned {
    Planned {
        cloud,
        name: "istio-eastwestgateway",
        namespace: "istio-system",
        service_account: cluster::GATEWAY_SERVICE_ACCOUNT,
        host: mesh::hosts::GATEWAY,
        kind: ProxyKind::Router,
    }
}

/// Two clusters, multi-primary on two networks: the guide's aws and gcp.
const CLOUDS: [(&str, &str); 2] = [("aws", "aws.company.com"), ("gcp", "gcp.company.com")];
const PROXIES: [Planned; 5] = [
    gateway(0),
    gateway(1),
    sidecar(0, "collector", "ops", "collector", 10),
    sidecar(0, "orchestrator", "ops", "orchestrator", 20),
    sidecar(1, "search", "search", "search-worker", 10),
];
/// The last octet of the VM added at run time.
const LATE_HOST: u8 = 30;
const PROCESSOR: &str = "spiffe://azure.company.com/ns/processing/sa/processor";

/// The control plane's last octet in each cloud.
const CONTROL_PLANE: u8 = 5;

fn ip(cloud: usize, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, SUBNET, cloud as u8 + 1, host))
}

struct Running {
    _namespaces: Namespaces,
    spires: Vec<CloudSpire>,
    /// Each proxy's SPIRE entry ID, in [`PROXIES`] order.
    entries: Vec<String>,
    /// The network namespace kept for the VM of the trust domain added at run time.
    late_site: Site,
    _sds: Vec<NodeSds>,
    clusters: Vec<Cluster>,
    _apps: Vec<App>,
    /// Each proxy with its cloud's index and its site.
    proxies: Vec<(usize, Site, VmProxy)>,
}

impl Running {
    fn proxy(&self, name: &str) -> &(usize, Site, VmProxy) {
        self.proxies
            .iter()
            .find(|(_, _, p)| p.spec().name == name)
            .unwrap_or_else(|| panic!("no proxy {name}"))
    }

    /// `from`'s app calls `host` through its sidecar, asking for `action`.
    async fn call(&self, from: &str, host: &str, action: &str) -> (u16, String, Value) {
        let (_, site, _) = self.proxy(from);
        let outbound = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), cluster::SERVICE_PORT);
        let stream = site
            .connect(outbound)
            .await
            .expect("the sidecar's egress listener");
        let response = trustweave_e2e::http::request_on(
            stream,
            "GET",
            "/",
            &[("host", host), (ACTION_HEADER, action)],
        )
        .await
        .expect("an answer");
        let body = serde_json::from_str(&response.body).unwrap_or(Value::Null);
        (response.status, response.body, body)
    }
}

async fn start(dir: &Path) -> Running {
    assert!(
        NetNs::available(),
        "the Istio tests need root: network namespaces and a user per VM"
    );
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))
        .expect("chmod");
    // Namespaces: one per cluster's control plane, one per VM.
    let mut names = Vec::new();
    let mut addresses = Vec::new();
    for (i, (cloud, _)) in CLOUDS.iter().enumerate() {
        names.push(format!("{cloud}-cp"));
        addresses.push(vec![ip(i, CONTROL_PLANE)]);
    }
    for p in &PROXIES {
        names.push(format!(
            "{}-{}",
            CLOUDS[p.cloud].0,
            &p.name[..6.min(p.name.len())]
        ));
        addresses.push(vec![ip(p.cloud, p.host)]);
    }
    // The VM of the trust domain added at run time (azure's processor, in the gcp cluster).
    names.push("gcp-proces".to_string());
    addresses.push(vec![ip(1, LATE_HOST)]);
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let namespaces = Namespaces::create(SUBNET, &name_refs, &addresses).expect("namespaces");
    let site = |i: usize| Site::Namespace(Arc::clone(&namespaces.clouds[i]));
    let chmod = |path: &Path| {
        std::fs::create_dir_all(path).expect("dir");
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o711))
            .expect("chmod");
    };

    // SPIRE per cloud, federated both ways; then each node's agent, entries
    // and trustweave-sds, first: its socket must answer before pilot-agent starts.
    let mut spires = Vec::new();
    for (i, (cloud, td)) in CLOUDS.iter().enumerate() {
        chmod(&dir.join(cloud));
        let host = mesh::address(SUBNET, i, mesh::hosts::SPIRE_SERVER);
        spires.push(
            CloudSpire::start(
                &dir.join(cloud).join("spire"),
                td,
                SocketAddr::new(host, mesh::ports::SPIRE_SERVER),
                SocketAddr::new(host, mesh::ports::BUNDLE_ENDPOINT),
                Duration::from_secs(3600),
            )
            .await
            .expect("spire-server"),
        );
    }
    {
        let (aws, gcp) = spires.split_at_mut(1);
        aws[0]
            .federate_with(&gcp[0])
            .await
            .expect("aws federates with gcp");
        gcp[0]
            .federate_with(&aws[0])
            .await
            .expect("gcp federates with aws");
    }
    let mut sds = Vec::new();
    let mut entries = vec![String::new(); PROXIES.len()];
    for (i, (cloud, td)) in CLOUDS.iter().enumerate() {
        let spire = &mut spires[i];
        spire
            .start_agent(&node_sds::delegate_id(td), &node_sds::binary())
            .await
            .expect("spire-agent");
        let peers: Vec<&str> = CLOUDS.iter().map(|c| c.1).filter(|t| t != td).collect();
        let mut uids = Vec::new();
        for (k, p) in PROXIES.iter().enumerate().filter(|(_, p)| p.cloud == i) {
            let uid = workload_uid(SUBNET, i, k);
            uids.push(uid);
            let id = format!("spiffe://{td}/ns/{}/sa/{}", p.namespace, p.service_account);
            entries[k] = spire
                .register(&id, &WorkloadSelector::Uid(uid), &peers)
                .await
                .expect("entry");
        }
        let node_dir = dir.join(cloud).join("node");
        chmod(&node_dir);
        sds.push(
            NodeSds::start(
                &node_sds::binary(),
                &node_dir,
                &spire.admin_endpoint(),
                SocketAddr::new(
                    mesh::address(SUBNET, i, mesh::hosts::SDS),
                    mesh::ports::SDS_ADMIN,
                ),
                &uids,
            )
            .await
            .expect("trustweave-sds"),
        );
    }

    // The clusters, each reading the other's apiserver (multi-primary).
    let mut clusters = Vec::new();
    for (i, (cloud, _)) in CLOUDS.iter().enumerate() {
        clusters.push(
            Cluster::start(
                cloud,
                &site(i),
                ip(i, CONTROL_PLANE),
                &dir.join(cloud).join("cluster"),
            )
            .await
            .unwrap_or_else(|e| panic!("{cloud}'s cluster: {e:#}")),
        );
    }
    for (i, here) in clusters.iter().enumerate() {
        here.add_gateway(ip(i, mesh::hosts::GATEWAY))
            .await
            .unwrap_or_else(|e| panic!("{}'s gateway: {e:#}", here.cloud));
        for remote in clusters.iter().filter(|c| c.cloud != here.cloud) {
            here.add_remote(remote)
                .await
                .unwrap_or_else(|e| panic!("{} reads {}: {e:#}", here.cloud, remote.cloud));
        }
    }

    let wasm = trustweave_e2e::filter::wasm_path();
    let mut apps = Vec::new();
    let mut proxies = Vec::new();
    for (k, p) in PROXIES.iter().enumerate() {
        let cluster = &clusters[p.cloud];
        let address = ip(p.cloud, p.host);
        let labels = match p.kind {
            ProxyKind::Router => cluster.gateway_labels(),
            ProxyKind::Sidecar => {
                let labels = Cluster::sidecar_labels(p.name);
                cluster
                    .add_workload(p.name, p.namespace, p.service_account, address, &labels)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e:#}", p.name));
                labels
            }
        };
        let vm_site = site(CLOUDS.len() + k);
        if p.kind == ProxyKind::Sidecar {
            let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
            apps.push(
                App::start(
                    &vm_site,
                    SocketAddr::new(loopback, cluster::APP_PORT),
                    p.name,
                    SocketAddr::new(loopback, cluster::SERVICE_PORT),
                )
                .await,
            );
        }
        let spec = VmSpec {
            name: p.name.to_string(),
            namespace: p.namespace.to_string(),
            service_account: p.service_account.to_string(),
            labels,
            ip: address,
            uid: workload_uid(SUBNET, p.cloud, k),
            kind: p.kind,
        };
        let vm_dir = dir.join(CLOUDS[p.cloud].0).join(format!("vm-{}", p.name));
        let proxy = VmProxy::start(
            &vm_site,
            &vm_dir,
            spec,
            &cluster.istiod,
            &cluster.kube,
            sds[p.cloud].socket(),
            &wasm,
        )
        .await
        .unwrap_or_else(|e| panic!("{}'s proxy: {e:#}", p.name));
        proxies.push((p.cloud, vm_site, proxy));
    }
    let late_site = site(CLOUDS.len() + PROXIES.len());
    Running {
        _namespaces: namespaces,
        spires,
        entries,
        late_site,
        _sds: sds,
        clusters,
        _apps: apps,
        proxies,
    }
}

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
    let mut running = start(&dir).await;

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
    let (status, text, body) = running
        .call("orchestrator", "collector.ops.svc.cluster.local", "collect")
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        body["headers"]["x-trustweave-caller"][0].as_str(),
        Some(ORCHESTRATOR),
        "{body}"
    );
    // ... from aws to gcp through gcp's east-west gateway (istiod of aws learnt
    // gcp's service and gateway through the remote secret): the filter at gcp
    // sees the aws caller, and allows the workflow's action only.
    let search = "search.search.svc.cluster.local";
    let (status, text, body) = running.call("orchestrator", search, "search").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        body["headers"]["x-trustweave-caller"][0].as_str(),
        Some(ORCHESTRATOR),
        "{body}"
    );
    for (from, action) in [("orchestrator", "delete"), ("collector", "search")] {
        let (status, text, _) = running.call(from, search, action).await;
        assert_eq!(status, 403, "{from} {action}: {text}");
        assert_eq!(text, "RBAC: access denied", "{from} {action}");
    }
    // ... and back from gcp to aws through aws's gateway (health is open to every cloud).
    let (status, text, body) = running
        .call("search", "collector.ops.svc.cluster.local", "ping")
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        body["headers"]["x-trustweave-caller"][0].as_str(),
        Some(SEARCH_WORKER),
        "{body}"
    );

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
async fn a_trust_domain_added_at_run_time(running: &mut Running, dir: &Path) {
    let (td, uid) = ("azure.company.com", workload_uid(SUBNET, 2, 0));
    let spire_host = mesh::address(SUBNET, 2, mesh::hosts::SPIRE_SERVER);
    std::fs::create_dir_all(dir.join("azure/node")).expect("dir");
    for sub in ["azure", "azure/node"] {
        std::fs::set_permissions(
            dir.join(sub),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .expect("chmod");
    }
    let mut azure = CloudSpire::start(
        &dir.join("azure/spire"),
        td,
        SocketAddr::new(spire_host, mesh::ports::SPIRE_SERVER),
        SocketAddr::new(spire_host, mesh::ports::BUNDLE_ENDPOINT),
        Duration::from_secs(3600),
    )
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
    azure
        .start_agent(&node_sds::delegate_id(td), &node_sds::binary())
        .await
        .expect("azure's spire-agent");
    azure
        .register(PROCESSOR, &WorkloadSelector::Uid(uid), &["gcp.company.com"])
        .await
        .expect("entry");
    let sds = NodeSds::start(
        &node_sds::binary(),
        &dir.join("azure/node"),
        &azure.admin_endpoint(),
        SocketAddr::new(
            mesh::address(SUBNET, 2, mesh::hosts::SDS),
            mesh::ports::SDS_ADMIN,
        ),
        &[uid],
    )
    .await
    .expect("azure's trustweave-sds");

    // gcp's search federates with azure too: its Envoy's ROOTCA gains azure's CA, by SDS alone.
    let search = PROXIES
        .iter()
        .position(|p| p.name == "search")
        .expect("search");
    entry_federates_with(
        &running.spires[1],
        &running.entries[search],
        SEARCH_WORKER,
        workload_uid(SUBNET, 1, search),
        &["aws.company.com", td],
    )
    .await;
    let started = std::time::Instant::now();
    let (_, _, search_proxy) = running.proxy("search");
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
    let gcp_cluster = &running.clusters[1];
    let labels = Cluster::sidecar_labels("processor");
    let address = ip(1, LATE_HOST);
    gcp_cluster
        .add_workload("processor", "processing", "processor", address, &labels)
        .await
        .expect("processor's resources");
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let app = App::start(
        &running.late_site,
        SocketAddr::new(loopback, cluster::APP_PORT),
        "processor",
        SocketAddr::new(loopback, cluster::SERVICE_PORT),
    )
    .await;
    let spec = VmSpec {
        name: "processor".to_string(),
        namespace: "processing".to_string(),
        service_account: "processor".to_string(),
        labels,
        ip: address,
        uid,
        kind: ProxyKind::Sidecar,
    };
    let proxy = VmProxy::start(
        &running.late_site,
        &dir.join("azure/vm-processor"),
        spec,
        &gcp_cluster.istiod,
        &gcp_cluster.kube,
        sds.socket(),
        &trustweave_e2e::filter::wasm_path(),
    )
    .await
    .expect("processor's proxy");
    let certs = proxy.admin_get("/certs").await.expect("/certs");
    assert!(certs.contains(PROCESSOR), "{certs}");
    running._apps.push(app);
    running.proxies.push((1, running.late_site.clone(), proxy));

    // From azure into gcp: the filter at search sees azure's caller.
    let (status, text, body) = running
        .call("processor", "search.search.svc.cluster.local", "ping")
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        body["headers"]["x-trustweave-caller"][0].as_str(),
        Some(PROCESSOR),
        "{body}"
    );
    // From gcp into azure's workload: Istio checks the server's SAN against the
    // service account in istiod's trust domain and each alias.
    let (_, _, search_proxy) = running.proxy("search");
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
    let (status, text, body) = running
        .call("search", "processor.processing.svc.cluster.local", "ping")
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        body["headers"]["x-trustweave-caller"][0].as_str(),
        Some(SEARCH_WORKER),
        "{body}"
    );
    drop((azure, sds));
}

/// `spire-server entry update` of entry `id`: the same workload, federated with `trust_domains`.
async fn entry_federates_with(
    spire: &CloudSpire,
    id: &str,
    spiffe_id: &str,
    uid: u32,
    trust_domains: &[&str],
) {
    let parent = trustweave_e2e::mesh::spire::agent_id(spire.trust_domain());
    let selector = WorkloadSelector::Uid(uid).selector();
    let mut args = vec![
        "entry",
        "update",
        "-entryID",
        id,
        "-parentID",
        &parent,
        "-spiffeID",
        spiffe_id,
        "-selector",
        &selector,
    ];
    for td in trust_domains {
        args.extend(["-federatesWith", td]);
    }
    spire.server.cli(&args).await.expect("entry update");
}
