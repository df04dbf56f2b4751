//! Support for Trustweave's end-to-end tests: a test PKI, a SPIFFE Workload API
//! stand-in for the SPIRE agent, an in-process trustweave-sds with an SDS client
//! that plays Envoy, and a launcher for real Envoy processes.

pub mod envoy;
pub mod http;
pub mod pki;
pub mod sds;
pub mod wait;
pub mod workload_api;
