//! Two clusters multi-primary on this machine, as `tests/tests/istio_mesh.rs`
//! and `make demo-istio` run them: aws and gcp, each with its own etcd,
//! kube-apiserver and istiod ([`Cluster`]), its own SPIRE server, node agent
//! and node trustweave-sds, and VM proxies ([`VmProxy`]): an east-west gateway
//! and the guide's workloads, each in its own network namespace
//! (`10.<subnet>.<cloud + 1>.<host>`) as its own user, an app behind each
//! sidecar. SPIRE and trustweave-sds are host-side, reached over Unix sockets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use super::cluster::{self, Cluster};
use super::vm::{ProxyKind, VmProxy, VmSpec};
use crate::mesh::app::{App, ACTION_HEADER};
use crate::mesh::netns::{Namespaces, NetNs, Site};
use crate::mesh::node_sds::{self, NodeSds};
use crate::mesh::spire::{CloudSpire, WorkloadSelector};
use crate::mesh::{self, workload_uid};

/// A proxy of the mesh: its cloud (index into [`CLOUDS`]), name, namespace,
/// service account, last octet of its address, kind.
#[derive(Clone, Copy, Debug)]
pub struct Planned {
    #[allow(missing_docs)]
    pub cloud: usize,
    #[allow(missing_docs)]
    pub name: &'static str,
    #[allow(missing_docs)]
    pub namespace: &'static str,
    #[allow(missing_docs)]
    pub service_account: &'static str,
    #[allow(missing_docs)]
    pub host: u8,
    #[allow(missing_docs)]
    pub kind: ProxyKind,
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
pub const CLOUDS: [(&str, &str); 2] = [("aws", "aws.company.com"), ("gcp", "gcp.company.com")];
/// The proxies: each cloud's east-west gateway, then the guide's workloads.
pub const PROXIES: [Planned; 5] = [
    gateway(0),
    gateway(1),
    sidecar(0, "collector", "ops", "collector", 10),
    sidecar(0, "orchestrator", "ops", "orchestrator", 20),
    sidecar(1, "search", "search", "search-worker", 10),
];
/// The last octet of the VM added at run time.
pub const LATE_HOST: u8 = 30;

/// The control plane's last octet in each cloud.
pub const CONTROL_PLANE: u8 = 5;

/// A mesh address: `10.<subnet>.<cloud + 1>.<host>`, in that host's network namespace.
pub fn ip(subnet: u8, cloud: usize, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, subnet, cloud as u8 + 1, host))
}

/// The running mesh; everything stops on drop.
pub struct IstioMesh {
    /// Second octet of every address.
    pub subnet: u8,
    _namespaces: Namespaces,
    /// Each cloud's SPIRE, in [`CLOUDS`] order.
    pub spires: Vec<CloudSpire>,
    /// Each proxy's SPIRE entry ID, in [`PROXIES`] order.
    pub entries: Vec<String>,
    /// The network namespace kept for the VM of the trust domain added at run time.
    pub late_site: Site,
    /// Each cloud's node trustweave-sds.
    pub sds: Vec<NodeSds>,
    /// Each cloud's cluster.
    pub clusters: Vec<Cluster>,
    /// The apps behind the sidecars.
    pub apps: Vec<App>,
    /// Each proxy with its cloud's index and its site.
    pub proxies: Vec<(usize, Site, VmProxy)>,
}

/// An answer to a call: status, body, and the body as JSON (the app's echo) if it is.
pub type Answer = (u16, String, Value);

impl IstioMesh {
    /// The proxy named `name`, with its cloud's index and its site.
    pub fn proxy(&self, name: &str) -> anyhow::Result<&(usize, Site, VmProxy)> {
        self.proxies
            .iter()
            .find(|(_, _, p)| p.spec().name == name)
            .with_context(|| format!("no proxy {name}"))
    }

    /// This mesh's address of `host` in `cloud`.
    pub fn ip(&self, cloud: usize, host: u8) -> IpAddr {
        ip(self.subnet, cloud, host)
    }

    /// `from`'s app calls `host` through its sidecar, asking for `action`.
    pub async fn call(&self, from: &str, host: &str, action: &str) -> anyhow::Result<Answer> {
        let (_, site, _) = self.proxy(from)?;
        let outbound = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), cluster::SERVICE_PORT);
        let stream = site
            .connect(outbound)
            .await
            .with_context(|| format!("{from}'s sidecar egress listener"))?;
        let response = crate::http::request_on(
            stream,
            "GET",
            "/",
            &[("host", host), (ACTION_HEADER, action)],
        )
        .await
        .with_context(|| format!("{from} → {host}"))?;
        let body = serde_json::from_str(&response.body).unwrap_or(Value::Null);
        Ok((response.status, response.body, body))
    }
}

