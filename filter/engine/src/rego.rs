//! Rego mode: the users' own OPA policies, decided inside the filter.
//!
//! The modules are parsed and compiled once per configuration by `regorus` and
//! lowered to its register VM (`rvm`); per request only the input is set and
//! the query's entry point executed. The result decides: `true` allows; an
//! object in OPA-Envoy's shape (`allowed`, `headers`, `http_status`, `body`)
//! allows or denies with those details; anything else — `false`, undefined, a
//! non-boolean, an evaluation error, a conflict — denies and is counted.
//!
//! The input document is OPA-Envoy's (`input.attributes.…`, `parsed_path`,
//! `parsed_query`) plus the shapes of our users' guides (`input.caller`,
//! `input.agent`, `input.action`, …); see docs/filter.md. Identity facts come only
//! from the verified peer, exactly as the JSON policies get them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::RegoVM;
use regorus::{Engine, Value};

use super::certificate::hex_value;
use super::config_error::ConfigError;
use super::headers::Headers;
use super::policy::{Caller, Local};
use super::rego_source::RawRego;

/// A compiled Rego policy and the VM that evaluates it (one per worker).
pub struct RegoPolicy {
    query: String,
    /// The input members the modules read; only those are built per request.
    fields: InputFields,
    /// Evaluated and counted, never enforced.
    pub dry_run: bool,
    vm: RefCell<RegoVM>,
}

impl std::fmt::Debug for RegoPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegoPolicy")
            .field("query", &self.query)
            .finish_non_exhaustive()
    }
}

/// What one evaluation decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegoDecision {
    /// Allowed; headers to add to the request.
    Allow {
        /// From an object result's `headers`.
        headers: Vec<(String, String)>,
    },
    /// Denied by the policy.
    Deny {
        /// From an object result's `http_status` (default 403).
        status: u32,
        /// From its `body`.
        body: Option<String>,
        /// From its `headers`, added to the response.
        headers: Vec<(String, String)>,
    },
    /// The policy could not decide (error, undefined, wrong type): denied, counted.
    Error(String),
}

fn error(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

impl RegoPolicy {
    /// Parses and compiles `raw`; errors name the module and line.
    pub fn compile(raw: &RawRego) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        if raw.modules.is_empty() {
            errors.push(error("rego.modules", "at least one module is required"));
        }
        if !raw.query.starts_with("data.") {
            errors.push(error(
                "rego.query",
                format!("{:?} must name a rule, e.g. data.authz.allow", raw.query),
            ));
        }
        let mut engine = Engine::new();
        for (name, text) in &raw.modules {
            if let Err(e) = engine.add_policy(name.clone(), text.clone()) {
                errors.push(error(&format!("rego.modules.{name}"), e.to_string()));
            }
        }
        if !raw.data.is_null() && !raw.data.is_object() {
            errors.push(error("rego.data", "must be an object"));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let data = Value::from(raw.data.clone());
        let entry: Arc<str> = Arc::from(raw.query.as_str());
        let compiled = engine
            .compile_with_entrypoint(&entry)
            .map_err(|e| vec![error("rego.query", e.to_string())])?;
        let program = Compiler::compile_from_policy(&compiled, &[raw.query.as_str()])
            .map_err(|e| vec![error("rego.query", e.to_string())])?;
        // Builtins a request could make panic or run unbounded are guarded.
        let mut program = (*program).clone();
        super::rego_guards::guard(&mut program);
        let mut vm = RegoVM::new_with_policy(compiled);
        vm.load_program(Arc::new(program));
        if !raw.data.is_null() {
            vm.set_data(data)
                .map_err(|e| vec![error("rego.data", e.to_string())])?;
        }
        Ok(Self {
            fields: InputFields::read_by(raw.modules.values().map(String::as_str)),
            query: raw.query.clone(),
            dry_run: raw.dry_run,
            vm: RefCell::new(vm),
        })
    }

    /// The input members its modules read.
    pub fn fields(&self) -> &InputFields {
        &self.fields
    }

    /// Evaluates one input document.
    pub fn decide(&self, input: Value) -> RegoDecision {
        let Ok(mut vm) = self.vm.try_borrow_mut() else {
            return RegoDecision::Error("the Rego VM is busy".into());
        };
        vm.set_input(input);
        match vm.execute_entry_point_by_name(&self.query) {
            Err(e) => RegoDecision::Error(format!("evaluation failed: {e}")),
            Ok(result) => interpret(&result),
        }
    }
}

/// Which top-level members of the input document a policy reads: found in
/// its modules' text as `input.<member>` or `input["<member>"]`; any other use
/// of `input` (bare, `input[x]`, `with input as`) reads them all. Text in
/// comments and strings counts too: it can only add members.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InputFields {
    all: bool,
    members: std::collections::BTreeSet<String>,
}

