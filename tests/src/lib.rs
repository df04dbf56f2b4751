//! Support for Trustweave's end-to-end tests: a test PKI, a SPIFFE Workload API
//! stand-in for the SPIRE agent, an in-process trustweave-sds with an SDS client
//! that plays Envoy, a launcher for real Envoy processes, the filter's Envoy
//! configuration, upstreams, and an mTLS client.

pub mod bench_filter;
pub mod envoy;
pub mod filter;
pub mod filter_fixture;
pub mod http;
pub mod pki;
pub mod sds;
pub mod tls_client;
pub mod upstream;
pub mod wait;
pub mod workload_api;
