//! The real SPIRE server and agent (built from source by `scripts/setup.sh`
//! into `target/spire/`, from the tools module `tests/spire/`), run for one
//! test: a server with sqlite, `join_token` node attestation and the disk key
//! manager; an agent with the `unix` workload attestor, its Workload API socket
//! and a separate admin socket (Delegated Identity API) for its authorized
//! delegates. Every CLI call goes through the server's own socket; a CLI error
//! fails with SPIRE's message.
//!
//! Pitfalls handled here (docs/mesh.md, "The real SPIRE", lists them): socket
//! paths stay under 108 bytes (a short directory in `/tmp`); join tokens are
//! single-use, so every agent start mints one; the admin socket is outside the
//! Workload API socket's directory, as the agent requires.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

/// The SPIRE version `tests/spire/go.mod` pins (and `--version` prints).
pub const VERSION: &str = "1.13.3";

/// Where the SPIRE binaries are: `$TRUSTWEAVE_SPIRE_DIR`, else `target/spire`.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("TRUSTWEAVE_SPIRE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("spire")
        })
}

/// The path of one SPIRE binary; fails with how to build it when missing
/// (never a silent fallback to a stand-in).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} is missing: run scripts/setup.sh (it builds SPIRE {VERSION} from tests/spire/ with Go)",
            path.display()
        );
    }
    Ok(path)
}

/// What `spire-server --version` prints (`spire-server 1.13.3`).
pub async fn version() -> anyhow::Result<String> {
    let bin = binary("spire-server")?;
    let output = Command::new(&bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("run {}", bin.display()))?;
    // SPIRE prints its version on standard error.
    let text = [output.stdout, output.stderr].concat();
    let version = String::from_utf8_lossy(&text).trim().to_string();
    Ok(format!("spire-server {version}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// How a server is run.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Where its gRPC API (for agents) listens.
    pub bind: SocketAddr,
    /// `default_x509_svid_ttl`.
    pub svid_ttl: Duration,
    /// Where its SPIFFE bundle endpoint (`https_spiffe`) listens, if it has one:
    /// an IP literal, as SPIRE requires.
    pub bundle_endpoint: Option<SocketAddr>,
}

impl Default for ServerOptions {
    /// A free loopback port, 1 h SVIDs, no bundle endpoint.
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], free_port())),
            svid_ttl: Duration::from_secs(3600),
            bundle_endpoint: None,
        }
    }
}

/// What `spire-server localauthority x509 …` reports of one X.509 authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct X509Authority {
    /// `authority_id` (the CA's subject key ID), what `activate`/`taint`/`revoke` name.
    pub id: String,
}

/// A running `spire-server`; killed on drop.
pub struct SpireServer {
    dir: PathBuf,
    trust_domain: String,
    options: ServerOptions,
    child: Option<Child>,
}

impl SpireServer {
    /// Starts a server for `trust_domain` in `dir` (which must be short); waits until healthy.
    pub async fn start(dir: &Path, trust_domain: &str) -> anyhow::Result<Self> {
        Self::start_with(dir, trust_domain, ServerOptions::default()).await
    }