impl InputFields {
    /// Every member (the CLI's `--print-input` and tests that compare documents).
    pub fn all() -> Self {
        Self {
            all: true,
            members: Default::default(),
        }
    }

    /// The members `modules` read.
    pub fn read_by<'a>(modules: impl Iterator<Item = &'a str>) -> Self {
        let mut fields = Self::default();
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        for text in modules {
            for (at, _) in text.match_indices("input") {
                let before = text.get(..at).and_then(|t| t.chars().next_back());
                let rest = text.get(at.saturating_add(5)..).unwrap_or_default();
                if before.is_some_and(word) || rest.chars().next().is_some_and(word) {
                    continue; // part of another name (`inputs`, `my_input`)
                }
                let member = if let Some(dotted) = rest.strip_prefix('.') {
                    Some(dotted.chars().take_while(|c| word(*c)).collect::<String>())
                } else if let Some(quoted) = rest.strip_prefix("[\"") {
                    quoted.split('"').next().map(str::to_string)
                } else {
                    None
                };
                match member.filter(|m| !m.is_empty()) {
                    Some(member) => {
                        fields.members.insert(member);
                    }
                    None => fields.all = true,
                }
            }
        }
        fields
    }

    /// Whether `member` is read.
    pub fn wants(&self, member: &str) -> bool {
        self.all || self.members.contains(member)
    }
}

