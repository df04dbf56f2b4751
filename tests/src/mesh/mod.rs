//! The cross-cloud mesh on one machine: three federated clouds (AWS, GCP,
//! Azure, each its own trust domain and real SPIRE) and an on-prem domain
//! that federates with nobody. Per cloud: SPIRE (a `spire-server` with its
//! `https_spiffe` bundle endpoint, a `spire-agent` for the node), one
//! node-level `trustweave-sds` process (the agent's authorized delegate), two
//! workloads (a service and a caller), each an app behind its own sidecar
//! Envoy, and an east-west gateway Envoy on `15443`. As root each sidecar runs
//! as its own user and is registered by `unix:uid:N`; otherwise each runs from
//! its own path of the Envoy binary, registered by `unix:path:`. Each cloud has its own addresses: as root, inside a
//! network namespace of its own (`10.<subnet>.<cloud>.<host>`, see
//! [`netns`]); otherwise on loopback (`127.<subnet>.<cloud>.<host>`). Meshes
//! with different subnets run side by side; the gateway keeps its address
//! across restarts. SPIRE (servers, bundle endpoints, agents) and the node
//! trustweave-sds processes are host-side, reached over Unix sockets.
//!
//! Used by the end-to-end test (`tests/tests/mesh.rs`) and `make demo`.

pub mod app;
pub mod bootstrap;
pub mod doctor;
pub mod netns;
pub mod node_sds;
pub mod otlp;
pub mod report;
pub mod spire;

use std::fs::Permissions;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::envoy::Envoy;
use crate::http::HttpResponse;
use app::App;
use bootstrap::Route;
use netns::{Namespaces, NetNs, Site};
use node_sds::NodeSds;
use otlp::OtlpReceiver;
use spire::{CloudSpire, WorkloadSelector};

/// A workload of the plan.
#[derive(Clone, Debug)]
pub struct WorkloadPlan {
    /// Service name (`search`).
    pub name: &'static str,
    /// Namespace.
    pub namespace: &'static str,
    /// Service account.
    pub service_account: &'static str,
    /// Last octet of its pod address.
    pub pod: u8,
}

/// A cloud of the plan.
#[derive(Clone, Debug)]
pub struct CloudPlan {
    /// Short name (`aws`), also the `istio/clouds/<name>/` directory.
    pub name: &'static str,
    /// Trust domain.
    pub trust_domain: &'static str,
    /// Region.
    pub region: &'static str,
    /// Whether it federates with the other federated clouds (on-prem does not).
    pub federated: bool,
    /// Its workloads: the service first, then the caller.
    pub workloads: Vec<WorkloadPlan>,
}

