//! The identity source: the SPIFFE Workload API (SPIRE agent) → snapshots.
//!
//! One task owns the identity state, as ztunnel's certificate manager does: it
//! holds the Workload API stream, turns each X.509 context into an
//! [`IdentitySnapshot`] and publishes it, and its own timer withdraws each SVID
//! the moment it expires — there is no second writer whose stale copy could
//! overwrite a rotation. On disconnect the last good snapshot stays published
//! while it is valid, the task reconnects with jittered exponential backoff,
//! and each change of link state is logged once (not per retry).
//!
//! Errors stay typed (`spiffe::WorkloadApiError`), so the Workload API
//! specification's retry rules apply: `InvalidArgument` (a request the agent
//! will never accept, e.g. a proxy stripping the security header) is not
//! retried at the fast pace — the task waits the longest backoff and says so.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use spiffe::{WorkloadApiClient, WorkloadApiError};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::published::Published;
use crate::render::SecretNames;
use crate::snapshot::IdentitySnapshot;

/// Where and how to reach the Workload API.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Endpoint address: `unix:/path`, `unix:///path` or a bare absolute path.
    pub endpoint: String,
    /// First retry delay after a failure.
    pub min_backoff: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
    /// Connecting, opening the stream and receiving its first context must take
    /// no longer (an agent that accepts and never answers is retried, not waited on).
    pub first_context_timeout: Duration,
}

/// Default of [`SourceConfig::first_context_timeout`].
pub const FIRST_CONTEXT_TIMEOUT: Duration = Duration::from_secs(15);

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
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            ceiling: min,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.ceiling = self.min;
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let span = self.ceiling.saturating_sub(self.min);
        let jitter = span.mul_f64(fastrand::f64());
        self.ceiling = self.ceiling.saturating_mul(2).min(self.max);
        self.min.saturating_add(jitter)
    }
}

/// Why the Workload API stream ended.
#[derive(Debug)]
enum Ended {
    /// The agent closed the stream.
    Closed,
    /// No first context within the timeout.
    TimedOut,
    /// An error, kept typed.
    Error(WorkloadApiError),
}

impl Ended {
    fn label(&self) -> &'static str {
        match self {
            Self::Closed => "stream_closed",
            Self::TimedOut => "timeout",
            Self::Error(e) if e.is_invalid_argument() => "invalid_argument",
            Self::Error(WorkloadApiError::NoIdentityIssued) => "no_identity_issued",
            Self::Error(WorkloadApiError::PermissionDenied(_)) => "permission_denied",
            Self::Error(WorkloadApiError::Transport(_)) => "unavailable",
            Self::Error(_) => "invalid_response",
        }
    }
}

/// The only writer of the identity state.
pub struct IdentityOwner {
    tx: watch::Sender<Arc<Published>>,
    names: SecretNames,
    metrics: Arc<Metrics>,
}

impl IdentityOwner {
    /// Owns `tx`: nothing else publishes on it.
    pub fn new(
        tx: watch::Sender<Arc<Published>>,
        names: SecretNames,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { tx, names, metrics }
    }

    fn current(&self) -> IdentitySnapshot {
        self.tx.borrow().snapshot.clone()
    }

    /// Publishes `snapshot` if it differs from the current one, and logs what changed.
    pub fn publish(&self, snapshot: IdentitySnapshot) {
        let names = &self.names;
        self.tx.send_if_modified(|current| {
            if current.snapshot == snapshot {
                return false;
            }
            log_change(&current.snapshot, &snapshot);
            *current = Arc::new(Published::now(snapshot, names));
            true
        });
    }

    /// Takes one context: published when it can be served, else refused whole
    /// (the last good snapshot stays) and counted.
    pub fn on_context(&self, context: Result<IdentitySnapshot, crate::snapshot::SnapshotError>) {
        match context {
            Ok(snapshot) => self.publish(snapshot),
            Err(error) => {
                self.metrics.reject(error.label());
                warn!(%error, "Workload API sent unusable material; keeping the last good identity");
            }
        }
    }

