//! trustweave-filter's decision engine: pure Rust, no host calls (the crate
//! does not depend on proxy-wasm). The proxy-wasm shim (`trustweave-filter`)
//! and the `trustweave-policy` CLI both call [`evaluate_http`] /
//! [`evaluate_network`].

#![forbid(unsafe_code)]
// The engine runs inside the wasm VM, where a panic traps the VM for that
// worker: the compiler rules out what could panic on request data (tests may
// still assert with unwrap and indexing).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

pub mod annotate;
pub mod certificate;
pub mod config;
pub mod config_error;
pub mod decide;
pub mod headers;
pub mod identity;
pub mod metrics;
pub mod pattern;
pub mod policy;
#[cfg(feature = "rego")]
pub mod rego;
#[cfg(feature = "rego")]
pub mod rego_guards;
pub mod rego_source;
pub mod spiffe_id;
pub mod svid;

use annotate::{BaggageChange, NodeFacts};
use config::{Config, Placement};
use decide::{decide, Decision, Reason};
use headers::{Headers, Reading};
use identity::PeerCertificates;
use policy::{Caller, Facts, Local};

pub use headers::XFCC;
/// Body of a denied request, as Envoy's RBAC filter writes it (existing tooling matches it).
pub const DENY_BODY: &str = "RBAC: access denied";
/// Longest path quoted in a log line.
const LOG_PATH_MAX: usize = 256;

/// What the shim reads for one HTTP request.
#[derive(Clone, Debug, Default)]
pub struct HttpInput {
    /// Request headers as bytes, lower-case names, including pseudo-headers.
    pub headers: Headers,
    /// Destination port (read only when a policy uses ports).
    pub port: Option<u32>,
    /// TLS SNI (read only when a policy uses it).
    pub sni: Option<String>,
    /// What Envoy's node and local certificate say about this hop.
    pub node: NodeFacts,
    /// Why something Envoy was asked for could not be read (the request is then denied).
    pub unreadable: Option<String>,
}

/// What the shim does for one HTTP request.
#[derive(Clone, Debug)]
pub struct HttpOutcome {
    /// The decision.
    pub decision: Decision,
    /// The caller, if established.
    pub caller: Option<Caller>,
    /// Why there is no identity, if there is none.
    pub no_identity: Option<String>,
    /// Why the peer's certificate could not be verified, if so (counted).
    pub unverifiable: Option<String>,
    /// Why a trusted gateway's forwarded caller was refused, if it was (counted).
    pub forwarded_refused: Option<String>,
    /// Headers present on the request to remove (anti-spoofing, the filter's
    /// own annotation headers, any header about to be set), before anything is
    /// set — on every outcome, so logs never name a caller the client claimed.
    pub remove: Vec<String>,
    /// Headers to set on the request (annotation).
    pub set: Vec<(String, String)>,
    /// Response headers to add when denying.
    pub deny_headers: Vec<(String, String)>,
    /// Status of a denial (403 unless a Rego result says otherwise).
    pub deny_status: u32,
    /// Body of a denial (`RBAC: access denied` unless a Rego result says otherwise).
    pub deny_body: String,
    /// Whether a Rego policy failed to decide (counted).
    pub rego_error: bool,
    /// The input document a Rego policy was given (shared, not copied).
    #[cfg(feature = "rego")]
    pub rego_input: Option<regorus::Value>,
    /// One log line describing a denial or an unenforced dry-run/audit hit.
    pub log: Option<String>,
}

