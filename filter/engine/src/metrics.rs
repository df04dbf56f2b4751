//! Metric names, kept behind a small trait so the engine's counting is tested natively.
//!
//! The label set is bounded: totals, plus one family per configured policy name.

use super::config::Config;
use super::decide::{Decision, Shadow};

/// Something that counts.
pub trait MetricSink {
    /// Adds one to counter `name`.
    fn increment(&mut self, name: &str);
}

/// Every counter a configuration can touch (defined up front by the shim).
pub fn all_names(config: &Config) -> Vec<String> {
    let mut names: Vec<String> = [
        "allowed",
        "denied",
        "no_identity",
        "sni_allowed",
        "sni_denied",
        "peer_certificates_parsed",
        "rego_errors",
        "unverifiable_peer",
        "forwarded_refused",
    ]
    .iter()
    .map(|n| format!("trustweave.{n}"))
    .collect();
    for policy in config.policy_names() {
        for outcome in [
            "allowed",
            "denied",
            "dry_run_would_allow",
            "dry_run_would_deny",
            "audited",
        ] {
            names.push(policy_metric(policy, outcome));
        }
    }
    names
}

fn policy_metric(policy: &str, outcome: &str) -> String {
    format!("trustweave.policy.{policy}.{outcome}")
}

/// Counts one decision.
pub fn record(decision: &Decision, no_identity: bool, sink: &mut dyn MetricSink) {
    let outcome = if decision.allowed {
        "allowed"
    } else {
        "denied"
    };
    sink.increment(&format!("trustweave.{outcome}"));
    if no_identity {
        sink.increment("trustweave.no_identity");
    }
    if let Some((policy, _)) = &decision.policy {
        sink.increment(&policy_metric(policy, outcome));
    }
    for (policy, shadow) in &decision.dry_run {
        let outcome = match shadow {
            Shadow::WouldAllow => "dry_run_would_allow",
            Shadow::WouldDeny => "dry_run_would_deny",
        };
        sink.increment(&policy_metric(policy, outcome));
    }
    for policy in &decision.audited {
        sink.increment(&policy_metric(policy, "audited"));
    }
}
