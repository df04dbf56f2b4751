//! A SPIFFE Workload API server standing in for the SPIRE agent.
//!
//! It serves one workload identity on a Unix socket, from a real CA of the
//! workload's trust domain, with the bundles of the trust domains it federates
//! with. Tests (and the demo binary) drive it: rotate now, add or remove a
//! federated bundle, stop and start serving.

pub mod proto;
pub mod service;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::pki::{IssuedSvid, TrustDomainCa};
use crate::unix_server::UnixServer;
use proto::{X509BundlesResponse, X509Svid, X509SvidResponse};
use service::WorkloadApiService;

/// What the agent serves at one moment.
#[derive(Clone, Debug)]
pub struct Material {
    /// The workload's SVID.
    pub svid: IssuedSvid,
    /// Own trust domain name.
    pub trust_domain: String,
    /// Own trust domain roots, DER.
    pub own_roots: Vec<Vec<u8>>,
    /// Federated trust domain → roots, DER.
    pub federated: BTreeMap<String, Vec<Vec<u8>>>,
}

impl Material {
    fn svid_response(&self) -> X509SvidResponse {
        X509SvidResponse {
            svids: vec![X509Svid {
                spiffe_id: self.svid.spiffe_id.clone(),
                x509_svid: self.svid.chain_der(),
                x509_svid_key: self.svid.key_der.clone(),
                bundle: self.own_roots.concat(),
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: self
                .federated
                .iter()
                .map(|(td, roots)| (format!("spiffe://{td}"), roots.concat()))
                .collect(),
        }
    }

    fn bundles_response(&self) -> X509BundlesResponse {
        let mut bundles: std::collections::HashMap<String, Vec<u8>> = self
            .federated
            .iter()
            .map(|(td, roots)| (format!("spiffe://{td}"), roots.concat()))
            .collect();
        bundles.insert(
            format!("spiffe://{}", self.trust_domain),
            self.own_roots.concat(),
        );
        X509BundlesResponse {
            crl: Vec::new(),
            bundles,
        }
    }
}

/// A running stand-in agent for one workload.
pub struct WorkloadApiStandIn {
    server: UnixServer,
    ca: Arc<TrustDomainCa>,
    spiffe_id: String,
    svid_ttl: Duration,
    material: watch::Sender<Option<Arc<Material>>>,
}

impl std::fmt::Debug for WorkloadApiStandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApiStandIn")
            .field("socket", &self.server.socket())
            .field("spiffe_id", &self.spiffe_id)
            .finish_non_exhaustive()
    }
}

impl WorkloadApiStandIn {
    /// Starts serving `spiffe_id` (issued by `ca`, valid for `svid_ttl`) on `socket`.
    pub async fn start(
        socket: impl AsRef<Path>,
        ca: Arc<TrustDomainCa>,
        spiffe_id: &str,
        svid_ttl: Duration,
    ) -> Arc<Self> {
        let svid = ca.issue_svid(spiffe_id, svid_ttl);
        let material = Material {
            svid,
            trust_domain: ca.trust_domain().to_string(),
            own_roots: vec![ca.root_der().to_vec()],
            federated: BTreeMap::new(),
        };
        let (material, _) = watch::channel(Some(Arc::new(material)));
        let standin = Arc::new(Self {
            server: UnixServer::new(socket.as_ref()),
            ca,
            spiffe_id: spiffe_id.to_string(),
            svid_ttl,
            material,
        });
        standin.start_serving();
        standin
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        self.server.socket()
    }

    /// The endpoint URI (`unix:/…`).
    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.server.socket().display())
    }

    /// The SVID currently served.
    pub fn current_svid(&self) -> IssuedSvid {
        self.current().svid.clone()
    }

    fn current(&self) -> Arc<Material> {
        self.material
            .borrow()
            .clone()
            .expect("material is always set")
    }

    /// Changes what is served (tests use it to serve broken material).
    pub fn update(&self, change: impl FnOnce(&mut Material)) {
        let mut next = (*self.current()).clone();
        change(&mut next);
        self.material.send_replace(Some(Arc::new(next)));
    }

    /// Issues a new SVID (new key, new serial) and pushes it; returns it.
    pub fn rotate_now(&self) -> IssuedSvid {
        let svid = self.ca.issue_svid(&self.spiffe_id, self.svid_ttl);
        self.update(|m| m.svid = svid.clone());
        svid
    }

    /// Serves an SVID of this exact material (e.g. one about to expire).
    pub fn serve_svid(&self, svid: IssuedSvid) {
        self.update(|m| m.svid = svid);
    }

    /// The CA of the workload's trust domain.
    pub fn ca(&self) -> &Arc<TrustDomainCa> {
        &self.ca
    }

    /// Adds (or replaces) `ca`'s trust domain as a federated bundle.
    pub fn federate_with(&self, ca: &TrustDomainCa) {
        let td = ca.trust_domain().to_string();
        let root = ca.root_der().to_vec();
        self.update(|m| {
            m.federated.insert(td, vec![root]);
        });
    }

    /// Removes the federated bundle of `trust_domain`.
    pub fn remove_federation(&self, trust_domain: &str) {
        self.update(|m| {
            m.federated.remove(trust_domain);
        });
    }

    /// Stops serving: open streams end with `Unavailable` and the socket is removed.
    pub async fn stop_serving(&self) {
        self.server.stop().await;
    }

    /// (Re)starts serving on the socket.
    pub fn start_serving(&self) {
        let service = WorkloadApiService::new(self.material.subscribe(), self.server.serving());
        self.server.start(service);
    }

    /// Rotates every `interval` until the returned task is aborted.
    pub fn rotate_every(self: &Arc<Self>, interval: Duration) -> JoinHandle<()> {
        let standin = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                standin.rotate_now();
            }
        })
    }
}