fn string_pairs(value: &Value) -> Vec<(String, String)> {
    value
        .as_object()
        .map(|object| {
            object
                .iter()
                .filter_map(|(k, v)| {
                    let name = k.as_string().ok()?.to_ascii_lowercase();
                    let value = v.as_string().ok()?.to_string();
                    let valid = !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                        && value.bytes().all(|b| b != b'\r' && b != b'\n' && b != 0);
                    valid.then_some((name, value))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// OPA-Envoy's result rules: a boolean, or `{allowed, headers, http_status, body}`.
fn interpret(result: &Value) -> RegoDecision {
    match result {
        Value::Bool(true) => RegoDecision::Allow { headers: vec![] },
        Value::Bool(false) => RegoDecision::Deny {
            status: 403,
            body: None,
            headers: vec![],
        },
        Value::Undefined => RegoDecision::Error("the query is undefined".into()),
        Value::Object(object) => {
            let field = |name: &str| object.get(&Value::from(name));
            let headers = field("headers").map(string_pairs).unwrap_or_default();
            match field("allowed") {
                Some(Value::Bool(true)) => RegoDecision::Allow { headers },
                Some(Value::Bool(false)) => {
                    let status = field("http_status")
                        .and_then(|s| s.as_u64().ok())
                        .and_then(|s| u32::try_from(s).ok())
                        .filter(|s| (200..600).contains(s))
                        .unwrap_or(403);
                    let body =
                        field("body").and_then(|b| b.as_string().ok().map(|s| s.to_string()));
                    RegoDecision::Deny {
                        status,
                        body,
                        headers,
                    }
                }
                _ => RegoDecision::Error("the result object has no boolean `allowed`".into()),
            }
        }
        // Only the kind: a result's text can be huge (or, for an infinite number, not printable).
        other => RegoDecision::Error(format!("the result is {}, not a boolean", kind(other))),
    }
}

/// The kind of a value, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Set(_) => "a set",
        Value::Object(_) => "an object",
        Value::Undefined => "undefined",
    }
}

fn s(text: &str) -> Value {
    Value::from(text)
}

/// An object of `pairs`; undefined members are left out, as OPA leaves out absent JSON fields.
fn object(pairs: Vec<(&str, Value)>) -> Value {
    Value::from(
        pairs
            .into_iter()
            .filter(|(_, v)| *v != Value::Undefined)
            .map(|(k, v)| (s(k), v))
            .collect::<BTreeMap<Value, Value>>(),
    )
}

fn opt(text: Option<&str>) -> Value {
    text.map_or(Value::Undefined, s)
}

/// Decodes a path segment (`%XX`; `+` stays), as Go's `url.PathUnescape`.
fn decode_path(text: &str) -> Option<String> {
    decode(text, false)
}

/// Decodes a query component (`%XX`, `+` is a space), as Go's `url.ParseQuery`.
fn decode_query(text: &str) -> Option<String> {
    decode(text, true)
}

/// Decodes `%XX`; `plus_is_space` for queries. `None` for an invalid escape
/// (`%` without two hex digits), which Go's `url` package refuses.
fn decode(text: &str, plus_is_space: bool) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&b, tail)) = rest.split_first() {
        let escaped = match (b, tail) {
            (b'%', [high, low, ..]) => hex_value(*high)
                .zip(hex_value(*low))
                .map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match escaped {
            Some(decoded) => {
                out.push(decoded);
                rest = tail.get(2..).unwrap_or_default();
            }
            None if b == b'%' => return None,
            None => {
                out.push(if plus_is_space && b == b'+' { b' ' } else { b });
                rest = tail;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Everything one request offers a Rego policy.
pub struct RegoFacts<'a> {
    /// The request's headers (after anti-spoofing).
    pub headers: &'a Headers,
    /// Name of the action header.
    pub action_header: &'a str,
    /// The caller, if an identity was established.
    pub caller: Option<&'a Caller>,
    /// This hop.
    pub local: &'a Local,
}

/// Builds the input document (documented in docs/filter.md), as OPA-Envoy
/// builds it from the same request — only the members in `fields` (a policy
/// that reads `input.caller` is not made to pay for the headers). What it
/// cannot build from (a header value that is not UTF-8, a path with an
/// invalid `%`-escape, which OPA-Envoy refuses too) is the error whatever the
/// members read: the request is denied.
pub fn input(facts: &RegoFacts<'_>, fields: &InputFields) -> Result<Value, &'static str> {
    const NOT_UTF8: &str = "a header value is not UTF-8";
    if facts
        .headers
        .entries()
        .iter()
        .any(|(_, value)| std::str::from_utf8(value).is_err())
    {
        return Err(NOT_UTF8);
    }
    let first = |name: &str| facts.headers.joined_text(name);
    let path_and_query = first(":path").unwrap_or_default();
    // As OPA-Envoy (`getParsedPathAndQuery`): Go's `url.Parse` cuts the
    // fragment, then the query; the path is decoded whole, then split after
    // its leading slashes, empty segments kept (`/` is `[""]`).
    let without_fragment = path_and_query.split('#').next().unwrap_or("");
    let (path, query) = without_fragment
        .split_once('?')
        .unwrap_or((without_fragment, ""));
    let decoded_path = decode_path(path).ok_or("the path has an invalid %-escape")?;
    let action = first(facts.action_header);
    let caller_id = facts.caller.map(|c| c.id.as_str());
    let local_id = facts.local.principal.as_deref();
    let mut document: Vec<(&str, Value)> = Vec::new();
    if fields.wants("attributes") {
        let mut header_map = BTreeMap::new();
        for (name, _) in facts.headers.entries() {
            if header_map.contains_key(&s(name)) {
                continue;
            }
            let joined = facts.headers.joined_text(name).ok_or(NOT_UTF8)?;
            header_map.insert(s(name), Value::from(joined));
        }
        let host = first(":authority").or_else(|| first("host"));
        let http = object(vec![
            ("method", opt(first(":method").as_deref())),
            ("path", s(&path_and_query)),
            ("host", opt(host.as_deref())),
            ("headers", Value::from(header_map)),
        ]);
        document.push((
            "attributes",
            object(vec![
                ("request", object(vec![("http", http)])),
                ("source", object(vec![("principal", opt(caller_id))])),
                ("destination", object(vec![("principal", opt(local_id))])),
            ]),
        ));
    }
    if fields.wants("parsed_path") {
        let parsed_path: Vec<Value> = decoded_path
            .trim_start_matches('/')
            .split('/')
            .map(Value::from)
            .collect();
        document.push(("parsed_path", Value::from(parsed_path)));
    }
    if fields.wants("parsed_query") {
        // Go's `url.Query`: a pair holding `;` or an invalid escape is dropped.
        let mut parsed_query: BTreeMap<Value, Vec<Value>> = BTreeMap::new();
        for pair in query.split('&') {
            if pair.is_empty() || pair.contains(';') {
                continue;
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if let (Some(k), Some(v)) = (decode_query(k), decode_query(v)) {
                parsed_query
                    .entry(Value::from(k))
                    .or_default()
                    .push(Value::from(v));
            }
        }
        document.push((
            "parsed_query",
            Value::from(
                parsed_query
                    .into_iter()
                    .map(|(k, v)| (k, Value::from(v)))
                    .collect::<BTreeMap<Value, Value>>(),
            ),
        ));
    }
    let place = |id: Option<&str>, td: Option<&str>, cloud: Option<&str>, region: Option<&str>| {
        object(vec![
            ("spiffe_id", opt(id)),
            ("trust_domain", opt(td)),
            ("cloud", opt(cloud)),
            ("region", opt(region)),
        ])
    };
    if fields.wants("caller") {
        let caller = facts.caller.map_or_else(Value::new_object, |c| {
            place(
                Some(c.id.as_str()),
                Some(c.id.trust_domain()),
                c.cloud.as_deref(),
                c.region.as_deref(),
            )
        });
        document.push(("caller", caller));
    }
    if fields.wants("agent") {
        let agent = place(
            local_id,
            facts.local.trust_domain.as_deref(),
            facts.local.cloud.as_deref(),
            facts.local.region.as_deref(),
        );
        document.push(("agent", agent));
    }
    if fields.wants("request") {
        document.push(("request", object(vec![("method", opt(action.as_deref()))])));
    }
    document.push(("action", opt(action.as_deref())));
    document.push(("callee_spiffe_id", opt(local_id)));
    if let Some(id) = caller_id {
        document.push(("caller_spiffe_id", s(id)));
        // OPA-Envoy's shortcut for `attributes.source.principal`.
        document.push(("source_principal", s(id)));
    }
    Ok(object(document))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_members_a_policy_reads_are_built() {
        let fields = InputFields::read_by(
            [
                "allow if input.caller.trust_domain == input.agent.trust_domain\n",
                "x := input[\"parsed_path\"][0]\nmy_input := 1\ninputs := 2\n",
            ]
            .into_iter(),
        );
        assert!(fields.wants("caller") && fields.wants("agent") && fields.wants("parsed_path"));
        assert!(!fields.wants("attributes") && !fields.wants("parsed_query"));
        for whole in [
            "x := input\n",
            "y := input[k]\n",
            "allow with input as {}\n",
            "import input\n",
        ] {
            assert!(
                InputFields::read_by([whole].into_iter()).wants("attributes"),
                "{whole}"
            );
        }
    }

    #[test]
    fn results_are_read_as_opa_envoy_reads_them() {
        assert_eq!(
            interpret(&Value::Bool(true)),
            RegoDecision::Allow { headers: vec![] }
        );
        assert!(matches!(
            interpret(&Value::Bool(false)),
            RegoDecision::Deny { status: 403, .. }
        ));
        assert!(matches!(
            interpret(&Value::Undefined),
            RegoDecision::Error(_)
        ));
        assert!(matches!(
            interpret(&Value::from("yes")),
            RegoDecision::Error(_)
        ));
        let denied = Value::from_json_str(
            r#"{"allowed":false,"http_status":429,"body":"slow down","headers":{"X-Why":"quota","bad\nname":"x"}}"#,
        )
        .expect("json");
        assert_eq!(
            interpret(&denied),
            RegoDecision::Deny {
                status: 429,
                body: Some("slow down".into()),
                headers: vec![("x-why".into(), "quota".into())],
            }
        );
        let no_allowed = Value::from_json_str(r#"{"headers":{}}"#).expect("json");
        assert!(matches!(interpret(&no_allowed), RegoDecision::Error(_)));
    }

    #[test]
    fn paths_and_queries_are_parsed_as_opa_envoy_does() {
        assert_eq!(decode_query("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(decode_path("a%20b+c").as_deref(), Some("a b+c"));
        assert_eq!(decode_path("%zz"), None, "Go's url.Parse refuses it");
        assert_eq!(decode_path("50%"), None);
    }
}
