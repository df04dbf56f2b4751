//! trustweave-sds: an Envoy SDS v3 server that streams X.509-SVIDs and
//! federated trust bundles from SPIRE.
//!
//! Data flows one way: an identity source (the only writer of its snapshots)
//! → [`snapshot`] (validated, last good kept, rendered once by [`render`]) →
//! a `watch` channel → per-stream state machines in [`sds`] → Envoy. Two
//! sources, one design ([`identities`]): per pod or host, [`source`] reads the
//! Workload API and every client gets that identity; per node, [`delegated`]
//! attests each client's process ([`peer`]) through SPIRE's Delegated Identity
//! API and each gets its own, owned by one state machine per workload ([`workload`]). [`listener`] bounds who may connect, how many
//! and for how long.

#![forbid(unsafe_code)]
// Request paths (what Envoy, a connecting peer or SPIRE sends is parsed and
// acted on there) may not panic on that data: the compiler rules out unwrap,
// expect, panic, indexing and unchecked arithmetic in the modules marked below (tests may
// still assert with them).

pub mod admin;
pub mod config;
#[cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]
pub mod delegated;
// What SPIRE, a bundle endpoint or an Envoy answers the doctor is parsed there too.
#[cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]
pub mod doctor;
pub mod identities;
pub mod inspect;
#[cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]
pub mod listener;
pub mod metrics;
#[cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]
pub mod peer;
pub mod published;
#[cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]
pub mod render;
#[cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]
pub mod sds;
#[cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]
pub mod snapshot;
#[cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]
pub mod source;
#[cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]
pub mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

pub use config::ServerConfig;
use config::Source;
use delegated::NodeIdentities;
use identities::Identities;
use metrics::Metrics;
use published::Published;
use snapshot::IdentitySnapshot;

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The SDS socket could not be prepared.
    #[error(transparent)]
    Listener(#[from] listener::ListenerError),
    /// Node mode: the SPIRE agent does not share this server's PID namespace.
    #[error("--admin-socket: {0}")]
    PidNamespace(String),
    /// The admin address could not be bound.
    #[error("cannot bind admin address {addr}: {source}")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running server; dropping it without [`RunningServer::shutdown`] leaves its tasks running.
#[derive(Debug)]
pub struct RunningServer {
    snapshots: watch::Receiver<Arc<Published>>,
    node: Option<Arc<NodeIdentities>>,
    metrics: Arc<Metrics>,
    admin_addr: Option<SocketAddr>,
    debug_addr: Option<SocketAddr>,
    sds_socket: PathBuf,
    background: Vec<JoinHandle<()>>,
    stop_streams: watch::Sender<bool>,
    stop_grpc: oneshot::Sender<()>,
    grpc: JoinHandle<()>,
}

/// How long shutdown waits for connections to close before dropping them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl RunningServer {
    /// The admin endpoint's bound address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The debug endpoint's bound address, if enabled.
    pub fn debug_addr(&self) -> Option<SocketAddr> {
        self.debug_addr
    }

    /// A receiver of published snapshots (for tests and tools); in node mode
    /// the node's bundles only (each workload has its own).
    pub fn snapshots(&self) -> watch::Receiver<Arc<Published>> {
        self.snapshots.clone()
    }

    /// Node mode: every attested workload and what it is served.
    pub fn workloads(&self) -> Vec<delegated::WorkloadReport> {
        self.node.as_ref().map(|n| n.report()).unwrap_or_default()
    }

    /// The server's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Per pod: whether a valid X.509-SVID is held; per node: whether the agent's bundles are.
    pub fn is_ready(&self) -> bool {
        admin::is_ready(self.node.is_some(), &self.snapshots.borrow())
    }

    /// Stops the source, ends every SDS stream, and removes the socket file;
    /// bounded by [`SHUTDOWN_GRACE`] even when clients stopped reading.
    pub async fn shutdown(mut self) {
        for task in &self.background {
            task.abort();
        }
        for task in self.background {
            let _ = task.await;
        }
        let _ = self.stop_streams.send(true);
        let _ = self.stop_grpc.send(());
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.grpc)
            .await
            .is_err()
        {
            warn!("SDS connections did not close within {SHUTDOWN_GRACE:?}; dropping them");
            self.grpc.abort();
            let _ = self.grpc.await;
        }
        let _ = std::fs::remove_file(&self.sds_socket);
        info!("trustweave-sds stopped");
    }

    /// Waits until the gRPC server ends (it only ends on error or shutdown).
    pub async fn wait(&mut self) {
        let _ = (&mut self.grpc).await;
    }
}

