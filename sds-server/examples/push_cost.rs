//! One SDS push, in instructions: `changes` rotations of the default SVID,
//! each rendered once and pushed to every one of `streams` SotW streams
//! subscribed to `default` (the response built, encoded for the wire, then
//! ACKed) — what trustweave-sds does per stream on a rotation, without the
//! socket. `make bench-instructions` runs it under `valgrind --tool=callgrind`
//! at two stream counts and two change counts: the differences are one push
//! to one stream and one rendering of a change.
//!
//! `cargo run --release -p trustweave-sds --example push_cost -- <changes> <streams>`

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use prost::Message;
use trustweave_sds::render::{Rendered, SecretNames, TrustFormat};
use trustweave_sds::sds::sotw::SotwStream;
use trustweave_sds::sds::NonceSource;
use trustweave_sds::snapshot::{CertFacts, IdentitySnapshot, PrivateKeyDer, Svid, TrustBundle};

const ID: &str = "spiffe://gcp.company.com/ns/search/sa/search-worker";

/// A snapshot as SPIRE gives it, with realistic sizes: a 700-byte leaf, a
/// 120-byte P-256 key, three trust domains of one 500-byte root each.
fn snapshot(serial: usize) -> IdentitySnapshot {
    let now = SystemTime::now();
    let leaf: Vec<u8> = (0..700).map(|i| (i * 7 + serial) as u8).collect();
    let svid = Svid {
        spiffe_id: ID.into(),
        chain_der: vec![leaf],
        private_key: PrivateKeyDer::new(vec![serial as u8; 120]),
        leaf: CertFacts {
            serial_hex: format!("{serial:032x}"),
            not_before: now,
            not_after: now + Duration::from_secs(3600),
        },
    };
    IdentitySnapshot {
        default: Some(svid.clone()),
        svids: vec![svid],
        own_trust_domain: Some("gcp.company.com".into()),
        bundles: ["aws.company.com", "azure.company.com", "gcp.company.com"]
            .iter()
            .map(|td| {
                let root: Vec<u8> = td.bytes().cycle().take(500).collect();
                (
                    td.to_string(),
                    TrustBundle {
                        roots_der: vec![root],
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
    }
}

fn request(nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: vec!["default".into()],
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    };
    let (changes, streams) = (arg(1, 1000), arg(2, 100));
    let names = SecretNames::default();
    let nonces = NonceSource::default();
    let first = Rendered::new(&snapshot(0), &names);
    let mut all: Vec<SotwStream> = (0..streams)
        .map(|_| {
            let mut stream = SotwStream::new(TrustFormat::Spiffe);
            stream.on_request(&request(""));
            if let Some(response) = stream.response(&first, &nonces) {
                stream.on_request(&request(&response.nonce));
            }
            stream
        })
        .collect();
    let (mut pushes, mut bytes) = (0usize, 0usize);
    for change in 1..=changes {
        let rendered = Rendered::new(&snapshot(change), &names);
        for stream in &mut all {
            if let Some(response) = stream.response(&rendered, &nonces) {
                bytes += std::hint::black_box(response.encode_to_vec()).len();
                pushes += 1;
                stream.on_request(&request(&response.nonce));
            }
        }
    }
    assert_eq!(
        pushes,
        changes * streams,
        "every change pushed to every stream"
    );
    println!("{pushes} pushes, {bytes} bytes");
}
