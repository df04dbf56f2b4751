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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use spire_api::pb::spire::api::agent::delegatedidentity::v1::{
    delegated_identity_client::DelegatedIdentityClient, SubscribeToX509BundlesRequest,
    SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest, SubscribeToX509sviDsResponse,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tracing::{debug, info, warn, Instrument};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::metrics::Metrics;
use crate::peer::ProcessHandle;
use crate::render::SecretNames;
use crate::snapshot::{
    IdentitySnapshot, PrivateKeyDer, Published, SnapshotError, Svid, TrustBundle,
};
use crate::source::{Backoff, IdentityOwner};

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

/// Bundles the agent holds: bare trust-domain name → roots.
pub type BundleSet = BTreeMap<String, TrustBundle>;

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
                count: certificates.len() + 1,
                max,
            });
        }
        let (rest, _) =
            X509Certificate::from_der(der).map_err(|e| AgentDataError::Certificate {
                field,
                reason: e.to_string(),
            })?;
        certificates.push(der[..der.len() - rest.len()].to_vec());
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

/// One workload's SVIDs (in the agent's order; the first is `default`) and federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadUpdate {
    /// The SVIDs.
    pub svids: Vec<Svid>,
    /// Bare names of the trust domains the workload federates with.
    pub federates_with: BTreeSet<String>,
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

/// A workload's snapshot: its SVIDs, with the bundles of its own trust
/// domains and of the trust domains it federates with (and no others).
pub fn workload_snapshot(
    update: &WorkloadUpdate,
    bundles: &BundleSet,
    now: SystemTime,
) -> Result<IdentitySnapshot, SnapshotError> {
    let wanted: BTreeSet<&str> = update
        .svids
        .iter()
        .map(Svid::trust_domain)
        .chain(update.federates_with.iter().map(String::as_str))
        .collect();
    let scoped = bundles
        .iter()
        .filter(|(td, _)| wanted.contains(td.as_str()))
        .map(|(td, bundle)| (td.clone(), bundle.clone()))
        .collect();
    IdentitySnapshot::from_parts(update.svids.clone(), scoped, now)
}

/// The node's identity source: the bundle subscription and every attested workload.
#[derive(Debug)]
pub struct NodeIdentities {
    config: DelegatedConfig,
    names: SecretNames,
    metrics: Arc<Metrics>,
    channel: tokio::sync::Mutex<Option<Channel>>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    workloads: Mutex<HashMap<u32, Weak<WorkloadLease>>>,
}

/// One attested workload, held by each of its streams; the subscription
/// ends when the last holder drops it.
#[derive(Debug)]
pub struct WorkloadLease {
    process: Arc<ProcessHandle>,
    snapshots: watch::Receiver<Arc<Published>>,
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
        let (bundles_tx, bundles) = watch::channel(Arc::new(BundleSet::new()));
        let node = Arc::new(Self {
            config,
            names,
            metrics,
            channel: tokio::sync::Mutex::new(None),
            bundles,
            workloads: Mutex::new(HashMap::new()),
        });
        let node_owner = IdentityOwner::new(node_tx, node.names.clone(), Arc::clone(&node.metrics));
        let task = tokio::spawn(run_bundles(Arc::clone(&node), bundles_tx, node_owner));
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
    /// process, or a new one. `None` when the process has already exited.
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
            // A live process holds its PID: the entry is this very process.
            if !existing.process.has_exited() {
                return Some(existing);
            }
            stale = Some(existing);
        } else {
            stale = None;
        }
        let (tx, snapshots) = watch::channel(Arc::new(Published::now(
            IdentitySnapshot::default(),
            &self.names,
        )));
        let owner = IdentityOwner::new(tx, self.names.clone(), Arc::clone(&self.metrics));
        let span = tracing::info_span!("workload", pid);
        let task = tokio::spawn(
            run_workload(Arc::clone(self), Arc::clone(process), owner).instrument(span),
        );
        let lease = Arc::new(WorkloadLease {
            process: Arc::clone(process),
            snapshots,
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
}

/// Why one workload subscription ended.
enum Ended {
    /// The process exited: never subscribe for its PID again.
    Exited,
    /// The agent closed the stream or failed; retried.
    Failed(&'static str, String),
}

/// The bundle subscription: parses every update and publishes it to the
/// workloads (and, bundle-only, as the node snapshot for readiness and metrics).
async fn run_bundles(
    node: Arc<NodeIdentities>,
    bundles_tx: watch::Sender<Arc<BundleSet>>,
    node_owner: IdentityOwner,
) {
    let mut backoff = Backoff::new(node.config.min_backoff, node.config.max_backoff);
    let mut down_logged = false;
    loop {
        let reason = match subscribe_bundles(&node).await {
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
                            let bundles = Arc::new(bundles);
                            bundles_tx.send_if_modified(|current| {
                                let changed = *current != bundles;
                                *current = Arc::clone(&bundles);
                                changed
                            });
                            let snapshot = IdentitySnapshot {
                                bundles: (*bundles).clone(),
                                ..IdentitySnapshot::default()
                            };
                            node_owner.publish(snapshot);
                        }
                        Err(error) => {
                            node.metrics.reject(error.label());
                            warn!(%error, "the agent sent unusable bundles; keeping the last good ones");
                        }
                    },
                    Ok(None) => break "the agent closed the bundle stream".to_string(),
                    Err(status) => break format!("{}: {}", status.code(), status.message()),
                }
            },
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

async fn subscribe_bundles(
    node: &NodeIdentities,
) -> Result<tonic::Streaming<SubscribeToX509BundlesResponse>, String> {
    let mut client = node.client().await?;
    client
        .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| format!("{}: {}", status.code(), status.message()))
}

