//! The mesh as `trustweave-sds doctor` is told about it: per trust domain its
//! SPIRE server's CLI (the binary and its socket), its node's trustweave-sds
//! admin and its Envoys' admin endpoints. An Envoy inside a cloud's network
//! namespace is reached through a port forward from the host (what `kubectl
//! port-forward` is to an operator's laptop).

use std::net::SocketAddr;

use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::netns::Site;
use super::Mesh;
use crate::real_spire;

/// A host-side port forwarding every connection to an address in a site's network.
pub struct PortForward {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl PortForward {
    /// Forwards `127.0.0.1:<ephemeral>` to `target` in `site`.
    pub async fn start(site: &Site, target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let site = site.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let site = site.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = site.connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A doctor configuration for a mesh, and the port forwards it relies on.
pub struct DoctorSetup {
    /// The configuration (`trustweave-sds doctor --config`).
    pub config: Value,
    /// Kept open while the doctor runs.
    pub forwards: Vec<PortForward>,
}

async fn admin_source(site: &Site, admin: SocketAddr, forwards: &mut Vec<PortForward>) -> Value {
    match site {
        Site::Host => json!({ "url": format!("http://{admin}") }),
        Site::Namespace(_) => {
            let forward = PortForward::start(site, admin).await.expect("port forward");
            let url = format!("http://{}", forward.addr());
            forwards.push(forward);
            json!({ "url": url })
        }
    }
}

impl Mesh {
    /// What the doctor is told about this mesh.
    pub async fn doctor_setup(&self) -> DoctorSetup {
        let spire_server = real_spire::binary("spire-server")
            .expect("spire-server built")
            .display()
            .to_string();
        let mut forwards = Vec::new();
        let mut trust_domains = Vec::new();
        for cloud in &self.clouds {
            let mut envoys = Vec::new();
            for w in &cloud.workloads {
                let admin = admin_source(&cloud.site, w.sidecar.admin_addr(), &mut forwards).await;
                envoys.push(json!({
                    "name": w.plan.name,
                    "admin": admin,
                    "service": format!("{}:{}", w.plan.host(), super::ports::APP),
                }));
            }
            let mut gateways = Vec::new();
            if let Some(gateway) = &cloud.gateway {
                let admin = admin_source(&cloud.site, gateway.admin_addr(), &mut forwards).await;
                gateways.push(json!({ "name": "eastwest", "admin": admin }));
            }
            trust_domains.push(json!({
                "name": cloud.plan.trust_domain,
                "spire_server": {
                    "command": [spire_server],
                    "socket_path": cloud.spire.server.socket(),
                },
                "nodes": [{
                    "name": "node-1",
                    "trustweave_sds": { "url": format!("http://{}", cloud.sds.admin()) },
                    "envoys": envoys,
                }],
                "gateways": gateways,
            }));
        }
        DoctorSetup {
            config: json!({ "trust_domains": trust_domains }),
            forwards,
        }
    }
}
