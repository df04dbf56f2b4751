//! Node mode: every Envoy on the node gets its *own* identity, from the SPIRE
//! agent's Delegated Identity API (its admin socket).
//!
//! - **Who is calling** comes from the connection, never from what it sends:
//!   the peer's process, pinned by a pidfd at accept ([`crate::peer`]).
//! - **One subscription per workload** (`SubscribeToX509SVIDs` for its PID),
//!   shared by all of its streams (Envoy opens one per secret name) and ended
//!   when the last of them closes ([`WorkloadLease`]). Its task is the only
//!   writer of that workload's snapshots — an [`IdentityOwner`] of its own, so
//!   expiry, last-good-on-failure and render-once work as in per-pod mode.
//! - **The PID is attested once, when the subscription starts**: every update
//!   is checked against the pidfd, and the subscription ends (and its SVIDs are
//!   withdrawn) the moment the process exits, so a reused PID is never served
//!   a dead workload's SVID. A later connection from a new process starts a
//!   new subscription.
//! - **An unregistered PID is not an error**: the agent first sends an update
//!   without SVIDs and pushes them on the same stream once an entry matches.
//!   Such a workload is served nothing — never another workload's SVID — and
//!   this is logged and counted.
//! - **One bundle subscription per server** (`SubscribeToX509Bundles`). It
//!   carries every bundle the agent holds and never signals a removal, so each
//!   workload's trust is built from its own trust domain plus the
//!   `federates_with` of its own SVID update: removing a federation reaches
//!   Envoy, and each workload trusts exactly its federation.
//!
//! Everything the agent sends is parsed and checked before use: SPIFFE IDs
//! against the leaf's URI SAN, keys against certificates, bundle keys as
//! trust-domain names, counts against bounds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use spire_api::pb::spire::api::agent::delegatedidentity::v1::{
    delegated_identity_client::DelegatedIdentityClient, SubscribeToX509BundlesRequest,
    SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest, SubscribeToX509sviDsResponse,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tracing::{debug, error, info, warn, Instrument};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::metrics::Metrics;
use crate::peer::ProcessHandle;
use crate::published::Published;
use crate::render::SecretNames;
use crate::snapshot::{IdentitySnapshot, PrivateKeyDer, SnapshotError, Svid, TrustBundle};
use crate::source::{sleep_until, Backoff, IdentityOwner};
use crate::workload::{Delegation, Event, Note, WorkloadState};

/// Most trust domains one bundle update may carry.
pub const MAX_TRUST_DOMAINS: usize = 1024;
/// Most CA certificates one trust domain's bundle may carry.
pub const MAX_CAS_PER_TRUST_DOMAIN: usize = 64;
/// Most SVIDs one workload update may carry.
pub const MAX_SVIDS_PER_WORKLOAD: usize = 32;

/// Where and how to reach the SPIRE agent's admin socket.
#[derive(Clone, Debug)]
pub struct DelegatedConfig {
    /// Endpoint address: `unix:/path`, `unix:///path` or a bare absolute path.
    pub endpoint: String,
    /// First retry delay after a failure.
    pub min_backoff: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
}

pub use crate::workload::{BundleSet, WorkloadUpdate};

/// Why an agent message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgentDataError {
    /// A bundle key or `federates_with` entry is not a trust domain.
    #[error("{field}: {value:?} is not a trust domain name")]
    TrustDomain {
        /// The field at fault.
        field: &'static str,
        /// The offending value (cut to 64 bytes).
        value: String,
    },
    /// More entries than the bound.
    #[error("{field}: {count} entries; at most {max}")]
    TooMany {
        /// The field at fault.
        field: &'static str,
        /// Entries received.
        count: usize,
        /// The bound.
        max: usize,
    },
    /// A certificate does not parse.
    #[error("{field}: {reason}")]
    Certificate {
        /// The field at fault.
        field: &'static str,
        /// The parser's explanation.
        reason: String,
    },
    /// An SVID's claimed SPIFFE ID is not the one in its certificate.
    #[error("x509_svids.x509_svid.id: {claimed:?} is not the URI SAN of its certificate")]
    IdMismatch {
        /// The ID the message claimed.
        claimed: String,
    },
    /// An SVID failed the snapshot's checks.
    #[error(transparent)]
    Svid(#[from] SnapshotError),
}

