//! The SPIRE agent's Delegated Identity API (its admin socket), standing in
//! for a node's agent: what trustweave-sds in node mode talks to.
//!
//! It behaves as SPIRE's agent does (SPIRE semantics, with their sources):
//! - `pkg/agent/api/delegatedidentity/v1/service.go`: the delegate is
//!   re-authorized on every update (`isCallerAuthorized` with its cached
//!   selectors), so removing it from `authorized_delegates` ends its open
//!   streams with `PermissionDenied`;
//! - `pkg/agent/manager/cache/lru_cache.go` (subscribers): a deleted entry,
//!   or selectors that stop matching, reach the open stream as an update with
//!   an *empty* `x509_svids`;
//! - `SubscribeToX509SVIDs` attests the PID once, when the subscription
//!   starts, and matches entries against those selectors for the stream's
//!   life (here: the PID and the process's UID, `unix:uid:N`, read at start);
//! - the **caller** (the delegate) is attested on every call, by the PID the
//!   kernel reports for the admin-socket connection; its SPIFFE ID must be in
//!   `authorized_delegates`, else `PermissionDenied`;
//! - a request carries exactly one of selectors or a non-zero PID
//!   (`InvalidArgument` otherwise); a PID with no process fails attestation
//!   (`Unavailable`, "workload attestation failed");
//! - `SubscribeToX509SVIDs` for a PID no entry matches opens and first sends
//!   an update with no SVIDs, then pushes them on the same stream once the
//!   test registers the PID; `federates_with` and bundle keys are `spiffe://<td>`;
//! - `SubscribeToX509Bundles` carries every bundle the agent holds and never
//!   signals a removal (keys are only overwritten until the stream reopens).
//!
//! The test controls the PID → identity map, rotation, federation and outages.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use spire_api::pb::spire::api::agent::delegatedidentity::v1::{
    SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest,
    SubscribeToX509sviDsResponse, X509svidWithKey,
};
use spire_api::pb::spire::api::types::{Spiffeid, X509svid};
use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, StdError};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::pki::{IssuedSvid, TrustDomainCa};
use crate::unix_server::UnixServer;
use crate::workload_api::service::async_stream;

/// The gRPC service name.
pub const SERVICE_NAME: &str = "spire.api.agent.delegatedidentity.v1.DelegatedIdentity";

/// One registered workload: the CA that issues its SVID and what it federates with.
#[derive(Clone, Debug)]
pub struct WorkloadEntry {
    /// Its SVIDs, in order (the first is the default).
    pub svids: Vec<IssuedSvid>,
    /// The CA of its trust domain (for rotation).
    pub ca: Arc<TrustDomainCa>,
    /// Bare trust-domain names it federates with.
    pub federates_with: BTreeSet<String>,
}

/// Everything the agent holds at one moment.
#[derive(Clone, Debug, Default)]
pub struct AgentState {
    /// Caller PID → SPIFFE ID (how the agent attests delegates).
    pub callers: BTreeMap<u32, String>,
    /// SPIFFE IDs allowed to use the API (`authorized_delegates`).
    pub authorized_delegates: BTreeSet<String>,
    /// Workload PID → entry.
    pub workloads: BTreeMap<u32, WorkloadEntry>,
    /// Entries selected by the workload's UID (`unix:uid:N`), matched with
    /// the UID read when its subscription started.
    pub uid_entries: BTreeMap<u32, WorkloadEntry>,
    /// Fault: SVID subscriptions fail with `Unavailable` (open ones end)
    /// while bundles keep flowing — the agent still "waiting for SVID to get cached".
    pub svids_unavailable: bool,
    /// Bare trust-domain name → roots (DER).
    pub bundles: BTreeMap<String, Vec<Vec<u8>>>,
}

impl AgentState {
    fn svid_response(&self, pid: u32, uid: Option<u32>) -> SubscribeToX509sviDsResponse {
        let entry = self
            .workloads
            .get(&pid)
            .or_else(|| uid.and_then(|uid| self.uid_entries.get(&uid)));
        let Some(entry) = entry else {
            return SubscribeToX509sviDsResponse::default();
        };
        SubscribeToX509sviDsResponse {
            x509_svids: entry.svids.iter().map(svid_with_key).collect(),
            federates_with: entry
                .federates_with
                .iter()
                .map(|td| format!("spiffe://{td}"))
                .collect(),
        }
    }