impl WorkloadPlan {
    /// Its SPIFFE ID in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    /// Its service host.
    pub fn host(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// The SNI Istio uses for it.
    pub fn sni(&self) -> String {
        format!("outbound_.8080_._.{}", self.host())
    }
}

fn workload(
    name: &'static str,
    namespace: &'static str,
    service_account: &'static str,
    pod: u8,
) -> WorkloadPlan {
    WorkloadPlan {
        name,
        namespace,
        service_account,
        pod,
    }
}

/// The plan of the users' multi-cloud guide.
pub fn plan() -> Vec<CloudPlan> {
    vec![
        CloudPlan {
            name: "aws",
            trust_domain: "aws.company.com",
            region: "us-east-1",
            federated: true,
            workloads: vec![
                workload("collector", "ops", "collector", 10),
                workload("orchestrator", "ops", "orchestrator", 20),
            ],
        },
        CloudPlan {
            name: "gcp",
            trust_domain: "gcp.company.com",
            region: "us-central1",
            federated: true,
            workloads: vec![
                workload("search", "search", "search-worker", 10),
                workload("indexer", "search", "indexer", 20),
            ],
        },
        CloudPlan {
            name: "azure",
            trust_domain: "azure.company.com",
            region: "eastus",
            federated: true,
            workloads: vec![
                workload("processor", "processing", "processor", 10),
                workload("reporter", "analytics", "reporter", 20),
            ],
        },
        CloudPlan {
            name: "onprem",
            trust_domain: "onprem.company.com",
            region: "dc1",
            federated: false,
            workloads: vec![workload("legacy", "legacy", "client", 20)],
        },
    ]
}

/// Ports, as Istio uses them.
pub mod ports {
    /// Sidecar inbound.
    pub const INBOUND: u16 = 15006;
    /// Sidecar outbound.
    pub const OUTBOUND: u16 = 15001;
    /// The app.
    pub const APP: u16 = 8080;
    /// East-west gateway.
    pub const GATEWAY: u16 = 15443;
    /// SPIRE server bundle endpoint.
    pub const BUNDLE_ENDPOINT: u16 = 8443;
    /// SPIRE server API (for its agent).
    pub const SPIRE_SERVER: u16 = 8081;
    /// trustweave-sds admin.
    pub const SDS_ADMIN: u16 = 15200;
}

/// Last octets of a cloud's addresses (pods: [`WorkloadPlan::pod`]).
pub mod hosts {
    /// East-west gateway.
    pub const GATEWAY: u8 = 1;
    /// SPIRE server (bundle endpoint), host-side.
    pub const SPIRE_SERVER: u8 = 2;
    /// The node's trustweave-sds admin endpoint, host-side.
    pub const SDS: u8 = 3;
}

/// Options of a mesh.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    /// Working directory (sockets, configurations, logs).
    pub dir: PathBuf,
    /// Second octet of every address: meshes with different subnets do not collide.
    pub subnet: u8,
    /// Lifetime of issued SVIDs (SPIRE's `default_x509_svid_ttl`; agents rotate at half of it).
    pub svid_ttl: Duration,
    /// The trustweave-sds binary.
    pub sds_bin: PathBuf,
    /// Each cloud in its own network namespace (needs root).
    pub namespaces: bool,
}

impl MeshOptions {
    /// Defaults for `dir` and `subnet`: 1 h SVIDs, the built trustweave-sds,
    /// namespaces when they can be made (root).
    pub fn new(dir: &Path, subnet: u8) -> Self {
        Self {
            dir: dir.to_path_buf(),
            subnet,
            svid_ttl: Duration::from_secs(3600),
            sds_bin: node_sds::binary(),
            namespaces: NetNs::available(),
        }
    }
}

/// One running workload.
pub struct Workload {
    /// Its plan.
    pub plan: WorkloadPlan,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// How SPIRE selects it.
    pub selector: WorkloadSelector,
    /// Its SPIRE entry.
    pub entry_id: String,
    /// The app.
    pub app: App,
    /// Its sidecar.
    pub sidecar: Envoy,
    /// The sidecar's outbound listener (where its app sends requests).
    pub outbound: SocketAddr,
}

/// One running cloud.
pub struct Cloud {
    /// Its plan.
    pub plan: CloudPlan,
    /// Where its data plane runs.
    pub site: Site,
    /// Its SPIRE.
    pub spire: CloudSpire,
    /// Its node's trustweave-sds.
    pub sds: NodeSds,
    /// Its workloads (service first).
    pub workloads: Vec<Workload>,
    /// The trust domains its workloads federate with.
    pub federates_with: Vec<&'static str>,
    /// Its east-west gateway (none on-prem).
    pub gateway: Option<Envoy>,
    /// The gateway's address.
    pub gateway_addr: SocketAddr,
    gateway_bootstrap: Value,
}

impl Cloud {
    /// The workload named `name`.
    pub fn workload(&self, name: &str) -> &Workload {
        self.workloads
            .iter()
            .find(|w| w.plan.name == name)
            .unwrap_or_else(|| panic!("{} has no workload {name}", self.plan.name))
    }

    /// The service (first workload).
    pub fn service(&self) -> &Workload {
        &self.workloads[0]
    }

