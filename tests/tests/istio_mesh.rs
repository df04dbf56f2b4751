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

/// A workload of this test: cloud index, name, namespace, service account, last octet.
struct Planned {
    cloud: usize,
    name: &'static str,
    namespace: &'static str,
    service_account: &'static str,
    host: u8,
}

const CLOUDS: [(&str, &str); 1] = [("aws", "aws.company.com")];
const WORKLOADS: [Planned; 2] = [
    Planned {
        cloud: 0,
        name: "collector",
        namespace: "ops",
        service_account: "collector",
        host: 10,
    },
    Planned {
        cloud: 0,
        name: "orchestrator",
        namespace: "ops",
        service_account: "orchestrator",
        host: 20,
    },
];
/// The control plane's last octet in each cloud.
const CONTROL_PLANE: u8 = 5;

fn ip(cloud: usize, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, SUBNET, cloud as u8 + 1, host))
}

struct Running {
    _namespaces: Namespaces,
    _spires: Vec<CloudSpire>,
    _sds: Vec<NodeSds>,
    clusters: Vec<Cluster>,
    _apps: Vec<App>,
    proxies: Vec<(Site, VmProxy)>,
}

impl Running {
    fn proxy(&self, name: &str) -> &(Site, VmProxy) {
        self.proxies
            .iter()
            .find(|(_, p)| p.spec().name == name)
            .unwrap_or_else(|| panic!("no proxy {name}"))
    }

