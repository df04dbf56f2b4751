//! A VM proxy: `pilot-agent proxy` (a sidecar, or a `router` for a gateway)
//! running the PyPI Envoy, outside Kubernetes, the way Istio's VM onboarding
//! sets one up (`istioctl x workload entry configure` writes the same
//! files and `ISTIO_META_*` environment).
//!
//! Every path pilot-agent and its Envoy use is relative to their working
//! directory, so each VM gets a directory of its own, and a network namespace
//! of its own (Istio's listener, admin and status ports are fixed):
//! - `var/run/secrets/workload-spiffe-uds/socket`: a link to the node's
//!   trustweave-sds socket, present *before* pilot-agent starts (it
//!   health-dials it once and, when nothing answers, deletes it and serves
//!   istiod's certificates; [`VmProxy::start`] checks it did not);
//! - `var/run/secrets/tokens/istio-token`: a service-account token with
//!   audience `istio-ca` (istiod authenticates the xDS stream with it);
//! - `var/run/secrets/istio/root-cert.pem`: istiod's CA root (for the xDS
//!   connection only; workloads trust what trustweave-sds serves as `ROOTCA`);
//! - `var/lib/istio/envoy/envoy_bootstrap_tmpl.json`: Istio's template.
//!
//! The Wasm module is where the injector's `trustweave-wasm-file` template
//! mounts it (`/var/local/lib/wasm/`): a bind mount private to the VM's
//! mount namespace (`ip netns exec` gives each its own).
//!
//! The proxy runs as the VM's user: SPIRE attests its Envoy by `unix:uid:N`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::process::Child;

use super::Istiod;
use crate::kube::{self, ControlPlane};
use crate::mesh::netns::Site;

/// Envoy's admin port as pilot-agent configures it (127.0.0.1 only).
pub const ADMIN_PORT: u16 = 15000;
/// pilot-agent's readiness port (`/healthz/ready`).
pub const READY_PORT: u16 = 15021;
/// How long pilot-agent and Envoy may take to be ready (first xDS push included).
const READY_LIMIT: Duration = Duration::from_secs(90);

/// What pilot-agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyKind {
    /// `pilot-agent proxy sidecar`.
    Sidecar,
    /// `pilot-agent proxy router`: a gateway.
    Router,
}

/// One VM proxy's identity and place.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Workload name (`POD_NAME`, `ISTIO_META_WORKLOAD_NAME`).
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Labels (`ISTIO_METAJSON_LABELS`; the WorkloadEntry carries the same).
    pub labels: BTreeMap<String, String>,
    /// Its address (`INSTANCE_IP`), in its network namespace.
    pub ip: IpAddr,
    /// The user it runs as (its SPIRE selector `unix:uid:N`).
    pub uid: u32,
    /// Sidecar or gateway.
    pub kind: ProxyKind,
}

/// A running pilot-agent and its Envoy; killed on drop.
pub struct VmProxy {
    site: Site,
    spec: VmSpec,
    dir: PathBuf,
    _child: Child,
}

