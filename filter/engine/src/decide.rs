//! The decision: DENY first, then ALLOW; if any enforced ALLOW policy exists and
//! none matched, deny; only DENY policies and none matched, allow (as Istio);
//! with no enforced ALLOW or DENY policy the configured default applies.
//! Dry-run policies are evaluated and reported, never enforced; AUDIT policies
//! are reported only.

use super::config::Config;
use super::policy::{Action, Facts};

/// What a dry-run policy would have done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shadow {
    /// A dry-run ALLOW policy matched.
    WouldAllow,
    /// A dry-run DENY policy matched, or a dry-run ALLOW policy did not.
    WouldDeny,
}

/// Why a request was decided as it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A DENY policy matched.
    DeniedByPolicy,
    /// An ALLOW policy matched.
    AllowedByPolicy,
    /// ALLOW policies exist and none matched.
    NoAllowMatched,
    /// Only DENY policies exist and none matched (as in Istio).
    NoDenyMatched,
    /// No enforced ALLOW or DENY policy exists: the configured default.
    Default,
    /// The Rego policy could not decide (error, undefined, not a boolean): denied.
    RegoError(String),
    /// The peer presented a certificate the filter cannot locate or parse: denied before any policy.
    UnverifiablePeer(String),
    /// More than one `Host`/`:authority` value (or one with a comma): denied before any policy.
    AmbiguousHost,
    /// Envoy's headers or properties could not be read: denied before any policy.
    Unreadable(String),
}

impl Decision {
    /// A denial made before any policy is asked.
    pub fn refused(reason: Reason) -> Self {
        Self {
            allowed: false,
            reason,
            policy: None,
            dry_run: Vec::new(),
            audited: Vec::new(),
        }
    }
}

/// The outcome for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Why.
    pub reason: Reason,
    /// The deciding policy and the index of its matching rule.
    pub policy: Option<(String, usize)>,
    /// Dry-run outcomes, by policy name.
    pub dry_run: Vec<(String, Shadow)>,
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
}