impl AgentDataError {
    /// A short, bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TrustDomain { .. } => "bad_trust_domain",
            Self::TooMany { .. } => "too_many",
            Self::Certificate { .. } => "bad_certificate",
            Self::IdMismatch { .. } => "id_mismatch",
            Self::Svid(error) => error.label(),
        }
    }
}

/// A trust-domain name as Envoy's SPIFFE validator wants it, from `spiffe://td` or `td`.
pub fn trust_domain_name(field: &'static str, raw: &str) -> Result<String, AgentDataError> {
    let name = raw.strip_prefix("spiffe://").unwrap_or(raw);
    let valid = !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if valid {
        Ok(name.to_string())
    } else {
        let mut value: String = raw.chars().take(64).collect();
        if value.len() < raw.len() {
            value.push('…');
        }
        Err(AgentDataError::TrustDomain { field, value })
    }
}

/// Splits concatenated DER certificates, checking each parses.
pub fn split_certificates(
    field: &'static str,
    mut der: &[u8],
    max: usize,
) -> Result<Vec<Vec<u8>>, AgentDataError> {
    let mut certificates = Vec::new();
    while !der.is_empty() {
        if certificates.len() == max {
            return Err(AgentDataError::TooMany {
                field,
                count: certificates.len().saturating_add(1),
                max,
            });
        }
        let (rest, _) =
            X509Certificate::from_der(der).map_err(|e| AgentDataError::Certificate {
                field,
                reason: e.to_string(),
            })?;
        // `rest` is what follows this certificate in `der`.
        let (certificate, _) = der.split_at(der.len().saturating_sub(rest.len()));
        certificates.push(certificate.to_vec());
        der = rest;
    }
    Ok(certificates)
}

/// Parses one `SubscribeToX509Bundles` update.
pub fn parse_bundles(
    response: &SubscribeToX509BundlesResponse,
) -> Result<BundleSet, AgentDataError> {
    if response.ca_certificates.len() > MAX_TRUST_DOMAINS {
        return Err(AgentDataError::TooMany {
            field: "ca_certificates",
            count: response.ca_certificates.len(),
            max: MAX_TRUST_DOMAINS,
        });
    }
    let mut bundles = BundleSet::new();
    for (key, der) in &response.ca_certificates {
        let td = trust_domain_name("ca_certificates", key)?;
        let roots_der = split_certificates("ca_certificates", der, MAX_CAS_PER_TRUST_DOMAIN)?;
        if roots_der.is_empty() {
            continue;
        }
        if bundles
            .insert(td.clone(), TrustBundle { roots_der })
            .is_some()
        {
            return Err(AgentDataError::TrustDomain {
                field: "ca_certificates",
                value: format!("{td} (twice)"),
            });
        }
    }
    Ok(bundles)
}

/// The single SPIFFE ID in a leaf's URI SANs.
fn leaf_spiffe_id(der: &[u8]) -> Result<String, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut ids = Vec::new();
    for extension in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    ids.push(uri.to_string());
                }
            }
        }
    }
    match ids.as_slice() {
        [one] if one.starts_with("spiffe://") => Ok(one.clone()),
        _ => Err(format!(
            "{} URI SANs; an X.509-SVID has exactly one SPIFFE ID",
            ids.len()
        )),
    }
}

