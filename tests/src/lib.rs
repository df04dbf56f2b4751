//! Support for Trustweave's end-to-end tests: the real SPIRE server and agent
//! ([`real_spire`]), a test PKI, SPIRE agent stand-ins
//! (the Workload API and the Delegated Identity API), an in-process trustweave-sds with an SDS client
//! that plays Envoy, a launcher for real Envoy processes, the filter's Envoy
//! configuration, upstreams, and an mTLS client.

pub mod bench_filter;
pub mod bench_plot;
pub mod bench_sds;
pub mod delegated_api;
pub mod envoy;
pub mod filter;
pub mod filter_fixture;
pub mod http;
pub mod istio;
pub mod kube;
pub mod mesh;
pub mod pki;
pub mod real_spire;
pub mod sds;
pub mod tls_client;
pub mod unix_server;
pub mod upstream;
pub mod wait;
pub mod workload_api;
