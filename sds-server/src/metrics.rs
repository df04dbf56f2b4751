//! Prometheus metrics for the SDS server, scraped from the admin endpoint.
//!
//! Label sets are bounded: the protocol (`sotw`, `delta`, `fetch`) and trust
//! domain names from the workload's own bundle set. Nothing secret is ever a label.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::published::Published;

/// Label of a refusal or rejection: a short, fixed reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    /// e.g. `too_many_names`, `connections`, `key_mismatch`.
    pub reason: &'static str,
}

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
    /// Workload API errors and refused material, by reason.
    pub workload_api_rejected: Family<RefusalLabel, Counter>,
    /// Clients, requests and connections refused, by reason.
    pub refused: Family<RefusalLabel, Counter>,
    /// Open SDS connections.
    pub connections_open: Gauge,
    /// Node mode: workloads with an open Delegated Identity subscription.
    pub workloads: Gauge,
    /// Node mode: Delegated Identity subscriptions started.
    pub workload_subscriptions: Counter,
    /// Node mode: workloads served no SVID or whose subscription ended, by reason.
    pub attestation_failures: Family<RefusalLabel, Counter>,
    /// Node mode: 1 while the Delegated Identity API bundle stream is up, else 0.
    pub delegated_api_connected: Gauge,
}

/// Metrics read off the published snapshot at each scrape (never mutated on scrape).
#[derive(Debug)]
struct SnapshotCollector(watch::Receiver<Arc<Published>>);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let published = Arc::clone(&self.0.borrow());
        let snapshot = &published.snapshot;
        // Absent, not zero, when no default SVID is held.
        if let Some(svid) = snapshot.default_svid() {
            let left = match svid.leaf.not_after.duration_since(SystemTime::now()) {
                Ok(left) => left.as_secs_f64(),
                Err(past) => -past.duration().as_secs_f64(),
            };
            let gauge = ConstGauge::new(left);
            let metric = encoder.encode_descriptor(
                "svid_expiry_seconds",
                "Seconds until the default SVID expires (absent when none is held)",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        let mut family = encoder.encode_descriptor(
            "trust_bundle_cas",
            "CA certificates per trust domain",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (td, bundle) in &snapshot.bundles {
            let label = TrustDomainLabel {
                trust_domain: td.clone(),
            };
            let gauge = ConstGauge::new(i64::try_from(bundle.roots_der.len()).unwrap_or(i64::MAX));
            gauge.encode(family.encode_family(&label)?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Creates and registers every metric under the `trustweave_sds` prefix;
    /// snapshot-derived gauges are read from `snapshots` at each scrape.
    pub fn new(snapshots: watch::Receiver<Arc<Published>>) -> Self {
        let mut metrics = Self {
            streams_open: Family::default(),
            pushes: Family::default(),
            nacks: Family::default(),
            push_latency: Histogram::new([0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            workload_api_connected: Gauge::default(),
            workload_api_rejected: Family::default(),
            refused: Family::default(),
            connections_open: Gauge::default(),
            workloads: Gauge::default(),
            workload_subscriptions: Counter::default(),
            attestation_failures: Family::default(),
            delegated_api_connected: Gauge::default(),
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
            "workload_api_rejected",
            "Workload API errors and refused material, by reason",
            metrics.workload_api_rejected.clone(),
        );
        registry.register(
            "refused",
            "SDS clients, requests and connections refused, by reason",
            metrics.refused.clone(),
        );
        registry.register(
            "connections_open",
            "Open SDS connections",
            metrics.connections_open.clone(),
        );
        registry.register(
            "workloads",
            "Workloads with an open Delegated Identity subscription (node mode)",
            metrics.workloads.clone(),
        );
        registry.register(
            "workload_subscriptions",
            "Delegated Identity subscriptions started (node mode)",
            metrics.workload_subscriptions.clone(),
        );
        registry.register(
            "attestation_failures",
            "Workloads served no SVID, or whose subscription failed or ended, by reason (node mode)",
            metrics.attestation_failures.clone(),
        );
        registry.register(
            "delegated_api_connected",
            "Whether the Delegated Identity API bundle stream is up (node mode)",
            metrics.delegated_api_connected.clone(),
        );
        registry.register_collector(Box::new(SnapshotCollector(snapshots)));
        metrics
    }

    /// Counts one refusal.
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusalLabel { reason }).inc();
    }

    /// Counts one Workload API error or refused context.
    pub fn reject(&self, reason: &'static str) {
        self.workload_api_rejected
            .get_or_create(&RefusalLabel { reason })
            .inc();
    }

    /// Counts one attestation failure (node mode).
    pub fn attestation_failed(&self, reason: &'static str) {
        self.attestation_failures
            .get_or_create(&RefusalLabel { reason })
            .inc();
    }

    /// Encodes everything in the text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