    /// The caller (last workload).
    pub fn caller(&self) -> &Workload {
        self.workloads.last().expect("a workload")
    }
}

/// The name of cloud `plan`'s gateway Envoy (its files in the mesh directory).
fn gateway_name(plan: &CloudPlan) -> String {
    format!("{}-eastwest", plan.name)
}

/// The trust domains `cloud` federates with: every other federated cloud's (none on-prem).
fn federation_peers(cloud: &CloudPlan, all: &[CloudPlan]) -> Vec<&'static str> {
    if !cloud.federated {
        return Vec::new();
    }
    all.iter()
        .filter(|c| c.name != cloud.name && c.federated)
        .map(|c| c.trust_domain)
        .collect()
}

/// `items[i]` mutable beside `items[j]` (`i != j`).
fn pair_mut<T>(items: &mut [T], i: usize, j: usize) -> (&mut T, &T) {
    assert_ne!(i, j);
    if i < j {
        let (left, right) = items.split_at_mut(j);
        (&mut left[i], &right[0])
    } else {
        let (left, right) = items.split_at_mut(i);
        (&mut right[0], &left[j])
    }
}

/// The user workload `k` of cloud `cloud` runs as (as root): distinct across meshes' subnets.
pub fn workload_uid(subnet: u8, cloud: usize, k: usize) -> u32 {
    20_000 + u32::from(subnet) * 100 + cloud as u32 * 10 + k as u32
}

/// Where a mesh in `dir` keeps its Envoys' files.
fn envoy_dir(dir: &Path) -> PathBuf {
    dir.join("envoy")
}

async fn wait_for_port_free(site: &Site, addr: SocketAddr) {
    crate::wait::wait_until(
        &format!("{addr} free"),
        Duration::from_secs(10),
        || async move { site.bind(addr).await.is_ok() },
    )
    .await;
}

/// The running mesh.
pub struct Mesh {
    /// Its options.
    pub options: MeshOptions,
    /// The clouds, in plan order (on-prem last).
    pub clouds: Vec<Cloud>,
    /// Where every Envoy exports spans.
    pub otlp: OtlpReceiver,
    /// The clouds' network namespaces, if any (deleted last).
    pub namespaces: Option<Namespaces>,
}

/// The answer to a call.
#[derive(Debug)]
pub struct Call {
    /// HTTP status at the caller.
    pub status: u16,
    /// The answer's JSON (the echo of the headers received, and what was relayed).
    pub body: Value,
    /// The raw response.
    pub response: HttpResponse,
}

impl Call {
    /// The first value of header `name` the called service received.
    pub fn received(&self, name: &str) -> Option<&str> {
        self.body["headers"][name][0].as_str()
    }
}

impl Mesh {
    /// Cloud `name`.
    pub fn cloud(&self, name: &str) -> &Cloud {
        self.clouds
            .iter()
            .find(|c| c.plan.name == name)
            .unwrap_or_else(|| panic!("no cloud {name}"))
    }

    /// Cloud `name`, mutable.
    pub fn cloud_mut(&mut self, name: &str) -> &mut Cloud {
        self.clouds
            .iter_mut()
            .find(|c| c.plan.name == name)
            .unwrap_or_else(|| panic!("no cloud {name}"))
    }

    /// Where every Envoy's configuration, log and admin address are (writable by every workload user).
    pub fn envoy_dir(&self) -> PathBuf {
        envoy_dir(&self.options.dir)
    }

    /// Restarts cloud `name`'s east-west gateway (a new process on the same address).
    pub async fn restart_gateway(&mut self, name: &str) {
        let dir = self.envoy_dir();
        let cloud = self.cloud_mut(name);
        cloud.gateway = None; // killed on drop
        wait_for_port_free(&cloud.site, cloud.gateway_addr).await;
        let gateway = Envoy::start_at(
            &cloud.site,
            &gateway_name(&cloud.plan),
            &dir,
            &cloud.gateway_bootstrap,
        )
        .await;
        gateway.wait_live().await;
        cloud.gateway = Some(gateway);
    }

