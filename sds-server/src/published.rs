//! The value published on the watch channel: an identity snapshot and every
//! secret it can serve, rendered once for all streams. Above both
//! [`crate::snapshot`] (what is held) and [`crate::render`] (how it is encoded),
//! so neither depends on the other's consumer.

use std::sync::Arc;
use std::time::Instant;

use crate::render::{Rendered, SecretNames};
use crate::snapshot::IdentitySnapshot;

/// A snapshot as published on the watch channel: rendered once for every
/// stream, stamped with the moment it was published.
#[derive(Debug)]
pub struct Published {
    /// The identity state.
    pub snapshot: IdentitySnapshot,
    /// Every secret it can serve, encoded once (see [`Rendered`]).
    pub rendered: Rendered,
    /// When it was published (for push latency).
    pub at: Instant,
}

impl Published {
    /// Renders `snapshot` under `names`, stamped now.
    pub fn now(snapshot: IdentitySnapshot, names: &SecretNames) -> Self {
        Self {
            rendered: Rendered::new(&snapshot, names),
            snapshot,
            at: Instant::now(),
        }
    }
}

/// A shared, immutable published snapshot.
pub type SharedPublished = Arc<Published>;
