//! The real SPIRE server and agent (built from source by `scripts/setup.sh`
//! into `target/spire/`, from the tools module `tests/spire/`), run for one
//! test: a server with sqlite, `join_token` node attestation and the disk key
//! manager; an agent with the `unix` workload attestor, its Workload API socket
//! and a separate admin socket (Delegated Identity API) for its authorized
//! delegates. Every CLI call goes through the server's own socket; a CLI error
//! fails with SPIRE's message.
//!
//! Pitfalls handled here (the README's SPIRE section lists them): socket
//! paths stay under 108 bytes (a short directory in `/tmp`); join tokens are
//! single-use, so every agent start mints one; the admin socket is outside the
//! Workload API socket's directory, as the agent requires.

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running `spire-server`; killed on drop.
pub struct SpireServer {
    dir: PathBuf,
    trust_domain: String,
    port: u16,
    child: Option<Child>,
}

impl SpireServer {
    /// Starts a server for `trust_domain` in `dir` (which must be short); waits until healthy.
    pub async fn start(dir: &Path, trust_domain: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("data"))?;
        let mut server = Self {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            port: free_port(),
            child: None,
        };
        std::fs::write(dir.join("server.conf"), server.config())?;
        server.spawn().await?;
        Ok(server)
    }

    fn config(&self) -> String {
        let d = self.dir.display();
        format!(
            r#"server {{
  bind_address = "127.0.0.1"
  bind_port = "{port}"
  socket_path = "{d}/api.sock"
  trust_domain = "{td}"
  data_dir = "{d}/data"
  log_level = "INFO"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1h"
  agent_ttl = "24h"
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
            port = self.port,
            td = self.trust_domain,
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

    /// Deletes the entry `id`.
    pub async fn delete_entry(&self, id: &str) -> anyhow::Result<()> {
        self.cli(&["entry", "delete", "-entryID", id])
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
  server_address = "127.0.0.1"
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
            port = server.port,
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
