//! The Rego part of a configuration, as written (compiled by [`super::rego`]
//! when the build has Rego mode; read by [`super::config`] either way).

use std::collections::BTreeMap;

use serde::Deserialize;

/// The Rego part of a configuration, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRego {
    /// Module name → Rego source text.
    pub modules: BTreeMap<String, String>,
    /// The `data` document.
    #[serde(default)]
    pub data: serde_json::Value,
    /// The rule whose value decides, e.g. `data.agentweave.authz.allow`.
    pub query: String,
    /// Evaluate, log and count what the policy would do, never enforce it.
    #[serde(default)]
    pub dry_run: bool,
}