/// Parses one `SubscribeToX509SVIDs` update.
pub fn parse_workload_update(
    response: &SubscribeToX509sviDsResponse,
) -> Result<WorkloadUpdate, AgentDataError> {
    if response.x509_svids.len() > MAX_SVIDS_PER_WORKLOAD {
        return Err(AgentDataError::TooMany {
            field: "x509_svids",
            count: response.x509_svids.len(),
            max: MAX_SVIDS_PER_WORKLOAD,
        });
    }
    if response.federates_with.len() > MAX_TRUST_DOMAINS {
        return Err(AgentDataError::TooMany {
            field: "federates_with",
            count: response.federates_with.len(),
            max: MAX_TRUST_DOMAINS,
        });
    }
    let mut svids = Vec::with_capacity(response.x509_svids.len());
    for with_key in &response.x509_svids {
        let svid = with_key
            .x509_svid
            .as_ref()
            .ok_or(AgentDataError::Certificate {
                field: "x509_svids.x509_svid",
                reason: "missing".into(),
            })?;
        let chain: Vec<Vec<u8>> = svid.cert_chain.iter().map(|c| c.to_vec()).collect();
        let leaf = chain.first().ok_or(AgentDataError::Certificate {
            field: "x509_svids.x509_svid.cert_chain",
            reason: "empty".into(),
        })?;
        let in_certificate =
            leaf_spiffe_id(leaf).map_err(|reason| AgentDataError::Certificate {
                field: "x509_svids.x509_svid.cert_chain",
                reason,
            })?;
        let claimed = svid
            .id
            .as_ref()
            .map(|id| format!("spiffe://{}{}", id.trust_domain, id.path))
            .unwrap_or_default();
        if claimed != in_certificate {
            return Err(AgentDataError::IdMismatch {
                claimed: claimed.chars().take(256).collect(),
            });
        }
        let key = PrivateKeyDer::new(with_key.x509_svid_key.to_vec());
        svids.push(Svid::new(in_certificate, chain, key)?);
    }
    let federates_with = response
        .federates_with
        .iter()
        .map(|td| trust_domain_name("federates_with", td))
        .collect::<Result<_, _>>()?;
    Ok(WorkloadUpdate {
        svids,
        federates_with,
    })
}

/// How long a `FetchSecrets` call waits for the agent's first answer about its workload.
pub const FETCH_FIRST_ANSWER_WAIT: Duration = Duration::from_secs(5);
/// How long a workload's subscription outlives the `FetchSecrets` call that
/// opened it, so that repeated calls reuse one subscription (one attestation).
pub const FETCH_LINGER: Duration = Duration::from_secs(30);

/// The node's identity source: the bundle subscription and every attested workload.
#[derive(Debug)]
pub struct NodeIdentities {
    config: DelegatedConfig,
    names: SecretNames,
    metrics: Arc<Metrics>,
    channel: tokio::sync::Mutex<Option<Channel>>,
    delegation: watch::Receiver<Delegation>,
    workloads: Mutex<HashMap<u32, Weak<WorkloadLease>>>,
}

/// One attested workload, held by each of its streams; the subscription
/// ends when the last holder drops it. At most one per live process.
#[derive(Debug)]
pub struct WorkloadLease {
    process: Arc<ProcessHandle>,
    snapshots: watch::Receiver<Arc<Published>>,
    settled: watch::Receiver<bool>,
    task: JoinHandle<()>,
    node: Weak<NodeIdentities>,
}

impl WorkloadLease {
    /// The workload's snapshots.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Published>> {
        self.snapshots.clone()
    }

    /// The workload's PID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits (at most `wait`) until the agent has answered for this workload
    /// once — with SVIDs or without; whether it did.
    pub async fn first_answer(&self, wait: Duration) -> bool {
        let mut settled = self.settled.clone();
        tokio::time::timeout(wait, settled.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl Drop for WorkloadLease {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(node) = self.node.upgrade() {
            node.metrics.workloads.dec();
            let mut workloads = node.workloads.lock().unwrap_or_else(|e| e.into_inner());
            let pid = self.process.pid();
            // Only our own entry: a newer process may hold the PID by now.
            if workloads.get(&pid).is_some_and(|w| w.strong_count() == 0) {
                workloads.remove(&pid);
            }
            info!(pid, "workload's last SDS stream closed; subscription ended");
        }
    }
}

/// What the admin endpoint shows of one attested workload (never a key).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkloadReport {
    /// The workload's PID.
    pub pid: u32,
    /// SPIFFE ID of the default SVID served, if any.
    pub spiffe_id: Option<String>,
    /// Serial of the default SVID served, hex.
    pub serial: Option<String>,
    /// Trust domains whose bundles the workload receives.
    pub trust_domains: Vec<String>,
    /// SHA-256 (hex) of each root served, per trust domain (what `doctor` compares).
    #[serde(default)]
    pub trust_bundles: std::collections::BTreeMap<String, Vec<String>>,
    /// Open SDS streams of the workload.
    pub streams: usize,
}

