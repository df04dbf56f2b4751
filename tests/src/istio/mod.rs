//! The real Istio control plane on a bare apiserver ([`crate::kube`]): istiod
//! (`pilot-discovery`, built by `scripts/setup.sh` from `tests/istio/`) with
//! the mesh configuration of our `istio/values/istiod-<cloud>.yaml`, and VM
//! proxies ([`vm`]: pilot-agent with Envoy, each in its own network
//! namespace, certificates from trustweave-sds node mode).
//!
//! Envoy is upstream Envoy (the PyPI build), not istio-proxy, so istiod is
//! told not to send Istio's proxy-only extensions:
//! `PILOT_ENABLE_METADATA_EXCHANGE=false` (`istio.metadata_exchange`,
//! `io.istio.http.peer_metadata`), `PILOT_ENABLE_ALPN_FILTER=false`
//! (`istio.alpn`); no metrics provider is configured (no `istio.stats`). Its
//! webhook patchers and the injector are off (no pods); its CA stays on: the
//! xDS port 15012 is served with a certificate from it, while workloads get
//! theirs from SPIRE.

pub mod cluster;
pub mod mesh;
pub mod vm;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::process::Child;

use crate::kube::{self, ControlPlane};
use crate::mesh::netns::Site;

/// istiod's secure xDS port (TLS, JWT authenticated), the one VM proxies use.
pub const XDS_PORT: u16 = 15012;
/// istiod's HTTP port (`/ready`, `/debug/...`).
pub const HTTP_PORT: u16 = 8080;
/// The Service name istiod's own certificate carries (`ISTIOD_SAN` of the proxies).
pub const ISTIOD_SAN: &str = "istiod.istio-system.svc";

/// One cluster's istiod, as our Helm values configure it.
#[derive(Clone, Debug)]
pub struct IstiodConfig {
    /// `global.multiCluster.clusterName` (istiod's `CLUSTER_ID`).
    pub cluster_id: String,
    /// `global.network`.
    pub network: String,
    /// `meshConfig`, as the values file holds it.
    pub mesh_config: Value,
}

impl IstiodConfig {
    /// Reads `istio/values/istiod-<cloud>.yaml`.
    pub fn from_values(cloud: &str) -> anyhow::Result<Self> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../istio/values")
            .join(format!("istiod-{cloud}.yaml"));
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let values: Value =
            serde_yaml_ng::from_str(&text).with_context(|| path.display().to_string())?;
        let field = |pointer: &str| {
            values
                .pointer(pointer)
                .cloned()
                .with_context(|| format!("{}: no {pointer}", path.display()))
        };
        Ok(Self {
            cluster_id: field("/global/multiCluster/clusterName")?
                .as_str()
                .context("clusterName")?
                .to_string(),
            network: field("/global/network")?
                .as_str()
                .context("network")?
                .to_string(),
            mesh_config: field("/meshConfig")?,
        })
    }

    /// The trust domain (`meshConfig.trustDomain`).
    pub fn trust_domain(&self) -> &str {
        self.mesh_config["trustDomain"].as_str().unwrap_or_default()
    }
}

/// A running istiod; killed on drop.
pub struct Istiod {
    site: Site,
    address: IpAddr,
    dir: PathBuf,
    /// Its configuration.
    pub config: IstiodConfig,
    root_cert: String,
    _child: Child,
}

impl Istiod {
    /// Starts istiod in `site` (listening on every address there, reached on
    /// `address`) against `kube`; returns once `/ready` answers. The CRDs and
    /// the `istio-system` namespace must exist.
    pub async fn start(
        site: &Site,
        address: IpAddr,
        dir: &Path,
        kube: &ControlPlane,
        config: IstiodConfig,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut mesh = config.mesh_config.clone();
        mesh["defaultConfig"]["discoveryAddress"] =
            json!(SocketAddr::new(address, XDS_PORT).to_string());
        let mesh_file = dir.join("mesh.yaml");
        std::fs::write(&mesh_file, serde_yaml_ng::to_string(&mesh)?)?;
        let log = std::fs::File::create(dir.join("istiod.log"))?;
        let child = site
            .command(kube::binary("pilot-discovery")?)
            .arg("discovery")
            .arg(format!("--kubeconfig={}", kube.kubeconfig().display()))
            .arg(format!("--meshConfig={}", mesh_file.display()))
            .arg("--grpcAddr=:15010")
            .arg(format!("--secureGRPCAddr=:{XDS_PORT}"))
            .arg(format!("--httpAddr=:{HTTP_PORT}"))
            .arg("--httpsAddr=:15017")
            .arg("--monitoringAddr=:15014")
            .arg("--log_output_level=default:info")
            .env("POD_NAME", "istiod-e2e")
            .env("POD_NAMESPACE", "istio-system")
            .env("CLUSTER_ID", &config.cluster_id)
            .env("REVISION", "default")
            .env("ENABLE_LEADER_ELECTION", "false")
            // No pods: no injector, no webhook configurations to patch.
            .env("INJECT_ENABLED", "false")
            .env("INJECTION_WEBHOOK_CONFIG_NAME", "")
            .env("VALIDATION_WEBHOOK_CONFIG_NAME", "")
            .env("PILOT_ENABLE_GATEWAY_API", "false")
            // Upstream Envoy has none of Istio's proxy-only extensions.
            .env("PILOT_ENABLE_METADATA_EXCHANGE", "false")
            .env("PILOT_ENABLE_ALPN_FILTER", "false")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("run pilot-discovery")?;
        let mut istiod = Self {
            site: site.clone(),
            address,
            dir: dir.to_path_buf(),
            config,
            root_cert: String::new(),
            _child: child,
        };
        crate::real_spire::wait_until_ok(Duration::from_secs(90), || async {
            let response = istiod.get("/ready").await?;
            if response.status != 200 {
                bail!("/ready: {}", response.status);
            }
            Ok(())
        })
        .await
        .with_context(|| format!("istiod not ready; see {}", istiod.log_path().display()))?;
        // Its CA root, from the ConfigMap it writes into each namespace (as VM onboarding reads it).
        istiod.root_cert = crate::real_spire::wait_until_ok(Duration::from_secs(60), || async {
            let map = kube
                .get_json(&["configmap", "istio-ca-root-cert", "-n", "istio-system"])
                .await?;
            map["data"]["root-cert.pem"]
                .as_str()
                .map(str::to_string)
                .context("no root-cert.pem")
        })
        .await
        .context("istiod wrote no istio-ca-root-cert")?;
        Ok(istiod)
    }

