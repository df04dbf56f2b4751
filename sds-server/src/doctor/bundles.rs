//! Bundles across clouds, link by link: each trust domain's SPIRE server
//! holds the current bundle; each federated peer's server holds a copy,
//! fetched from the bundle endpoint (checked here as that peer checks it);
//! each node's trustweave-sds serves the node agent's view to every Envoy;
//! each Envoy holds what it was served. Every view is compared with the one
//! it was copied from, so a fault shows once, at the link where it is —
//! views downstream of a stale copy are in step with it and say so.

use std::collections::{BTreeMap, BTreeSet};

use futures::future::join_all;

use super::bundle::{Difference, Roots};
use super::config::{DoctorConfig, NodeConfig, TrustDomainConfig};
use super::endpoint::{self, ProbeError, Reached, Stage};
use super::envoy::{self, EnvoyView};
use super::report::{Check, Status};
use super::spire::{Relationship, SpireServerCli};
use crate::delegated::WorkloadReport;

/// Largest `/debug/workloads` answer read.
const MAX_WORKLOADS: usize = 64 << 20;

/// What one SPIRE server showed.
struct ServerView {
    own: Result<Roots, String>,
    federated: Result<BTreeMap<String, Roots>, String>,
    relationships: Result<Vec<Relationship>, String>,
}

impl ServerView {
    /// Its view of `trust_domain`: its own bundle or a federated copy.
    fn view_of(&self, own_name: &str, trust_domain: &str) -> Option<&Roots> {
        if own_name == trust_domain {
            self.own.as_ref().ok()
        } else {
            self.federated.as_ref().ok()?.get(trust_domain)
        }
    }

    fn relationship(&self, trust_domain: &str) -> Option<&Relationship> {
        self.relationships
            .as_ref()
            .ok()?
            .iter()
            .find(|r| r.trust_domain == trust_domain)
    }
}

async fn read_server(cli: &SpireServerCli) -> ServerView {
    let (own, federated, relationships) = tokio::join!(
        cli.own_bundle(),
        cli.federated_bundles(),
        cli.relationships()
    );
    ServerView {
        own: own.map(|b| b.roots),
        federated: federated.map(|list| {
            list.into_iter()
                .map(|b| (b.trust_domain, b.roots))
                .collect()
        }),
        relationships,
    }
}

/// What one node showed: its trustweave-sds's workloads and its Envoys.
struct NodeView {
    workloads: Option<Result<Vec<WorkloadReport>, String>>,
    envoys: Vec<(String, Result<EnvoyView, String>)>,
}

async fn read_node(node: &NodeConfig) -> NodeView {
    let workloads = async {
        let source = node.trustweave_sds.as_ref()?;
        Some(
            source
                .get("/debug/workloads", MAX_WORKLOADS)
                .await
                .and_then(|body| {
                    serde_json::from_slice(&body)
                        .map_err(|e| format!("/debug/workloads: unexpected answer: {e}"))
                }),
        )
    };
    let envoys = join_all(node.envoys.iter().map(|e| async move {
        let view = e
            .admin
            .get(envoy::CONFIG_DUMP_PATH, envoy::MAX_CONFIG_DUMP)
            .await
            .and_then(|dump| envoy::parse(&dump));
        (e.name.clone(), view)
    }));
    let (workloads, envoys) = tokio::join!(workloads, envoys);
    NodeView { workloads, envoys }
}