impl VmProxy {
    /// Prepares `dir` and starts pilot-agent in `site` against `istiod`; its
    /// certificates come from `sds_socket` (a trustweave-sds node socket that
    /// must answer already). Returns once the proxy is ready, and fails if
    /// pilot-agent fell back to istiod's CA.
    pub async fn start(
        site: &Site,
        dir: &Path,
        spec: VmSpec,
        istiod: &Istiod,
        kube: &ControlPlane,
        sds_socket: &Path,
        wasm: &Path,
    ) -> anyhow::Result<Self> {
        for sub in [
            "var/run/secrets/workload-spiffe-uds",
            "var/run/secrets/tokens",
            "var/run/secrets/istio",
            "var/lib/istio/envoy",
            "etc/istio/proxy",
            "etc/istio/config",
            "varlocal/lib/wasm",
        ] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::os::unix::fs::symlink(
            sds_socket,
            dir.join("var/run/secrets/workload-spiffe-uds/socket"),
        )
        .context("link the SDS socket")?;
        let token = kube
            .kubectl(&[
                "create",
                "token",
                &spec.service_account,
                "-n",
                &spec.namespace,
                "--audience",
                "istio-ca",
                "--duration",
                "2h",
            ])
            .await?;
        std::fs::write(dir.join("var/run/secrets/tokens/istio-token"), token.trim())?;
        std::fs::write(
            dir.join("var/run/secrets/istio/root-cert.pem"),
            istiod.root_cert(),
        )?;
        std::fs::copy(
            kube::istio_bootstrap_template()?,
            dir.join("var/lib/istio/envoy/envoy_bootstrap_tmpl.json"),
        )?;
        std::fs::copy(wasm, dir.join("varlocal/lib/wasm/trustweave_filter.wasm"))
            .with_context(|| format!("{} (make wasm)", wasm.display()))?;
        chown_tree(dir, spec.uid)?;

        let config = &istiod.config;
        let envoy = crate::envoy::binary();
        anyhow::ensure!(
            envoy.is_absolute() && envoy.exists(),
            "ENVOY_BIN must name Envoy's binary (scripts/envoy-bin.sh prints it; make sets it), not {}",
            envoy.display()
        );
        let envoy = crate::envoy::runnable_by_others(&envoy);
        let proxy_config = json!({
            "discoveryAddress": istiod.xds_addr().to_string(),
            "binaryPath": envoy,
            // One worker thread: every VM's Envoy shares this machine's cores.
            "concurrency": 1,
        });
        let kind = match spec.kind {
            ProxyKind::Sidecar => "sidecar",
            ProxyKind::Router => "router",
        };
        let log = std::fs::File::create(dir.join("pilot-agent.log"))?;
        let script = r#"mount --bind "$1" /var/local && cd "$2" && exec setpriv --reuid "$3" --regid "$3" --clear-groups "$4" proxy "$5""#;
        let mut command = site.command("sh");
        command.env_clear();
        if spec.kind == ProxyKind::Router {
            // A gateway sees its own network's endpoints (our gateway values set it so).
            command.env("ISTIO_META_REQUESTED_NETWORK_VIEW", &config.network);
        }
        let child = command
            .args(["-c", script, "sh"])
            .arg(dir.join("varlocal"))
            .arg(dir)
            .arg(spec.uid.to_string())
            .arg(kube::binary("pilot-agent")?)
            .arg(kind)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", dir)
            .env("POD_NAME", &spec.name)
            .env("POD_NAMESPACE", &spec.namespace)
            .env("SERVICE_ACCOUNT", &spec.service_account)
            .env("INSTANCE_IP", spec.ip.to_string())
            .env("ISTIO_META_CLUSTER_ID", &config.cluster_id)
            .env("ISTIO_META_NETWORK", &config.network)
            .env("ISTIO_META_MESH_ID", "trustweave-mesh")
            .env("ISTIO_META_WORKLOAD_NAME", &spec.name)
            .env(
                "ISTIO_METAJSON_LABELS",
                serde_json::to_string(&spec.labels)?,
            )
            .env("CANONICAL_SERVICE", &spec.name)
            .env("ISTIOD_SAN", super::ISTIOD_SAN)
            .env("PROXY_CONFIG", proxy_config.to_string())
            .env("ISTIO_BOOTSTRAP", "") // the template in var/lib/istio/envoy
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("run pilot-agent")?;
        let proxy = Self {
            site: site.clone(),
            spec,
            dir: dir.to_path_buf(),
            _child: child,
        };
        crate::real_spire::wait_until_ok(READY_LIMIT, || proxy.ready())
            .await
            .with_context(|| {
                format!(
                    "{} not ready; see {}",
                    proxy.spec.name,
                    proxy.log_path().display()
                )
            })?;
        let log = std::fs::read_to_string(proxy.log_path())?;
        if !log.contains("Existing workload SDS socket found") {
            bail!(
                "{}: pilot-agent did not use trustweave-sds's socket (it serves istiod's certificates); see {}",
                proxy.spec.name,
                proxy.log_path().display()
            );
        }
        Ok(proxy)
    }

    async fn ready(&self) -> anyhow::Result<()> {
        let ready = SocketAddr::new(self.spec.ip, READY_PORT);
        let response = self
            .site
            .request(ready, "GET", "/healthz/ready", &[])
            .await?;
        if response.status != 200 {
            bail!("/healthz/ready: {} {}", response.status, response.body);
        }
        Ok(())
    }

    /// Its spec.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// pilot-agent's log (Envoy's included).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("pilot-agent.log")
    }

    /// `GET path` on its Envoy's admin endpoint.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        let admin = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ADMIN_PORT);
        let response = self.site.request(admin, "GET", path, &[]).await?;
        if response.status != 200 {
            bail!("admin {path}: {}", response.status);
        }
        Ok(response.body)
    }

    /// Its Envoy's `/config_dump` (with EDS), parsed.
    pub async fn config_dump(&self) -> anyhow::Result<Value> {
        let body = self.admin_get("/config_dump?include_eds").await?;
        serde_json::from_str(&body).context("config_dump is not JSON")
    }

    /// The sum of every `*.update_rejected` counter of its Envoy (xDS NACKs).
    pub async fn updates_rejected(&self) -> anyhow::Result<u64> {
        let body = self.admin_get("/stats?filter=update_rejected").await?;
        Ok(body
            .lines()
            .filter_map(|line| line.rsplit_once(": "))
            .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
            .sum())
    }
}

fn chown_tree(dir: &Path, uid: u32) -> anyhow::Result<()> {
    let id = Some(rustix::fs::Uid::from_raw(uid));
    let gid = Some(rustix::fs::Gid::from_raw(uid));
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        rustix::fs::chown(&path, id, gid).with_context(|| path.display().to_string())?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}
