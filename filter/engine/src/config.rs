//! The filter's JSON configuration (what `WasmPlugin.pluginConfig` or an
//! EnvoyFilter's wasm `configuration` carries), and its compilation.
//!
//! Unknown fields are errors. Every error names the field path, e.g.
//! `policies[2].rules[0].from.principals[1]: …`, so an operator can fix it.

pub use super::config_error::{ConfigError, ConfigErrors};
pub use super::rego_source::RawRego;
use std::collections::BTreeMap;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use serde::Deserialize;

use super::annotate::{Annotator, HeaderNames, LocalPlace, Place, RegionTemplate};
use super::pattern::PatternSet;
use super::policy::{Action, CompiledPolicy, CompiledRule, Condition, ConditionKey, From, To};
use super::spiffe_id::{validate_trust_domain, SpiffeId};

/// Where the filter runs, which decides what it can see.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Destination sidecar inbound: caller from the peer certificate.
    #[default]
    Sidecar,
    /// East-west gateway that terminates mTLS: caller from the peer certificate.
    Gateway,
    /// `AUTO_PASSTHROUGH` east-west gateway: no TLS termination, SNI only.
    Passthrough,
}

/// HTTP filter or network (L4) filter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// An HTTP filter.
    #[default]
    Http,
    /// A network filter.
    Network,
}

/// How a peer certificate with several URI SANs is detected (Envoy's wasm
/// property yields only the first one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UriSanCheck {
    /// Count the URI SANs of the peer's certificate itself: the `Cert=` that
    /// Envoy writes into `x-forwarded-client-cert` (HCM
    /// `set_current_client_cert_details.cert: true`), located by the
    /// connection's certificate digest; no identity when it cannot be found.
    #[default]
    Xfcc,
    /// Trust the first URI SAN (documented risk: a second URI SAN goes unseen).
    FirstOnly,
}

/// The raw configuration document.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Sidecar, gateway or passthrough.
    #[serde(default)]
    pub placement: Placement,
    /// HTTP or network filter.
    #[serde(default)]
    pub layer: Layer,
    /// Decision when no enforced ALLOW or DENY policy exists.
    #[serde(default)]
    pub default_action: Option<DefaultAction>,
    /// The policies.
    #[serde(default)]
    pub policies: Vec<RawPolicy>,
    /// SPIFFE IDs of gateways whose forwarded caller (XFCC `URI=`) is believed.
    #[serde(default)]
    pub trusted_gateways: Vec<String>,
    /// Multi-URI-SAN detection.
    #[serde(default)]
    pub uri_san_check: UriSanCheck,
    /// Header carrying the action / capability name of a request.
    #[serde(default = "default_action_header")]
    pub action_header: String,
    /// If set, the deciding policy's name is returned in this response header on deny.
    #[serde(default)]
    pub deny_policy_header: Option<String>,
    /// Names of the annotation headers.
    #[serde(default)]
    pub headers: HeaderNames,
    /// Append W3C baggage members for this hop's cloud and region.
    #[serde(default = "yes")]
    pub baggage: bool,
    /// This hop's place, overriding what Envoy's node says.
    #[serde(default)]
    pub local: RawLocal,
    /// Trust domain → cloud and region of its workloads.
    #[serde(default)]
    pub trust_domains: BTreeMap<String, Place>,
    /// SPIFFE path template with `{region}` and/or `{cloud}` segments, e.g. `/region/{region}`.
    #[serde(default)]
    pub region_from_path: Option<String>,
    /// Passthrough placement: SNI patterns allowed (Istio's `outbound_.<port>_.<subset>_.<host>`).
    #[serde(default)]
    pub sni_allowlist: Vec<String>,
    /// Rego mode: OPA modules, a data document and the query that decides
    /// (instead of `policies`).
    #[serde(default)]
    pub rego: Option<RawRego>,
}

/// The policy name Rego decisions are counted and reported under.
pub const REGO_POLICY_NAME: &str = "rego";

