//! trustweave-sds: an Envoy SDS v3 server that streams X.509-SVIDs and
//! federated trust bundles from the SPIFFE Workload API (the SPIRE agent).
//!
//! Data flows one way: [`source`] (Workload API; the only writer) →
//! [`snapshot`] (validated, last good kept, rendered once by [`render`]) → a
//! `watch` channel → per-stream state machines in [`sds`] → Envoy. [`listener`]
//! bounds who may connect, how many and for how long.

#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod inspect;
pub mod listener;
pub mod metrics;
pub mod render;
pub mod sds;
pub mod snapshot;
pub mod source;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

pub use config::ServerConfig;
use metrics::Metrics;
use snapshot::{IdentitySnapshot, Published};

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The SDS socket could not be prepared.
    #[error(transparent)]
    Listener(#[from] listener::ListenerError),
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
    metrics: Arc<Metrics>,
    admin_addr: Option<SocketAddr>,
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

    /// A receiver of published snapshots (for tests and tools).
    pub fn snapshots(&self) -> watch::Receiver<Arc<Published>> {
        self.snapshots.clone()
    }

    /// The server's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Whether a valid X.509-SVID is held.
    pub fn is_ready(&self) -> bool {
        admin::is_ready(&self.snapshots.borrow())
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

/// Starts the Workload API source, the SDS socket and the admin endpoint.
pub async fn start(config: ServerConfig) -> Result<RunningServer, StartError> {
    let (tx, snapshots) = watch::channel(Arc::new(Published::now(
        IdentitySnapshot::default(),
        &config.names,
    )));
    let metrics = Arc::new(Metrics::new(snapshots.clone()));

    let unix = listener::bind(&config.sds_socket, config.socket_mode).await?;
    let admin = match config.admin_addr {
        Some(addr) => Some(
            admin::bind(addr)
                .await
                .map_err(|source| StartError::Admin { addr, source })?,
        ),
        None => None,
    };
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());

    let owner = source::IdentityOwner::new(tx, config.names.clone(), Arc::clone(&metrics));
    let mut background = vec![tokio::spawn(source::run(config.source.clone(), owner))];
    if let Some(admin) = admin {
        let (snapshots, metrics) = (snapshots.clone(), Arc::clone(&metrics));
        background.push(tokio::spawn(async move {
            if let Err(error) = admin::serve(admin, snapshots, metrics).await {
                error!(%error, "admin endpoint failed");
            }
        }));
    }

    let (stop_streams, streams_stop) = watch::channel(false);
    let service = sds::SdsService::new(
        snapshots.clone(),
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
        workload_api = %config.source.endpoint,
        admin = ?admin_addr,
        "trustweave-sds started"
    );
    Ok(RunningServer {
        snapshots,
        metrics,
        admin_addr,
        sds_socket: config.sds_socket,
        background,
        stop_streams,
        stop_grpc,
        grpc,
    })
}