impl NodeIdentities {
    /// Starts the bundle subscription; `node_tx` receives the bundle-only node snapshot.
    pub fn start(
        config: DelegatedConfig,
        names: SecretNames,
        metrics: Arc<Metrics>,
        node_tx: watch::Sender<Arc<Published>>,
    ) -> (Arc<Self>, JoinHandle<()>) {
        let (delegation_tx, delegation) = watch::channel(Delegation::Pending);
        let node = Arc::new(Self {
            config,
            names,
            metrics,
            channel: tokio::sync::Mutex::new(None),
            delegation,
            workloads: Mutex::new(HashMap::new()),
        });
        let node_owner = IdentityOwner::new(node_tx, node.names.clone(), Arc::clone(&node.metrics));
        let task = tokio::spawn(run_bundles(Arc::clone(&node), delegation_tx, node_owner));
        (node, task)
    }

    /// A gRPC client on the one shared channel to the agent (connected on first use;
    /// tonic reconnects it when the agent restarts).
    async fn client(&self) -> Result<DelegatedIdentityClient<Channel>, String> {
        let mut channel = self.channel.lock().await;
        if let Some(channel) = channel.as_ref() {
            return Ok(DelegatedIdentityClient::new(channel.clone()));
        }
        let endpoint = spiffe::transport::Endpoint::parse(&crate::source::normalize_endpoint(
            &self.config.endpoint,
        ))
        .map_err(|e| e.to_string())?;
        let connected = spiffe::transport::connector::connect(&endpoint)
            .await
            .map_err(|e| e.to_string())?;
        *channel = Some(connected.clone());
        Ok(DelegatedIdentityClient::new(connected))
    }

    /// The lease on `process`'s identity: the running subscription of that
    /// very process, or a new one. `None` when the process has already exited,
    /// or when a live lease for its PID belongs to another process.
    pub fn attach(self: &Arc<Self>, process: &Arc<ProcessHandle>) -> Option<Arc<WorkloadLease>> {
        if process.has_exited() {
            return None;
        }
        let pid = process.pid();
        // Declared before the guard so that it drops after it: dropping a
        // lease takes the same lock.
        let stale: Option<Arc<WorkloadLease>>;
        let mut workloads = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = workloads.get(&pid).and_then(Weak::upgrade) {
            if !existing.process.has_exited() {
                if existing.process.is_same_process(process) {
                    return Some(existing);
                }
                // Two live handles on one PID that name different processes:
                // one of them is not what it claims. Serve neither a stranger's SVID.
                drop(workloads);
                self.metrics.attestation_failed("pid_mismatch");
                warn!(
                    pid,
                    "a live workload already holds this PID with another start time; refused"
                );
                return None;
            }
            stale = Some(existing);
        } else {
            stale = None;
        }
        let (tx, snapshots) = watch::channel(Arc::new(Published::now(
            IdentitySnapshot::default(),
            &self.names,
        )));
        let (settled_tx, settled) = watch::channel(false);
        let owner = IdentityOwner::new(tx, self.names.clone(), Arc::clone(&self.metrics));
        let span = tracing::info_span!("workload", pid);
        let task = tokio::spawn(
            run_workload(Arc::clone(self), Arc::clone(process), owner, settled_tx).instrument(span),
        );
        let lease = Arc::new(WorkloadLease {
            process: Arc::clone(process),
            snapshots,
            settled,
            task,
            node: Arc::downgrade(self),
        });
        workloads.insert(pid, Arc::downgrade(&lease));
        drop(workloads);
        drop(stale);
        self.metrics.workloads.inc();
        self.metrics.workload_subscriptions.inc();
        Some(lease)
    }

