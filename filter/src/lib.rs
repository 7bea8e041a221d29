//! The idemgate proxy-wasm filter: Idempotency-Key enforcement inside Envoy.
//!
//! A thin glue layer ([`glue`], wasm only) adapts proxy-wasm callbacks to pure logic that
//! is unit-tested on the host through the [`host::Host`] trait:
//! - [`config`]: the JSON configuration, parsed and validated once at load;
//! - [`key`]: `Idempotency-Key` parsing (RFC 8941 sf-string or bare token);
//! - [`exchange`]: the per-request decision state machine (claim, replay, 409, 422,
//!   complete/release);
//! - fingerprints and wire types come from `idemgate-protocol`.

// Unsafe code is denied everywhere but in `glue::abi`, the three raw hostcalls whose SDK
// wrappers panic on a status the host may legitimately return.
#![deny(unsafe_code)]

pub mod config;
pub mod exchange;
pub mod host;
pub mod key;

#[cfg(target_arch = "wasm32")]
pub mod glue;

/// The filter's version, logged when the VM starts.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
