//! `trustweave-sds doctor`: walks the chain a cross-cloud call depends on and
//! names the broken link — each trust domain's bundle from its SPIRE server,
//! through each federated peer's copy (and the bundle endpoint it is fetched
//! from, checked as that peer checks it), through each node's trustweave-sds,
//! to what each Envoy holds ([`bundles`]); one call explained hop by hop
//! ([`call`]); and the MSS at each gateway against the path MTU ([`mtu`]).
//!
//! Read-only: the doctor runs `spire-server` read commands and GETs admin
//! endpoints; it never reads a private key. Usable from a laptop (sources are
//! `kubectl exec` commands) and from a node (URLs, sockets).

pub mod bundle;
pub mod bundles;
pub mod call;
pub mod config;
pub mod endpoint;
pub mod envoy;
pub mod mtu;
pub mod report;
pub mod source;
pub mod spire;

use config::{istio_sni, DoctorConfig};
use report::Report;

/// Reads the doctor's configuration file.
pub fn load(path: &std::path::Path) -> Result<DoctorConfig, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    DoctorConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Every bundle link, then every gateway the doctor can reach.
pub async fn run(config: &DoctorConfig) -> Report {
    let mut checks = bundles::check(config).await;
    for td in &config.trust_domains {
        for gateway in &td.gateways {
            let Some(address) = &gateway.address else {
                continue;
            };
            let sni = td
                .nodes
                .iter()
                .flat_map(|n| &n.envoys)
                .find_map(|e| e.service.as_deref().and_then(istio_sni));
            let name = format!("{}/{}", td.name, gateway.name);
            checks.push(mtu::check(&name, address, sni.as_deref(), config.path_mtu).await);
        }
    }
    Report::new(checks)
}
