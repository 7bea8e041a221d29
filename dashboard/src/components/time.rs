//! Times in the user's time zone, with the UTC time on hover, and a ticking clock for
//! relative times ("expires in").

use std::time::Duration;

use leptos::prelude::*;
use wasm_bindgen::JsValue;

/// Latest valid JavaScript time, milliseconds (±8.64e15).
const MAX_JS_MS: u64 = 8_640_000_000_000_000;

/// Milliseconds since the Unix epoch, now (browser clock).
pub fn now_ms() -> u64 {
    let now = js_sys::Date::now();
    if now.is_finite() && now > 0.0 {
        now as u64
    } else {
        0
    }
}

fn locale() -> String {
    web_sys::window()
        .and_then(|w| w.navigator().language())
        .unwrap_or_else(|| "en-US".to_owned())
}

fn options(pairs: &[(&str, &str)]) -> JsValue {
    let obj = js_sys::Object::new();
    for (k, v) in pairs {
        let _ = js_sys::Reflect::set(&obj, &JsValue::from_str(k), &JsValue::from_str(v));
    }
    obj.into()
}

/// `ms` as a local date and time (`12/05/2025, 14:03:07` in the user's locale).
pub fn local_date_time(ms: u64) -> String {
    if ms > MAX_JS_MS {
        return "invalid time".to_owned();
    }
    let d = js_sys::Date::new(&JsValue::from_f64(ms as f64));
    d.to_locale_string(
        &locale(),
        &options(&[("dateStyle", "short"), ("timeStyle", "medium")]),
    )
    .into()
}

/// `ms` as a local time of day (`14:03:07`).
pub fn local_time(ms: u64) -> String {
    if ms > MAX_JS_MS {
        return "invalid time".to_owned();
    }
    let d = js_sys::Date::new(&JsValue::from_f64(ms as f64));
    d.to_locale_time_string(&locale()).into()
}

/// `ms` in UTC, ISO 8601 (`2025-05-12T12:03:07.123Z`).
pub fn utc(ms: u64) -> String {
    if ms > MAX_JS_MS {
        return "invalid time".to_owned();
    }
    let d = js_sys::Date::new(&JsValue::from_f64(ms as f64));
    let iso: String = d.to_iso_string().into();
    iso
}

/// A point in time in the user's time zone; hovering shows UTC.
#[component]
pub fn Time(
    /// Milliseconds since the Unix epoch.
    ms: u64,
    /// Time of day only (for feeds).
    #[prop(optional)]
    short: bool,
) -> impl IntoView {
    let text = if short {
        local_time(ms)
    } else {
        local_date_time(ms)
    };
    let iso = utc(ms);
    view! { <time datetime=iso.clone() title=format!("UTC {iso}")>{text}</time> }
}

/// A clock for relative times, ticking every second; shared through context.
#[derive(Debug, Clone, Copy)]
pub struct Clock(pub RwSignal<u64>);

impl Clock {
    /// Starts the clock (once, in the app root).
    pub fn start() -> Self {
        let now = RwSignal::new(now_ms());
        if let Ok(handle) =
            set_interval_with_handle(move || now.set(now_ms()), Duration::from_secs(1))
        {
            on_cleanup(move || handle.clear());
        }
        Self(now)
    }
}

/// The app's [`Clock`] signal (milliseconds, updated every second).
pub fn use_now() -> RwSignal<u64> {
    use_context::<Clock>().map_or_else(|| RwSignal::new(now_ms()), |c| c.0)
}
