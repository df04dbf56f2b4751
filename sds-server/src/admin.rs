//! The admin endpoint: `/healthz`, `/readyz` and Prometheus `/metrics`.

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

use crate::metrics::Metrics;
use crate::snapshot::Published;

#[derive(Clone)]
struct AdminState {
    snapshots: watch::Receiver<Arc<Published>>,
    metrics: Arc<Metrics>,
}

/// Whether a valid X.509-SVID is held right now.
pub fn is_ready(published: &Published) -> bool {
    published
        .snapshot
        .default_svid()
        .is_some_and(|svid| !svid.leaf.is_expired_at(SystemTime::now()))
}

/// Serves the admin endpoint on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    snapshots: watch::Receiver<Arc<Published>>,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { snapshots, metrics });
    axum::serve(listener, app).await
}

/// Binds the admin address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if is_ready(&state.snapshots.borrow()) {
        (StatusCode::OK, "ready\n")
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