    /// [`SpireServer::start`] with `options`.
    pub async fn start_with(
        dir: &Path,
        trust_domain: &str,
        options: ServerOptions,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("data"))?;
        let mut server = Self {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            options,
            child: None,
        };
        std::fs::write(dir.join("server.conf"), server.config())?;
        server.spawn().await?;
        Ok(server)
    }

    fn config(&self) -> String {
        let d = self.dir.display();
        // The shortest refresh hint SPIRE honours is a minute (bundleutil.MinimumRefreshHint);
        // tests that cannot wait run `federation refresh`.
        let federation = match self.options.bundle_endpoint {
            Some(endpoint) => format!(
                r#"
  federation {{
    bundle_endpoint {{
      address = "{}"
      port = {}
      refresh_hint = "1m"
      profile "https_spiffe" {{}}
    }}
  }}"#,
                endpoint.ip(),
                endpoint.port()
            ),
            None => String::new(),
        };
        format!(
            r#"server {{
  bind_address = "{ip}"
  bind_port = "{port}"
  socket_path = "{d}/api.sock"
  trust_domain = "{td}"
  data_dir = "{d}/data"
  log_level = "INFO"
  ca_ttl = "24h"
  default_x509_svid_ttl = "{ttl}s"
  agent_ttl = "24h"{federation}
}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{d}/data/datastore.sqlite3"
    }}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "disk" {{
    plugin_data {{
      keys_path = "{d}/data/keys.json"
    }}
  }}
}}
"#,
            ip = self.options.bind.ip(),
            port = self.options.bind.port(),
            td = self.trust_domain,
            ttl = self.options.svid_ttl.as_secs(),
        )
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))?;
        let child = Command::new(binary("spire-server")?)
            .arg("run")
            .arg("-config")
            .arg(self.dir.join("server.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawn spire-server")?;
        self.child = Some(child);
        let socket = self.socket();
        let healthy = wait_until_ok(Duration::from_secs(30), || async {
            run(
                &binary("spire-server")?,
                &["healthcheck", "-socketPath", &socket],
            )
            .await
        })
        .await;
        healthy.with_context(|| {
            format!(
                "spire-server not healthy; see {}",
                self.dir.join("server.log").display()
            )
        })?;
        Ok(())
    }

    /// Stops the server (the agent keeps serving what it holds).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same data (same CA, same entries).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        self.spawn().await
    }

    /// The server API socket.
    pub fn socket(&self) -> String {
        self.dir.join("api.sock").display().to_string()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Runs `spire-server <args> -socketPath <socket>`; its standard output.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let socket = self.socket();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-socketPath", &socket]);
        run(&binary("spire-server")?, &all).await
    }

    /// The trust bundle (PEM), for an agent's `trust_bundle_path`.
    pub async fn bundle_pem(&self) -> anyhow::Result<String> {
        self.cli(&["bundle", "show"]).await
    }

    /// A single-use join token whose agent gets the alias `agent_id`.
    pub async fn join_token(&self, agent_id: &str) -> anyhow::Result<String> {
        let out = self
            .cli(&[
                "token",
                "generate",
                "-spiffeID",
                agent_id,
                "-ttl",
                "600",
                "-output",
                "json",
            ])
            .await?;
        let value: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("token generate printed {out:?}"))?;
        value["value"]
            .as_str()
            .map(str::to_string)
            .context("token generate: no value")
    }

    /// Creates an entry; returns its ID.
    pub async fn create_entry(
        &self,
        parent_id: &str,
        spiffe_id: &str,
        selectors: &[&str],
        federates_with: &[&str],
    ) -> anyhow::Result<String> {
        let mut args = vec![
            "entry",
            "create",
            "-parentID",
            parent_id,
            "-spiffeID",
            spiffe_id,
            "-output",
            "json",
        ];
        for selector in selectors {
            args.extend(["-selector", selector]);
        }
        for td in federates_with {
            args.extend(["-federatesWith", td]);
        }
        let out = self.cli(&args).await?;
        let value: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("entry create printed {out:?}"))?;
        value["results"][0]["entry"]["id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("entry create: no entry id in {out}"))
    }

    /// Updates the entry `id` with its own fields: SPIRE bumps its revision
    /// and the agent re-issues its SVID at its next sync, whatever the old
    /// SVID's age (`cache::UpdateEntries` marks a changed revision stale).
    pub async fn reissue_entry(&self, id: &str) -> anyhow::Result<()> {
        self.update_entry(id, None).await
    }

    /// Updates the entry `id` to federate with `trust_domains` (its other fields unchanged).
    pub async fn set_entry_federation(
        &self,
        id: &str,
        trust_domains: &[&str],
    ) -> anyhow::Result<()> {
        self.update_entry(id, Some(trust_domains)).await
    }

    /// `entry update` of `id` with its own fields, `federates_with` replaced when given.
    async fn update_entry(&self, id: &str, federates_with: Option<&[&str]>) -> anyhow::Result<()> {
        let out = self
            .cli(&["entry", "show", "-entryID", id, "-output", "json"])
            .await?;
        let value: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("entry show printed {out:?}"))?;
        let entry = &value["entries"][0];
        let id_string = |field: &str| -> anyhow::Result<String> {
            let id = &entry[field];
            match (id["trust_domain"].as_str(), id["path"].as_str()) {
                (Some(td), Some(path)) => Ok(format!("spiffe://{td}{path}")),
                _ => anyhow::bail!("entry show: no {field} in {out}"),
            }
        };
        let (parent_id, spiffe_id) = (id_string("parent_id")?, id_string("spiffe_id")?);
        let selectors: Vec<String> = entry["selectors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some(format!("{}:{}", s["type"].as_str()?, s["value"].as_str()?)))
            .collect();
        let federates_with: Vec<&str> = match federates_with {
            Some(given) => given.to_vec(),
            None => entry["federates_with"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|td| td.as_str())
                .collect(),
        };
        let mut args = vec![
            "entry",
            "update",
            "-entryID",
            id,
            "-parentID",
            &parent_id,
            "-spiffeID",
            &spiffe_id,
        ];
        for selector in &selectors {
            args.extend(["-selector", selector]);
        }
        for td in &federates_with {
            args.extend(["-federatesWith", td]);
        }
        self.cli(&args).await.map(drop)
    }

    /// Deletes the entry `id`.
    pub async fn delete_entry(&self, id: &str) -> anyhow::Result<()> {
        self.cli(&["entry", "delete", "-entryID", id])
            .await
            .map(drop)
    }

    /// Where agents reach it.
    pub fn bind(&self) -> SocketAddr {
        self.options.bind
    }

    /// Its bundle endpoint's URL, if it serves one.
    pub fn bundle_endpoint_url(&self) -> Option<String> {
        self.options
            .bundle_endpoint
            .map(|addr| format!("https://{addr}"))
    }

    /// Its own bundle in SPIFFE format (`bundle show -format spiffe`), what a peer `bundle set`s.
    pub async fn bundle_spiffe(&self) -> anyhow::Result<String> {
        self.cli(&["bundle", "show", "-format", "spiffe"]).await
    }

    /// The bundle it holds for federated `trust_domain` (PEM; empty when it holds none).
    pub async fn federated_bundle_pem(&self, trust_domain: &str) -> anyhow::Result<String> {
        let id = format!("spiffe://{trust_domain}");
        match self.cli(&["bundle", "list", "-id", &id]).await {
            Ok(pem) => Ok(pem),
            Err(error) if error.to_string().contains("NotFound") => Ok(String::new()),
            Err(error) => Err(error),
        }
    }

    /// Federates with `peer` as SPIRE's own federation suites do: its bundle
    /// (SPIFFE format) `bundle set` here, then a `federation create` with the
    /// `https_spiffe` profile naming the peer's bundle endpoint and server ID.
    pub async fn federate_with(&self, peer: &SpireServer) -> anyhow::Result<()> {
        let url = peer
            .bundle_endpoint_url()
            .with_context(|| format!("{} serves no bundle endpoint", peer.trust_domain))?;
        let bundle = self.dir.join(format!("{}.bundle.json", peer.trust_domain));
        std::fs::write(&bundle, peer.bundle_spiffe().await?)?;
        let id = format!("spiffe://{}", peer.trust_domain);
        let path = bundle.display().to_string();
        self.cli(&[
            "bundle", "set", "-format", "spiffe", "-id", &id, "-path", &path,
        ])
        .await?;
        let server_id = format!("spiffe://{}/spire/server", peer.trust_domain);
        self.cli(&[
            "federation",
            "create",
            "-trustDomain",
            &peer.trust_domain,
            "-bundleEndpointURL",
            &url,
            "-bundleEndpointProfile",
            "https_spiffe",
            "-endpointSpiffeID",
            &server_id,
        ])
        .await
        .map(drop)
    }

    /// `federation refresh`: fetches `trust_domain`'s bundle from its endpoint now;
    /// SPIRE's error when it cannot (which a scheduled refresh only logs).
    pub async fn refresh_federation(&self, trust_domain: &str) -> anyhow::Result<()> {
        self.cli(&["federation", "refresh", "-id", trust_domain])
            .await
            .map(drop)
    }

    /// Ends the relationship with `trust_domain`: `federation delete`, then its
    /// bundle deleted in `dissociate` mode (entries lose `federatesWith` it).
    pub async fn end_federation(&self, trust_domain: &str) -> anyhow::Result<()> {
        self.cli(&["federation", "delete", "-id", trust_domain])
            .await?;
        let id = format!("spiffe://{trust_domain}");
        self.cli(&["bundle", "delete", "-id", &id, "-mode", "dissociate"])
            .await
            .map(drop)
    }

    /// Runs `localauthority x509 <verb>` (with `-authorityID` when given); the
    /// authority its JSON answer names under `key`.
    async fn x509_authority(
        &self,
        verb: &str,
        authority: Option<&X509Authority>,
        key: &str,
    ) -> anyhow::Result<X509Authority> {
        let mut args = vec!["localauthority", "x509", verb, "-output", "json"];
        if let Some(authority) = authority {
            args.extend(["-authorityID", authority.id.as_str()]);
        }
        let out = self.cli(&args).await?;
        let value: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("localauthority x509 {verb} printed {out:?}"))?;
        value[key]["authority_id"]
            .as_str()
            .filter(|id| !id.is_empty())
            .map(|id| X509Authority { id: id.to_string() })
            .with_context(|| format!("localauthority x509 {verb}: no {key} in {out}"))
    }

    /// The X.509 authority signing now.
    pub async fn active_authority(&self) -> anyhow::Result<X509Authority> {
        self.x509_authority("show", None, "active").await
    }

    /// `localauthority x509 prepare`: a next CA, its root published in the bundle.
    pub async fn prepare_authority(&self) -> anyhow::Result<X509Authority> {
        self.x509_authority("prepare", None, "prepared_authority")
            .await
    }

    /// `localauthority x509 activate`: the prepared CA signs from now on.
    pub async fn activate_authority(&self, prepared: &X509Authority) -> anyhow::Result<()> {
        self.x509_authority("activate", Some(prepared), "activated_authority")
            .await
            .map(drop)
    }

    /// `localauthority x509 taint`: agents rotate every SVID the old CA signed, now.
    pub async fn taint_authority(&self, old: &X509Authority) -> anyhow::Result<()> {
        self.x509_authority("taint", Some(old), "tainted_authority")
            .await
            .map(drop)
    }

    /// `localauthority x509 revoke`: the old CA's root leaves the bundle.
    pub async fn revoke_authority(&self, old: &X509Authority) -> anyhow::Result<()> {
        self.x509_authority("revoke", Some(old), "revoked_authority")
            .await
            .map(drop)
    }
}