/// Binds an admin or debug address, when one is configured.
async fn bind_http(
    addr: Option<SocketAddr>,
) -> Result<Option<tokio::net::TcpListener>, StartError> {
    match addr {
        Some(addr) => admin::bind(addr)
            .await
            .map(Some)
            .map_err(|source| StartError::Admin { addr, source }),
        None => Ok(None),
    }
}

/// Starts the Workload API source, the SDS socket and the admin endpoint.
pub async fn start(config: ServerConfig) -> Result<RunningServer, StartError> {
    if let Source::Delegated(delegated) = &config.source {
        peer::check_agent_pid_namespace(&delegated.endpoint)
            .await
            .map_err(StartError::PidNamespace)?;
    }
    let (tx, snapshots) = watch::channel(Arc::new(Published::now(
        IdentitySnapshot::default(),
        &config.names,
    )));
    let metrics = Arc::new(Metrics::new(snapshots.clone()));

    let unix = listener::bind(&config.sds_socket, config.socket_mode).await?;
    let admin = bind_http(config.admin_addr).await?;
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let debug_listener = bind_http(config.debug_addr).await?;

    let (identities, node, source_task) = match config.source.clone() {
        Source::WorkloadApi(source_config) => {
            let owner = source::IdentityOwner::new(tx, config.names.clone(), Arc::clone(&metrics));
            let task = tokio::spawn(source::run(source_config, owner));
            (Identities::Shared(snapshots.clone()), None, task)
        }
        Source::Delegated(delegated_config) => {
            let (node, task) = NodeIdentities::start(
                delegated_config,
                config.names.clone(),
                Arc::clone(&metrics),
                tx,
            );
            (
                Identities::per_workload(Arc::clone(&node), &config.names),
                Some(node),
                task,
            )
        }
    };
    let mut background = vec![source_task];
    let debug_addr = debug_listener.as_ref().and_then(|l| l.local_addr().ok());
    let listeners = [
        (admin, admin::Routes::Admin),
        (debug_listener, admin::Routes::Debug),
    ];
    for (listener, routes) in listeners {
        let Some(listener) = listener else { continue };
        let state = admin::AdminState {
            snapshots: snapshots.clone(),
            metrics: Arc::clone(&metrics),
            node: node.clone(),
        };
        background.push(tokio::spawn(async move {
            if let Err(error) = admin::serve(listener, state, routes).await {
                error!(%error, ?routes, "admin endpoint failed");
            }
        }));
    }

    let (stop_streams, streams_stop) = watch::channel(false);
    let service = sds::SdsService::new(
        identities,
        config.names.clone(),
        config.trust_format,
        Arc::clone(&metrics),
        streams_stop,
    );
    let limits = config.limits.clone();
    let incoming = listener::incoming(
        unix,
        config.allowed_uids.clone(),
        limits.clone(),
        Arc::clone(&metrics),
        node.is_some(),
    );
    let (stop_grpc, stopped) = oneshot::channel::<()>();
    let grpc = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .max_concurrent_streams(limits.max_streams_per_connection)
            .http2_keepalive_interval(Some(limits.keepalive))
            .http2_keepalive_timeout(Some(limits.keepalive))
            .add_service(sds::server(service))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(error) = result {
            error!(%error, "SDS server failed");
        }
    });
    info!(
        sds_socket = %config.sds_socket.display(),
        source = %config.source.endpoint(),
        node_mode = node.is_some(),
        admin = ?admin_addr,
        "trustweave-sds started"
    );
    Ok(RunningServer {
        snapshots,
        node,
        metrics,
        admin_addr,
        debug_addr,
        sds_socket: config.sds_socket,
        background,
        stop_streams,
        stop_grpc,
        grpc,
    })
}
