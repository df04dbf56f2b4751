//! Compiled policies and rule matching against one request's facts.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;

use super::pattern::PatternSet;
use super::spiffe_id::SpiffeId;

/// What a policy does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Allow the request.
    Allow,
    /// Deny the request (evaluated before ALLOW).
    Deny,
    /// Log and count only.
    Audit,
}

/// The caller as resolved from the peer certificate (or a trusted gateway).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller's SPIFFE ID.
    pub id: SpiffeId,
    /// Its cloud, if known.
    pub cloud: Option<String>,
    /// Its region, if known.
    pub region: Option<String>,
}

/// This hop, as far as it is known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Local {
    /// This workload's own SPIFFE ID (its certificate's URI SAN).
    pub principal: Option<String>,
    /// Its trust domain.
    pub trust_domain: Option<String>,
    /// Its cloud.
    pub cloud: Option<String>,
    /// Its region.
    pub region: Option<String>,
}

/// Everything a decision may look at; HTTP fields are empty at L4.
#[derive(Clone, Debug, Default)]
pub struct Facts<'a> {
    /// The caller, if a valid identity was established.
    pub caller: Option<&'a Caller>,
    /// This hop.
    pub local: Option<&'a Local>,
    /// HTTP method.
    pub method: &'a str,
    /// Path without query.
    pub path: &'a str,
    /// Host / authority.
    pub host: &'a str,
    /// Destination port.
    pub port: Option<u32>,
    /// Request headers (lower-case names).
    pub headers: &'a [(String, String)],
    /// The action / capability named by the action header.
    pub action: Option<&'a str>,
    /// TLS SNI.
    pub sni: Option<&'a str>,
}

impl Facts<'_> {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Caller conditions, compiled.
#[derive(Clone, Debug, Default)]
pub struct From {
    /// Caller SPIFFE ID patterns.
    pub principals: PatternSet,
    /// Caller SPIFFE ID patterns that must not match.
    pub not_principals: PatternSet,
    /// Trust domain patterns.
    pub trust_domains: PatternSet,
    /// Trust domain patterns that must not match.
    pub not_trust_domains: PatternSet,
    /// Caller in this workload's trust domain.
    pub same_trust_domain: bool,
    /// Caller in this hop's region.
    pub same_region: bool,
}

/// Request conditions, compiled.
#[derive(Clone, Debug, Default)]
pub struct To {
    /// Path patterns.
    pub paths: PatternSet,
    /// Path patterns that must not match.
    pub not_paths: PatternSet,
    /// Methods (exact).
    pub methods: Vec<String>,
    /// Host patterns.
    pub hosts: PatternSet,
    /// Destination ports.
    pub ports: Vec<u32>,
    /// Header name → value patterns.
    pub headers: Vec<(String, PatternSet)>,
    /// Action patterns.
    pub actions: PatternSet,
    /// Caller → allowed actions.
    pub allowed_actions: HashMap<String, HashSet<String>>,
    /// This workload's SPIFFE ID patterns.
    pub local_principals: PatternSet,
}

/// The attribute a `when` condition reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConditionKey {
    /// `request.headers[<name>]`.
    Header(String),
    /// `source.cloud`.
    SourceCloud,
    /// `source.region`.
    SourceRegion,
    /// `connection.sni`.
    Sni,
}

/// A compiled `when` condition.
#[derive(Clone, Debug)]
pub struct Condition {
    /// The attribute.
    pub key: ConditionKey,
    /// One must match, if any given.
    pub values: PatternSet,
    /// None may match.
    pub not_values: PatternSet,
}

impl Condition {
    /// Parses a condition key.
    pub fn parse_key(key: &str) -> Result<ConditionKey, String> {
        match key {
            "source.cloud" => Ok(ConditionKey::SourceCloud),
            "source.region" => Ok(ConditionKey::SourceRegion),
            "connection.sni" => Ok(ConditionKey::Sni),
            _ => key
                .strip_prefix("request.headers[")
                .and_then(|rest| rest.strip_suffix(']'))
                .filter(|name| !name.is_empty())
                .map(|name| ConditionKey::Header(name.to_ascii_lowercase()))
                .ok_or_else(|| {
                    format!("{key:?}: expected request.headers[<name>], source.cloud, source.region or connection.sni")
                }),
        }
    }