/// One workload's subscription, retried until its process exits or its last stream closes.
async fn run_workload(
    node: Arc<NodeIdentities>,
    process: Arc<ProcessHandle>,
    owner: IdentityOwner,
) {
    let mut backoff = Backoff::new(node.config.min_backoff, node.config.max_backoff);
    let mut latest: Option<WorkloadUpdate> = None;
    let mut told_unattested = false;
    let mut bundles = node.bundles.clone();
    loop {
        let attempt = stream_workload(
            &node,
            &process,
            &owner,
            &mut latest,
            &mut bundles,
            &mut told_unattested,
            &mut backoff,
        );
        let ended = tokio::select! {
            ended = owner.expiring_while(attempt) => ended,
            () = process.exited() => Ended::Exited,
        };
        match ended {
            Ended::Exited => return withdraw(&node, &owner),
            Ended::Failed(label, reason) => {
                node.attestation_failed(label);
                let serving = latest.is_some();
                warn!(%reason, serving_last_good = serving, "workload subscription failed; retrying with backoff");
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = owner.expiring_while(tokio::time::sleep(delay)) => {}
            () = process.exited() => return withdraw(&node, &owner),
        }
    }
}

/// The workload's process exited: its SVIDs are withdrawn for good.
fn withdraw(node: &NodeIdentities, owner: &IdentityOwner) {
    info!("workload process exited; its SVIDs are withdrawn");
    owner.publish(IdentitySnapshot::default());
    node.attestation_failed("process_exited");
}

async fn stream_workload(
    node: &NodeIdentities,
    process: &ProcessHandle,
    owner: &IdentityOwner,
    latest: &mut Option<WorkloadUpdate>,
    bundles: &mut watch::Receiver<Arc<BundleSet>>,
    told_unattested: &mut bool,
    backoff: &mut Backoff,
) -> Ended {
    let pid = match i32::try_from(process.pid()) {
        Ok(pid) => pid,
        Err(_) => return Ended::Exited,
    };
    let mut client = match node.client().await {
        Ok(client) => client,
        Err(reason) => return Ended::Failed("unavailable", reason),
    };
    let request = SubscribeToX509sviDsRequest {
        selectors: Vec::new(),
        pid,
    };
    let mut stream = match client.subscribe_to_x509svi_ds(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ended::Failed(status_label(&status), status.message().to_string()),
    };
    loop {
        tokio::select! {
            message = stream.message() => {
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => return Ended::Failed("stream_closed", "the agent closed the stream".into()),
                    Err(status) => return Ended::Failed(status_label(&status), status.message().to_string()),
                };
                // Attested for this PID: valid only while the pinned process still holds it.
                if process.has_exited() {
                    return Ended::Exited;
                }
                backoff.reset();
                match parse_workload_update(&response) {
                    Ok(update) if update.svids.is_empty() => {
                        if latest.is_none() && !*told_unattested {
                            *told_unattested = true;
                            node.attestation_failed("no_identity");
                            warn!("no registration entry matches this process; it is served no SVID until one does");
                        } else if latest.is_some() {
                            warn!("the agent holds no SVID for this process any more; serving the last good one until it expires");
                        }
                    }
                    Ok(update) => {
                        if latest.is_none() {
                            info!(spiffe_id = %update.svids[0].spiffe_id, "workload attested");
                        }
                        *latest = Some(update);
                    }
                    Err(error) => {
                        node.metrics.reject(error.label());
                        warn!(%error, "the agent sent unusable SVIDs; keeping the last good ones");
                        continue;
                    }
                }
            }
            changed = bundles.changed() => {
                if changed.is_err() {
                    return Ended::Failed("unavailable", "bundle subscription ended".into());
                }
            }
        }
        let current = Arc::clone(&bundles.borrow_and_update());
        // Before the agent's first bundles arrive every SVID would lack its
        // trust domain's bundle: wait for them rather than refuse and warn.
        if let (Some(update), false) = (latest.as_ref(), current.is_empty()) {
            owner.on_context(workload_snapshot(update, &current, SystemTime::now()));
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
