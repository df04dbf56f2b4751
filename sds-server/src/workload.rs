//! One attested workload's identity state in node mode, as a pure state machine.
//!
//! Everything that changes what a workload is served arrives as an [`Event`]:
//! an update on its SVID subscription (with or without SVIDs), a failure of
//! that subscription, the agent refusing the delegate, a change of the node's
//! bundles or delegation, the passing of time, the exit of its process.
//! [`WorkloadState::handle`] takes one event and returns what to publish — a
//! pure function of (state, event, now), tested without I/O; the I/O loop in
//! [`crate::delegated`] only feeds it events and sleeps until
//! [`WorkloadState::next_expiry`].
//!
//! The rules, as SPIRE's agent behaves (`pkg/agent/api/delegatedidentity/v1/service.go`,
//! `pkg/agent/manager/cache/lru_cache.go`):
//! - **SPIRE's word is current**: an update with SVIDs grants them; an update
//!   *without* SVIDs after one with is a withdrawal (the entry was deleted or its
//!   selectors stopped matching) — nothing of that identity stays served, and its
//!   `federates_with` goes with it.
//! - **Last good is kept only across failures**: when the subscription fails or
//!   the agent is unreachable, the granted SVIDs stay served until they expire.
//! - **Expiry is exact**: an SVID is withdrawn at its `notAfter`, whatever the
//!   subscription is doing; after the default expired, trust still follows the bundles.
//! - **Trust follows the node's bundles** at every moment: the workload trusts
//!   its own trust domain and its `federates_with`, with the node's current roots.
//! - **A revoked delegation serves nothing**: once the agent answers
//!   `PermissionDenied` (the delegate lost its authorization), no last good survives it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use crate::snapshot::{IdentitySnapshot, Svid, TrustBundle};

/// Bundles the agent holds: bare trust-domain name → roots.
pub type BundleSet = BTreeMap<String, TrustBundle>;

/// One workload's SVIDs (in the agent's order; the first is `default`) and federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadUpdate {
    /// The SVIDs.
    pub svids: Vec<Svid>,
    /// Bare names of the trust domains the workload federates with.
    pub federates_with: BTreeSet<String>,
}

/// What the node's bundle subscription says of the delegation as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Delegation {
    /// No bundles received yet.
    #[default]
    Pending,
    /// The agent's current bundles (kept across its outages).
    Granted(Arc<BundleSet>),
    /// The agent refused this server as a delegate (`PermissionDenied`), or
    /// cannot be used safely (another PID namespace): nothing is served.
    Revoked,
}

/// One thing that happened to a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An update on the workload's SVID subscription (parsed and checked).
    Svids(WorkloadUpdate),
    /// The subscription failed or closed (the agent restarts, is unreachable…).
    StreamFailed,
    /// The agent refused the delegate on this workload's subscription.
    Denied,
    /// The node's delegation or bundles changed.
    Node(Delegation),
    /// Time passed (an SVID may have expired).
    Tick,
    /// The workload's process exited.
    Exited,
}

/// What the agent last said of this workload's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Grant {
    /// Nothing yet.
    Waiting,
    /// No entry matches the process (never granted).
    Unregistered,
    /// These SVIDs and this federation.
    Granted(WorkloadUpdate),
    /// An update without SVIDs after a grant: the identity was taken away.
    Withdrawn,
    /// `PermissionDenied` on this subscription.
    Denied,
}

/// What changed, for the I/O loop's logs and metrics (bounded, never a key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// First SVIDs for this workload (its default SPIFFE ID).
    Attested(String),
    /// The first update had no SVID: no entry matches (told once).
    Unregistered,
    /// SPIRE withdrew the identity (an empty update after SVIDs).
    Withdrawn,
    /// The agent refused the delegate on this subscription.
    Denied,
    /// The default SVID expired and nothing replaced it.
    DefaultExpired,
    /// SVIDs whose trust domain has no bundle on the node are not served.
    WithoutBundle(usize),
    /// The process exited.
    Exited,
}

/// The result of one event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The snapshot to serve now (the I/O loop publishes it if it differs).
    pub publish: IdentitySnapshot,
    /// What to log and count.
    pub notes: Vec<Note>,
    /// Whether the agent has answered this workload at least once (for `FetchSecrets`).
    pub settled: bool,
}

/// One workload's state: the only owner of what it is served.
#[derive(Clone, Debug)]
pub struct WorkloadState {
    grant: Grant,
    delegation: Delegation,
    exited: bool,
    default_served: bool,
}

impl WorkloadState {
    /// A new workload on a node whose delegation is `delegation`.
    pub fn new(delegation: Delegation) -> Self {
        Self {
            grant: Grant::Waiting,
            delegation,
            exited: false,
            default_served: false,
        }
    }

