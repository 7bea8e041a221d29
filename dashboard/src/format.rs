//! Pure formatting helpers (no browser APIs, unit-tested on the host).

use std::cmp::Ordering;

use idemgate_protocol::admin::{EventKind, KeyState};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Characters left as they are when encoding a path segment or query value: the RFC 3986
/// unreserved set (`A-Z a-z 0-9 - _ ~`) but `.`, which is encoded too, so a key `.` or
/// `..` stays one segment instead of being resolved as a dot segment by the URL parser.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'~');

/// Percent-encodes `s` for use as one URL path segment or query value (like
/// `encodeURIComponent`, but also encoding `!'()*`).
pub fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// A key as a URL-safe query value: base64url without padding (RFC 4648 section 5).
pub fn key_param(key: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_bytes())
}

/// The key of [`key_param`], `None` when the value is not one.
pub fn key_from_param(value: &str) -> Option<String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value.as_bytes())
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// Builds `?a=1&b=2` from pairs, skipping empty values; `""` when nothing is left.
pub fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(name, value)| {
            value
                .as_deref()
                .filter(|v| !v.is_empty())
                .map(|v| format!("{name}={}", encode_component(v)))
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// A scope hash shortened for tables: `global` stays, a 64-hex hash becomes its first 10
/// characters and an ellipsis.
pub fn short_scope(scope: &str) -> String {
    if scope.chars().count() <= 12 {
        scope.to_owned()
    } else {
        let head: String = scope.chars().take(10).collect();
        format!("{head}…")
    }
}

/// A duration in milliseconds for people: `850 ms`, `42 s`, `3 min 5 s`, `2 h 10 min`,
/// `1 d 3 h`. Negative durations are formatted like positive ones.
pub fn duration_ms(ms: i64) -> String {
    let ms = ms.unsigned_abs();
    if ms < 1_000 {
        return format!("{ms} ms");
    }
    let s = ms / 1_000;
    if s < 60 {
        return format!("{s} s");
    }
    let (m, s) = (s / 60, s % 60);
    if m < 60 {
        return if s == 0 {
            format!("{m} min")
        } else {
            format!("{m} min {s} s")
        };
    }
    let (h, m) = (m / 60, m % 60);
    if h < 24 {
        return if m == 0 {
            format!("{h} h")
        } else {
            format!("{h} h {m} min")
        };
    }
    let (d, h) = (h / 24, h % 24);
    if h == 0 {
        format!("{d} d")
    } else {
        format!("{d} d {h} h")
    }
}

/// "expires in" column: `in 42 s`, or `expired` once `expires_ms` has passed.
pub fn expires_in(expires_ms: u64, now_ms: u64) -> String {
    if expires_ms <= now_ms {
        "expired".to_owned()
    } else {
        format!(
            "in {}",
            duration_ms(i64::try_from(expires_ms - now_ms).unwrap_or(i64::MAX))
        )
    }
}

/// "age" of something created at `at_ms`: `42 s ago`.
pub fn ago(at_ms: u64, now_ms: u64) -> String {
    if at_ms >= now_ms {
        "just now".to_owned()
    } else {
        format!(
            "{} ago",
            duration_ms(i64::try_from(now_ms - at_ms).unwrap_or(i64::MAX))
        )
    }
}

/// A rate in 0..=1 as a percentage with one decimal (`42.5 %`), `–` when unknown.
pub fn percent(rate: Option<f64>) -> String {
    match rate {
        Some(r) if r.is_finite() => format!("{:.1} %", r * 100.0),
        _ => "–".to_owned(),
    }
}

/// Compares two Redis Stream ids (`<ms>-<seq>`) numerically; ids that do not parse sort
/// first (so they never suppress a real event).
pub fn stream_id_cmp(a: &str, b: &str) -> Ordering {
    fn parse(id: &str) -> Option<(u64, u64)> {
        let (ms, seq) = id.split_once('-')?;
        Some((ms.parse().ok()?, seq.parse().ok()?))
    }
    parse(a).cmp(&parse(b))
}

/// Every event kind, in the order the Events page lists its filters.
pub const ALL_KINDS: [EventKind; 17] = [
    EventKind::Claimed,
    EventKind::Completed,
    EventKind::Replayed,
    EventKind::InFlightConflict,
    EventKind::Mismatch,
    EventKind::NotReplayable,
    EventKind::OutcomeUnknown,
    EventKind::Released,
    EventKind::Expired,
    EventKind::Purged,
    EventKind::LockReleased,
    EventKind::LockLost,
    EventKind::StoreError,
    EventKind::Rejected,
    EventKind::FailOpen,
    EventKind::RedisUnsafe,
    EventKind::RedisRestarted,
];

/// The wire name of an event kind (`in_flight_conflict`), also the SSE `event:` name.
pub fn kind_name(kind: EventKind) -> String {
    match serde_json::to_value(kind) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{kind:?}"),
    }
}

/// A short human label for an event kind (`in-flight conflict`).
pub fn kind_label(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Claimed => "claimed",
        EventKind::Replayed => "replayed",
        EventKind::InFlightConflict => "in-flight conflict",
        EventKind::Mismatch => "mismatch",
        EventKind::NotReplayable => "not replayable",
        EventKind::OutcomeUnknown => "outcome unknown",
        EventKind::Completed => "completed",
        EventKind::Released => "released",
        EventKind::Expired => "expired",
        EventKind::Purged => "purged",
        EventKind::LockReleased => "lock released",
        EventKind::LockLost => "lock lost",
        EventKind::StoreError => "store error",
        EventKind::Rejected => "rejected",
        EventKind::FailOpen => "fail-open",
        EventKind::RedisUnsafe => "redis unsafe",
        EventKind::RedisRestarted => "redis restarted",
    }
}