impl Drop for SpireServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// A running `spire-agent`; killed on drop.
pub struct SpireAgent {
    dir: PathBuf,
    agent_id: String,
    child: Option<Child>,
}

impl SpireAgent {
    /// Starts an agent of `server` in `dir` (short), attested by a fresh join
    /// token as `agent_id`, serving `authorized_delegates` on its admin socket.
    pub async fn start(
        server: &SpireServer,
        dir: &Path,
        agent_id: &str,
        authorized_delegates: &[&str],
    ) -> anyhow::Result<Self> {
        for sub in ["data", "public", "admin"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::write(dir.join("bootstrap.pem"), server.bundle_pem().await?)?;
        let d = dir.display();
        let delegates = authorized_delegates
            .iter()
            .map(|id| format!("{id:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            r#"agent {{
  data_dir = "{d}/data"
  server_address = "{server_ip}"
  server_port = "{port}"
  socket_path = "{d}/public/api.sock"
  admin_socket_path = "{d}/admin/admin.sock"
  authorized_delegates = [{delegates}]
  trust_bundle_path = "{d}/bootstrap.pem"
  trust_domain = "{td}"
  log_level = "DEBUG"
}}
plugins {{
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "disk" {{
    plugin_data {{
      directory = "{d}/data"
    }}
  }}
  WorkloadAttestor "unix" {{
    plugin_data {{
      discover_workload_path = true
      workload_size_limit = -1
    }}
  }}
}}
"#,
            server_ip = server.options.bind.ip(),
            port = server.options.bind.port(),
            td = server.trust_domain,
        );
        std::fs::write(dir.join("agent.conf"), config)?;
        let mut agent = Self {
            dir: dir.to_path_buf(),
            agent_id: agent_id.to_string(),
            child: None,
        };
        agent.spawn(server).await?;
        Ok(agent)
    }

    async fn spawn(&mut self, server: &SpireServer) -> anyhow::Result<()> {
        // Single-use: a restarted agent re-attests with its stored SVID, and a fresh token is harmless.
        let token = server.join_token(&self.agent_id).await?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        let child = Command::new(binary("spire-agent")?)
            .arg("run")
            .arg("-config")
            .arg(self.dir.join("agent.conf"))
            .args(["-joinToken", &token])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawn spire-agent")?;
        self.child = Some(child);
        let socket = self.workload_socket();
        wait_until_ok(Duration::from_secs(30), || async {
            run(
                &binary("spire-agent")?,
                &["healthcheck", "-socketPath", &socket],
            )
            .await
        })
        .await
        .with_context(|| {
            format!(
                "spire-agent not healthy; see {}",
                self.dir.join("agent.log").display()
            )
        })?;
        Ok(())
    }

    /// Stops the agent.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops and starts it again on the same data directory.
    pub async fn restart(&mut self, server: &SpireServer) -> anyhow::Result<()> {
        self.stop().await;
        self.spawn(server).await
    }

    /// Process ID, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Waits until the agent serves an X.509-SVID to this process's user on
    /// its Workload API (`api fetch x509`): its entries have synced.
    pub async fn wait_for_svid(&self, limit: Duration) -> anyhow::Result<()> {
        let socket = self.workload_socket();
        wait_until_ok(limit, || async {
            run(
                &binary("spire-agent")?,
                &["api", "fetch", "x509", "-socketPath", &socket],
            )
            .await
        })
        .await
        .map(drop)
    }

    /// The agent's SPIFFE ID alias (the parent of node entries).
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The Workload API (and SPIRE SDS) socket path.
    pub fn workload_socket(&self) -> String {
        self.dir.join("public/api.sock").display().to_string()
    }

    /// The admin (Delegated Identity API) socket path.
    pub fn admin_socket(&self) -> String {
        self.dir.join("admin/admin.sock").display().to_string()
    }

    /// The agent's log so far (for assertions and failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for SpireAgent {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Runs `program args`; its standard output, or an error with its standard error.
pub async fn run(program: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("run {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} {}: {}{}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Retries `attempt` until it succeeds or `limit` passes; the last error otherwise.
pub async fn wait_until_ok<F, Fut, T>(limit: Duration, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if tokio::time::Instant::now() >= deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
