//! The idemgate operator dashboard: a Leptos client-side app (wasm32-unknown-unknown)
//! that idemgate-server serves on its admin listener (`--dashboard-dir`).
//!
//! Layout follows the Leptos examples and stalwartlabs/webadmin:
//! - [`core`]: the admin token (session storage), the HTTP client ([`api`]) and the live
//!   event stream over SSE ([`core::live`]);
//! - [`components`]: small reusable views (time, state badge, charts, confirmation dialog);
//! - [`pages`]: one module per area (overview, keys, key detail, events, bulk purge,
//!   sign-in);
//! - [`format`] and [`chart`]: pure helpers, unit-tested on the host.
//!
//! Every fetch goes through [`api`] and returns a typed [`api::ApiError`]; pages render
//! fetches with `LocalResource` + `Transition` + `ErrorBoundary`, so bad API data shows an
//! error state instead of panicking.

pub mod api;
pub mod app;
pub mod chart;
pub mod components;
pub mod core;
pub mod format;
pub mod pages;

/// Browser entry point: installs the panic hook (a bug logs to the console) and mounts
/// the app on `<body>`.
#[cfg(target_arch = "wasm32")]
#[wasm_bindgen::prelude::wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(app::App);
}
