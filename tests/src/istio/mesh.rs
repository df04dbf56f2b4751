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

/// A proxy of the mesh.
#[derive(Clone, Copy, Debug)]
pub struct Planned {
    /// The cluster it joins (index into [`CLOUDS`]).
    pub cloud: usize,
    /// Workload name (also its Service's).
    pub name: &'static str,
    /// Kubernetes namespace.
    pub namespace: &'static str,
    /// Service account.
    pub service_account: &'static str,
    /// Last octet of its address.
    pub host: u8,
    /// Sidecar or gateway.
    pub kind: ProxyKind,
}

/// A sidecar VM of cluster `cloud`.
pub const fn sidecar(
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
/// The VM of the trust domain added at run time (azure's processor, in the
/// gcp cluster): its network namespace is made with the others, it starts
/// with [`IstioMesh::add_late_vm`].
pub const LATE_VM: Planned = sidecar(1, "processor", "processing", "processor", 30);

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
        let response = site
            .request(
                outbound,
                "GET",
                "/",
                &[("host", host), (ACTION_HEADER, action)],
            )
            .await
            .with_context(|| format!("{from} → {host} through its sidecar"))?;
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
        // The last one is kept for the VM added at run time.
        for p in PROXIES.iter().chain([&LATE_VM]) {
            names.push(format!(
                "{}-{}",
                CLOUDS[p.cloud].0,
                &p.name[..6.min(p.name.len())]
            ));
            addresses.push(vec![ip(p.cloud, p.host)]);
        }
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let namespaces =
            Namespaces::create(subnet, &name_refs, &addresses).context("namespaces")?;
        let site = |i: usize| Site::Namespace(Arc::clone(&namespaces.clouds[i]));

        // SPIRE per cloud, federated both ways; then each node's agent, entries
        // and trustweave-sds, first: its socket must answer before pilot-agent starts.
        let mut spires = Vec::new();
        for (i, (cloud, td)) in CLOUDS.iter().enumerate() {
            spires.push(start_spire(dir, subnet, i, cloud, td).await?);
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
            let peers: Vec<&str> = CLOUDS.iter().map(|c| c.1).filter(|t| t != td).collect();
            let (indices, workloads): (Vec<usize>, Vec<(String, u32)>) = PROXIES
                .iter()
                .enumerate()
                .filter(|(_, p)| p.cloud == i)
                .map(|(k, p)| {
                    let id = format!("spiffe://{td}/ns/{}/sa/{}", p.namespace, p.service_account);
                    (k, (id, workload_uid(subnet, i, k)))
                })
                .unzip();
            let (ids, node) =
                start_node(dir, subnet, i, cloud, &mut spires[i], &workloads, &peers).await?;
            for (k, id) in indices.into_iter().zip(ids) {
                entries[k] = id;
            }
            sds.push(node);
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

        let mut apps = Vec::new();
        let mut proxies = Vec::new();
        for (k, p) in PROXIES.iter().enumerate() {
            let vm_site = site(CLOUDS.len() + k);
            let (app, proxy) = start_vm(
                &clusters[p.cloud],
                p,
                &vm_site,
                ip(p.cloud, p.host),
                workload_uid(subnet, p.cloud, k),
                &dir.join(CLOUDS[p.cloud].0).join(format!("vm-{}", p.name)),
                sds[p.cloud].socket(),
            )
            .await?;
            apps.extend(app);
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

impl IstioMesh {
    /// Starts [`LATE_VM`] in its cluster, in the network namespace kept for it,
    /// as `uid`, its files in `vm_dir`, certificates from `sds_socket` (a node
    /// of another trust domain, say); returns its proxy.
    pub async fn add_late_vm(
        &mut self,
        uid: u32,
        vm_dir: &Path,
        sds_socket: &Path,
    ) -> anyhow::Result<&VmProxy> {
        let (app, proxy) = start_vm(
            &self.clusters[LATE_VM.cloud],
            &LATE_VM,
            &self.late_site,
            self.ip(LATE_VM.cloud, LATE_VM.host),
            uid,
            vm_dir,
            sds_socket,
        )
        .await?;
        self.apps.extend(app);
        self.proxies
            .push((LATE_VM.cloud, self.late_site.clone(), proxy));
        Ok(&self.proxies[self.proxies.len() - 1].2)
    }
}

/// Makes `path` a directory VM users may pass through (they reach sockets below it).
fn passable_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o711))
        .with_context(|| path.display().to_string())
}