/// Decides `facts` under `config`.
pub fn decide(config: &Config, facts: &Facts<'_>) -> Decision {
    let mut deny = None;
    let mut allow = None;
    let mut any_allow = false;
    let mut any_deny = false;
    let mut dry_run = Vec::new();
    let mut audited = Vec::new();
    for policy in &config.policies {
        let hit = policy.matching_rule(facts);
        match (policy.action, policy.dry_run) {
            (Action::Audit, _) => {
                if hit.is_some() {
                    audited.push(policy.name.clone());
                }
            }
            (Action::Allow, true) => dry_run.push((
                policy.name.clone(),
                if hit.is_some() {
                    Shadow::WouldAllow
                } else {
                    Shadow::WouldDeny
                },
            )),
            (Action::Deny, true) => {
                if hit.is_some() {
                    dry_run.push((policy.name.clone(), Shadow::WouldDeny));
                }
            }
            (Action::Deny, false) => {
                any_deny = true;
                if let (None, Some(rule)) = (&deny, hit) {
                    deny = Some((policy.name.clone(), rule));
                }
            }
            (Action::Allow, false) => {
                any_allow = true;
                if let (None, Some(rule)) = (&allow, hit) {
                    allow = Some((policy.name.clone(), rule));
                }
            }
        }
    }
    let (allowed, reason, policy) = match (deny, allow) {
        (Some(d), _) => (false, Reason::DeniedByPolicy, Some(d)),
        (None, Some(a)) => (true, Reason::AllowedByPolicy, Some(a)),
        (None, None) if any_allow => (false, Reason::NoAllowMatched, None),
        (None, None) if any_deny => (true, Reason::NoDenyMatched, None),
        (None, None) => (config.default_allow, Reason::Default, None),
    };
    Decision {
        allowed,
        reason,
        policy,
        dry_run,
        audited,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::Place;
    use crate::config::parse;
    use crate::headers::Headers;
    use crate::policy::{Caller, Local};
    use crate::spiffe_id::SpiffeId;

    fn caller(id: &str, region: Option<&str>) -> Caller {
        Caller {
            id: SpiffeId::parse(id).expect("id"),
            cloud: None,
            region: region.map(str::to_string),
        }
    }

    fn local() -> Local {
        Local {
            principal: Some("spiffe://gcp.company.com/region/gcp-us-central1/worker-1".into()),
            trust_domain: Some("gcp.company.com".into()),
            cloud: Some("gcp".into()),
            region: Some("us-central1".into()),
        }
    }

    fn run(config: &str, who: Option<&Caller>, path: &str, action: Option<&str>) -> Decision {
        let config = parse(config.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let local = local();
        let headers = Headers::from_text(
            &action
                .map(|a| ("x-trustweave-action", a))
                .into_iter()
                .collect::<Vec<_>>(),
        );
        let facts = Facts {
            caller: who,
            local: Some(&local),
            method: Some(Some("GET")),
            path: Some(Some(path)),
            host: Some(Some("svc.local:8080")),
            port: Some(8080),
            headers: &headers,
            action_header: &config.action_header,
            ..Facts::default()
        };
        decide(&config, &facts)
    }

    #[test]
    fn order_deny_then_allow_then_default() {
        let aws = caller("spiffe://aws.company.com/ns/a/sa/x", None);
        let gcp = caller("spiffe://gcp.company.com/ns/a/sa/y", None);
        let both = r#"{"policies":[
            {"name":"no-aws","action":"DENY","rules":[{"from":{"trust_domains":["aws.company.com"]}}]},
            {"name":"all","action":"ALLOW","rules":[{}]}]}"#;
        let d = run(both, Some(&aws), "/", None);
        assert_eq!(
            (d.allowed, d.reason, d.policy),
            (false, Reason::DeniedByPolicy, Some(("no-aws".into(), 0)))
        );
        let d = run(both, Some(&gcp), "/", None);
        assert_eq!((d.allowed, d.policy), (true, Some(("all".into(), 0))));

        let allow_only = r#"{"policies":[{"name":"same-td","action":"ALLOW","rules":[{"from":{"same_trust_domain":true}}]}]}"#;
        assert!(run(allow_only, Some(&gcp), "/", None).allowed);
        let d = run(allow_only, Some(&aws), "/", None);
        assert_eq!((d.allowed, d.reason), (false, Reason::NoAllowMatched));
        assert!(
            !run(allow_only, None, "/", None).allowed,
            "no identity never matches a from"
        );

        let deny_only = r#"{"policies":[{"name":"no-aws","action":"DENY","rules":[{"from":{"trust_domains":["aws.company.com"]}}]}]}"#;
        let d = run(deny_only, Some(&gcp), "/", None);
        assert_eq!((d.allowed, d.reason), (true, Reason::NoDenyMatched));

        assert!(
            !run(r#"{}"#, Some(&gcp), "/", None).allowed,
            "default is DENY"
        );
        assert!(run(r#"{"default_action":"ALLOW"}"#, None, "/", None).allowed);
    }

    #[test]
    fn dry_run_and_audit_are_reported_never_enforced() {
        let aws = caller("spiffe://aws.company.com/ns/a/sa/x", None);
        let config = r#"{"default_action":"ALLOW","policies":[
            {"name":"shadow-deny","action":"DENY","dry_run":true,"rules":[{"from":{"trust_domains":["aws.company.com"]}}]},
            {"name":"shadow-allow","action":"ALLOW","dry_run":true,"rules":[{"to":{"paths":["/only"]}}]},
            {"name":"watch","action":"AUDIT","rules":[{"to":{"paths":["/*"]}}]}]}"#;
        let d = run(config, Some(&aws), "/x", None);
        assert!(d.allowed);
        assert_eq!(d.reason, Reason::Default);
        assert_eq!(
            d.dry_run,
            vec![
                ("shadow-deny".into(), Shadow::WouldDeny),
                ("shadow-allow".into(), Shadow::WouldDeny)
            ]
        );
        assert_eq!(d.audited, vec!["watch".to_string()]);
        let d = run(config, Some(&aws), "/only", None);
        assert!(d
            .dry_run
            .contains(&("shadow-allow".into(), Shadow::WouldAllow)));
    }

    #[test]
    fn multi_cloud_guide_policies() {
        let example = include_str!("../../examples/multi-cloud-policy.json");
        let orchestrator = caller(
            "spiffe://aws.company.com/ns/ops/sa/orchestrator",
            Some("us-east-1"),
        );
        let aws_reader = caller(
            "spiffe://aws.company.com/ns/shop/sa/catalog",
            Some("us-east-1"),
        );
        let same_region = caller("spiffe://azure.company.com/ns/x/sa/y", Some("us-central1"));
        let stranger = caller("spiffe://azure.company.com/ns/x/sa/y", Some("westeurope"));
        let gcp_peer = caller("spiffe://gcp.company.com/ns/any/sa/any", None);
        for (who, action, path, allowed, policy) in [
            (
                Some(&gcp_peer),
                None,
                "/anything",
                true,
                Some("same-trust-domain"),
            ),
            (
                Some(&aws_reader),
                Some("inventory.read"),
                "/items",
                true,
                Some("federated-capabilities"),
            ),
            (
                Some(&aws_reader),
                Some("inventory.write"),
                "/items",
                false,
                None,
            ),
            (Some(&aws_reader), None, "/items", false, None),
            (Some(&same_region), None, "/x", true, Some("same-region")),
            (
                Some(&orchestrator),
                None,
                "/jobs",
                true,
                Some("orchestrator-to-central-workers"),
            ),
            (Some(&stranger), None, "/x", false, None),
            (
                Some(&stranger),
                Some("health_check"),
                "/x",
                true,
                Some("health-from-anyone"),
            ),
            (None, Some("ping"), "/x", true, Some("health-from-anyone")),
            (None, Some("write"), "/x", false, None),
        ] {
            let d = run(example, who, path, action);
            assert_eq!(d.allowed, allowed, "{who:?} {action:?} {path}");
            assert_eq!(
                d.policy.map(|(p, _)| p).as_deref(),
                policy,
                "{who:?} {action:?}"
            );
        }
        let _ = Place::default();
    }

    #[test]
    fn config_errors_name_every_field() {
        let bad = r#"{"policies":[
            {"name":"a","action":"ALLOW","rules":[{"from":{"principals":["spiffe://Bad/x","a*b"]},"to":{"methods":["get"],"ports":[0]}}]},
            {"name":"a","action":"DENY","rules":[]},
            {"name":"b","action":"ALLOW","rules":[{"when":[{"key":"nope","values":["x"]}]}]}],
            "trusted_gateways":["not-spiffe"],"headers":{"principal":"X-Upper"}}"#;
        let errors = parse(bad.as_bytes()).expect_err("invalid").0;
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for expected in [
            "policies[0].rules[0].from.principals[0]",
            "policies[0].rules[0].from.principals[1]",
            "policies[0].rules[0].to.methods[0]",
            "policies[0].rules[0].to.ports[0]",
            "policies[1].name",
            "policies[1].rules",
            "policies[2].rules[0].when[0].key",
            "trusted_gateways[0]",
            "headers.principal",
        ] {
            assert!(
                fields.contains(&expected),
                "missing {expected} in {fields:?}"
            );
        }
        let unknown = parse(br#"{"polices":[]}"#)
            .expect_err("unknown field")
            .to_string();
        assert!(unknown.contains("unknown field `polices`"), "{unknown}");
        let wrong = parse(br#"{"policies":[{"name":"x","action":"PERMIT","rules":[{}]}]}"#)
            .expect_err("bad action")
            .to_string();
        assert!(wrong.contains("PERMIT"), "{wrong}");
        let l4 = parse(br#"{"layer":"network","uri_san_check":"first_only","policies":[{"name":"x","action":"ALLOW","rules":[{"to":{"paths":["/"]}}]}]}"#)
            .expect_err("paths at L4").0;
        assert_eq!(l4[0].field, "policies[0].rules[0].to.paths");
        let l4_xfcc = parse(br#"{"layer":"network"}"#).expect_err("xfcc at L4").0;
        assert_eq!(l4_xfcc[0].field, "uri_san_check");
    }
}
