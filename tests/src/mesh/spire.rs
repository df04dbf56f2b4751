//! One cloud's SPIRE, standing in for its server and its node's agent: the
//! trust domain's CA, the agent's Delegated Identity API (what trustweave-sds
//! in node mode reads), the server's SPIFFE bundle endpoint, and federation
//! as SPIRE does it — for each federated trust domain, its bundle endpoint is
//! polled every refresh interval and what it publishes becomes that domain's
//! bundle on the agent. A failed poll keeps the last bundle.
//!
//! CA rotation follows SPIRE's overlap: the next root is published beside the
//! current one (`prepare_ca_rotation`), SVIDs are then signed by it
//! (`activate_next_ca`), and only later is the old root dropped
//! (`retire_old_ca`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::bundle_endpoint::{self, BundleEndpoint, PublishedBundle};
use crate::delegated_api::DelegatedApiStandIn;
use crate::pki::{IssuedSvid, TrustDomainCa};

/// How many polls of one federated bundle endpoint succeeded and failed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PollStats {
    /// Polls that returned a valid bundle.
    pub ok: u64,
    /// Polls that failed (unreachable, refused TLS, invalid bundle).
    pub failed: u64,
    /// The last failure.
    pub last_error: Option<String>,
}

/// A cloud's SPIRE server and node agent.
pub struct SpireStandIn {
    trust_domain: String,
    /// The trust domain's CAs: the last signs; all are in the bundle.
    cas: Mutex<Vec<Arc<TrustDomainCa>>>,
    agent: Arc<DelegatedApiStandIn>,
    endpoint: Arc<BundleEndpoint>,
    refresh: Duration,
    svid_ttl: Duration,
    pollers: Mutex<BTreeMap<String, JoinHandle<()>>>,
    polls: Arc<Mutex<BTreeMap<String, PollStats>>>,
}

impl std::fmt::Debug for SpireStandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpireStandIn")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// The SPIFFE ID a SPIRE server's bundle endpoint presents.
pub fn server_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/spire/server")
}