    /// Withdraws what has expired by now.
    pub fn expire(&self, now: SystemTime) {
        let current = self.current();
        let had_default = current.default_svid().is_some();
        let pruned = current.without_expired(now);
        if had_default && pruned.default_svid().is_none() {
            warn!("the default X.509-SVID expired; no default is served until the Workload API sends a new one");
        }
        self.publish(pruned);
    }

    /// Sleeps until the next SVID expires (forever when none is held).
    async fn next_expiry(&self) {
        let next = self.tx.borrow().snapshot.next_expiry();
        sleep_until(next).await;
    }

    /// Runs `future`, withdrawing SVIDs as they expire meanwhile.
    pub(crate) async fn expiring_while<T>(
        &self,
        future: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::pin!(future);
        loop {
            tokio::select! {
                output = &mut future => return output,
                _ = self.next_expiry() => self.expire(SystemTime::now()),
            }
        }
    }
}

/// Sleeps until `at` (wall clock), forever when `None`.
pub(crate) async fn sleep_until(at: Option<SystemTime>) {
    match at {
        Some(at) => {
            let wait = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending().await,
    }
}

/// Runs the Workload API client forever as the only owner of the identity state.
pub async fn run(config: SourceConfig, owner: IdentityOwner) {
    let endpoint = config.endpoint_uri();
    let mut backoff = Backoff::new(config.min_backoff, config.max_backoff);
    let mut link = Link::Starting;
    loop {
        let ended = stream_contexts(
            &endpoint,
            config.first_context_timeout,
            &owner,
            &mut link,
            &mut backoff,
        )
        .await;
        owner.metrics.workload_api_connected.set(0);
        owner.metrics.reject(ended.label());
        let delay = match &ended {
            Ended::Error(error) if error.is_invalid_argument() => {
                warn!(%error, "the Workload API refuses this client's requests (InvalidArgument); retrying at the longest backoff");
                config.max_backoff
            }
            _ => backoff.next_delay(),
        };
        let reason = match &ended {
            Ended::Closed => "the Workload API closed the stream".to_string(),
            Ended::TimedOut => {
                format!("no X.509 context within {:?}", config.first_context_timeout)
            }
            Ended::Error(error) => error.to_string(),
        };
        if link != Link::Down {
            let serving = owner.tx.borrow().snapshot.default_svid().is_some();
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
        owner.expiring_while(tokio::time::sleep(delay)).await;
    }
}

/// Connects, then publishes every context until the stream ends.
async fn stream_contexts(
    endpoint: &str,
    first_context_timeout: Duration,
    owner: &IdentityOwner,
    link: &mut Link,
    backoff: &mut Backoff,
) -> Ended {
    let first = owner
        .expiring_while(tokio::time::timeout(first_context_timeout, async {
            let client = WorkloadApiClient::connect_to(endpoint).await?;
            let mut contexts = Box::pin(client.stream_x509_contexts().await?);
            let first = contexts.next().await;
            Ok::<_, WorkloadApiError>((contexts, first))
        }))
        .await;
    let (mut contexts, mut pending) = match first {
        Err(_) => return Ended::TimedOut,
        Ok(Err(error)) => return Ended::Error(error),
        Ok(Ok((contexts, first))) => (contexts, Some(first)),
    };
    loop {
        let item = match pending.take() {
            Some(first) => first,
            None => owner.expiring_while(contexts.next()).await,
        };
        let context = match item {
            None => return Ended::Closed,
            Some(Err(error)) => return Ended::Error(error),
            Some(Ok(context)) => context,
        };
        if *link != Link::Connected {
            info!(endpoint, "Workload API connected");
            *link = Link::Connected;
            owner.metrics.workload_api_connected.set(1);
            backoff.reset();
        }
        owner.on_context(IdentitySnapshot::from_context(&context, SystemTime::now()));
    }
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
        let trust_domains: Vec<&String> = new.bundles.keys().take(16).collect();
        info!(
            count = new.bundles.len(),
            ?trust_domains,
            "trust bundles updated"
        );
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
