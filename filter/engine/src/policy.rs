//! Compiled policies and rule matching against one request's facts.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use serde::Deserialize;

use super::headers::{Headers, Quantifier, Reading};
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

/// No headers (L4, and facts built without a request).
pub static NO_HEADERS: Headers = Headers::EMPTY;

/// Everything a decision may look at; HTTP fields are absent at L4.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// The caller, if a valid identity was established.
    pub caller: Option<&'a Caller>,
    /// This hop.
    pub local: Option<&'a Local>,
    /// HTTP method (`None`: absent; `Some(None)`: malformed).
    pub method: Option<Reading<'a>>,
    /// Path without query, as Envoy routes it.
    pub path: Option<Reading<'a>>,
    /// Host / authority.
    pub host: Option<Reading<'a>>,
    /// Destination port.
    pub port: Option<u32>,
    /// Request headers (lower-case names), as the policy sees them.
    pub headers: &'a Headers,
    /// Name of the header carrying the action / capability.
    pub action_header: &'a str,
    /// TLS SNI.
    pub sni: Option<&'a str>,
}

impl Default for Facts<'_> {
    fn default() -> Self {
        Self {
            caller: None,
            local: None,
            method: None,
            path: None,
            host: None,
            port: None,
            headers: &NO_HEADERS,
            action_header: "",
            sni: None,
        }
    }
}

/// A positive condition on a single-valued fact: absent never matches.
fn present_holds<'a>(
    fact: Option<Reading<'a>>,
    q: Quantifier,
    condition: impl FnMut(&'a str) -> bool,
) -> bool {
    fact.is_some_and(|reading| q.holds(&[reading], condition))
}

/// A positive condition on a header: absent never matches.
fn header_holds(
    facts: &Facts<'_>,
    name: &str,
    q: Quantifier,
    condition: impl FnMut(&str) -> bool,
) -> bool {
    let mut joined = String::new();
    let readings = facts.headers.readings(name, &mut joined);
    !readings.is_empty() && q.holds(&readings, condition)
}

/// Host patterns as Istio matches them: case-insensitive, with or without the
/// port (and a trailing dot) of the request's authority.
fn host_matches(hosts: &PatternSet, host: &str) -> bool {
    let lower = host.to_ascii_lowercase();
    let without_port = strip_port(&lower);
    let without_dot = without_port.strip_suffix('.').unwrap_or(without_port);
    hosts.matches(&lower) || hosts.matches(without_port) || hosts.matches(without_dot)
}

/// `host:port` → `host` (also `[v6]:port`); anything else unchanged.
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']')) =>
        {
            h
        }
        _ => host,
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

    fn matches(&self, facts: &Facts<'_>, q: Quantifier) -> bool {
        let mut joined = String::new();
        let readings: Vec<Reading<'_>> = match &self.key {
            ConditionKey::Header(name) => facts.headers.readings(name, &mut joined),
            ConditionKey::SourceCloud => facts
                .caller
                .and_then(|c| c.cloud.as_deref())
                .map(Some)
                .into_iter()
                .collect(),
            ConditionKey::SourceRegion => facts
                .caller
                .and_then(|c| c.region.as_deref())
                .map(Some)
                .into_iter()
                .collect(),
            ConditionKey::Sni => facts.sni.map(Some).into_iter().collect(),
        };
        let present = !readings.is_empty();
        let positive =
            self.values.is_empty() || (present && q.holds(&readings, |v| self.values.matches(v)));
        let negative = self.not_values.is_empty()
            || !present
            || q.holds(&readings, |v| !self.not_values.matches(v));
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
    /// How this policy reads ambiguous facts: an ALLOW must hold under every
    /// reading, a DENY or AUDIT under any (see [`super::headers`]).
    pub fn quantifier(&self) -> Quantifier {
        match self.action {
            Action::Allow => Quantifier::Every,
            Action::Deny | Action::Audit => Quantifier::Any,
        }
    }

    /// Index of the first rule that matches, if any.
    pub fn matching_rule(&self, facts: &Facts<'_>) -> Option<usize> {
        let q = self.quantifier();
        self.rules.iter().position(|rule| rule.matches(facts, q))
    }
}

impl CompiledRule {
    /// Whether `from`, `to` and every `when` condition hold, reading ambiguous facts by `q`.
    pub fn matches(&self, facts: &Facts<'_>, q: Quantifier) -> bool {
        self.from.matches(facts, q)
            && self.to.matches(facts, q)
            && self.when.iter().all(|c| c.matches(facts, q))
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

    fn matches(&self, facts: &Facts<'_>, q: Quantifier) -> bool {
        if !self.needs_identity() {
            return true;
        }
        let Some(caller) = facts.caller else {
            // No identity. As in Istio, an unidentified caller is none of the
            // principals or trust domains named in `not_*`, so a DENY rule made
            // only of negative caller conditions matches it (`notPrincipals: ["*"]`
            // refuses plaintext). An ALLOW rule with any caller condition never
            // matches it: stricter than Istio, never looser.
            return q == Quantifier::Any
                && self.principals.is_empty()
                && self.trust_domains.is_empty()
                && !self.same_trust_domain
                && !self.same_region;
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
    fn matches(&self, facts: &Facts<'_>, q: Quantifier) -> bool {
        (self.paths.is_empty() || present_holds(facts.path, q, |p| self.paths.matches(p)))
            && (self.not_paths.is_empty()
                || facts
                    .path
                    .is_none_or(|r| q.holds(&[r], |p| !self.not_paths.matches(p))))
            && (self.methods.is_empty()
                || present_holds(facts.method, q, |m| self.methods.iter().any(|x| x == m)))
            && (self.hosts.is_empty()
                || present_holds(facts.host, q, |h| host_matches(&self.hosts, h)))
            && (self.ports.is_empty() || facts.port.is_some_and(|p| self.ports.contains(&p)))
            && self
                .headers
                .iter()
                .all(|(name, values)| header_holds(facts, name, q, |v| values.matches(v)))
            && (self.actions.is_empty()
                || header_holds(facts, facts.action_header, q, |a| self.actions.matches(a)))
            && (self.allowed_actions.is_empty()
                || facts.caller.is_some_and(|caller| {
                    let allowed = self.allowed_actions.get(caller.id.as_str());
                    header_holds(facts, facts.action_header, q, |a| {
                        allowed.is_some_and(|set| set.contains(a))
                    })
                }))
            && (self.local_principals.is_empty()
                || facts
                    .local
                    .and_then(|l| l.principal.as_deref())
                    .is_some_and(|p| self.local_principals.matches(p)))
    }
}
