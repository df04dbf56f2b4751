//! A real Kubernetes control plane without nodes: `etcd` and `kube-apiserver`
//! (built from source by `scripts/setup.sh` into `target/e2e-bin/`, from the
//! tools modules `tests/etcd/` and `tests/k8s/`), started the way
//! controller-runtime's envtest starts them: a self-signed serving
//! certificate, a static token file for one `system:masters` user, RBAC, the
//! `ServiceAccount` admission plugin off (no controller creates default
//! service accounts). There is no kube-controller-manager: no garbage
//! collection, no EndpointSlices, no namespace finalization.
//!
//! The apiserver listens on one address of a [`Site`] (a loopback address of
//! the host, or an address inside a network namespace); `kubectl` (the same
//! release) runs in that site. Every call that the apiserver refuses fails
//! with the apiserver's message and the file it came from.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::Child;

use crate::mesh::netns::Site;

/// The Kubernetes release `tests/k8s/go.mod` pins.
pub const KUBERNETES_VERSION: &str = "v1.37.2";

/// The apiserver's secure port.
pub const APISERVER_PORT: u16 = 6443;
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
const ADMIN_TOKEN: &str = "trustweave-e2e-admin-token";
/// How long the apiserver may take to answer `/readyz` (envtest allows 20 s; 2 cores are slower).
const START_LIMIT: Duration = Duration::from_secs(90);

/// Where the Go-built components are: `$TRUSTWEAVE_E2E_BIN`, else `target/e2e-bin`.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("TRUSTWEAVE_E2E_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("e2e-bin")
        })
}

/// One Go-built binary (`etcd`, `kube-apiserver`, `kubectl`, `pilot-discovery`,
/// `pilot-agent`); fails with how to build it when missing.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} is missing: run scripts/setup.sh (it builds etcd, kube-apiserver, kubectl, \
             pilot-discovery and pilot-agent from tests/{{etcd,k8s,istio}}/ with Go)",
            path.display()
        );
    }
    Ok(path)
}

/// A running etcd and kube-apiserver; both killed on drop.
pub struct ControlPlane {
    site: Site,
    address: IpAddr,
    kubeconfig: PathBuf,
    serving_cert_pem: String,
    _etcd: Child,
    _apiserver: Child,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver on `address` in `site`, files in `dir`;
    /// returns once `/readyz` answers.
    pub async fn start(site: &Site, address: IpAddr, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let etcd = spawn_etcd(site, address, dir)?;
        let serving_cert_pem = write_credentials(address, dir)?;
        let apiserver = spawn_apiserver(site, address, dir)?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(
                &format!("https://{}", SocketAddr::new(address, APISERVER_PORT)),
                &serving_cert_pem,
                ADMIN_TOKEN,
            ),
        )?;
        let plane = Self {
            site: site.clone(),
            address,
            kubeconfig,
            serving_cert_pem,
            _etcd: etcd,
            _apiserver: apiserver,
        };
        crate::real_spire::wait_until_ok(START_LIMIT, || {
            plane.kubectl(&["get", "--raw", "/readyz"])
        })
        .await
        .with_context(|| {
            format!(
                "kube-apiserver not ready; see {}",
                dir.join("kube-apiserver.log").display()
            )
        })?;
        Ok(plane)
    }

    /// The apiserver's URL.
    pub fn url(&self) -> String {
        format!("https://{}", SocketAddr::new(self.address, APISERVER_PORT))
    }

    /// The admin kubeconfig file (token authentication).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig for `token` (a service account's, say), as a remote secret carries it.
    pub fn kubeconfig_for_token(&self, token: &str) -> String {
        kubeconfig_yaml(&self.url(), &self.serving_cert_pem, token)
    }

    /// Runs `kubectl args` against it (in its site); standard output, or an
    /// error with kubectl's (the apiserver's) message.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl_with_input(args, None).await
    }

    /// [`ControlPlane::kubectl`] with `input` on standard input.
    pub async fn kubectl_with_input(
        &self,
        args: &[&str],
        input: Option<&str>,
    ) -> anyhow::Result<String> {
        use tokio::io::AsyncWriteExt;
        let bin = binary("kubectl")?;
        let mut command = self.site.command(&bin);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().context("run kubectl")?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).await?;
        }
        let output = child.wait_with_output().await?;
        if !output.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `kubectl apply --server-side --validate=strict -f <path>` (the
    /// apiserver's `fieldValidation=Strict`): the
    /// apiserver's error names the file and the field it refused.
    pub async fn apply(&self, path: &Path) -> anyhow::Result<String> {
        let file = path.to_string_lossy();
        self.kubectl(&[
            "apply",
            "--server-side",
            "--validate=strict",
            "--field-manager=trustweave-e2e",
            "-f",
            &file,
        ])
        .await
        .with_context(|| format!("the apiserver refused {file}"))
    }

    /// Applies `path`, then waits until every CRD is `Established` (resources
    /// of a kind applied earlier would get "no matches for kind").
    pub async fn apply_crds(&self, path: &Path) -> anyhow::Result<()> {
        self.apply(path).await?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ])
        .await?;
        Ok(())
    }

    /// `kubectl get <what> -o json`, parsed.
    pub async fn get_json(&self, what: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl(&args).await?;
        serde_json::from_str(&out).context("kubectl's JSON")
    }
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?)
}