fn default_action_header() -> String {
    "x-trustweave-action".into()
}

fn yes() -> bool {
    true
}

/// What applies when no policy decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DefaultAction {
    /// Allow.
    Allow,
    /// Deny.
    Deny,
}

/// This hop's place, as configured.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocal {
    /// Cloud provider, e.g. `gcp`.
    pub cloud: Option<String>,
    /// Region, e.g. `us-central1`.
    pub region: Option<String>,
    /// Zone.
    pub zone: Option<String>,
    /// This workload's trust domain (else taken from its own certificate).
    pub trust_domain: Option<String>,
}

/// One policy.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// Unique name; used in logs, metrics and the optional deny header.
    pub name: String,
    /// ALLOW, DENY or AUDIT.
    pub action: Action,
    /// Evaluate, log and count, never enforce.
    #[serde(default)]
    pub dry_run: bool,
    /// Rules; the policy matches when any rule matches.
    pub rules: Vec<RawRule>,
}

/// One rule: `from`, `to` and `when` are ANDed.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Who is calling.
    #[serde(default)]
    pub from: RawFrom,
    /// What is called.
    #[serde(default)]
    pub to: RawTo,
    /// Further conditions.
    #[serde(default)]
    pub when: Vec<RawCondition>,
}

/// Caller conditions.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFrom {
    /// Caller SPIFFE ID patterns.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Caller SPIFFE ID patterns that must not match.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// Caller trust domains.
    #[serde(default)]
    pub trust_domains: Vec<String>,
    /// Caller trust domains that must not match.
    #[serde(default)]
    pub not_trust_domains: Vec<String>,
    /// Caller in this workload's trust domain.
    #[serde(default)]
    pub same_trust_domain: bool,
    /// Caller in this hop's region.
    #[serde(default)]
    pub same_region: bool,
}

/// Request conditions.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTo {
    /// Path patterns (query excluded).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Path patterns that must not match.
    #[serde(default)]
    pub not_paths: Vec<String>,
    /// Methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Host / authority patterns.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Destination ports.
    #[serde(default)]
    pub ports: Vec<u32>,
    /// Header name → value patterns.
    #[serde(default)]
    pub headers: BTreeMap<String, Vec<String>>,
    /// Patterns on the action header's value.
    #[serde(default)]
    pub actions: Vec<String>,
    /// Caller SPIFFE ID → the actions it may take (the action header's value).
    #[serde(default)]
    pub allowed_actions: BTreeMap<String, Vec<String>>,
    /// Patterns on this workload's own SPIFFE ID.
    #[serde(default)]
    pub local_principals: Vec<String>,
}

