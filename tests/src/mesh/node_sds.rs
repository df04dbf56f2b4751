//! A node's trustweave-sds process in node mode (`--source delegated`),
//! attested by its node's real spire-agent as the authorized delegate (an
//! entry selecting its binary's path).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use crate::http;

/// The SPIFFE ID of a node's trustweave-sds (its agent's authorized delegate).
pub fn delegate_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/ns/spire/sa/trustweave-sds")
}

/// The trustweave-sds binary: `$TRUSTWEAVE_SDS_BIN`, else next to this
/// executable (or one directory up, for test executables in `deps/`).
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("TRUSTWEAVE_SDS_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("trustweave-sds"))
        .find(|bin| bin.exists())
        .unwrap_or_else(|| PathBuf::from("trustweave-sds"))
}

/// A running trustweave-sds; killed on drop.
pub struct NodeSds {
    bin: PathBuf,
    dir: PathBuf,
    admin_socket: String,
    admin: SocketAddr,
    socket: PathBuf,
    allowed_uids: Vec<u32>,
    child: Option<Child>,
}

impl NodeSds {
    /// Starts it on the agent's `admin_endpoint` (`unix:<path>`), its SDS
    /// socket in `dir` open to `allowed_uids` (none: its own), admin on
    /// `admin`; waits until ready.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        admin_endpoint: &str,
        admin: SocketAddr,
        allowed_uids: &[u32],
    ) -> anyhow::Result<Self> {
        let socket = dir.join("sds/socket");
        if let Some(parent) = socket.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut sds = Self {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            admin_socket: admin_endpoint.to_string(),
            admin,
            socket,
            allowed_uids: allowed_uids.to_vec(),
            child: None,
        };
        sds.spawn().await?;
        Ok(sds)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log_path = self.dir.join("trustweave-sds.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut command = Command::new(&self.bin);
        if !self.allowed_uids.is_empty() {
            let uids: Vec<String> = self.allowed_uids.iter().map(u32::to_string).collect();
            command
                .args(["--socket-mode", "0666", "--allowed-uids"])
                .arg(uids.join(","));
        }
        let child = command
            .args([
                "--source",
                "delegated",
                "--admin-socket",
                &self.admin_socket,
            ])
            .arg("--sds-socket")
            .arg(&self.socket)
            .args(["--admin-addr", &self.admin.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {} (cargo build --workspace --bins builds it)",
                    self.bin.display()
                )
            })?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Ok(r) = http::get(self.admin, "/readyz", &[]).await {
                if r.status == 200 {
                    return Ok(());
                }
            }
            // The agent learns its delegate's entry at its next sync (about 5 s).
            if started.elapsed() > Duration::from_secs(30) {
                bail!("trustweave-sds not ready; see {}", log_path.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process (its Envoys keep what they were served); [`NodeSds::restart`] starts it again.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Kills the process and starts a new one on the same socket.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        self.spawn().await
    }

    /// The SDS socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The admin address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// Process ID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// One value of its Prometheus metrics (`name` with labels as printed), if present.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let body = http::get(self.admin, "/metrics", &[]).await.ok()?.body;
        body.lines().find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}