    fn authorize(&self, caller_pid: Option<i32>) -> Result<(), Status> {
        let id = caller_pid
            .and_then(|pid| u32::try_from(pid).ok())
            .and_then(|pid| self.callers.get(&pid));
        match id {
            None => Err(Status::permission_denied("no identity issued")),
            Some(id) if self.authorized_delegates.contains(id) => Ok(()),
            Some(_) => Err(Status::permission_denied(
                "caller not configured as an authorized delegate",
            )),
        }
    }
}

fn svid_with_key(svid: &IssuedSvid) -> X509svidWithKey {
    let rest = svid.spiffe_id.strip_prefix("spiffe://").expect("SPIFFE ID");
    let (trust_domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let chain = std::iter::once(&svid.leaf_der)
        .chain(&svid.intermediates_der)
        .map(|der| bytes::Bytes::from(der.clone()))
        .collect();
    X509svidWithKey {
        x509_svid: Some(X509svid {
            cert_chain: chain,
            id: Some(Spiffeid {
                trust_domain: trust_domain.to_string(),
                path: path.to_string(),
            }),
            expires_at: 0,
            hint: String::new(),
        }),
        x509_svid_key: bytes::Bytes::from(svid.key_der.clone()),
    }
}

/// A running stand-in of a node's SPIRE agent admin socket.
pub struct DelegatedApiStandIn {
    server: UnixServer,
    svid_ttl: Duration,
    state: watch::Sender<AgentState>,
    svid_subscriptions: Arc<AtomicUsize>,
}

impl std::fmt::Debug for DelegatedApiStandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelegatedApiStandIn")
            .field("socket", &self.server.socket())
            .finish_non_exhaustive()
    }
}

impl DelegatedApiStandIn {
    /// Serves on `socket`. `delegate_pid` is attested as `delegate_id`, which is
    /// the one authorized delegate; the agent holds the bundles of `trust_domains`.
    pub async fn start(
        socket: impl AsRef<Path>,
        delegate_pid: u32,
        delegate_id: &str,
        trust_domains: &[&TrustDomainCa],
        svid_ttl: Duration,
    ) -> Arc<Self> {
        let state = AgentState {
            callers: BTreeMap::from([(delegate_pid, delegate_id.to_string())]),
            authorized_delegates: BTreeSet::from([delegate_id.to_string()]),
            workloads: BTreeMap::new(),
            uid_entries: BTreeMap::new(),
            svids_unavailable: false,
            bundles: trust_domains
                .iter()
                .map(|ca| (ca.trust_domain().to_string(), vec![ca.root_der().to_vec()]))
                .collect(),
        };
        let (state, _) = watch::channel(state);
        let standin = Arc::new(Self {
            server: UnixServer::new(socket.as_ref()),
            svid_ttl,
            state,
            svid_subscriptions: Arc::new(AtomicUsize::new(0)),
        });
        standin.start_serving();
        standin
    }

