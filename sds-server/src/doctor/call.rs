//! `doctor call <caller> <callee>`: why a given call fails, hop by hop —
//! whether the callee's Envoy trusts the caller's trust domain, whether the
//! caller's SVID chains to the roots it holds for it, whether the callee's
//! trustweave-filter allows the request (and by which rule), and whether the
//! callee's gateway lets the service's SNI through.

use futures::future::join_all;
use trustweave_engine::annotate::NodeFacts;
use trustweave_engine::config::{self as policy_config, Config, Layer, Placement};
use trustweave_engine::decide::Decision;
use trustweave_engine::headers::Headers;
use trustweave_engine::identity::StatedCertificates;
use trustweave_engine::{evaluate_http, evaluate_network, HttpInput, NetworkInput};

use super::config::{istio_sni, DoctorConfig, EnvoyConfig};
use super::envoy::{self, EnvoyView};
use super::report::{Check, Status};

/// The request the caller makes.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// The action (the policy's `action_header`), if any.
    pub action: Option<String>,
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// More headers.
    pub headers: Vec<(String, String)>,
    /// The SNI, if not derived from the callee's `service`.
    pub sni: Option<String>,
}

struct Located<'a> {
    trust_domain: &'a str,
    label: String,
    config: &'a EnvoyConfig,
    view: Result<EnvoyView, String>,
}

async fn all_envoys(config: &DoctorConfig) -> Vec<Located<'_>> {
    let mut wanted = Vec::new();
    for td in &config.trust_domains {
        for node in &td.nodes {
            for envoy in &node.envoys {
                wanted.push((
                    td.name.as_str(),
                    format!("{}/{}/{}", td.name, node.name, envoy.name),
                    envoy,
                ));
            }
        }
    }
    join_all(
        wanted
            .into_iter()
            .map(|(trust_domain, label, config)| async move {
                let view = config
                    .admin
                    .get(envoy::CONFIG_DUMP_PATH, envoy::MAX_CONFIG_DUMP)
                    .await
                    .and_then(|d| envoy::parse(&d));
                Located {
                    trust_domain,
                    label,
                    config,
                    view,
                }
            }),
    )
    .await
}

/// The trust domain of a SPIFFE ID.
fn trust_domain_of(id: &str) -> Option<&str> {
    id.strip_prefix("spiffe://")?
        .split('/')
        .next()
        .filter(|td| !td.is_empty())
}

