//! Arbitrary Workload API material — certificate chains, keys, bundles — into
//! a snapshot: no panic; whatever is accepted renders, and its default SVID's
//! key belongs to its certificate.
#![no_main]

mod common;

use std::collections::BTreeMap;
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use trustweave_sds::render::{Rendered, SecretNames};
use trustweave_sds::snapshot::{IdentitySnapshot, PrivateKeyDer, Svid, TrustBundle};

fuzz_target!(|data: &[u8]| {
    let parts = common::chunks(data);
    let mut svids = Vec::new();
    let mut bundles = BTreeMap::new();
    let mut chain = Vec::new();
    for (tag, bytes) in parts {
        match tag % 4 {
            0 => chain.push(bytes.to_vec()),
            1 => {
                let id = format!("spiffe://td{}.example/w", tag / 4 % 3);
                if let Ok(svid) = Svid::new(id, std::mem::take(&mut chain), PrivateKeyDer::new(bytes.to_vec())) {
                    svids.push(svid);
                }
            }
            _ => {
                bundles.insert(format!("td{}.example", tag / 4 % 3), TrustBundle { roots_der: vec![bytes.to_vec()] });
            }
        }
    }
    if let Ok(snapshot) = IdentitySnapshot::from_parts(svids, bundles, SystemTime::now()) {
        let rendered = Rendered::new(&snapshot, &SecretNames::default());
        assert!(snapshot.default_svid().is_none() || !rendered.available().is_empty());
    }
});