    /// The endpoint URI (`unix:/…`).
    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.server.socket().display())
    }

    /// Changes what the agent holds.
    pub fn update(&self, change: impl FnOnce(&mut AgentState)) {
        self.state.send_modify(change);
    }

    /// Registers `pid` as `spiffe_id` (issued by `ca`), federating with `federates_with`.
    pub fn register(
        &self,
        pid: u32,
        ca: &Arc<TrustDomainCa>,
        spiffe_id: &str,
        federates_with: &[&str],
    ) -> IssuedSvid {
        let (entry, svid) = self.entry(ca, spiffe_id, federates_with);
        self.update(|state| {
            state.workloads.insert(pid, entry);
        });
        svid
    }

    /// An entry for `spiffe_id` issued by `ca`, and the SVID it holds.
    fn entry(
        &self,
        ca: &Arc<TrustDomainCa>,
        spiffe_id: &str,
        federates_with: &[&str],
    ) -> (WorkloadEntry, IssuedSvid) {
        let svid = ca.issue_svid(spiffe_id, self.svid_ttl);
        let entry = WorkloadEntry {
            svids: vec![svid.clone()],
            ca: Arc::clone(ca),
            federates_with: federates_with.iter().map(|s| s.to_string()).collect(),
        };
        (entry, svid)
    }

    /// Registers every process running as `uid` (`unix:uid:N`) as `spiffe_id`.
    pub fn register_uid(
        &self,
        uid: u32,
        ca: &Arc<TrustDomainCa>,
        spiffe_id: &str,
        federates_with: &[&str],
    ) -> IssuedSvid {
        let (entry, svid) = self.entry(ca, spiffe_id, federates_with);
        self.update(|state| {
            state.uid_entries.insert(uid, entry);
        });
        svid
    }

    /// Deletes `pid`'s entry: its open subscription gets an empty update.
    pub fn delete(&self, pid: u32) {
        self.update(|state| {
            state.workloads.remove(&pid);
        });
    }

    /// Issues `pid` a new SVID (new key, new serial) and pushes it; returns it.
    pub fn rotate(&self, pid: u32) -> IssuedSvid {
        let mut issued = None;
        self.update(|state| {
            let entry = state.workloads.get_mut(&pid).expect("registered PID");
            let id = entry.svids[0].spiffe_id.clone();
            let svid = entry.ca.issue_svid(&id, self.svid_ttl);
            entry.svids[0] = svid.clone();
            issued = Some(svid);
        });
        issued.expect("rotated")
    }

    /// Issues every registered workload a new SVID signed by `ca` (its trust
    /// domain's new CA) and uses `ca` for their rotations from now on.
    pub fn reissue_all(&self, ca: &Arc<TrustDomainCa>) {
        self.update(|state| {
            for entry in state.workloads.values_mut() {
                let id = entry.svids[0].spiffe_id.clone();
                entry.svids[0] = ca.issue_svid(&id, self.svid_ttl);
                entry.ca = Arc::clone(ca);
            }
        });
    }

    /// Sets the roots the agent holds for `trust_domain` (bare name).
    pub fn set_bundle(&self, trust_domain: &str, roots: Vec<Vec<u8>>) {
        self.update(|state| {
            state.bundles.insert(trust_domain.to_string(), roots);
        });
    }

    /// Adds (or replaces) `ca`'s trust domain among the bundles the agent holds.
    pub fn add_bundle(&self, ca: &TrustDomainCa) {
        let (td, root) = (ca.trust_domain().to_string(), ca.root_der().to_vec());
        self.update(|state| {
            state.bundles.insert(td, vec![root]);
        });
    }

    /// The roots the agent holds for `trust_domain` (bare name).
    pub fn bundle(&self, trust_domain: &str) -> Option<Vec<Vec<u8>>> {
        self.state.borrow().bundles.get(trust_domain).cloned()
    }

    /// The serial (lower-case hex) of the SVID `pid` is issued now.
    pub fn svid_serial(&self, pid: u32) -> Option<String> {
        let state = self.state.borrow();
        Some(state.workloads.get(&pid)?.svids.first()?.serial_hex.clone())
    }

    /// Open `SubscribeToX509SVIDs` streams.
    pub fn svid_subscriptions(&self) -> usize {
        self.svid_subscriptions.load(Ordering::SeqCst)
    }

    /// Stops serving: open streams end with `Unavailable`, the socket is removed.
    pub async fn stop_serving(&self) {
        self.server.stop().await;
    }

    /// (Re)starts serving on the socket.
    pub fn start_serving(&self) {
        self.server.start(DelegatedIdentityService {
            state: self.state.subscribe(),
            serving: self.server.serving(),
            svid_subscriptions: Arc::clone(&self.svid_subscriptions),
        });
    }
}

/// The gRPC service over the shared [`AgentState`].
#[derive(Clone)]
struct DelegatedIdentityService {
    state: watch::Receiver<AgentState>,
    serving: watch::Receiver<bool>,
    svid_subscriptions: Arc<AtomicUsize>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Counts an open SVID subscription for as long as it lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(count))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DelegatedIdentityService {
    fn caller_pid<T>(request: &Request<T>) -> Option<i32> {
        request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .and_then(|cred| cred.pid())
    }

    /// Sends `render(state)` whenever it differs from the last sent, until serving stops
    /// or the caller is no longer authorized.
    fn watch_stream<T: Clone + PartialEq + Send + Sync + 'static>(
        &self,
        caller: Option<i32>,
        guard: Option<Counted>,
        mut render: impl FnMut(&AgentState) -> Result<T, Status> + Send + 'static,
    ) -> BoxStream<T> {
        let mut state = self.state.clone();
        let mut serving = self.serving.clone();
        Box::pin(async_stream(move |tx| async move {
            let _guard = guard;
            let mut last: Option<T> = None;
            loop {
                let next = {
                    let current = state.borrow_and_update();
                    current.authorize(caller).and_then(|()| render(&current))
                };
                let next = match next {
                    Ok(next) => next,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                if last.as_ref() != Some(&next) {
                    if tx.send(Ok(next.clone())).await.is_err() {
                        return;
                    }
                    last = Some(next);
                }
                tokio::select! {
                    changed = state.changed() => if changed.is_err() { return },
                    _ = async { serving.wait_for(|s| !*s).await.is_ok() } => {
                        let _ = tx.send(Err(Status::unavailable("agent stopped"))).await;
                        return;
                    }
                    () = tx.closed() => return,
                }
            }
        }))
    }
}

