//! Request fingerprints and scope hashes (SHA-256, lowercase hex).
//!
//! The IETF draft (draft-ietf-httpapi-idempotency-key-header-07, section 2.4) lets the
//! server decide what makes two requests "the same"; idemgate hashes the method, the path
//! with query, a configured list of request headers and the body. Every part is framed
//! with a tag and its length, so moving bytes between parts always changes the hash.

use sha2::{Digest, Sha256};

/// Lowercase hex SHA-256 of a scope source, e.g. the `Authorization` header value.
///
/// `source` names where the value came from (`"authorization"`, `"metadata:jwt/sub"`) so
/// the same bytes from two sources never share a scope. The raw value is never stored.
pub fn scope_hash(source: &str, value: &[u8]) -> String {
    let mut h = Sha256::new();
    frame(&mut h, b'S', source.as_bytes());
    frame(&mut h, b'V', value);
    hex::encode(h.finalize())
}

fn frame(h: &mut Sha256, tag: u8, bytes: &[u8]) {
    h.update([tag]);
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// How the body enters the fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BodyMode {
    /// The exact bytes as received (after Envoy de-chunking; compression is kept).
    #[default]
    Raw,
    /// Canonical JSON: object members sorted by name, no insignificant whitespace, numbers
    /// exactly as written, the listed JSON Pointers (RFC 6901) removed. A body that does not parse as JSON falls
    /// back to [`BodyMode::Raw`] (and says so in the hash input, so the two never meet).
    CanonicalJson {
        /// JSON Pointers of members to leave out, e.g. `/client_timestamp`.
        exclude: Vec<String>,
    },
}

/// Incremental request fingerprint.
///
/// ```
/// use idemgate_protocol::fingerprint::{BodyMode, Fingerprint};
/// let mut f = Fingerprint::new("POST", "/v1/payments?x=1");
/// f.header("content-type", b"application/json");
/// let a = f.finish_with_body(br#"{"b":1, "a":2}"#, &BodyMode::CanonicalJson { exclude: vec![] });
/// let mut g = Fingerprint::new("POST", "/v1/payments?x=1");
/// g.header("content-type", b"application/json");
/// let b = g.finish_with_body(br#"{"a":2,"b":1}"#, &BodyMode::CanonicalJson { exclude: vec![] });
/// assert_eq!(a, b);
/// assert_eq!(a.len(), 64);
/// ```
#[derive(Clone)]
pub struct Fingerprint {
    h: Sha256,
}

impl Fingerprint {
    /// Starts a fingerprint over the method and the path with query.
    pub fn new(method: &str, path_and_query: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"idemgate-fp-v1");
        frame(&mut h, b'M', method.as_bytes());
        frame(&mut h, b'P', path_and_query.as_bytes());
        Self { h }
    }

    /// Adds one request header (name lowercase). Call in the configured order; an absent
    /// header should still be added with an empty value by the caller through
    /// [`Fingerprint::absent_header`] so "absent" and "empty" differ.
    pub fn header(&mut self, name: &str, value: &[u8]) {
        frame(&mut self.h, b'H', name.as_bytes());
        frame(&mut self.h, b'V', value);
    }

    /// Records that a configured header was absent.
    pub fn absent_header(&mut self, name: &str) {
        frame(&mut self.h, b'A', name.as_bytes());
    }

    /// Adds the body and returns the lowercase hex digest (64 characters).
    pub fn finish_with_body(mut self, body: &[u8], mode: &BodyMode) -> String {
        match mode {
            BodyMode::Raw => frame(&mut self.h, b'B', body),
            BodyMode::CanonicalJson { exclude } => match canonical_json(body, exclude) {
                Some(canon) => frame(&mut self.h, b'J', &canon),
                None => frame(&mut self.h, b'B', body),
            },
        }
        hex::encode(self.h.finalize())
    }
}

/// Canonical JSON bytes of `body` with the `exclude` pointers removed, or `None` when the
/// body is not JSON (see [`crate::canonical::canonicalize`]: numbers are kept exactly as
/// written, members sorted, nesting bounded).
pub fn canonical_json(body: &[u8], exclude: &[String]) -> Option<Vec<u8>> {
    crate::canonical::canonicalize(body, exclude)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(method: &str, path: &str, body: &[u8], mode: &BodyMode) -> String {
        Fingerprint::new(method, path).finish_with_body(body, mode)
    }

    #[test]
    fn every_part_changes_the_fingerprint() {
        let raw = BodyMode::Raw;
        let base = fp("POST", "/a", b"x", &raw);
        assert_ne!(base, fp("PATCH", "/a", b"x", &raw));
        assert_ne!(base, fp("POST", "/a?q=1", b"x", &raw));
        assert_ne!(base, fp("POST", "/a", b"y", &raw));
        // Moving a byte from the path into the body is not the same request.
        assert_ne!(fp("POST", "/ab", b"", &raw), fp("POST", "/a", b"b", &raw));
        assert_eq!(base, fp("POST", "/a", b"x", &raw));
    }

    #[test]
    fn canonical_json_ignores_order_whitespace_and_excluded_members() {
        let mode = BodyMode::CanonicalJson {
            exclude: vec!["/sent_at".into(), "/meta/trace".into()],
        };
        let a = fp(
            "POST",
            "/p",
            br#"{"amount":10,"currency":"eur","sent_at":1,"meta":{"trace":"a","z":1}}"#,
            &mode,
        );
        let b = fp(
            "POST",
            "/p",
            b"{ \"currency\" : \"eur\",\n \"amount\": 10, \"meta\": {\"z\":1,\"trace\":\"b\"}, \"sent_at\": 99 }",
            &mode,
        );
        assert_eq!(a, b);
        let c = fp("POST", "/p", br#"{"amount":11,"currency":"eur"}"#, &mode);
        assert_ne!(a, c);
    }

    #[test]
    fn non_json_falls_back_to_raw_and_never_meets_json() {
        let json = BodyMode::CanonicalJson { exclude: vec![] };
        assert_eq!(
            fp("POST", "/p", b"not json", &json),
            fp("POST", "/p", b"not json", &BodyMode::Raw)
        );
        // The canonical form of `{"a":1}` equals its raw bytes, yet the hashes differ by tag.
        assert_ne!(
            fp("POST", "/p", br#"{"a":1}"#, &json),
            fp("POST", "/p", br#"{"a":1}"#, &BodyMode::Raw)
        );
    }

    #[test]
    fn headers_absent_and_empty_differ() {
        let mut a = Fingerprint::new("POST", "/");
        a.absent_header("x-tenant");
        let mut b = Fingerprint::new("POST", "/");
        b.header("x-tenant", b"");
        assert_ne!(
            a.finish_with_body(b"", &BodyMode::Raw),
            b.finish_with_body(b"", &BodyMode::Raw)
        );
    }

    #[test]
    fn scope_hash_depends_on_source_and_value() {
        let a = scope_hash("authorization", b"Bearer a");
        assert_eq!(a.len(), 64);
        assert_ne!(a, scope_hash("authorization", b"Bearer b"));
        assert_ne!(a, scope_hash("x-api-key", b"Bearer a"));
        assert!(!a.contains("Bearer"));
    }
}
