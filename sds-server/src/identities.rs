//! Which identity a connection is served — the one difference between the modes.
//!
//! - **Per pod / host** ([`Identities::Shared`]): every client is served the one
//!   identity the Workload API gives this server.
//! - **Per node** ([`Identities::PerWorkload`]): each client is served the
//!   identity SPIRE attests for its own process ([`crate::delegated`]); a client
//!   whose process cannot be pinned is served nothing.
//!
//! Either way a stream gets a `watch` receiver of rendered snapshots, and the
//! SDS state machines downstream do not know which mode they run in.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::warn;

use crate::delegated::{NodeIdentities, WorkloadLease};
use crate::metrics::Metrics;
use crate::peer::Peer;
use crate::published::Published;
use crate::render::SecretNames;
use crate::snapshot::IdentitySnapshot;

/// The identity source streams are served from.
#[derive(Debug)]
pub enum Identities {
    /// One identity for every client.
    Shared(watch::Receiver<Arc<Published>>),
    /// Each client its own workload's identity.
    PerWorkload {
        /// The node's workloads.
        node: Arc<NodeIdentities>,
        /// Never changes: what an unattestable client is served (nothing).
        nothing: watch::Sender<Arc<Published>>,
    },
}

/// What one stream is served from, and the lease that keeps its workload's subscription open.
#[derive(Debug)]
pub struct StreamIdentity {
    /// Rendered snapshots for this stream.
    pub snapshots: watch::Receiver<Arc<Published>>,
    /// The workload held (node mode).
    pub lease: Option<Arc<WorkloadLease>>,
}

impl Identities {
    /// Node mode over `node`.
    pub fn per_workload(node: Arc<NodeIdentities>, names: &SecretNames) -> Self {
        let (nothing, _) =
            watch::channel(Arc::new(Published::now(IdentitySnapshot::default(), names)));
        Self::PerWorkload { node, nothing }
    }

    /// The identity a stream of `peer`'s connection is served.
    pub fn for_peer(&self, peer: Option<&Peer>, metrics: &Metrics) -> StreamIdentity {
        match self {
            Self::Shared(snapshots) => StreamIdentity {
                snapshots: snapshots.clone(),
                lease: None,
            },
            Self::PerWorkload { node, nothing } => {
                let lease = peer
                    .and_then(|p| p.process.as_ref())
                    .and_then(|process| node.attach(process));
                match lease {
                    Some(lease) => StreamIdentity {
                        snapshots: lease.snapshots(),
                        lease: Some(lease),
                    },
                    None => {
                        metrics.attestation_failed("no_process");
                        warn!(
                            uid = peer.map(|p| p.uid),
                            "SDS client's process cannot be pinned (no PID in this namespace, or it exited); it is served no identity"
                        );
                        StreamIdentity {
                            snapshots: nothing.subscribe(),
                            lease: None,
                        }
                    }
                }
            }
        }
    }
}