fn spawn_etcd(site: &Site, address: IpAddr, dir: &Path) -> anyhow::Result<Child> {
    let client = format!("http://{}", SocketAddr::new(address, ETCD_CLIENT_PORT));
    let peer = format!("http://{}", SocketAddr::new(address, ETCD_PEER_PORT));
    let data = dir.join("etcd-data");
    site.command(binary("etcd")?)
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("default={peer}")])
        // What envtest passes to etcd >= 3.5: tests need no durability.
        .arg("--unsafe-no-fsync")
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(dir, "etcd")?)
        .kill_on_drop(true)
        .spawn()
        .context("run etcd")
}

/// Writes the serving certificate and key, the service-account signing key
/// and the token file; returns the serving certificate (PEM).
fn write_credentials(address: IpAddr, dir: &Path) -> anyhow::Result<String> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(address));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    let cert = params.self_signed(&key)?;
    std::fs::write(dir.join("apiserver.crt"), cert.pem())?;
    std::fs::write(dir.join("apiserver.key"), key.serialize_pem())?;
    let signing = rcgen::KeyPair::generate()?;
    std::fs::write(dir.join("sa.key"), signing.serialize_pem())?;
    std::fs::write(dir.join("sa.pub"), signing.public_key_pem())?;
    std::fs::write(
        dir.join("tokens.csv"),
        format!("{ADMIN_TOKEN},trustweave-e2e-admin,trustweave-e2e-admin,\"system:masters\"\n"),
    )?;
    Ok(cert.pem())
}

fn spawn_apiserver(site: &Site, address: IpAddr, dir: &Path) -> anyhow::Result<Child> {
    let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let url = format!("https://{}", SocketAddr::new(address, APISERVER_PORT));
    site.command(binary("kube-apiserver")?)
        .arg(format!(
            "--etcd-servers=http://{}",
            SocketAddr::new(address, ETCD_CLIENT_PORT)
        ))
        .arg(format!("--bind-address={address}"))
        .arg(format!("--advertise-address={address}"))
        // A loopback advertise address is refused by the endpoint reconciler; with
        // no nodes and no kube-proxy, nothing needs the `kubernetes` Service's endpoints.
        .arg("--endpoint-reconciler-type=none")
        .arg(format!("--secure-port={APISERVER_PORT}"))
        .arg(format!("--cert-dir={}", file("apiserver-certs")))
        .arg(format!("--tls-cert-file={}", file("apiserver.crt")))
        .arg(format!("--tls-private-key-file={}", file("apiserver.key")))
        .arg(format!("--token-auth-file={}", file("tokens.csv")))
        .arg("--authorization-mode=RBAC")
        // ClusterIPs are allocated from here; nothing routes to them (no kube-proxy), and no test sends there.
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        .arg(format!("--service-account-issuer={url}"))
        .arg(format!("--service-account-key-file={}", file("sa.pub")))
        .arg(format!(
            "--service-account-signing-key-file={}",
            file("sa.key")
        ))
        .arg("--disable-admission-plugins=ServiceAccount")
        .arg("--allow-privileged=true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(dir, "kube-apiserver")?)
        .kill_on_drop(true)
        .spawn()
        .context("run kube-apiserver")
}

/// A kubeconfig with one cluster, one token user and one context (`trustweave-e2e`).
fn kubeconfig_yaml(server: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: trustweave-e2e\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: trustweave-e2e\n  user:\n    token: {token}\ncontexts:\n- name: trustweave-e2e\n  context:\n    cluster: trustweave-e2e\n    user: trustweave-e2e\ncurrent-context: trustweave-e2e\n"
    )
}

/// Istio's CRDs of the release istiod is built from (`crd-all.gen.yaml`,
/// copied from the module by `scripts/setup.sh` beside the binaries).
pub fn istio_crds() -> anyhow::Result<PathBuf> {
    istio_data_file("crd-all.gen.yaml")
}

/// Istio's Envoy bootstrap template (`envoy_bootstrap.json`), as its proxy image carries it.
pub fn istio_bootstrap_template() -> anyhow::Result<PathBuf> {
    istio_data_file("envoy_bootstrap.json")
}

fn istio_data_file(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join("istio").join(name);
    if !path.exists() {
        bail!(
            "{} is missing: run scripts/setup.sh (it copies it from the istio.io/istio module of tests/istio/)",
            path.display()
        );
    }
    Ok(path)
}