    /// Applies `event` at `now`; returns what to serve and what to report.
    pub fn handle(&mut self, event: Event, now: SystemTime) -> Outcome {
        let mut notes = Vec::new();
        match event {
            Event::Svids(update) if update.svids.is_empty() => {
                self.grant = match self.grant {
                    Grant::Granted(_) | Grant::Withdrawn => {
                        if matches!(self.grant, Grant::Granted(_)) {
                            notes.push(Note::Withdrawn);
                        }
                        Grant::Withdrawn
                    }
                    Grant::Waiting | Grant::Unregistered | Grant::Denied => {
                        if self.grant == Grant::Waiting {
                            notes.push(Note::Unregistered);
                        }
                        Grant::Unregistered
                    }
                };
            }
            Event::Svids(update) => {
                if !matches!(self.grant, Grant::Granted(_)) {
                    if let Some(first) = update.svids.first() {
                        notes.push(Note::Attested(first.spiffe_id.clone()));
                    }
                }
                self.grant = Grant::Granted(update);
            }
            Event::StreamFailed => {}
            Event::Denied => {
                if self.grant != Grant::Denied {
                    notes.push(Note::Denied);
                }
                self.grant = Grant::Denied;
            }
            Event::Node(delegation) => self.delegation = delegation,
            Event::Tick => {}
            Event::Exited => {
                if !self.exited {
                    notes.push(Note::Exited);
                }
                self.exited = true;
            }
        }
        let (publish, without_bundle) = self.serving(now);
        if without_bundle > 0 {
            notes.push(Note::WithoutBundle(without_bundle));
        }
        let default_served = publish.default.is_some();
        let default_expired = self
            .granted()
            .and_then(|update| update.svids.first())
            .is_some_and(|svid| svid.leaf.is_expired_at(now));
        if self.default_served && !default_served && default_expired {
            notes.push(Note::DefaultExpired);
        }
        self.default_served = default_served;
        Outcome {
            publish,
            notes,
            settled: self.grant != Grant::Waiting || self.exited,
        }
    }

    fn granted(&self) -> Option<&WorkloadUpdate> {
        match &self.grant {
            Grant::Granted(update) => Some(update),
            _ => None,
        }
    }

    /// The snapshot this state serves at `now`, and how many unexpired SVIDs
    /// could not be served for want of their trust domain's bundle.
    pub fn serving(&self, now: SystemTime) -> (IdentitySnapshot, usize) {
        let (Some(update), Delegation::Granted(bundles), false) =
            (self.granted(), &self.delegation, self.exited)
        else {
            return (IdentitySnapshot::default(), 0);
        };
        served(update, bundles, now)
    }

    /// When the next served SVID expires: the I/O loop sends [`Event::Tick`] then.
    pub fn next_expiry(&self, now: SystemTime) -> Option<SystemTime> {
        self.granted()?
            .svids
            .iter()
            .map(|svid| svid.leaf.not_after)
            .filter(|at| *at > now)
            .min()
    }
}

/// What `update` entitles a workload to at `now` with the node's `bundles`:
/// its unexpired SVIDs (the first of the update pinned as `default`) and the
/// roots of its own trust domains and of those it federates with. An SVID
/// whose trust domain has no bundle is left out (Envoy could verify no peer
/// with it) and counted.
pub fn served(
    update: &WorkloadUpdate,
    bundles: &BundleSet,
    now: SystemTime,
) -> (IdentitySnapshot, usize) {
    let has_bundle = |svid: &Svid| {
        bundles
            .get(svid.trust_domain())
            .is_some_and(|b| !b.roots_der.is_empty())
    };
    let unexpired = |svid: &&Svid| !svid.leaf.is_expired_at(now);
    let without_bundle = update
        .svids
        .iter()
        .filter(unexpired)
        .filter(|svid| !has_bundle(svid))
        .count();
    let svids: Vec<Svid> = update
        .svids
        .iter()
        .filter(unexpired)
        .filter(|svid| has_bundle(svid))
        .cloned()
        .collect();
    let first = update.svids.first();
    let default = first.filter(|svid| svids.contains(svid)).cloned();
    let wanted: BTreeSet<&str> = update
        .svids
        .iter()
        .map(Svid::trust_domain)
        .chain(update.federates_with.iter().map(String::as_str))
        .collect();
    let bundles = bundles
        .iter()
        .filter(|(td, _)| wanted.contains(td.as_str()))
        .map(|(td, bundle)| (td.clone(), bundle.clone()))
        .collect();
    let snapshot = IdentitySnapshot {
        default,
        svids,
        own_trust_domain: first.map(|svid| svid.trust_domain().to_string()),
        bundles,
    };
    (snapshot, without_bundle)
}