    fn matches(&self, facts: &Facts<'_>) -> bool {
        let value = match &self.key {
            ConditionKey::Header(name) => facts.header(name),
            ConditionKey::SourceCloud => facts.caller.and_then(|c| c.cloud.as_deref()),
            ConditionKey::SourceRegion => facts.caller.and_then(|c| c.region.as_deref()),
            ConditionKey::Sni => facts.sni,
        };
        let positive = self.values.is_empty() || value.is_some_and(|v| self.values.matches(v));
        let negative =
            self.not_values.is_empty() || !value.is_some_and(|v| self.not_values.matches(v));
        positive && negative
    }
}

/// A compiled rule.
#[derive(Clone, Debug, Default)]
pub struct CompiledRule {
    /// Caller conditions.
    pub from: From,
    /// Request conditions.
    pub to: To,
    /// Further conditions.
    pub when: Vec<Condition>,
}

/// A compiled policy.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    /// Its name.
    pub name: String,
    /// ALLOW, DENY or AUDIT.
    pub action: Action,
    /// Evaluated and counted, never enforced.
    pub dry_run: bool,
    /// Rules, ORed.
    pub rules: Vec<CompiledRule>,
}

impl CompiledPolicy {
    /// Index of the first rule that matches, if any.
    pub fn matching_rule(&self, facts: &Facts<'_>) -> Option<usize> {
        self.rules.iter().position(|rule| rule.matches(facts))
    }
}

impl CompiledRule {
    /// Whether `from`, `to` and every `when` condition hold.
    pub fn matches(&self, facts: &Facts<'_>) -> bool {
        self.from.matches(facts)
            && self.to.matches(facts)
            && self.when.iter().all(|c| c.matches(facts))
    }
}

impl From {
    fn needs_identity(&self) -> bool {
        !(self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.trust_domains.is_empty()
            && self.not_trust_domains.is_empty())
            || self.same_trust_domain
            || self.same_region
    }

    fn matches(&self, facts: &Facts<'_>) -> bool {
        if !self.needs_identity() {
            return true;
        }
        // Any caller condition requires an identity: no identity never matches (fail closed).
        let Some(caller) = facts.caller else {
            return false;
        };
        let id = caller.id.as_str();
        let td = caller.id.trust_domain();
        let local = facts.local;
        (self.principals.is_empty() || self.principals.matches(id))
            && (self.not_principals.is_empty() || !self.not_principals.matches(id))
            && (self.trust_domains.is_empty() || self.trust_domains.matches(td))
            && (self.not_trust_domains.is_empty() || !self.not_trust_domains.matches(td))
            && (!self.same_trust_domain
                || local.and_then(|l| l.trust_domain.as_deref()) == Some(td))
            && (!self.same_region
                || matches!(
                    (caller.region.as_deref(), local.and_then(|l| l.region.as_deref())),
                    (Some(a), Some(b)) if a == b
                ))
    }
}

impl To {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        let host = facts.host;
        let host_no_port = host.rsplit_once(':').map_or(host, |(h, _)| h);
        (self.paths.is_empty() || self.paths.matches(facts.path))
            && (self.not_paths.is_empty() || !self.not_paths.matches(facts.path))
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == facts.method))
            && (self.hosts.is_empty()
                || self.hosts.matches(host)
                || self.hosts.matches(host_no_port))
            && (self.ports.is_empty() || facts.port.is_some_and(|p| self.ports.contains(&p)))
            && self
                .headers
                .iter()
                .all(|(name, values)| facts.header(name).is_some_and(|v| values.matches(v)))
            && (self.actions.is_empty() || facts.action.is_some_and(|a| self.actions.matches(a)))
            && (self.allowed_actions.is_empty()
                || matches!(
                    (facts.caller, facts.action),
                    (Some(caller), Some(action))
                        if self.allowed_actions.get(caller.id.as_str()).is_some_and(|set| set.contains(action))
                ))
            && (self.local_principals.is_empty()
                || facts
                    .local
                    .and_then(|l| l.principal.as_deref())
                    .is_some_and(|p| self.local_principals.matches(p)))
    }
}