    /// Every attested workload with the identity it is served, by PID.
    pub fn report(&self) -> Vec<WorkloadReport> {
        // Upgraded under the lock, read (and dropped) outside it: dropping a
        // lease takes the same lock.
        let leases: Vec<(usize, Arc<WorkloadLease>)> = {
            let workloads = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
            workloads
                .values()
                .filter_map(|lease| Some((lease.strong_count(), lease.upgrade()?)))
                .collect()
        };
        let mut reports: Vec<WorkloadReport> = leases
            .iter()
            .map(|(streams, lease)| {
                let published = Arc::clone(&lease.snapshots.borrow());
                let svid = published.snapshot.default_svid();
                WorkloadReport {
                    pid: lease.pid(),
                    spiffe_id: svid.map(|s| s.spiffe_id.clone()),
                    serial: svid.map(|s| s.leaf.serial_hex.clone()),
                    trust_domains: published.snapshot.bundles.keys().cloned().collect(),
                    trust_bundles: published
                        .snapshot
                        .bundles
                        .iter()
                        .map(|(td, bundle)| {
                            let roots = bundle
                                .roots_der
                                .iter()
                                .map(|der| hex::encode(sha2::Sha256::digest(der)))
                                .collect();
                            (td.clone(), roots)
                        })
                        .collect(),
                    streams: *streams,
                }
            })
            .collect();
        reports.sort_by_key(|r| r.pid);
        reports
    }

    fn attestation_failed(&self, reason: &'static str) {
        self.metrics.attestation_failed(reason);
    }

    /// Counts and logs what a workload's state machine reported.
    fn report_notes(&self, notes: &[Note]) {
        for note in notes {
            match note {
                Note::Attested(spiffe_id) => info!(%spiffe_id, "workload attested"),
                Note::Unregistered => {
                    self.attestation_failed("no_identity");
                    warn!("no registration entry matches this process; it is served no SVID until one does");
                }
                Note::Withdrawn => {
                    self.attestation_failed("withdrawn");
                    warn!("SPIRE withdrew this workload's identity (its entry was deleted or no longer matches); it is served nothing");
                }
                Note::Denied => {
                    self.attestation_failed("permission_denied");
                    warn!("the agent refuses this server as a delegate; the workload is served nothing");
                }
                Note::DefaultExpired => warn!("the default X.509-SVID expired; no default is served until SPIRE sends a new one"),
                Note::WithoutBundle(count) => {
                    self.metrics.reject("no_bundle");
                    warn!(count, "SVIDs whose trust domain has no bundle on this node are not served");
                }
                Note::Exited => {
                    self.attestation_failed("process_exited");
                    info!("workload process exited; its SVIDs are withdrawn");
                }
            }
        }
    }
}