    /// Its CA's root (PEM): what a proxy verifies the xDS connection with.
    pub fn root_cert(&self) -> &str {
        &self.root_cert
    }

    /// Its xDS address (TLS).
    pub fn xds_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, XDS_PORT)
    }

    /// Its log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("istiod.log")
    }

    /// `GET path` on its HTTP port, from its own loopback (istiod answers
    /// `/debug/*` unauthenticated only there, as to `kubectl port-forward`).
    pub async fn get(&self, path: &str) -> anyhow::Result<crate::http::HttpResponse> {
        let loopback = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), HTTP_PORT);
        Ok(self.site.request(loopback, "GET", path, &[]).await?)
    }

    /// What istiod knows of each connected proxy's xDS state (`/debug/syncz`):
    /// per proxy, per type, whether the last push was acknowledged.
    pub async fn sync_status(&self) -> anyhow::Result<Vec<ProxySync>> {
        let response = self.get("/debug/syncz").await?;
        if response.status != 200 {
            bail!("/debug/syncz: {} {}", response.status, response.body);
        }
        parse_syncz(&response.body)
    }
}

/// One proxy's sync state as istiod reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxySync {
    /// The proxy's ID (`<pod>.<namespace>`).
    pub proxy: String,
    /// Per xDS type (short name: `CDS`, `LDS`, ...): `SYNCED`, `STALE`, `NOT SENT` or `ERROR`.
    pub types: Vec<(String, String)>,
}

/// Parses `/debug/syncz` (istiod's `[]SyncStatus`, `pilot/pkg/xds/debug.go`)
/// into per-proxy statuses as `istioctl proxy-status` prints them: `SYNCED`
/// when the last nonce sent was acknowledged, `ERROR` when the proxy NACKed
/// (`lastError`), `STALE` while an ACK is outstanding, `NOT SENT` otherwise.
fn parse_syncz(body: &str) -> anyhow::Result<Vec<ProxySync>> {
    let doc: Value = serde_json::from_str(body).context("/debug/syncz is not JSON")?;
    let Some(proxies) = doc.as_array() else {
        bail!("/debug/syncz is not a JSON array");
    };
    let mut out = Vec::new();
    for proxy in proxies {
        let mut types = Vec::new();
        for (type_url, status) in proxy["resources"].as_object().into_iter().flatten() {
            let short = type_url.rsplit('.').next().unwrap_or(type_url);
            let name = match short {
                "Cluster" => "CDS",
                "Listener" => "LDS",
                "RouteConfiguration" => "RDS",
                "ClusterLoadAssignment" => "EDS",
                "TypedExtensionConfig" => "ECDS",
                other => other,
            };
            let text = |field: &str| status[field].as_str().unwrap_or_default();
            let state = if !text("lastError").is_empty() {
                "ERROR"
            } else if text("sent").is_empty() {
                "NOT SENT"
            } else if text("sent") == text("acked") {
                "SYNCED"
            } else {
                "STALE"
            };
            types.push((name.to_string(), state.to_string()));
        }
        types.sort();
        out.push(ProxySync {
            proxy: proxy["proxy"].as_str().unwrap_or_default().to_string(),
            types,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncz_statuses_are_read_per_proxy_and_type() {
        let body = r#"[{"cluster_id":"aws","proxy":"collector.ops","resources":{
            "type.googleapis.com/envoy.config.cluster.v3.Cluster":{"sent":"n1","acked":"n1"},
            "type.googleapis.com/envoy.config.listener.v3.Listener":{"sent":"n2","acked":"n1","lastError":"bad filter"},
            "type.googleapis.com/envoy.config.route.v3.RouteConfiguration":{"sent":"n3","acked":"n2"},
            "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig":{}}}]"#;
        let status = parse_syncz(body).expect("parsed");
        assert_eq!(status[0].proxy, "collector.ops");
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            status[0].types,
            pairs(&[
                ("CDS", "SYNCED"),
                ("ECDS", "NOT SENT"),
                ("LDS", "ERROR"),
                ("RDS", "STALE")
            ])
        );
        assert!(parse_syncz("{}").is_err());
    }
}
