//! One cloud's real SPIRE: a `spire-server` for its trust domain (sqlite,
//! `join_token`, disk keys, short SVIDs) with a SPIFFE bundle endpoint
//! (`https_spiffe`) on the cloud's address, and one `spire-agent` for its
//! node (`unix` workload attestor, Workload API socket, admin socket for the
//! node's trustweave-sds, the one authorized delegate).
//!
//! Federation is set up as SPIRE's own federation suites do it (see
//! [`SpireServer::federate_with`]); every pair's first `federation refresh`
//! must succeed ([`CloudSpire::refresh`] returns SPIRE's error otherwise).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::envoy::RunAs;
use crate::real_spire::{ServerOptions, SpireAgent, SpireServer};

/// How SPIRE tells one workload's Envoy apart (and how that Envoy is run).
#[derive(Clone, Debug)]
pub enum WorkloadSelector {
    /// Run as its own user: `unix:uid:N` (needs root), as the guide registers workloads.
    Uid(u32),
    /// Run from its own path of the Envoy binary: `unix:path:<path>` (without root).
    Path(PathBuf),
}

impl WorkloadSelector {
    /// The SPIRE selector.
    pub fn selector(&self) -> String {
        match self {
            Self::Uid(uid) => format!("unix:uid:{uid}"),
            Self::Path(path) => format!("unix:path:{}", path.display()),
        }
    }

    /// How its Envoy runs.
    pub fn run_as(&self) -> RunAs {
        match self {
            Self::Uid(uid) => RunAs::User(*uid),
            Self::Path(path) => RunAs::Program(path.clone()),
        }
    }
}

/// The first `federation refresh` of one relationship, for the report.
#[derive(Clone, Debug)]
pub struct FederationRefresh {
    /// The federated trust domain.
    pub trust_domain: String,
    /// Its bundle endpoint.
    pub url: String,
    /// `ok`, or SPIRE's error.
    pub result: Result<(), String>,
}

/// A cloud's SPIRE server and its node's agent.
pub struct CloudSpire {
    /// The server.
    pub server: SpireServer,
    /// The node's agent (started by [`CloudSpire::start_agent`]).
    pub agent: Option<SpireAgent>,
    dir: PathBuf,
    /// Each relationship's first refresh.
    pub refreshes: Vec<FederationRefresh>,
}

/// The SPIFFE ID of the node agent of `trust_domain` (its join token's alias).
pub fn agent_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/node/node-1")
}

impl CloudSpire {
    /// Starts the server in `dir`: agents reach it on `bind`, its bundle endpoint is `bundle_endpoint`.
    pub async fn start(
        dir: &Path,
        trust_domain: &str,
        bind: SocketAddr,
        bundle_endpoint: SocketAddr,
        svid_ttl: Duration,
    ) -> anyhow::Result<Self> {
        let options = ServerOptions {
            bind,
            svid_ttl,
            bundle_endpoint: Some(bundle_endpoint),
        };
        let server = SpireServer::start_with(&dir.join("server"), trust_domain, options)
            .await
            .with_context(|| format!("spire-server for {trust_domain}"))?;
        Ok(Self {
            server,
            agent: None,
            dir: dir.to_path_buf(),
            refreshes: Vec::new(),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        self.server.trust_domain()
    }

    /// Federates with `peer` and refreshes its bundle once; SPIRE's error if the refresh fails.
    pub async fn federate_with(&mut self, peer: &CloudSpire) -> anyhow::Result<()> {
        self.server.federate_with(&peer.server).await?;
        let result = self.refresh(peer.trust_domain()).await;
        self.refreshes.push(FederationRefresh {
            trust_domain: peer.trust_domain().to_string(),
            url: peer.server.bundle_endpoint_url().unwrap_or_default(),
            result: result.as_ref().map(drop).map_err(|e| format!("{e:#}")),
        });
        result.with_context(|| {
            format!(
                "{} cannot refresh {}'s bundle",
                self.trust_domain(),
                peer.trust_domain()
            )
        })
    }

    /// `federation refresh` of `trust_domain` now.
    pub async fn refresh(&self, trust_domain: &str) -> anyhow::Result<()> {
        self.server.refresh_federation(trust_domain).await
    }

    /// Starts the node agent, trustweave-sds (`sds_bin`, by its path) its authorized delegate.
    pub async fn start_agent(&mut self, delegate_id: &str, sds_bin: &Path) -> anyhow::Result<()> {
        let td = self.trust_domain().to_string();
        let agent = SpireAgent::start(
            &self.server,
            &self.dir.join("agent"),
            &agent_id(&td),
            &[delegate_id],
        )
        .await
        .with_context(|| format!("spire-agent for {td}"))?;
        let bin = std::fs::canonicalize(sds_bin)
            .with_context(|| format!("{} (cargo build --workspace --bins)", sds_bin.display()))?;
        self.server
            .create_entry(
                &agent_id(&td),
                delegate_id,
                &[&format!("unix:path:{}", bin.display())],
                &[],
            )
            .await?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Registers a workload on the node; its entry ID.
    pub async fn register(
        &self,
        spiffe_id: &str,
        selector: &WorkloadSelector,
        federates_with: &[&str],
    ) -> anyhow::Result<String> {
        self.server
            .create_entry(
                &agent_id(self.trust_domain()),
                spiffe_id,
                &[&selector.selector()],
                federates_with,
            )
            .await
    }

    /// The node agent.
    pub fn agent(&self) -> &SpireAgent {
        self.agent.as_ref().expect("the agent is started")
    }

    /// The agent's admin socket, as trustweave-sds's `--admin-socket` takes it.
    pub fn admin_endpoint(&self) -> String {
        format!("unix:{}", self.agent().admin_socket())
    }
}