/// Explains the call from `caller` (a SPIFFE ID) to `callee` (an Envoy's name, its SPIFFE ID or its service host).
pub async fn explain(
    config: &DoctorConfig,
    caller: &str,
    callee: &str,
    request: &Request,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let Some(caller_td) = trust_domain_of(caller) else {
        checks.push(Check::new(
            "caller",
            caller,
            Status::Missing,
            "not a SPIFFE ID (spiffe://<trust domain>/…)",
        ));
        return checks;
    };
    let envoys = all_envoys(config).await;
    let matches_callee = |e: &&Located<'_>| {
        e.config.name == callee
            || e.label == callee
            || e.config
                .service
                .as_deref()
                .is_some_and(|s| s == callee || s.split(':').next() == Some(callee))
            || e.view.as_ref().ok().and_then(|v| v.spiffe_id.as_deref()) == Some(callee)
    };
    let Some(target) = envoys.iter().find(matches_callee) else {
        checks.push(Check::new(
            "callee",
            callee,
            Status::Missing,
            "no Envoy of the configuration has this name, service or SPIFFE ID",
        ));
        return checks;
    };
    let holder = format!("envoy {}", target.label);
    let view = match &target.view {
        Ok(view) => view,
        Err(error) => {
            checks.push(Check::new(
                &holder,
                callee,
                Status::Unreachable,
                error.clone(),
            ));
            return checks;
        }
    };
    // 1. Trust: the callee's Envoy holds roots for the caller's trust domain.
    let roots = view.trusts.get(caller_td).or_else(|| view.trusts.get("*"));
    match roots {
        Some(roots) => checks.push(Check::new(&holder, caller_td, Status::Ok, format!("trusts {caller_td} ({} root(s))", roots.sha256.len()))),
        None => checks.push(
            Check::new(&holder, caller_td, Status::Refused, format!("does not trust {caller_td}: the handshake fails (Envoy: CERTIFICATE_VERIFY_FAILED)"))
                .fix(format!("federate {} with {caller_td} (`federation create` both ways) and add it to the workload's entry `federatesWith`", target.trust_domain)),
        ),
    }
    // 2. The caller's SVID, from an Envoy that presents it.
    let caller_envoy = envoys
        .iter()
        .find(|e| e.view.as_ref().ok().and_then(|v| v.spiffe_id.as_deref()) == Some(caller));
    match (caller_envoy.and_then(|e| e.view.as_ref().ok()), roots) {
        (None, _) => checks.push(Check::new(
            "caller's SVID",
            caller,
            Status::Missing,
            "no Envoy of the configuration presents this SPIFFE ID",
        )),
        (Some(_), None) => {}
        (Some(caller_view), Some(roots)) => match caller_view.chain.split_first() {
            None => checks.push(Check::new(
                "caller's SVID",
                caller,
                Status::Missing,
                "its Envoy holds no certificate",
            )),
            Some((leaf, intermediates)) => {
                match super::endpoint::verify_chain(leaf, intermediates, roots, webpki::KeyUsage::client_auth()) {
                    Ok(()) => checks.push(Check::new("caller's SVID", caller, Status::Ok, format!("chains to the roots {} holds for {caller_td}", target.label))),
                    Err(why) => checks.push(
                        Check::new("caller's SVID", caller, Status::Refused, format!("{why} (roots of {caller_td} at {})", target.label))
                            .fix("the callee's copy of the caller's bundle is stale: run `trustweave-sds doctor` to find the link"),
                    ),
                }
            }
        },
    }
    // 3. The other way: the caller's Envoy verifies the callee's certificate.
    if let Some(caller_envoy) = caller_envoy {
        if let Ok(caller_view) = &caller_envoy.view {
            let callee_td = target.trust_domain;
            let caller_holder = format!("envoy {}", caller_envoy.label);
            if caller_view.trusts.contains_key(callee_td) || caller_view.trusts.contains_key("*") {
                checks.push(Check::new(
                    &caller_holder,
                    callee_td,
                    Status::Ok,
                    format!("trusts {callee_td}"),
                ));
            } else {
                checks.push(
                    Check::new(&caller_holder, callee_td, Status::Refused, format!("does not trust {callee_td}: it refuses the callee's certificate (the caller sees 503)"))
                        .fix(format!("federate {caller_td} with {callee_td} (run `trustweave-sds doctor` for which side is missing)")),
                );
            }
        }
    }
    // 4. The callee's trustweave-filter.
    let filters: Vec<Config> = view
        .filter_configs
        .iter()
        .filter_map(|text| policy_config::parse(text.as_bytes()).ok())
        .filter(|c| c.layer == Layer::Http && c.placement != Placement::Passthrough)
        .collect();
    match filters.first() {
        None if view.filter_configs.is_empty() => checks.push(Check::new(&holder, "trustweave-filter", Status::Ok, "no trustweave-filter on its listeners")),
        None => checks.push(Check::new(&holder, "trustweave-filter", Status::Missing, "its trustweave-filter configuration is not one this doctor can evaluate (Rego: `trustweave-policy check`)")),
        Some(filter) => {
            let decision = decide_http(filter, view, caller, request);
            let rule = describe(&decision);
            if decision.allowed {
                checks.push(Check::new(&holder, "trustweave-filter", Status::Ok, format!("allowed: {rule}")));
            } else {
                checks.push(
                    Check::new(&holder, "trustweave-filter", Status::Refused, format!("denied (403 RBAC: access denied): {rule}"))
                        .fix("change the policy (`trustweave-policy check` tries it before rollout)"),
                );
            }
        }
    }
    // 5. Across networks: the callee's gateway, by SNI.
    if caller_td != target.trust_domain {
        let sni = request
            .sni
            .clone()
            .or_else(|| target.config.service.as_deref().and_then(istio_sni));
        let gateways = config
            .trust_domain(target.trust_domain)
            .map(|td| td.gateways.as_slice())
            .unwrap_or_default();
        for gateway in gateways {
            let holder = format!("gateway {}/{}", target.trust_domain, gateway.name);
            let (Some(admin), Some(sni)) = (&gateway.admin, &sni) else {
                checks.push(Check::new(
                    &holder,
                    "SNI",
                    Status::Missing,
                    "no admin source or no SNI (give --sni or the callee's service)",
                ));
                continue;
            };
            let view = admin
                .get(envoy::CONFIG_DUMP_PATH, envoy::MAX_CONFIG_DUMP)
                .await
                .and_then(|d| envoy::parse(&d));
            let view = match view {
                Ok(view) => view,
                Err(error) => {
                    checks.push(Check::new(&holder, sni, Status::Unreachable, error));
                    continue;
                }
            };
            let passthrough = view
                .filter_configs
                .iter()
                .filter_map(|text| policy_config::parse(text.as_bytes()).ok())
                .find(|c| c.placement == Placement::Passthrough);
            match passthrough {
                None => checks.push(Check::new(&holder, sni, Status::Ok, "no SNI allowlist")),
                Some(filter) => {
                    let outcome = evaluate_network(
                        &filter,
                        &NetworkInput {
                            sni: Some(sni),
                            ..Default::default()
                        },
                    );
                    if outcome.decision.allowed {
                        checks.push(Check::new(
                            &holder,
                            sni,
                            Status::Ok,
                            "the SNI allowlist lets it through",
                        ));
                    } else {
                        checks.push(
                            Check::new(&holder, sni, Status::Refused, "the SNI allowlist refuses it: the connection is closed (the caller sees 503)")
                                .fix("export the service: add its SNI to the gateway's sni_allowlist (istio/envoyfilter-gateway-sni.yaml)"),
                        );
                    }
                }
            }
        }
    }
    checks
}

fn decide_http(filter: &Config, view: &EnvoyView, caller: &str, request: &Request) -> Decision {
    let mut headers = vec![
        (":method".to_string(), request.method.clone()),
        (":path".to_string(), request.path.clone()),
        (":authority".to_string(), String::new()),
    ];
    if let Some(action) = &request.action {
        headers.push((filter.action_header.clone(), action.clone()));
    }
    headers.extend(request.headers.iter().cloned());
    let mut certs = StatedCertificates {
        peer: Some(Ok(vec![caller.to_string()])),
        forwarded: None,
    };
    let node = NodeFacts {
        region: view.region.clone(),
        zone: view.zone.clone(),
        cloud: view.cloud.clone(),
        local_uri_san: view.spiffe_id.clone(),
    };
    evaluate_http(
        filter,
        HttpInput {
            headers: Headers::from_text(&headers),
            port: None,
            sni: None,
            node,
            unreadable: None,
        },
        &mut certs,
    )
    .decision
}

fn describe(decision: &Decision) -> String {
    let reason = format!("{:?}", decision.reason);
    match &decision.policy {
        Some((name, rule)) => format!("policy {name:?} rule {rule} ({reason})"),
        None => reason,
    }
}