    /// `from`'s app calls `host` through its sidecar, asking for `action`.
    async fn call(&self, from: &str, host: &str, action: &str) -> (u16, String, Value) {
        let (site, _) = self.proxy(from);
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
    for w in &WORKLOADS {
        names.push(format!("{}-{}", CLOUDS[w.cloud].0, &w.name[..4]));
        addresses.push(vec![ip(w.cloud, w.host)]);
    }
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let namespaces = Namespaces::create(SUBNET, &name_refs, &addresses).expect("namespaces");
    let site = |i: usize| Site::Namespace(Arc::clone(&namespaces.clouds[i]));

    // SPIRE and the node's trustweave-sds per cloud, first: the socket must answer before pilot-agent starts.
    let mut spires = Vec::new();
    let mut sds = Vec::new();
    for (i, (cloud, td)) in CLOUDS.iter().enumerate() {
        let cloud_dir = dir.join(cloud);
        std::fs::create_dir_all(&cloud_dir).expect("dir");
        std::fs::set_permissions(
            &cloud_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .expect("chmod");
        let host = mesh::address(SUBNET, i, mesh::hosts::SPIRE_SERVER);
        let mut spire = CloudSpire::start(
            &cloud_dir.join("spire"),
            td,
            SocketAddr::new(host, mesh::ports::SPIRE_SERVER),
            SocketAddr::new(host, mesh::ports::BUNDLE_ENDPOINT),
            Duration::from_secs(3600),
        )
        .await
        .expect("spire-server");
        spire
            .start_agent(&node_sds::delegate_id(td), &node_sds::binary())
            .await
            .expect("spire-agent");
        let mut uids = Vec::new();
        for (k, w) in WORKLOADS.iter().enumerate().filter(|(_, w)| w.cloud == i) {
            let uid = workload_uid(SUBNET, i, k);
            uids.push(uid);
            let id = format!("spiffe://{td}/ns/{}/sa/{}", w.namespace, w.service_account);
            spire
                .register(&id, &WorkloadSelector::Uid(uid), &[])
                .await
                .expect("entry");
        }
        let node_dir = cloud_dir.join("node");
        std::fs::create_dir_all(&node_dir).expect("dir");
        std::fs::set_permissions(
            &node_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .expect("chmod");
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
        spires.push(spire);
    }

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

    let wasm = trustweave_e2e::filter::wasm_path();
    let mut apps = Vec::new();
    let mut proxies = Vec::new();
    for (k, w) in WORKLOADS.iter().enumerate() {
        let cluster = &clusters[w.cloud];
        let labels = Cluster::sidecar_labels(w.name);
        let address = ip(w.cloud, w.host);
        cluster
            .add_workload(w.name, w.namespace, w.service_account, address, &labels)
            .await
            .unwrap_or_else(|e| panic!("{}: {e:#}", w.name));
        let vm_site = site(CLOUDS.len() + k);
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        apps.push(
            App::start(
                &vm_site,
                SocketAddr::new(loopback, cluster::APP_PORT),
                w.name,
                SocketAddr::new(loopback, cluster::SERVICE_PORT),
            )
            .await,
        );
        let spec = VmSpec {
            name: w.name.to_string(),
            namespace: w.namespace.to_string(),
            service_account: w.service_account.to_string(),
            labels,
            ip: address,
            uid: workload_uid(SUBNET, w.cloud, k),
            kind: ProxyKind::Sidecar,
        };
        let vm_dir = dir.join(CLOUDS[w.cloud].0).join(format!("vm-{}", w.name));
        let proxy = VmProxy::start(
            &vm_site,
            &vm_dir,
            spec,
            &cluster.istiod,
            &cluster.kube,
            sds[w.cloud].socket(),
            &wasm,
        )
        .await
        .unwrap_or_else(|e| panic!("{}'s proxy: {e:#}", w.name));
        proxies.push((vm_site, proxy));
    }
    Running {
        _namespaces: namespaces,
        _spires: spires,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn istiod_configures_vm_proxies_with_our_resources_and_trustweave_identities() {
    let dir = tempfile::Builder::new()
        .prefix("tw-istio-")
        .tempdir_in("/tmp")
        .expect("dir");
    let running = start(dir.path()).await;
    // For a failure's post-mortem: TRUSTWEAVE_KEEP=1 keeps the directory (logs, config dumps).
    let dir = if std::env::var_os("TRUSTWEAVE_KEEP").is_some() {
        eprintln!("keeping {}", dir.path().display());
        tempfile::TempDir::with_prefix_in("unused-", "/tmp")
            .map(|t| {
                let _ = dir.keep();
                t
            })
            .expect("dir")
    } else {
        dir
    };

    for (_, proxy) in &running.proxies {
        let name = &proxy.spec().name;
        // The SVID in Envoy is SPIRE's (pilot-agent did not fall back to istiod's CA).
        let certs = proxy.admin_get("/certs").await.expect("/certs");
        let id = format!(
            "spiffe://aws.company.com/ns/{}/sa/{}",
            proxy.spec().namespace,
            proxy.spec().service_account
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
        // The network filter of envoyfilter-sidecar-network.yaml; the WasmPlugin as
        // istiod names its ECDS resource (`extensions.istio.io/.../istio-system.wasmplugin-file~...`).
        for expected in [
            "envoy.filters.network.wasm",
            "/istio-system.wasmplugin-file~",
        ] {
            assert!(
                names.iter().any(|n| n.contains(expected)),
                "{name}: no {expected} in config_dump: {names:?}"
            );
        }
        let text = dump.to_string();
        assert!(text.contains("APPEND_FORWARD"), "{name}: no XFCC patch");
        assert!(
            text.contains("ON_DOWNSTREAM_DATA"),
            "{name}: no tcp_proxy patch"
        );
        // Nothing rejected, by Envoy or as istiod saw it.
        assert_eq!(proxy.updates_rejected().await.expect("stats"), 0, "{name}");
    }
    for cluster in &running.clusters {
        let status = cluster.istiod.sync_status().await.expect("syncz");
        assert_eq!(status.len(), running.proxies.len(), "{status:?}");
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

    // The guide's calls: same trust domain allowed, the filter names the caller at the backend.
    let (status, text, body) = running
        .call("orchestrator", "collector.ops.svc.cluster.local", "collect")
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        body["headers"]["x-trustweave-caller"][0].as_str(),
        Some(ORCHESTRATOR),
        "{body}"
    );
}
