//! The filter's JSON configuration: any bytes load or give a typed error, never a panic;
//! a loaded configuration answers route lookups.
#![no_main]

use idemgate_filter::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = Config::from_json(data) else {
        return;
    };
    for (method, path) in [
        ("POST", "/v1/payments"),
        ("PATCH", "/v1/orders/1?x=y"),
        ("GET", "/"),
        ("POST", ""),
    ] {
        if let Some(route) = config.route_for(method, path) {
            let _ = route.stores_header("content-type");
            let _ = route.scope.label();
        }
    }
});