/// Checks every bundle link of the mesh.
pub async fn check(config: &DoctorConfig) -> Vec<Check> {
    let now = now();
    let servers: BTreeMap<&str, ServerView> =
        join_all(config.trust_domains.iter().map(|td| async move {
            let view = match &td.spire_server {
                Some(cli) => Some(read_server(cli).await),
                None => None,
            };
            (td.name.as_str(), view)
        }))
        .await
        .into_iter()
        .filter_map(|(name, view)| Some((name, view?)))
        .collect();
    let urls: BTreeSet<String> = servers
        .values()
        .filter_map(|s| s.relationships.as_ref().ok())
        .flatten()
        .map(|r| r.url.clone())
        .collect();
    let probes: BTreeMap<String, Result<Reached, ProbeError>> =
        join_all(urls.into_iter().map(|url| async move {
            let probe = endpoint::probe(&url).await;
            (url, probe)
        }))
        .await
        .into_iter()
        .collect();

    let mut checks = Vec::new();
    for td in &config.trust_domains {
        let Some(server) = servers.get(td.name.as_str()) else {
            continue;
        };
        check_server(td, server, &mut checks);
        let start = checks.len();
        check_federation(config, td, server, &servers, &probes, now, &mut checks);
        // One holder's rows together (a stable sort keeps their order).
        if let Some(section) = checks.get_mut(start..) {
            section.sort_by(|a, b| a.holder.cmp(&b.holder));
        }
    }
    for td in &config.trust_domains {
        let server = servers.get(td.name.as_str());
        for node in &td.nodes {
            let view = read_node(node).await;
            check_node(td, node, &view, server, now, &mut checks);
        }
    }
    checks
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn check_server(td: &TrustDomainConfig, server: &ServerView, checks: &mut Vec<Check>) {
    let holder = format!("spire-server {}", td.name);
    let errors = [
        server.own.as_ref().err(),
        server.federated.as_ref().err(),
        server.relationships.as_ref().err(),
    ];
    if let Some(error) = errors.into_iter().flatten().next() {
        checks.push(
            Check::new(&holder, &td.name, Status::Unreachable, error.clone())
                .fix("check the spire_server command of this trust domain (and that the server is up: `spire-server healthcheck`)"),
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn check_federation(
    config: &DoctorConfig,
    td: &TrustDomainConfig,
    server: &ServerView,
    servers: &BTreeMap<&str, ServerView>,
    probes: &BTreeMap<String, Result<Reached, ProbeError>>,
    now: i64,
    checks: &mut Vec<Check>,
) {
    let holder = format!("spire-server {}", td.name);
    let cli = td.spire_server.as_ref();
    let run = |args: &[&str]| match cli {
        Some(cli) => format!("`{}`", cli.command_line(args)),
        None => format!("`spire-server {}`", args.join(" ")),
    };
    for relationship in server.relationships.as_ref().into_iter().flatten() {
        let peer = relationship.trust_domain.as_str();
        let peer_id = format!("spiffe://{peer}");
        let current = servers.get(peer).and_then(|s| s.own.as_ref().ok());
        let held = server.view_of(&td.name, peer);
        let endpoint_holder = format!("bundle endpoint of {peer} from {}", td.name);
        // The endpoint, as this server reaches it and checks it.
        let endpoint_ok = match probes.get(&relationship.url) {
            None => false,
            Some(Err(error)) => {
                checks.push(
                    Check::new(
                        &endpoint_holder,
                        peer,
                        Status::Unreachable,
                        format!("{} {}: {}", relationship.url, stage_name(error.stage), error.reason),
                    )
                    .fix(match error.stage {
                        Stage::Url => run(&["federation", "update", "-trustDomain", peer, "-bundleEndpointURL", "https://<ip>:<port>", "-bundleEndpointProfile", "https_spiffe", "-endpointSpiffeID", &format!("{peer_id}/spire/server")]),
                        Stage::Dns | Stage::Tcp => format!(
                            "let {}'s SPIRE server reach {} (firewall, load balancer; the peer's bundle_endpoint.address must be an IP reachable from here), then {}",
                            td.name,
                            relationship.url,
                            run(&["federation", "refresh", "-id", peer])
                        ),
                        Stage::Tls | Stage::Http => format!(
                            "{} must serve its bundle endpoint there (server.federation.bundle_endpoint, profile https_spiffe)",
                            peer
                        ),
                    }),
                );
                false
            }
            Some(Ok(reached)) => {
                let verdict = match (&relationship.endpoint_spiffe_id, held) {
                    (None, _) => Ok(()), // https_web: web PKI, not ours to check
                    (Some(id), Some(held)) => endpoint::check(&reached.chain, held, id),
                    (Some(_), None) => Err("no bundle held to verify it".to_string()),
                };
                match (verdict, &reached.document) {
                    (Err(why), _) => {
                        let peer_cli = config
                            .trust_domain(peer)
                            .and_then(|p| p.spire_server.as_ref())
                            .map_or("spire-server bundle show -format spiffe".to_string(), |c| {
                                c.command_line(&["bundle", "show", "-format", "spiffe"])
                            });
                        checks.push(
                            Check::new(&endpoint_holder, peer, Status::Untrusted, format!("{}: {why}", relationship.url))
                                .fix(if why.starts_with("presents") {
                                    run(&["federation", "update", "-trustDomain", peer, "-bundleEndpointURL", &relationship.url, "-bundleEndpointProfile", "https_spiffe", "-endpointSpiffeID", "<the ID the endpoint presents>"])
                                } else {
                                    format!(
                                        "bootstrap the bundle again (the endpoint rotated past what {} holds): `{peer_cli} > {peer}.json`, then {}",
                                        td.name,
                                        run(&["bundle", "set", "-format", "spiffe", "-id", &peer_id, "-path", &format!("{peer}.json")])
                                    )
                                }),
                        );
                        false
                    }
                    (Ok(()), Err(why)) => {
                        checks.push(Check::new(
                            &endpoint_holder,
                            peer,
                            Status::Unreachable,
                            format!("{}: {why}", relationship.url),
                        ));
                        false
                    }
                    (Ok(()), Ok(_)) => {
                        checks.push(Check::new(
                            &endpoint_holder,
                            peer,
                            Status::Ok,
                            format!("{} https_spiffe ok", relationship.url),
                        ));
                        true
                    }
                }
            }
        };
        // The copy this server holds, against the peer's current bundle.
        match (held, current) {
            (None, _) => checks.push(
                Check::new(
                    &holder,
                    peer,
                    Status::Missing,
                    format!("federates with {peer} but holds no bundle of it"),
                )
                .fix(run(&["federation", "refresh", "-id", peer])),
            ),
            (Some(_), None) => {}
            (Some(held), Some(current)) => {
                let difference = Difference::of(held, current);
                if difference.is_empty() {
                    checks.push(Check::new(
                        &holder,
                        peer,
                        Status::InStep,
                        sequence_note(held),
                    ));
                } else {
                    let fix = if endpoint_ok {
                        run(&["federation", "refresh", "-id", peer])
                    } else {
                        format!(
                            "mend the bundle endpoint link above; then {}",
                            run(&["federation", "refresh", "-id", peer])
                        )
                    };
                    checks.push(
                        Check::new(
                            &holder,
                            peer,
                            Status::Stale,
                            difference.describe(current, held, now),
                        )
                        .fix(fix),
                    );
                }
            }
        }
    }
    // Federation both ways: a relationship only one side has breaks mTLS both ways.
    for (peer, peer_server) in servers {
        if *peer == td.name || server.relationships.is_err() {
            continue;
        }
        if peer_server.relationship(&td.name).is_some() && server.relationship(peer).is_none() {
            let url = servers
                .values()
                .filter_map(|s| s.relationship(peer))
                .map(|r| r.url.clone())
                .next()
                .unwrap_or_else(|| format!("<{peer}'s bundle endpoint URL>"));
            checks.push(
                Check::new(
                    &holder,
                    peer,
                    Status::OneSided,
                    format!("{peer} federates with {}, {} not with {peer}: neither side's workloads can verify the other's", td.name, td.name),
                )
                .fix(format!(
                    "to federate: {} (after `bundle set` of {peer}'s bundle); to end it: `federation delete -id {}` on {peer}",
                    run(&["federation", "create", "-trustDomain", peer, "-bundleEndpointURL", &url, "-bundleEndpointProfile", "https_spiffe", "-endpointSpiffeID", &format!("spiffe://{peer}/spire/server")]),
                    td.name
                )),
            );
        }
    }
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Url => "URL",
        Stage::Dns => "DNS",
        Stage::Tcp => "TCP",
        Stage::Tls => "TLS",
        Stage::Http => "HTTP",
    }
}

fn sequence_note(roots: &Roots) -> String {
    let count = roots.sha256.len();
    // SPIRE keeps no sequence for a federated copy (it shows 0).
    match roots.sequence.filter(|s| *s > 0) {
        Some(sequence) => format!("{count} root(s), sequence {sequence}"),
        None => format!("{count} root(s)"),
    }
}

fn check_node(
    td: &TrustDomainConfig,
    node: &NodeConfig,
    view: &NodeView,
    server: Option<&ServerView>,
    now: i64,
    checks: &mut Vec<Check>,
) {
    let sds_holder = format!("trustweave-sds {}/{}", td.name, node.name);
    let upstream_of = |domain: &str| server.and_then(|s| s.view_of(&td.name, domain));
    let workloads = match &view.workloads {
        Some(Ok(workloads)) => Some(workloads),
        Some(Err(error)) => {
            checks.push(
                Check::new(&sds_holder, &td.name, Status::Unreachable, error.clone()).fix(
                    "trustweave-sds on this node does not answer: its Envoys keep what they were last served; check its pod (`kubectl -n trustweave logs ds/trustweave-sds`)",
                ),
            );
            None
        }
        None => None,
    };
    // trustweave-sds against the node's SPIRE (its server's view; the agent syncs every ~5 s).
    for workload in workloads.into_iter().flatten() {
        // The ID's path is enough beside the node (`ns/search/sa/indexer`).
        let who = workload.spiffe_id.as_deref().map_or_else(
            || format!("pid {}", workload.pid),
            |id| {
                id.strip_prefix(&format!("spiffe://{}/", td.name))
                    .unwrap_or(id)
                    .to_string()
            },
        );
        for (domain, fingerprints) in &workload.trust_bundles {
            let served = Roots::from_fingerprints(fingerprints.iter().cloned());
            let holder = format!("{sds_holder} → {who}");
            match upstream_of(domain) {
                Some(upstream) => {
                    let difference = Difference::of(&served, upstream);
                    if difference.is_empty() {
                        checks.push(Check::new(
                            &holder,
                            domain,
                            Status::InStep,
                            sequence_note(&served),
                        ));
                    } else {
                        checks.push(
                            Check::new(&holder, domain, Status::Stale, format!("{} (against spire-server {})", difference.describe(upstream, &served, now), td.name))
                                .fix("the node's spire-agent syncs every ~5 s: if this persists, check `spire-agent healthcheck` and trustweave-sds' log"),
                        );
                    }
                }
                None if server.is_some() => checks.push(
                    Check::new(
                        &holder,
                        domain,
                        Status::Stale,
                        format!("serves a bundle spire-server {} no longer holds", td.name),
                    )
                    .fix("restart the workload's proxy, or trustweave-sds on the node, to drop it"),
                ),
                None => {}
            }
        }
    }
    // Each Envoy against what trustweave-sds serves it (or, if that cannot be read, the SPIRE view).
    for (name, envoy) in &view.envoys {
        let holder = format!("envoy {}/{}/{name}", td.name, node.name);
        let envoy = match envoy {
            Ok(envoy) => envoy,
            Err(error) => {
                checks.push(
                    Check::new(&holder, &td.name, Status::Unreachable, error.clone())
                        .fix("check the admin source of this Envoy"),
                );
                continue;
            }
        };
        let served = workloads.and_then(|list| {
            list.iter()
                .find(|w| w.spiffe_id.is_some() && w.spiffe_id == envoy.spiffe_id)
        });
        let mut domains: BTreeSet<&str> = envoy.trusts.keys().map(String::as_str).collect();
        if let Some(served) = served {
            domains.extend(served.trust_bundles.keys().map(String::as_str));
        }
        for domain in domains {
            let (upstream, against) = match served {
                Some(w) => (
                    w.trust_bundles
                        .get(domain)
                        .map(|f| Roots::from_fingerprints(f.iter().cloned())),
                    "what trustweave-sds serves it".to_string(),
                ),
                None => (
                    upstream_of(domain).cloned(),
                    format!(
                        "spire-server {}{}",
                        td.name,
                        if view.workloads.as_ref().is_some_and(|w| w.is_err()) {
                            "; its trustweave-sds does not answer"
                        } else {
                            ""
                        }
                    ),
                ),
            };
            let fix = "the Envoy's SDS stream is not delivering: check its `sds-grpc` cluster (`/clusters`), trustweave-sds on the node, then restart the proxy";
            match (envoy.trusts.get(domain), upstream) {
                (Some(held), Some(upstream)) => {
                    let difference = Difference::of(held, &upstream);
                    if difference.is_empty() {
                        checks.push(Check::new(
                            &holder,
                            domain,
                            Status::InStep,
                            sequence_note(held),
                        ));
                    } else {
                        // Describe with DER facts where the SPIRE view has them.
                        let reference = upstream_of(domain).cloned().unwrap_or(upstream);
                        checks.push(
                            Check::new(
                                &holder,
                                domain,
                                Status::Stale,
                                format!(
                                    "{} (against {against})",
                                    difference.describe(&reference, held, now)
                                ),
                            )
                            .fix(fix),
                        );
                    }
                }
                (None, Some(_)) => checks.push(
                    Check::new(
                        &holder,
                        domain,
                        Status::Missing,
                        format!("does not trust {domain}, which {against} includes"),
                    )
                    .fix(fix),
                ),
                (Some(held), None) => {
                    if server.is_some() {
                        checks.push(
                            Check::new(&holder, domain, Status::Stale, format!("still trusts {domain}, which {against} no longer includes ({})", sequence_note(held)))
                                .fix(fix),
                        );
                    }
                }
                (None, None) => {}
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::doctor::config::DoctorConfig;

    fn roots(fingerprints: &[&str]) -> Roots {
        Roots::from_fingerprints(fingerprints.iter().map(|f| f.to_string()))
    }

    fn server(own: &[&str], federated: &[(&str, &[&str])], relationships: &[&str]) -> ServerView {
        ServerView {
            own: Ok(roots(own)),
            federated: Ok(federated
                .iter()
                .map(|(td, f)| (td.to_string(), roots(f)))
                .collect()),
            relationships: Ok(relationships
                .iter()
                .map(|td| Relationship {
                    trust_domain: td.to_string(),
                    url: format!("https://{td}:8443"),
                    endpoint_spiffe_id: Some(format!("spiffe://{td}/spire/server")),
                })
                .collect()),
        }
    }

    fn config() -> DoctorConfig {
        DoctorConfig::parse(br#"{"trust_domains":[{"name":"a.test"},{"name":"b.test"}]}"#).unwrap()
    }

    fn statuses(checks: &[Check]) -> Vec<(String, String, Status)> {
        checks
            .iter()
            .map(|c| (c.holder.clone(), c.subject.clone(), c.status))
            .collect()
    }

    #[test]
    fn a_stale_copy_behind_an_unreachable_endpoint_is_named_with_both_links() {
        let config = config();
        let servers = BTreeMap::from([
            (
                "a.test",
                server(&["a1"], &[("b.test", &["b1"])], &["b.test"]),
            ),
            (
                "b.test",
                server(&["b1", "b2"], &[("a.test", &["a1"])], &["a.test"]),
            ),
        ]);
        let probes = BTreeMap::from([(
            "https://b.test:8443".to_string(),
            Err(ProbeError {
                stage: Stage::Tcp,
                reason: "refused".into(),
            }),
        )]);
        let mut checks = Vec::new();
        let a = &config.trust_domains[0];
        check_federation(
            &config,
            a,
            &servers["a.test"],
            &servers,
            &probes,
            0,
            &mut checks,
        );
        assert_eq!(
            statuses(&checks),
            [
                (
                    "bundle endpoint of b.test from a.test".into(),
                    "b.test".into(),
                    Status::Unreachable
                ),
                ("spire-server a.test".into(), "b.test".into(), Status::Stale),
            ]
        );
        assert!(
            checks[1].detail.starts_with("lacks root b2"),
            "{}",
            checks[1].detail
        );
        assert!(checks[1]
            .fix
            .as_deref()
            .unwrap()
            .starts_with("mend the bundle endpoint link"));
    }

    #[test]
    fn a_relationship_one_side_holds_is_one_sided_at_the_other() {
        let config = config();
        let servers = BTreeMap::from([
            ("a.test", server(&["a1"], &[], &[])),
            (
                "b.test",
                server(&["b1"], &[("a.test", &["a1"])], &["a.test"]),
            ),
        ]);
        let mut checks = Vec::new();
        let a = &config.trust_domains[0];
        check_federation(
            &config,
            a,
            &servers["a.test"],
            &servers,
            &BTreeMap::new(),
            0,
            &mut checks,
        );
        assert_eq!(
            statuses(&checks),
            [(
                "spire-server a.test".into(),
                "b.test".into(),
                Status::OneSided
            )]
        );
        let mut checks = Vec::new();
        let b = &config.trust_domains[1];
        check_federation(
            &config,
            b,
            &servers["b.test"],
            &servers,
            &BTreeMap::new(),
            0,
            &mut checks,
        );
        assert!(checks.iter().all(|c| !c.status.is_broken()), "{checks:?}");
    }
}