    /// Restarts cloud `name`'s east-west gateway with its listener's MSS clamp
    /// (`istio/envoyfilter-gateway-mss.yaml`) on or off.
    pub async fn set_gateway_mss_clamp(&mut self, name: &str, clamp: bool) {
        let cloud = self.cloud_mut(name);
        let listener = &mut cloud.gateway_bootstrap["static_resources"]["listeners"][0];
        for (key, value) in crate::filter::istio_listener_fields(crate::filter::GATEWAY_MSS) {
            match listener.as_object_mut() {
                Some(fields) if clamp => {
                    fields.insert(key, value);
                }
                Some(fields) => {
                    fields.remove(&key);
                }
                None => panic!("the gateway bootstrap has no listener"),
            }
        }
        self.restart_gateway(name).await;
    }

    /// Builds and starts everything; returns once every Envoy is `LIVE`.
    pub async fn start(options: MeshOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.dir)?;
        let plan = plan();
        let otlp = OtlpReceiver::start(&options.dir.join("otlp.sock")).await;
        let subnet = options.subnet;
        let namespaces = if options.namespaces {
            let names: Vec<&str> = plan.iter().map(|c| c.name).collect();
            // The gateway's and the pods' addresses, inside each cloud's namespace.
            let addresses: Vec<Vec<IpAddr>> = plan
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    std::iter::once(hosts::GATEWAY)
                        .chain(c.workloads.iter().map(|w| w.pod))
                        .map(|h| data_address(subnet, true, i, h))
                        .collect()
                })
                .collect();
            Some(Namespaces::create(subnet, &names, &addresses)?)
        } else {
            None
        };
        eprintln!(
            "mesh {subnet}: {}",
            if namespaces.is_some() {
                "each cloud in its own network namespace"
            } else {
                "every cloud on loopback addresses"
            }
        );
        let site = |i: usize| match &namespaces {
            Some(ns) => Site::Namespace(Arc::clone(&ns.clouds[i])),
            None => Site::Host,
        };
        let in_ns = namespaces.is_some();
        let data = |cloud: usize, host: u8| data_address(subnet, in_ns, cloud, host);

        // SPIRE per cloud, then federation between the federated clouds, each
        // pair's first refresh checked; on-prem federates with nobody.
        let as_root = rustix::process::geteuid().is_root();
        let envoys = envoy_dir(&options.dir);
        std::fs::create_dir_all(&envoys)?;
        if as_root {
            // Workload users reach their sockets and write their Envoy files.
            std::fs::set_permissions(&options.dir, Permissions::from_mode(0o711))?;
            std::fs::set_permissions(&envoys, Permissions::from_mode(0o1777))?;
            std::fs::set_permissions(otlp.socket(), Permissions::from_mode(0o666))?;
        }
        let mut spires = Vec::new();
        for (i, cloud) in plan.iter().enumerate() {
            let dir = options.dir.join(cloud.name);
            std::fs::create_dir_all(&dir)?;
            if as_root {
                std::fs::set_permissions(&dir, Permissions::from_mode(0o711))?;
            }
            let host = address(subnet, i, hosts::SPIRE_SERVER);
            spires.push(
                CloudSpire::start(
                    &dir,
                    cloud.trust_domain,
                    SocketAddr::new(host, ports::SPIRE_SERVER),
                    SocketAddr::new(host, ports::BUNDLE_ENDPOINT),
                    options.svid_ttl,
                )
                .await?,
            );
        }
        for i in 0..spires.len() {
            for j in 0..spires.len() {
                if i != j && plan[i].federated && plan[j].federated {
                    let (spire, peer) = pair_mut(&mut spires, i, j);
                    spire.federate_with(peer).await?;
                }
            }
        }
        // Each workload's selector, its entry's `federatesWith`, then the node agent.
        let mut selectors = Vec::new();
        for (i, cloud) in plan.iter().enumerate() {
            let spire = &mut spires[i];
            spire
                .start_agent(&node_sds::delegate_id(cloud.trust_domain), &options.sds_bin)
                .await?;
            let mut of_cloud = Vec::new();
            for (k, w) in cloud.workloads.iter().enumerate() {
                let selector = if as_root {
                    WorkloadSelector::Uid(workload_uid(subnet, i, k))
                } else {
                    let path = envoys.join(format!("envoy-{}-{}", cloud.name, w.name));
                    WorkloadSelector::Path(crate::envoy::binary_at(&path)?)
                };
                let peers = federation_peers(cloud, &plan);
                let entry = spire
                    .register(&w.spiffe_id(cloud.trust_domain), &selector, &peers)
                    .await?;
                of_cloud.push((selector, entry));
            }
            selectors.push(of_cloud);
        }

        // Every service's route: its pod in its own cloud, its cloud's gateway from elsewhere.
        let route = |from: usize| -> Vec<Route> {
            plan.iter()
                .enumerate()
                .filter(|(_, c)| c.federated)
                .flat_map(|(i, c)| {
                    c.workloads.iter().map(move |w| Route {
                        host: w.host(),
                        sni: w.sni(),
                        spiffe_id: w.spiffe_id(c.trust_domain),
                        endpoint: if i == from {
                            SocketAddr::new(data(i, w.pod), ports::INBOUND)
                        } else {
                            SocketAddr::new(data(i, hosts::GATEWAY), ports::GATEWAY)
                        },
                    })
                })
                .collect()
        };

        let mut clouds = Vec::new();
        for (((i, cloud), spire), registered) in plan.iter().enumerate().zip(spires).zip(selectors)
        {
            let dir = options.dir.join(cloud.name);
            let site = site(i);
            let uids: Vec<u32> = registered
                .iter()
                .filter_map(|(selector, _)| match selector {
                    WorkloadSelector::Uid(uid) => Some(*uid),
                    WorkloadSelector::Path(_) => None,
                })
                .collect();
            let sds = NodeSds::start(
                &options.sds_bin,
                &dir,
                &spire.admin_endpoint(),
                SocketAddr::new(address(subnet, i, hosts::SDS), ports::SDS_ADMIN),
                &uids,
            )
            .await?;
            let routes = route(i);
            let federates_with = federation_peers(cloud, &plan);
            let mut workloads = Vec::new();
            for (w, (selector, entry_id)) in cloud.workloads.iter().zip(registered) {
                let pod = data(i, w.pod);
                let outbound = SocketAddr::new(pod, ports::OUTBOUND);
                let service_name = format!("{}.{}", w.name, cloud.name);
                let app = App::start(
                    &site,
                    SocketAddr::new(pod, ports::APP),
                    &service_name,
                    outbound,
                )
                .await;
                let filter = cloud.federated.then(|| {
                    crate::filter::istio_filter(&format!(
                        "clouds/{}/{}",
                        cloud.name,
                        crate::filter::SIDECAR_HTTP
                    ))
                });
                let node_id = format!(
                    "sidecar~{pod}~{}.{}~{}.svc.cluster.local",
                    w.name, w.namespace, w.namespace
                );
                let config = bootstrap::sidecar(&bootstrap::Sidecar {
                    node_id: &node_id,
                    service_name: &service_name,
                    region: cloud.region,
                    inbound: SocketAddr::new(pod, ports::INBOUND),
                    outbound,
                    app: app.addr(),
                    filter,
                    routes: &routes,
                    sds_socket: sds.socket(),
                    otlp: otlp.socket(),
                });
                let sidecar = Envoy::start_as(
                    &site,
                    &selector.run_as(),
                    &format!("{}-{}", cloud.name, w.name),
                    &envoys,
                    &config,
                )
                .await;
                workloads.push(Workload {
                    plan: w.clone(),
                    spiffe_id: w.spiffe_id(cloud.trust_domain),
                    selector,
                    entry_id,
                    app,
                    sidecar,
                    outbound,
                });
            }
            let gateway_addr = SocketAddr::new(data(i, hosts::GATEWAY), ports::GATEWAY);
            let chains: Vec<(String, SocketAddr)> = cloud
                .workloads
                .iter()
                .map(|w| (w.sni(), SocketAddr::new(data(i, w.pod), ports::INBOUND)))
                .collect();
            let gateway_bootstrap = bootstrap::eastwest_gateway(
                &format!("router~{}~eastwest", gateway_addr.ip()),
                cloud.region,
                gateway_addr,
                &chains,
            );
            let gateway = if cloud.federated {
                Some(
                    Envoy::start_at(&site, &gateway_name(cloud), &envoys, &gateway_bootstrap).await,
                )
            } else {
                None
            };
            clouds.push(Cloud {
                plan: cloud.clone(),
                site,
                federates_with,
                spire,
                sds,
                workloads,
                gateway,
                gateway_addr,
                gateway_bootstrap,
            });
        }
        for cloud in &clouds {
            for w in &cloud.workloads {
                w.sidecar.wait_live().await;
            }
            if let Some(gateway) = &cloud.gateway {
                gateway.wait_live().await;
            }
        }
        Ok(Self {
            options,
            clouds,
            otlp,
            namespaces,
        })
    }

    /// `from`'s caller (or the workload named `workload`) calls `host` asking for `action`.
    pub async fn call_from(
        &self,
        from: &str,
        workload: &str,
        host: &str,
        action: &str,
        extra: &[(&str, &str)],
    ) -> std::io::Result<Call> {
        let cloud = self.cloud(from);
        let source = cloud.workload(workload);
        let mut headers = vec![("host", host), (app::ACTION_HEADER, action)];
        headers.extend_from_slice(extra);
        let response = cloud
            .site
            .request(source.outbound, "GET", "/", &headers)
            .await?;
        let body = serde_json::from_str(&response.body).unwrap_or(Value::Null);
        Ok(Call {
            status: response.status,
            body,
            response,
        })
    }

    /// The guide's round trip: the AWS orchestrator asks GCP's search worker to
    /// `search`, which asks Azure's processor to `process`, which `report`s to
    /// AWS's collector; `extra` headers go on the first request.
    pub async fn round_trip(&self, extra: &[(&str, &str)]) -> std::io::Result<Call> {
        let hops = format!(
            "{}/process,{}/report",
            self.cloud("azure").service().plan.host(),
            self.cloud("aws").service().plan.host()
        );
        let mut headers = vec![(app::HOPS_HEADER, hops.as_str())];
        headers.extend_from_slice(extra);
        let search = self.cloud("gcp").service().plan.host();
        self.call_from("aws", "orchestrator", &search, "search", &headers)
            .await
    }

    /// `from`'s caller calls `to`'s service asking for `action`.
    pub async fn call(&self, from: &str, to: &str, action: &str) -> std::io::Result<Call> {
        let caller = self.cloud(from).caller().plan.name;
        let host = self.cloud(to).service().plan.host();
        self.call_from(from, caller, &host, action, &[]).await
    }
}

/// A host-side address: `127.<subnet>.<cloud + 1>.<host>`.
pub fn address(subnet: u8, cloud: usize, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, subnet, cloud as u8 + 1, host))
}

/// A data-plane address: `10.<subnet>.<cloud + 1>.<host>` inside namespaces, else host-side.
pub fn data_address(subnet: u8, namespaces: bool, cloud: usize, host: u8) -> IpAddr {
    if namespaces {
        IpAddr::V4(Ipv4Addr::new(10, subnet, cloud as u8 + 1, host))
    } else {
        address(subnet, cloud, host)
    }
}