/// The bundle subscription: parses every update and publishes the node's
/// delegation to the workloads (and, bundle-only, as the node snapshot for
/// readiness and metrics). Outages keep the last bundles; `PermissionDenied`
/// (or an agent in another PID namespace) revokes everything.
async fn run_bundles(
    node: Arc<NodeIdentities>,
    delegation_tx: watch::Sender<Delegation>,
    node_owner: IdentityOwner,
) {
    let mut backoff = Backoff::new(node.config.min_backoff, node.config.max_backoff);
    let mut down_logged = false;
    let revoke = |label: &'static str| {
        node.metrics.delegated_api_connected.set(0);
        node.attestation_failed(label);
        delegation_tx.send_if_modified(|current| {
            let changed = *current != Delegation::Revoked;
            *current = Delegation::Revoked;
            changed
        });
        node_owner.publish(IdentitySnapshot::default());
    };
    loop {
        if let Err(reason) = crate::peer::check_agent_pid_namespace(&node.config.endpoint).await {
            error!(%reason, "the SPIRE agent cannot attest this node's PIDs; serving nothing");
            revoke("pid_namespace");
            tokio::time::sleep(node.config.max_backoff).await;
            continue;
        }
        let ended = match subscribe_bundles(&node).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(response)) => match parse_bundles(&response) {
                        Ok(bundles) => {
                            if down_logged || node.metrics.delegated_api_connected.get() == 0 {
                                info!(
                                    trust_domains = bundles.len(),
                                    "SPIRE Delegated Identity API: bundles received"
                                );
                                down_logged = false;
                            }
                            node.metrics.delegated_api_connected.set(1);
                            backoff.reset();
                            let granted = Delegation::Granted(Arc::new(bundles));
                            let snapshot = IdentitySnapshot {
                                bundles: match &granted {
                                    Delegation::Granted(b) => (**b).clone(),
                                    _ => Default::default(),
                                },
                                ..IdentitySnapshot::default()
                            };
                            delegation_tx.send_if_modified(|current| {
                                let changed = *current != granted;
                                *current = granted;
                                changed
                            });
                            node_owner.publish(snapshot);
                        }
                        Err(error) => {
                            node.metrics.reject(error.label());
                            warn!(%error, "the agent sent unusable bundles; keeping the last good ones");
                        }
                    },
                    Ok(None) => break Err("the agent closed the bundle stream".to_string()),
                    Err(status) => break Ok(status),
                }
            },
            Err(Ok(status)) => Ok(status),
            Err(Err(reason)) => Err(reason),
        };
        let reason = match ended {
            Ok(status) if status.code() == tonic::Code::PermissionDenied => {
                error!(reason = %status.message(), "the SPIRE agent refuses this server as a delegate (authorized_delegates); serving nothing until it accepts it again");
                revoke("permission_denied");
                down_logged = true;
                tokio::time::sleep(node.config.max_backoff).await;
                continue;
            }
            Ok(status) => format!("{}: {}", status.code(), status.message()),
            Err(reason) => reason,
        };
        node.metrics.delegated_api_connected.set(0);
        node.metrics.reject("delegated_bundles_unavailable");
        if !down_logged {
            warn!(endpoint = %node.config.endpoint, %reason, "SPIRE Delegated Identity API (bundles) unavailable; keeping the last bundles, retrying with backoff");
            down_logged = true;
        } else {
            debug!(%reason, "Delegated Identity API still unavailable");
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Opens the bundle stream: `Err(Ok(status))` when the agent answered with an
/// error, `Err(Err(reason))` when it could not be reached.
async fn subscribe_bundles(
    node: &NodeIdentities,
) -> Result<tonic::Streaming<SubscribeToX509BundlesResponse>, Result<tonic::Status, String>> {
    let mut client = node.client().await.map_err(Err)?;
    client
        .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(Ok)
}

/// One workload, until its process exits or its last stream closes: the I/O
/// loop around its [`WorkloadState`], the only writer of its snapshots.
async fn run_workload(
    node: Arc<NodeIdentities>,
    process: Arc<ProcessHandle>,
    owner: IdentityOwner,
    settled: watch::Sender<bool>,
) {
    let mut delegation = node.delegation.clone();
    let mut state = WorkloadState::new(delegation.borrow_and_update().clone());
    let (events_tx, mut events) = mpsc::channel(4);
    let feeder = AbortOnDrop(tokio::spawn(feed_svids(
        Arc::clone(&node),
        Arc::clone(&process),
        events_tx,
    )));
    let mut feeding = true;
    loop {
        let wake = state.next_expiry(SystemTime::now());
        let event = tokio::select! {
            event = events.recv(), if feeding => match event {
                Some(event) => event,
                // The feeder stops only when the process is gone.
                None => { feeding = false; continue; }
            },
            changed = delegation.changed() => match changed {
                Ok(()) => Event::Node(delegation.borrow_and_update().clone()),
                Err(_) => return,
            },
            () = sleep_until(wake) => Event::Tick,
            () = process.exited() => Event::Exited,
        };
        let exited = event == Event::Exited;
        let outcome = state.handle(event, SystemTime::now());
        node.report_notes(&outcome.notes);
        owner.publish(outcome.publish);
        if outcome.settled {
            settled.send_if_modified(|s| !std::mem::replace(s, true));
        }
        if exited {
            drop(feeder);
            return;
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why one SVID subscription ended.
enum Ended {
    /// The process exited, or nobody listens any more: stop for good.
    Stop,
    /// `PermissionDenied`: the delegate is not (or no longer) authorized.
    Denied(String),
    /// The agent closed the stream or failed; retried.
    Failed(&'static str, String),
}

/// Feeds the workload's SVID subscription into `events`, resubscribing with
/// backoff, until the process exits.
async fn feed_svids(
    node: Arc<NodeIdentities>,
    process: Arc<ProcessHandle>,
    events: mpsc::Sender<Event>,
) {
    let mut backoff = Backoff::new(node.config.min_backoff, node.config.max_backoff);
    loop {
        let (event, delay) = match stream_svids(&node, &process, &events, &mut backoff).await {
            Ended::Stop => return,
            Ended::Denied(reason) => {
                warn!(%reason, "the agent refused this workload's subscription (PermissionDenied); retrying at the longest backoff");
                (Event::Denied, node.config.max_backoff)
            }
            Ended::Failed(label, reason) => {
                node.attestation_failed(label);
                warn!(%reason, "workload subscription failed; keeping what SPIRE granted until it expires, retrying with backoff");
                (Event::StreamFailed, backoff.next_delay())
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
        tokio::time::sleep(delay).await;
    }
}

async fn stream_svids(
    node: &NodeIdentities,
    process: &ProcessHandle,
    events: &mpsc::Sender<Event>,
    backoff: &mut Backoff,
) -> Ended {
    let Ok(pid) = i32::try_from(process.pid()) else {
        return Ended::Stop;
    };
    let mut client = match node.client().await {
        Ok(client) => client,
        Err(reason) => return Ended::Failed("unavailable", reason),
    };
    let request = SubscribeToX509sviDsRequest {
        selectors: Vec::new(),
        pid,
    };
    let ended = |status: tonic::Status| match status.code() {
        tonic::Code::PermissionDenied => Ended::Denied(status.message().to_string()),
        _ => Ended::Failed(status_label(&status), status.message().to_string()),
    };
    let mut stream = match client.subscribe_to_x509svi_ds(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return ended(status),
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => {
                return Ended::Failed("stream_closed", "the agent closed the stream".into())
            }
            Err(status) => return ended(status),
        };
        // Attested for this PID: valid only while the pinned process still holds it.
        if process.has_exited() {
            return Ended::Stop;
        }
        backoff.reset();
        match parse_workload_update(&response) {
            Ok(update) => {
                if events.send(Event::Svids(update)).await.is_err() {
                    return Ended::Stop;
                }
            }
            Err(error) => {
                node.metrics.reject(error.label());
                warn!(%error, "the agent sent unusable SVIDs; keeping the last good ones");
            }
        }
    }
}

fn status_label(status: &tonic::Status) -> &'static str {
    match status.code() {
        tonic::Code::PermissionDenied => "permission_denied",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::InvalidArgument => "invalid_argument",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domain_keys_come_in_both_forms_and_nothing_else() {
        assert_eq!(
            trust_domain_name("f", "spiffe://aws.company.com").expect("id form"),
            "aws.company.com"
        );
        assert_eq!(
            trust_domain_name("f", "gcp.company.com").expect("bare"),
            "gcp.company.com"
        );
        for bad in [
            "",
            "spiffe://",
            "spiffe://A.com",
            "spiffe://a.com/path",
            "a b",
            "a\u{ff}",
        ] {
            let error = trust_domain_name("federates_with", bad).expect_err(bad);
            assert!(error.to_string().starts_with("federates_with"), "{error}");
        }
    }

    #[test]
    fn concatenated_der_is_split_and_bounded() {
        let cert = rcgen::generate_simple_self_signed(vec!["a.test".into()])
            .expect("cert")
            .cert;
        let der = cert.der().to_vec();
        let three = [der.clone(), der.clone(), der.clone()].concat();
        assert_eq!(
            split_certificates("ca", &three, 8).expect("three"),
            vec![der.clone(), der.clone(), der.clone()]
        );
        assert!(matches!(
            split_certificates("ca", &three, 2),
            Err(AgentDataError::TooMany { .. })
        ));
        let mut truncated = three.clone();
        truncated.pop();
        assert!(matches!(
            split_certificates("ca", &truncated, 8),
            Err(AgentDataError::Certificate { .. })
        ));
    }
}
