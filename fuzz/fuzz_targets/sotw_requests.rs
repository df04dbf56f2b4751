//! Arbitrary `DiscoveryRequest` sequences and snapshot changes against the
//! state-of-the-world state machine: no panic, and every response carries only
//! names that exist in the snapshot, with a fresh nonce.
#![no_main]

mod common;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use trustweave_sds::render::TrustFormat;
use trustweave_sds::sds::sotw::SotwStream;
use trustweave_sds::sds::NonceSource;

fuzz_target!(|data: &[u8]| {
    let nonces = NonceSource::default();
    let mut stream = SotwStream::new(TrustFormat::Spiffe);
    let mut current = common::rendered(0);
    let mut last_nonce = String::new();
    for (tag, bytes) in common::chunks(data) {
        if tag % 3 == 0 {
            current = common::rendered(tag / 3);
        } else if let Ok(mut request) = DiscoveryRequest::decode(bytes) {
            if tag % 3 == 1 {
                request.response_nonce = last_nonce.clone();
            }
            let _ = stream.on_request(&request);
        }
        if let Some(response) = stream.response(&current, &nonces) {
            assert_ne!(response.nonce, last_nonce);
            for any in &response.resources {
                let name = <envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret as Message>::decode(any.value.as_slice())
                    .expect("our own encoding")
                    .name;
                assert!(current.get(&name, TrustFormat::Spiffe).is_some(), "{name}");
            }
            last_nonce = response.nonce;
        }
    }
});
