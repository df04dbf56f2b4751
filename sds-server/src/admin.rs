//! The admin endpoint: `/healthz`, `/readyz`, Prometheus `/metrics`, and in
//! node mode `/debug/workloads` (each attested workload and the identity it is
//! served — SPIFFE IDs, serials and trust domains, never a key).
//!
//! `/debug/*` maps the node's workloads: it is served only on loopback — on
//! the admin address when that is loopback, and on the separate debug address
//! (`--debug-addr`, loopback only) — never on an address other pods reach.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::delegated::NodeIdentities;
use crate::metrics::Metrics;
use crate::published::Published;

/// What the admin endpoint reads.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// The server's snapshot (node mode: the node's bundles).
    pub snapshots: watch::Receiver<Arc<Published>>,
    /// The server's metrics.
    pub metrics: Arc<Metrics>,
    /// Node mode: the attested workloads.
    pub node: Option<Arc<NodeIdentities>>,
}

/// Per pod: a valid X.509-SVID is held right now. Per node: the agent's
/// bundles are held (each workload's SVID is its own affair).
pub fn is_ready(node_mode: bool, published: &Published) -> bool {
    if node_mode {
        return !published.snapshot.bundles.is_empty();
    }
    published
        .snapshot
        .default_svid()
        .is_some_and(|svid| !svid.leaf.is_expired_at(SystemTime::now()))
}

/// Which routes a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routes {
    /// Health, readiness and metrics, plus `/debug/*` when bound to loopback.
    Admin,
    /// `/debug/*` only (a loopback listener of its own).
    Debug,
}

/// Serves `routes` on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    routes: Routes,
) -> std::io::Result<()> {
    let loopback = listener.local_addr()?.ip().is_loopback();
    let mut app = Router::new();
    if routes == Routes::Admin {
        app = app
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text));
    }
    if loopback {
        app = app.route("/debug/workloads", get(workloads));
    }
    axum::serve(listener, app.with_state(state)).await
}

async fn workloads(State(state): State<AdminState>) -> impl IntoResponse {
    match &state.node {
        Some(node) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string_pretty(&node.report()).unwrap_or_default(),
        ),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain")],
            "not in node mode (--source delegated)\n".to_string(),
        ),
    }
}

/// Binds the admin address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let node_mode = state.node.is_some();
    if is_ready(node_mode, &state.snapshots.borrow()) {
        (StatusCode::OK, "ready\n")
    } else if node_mode {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no trust bundles from the SPIRE agent's Delegated Identity API yet\n",
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no valid X.509-SVID held\n",
        )
    }
}

async fn metrics_text(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