struct SubscribeSvids(DelegatedIdentityService);

impl ServerStreamingService<SubscribeToX509sviDsRequest> for SubscribeSvids {
    type Response = SubscribeToX509sviDsResponse;
    type ResponseStream = BoxStream<SubscribeToX509sviDsResponse>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<SubscribeToX509sviDsRequest>) -> Self::Future {
        let service = self.0.clone();
        let caller = DelegatedIdentityService::caller_pid(&request);
        let request = request.into_inner();
        Box::pin(async move {
            service.state.borrow().authorize(caller)?;
            let pid = match (request.selectors.is_empty(), request.pid) {
                (true, pid) if pid > 0 => pid as u32,
                _ => {
                    return Err(Status::invalid_argument(
                        "exactly one of selectors or a PID must be given",
                    ))
                }
            };
            // Attested once, at the start: the selectors are fixed for the stream's life.
            let Ok(owner) = std::fs::metadata(format!("/proc/{pid}")) else {
                return Err(Status::unavailable("workload attestation failed"));
            };
            let uid = Some(std::os::unix::fs::MetadataExt::uid(&owner));
            if service.state.borrow().svids_unavailable {
                return Err(Status::unavailable("SVIDs not cached yet"));
            }
            let guard = Counted::new(&service.svid_subscriptions);
            Ok(Response::new(service.watch_stream(
                caller,
                Some(guard),
                move |state| {
                    if state.svids_unavailable {
                        return Err(Status::unavailable("SVIDs not cached yet"));
                    }
                    Ok(state.svid_response(pid, uid))
                },
            )))
        })
    }
}

struct SubscribeBundles(DelegatedIdentityService);

impl ServerStreamingService<SubscribeToX509BundlesRequest> for SubscribeBundles {
    type Response = SubscribeToX509BundlesResponse;
    type ResponseStream = BoxStream<SubscribeToX509BundlesResponse>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<SubscribeToX509BundlesRequest>) -> Self::Future {
        let service = self.0.clone();
        let caller = DelegatedIdentityService::caller_pid(&request);
        Box::pin(async move {
            service.state.borrow().authorize(caller)?;
            // As SPIRE: keys are overwritten, never removed, while the stream lives.
            let mut sent: HashMap<String, bytes::Bytes> = HashMap::new();
            Ok(Response::new(service.watch_stream(
                caller,
                None,
                move |state| {
                    for (td, roots) in &state.bundles {
                        sent.insert(format!("spiffe://{td}"), bytes::Bytes::from(roots.concat()));
                    }
                    Ok(SubscribeToX509BundlesResponse {
                        ca_certificates: sent.clone(),
                    })
                },
            )))
        })
    }
}

impl<B> tower::Service<http::Request<B>> for DelegatedIdentityService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let service = self.clone();
        let path = request.uri().path().to_string();
        Box::pin(async move {
            Ok(match path.rsplit('/').next() {
                Some("SubscribeToX509SVIDs") => {
                    Grpc::new(tonic_prost::ProstCodec::default())
                        .server_streaming(SubscribeSvids(service), request)
                        .await
                }
                Some("SubscribeToX509Bundles") => {
                    Grpc::new(tonic_prost::ProstCodec::default())
                        .server_streaming(SubscribeBundles(service), request)
                        .await
                }
                _ => Status::unimplemented("not served by the stand-in").into_http(),
            })
        })
    }
}

impl NamedService for DelegatedIdentityService {
    const NAME: &'static str = SERVICE_NAME;
}