/// A condition on a named attribute.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCondition {
    /// `request.headers[<name>]`, `source.cloud`, `source.region` or `connection.sni`.
    pub key: String,
    /// Patterns; one must match (if given).
    #[serde(default)]
    pub values: Vec<String>,
    /// Patterns; none may match.
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// Collects errors while compiling, so that `validate` can list them all.
#[derive(Default)]
struct Errors(Vec<ConfigError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(ConfigError {
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn patterns(&mut self, field: &str, values: &[String]) -> PatternSet {
        PatternSet::compile(values).unwrap_or_else(|(i, e)| {
            self.add(format!("{field}[{i}]"), e.to_string());
            PatternSet::default()
        })
    }

    fn header_name(&mut self, field: &str, name: &str) -> String {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            self.add(
                field,
                format!("{name:?} is not a lower-case HTTP header name"),
            );
        }
        name.to_string()
    }

    fn spiffe_id(&mut self, field: &str, id: &str) {
        if let Err(e) = SpiffeId::parse(id) {
            self.add(field, format!("{id:?}: {e}"));
        }
    }

    fn trust_domain(&mut self, field: &str, td: &str) {
        if let Err(e) = validate_trust_domain(td) {
            self.add(field, format!("{td:?}: {e}"));
        }
    }
}

/// The compiled configuration the filter runs.
#[derive(Debug)]
pub struct Config {
    /// Where the filter runs.
    pub placement: Placement,
    /// HTTP or network.
    pub layer: Layer,
    /// Decision when no enforced ALLOW/DENY policy exists.
    pub default_allow: bool,
    /// Policies in configuration order.
    pub policies: Vec<CompiledPolicy>,
    /// Gateways whose forwarded caller is believed.
    pub trusted_gateways: HashSet<String>,
    /// Multi-URI-SAN detection.
    pub uri_san_check: UriSanCheck,
    /// Header carrying the action name.
    pub action_header: String,
    /// Response header naming the deciding policy on deny, if any.
    pub deny_policy_header: Option<String>,
    /// Annotation.
    pub annotator: Annotator,
    /// Passthrough SNI allowlist.
    pub sni_allowlist: PatternSet,
    /// Which per-request facts the policies read (the shim asks Envoy for nothing else).
    pub reads: Reads,
    /// Rego mode's compiled policy (instead of `policies`).
    #[cfg(feature = "rego")]
    pub rego: Option<super::rego::RegoPolicy>,
}

impl Config {
    /// Names of the policies decisions are counted under.
    pub fn policy_names(&self) -> Vec<&str> {
        let names = self.policies.iter().map(|p| p.name.as_str());
        #[cfg(feature = "rego")]
        let names = names.chain(self.rego.as_ref().map(|_| REGO_POLICY_NAME));
        names.collect()
    }
}

/// Per-request facts that cost a host call, and whether any policy reads them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    /// The destination port (`to.ports`).
    pub port: bool,
    /// The TLS SNI (`connection.sni` conditions, passthrough).
    pub sni: bool,
    /// This workload's own certificate (`local_principals`, or `same_trust_domain`
    /// without `local.trust_domain`).
    pub local_certificate: bool,
}

impl Reads {
    fn of(raw: &RawConfig) -> Self {
        let rules = || raw.policies.iter().flat_map(|p| &p.rules);
        Self {
            port: rules().any(|r| !r.to.ports.is_empty()),
            sni: raw.placement == Placement::Passthrough
                || rules().any(|r| r.when.iter().any(|c| c.key == "connection.sni")),
            // Rego's input carries this workload's own SPIFFE ID.
            local_certificate: raw.rego.is_some()
                || rules().any(|r| {
                    !r.to.local_principals.is_empty()
                        || (r.from.same_trust_domain && raw.local.trust_domain.is_none())
                }),
        }
    }
}

/// Parses and compiles a JSON document; errors name their fields.
pub fn parse(json: &[u8]) -> Result<Config, ConfigErrors> {
    let document_error = |e: serde_json::Error| {
        // serde_json names the unknown field or wrong type, with line and column.
        ConfigErrors(vec![ConfigError {
            field: "(document)".into(),
            reason: e.to_string(),
        }])
    };
    // A duplicate key is an error (serde_json would keep its last value: `"action"` twice could allow).
    if let Err(e) = serde_json::from_slice::<UniqueKeys>(json) {
        return Err(ConfigErrors(vec![ConfigError {
            field: "(document)".into(),
            reason: e.to_string(),
        }]));
    }
    let value: serde_json::Value = serde_json::from_slice(json).map_err(document_error)?;
    let mut errors = Errors::default();
    require_objects(&mut errors, &value);
    if !errors.0.is_empty() {
        return Err(ConfigErrors(errors.0));
    }
    let raw: RawConfig = serde_json::from_value(value).map_err(document_error)?;
    compile(&raw)
}

/// Any JSON document in which no object repeats a key (read to check, then dropped).
struct UniqueKeys;