/// Starts the SPIRE server of trust domain `td` for the cloud `name` (slot
/// `cloud` of the host-side addresses `127.<subnet>.<cloud + 1>.*`), its files
/// in `<dir>/<name>/spire`.
pub async fn start_spire(
    dir: &Path,
    subnet: u8,
    cloud: usize,
    name: &str,
    td: &str,
) -> anyhow::Result<CloudSpire> {
    passable_dir(&dir.join(name))?;
    let host = mesh::address(subnet, cloud, mesh::hosts::SPIRE_SERVER);
    CloudSpire::start(
        &dir.join(name).join("spire"),
        td,
        SocketAddr::new(host, mesh::ports::SPIRE_SERVER),
        SocketAddr::new(host, mesh::ports::BUNDLE_ENDPOINT),
        Duration::from_secs(3600),
    )
    .await
    .with_context(|| format!("{name}'s spire-server"))
}

/// Starts the node of `spire`'s cloud `name`: its agent, an entry per
/// `(SPIFFE ID, uid)` of `workloads` federated with `peers`, and the node's
/// trustweave-sds (its socket open to those users, files in
/// `<dir>/<name>/node`). Returns the entry IDs, in `workloads` order, and the
/// trustweave-sds.
pub async fn start_node(
    dir: &Path,
    subnet: u8,
    cloud: usize,
    name: &str,
    spire: &mut CloudSpire,
    workloads: &[(String, u32)],
    peers: &[&str],
) -> anyhow::Result<(Vec<String>, NodeSds)> {
    let td = spire.trust_domain().to_string();
    spire
        .start_agent(&node_sds::delegate_id(&td), &node_sds::binary())
        .await
        .with_context(|| format!("{name}'s spire-agent"))?;
    let mut entries = Vec::new();
    for (id, uid) in workloads {
        entries.push(
            spire
                .register(id, &WorkloadSelector::Uid(*uid), peers)
                .await
                .with_context(|| format!("the entry of {id}"))?,
        );
    }
    let node_dir = dir.join(name).join("node");
    passable_dir(&node_dir)?;
    let uids: Vec<u32> = workloads.iter().map(|(_, uid)| *uid).collect();
    let sds = NodeSds::start(
        &node_sds::binary(),
        &node_dir,
        &spire.admin_endpoint(),
        SocketAddr::new(
            mesh::address(subnet, cloud, mesh::hosts::SDS),
            mesh::ports::SDS_ADMIN,
        ),
        &uids,
    )
    .await
    .with_context(|| format!("{name}'s trustweave-sds"))?;
    Ok((entries, sds))
}

/// Registers the VM `planned` in `cluster` (a sidecar's Service, WorkloadEntry
/// and Sidecar; a gateway's resources are the cluster's own) and starts it in
/// `site` at `address` as `uid`, its files in `vm_dir`, certificates from
/// `sds_socket`; a sidecar's app too.
pub async fn start_vm(
    cluster: &Cluster,
    planned: &Planned,
    site: &Site,
    address: IpAddr,
    uid: u32,
    vm_dir: &Path,
    sds_socket: &Path,
) -> anyhow::Result<(Option<App>, VmProxy)> {
    let p = planned;
    let (labels, app) = match p.kind {
        ProxyKind::Router => (cluster.gateway_labels(), None),
        ProxyKind::Sidecar => {
            let labels = Cluster::sidecar_labels(p.name);
            cluster
                .add_workload(p.name, p.namespace, p.service_account, address, &labels)
                .await
                .with_context(|| format!("{}'s resources", p.name))?;
            let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let app = App::start(
                site,
                SocketAddr::new(loopback, cluster::APP_PORT),
                p.name,
                SocketAddr::new(loopback, cluster::SERVICE_PORT),
            )
            .await;
            (labels, Some(app))
        }
    };
    let spec = VmSpec {
        name: p.name.to_string(),
        namespace: p.namespace.to_string(),
        service_account: p.service_account.to_string(),
        labels,
        ip: address,
        uid,
        kind: p.kind,
    };
    let proxy = VmProxy::start(
        site,
        vm_dir,
        spec,
        &cluster.istiod,
        &cluster.kube,
        sds_socket,
        &crate::filter::wasm_path(),
    )
    .await
    .with_context(|| format!("{}'s proxy", p.name))?;
    Ok((app, proxy))
}