/// `:path` without its query or fragment.
fn path_only(reading: Reading<'_>) -> Reading<'_> {
    reading.map(|p| p.split(['?', '#']).next().unwrap_or(""))
}

/// Evaluates one HTTP request; `certs` says who the peer (and a forwarded caller) is.
pub fn evaluate_http(
    config: &Config,
    input: HttpInput,
    certs: &mut dyn PeerCertificates,
) -> HttpOutcome {
    let HttpInput {
        mut headers,
        port,
        sni,
        node,
        unreadable,
    } = input;
    let resolved = identity::resolve(config, certs, &headers);
    // Refused before any policy: what cannot be read, a certificate that cannot
    // be verified, a host that is not one value.
    let ambiguous_host = is_ambiguous_host(&headers);
    let refusal = match (&unreadable, &resolved.unverifiable) {
        (Some(why), _) => Some(Reason::Unreadable(why.clone())),
        (None, Some(why)) => Some(Reason::UnverifiablePeer(why.clone())),
        (None, None) if ambiguous_host => Some(Reason::AmbiguousHost),
        (None, None) => None,
    };
    let trusted_peer = resolved.peer_is_trusted_gateway(config);
    let annotator = &config.annotator;
    let caller = resolved.caller.clone().map(|id| annotator.caller(id));
    let local = annotator.local(&node);

    // Anti-spoofing: what a downstream set is removed before evaluation, unless it is a trusted gateway.
    // The `_` spellings are removed from everyone: servers that fold `_` into `-`
    // would read them as ours (no Envoy writes them; the shipped HCM drops them first).
    let mut remove: Vec<String> = annotator
        .spoofable_headers()
        .into_iter()
        .chain([XFCC])
        .map(|name| name.replace('-', "_"))
        .filter(|name| headers.contains(name))
        .collect();
    if !trusted_peer {
        remove.extend(
            annotator
                .spoofable_headers()
                .into_iter()
                .filter(|name| headers.contains(name))
                .map(str::to_string),
        );
        if config.placement == Placement::Sidecar && headers.contains(XFCC) {
            remove.push(XFCC.to_string());
        }
    }
    headers.remove_all(&remove);
    let path = headers.single(":path").map(path_only);
    let facts = Facts {
        caller: caller.as_ref(),
        local: Some(&local),
        method: headers.single(":method"),
        path,
        host: headers
            .single(":authority")
            .or_else(|| headers.single("host")),
        port,
        headers: &headers,
        action_header: &config.action_header,
        sni: sni.as_deref(),
    };
    #[cfg(feature = "rego")]
    let (decision, verdict) = match (refusal, &config.rego) {
        (Some(reason), _) => (Decision::refused(reason), Verdict::default()),
        (None, Some(policy)) => decide_rego(
            policy,
            &rego::RegoFacts {
                headers: &headers,
                action_header: &config.action_header,
                caller: caller.as_ref(),
                local: &local,
            },
        ),
        (None, None) => (decide(config, &facts), Verdict::default()),
    };
    #[cfg(not(feature = "rego"))]
    let (decision, verdict) = match refusal {
        Some(reason) => (Decision::refused(reason), Verdict::default()),
        None => (decide(config, &facts), Verdict::default()),
    };
    let Verdict {
        mut set,
        mut deny_headers,
        deny_status,
        deny_body,
        rego_error,
        #[cfg(feature = "rego")]
        rego_input,
    } = verdict;

    // The filter's own headers, on every outcome: what this hop knows, or nothing.
    // (Headers removed above are gone from `headers`; a trusted gateway's are replaced here.)
    for (name, value) in annotator.request_headers(caller.as_ref(), &local) {
        if headers.contains(&name) {
            remove.push(name.clone());
        }
        if let Some(value) = value {
            set.push((name, value));
        }
    }
    if decision.allowed {
        match annotator.baggage(headers.joined_text("baggage").as_deref(), &local) {
            BaggageChange::Keep => {}
            BaggageChange::Remove => remove.push("baggage".into()),
            BaggageChange::Set(value) => {
                if headers.contains("baggage") {
                    remove.push("baggage".into());
                }
                set.push(("baggage".into(), value));
            }
        }
    }
    if let (false, Some(name), Some((policy, _))) = (
        decision.allowed,
        &config.deny_policy_header,
        &decision.policy,
    ) {
        deny_headers.push((name.clone(), policy.clone()));
    }
    let log = describe(
        &decision,
        caller.as_ref(),
        resolved.no_identity.as_deref(),
        path,
    );
    HttpOutcome {
        decision,
        caller,
        no_identity: resolved.no_identity,
        unverifiable: resolved.unverifiable,
        forwarded_refused: resolved.forwarded_refused,
        remove,
        set,
        deny_headers,
        deny_status,
        deny_body,
        rego_error,
        #[cfg(feature = "rego")]
        rego_input,
        log,
    }
}

/// Whether the request names more than one host: `:authority`/`Host` values
/// that differ (case aside), a value with a comma (two `Host` headers merged),
/// or one that is not UTF-8. `DENY hosts` could miss such a request.
fn is_ambiguous_host(headers: &Headers) -> bool {
    let mut first: Option<&[u8]> = None;
    for value in headers.raw(":authority").chain(headers.raw("host")) {
        if value.contains(&b',') || std::str::from_utf8(value).is_err() {
            return true;
        }
        match first {
            None => first = Some(value),
            Some(seen) if !seen.eq_ignore_ascii_case(value) => return true,
            Some(_) => {}
        }
    }
    false
}

/// What a decision adds beyond allow/deny: headers, a denial's status and body.
struct Verdict {
    set: Vec<(String, String)>,
    deny_headers: Vec<(String, String)>,
    deny_status: u32,
    deny_body: String,
    rego_error: bool,
    #[cfg(feature = "rego")]
    rego_input: Option<regorus::Value>,
}

impl Default for Verdict {
    fn default() -> Self {
        Self {
            set: Vec::new(),
            deny_headers: Vec::new(),
            deny_status: 403,
            deny_body: DENY_BODY.to_string(),
            rego_error: false,
            #[cfg(feature = "rego")]
            rego_input: None,
        }
    }
}

/// Rego mode's decision: OPA-Envoy's result rules (see [`rego`]).
#[cfg(feature = "rego")]
fn decide_rego(policy: &rego::RegoPolicy, facts: &rego::RegoFacts<'_>) -> (Decision, Verdict) {
    let mut verdict = Verdict::default();
    let outcome = match rego::input(facts, policy.fields()) {
        Err(reason) => rego::RegoDecision::Error(reason.into()),
        Ok(input) => {
            verdict.rego_input = Some(input.clone());
            policy.decide(input)
        }
    };
    let (allowed, reason) = match outcome {
        rego::RegoDecision::Allow { headers } => {
            verdict.set = headers;
            (true, Reason::AllowedByPolicy)
        }
        rego::RegoDecision::Deny {
            status,
            body,
            headers,
        } => {
            verdict.deny_status = status;
            if let Some(body) = body {
                verdict.deny_body = body;
            }
            verdict.deny_headers = headers;
            (false, Reason::DeniedByPolicy)
        }
        rego::RegoDecision::Error(why) => {
            verdict.rego_error = true;
            (false, Reason::RegoError(why))
        }
    };
    if policy.dry_run {
        // Reported, never enforced: the request goes on as it came.
        let shadow = if allowed {
            decide::Shadow::WouldAllow
        } else {
            decide::Shadow::WouldDeny
        };
        let decision = Decision {
            allowed: true,
            reason: Reason::Default,
            policy: None,
            dry_run: vec![(config::REGO_POLICY_NAME.to_string(), shadow)],
            audited: Vec::new(),
        };
        return (
            decision,
            Verdict {
                rego_input: verdict.rego_input,
                rego_error: verdict.rego_error,
                ..Verdict::default()
            },
        );
    }
    let decision = Decision {
        allowed,
        reason,
        policy: Some((config::REGO_POLICY_NAME.to_string(), 0)),
        dry_run: Vec::new(),
        audited: Vec::new(),
    };
    (decision, verdict)
}

/// What the shim reads for one connection at L4.
#[derive(Clone, Debug, Default)]
pub struct NetworkInput<'a> {
    /// `connection.uri_san_peer_certificate`.
    pub peer_uri_san: Option<&'a str>,
    /// `connection.requested_server_name`.
    pub sni: Option<&'a str>,
    /// Destination port.
    pub port: Option<u32>,
    /// What Envoy's node and local certificate say about this hop.
    pub node: NodeFacts,
}

