//! Property tests of the filter's parsers (proptest, stable): the `Idempotency-Key` field
//! and the JSON configuration. The fuzz targets in `fuzz/` check the same with coverage
//! guidance.

use idemgate_filter::config::Config;
use idemgate_filter::key::parse_key;
use idemgate_protocol::validate_key;
use proptest::prelude::*;

/// The key written as an RFC 8941 sf-string, as a client sends it.
fn sf_string(key: &str) -> String {
    format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Valid keys: 1..=255 printable ASCII characters, no space at either end.
fn key() -> impl Strategy<Value = String> {
    "[!-~]([ -~]{0,253}[!-~])?"
}

const DEMO: &str = include_str!("../../envoy/demo-filter.json");

proptest! {
    #[test]
    fn a_parsed_key_round_trips(key in key(), pad in "[ \t]{0,2}") {
        let header = format!("{pad}{}{pad}", sf_string(&key));
        prop_assert_eq!(parse_key(&header), Ok(key.clone()));
        // Printed as a bare token when it is one, it parses to itself too.
        if !key.contains([' ', '"', '\\', ',', ';']) {
            prop_assert_eq!(parse_key(&key), Ok(key.clone()));
        }
    }

    #[test]
    fn whatever_parses_is_a_valid_key_and_round_trips(raw in any::<String>()) {
        if let Ok(key) = parse_key(&raw) {
            prop_assert!(validate_key(&key).is_ok());
            prop_assert_eq!(parse_key(&sf_string(&key)), Ok(key));
        }
    }

    #[test]
    fn headerish_values_give_a_key_or_a_reason(raw in r#"[ \t"\\,;a-z\x00-\x1f\x7f-\u{ff}]{0,12}"#) {
        match parse_key(&raw) {
            Ok(key) => prop_assert!(validate_key(&key).is_ok()),
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn arbitrary_bytes_are_a_config_error_never_a_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        if let Err(e) = Config::from_json(&bytes) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn a_damaged_demo_config_is_an_error_or_a_config(
        at in 0..DEMO.len(),
        len in 0..8usize,
        with in "[\\[\\]{}\",:0-9a-z ]{0,4}",
    ) {
        // Replace a few bytes of the demo configuration: mostly errors, never a panic.
        let mut text = DEMO.as_bytes().to_vec();
        let end = (at + len).min(text.len());
        text.splice(at..end, with.bytes());
        if let Ok(config) = Config::from_json(&text) {
            let _ = config.route_for("POST", "/v1/payments");
        }
    }
}

#[test]
fn the_demo_config_loads() {
    assert!(Config::from_json(DEMO.as_bytes()).is_ok());
}
