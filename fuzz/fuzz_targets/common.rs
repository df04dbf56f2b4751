#![allow(dead_code)] // each target uses part of it

//! Shared by the targets: fixed snapshots to switch between, and a splitter
//! that turns fuzz input into a sequence of length-prefixed chunks.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use trustweave_sds::render::{Rendered, SecretNames};
use trustweave_sds::snapshot::{CertFacts, IdentitySnapshot, PrivateKeyDer, Svid, TrustBundle};

/// Snapshot `variant % 4`: serial and federation differ.
pub fn rendered(variant: u8) -> Rendered {
    let now = SystemTime::now();
    let svid = |id: &str| Svid {
        spiffe_id: id.into(),
        chain_der: vec![vec![variant % 2, 1, 2]],
        private_key: PrivateKeyDer::new(vec![variant % 2, 9]),
        leaf: CertFacts {
            serial_hex: format!("{:02x}", variant % 2),
            not_before: now,
            not_after: now + Duration::from_secs(3600),
        },
    };
    let mut bundles = BTreeMap::new();
    bundles.insert("gcp.company.com".to_string(), TrustBundle { roots_der: vec![vec![1]] });
    if variant % 4 >= 2 {
        bundles.insert("aws.company.com".to_string(), TrustBundle { roots_der: vec![vec![2]] });
    }
    let first = svid("spiffe://gcp.company.com/w");
    let snapshot = IdentitySnapshot {
        default: (variant % 8 < 7).then(|| first.clone()),
        svids: vec![first, svid("spiffe://gcp.company.com/second")],
        own_trust_domain: Some("gcp.company.com".into()),
        bundles,
    };
    Rendered::new(&snapshot, &SecretNames::default())
}

/// Splits `data` into chunks: each a 1-byte tag and a 1-byte length, then that many bytes.
pub fn chunks(mut data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() < 64 {
        let (tag, len) = (data[0], usize::from(data[1]));
        let end = (2 + len).min(data.len());
        out.push((tag, &data[2..end]));
        data = &data[end..];
    }
    out
}