/// Checks one value at `path` (`policies[0].action`) for repeated keys.
struct UniqueKeysAt(String);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::DeserializeSeed::deserialize(UniqueKeysAt(String::new()), deserializer)
            .map(|()| UniqueKeys)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for UniqueKeysAt {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeysAt {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i: usize = 0;
        while seq
            .next_element_seed(UniqueKeysAt(format!("{}[{i}]", self.0)))?
            .is_some()
        {
            i = i.saturating_add(1);
        }
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.0.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.0)
            };
            if !seen.insert(key) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key `{path}`: each key may appear once"
                )));
            }
            map.next_value_seed(UniqueKeysAt(path))?;
        }
        Ok(())
    }
}

/// serde would also read a struct from a JSON array of its fields in order
/// (`["sidecar","http","ALLOW"]`): only the documented object form is a configuration.
fn require_objects(e: &mut Errors, root: &serde_json::Value) {
    use serde_json::Value;
    fn object(e: &mut Errors, field: &str, value: Option<&Value>) {
        if let Some(v) = value.filter(|v| !v.is_object() && !v.is_null()) {
            let kind = if v.is_array() {
                "an array"
            } else {
                "not an object"
            };
            e.add(
                field,
                format!("is {kind}; expected an object with named fields"),
            );
        }
    }
    fn each(value: Option<&Value>) -> impl Iterator<Item = (usize, &Value)> {
        value
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
    }
    if !root.is_object() {
        object(e, "(document)", Some(root));
        return;
    }
    object(e, "local", root.get("local"));
    object(e, "rego", root.get("rego"));
    object(e, "headers", root.get("headers"));
    object(e, "trust_domains", root.get("trust_domains"));
    if let Some(map) = root.get("trust_domains").and_then(Value::as_object) {
        for (td, place) in map {
            object(e, &format!("trust_domains.{td}"), Some(place));
        }
    }
    for (p, policy) in each(root.get("policies")) {
        object(e, &format!("policies[{p}]"), Some(policy));
        for (r, rule) in each(policy.get("rules")) {
            let at = format!("policies[{p}].rules[{r}]");
            object(e, &at, Some(rule));
            object(e, &format!("{at}.from"), rule.get("from"));
            object(e, &format!("{at}.to"), rule.get("to"));
            for (w, when) in each(rule.get("when")) {
                object(e, &format!("{at}.when[{w}]"), Some(when));
            }
        }
    }
}

