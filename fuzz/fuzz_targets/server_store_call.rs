//! How the server reads store calls: the input is a call name on the first line
//! (`claim`, `complete` or `release`) and its JSON body. The body is parsed as the store
//! API parses it (`serde_json` into the protocol type) and checked by the validation the
//! server runs (`ClaimRequest::validate` and siblings, which `server/src/api.rs` calls
//! before anything reaches Redis); nothing may panic, and an accepted call holds the shapes the Redis scripts
//! rely on and survives a serialize/parse round trip.
#![no_main]

use idemgate_protocol::{is_lower_hex, ClaimRequest, CompleteRequest, ReleaseRequest};
use libfuzzer_sys::fuzz_target;

fn round_trips<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_vec(value).unwrap_or_default();
    let back: Result<T, _> = serde_json::from_slice(&json);
    assert_eq!(back.as_ref().ok(), Some(value), "round trip");
}

fuzz_target!(|data: &[u8]| {
    let (call, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    match call {
        b"claim" => {
            let Ok(req) = serde_json::from_slice::<ClaimRequest>(body) else {
                return;
            };
            if req.validate().is_ok() {
                assert!(req.record.validate().is_ok());
                assert!(is_lower_hex(&req.fingerprint, 64));
                assert!(req.lock_ttl_ms > 0);
                round_trips(&req);
            }
        }
        b"complete" => {
            let Ok(req) = serde_json::from_slice::<CompleteRequest>(body) else {
                return;
            };
            if let Ok(ttl_ms) = req.validate() {
                assert!(is_lower_hex(&req.fencing_token, 32));
                assert_eq!(ttl_ms, req.ttl_s * 1000);
                assert!((100..=599).contains(&req.status));
                round_trips(&req);
            }
        }
        b"release" => {
            let Ok(req) = serde_json::from_slice::<ReleaseRequest>(body) else {
                return;
            };
            if req.validate().is_ok() {
                assert!(is_lower_hex(&req.fencing_token, 32));
                round_trips(&req);
            }
        }
        _ => {}
    }
});
