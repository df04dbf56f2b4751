//! trustweave-filter: SPIFFE-ID authorization and cloud/region annotation for
//! Envoy, as a proxy-wasm filter.
//!
//! [`engine`] holds every decision and is plain Rust (tested natively, shared
//! with the `trustweave-policy` CLI); `shim` (wasm only) reads Envoy's
//! properties and headers, calls the engine, and acts.

#![forbid(unsafe_code)]

pub mod engine;

#[cfg(target_arch = "wasm32")]
mod shim;