/// Compiles a parsed document, collecting every error.
pub fn compile(raw: &RawConfig) -> Result<Config, ConfigErrors> {
    let mut errors = Errors::default();
    let e = &mut errors;
    let mut names = HashSet::default();
    let mut policies = Vec::with_capacity(raw.policies.len());
    for (p, policy) in raw.policies.iter().enumerate() {
        let at = format!("policies[{p}]");
        let name_ok = !policy.name.is_empty()
            && policy
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            e.add(
                format!("{at}.name"),
                "must be non-empty [A-Za-z0-9_-] (it names metrics)",
            );
        } else if !names.insert(policy.name.clone()) {
            e.add(
                format!("{at}.name"),
                format!("duplicate policy name {:?}", policy.name),
            );
        }
        if policy.rules.is_empty() {
            e.add(format!("{at}.rules"), "at least one rule is required");
        }
        let rules = policy
            .rules
            .iter()
            .enumerate()
            .map(|(r, rule)| compile_rule(e, &format!("{at}.rules[{r}]"), rule, raw.layer))
            .collect();
        policies.push(CompiledPolicy {
            name: policy.name.clone(),
            action: policy.action,
            dry_run: policy.dry_run,
            rules,
        });
    }
    for (i, id) in raw.trusted_gateways.iter().enumerate() {
        e.spiffe_id(&format!("trusted_gateways[{i}]"), id);
    }
    match (raw.placement, raw.layer) {
        (Placement::Passthrough, Layer::Http) => e.add(
            "layer",
            "placement passthrough sees no HTTP: use layer network",
        ),
        (Placement::Passthrough, Layer::Network) => {
            if raw.sni_allowlist.is_empty() {
                e.add(
                    "sni_allowlist",
                    "placement passthrough needs at least one SNI pattern",
                );
            }
            if !raw.policies.is_empty() {
                e.add(
                    "policies",
                    "placement passthrough sees no caller identity; use sni_allowlist",
                );
            }
        }
        (_, Layer::Network) if raw.uri_san_check == UriSanCheck::Xfcc => e.add(
            "uri_san_check",
            "a network filter cannot see x-forwarded-client-cert; set first_only explicitly",
        ),
        _ => {}
    }
    if raw.placement != Placement::Passthrough && !raw.sni_allowlist.is_empty() {
        e.add("sni_allowlist", "only used with placement passthrough");
    }
    for td in raw.trust_domains.keys() {
        e.trust_domain(&format!("trust_domains.{td}"), td);
    }
    if let Some(td) = &raw.local.trust_domain {
        e.trust_domain("local.trust_domain", td);
    }
    let template = raw.region_from_path.as_ref().and_then(|t| {
        RegionTemplate::parse(t)
            .map_err(|reason| e.add("region_from_path", reason))
            .ok()
    });
    for (field, name) in raw.headers.all() {
        e.header_name(&format!("headers.{field}"), name);
    }
    let deny_policy_header = raw
        .deny_policy_header
        .as_ref()
        .map(|h| e.header_name("deny_policy_header", h));
    let action_header = e.header_name("action_header", &raw.action_header);
    let sni_allowlist = e.patterns("sni_allowlist", &raw.sni_allowlist);
    if raw.rego.is_some() {
        if !raw.policies.is_empty() {
            e.add(
                "policies",
                "a Rego configuration decides with rego.query; policies must be empty",
            );
        }
        if raw.layer != Layer::Http {
            e.add("rego", "Rego mode is an HTTP filter (layer http)");
        }
    }
    #[cfg(feature = "rego")]
    let rego = match &raw.rego {
        Some(rego) => match super::rego::RegoPolicy::compile(rego) {
            Ok(policy) => Some(policy),
            Err(found) => {
                errors.0.extend(found);
                None
            }
        },
        None => None,
    };
    #[cfg(not(feature = "rego"))]
    if raw.rego.is_some() {
        errors.add(
            "rego",
            "this build has no Rego support: load trustweave_filter_rego.wasm",
        );
    }
    if !errors.0.is_empty() {
        return Err(ConfigErrors(errors.0));
    }
    Ok(Config {
        placement: raw.placement,
        layer: raw.layer,
        default_allow: raw.default_action == Some(DefaultAction::Allow),
        policies,
        trusted_gateways: raw.trusted_gateways.iter().cloned().collect(),
        uri_san_check: raw.uri_san_check,
        action_header,
        deny_policy_header,
        annotator: Annotator {
            headers: raw.headers.clone(),
            baggage: raw.baggage,
            local: LocalPlace {
                cloud: raw.local.cloud.clone(),
                region: raw.local.region.clone(),
                zone: raw.local.zone.clone(),
                trust_domain: raw.local.trust_domain.clone(),
            },
            trust_domains: raw.trust_domains.clone(),
            template,
        },
        sni_allowlist,
        reads: Reads::of(raw),
        #[cfg(feature = "rego")]
        rego,
    })
}

