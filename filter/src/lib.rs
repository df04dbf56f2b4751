//! trustweave-filter: SPIFFE-ID authorization and cloud/region annotation for
//! Envoy, as a proxy-wasm filter.
//!
//! A thin shim: every decision is in the `trustweave-engine` crate, plain
//! Rust with no proxy-wasm dependency (so it cannot make a host call, tested
//! natively, the same engine the `trustweave-policy` CLI runs); `shim` (wasm
//! only) reads Envoy's properties and headers, calls the engine, and acts.

#![forbid(unsafe_code)]
// A panic traps the VM for that worker: the compiler rules out what could panic
// on request data (tests may still assert with unwrap and indexing).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

#[cfg(target_arch = "wasm32")]
mod shim;
