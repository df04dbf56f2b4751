//! The identity source: the SPIFFE Workload API (SPIRE agent) → snapshots.
//!
//! One task holds the Workload API stream, turns each X.509 context into an
//! [`IdentitySnapshot`] and publishes it. On disconnect the last good snapshot
//! stays published while it is valid, the task reconnects with jittered
//! exponential backoff, and each change of link state is logged once (not per
//! retry). A second task removes SVIDs from the published snapshot the moment
//! they expire, so an expired SVID is never served.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use spiffe::WorkloadApiClient;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::snapshot::{IdentitySnapshot, Published};

/// Where and how to reach the Workload API.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Endpoint address: `unix:/path`, `unix:///path` or a bare absolute path.
    pub endpoint: String,
    /// First retry delay after a failure.
    pub min_backoff: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
}

impl SourceConfig {
    /// The endpoint in the URI form the `spiffe` crate expects.
    pub fn endpoint_uri(&self) -> String {
        normalize_endpoint(&self.endpoint)
    }
}

/// Turns a bare socket path into a `unix:` URI; leaves URIs as they are.
pub fn normalize_endpoint(endpoint: &str) -> String {
    if endpoint.starts_with('/') {
        format!("unix:{endpoint}")
    } else {
        endpoint.to_string()
    }
}

/// The state of the link to the Workload API, logged on change only.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Starting,
    Connected,
    Down,
}

/// Exponential backoff with full jitter between `min` and the current ceiling.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            ceiling: min,
        }
    }

    fn reset(&mut self) {
        self.ceiling = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        let span = self.ceiling.saturating_sub(self.min);
        let jitter = span.mul_f64(fastrand::f64());
        self.ceiling = (self.ceiling * 2).min(self.max);
        self.min + jitter
    }
}

/// Runs the Workload API client forever, publishing snapshots on `tx`.
pub async fn run(
    config: SourceConfig,
    tx: Arc<watch::Sender<Arc<Published>>>,
    metrics: Arc<Metrics>,
) {
    let endpoint = config.endpoint_uri();
    let mut backoff = Backoff::new(config.min_backoff, config.max_backoff);
    let mut link = Link::Starting;
    loop {
        let result = stream_contexts(&endpoint, &tx, &metrics, &mut link, &mut backoff).await;
        metrics.workload_api_connected.set(0);
        let reason = match result {
            Ok(()) => "the Workload API closed the stream".to_string(),
            Err(error) => error,
        };
        if link != Link::Down {
            let serving = tx.borrow().snapshot.default_svid().is_some();
            warn!(
                endpoint = %endpoint,
                %reason,
                serving_last_good = serving,
                "Workload API unavailable; retrying with backoff"
            );
            link = Link::Down;
        } else {
            debug!(%reason, "Workload API still unavailable");
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Connects, then publishes every context until the stream ends.
async fn stream_contexts(
    endpoint: &str,
    tx: &watch::Sender<Arc<Published>>,
    metrics: &Metrics,
    link: &mut Link,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let client = WorkloadApiClient::connect_to(endpoint)
        .await
        .map_err(|e| e.to_string())?;
    let mut contexts = client
        .stream_x509_contexts()
        .await
        .map_err(|e| e.to_string())?;
    while let Some(item) = contexts.next().await {
        let context = item.map_err(|e| e.to_string())?;
        if *link != Link::Connected {
            info!(endpoint, "Workload API connected");
            *link = Link::Connected;
            metrics.workload_api_connected.set(1);
            backoff.reset();
        }
        match IdentitySnapshot::from_context(&context, SystemTime::now()) {
            Ok(snapshot) if snapshot.default_svid().is_none() => {
                warn!(
                    "Workload API sent no SVID that is valid now; keeping the last good identity"
                );
            }
            Ok(snapshot) => publish(tx, snapshot),
            Err(error) => {
                warn!(%error, "Workload API sent unusable material; keeping the last good identity");
            }
        }
    }
    Ok(())
}

/// Publishes `snapshot` if it differs from the current one, and logs what changed.
pub fn publish(tx: &watch::Sender<Arc<Published>>, snapshot: IdentitySnapshot) {
    tx.send_if_modified(|current| {
        if current.snapshot == snapshot {
            return false;
        }
        log_change(&current.snapshot, &snapshot);
        *current = Arc::new(Published::now(snapshot));
        true
    });
}

fn log_change(old: &IdentitySnapshot, new: &IdentitySnapshot) {
    let svid = new.default_svid();
    let old_serial = old.default_svid().map(|s| s.leaf.serial_hex.as_str());
    let new_serial = svid.map(|s| s.leaf.serial_hex.as_str());
    if old_serial != new_serial {
        info!(
            spiffe_id = svid.map(|s| s.spiffe_id.as_str()).unwrap_or(""),
            serial = new_serial.unwrap_or(""),
            svids = new.svids.len(),
            "X.509-SVID updated"
        );
    }
    if old.bundles != new.bundles {
        let trust_domains: Vec<&String> = new.bundles.keys().collect();
        info!(?trust_domains, "trust bundles updated");
    }
}

/// Removes SVIDs from the published snapshot at the moment they expire.
pub async fn expire_svids(tx: Arc<watch::Sender<Arc<Published>>>) {
    let mut changes = tx.subscribe();
    loop {
        let next = changes.borrow_and_update().snapshot.next_expiry();
        let wait = next.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        match wait {
            Some(wait) => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {
                        let pruned = tx.borrow().snapshot.clone().without_expired(SystemTime::now());
                        if pruned.default_svid().is_none() {
                            warn!("the last X.509-SVID expired; nothing is served until the Workload API sends a new one");
                        }
                        publish(&tx, pruned);
                    }
                    changed = changes.changed() => if changed.is_err() { return },
                }
            }
            None => {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_paths_become_unix_uris() {
        assert_eq!(
            normalize_endpoint("/run/spire/agent.sock"),
            "unix:/run/spire/agent.sock"
        );
        assert_eq!(
            normalize_endpoint("unix:///run/a.sock"),
            "unix:///run/a.sock"
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_secs(1)));
        assert_eq!(backoff.ceiling, Duration::from_secs(1));
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }
}