fn compile_rule(e: &mut Errors, at: &str, rule: &RawRule, layer: Layer) -> CompiledRule {
    let f = &rule.from;
    for (field, list) in [
        ("trust_domains", &f.trust_domains),
        ("not_trust_domains", &f.not_trust_domains),
    ] {
        for (i, td) in list.iter().enumerate().filter(|(_, td)| !td.contains('*')) {
            e.trust_domain(&format!("{at}.from.{field}[{i}]"), td);
        }
    }
    for (field, list) in [
        ("principals", &f.principals),
        ("not_principals", &f.not_principals),
    ] {
        for (i, id) in list.iter().enumerate().filter(|(_, id)| !id.contains('*')) {
            e.spiffe_id(&format!("{at}.from.{field}[{i}]"), id);
        }
    }
    let from = From {
        principals: e.patterns(&format!("{at}.from.principals"), &f.principals),
        not_principals: e.patterns(&format!("{at}.from.not_principals"), &f.not_principals),
        trust_domains: e.patterns(&format!("{at}.from.trust_domains"), &f.trust_domains),
        not_trust_domains: e.patterns(
            &format!("{at}.from.not_trust_domains"),
            &f.not_trust_domains,
        ),
        same_trust_domain: f.same_trust_domain,
        same_region: f.same_region,
    };
    let t = &rule.to;
    if layer == Layer::Network {
        let http_only = [
            ("paths", t.paths.is_empty()),
            ("not_paths", t.not_paths.is_empty()),
            ("methods", t.methods.is_empty()),
            ("hosts", t.hosts.is_empty()),
            ("headers", t.headers.is_empty()),
            ("actions", t.actions.is_empty()),
            ("allowed_actions", t.allowed_actions.is_empty()),
        ];
        for (field, empty) in http_only {
            if !empty {
                e.add(
                    format!("{at}.to.{field}"),
                    "not visible to a network filter (layer network)",
                );
            }
        }
    }
    for (i, m) in t.methods.iter().enumerate() {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            e.add(
                format!("{at}.to.methods[{i}]"),
                format!("{m:?} is not an upper-case HTTP method"),
            );
        }
    }
    for (i, port) in t.ports.iter().enumerate() {
        if *port == 0 || *port > 65535 {
            e.add(
                format!("{at}.to.ports[{i}]"),
                format!("{port} is not a TCP port"),
            );
        }
    }
    let mut headers = Vec::new();
    for (name, values) in &t.headers {
        let field = format!("{at}.to.headers.{name}");
        e.header_name(&field, name);
        if values.is_empty() {
            e.add(&field, "at least one value pattern is required");
        }
        headers.push((name.clone(), e.patterns(&field, values)));
    }
    let mut allowed_actions = HashMap::default();
    for (caller, actions) in &t.allowed_actions {
        e.spiffe_id(&format!("{at}.to.allowed_actions.{caller}"), caller);
        allowed_actions.insert(caller.clone(), actions.iter().cloned().collect());
    }
    let to = To {
        paths: e.patterns(&format!("{at}.to.paths"), &t.paths),
        not_paths: e.patterns(&format!("{at}.to.not_paths"), &t.not_paths),
        methods: t.methods.clone(),
        // Hosts compare case-insensitively, as in Istio (CVE-2021-39155).
        hosts: e.patterns(
            &format!("{at}.to.hosts"),
            &t.hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect::<Vec<_>>(),
        ),
        ports: t.ports.clone(),
        headers,
        actions: e.patterns(&format!("{at}.to.actions"), &t.actions),
        allowed_actions,
        local_principals: e.patterns(&format!("{at}.to.local_principals"), &t.local_principals),
    };
    let mut when = Vec::with_capacity(rule.when.len());
    for (i, c) in rule.when.iter().enumerate() {
        let field = format!("{at}.when[{i}]");
        let key = Condition::parse_key(&c.key).unwrap_or_else(|reason| {
            e.add(format!("{field}.key"), reason);
            ConditionKey::SourceRegion
        });
        if layer == Layer::Network && matches!(key, ConditionKey::Header(_)) {
            e.add(
                format!("{field}.key"),
                "request headers are not visible to a network filter",
            );
        }
        if c.values.is_empty() && c.not_values.is_empty() {
            e.add(&field, "values or not_values is required");
        }
        when.push(Condition {
            key,
            values: e.patterns(&format!("{field}.values"), &c.values),
            not_values: e.patterns(&format!("{field}.not_values"), &c.not_values),
        });
    }
    CompiledRule { from, to, when }
}
