//! `Idempotency-Key` field values: any bytes give a key or a reason, never a panic; an
//! accepted key is valid and round-trips as an sf-string (and as a bare token when it is
//! one).
#![no_main]

use idemgate_filter::key::parse_key;
use idemgate_protocol::validate_key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Envoy hands the filter header values as text; non-UTF-8 arrives replaced.
    let raw = String::from_utf8_lossy(data);
    let Ok(key) = parse_key(&raw) else {
        return;
    };
    assert!(
        validate_key(&key).is_ok(),
        "accepted an invalid key {key:?}"
    );
    let quoted = format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""));
    assert_eq!(
        parse_key(&quoted).as_ref(),
        Ok(&key),
        "sf-string {quoted:?}"
    );
    let bare = !key.contains([' ', '"', '\\', ',', ';']);
    if bare {
        assert_eq!(parse_key(&key).as_ref(), Ok(&key), "bare {key:?}");
    }
});