/// How serious an event kind is for an operator: `ok`, `info`, `warn` or `bad` (a CSS
/// class).
pub fn kind_tone(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Claimed | EventKind::Completed => "ok",
        EventKind::Replayed | EventKind::Released | EventKind::Expired => "info",
        EventKind::InFlightConflict
        | EventKind::Mismatch
        | EventKind::NotReplayable
        | EventKind::Rejected
        | EventKind::Purged
        | EventKind::LockReleased
        | EventKind::RedisRestarted => "warn",
        EventKind::LockLost
        | EventKind::StoreError
        | EventKind::FailOpen
        | EventKind::OutcomeUnknown
        | EventKind::RedisUnsafe => "bad",
    }
}

/// The wire name of a key state (`in_flight`).
pub fn state_name(state: KeyState) -> &'static str {
    match state {
        KeyState::InFlight => "in_flight",
        KeyState::Completed => "completed",
        KeyState::Unknown => "unknown",
    }
}

/// A human label for a key state.
pub fn state_label(state: KeyState) -> &'static str {
    match state {
        KeyState::InFlight => "in flight",
        KeyState::Completed => "completed",
        KeyState::Unknown => "outcome unknown",
    }
}

/// Parses a key state from its wire name; anything else is `None` (no filter).
pub fn parse_state(s: &str) -> Option<KeyState> {
    match s {
        "in_flight" => Some(KeyState::InFlight),
        "completed" => Some(KeyState::Completed),
        "unknown" => Some(KeyState::Unknown),
        _ => None,
    }
}

/// Bytes for people: `512 B`, `1.5 KiB`, `3.2 MiB`.
pub fn bytes(n: u64) -> String {
    const KIB: u64 = 1024;
    if n < KIB {
        format!("{n} B")
    } else if n < KIB * KIB {
        format!("{:.1} KiB", n as f64 / KIB as f64)
    } else {
        format!("{:.1} MiB", n as f64 / (KIB * KIB) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_keys_for_paths() {
        assert_eq!(encode_component("k-1_a.b~"), "k-1_a%2Eb~");
        assert_eq!(encode_component(".."), "%2E%2E");
        for key in ["a%2Fb", "a/b", "..", "k?x=1&y", "\"q\""] {
            assert_eq!(key_from_param(&key_param(key)).as_deref(), Some(key));
            assert!(key_param(key)
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
        assert_ne!(key_param("a%2Fb"), key_param("a/b"));
        assert_eq!(encode_component("a/b c?&="), "a%2Fb%20c%3F%26%3D");
        assert_eq!(encode_component("é"), "%C3%A9");
    }

    #[test]
    fn query_string_skips_empty_values() {
        assert_eq!(query_string(&[("a", None), ("b", Some(String::new()))]), "");
        assert_eq!(
            query_string(&[
                ("state", Some("in_flight".into())),
                ("prefix", Some("a b".into()))
            ]),
            "?state=in_flight&prefix=a%20b"
        );
    }

    #[test]
    fn shortens_scope_hashes() {
        assert_eq!(short_scope("global"), "global");
        assert_eq!(short_scope(&"ab".repeat(32)), "ababababab…");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_ms(850), "850 ms");
        assert_eq!(duration_ms(42_000), "42 s");
        assert_eq!(duration_ms(185_000), "3 min 5 s");
        assert_eq!(duration_ms(7_200_000), "2 h");
        assert_eq!(duration_ms(7_800_000), "2 h 10 min");
        assert_eq!(duration_ms(97_200_000), "1 d 3 h");
        assert_eq!(duration_ms(-42_000), "42 s");
        assert_eq!(expires_in(1_000, 2_000), "expired");
        assert_eq!(expires_in(32_000, 2_000), "in 30 s");
        assert_eq!(ago(1_000, 61_000), "1 min ago");
    }

    #[test]
    fn percentages_and_bytes() {
        assert_eq!(percent(None), "–");
        assert_eq!(percent(Some(0.425)), "42.5 %");
        assert_eq!(percent(Some(f64::NAN)), "–");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn stream_ids_compare_numerically() {
        assert_eq!(stream_id_cmp("10-0", "9-5"), Ordering::Greater);
        assert_eq!(stream_id_cmp("10-2", "10-10"), Ordering::Less);
        assert_eq!(stream_id_cmp("10-2", "10-2"), Ordering::Equal);
        assert_eq!(stream_id_cmp("junk", "1-0"), Ordering::Less);
    }

    #[test]
    fn kind_names_match_the_wire() {
        assert_eq!(kind_name(EventKind::InFlightConflict), "in_flight_conflict");
        assert_eq!(kind_name(EventKind::FailOpen), "fail_open");
        for kind in ALL_KINDS {
            let name = kind_name(kind);
            let back: EventKind = serde_json::from_value(serde_json::Value::String(name)).unwrap();
            assert_eq!(back, kind);
        }
        assert_eq!(parse_state("in_flight"), Some(KeyState::InFlight));
        assert_eq!(parse_state(""), None);
        assert_eq!(state_name(KeyState::Completed), "completed");
    }
}