/// The verdict for one connection.
#[derive(Clone, Debug)]
pub struct NetworkOutcome {
    /// The decision (for passthrough: the SNI allowlist's).
    pub decision: Decision,
    /// Why there is no identity, if there is none (identity placements).
    pub no_identity: Option<String>,
    /// One log line for a denial.
    pub log: Option<String>,
}

/// Evaluates one connection: the SNI allowlist on a passthrough gateway, policies otherwise.
pub fn evaluate_network(config: &Config, input: &NetworkInput<'_>) -> NetworkOutcome {
    if config.placement == Placement::Passthrough {
        let allowed = input
            .sni
            .is_some_and(|sni| config.sni_allowlist.matches(sni));
        let decision = Decision {
            allowed,
            reason: if allowed {
                Reason::AllowedByPolicy
            } else {
                Reason::NoAllowMatched
            },
            policy: None,
            dry_run: Vec::new(),
            audited: Vec::new(),
        };
        let log = (!allowed).then(|| {
            format!(
                "denied: SNI {:?} is not exported across networks",
                input.sni.unwrap_or("")
            )
        });
        return NetworkOutcome {
            decision,
            no_identity: None,
            log,
        };
    }
    let resolved = identity::resolve_network(input.peer_uri_san);
    let caller = resolved
        .caller
        .clone()
        .map(|id| config.annotator.caller(id));
    let local: Local = config.annotator.local(&input.node);
    let facts = Facts {
        caller: caller.as_ref(),
        local: Some(&local),
        port: input.port,
        sni: input.sni,
        ..Facts::default()
    };
    let decision = decide(config, &facts);
    let log = describe(
        &decision,
        caller.as_ref(),
        resolved.no_identity.as_deref(),
        None,
    );
    NetworkOutcome {
        decision,
        no_identity: resolved.no_identity,
        log,
    }
}