impl IstioMesh {
    /// Starts the mesh in `dir` (its files) on addresses `10.<subnet>.*`.
    /// Needs root: network namespaces, and a user per VM.
    pub async fn start(dir: &Path, subnet: u8) -> anyhow::Result<Self> {
        anyhow::ensure!(
            NetNs::available(),
            "the Istio mesh needs root: network namespaces and a user per VM"
        );
        let ip = |cloud: usize, host: u8| ip(subnet, cloud, host);
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))
            .context("chmod")?;
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
        let namespaces =
            Namespaces::create(subnet, &name_refs, &addresses).context("namespaces")?;
        let site = |i: usize| Site::Namespace(Arc::clone(&namespaces.clouds[i]));
        // VM users reach the sockets below: directories they may pass through.
        let chmod = |path: &Path| -> anyhow::Result<()> {
            std::fs::create_dir_all(path)?;
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o711))
                .with_context(|| path.display().to_string())
        };

        // SPIRE per cloud, federated both ways; then each node's agent, entries
        // and trustweave-sds, first: its socket must answer before pilot-agent starts.
        let mut spires = Vec::new();
        for (i, (cloud, td)) in CLOUDS.iter().enumerate() {
            chmod(&dir.join(cloud))?;
            let host = mesh::address(subnet, i, mesh::hosts::SPIRE_SERVER);
            spires.push(
                CloudSpire::start(
                    &dir.join(cloud).join("spire"),
                    td,
                    SocketAddr::new(host, mesh::ports::SPIRE_SERVER),
                    SocketAddr::new(host, mesh::ports::BUNDLE_ENDPOINT),
                    Duration::from_secs(3600),
                )
                .await
                .context("spire-server")?,
            );
        }
        {
            let (aws, gcp) = spires.split_at_mut(1);
            aws[0]
                .federate_with(&gcp[0])
                .await
                .context("aws federates with gcp")?;
            gcp[0]
                .federate_with(&aws[0])
                .await
                .context("gcp federates with aws")?;
        }
        let mut sds = Vec::new();
        let mut entries = vec![String::new(); PROXIES.len()];
        for (i, (cloud, td)) in CLOUDS.iter().enumerate() {
            let spire = &mut spires[i];
            spire
                .start_agent(&node_sds::delegate_id(td), &node_sds::binary())
                .await
                .context("spire-agent")?;
            let peers: Vec<&str> = CLOUDS.iter().map(|c| c.1).filter(|t| t != td).collect();
            let mut uids = Vec::new();
            for (k, p) in PROXIES.iter().enumerate().filter(|(_, p)| p.cloud == i) {
                let uid = workload_uid(subnet, i, k);
                uids.push(uid);
                let id = format!("spiffe://{td}/ns/{}/sa/{}", p.namespace, p.service_account);
                entries[k] = spire
                    .register(&id, &WorkloadSelector::Uid(uid), &peers)
                    .await
                    .context("entry")?;
            }
            let node_dir = dir.join(cloud).join("node");
            chmod(&node_dir)?;
            sds.push(
                NodeSds::start(
                    &node_sds::binary(),
                    &node_dir,
                    &spire.admin_endpoint(),
                    SocketAddr::new(
                        mesh::address(subnet, i, mesh::hosts::SDS),
                        mesh::ports::SDS_ADMIN,
                    ),
                    &uids,
                )
                .await
                .context("trustweave-sds")?,
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
                .with_context(|| format!("{cloud}'s cluster"))?,
            );
        }
        for (i, here) in clusters.iter().enumerate() {
            here.add_gateway(ip(i, mesh::hosts::GATEWAY))
                .await
                .with_context(|| format!("{}'s gateway", here.cloud))?;
            for remote in clusters.iter().filter(|c| c.cloud != here.cloud) {
                here.add_remote(remote)
                    .await
                    .with_context(|| format!("{} reads {}", here.cloud, remote.cloud))?;
            }
        }

        let wasm = crate::filter::wasm_path();
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
                        .context(p.name)?;
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
                uid: workload_uid(subnet, p.cloud, k),
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
            .with_context(|| format!("{}'s proxy", p.name))?;
            proxies.push((p.cloud, vm_site, proxy));
        }
        let late_site = site(CLOUDS.len() + PROXIES.len());
        Ok(Self {
            subnet,
            _namespaces: namespaces,
            spires,
            entries,
            late_site,
            sds,
            clusters,
            apps,
            proxies,
        })
    }
}
