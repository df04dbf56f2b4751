//! What the doctor is told about the mesh: per trust domain, how to run its
//! SPIRE server's CLI, its nodes (each node's trustweave-sds admin and its
//! Envoys' admin endpoints) and its east-west gateways. Read from one JSON
//! file; an unknown field is an error naming it.

use serde::Deserialize;

use super::source::Source;
use super::spire::SpireServerCli;

/// The path MTU assumed across cloud perimeters (IPsec/VPN tunnels: AWS
/// site-to-site and Azure VPN gateways carry 1400-byte packets).
pub const DEFAULT_PATH_MTU: u32 = 1400;

/// The doctor's view of the mesh.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoctorConfig {
    /// Every trust domain of the mesh (federated or not).
    pub trust_domains: Vec<TrustDomainConfig>,
    /// The path MTU between clouds, bytes.
    #[serde(default = "default_path_mtu")]
    pub path_mtu: u32,
}

fn default_path_mtu() -> u32 {
    DEFAULT_PATH_MTU
}

/// One trust domain (one cloud, one SPIRE server).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustDomainConfig {
    /// The trust domain name (`aws.company.com`).
    pub name: String,
    /// How to run its SPIRE server's CLI.
    pub spire_server: Option<SpireServerCli>,
    /// Its nodes.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    /// Its east-west gateways.
    #[serde(default)]
    pub gateways: Vec<GatewayConfig>,
}

/// One node: its trustweave-sds (node mode) and the Envoys it serves.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// A name for reports.
    pub name: String,
    /// trustweave-sds' admin endpoint (`/debug/workloads`).
    pub trustweave_sds: Option<Source>,
    /// The Envoys on the node.
    #[serde(default)]
    pub envoys: Vec<EnvoyConfig>,
}

/// One Envoy (sidecar).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyConfig {
    /// A name for reports (`search`).
    pub name: String,
    /// Its admin endpoint (`/config_dump`).
    pub admin: Source,
    /// The service it fronts, `host:port` (Istio's SNI is derived from it).
    #[serde(default)]
    pub service: Option<String>,
}

/// One east-west gateway.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// A name for reports.
    pub name: String,
    /// Its admin endpoint (for the SNI allowlist in `/config_dump`).
    #[serde(default)]
    pub admin: Option<Source>,
    /// Its cross-network address `ip:port`, where the doctor can reach it (for the MSS check).
    #[serde(default)]
    pub address: Option<String>,
}

impl DoctorConfig {
    /// Parses the configuration; the error names the field.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let config: Self = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        for (i, td) in config.trust_domains.iter().enumerate() {
            if td.name.is_empty() || td.name.contains(['/', ':']) {
                return Err(format!(
                    "trust_domains[{i}].name: {:?} is not a trust domain name",
                    td.name
                ));
            }
        }
        Ok(config)
    }

    /// The trust domain named `name`.
    pub fn trust_domain(&self, name: &str) -> Option<&TrustDomainConfig> {
        self.trust_domains.iter().find(|td| td.name == name)
    }
}

/// Istio's SNI for `host:port` (`outbound_.8080_._.search.search.svc.cluster.local`).
pub fn istio_sni(service: &str) -> Option<String> {
    let (host, port) = service.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    Some(format!("outbound_.{port}_._.{host}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_bad_names_are_refused_by_name() {
        let unknown = DoctorConfig::parse(br#"{"trust_domains":[{"name":"a","nodez":[]}]}"#);
        assert!(unknown.unwrap_err().contains("nodez"));
        let bad = DoctorConfig::parse(br#"{"trust_domains":[{"name":"spiffe://a"}]}"#);
        assert!(bad.unwrap_err().starts_with("trust_domains[0].name"));
        let good = DoctorConfig::parse(
            br#"{"trust_domains":[{"name":"a.test","spire_server":{"command":["spire-server"]},
            "nodes":[{"name":"n","trustweave_sds":{"url":"http://127.0.0.1:15200"},
            "envoys":[{"name":"e","admin":{"command":["curl","http://127.0.0.1:15000{path}"]}}]}]}]}"#,
        )
        .unwrap();
        assert_eq!(good.path_mtu, DEFAULT_PATH_MTU);
        assert_eq!(
            istio_sni("search.search.svc.cluster.local:8080").as_deref(),
            Some("outbound_.8080_._.search.search.svc.cluster.local")
        );
    }
}