/// The log line for a denial, or for a dry-run/audit hit; `None` for a plain allow.
fn describe(
    decision: &Decision,
    caller: Option<&Caller>,
    no_identity: Option<&str>,
    path: Option<Reading<'_>>,
) -> Option<String> {
    // An allowed request is news only when a dry-run policy would have denied it
    // or an AUDIT policy matched (a dry-run that agrees is counted, not logged).
    let noteworthy = !decision.allowed
        || !decision.audited.is_empty()
        || decision
            .dry_run
            .iter()
            .any(|(_, shadow)| *shadow == decide::Shadow::WouldDeny);
    if !noteworthy {
        return None;
    }
    let who = caller.map_or("-", |c| c.id.as_str());
    let td = caller.map_or("-", |c| c.id.trust_domain());
    let policy = decision.policy.as_ref().map_or("-", |(p, _)| p.as_str());
    let path: String = match path {
        None => String::new(),
        Some(None) => "(not UTF-8)".into(),
        Some(Some(p)) => p.chars().take(LOG_PATH_MAX).collect(),
    };
    let identity_note = no_identity
        .map(|r| format!(" no_identity=\"{r}\""))
        .unwrap_or_default();
    let shadow = if decision.dry_run.is_empty() && decision.audited.is_empty() {
        String::new()
    } else {
        format!(
            " dry_run={:?} audited={:?}",
            decision.dry_run, decision.audited
        )
    };
    Some(if decision.allowed {
        format!("allowed caller={who} trust_domain={td} policy={policy} path={path:?}{shadow}")
    } else {
        format!(
            "denied caller={who} trust_domain={td} policy={policy} reason={:?} path={path:?}{identity_note}{shadow}",
            decision.reason
        )
    })
}
