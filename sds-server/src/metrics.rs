//! Prometheus metrics for the SDS server, scraped from the admin endpoint.
//!
//! Label sets are bounded: the protocol (`sotw`, `delta`, `fetch`) and trust
//! domain names from the workload's own bundle set. Nothing secret is ever a label.

use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::snapshot::IdentitySnapshot;

/// Label for metrics split by discovery protocol.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    /// `sotw`, `delta` or `fetch`.
    pub protocol: &'static str,
}

/// Label for per-trust-domain metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrustDomainLabel {
    /// Trust domain name, e.g. `aws.company.com`.
    pub trust_domain: String,
}

/// All metrics of one server instance.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open SDS streams by protocol.
    pub streams_open: Family<ProtocolLabel, Gauge>,
    /// Discovery responses sent, by protocol.
    pub pushes: Family<ProtocolLabel, Counter>,
    /// Responses Envoy rejected (requests carrying `error_detail`), by protocol.
    pub nacks: Family<ProtocolLabel, Counter>,
    /// Seconds from a snapshot being published to a stream pushing it.
    pub push_latency: Histogram,
    /// 1 while the Workload API stream is up, else 0.
    pub workload_api_connected: Gauge,
    /// Seconds until the default SVID expires (negative or absent when none is held).
    pub svid_expiry_seconds: Gauge<f64, AtomicU64>,
    /// Number of CA certificates per trust domain in the current bundle set.
    pub bundle_cas: Family<TrustDomainLabel, Gauge>,
}

impl Metrics {
    /// Creates and registers every metric under the `trustweave_sds` prefix.
    pub fn new() -> Self {
        let mut metrics = Self {
            streams_open: Family::default(),
            pushes: Family::default(),
            nacks: Family::default(),
            push_latency: Histogram::new([0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            workload_api_connected: Gauge::default(),
            svid_expiry_seconds: Gauge::default(),
            bundle_cas: Family::default(),
            registry: Registry::with_prefix("trustweave_sds"),
        };
        let registry = &mut metrics.registry;
        registry.register(
            "streams_open",
            "Open SDS streams",
            metrics.streams_open.clone(),
        );
        registry.register("pushes", "Discovery responses sent", metrics.pushes.clone());
        registry.register(
            "nacks",
            "Responses rejected by Envoy",
            metrics.nacks.clone(),
        );
        registry.register(
            "push_latency_seconds",
            "Time from an identity change to its push on a stream",
            metrics.push_latency.clone(),
        );
        registry.register(
            "workload_api_connected",
            "Whether the Workload API stream is up",
            metrics.workload_api_connected.clone(),
        );
        registry.register(
            "svid_expiry_seconds",
            "Seconds until the default SVID expires",
            metrics.svid_expiry_seconds.clone(),
        );
        registry.register(
            "trust_bundle_cas",
            "CA certificates per trust domain",
            metrics.bundle_cas.clone(),
        );
        metrics
    }

    /// Refreshes the snapshot-derived gauges and encodes everything in the text format.
    pub fn encode(&self, snapshot: &IdentitySnapshot) -> String {
        let expiry = snapshot.default_svid().map(|svid| {
            match svid.leaf.not_after.duration_since(SystemTime::now()) {
                Ok(left) => left.as_secs_f64(),
                Err(past) => -past.duration().as_secs_f64(),
            }
        });
        self.svid_expiry_seconds.set(expiry.unwrap_or(0.0));
        self.bundle_cas.clear();
        for (td, bundle) in &snapshot.bundles {
            let label = TrustDomainLabel {
                trust_domain: td.clone(),
            };
            self.bundle_cas
                .get_or_create(&label)
                .set(i64::try_from(bundle.roots_der.len()).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