impl SpireStandIn {
    /// Starts the agent on `admin_socket` (authorizing `delegate_id`, attested
    /// later by PID) and the bundle endpoint on `endpoint_addr`.
    pub async fn start(
        trust_domain: &str,
        admin_socket: &Path,
        delegate_id: &str,
        endpoint_addr: SocketAddr,
        refresh: Duration,
        svid_ttl: Duration,
    ) -> Arc<Self> {
        let ca = Arc::new(TrustDomainCa::new(trust_domain));
        let agent =
            DelegatedApiStandIn::start(admin_socket, 0, delegate_id, &[&ca], svid_ttl).await;
        let endpoint = BundleEndpoint::start(
            endpoint_addr,
            ca.issue_svid(&server_id(trust_domain), svid_ttl),
            PublishedBundle {
                roots: vec![ca.root_der().to_vec()],
                sequence: 1,
                refresh_hint: refresh,
            },
        )
        .await;
        Arc::new(Self {
            trust_domain: trust_domain.to_string(),
            cas: Mutex::new(vec![ca]),
            agent,
            endpoint,
            refresh,
            svid_ttl,
            pollers: Mutex::new(BTreeMap::new()),
            polls: Arc::new(Mutex::new(BTreeMap::new())),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The node agent's Delegated Identity API.
    pub fn agent(&self) -> &Arc<DelegatedApiStandIn> {
        &self.agent
    }

    /// The bundle endpoint.
    pub fn endpoint(&self) -> &Arc<BundleEndpoint> {
        &self.endpoint
    }

    /// The CA that signs now.
    pub fn signing_ca(&self) -> Arc<TrustDomainCa> {
        Arc::clone(self.cas.lock().expect("cas").last().expect("a CA"))
    }

    /// The roots of this trust domain's bundle.
    pub fn roots(&self) -> Vec<Vec<u8>> {
        self.cas
            .lock()
            .expect("cas")
            .iter()
            .map(|ca| ca.root_der().to_vec())
            .collect()
    }

    /// Registers workload `pid` as `spiffe_id`, federating with `federates_with`.
    pub fn register(&self, pid: u32, spiffe_id: &str, federates_with: &[&str]) -> IssuedSvid {
        self.agent
            .register(pid, &self.signing_ca(), spiffe_id, federates_with)
    }

    /// Federates with `peer` (bare trust domain): `bootstrap` is the bundle the
    /// operator set once (`trustDomainBundle`); from then on the peer's bundle
    /// endpoint at `peer_endpoint` is polled every refresh interval.
    pub fn federate_with(&self, peer: &str, peer_endpoint: SocketAddr, bootstrap: Vec<Vec<u8>>) {
        self.agent.set_bundle(peer, bootstrap.clone());
        let (agent, polls, refresh) = (
            Arc::clone(&self.agent),
            Arc::clone(&self.polls),
            self.refresh,
        );
        let peer_td = peer.to_string();
        let task = tokio::spawn(async move {
            let endpoint_id = server_id(&peer_td);
            let mut held = bootstrap;
            let mut wait = refresh;
            loop {
                tokio::time::sleep(wait).await;
                let fetched =
                    bundle_endpoint::fetch(peer_endpoint, &endpoint_id, &held, refresh).await;
                let mut polls = polls.lock().expect("polls");
                let stats = polls.entry(peer_td.clone()).or_default();
                match fetched {
                    Ok(bundle) => {
                        stats.ok += 1;
                        // As SPIRE: the publisher's refresh hint, if sooner than ours.
                        wait = match bundle.refresh_hint {
                            hint if hint.is_zero() => refresh,
                            hint => hint.min(refresh),
                        };
                        if bundle.roots != held {
                            held = bundle.roots;
                            agent.set_bundle(&peer_td, held.clone());
                        }
                    }
                    Err(error) => {
                        stats.failed += 1;
                        stats.last_error = Some(error.to_string());
                    }
                }
            }
        });
        if let Some(old) = self
            .pollers
            .lock()
            .expect("pollers")
            .insert(peer.to_string(), task)
        {
            old.abort();
        }
    }

    /// Ends the federation with `peer` on purpose: polling stops, its bundle is
    /// deleted and no workload federates with it any more.
    pub fn remove_federation(&self, peer: &str) {
        if let Some(task) = self.pollers.lock().expect("pollers").remove(peer) {
            task.abort();
        }
        self.agent.update(|state| {
            state.bundles.remove(peer);
            for entry in state.workloads.values_mut() {
                entry.federates_with.remove(peer);
            }
        });
    }

    /// Poll statistics for `peer`'s bundle endpoint.
    pub fn polls(&self, peer: &str) -> PollStats {
        self.polls
            .lock()
            .expect("polls")
            .get(peer)
            .cloned()
            .unwrap_or_default()
    }

    fn publish_own_bundle(&self) {
        let roots = self.roots();
        self.agent.set_bundle(&self.trust_domain, roots.clone());
        let sequence = self.endpoint.published().sequence + 1;
        self.endpoint.publish(PublishedBundle {
            roots,
            sequence,
            refresh_hint: self.refresh,
        });
    }

    /// Rotation, step 1: the next root CA joins the bundle (nothing signs with it yet).
    pub fn prepare_ca_rotation(&self) -> Arc<TrustDomainCa> {
        let next = Arc::new(self.signing_ca().successor());
        self.cas.lock().expect("cas").push(Arc::clone(&next));
        self.publish_own_bundle();
        next
    }

    /// Rotation, step 2: every workload and the bundle endpoint get SVIDs from the new CA.
    pub fn activate_next_ca(&self) {
        let ca = self.signing_ca();
        self.agent.reissue_all(&ca);
        self.endpoint
            .present(ca.issue_svid(&server_id(&self.trust_domain), self.svid_ttl));
    }

    /// Rotation, step 3: the old roots leave the bundle.
    pub fn retire_old_ca(&self) {
        self.cas.lock().expect("cas").drain(..1);
        self.publish_own_bundle();
    }

    /// Stops the server and the agent (an outage): the bundle endpoint drops
    /// connections, the admin socket goes away.
    pub async fn stop(&self) {
        self.endpoint.set_serving(false);
        self.agent.stop_serving().await;
    }

    /// Starts them again.
    pub fn resume(&self) {
        self.agent.start_serving();
        self.endpoint.set_serving(true);
    }
}

impl Drop for SpireStandIn {
    fn drop(&mut self) {
        for task in self.pollers.lock().expect("pollers").values() {
            task.abort();
        }
    }
}
