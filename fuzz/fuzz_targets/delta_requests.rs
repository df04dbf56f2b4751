//! Arbitrary `DeltaDiscoveryRequest` sequences and snapshot changes against the
//! incremental state machine: no panic; resources exist, removals do not.
#![no_main]

mod common;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use trustweave_sds::render::TrustFormat;
use trustweave_sds::sds::delta::DeltaStream;
use trustweave_sds::sds::NonceSource;

fuzz_target!(|data: &[u8]| {
    let nonces = NonceSource::default();
    let mut stream = DeltaStream::new(TrustFormat::Pem);
    let mut current = common::rendered(0);
    let mut last_nonce = String::new();
    for (tag, bytes) in common::chunks(data) {
        if tag % 3 == 0 {
            current = common::rendered(tag / 3);
        } else if let Ok(mut request) = DeltaDiscoveryRequest::decode(bytes) {
            if tag % 3 == 1 {
                request.response_nonce = last_nonce.clone();
            }
            let _ = stream.on_request(&request);
        }
        if let Some(response) = stream.response(&current, &nonces) {
            for resource in &response.resources {
                assert!(current.get(&resource.name, TrustFormat::Pem).is_some());
            }
            for removed in &response.removed_resources {
                assert!(current.get(removed, TrustFormat::Pem).is_none() || !response.resources.iter().any(|r| &r.name == removed));
            }
            last_nonce = response.nonce;
        }
    }
});
