//! Property tests of canonical JSON, fingerprints and the wire types (proptest, stable).
//!
//! The fuzz targets in `fuzz/` check the same invariants with coverage guidance; these run
//! with every `cargo test`.

use idemgate_protocol::canonical::canonicalize;
use idemgate_protocol::fingerprint::{BodyMode, Fingerprint};
use idemgate_protocol::{
    ClaimOutcome, ClaimRequest, CompleteOutcome, CompleteRequest, Problem, ReleaseOutcome,
    ReleaseRequest,
};
use proptest::prelude::*;

/// A JSON value whose numbers are lexemes and whose object names are distinct.
#[derive(Debug, Clone)]
enum Tree {
    Literal(&'static str),
    Number(String),
    Str(String),
    Array(Vec<Tree>),
    Object(Vec<(String, Tree)>),
}

fn number() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        any::<u64>(),
        proptest::option::of(0..1_000_000u32),
        proptest::option::of((
            prop_oneof![Just("e"), Just("E")],
            prop_oneof![Just(""), Just("+"), Just("-")],
            0..400u32,
        )),
    )
        .prop_map(|(neg, int, frac, exp)| {
            let mut s = if neg { "-".to_owned() } else { String::new() };
            s.push_str(&int.to_string());
            if let Some(f) = frac {
                s.push_str(&format!(".{f}"));
            }
            if let Some((e, sign, digits)) = exp {
                s.push_str(&format!("{e}{sign}{digits}"));
            }
            s
        })
}

fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        prop_oneof![Just("true"), Just("false"), Just("null")].prop_map(Tree::Literal),
        number().prop_map(Tree::Number),
        any::<String>().prop_map(Tree::Str),
    ];
    leaf.prop_recursive(5, 48, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Tree::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..5)
                .prop_map(|m| Tree::Object(m.into_iter().collect())),
        ]
    })
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// `t` written canonically by hand: members sorted by name, serde_json's escaping.
fn canonical(t: &Tree) -> String {
    match t {
        Tree::Literal(w) => (*w).to_owned(),
        Tree::Number(n) => n.clone(),
        Tree::Str(s) => json_str(s),
        Tree::Array(items) => format!(
            "[{}]",
            items.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        Tree::Object(members) => {
            let mut sorted: Vec<&(String, Tree)> = members.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            let parts: Vec<String> = sorted
                .into_iter()
                .map(|(n, v)| format!("{}:{}", json_str(n), canonical(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
    }
}

/// `t` written another way: members in reverse order, whitespace between tokens, every
/// string character outside printable ASCII (and quotes, backslashes) as `\uXXXX`.
fn respelled(t: &Tree) -> String {
    match t {
        Tree::Literal(w) => (*w).to_owned(),
        Tree::Number(n) => n.clone(),
        Tree::Str(s) => escaped(s),
        Tree::Array(items) => format!(
            "[ {}\n]",
            items.iter().map(respelled).collect::<Vec<_>>().join(" ,\t")
        ),
        Tree::Object(members) => {
            let parts: Vec<String> = members
                .iter()
                .rev()
                .map(|(n, v)| format!("{} :\r\n{}", escaped(n), respelled(v)))
                .collect();
            format!("{{ {} }}", parts.join(" , "))
        }
    }
}

fn escaped(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        if (' '..='~').contains(&c) && c != '"' && c != '\\' {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out.push('"');
    out
}

fn canon(s: &str) -> Option<String> {
    canonicalize(s.as_bytes(), &[]).map(|b| String::from_utf8_lossy(&b).into_owned())
}

proptest! {
    #[test]
    fn canonicalisation_is_idempotent_and_ignores_spelling(t in tree()) {
        let want = canonical(&t);
        prop_assert_eq!(canon(&want), Some(want.clone()));
        prop_assert_eq!(canon(&respelled(&t)), Some(want));
    }

    #[test]
    fn member_order_does_not_matter(
        members in proptest::collection::btree_map("[a-z]{0,3}", tree(), 0..8)
            .prop_map(|m| m.into_iter().collect::<Vec<_>>())
            .prop_shuffle(),
    ) {
        let shuffled = Tree::Object(members.clone());
        let mut sorted = members;
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let sorted = Tree::Object(sorted);
        prop_assert_eq!(canon(&respelled(&shuffled)), canon(&respelled(&sorted)));
        let mode = BodyMode::CanonicalJson { exclude: vec![] };
        prop_assert_eq!(
            Fingerprint::new("POST", "/p").finish_with_body(respelled(&shuffled).as_bytes(), &mode),
            Fingerprint::new("POST", "/p").finish_with_body(canonical(&sorted).as_bytes(), &mode)
        );
    }

    #[test]
    fn arbitrary_bytes_canonicalize_to_a_fixed_point_or_nothing(
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        if let Some(c) = canonicalize(&body, &["/a".to_owned(), "/0".to_owned()]) {
            prop_assert!(std::str::from_utf8(&c).is_ok());
            prop_assert_eq!(canonicalize(&c, &[]), Some(c.clone()));
        }
    }

    #[test]
    fn jsonish_text_canonicalizes_to_a_fixed_point_or_nothing(
        body in r#"[\[\]{}",:0-9.eE+\- \\ntrufalsu]{0,64}"#,
    ) {
        if let Some(c) = canonicalize(body.as_bytes(), &[]) {
            prop_assert_eq!(canonicalize(&c, &[]), Some(c.clone()));
        }
    }

    #[test]
    fn arbitrary_bytes_are_a_typed_error_for_every_wire_type(
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        // Decoding must answer (usually Err), never panic.
        let _ = serde_json::from_slice::<ClaimRequest>(&body);
        let _ = serde_json::from_slice::<CompleteRequest>(&body);
        let _ = serde_json::from_slice::<ReleaseRequest>(&body);
        let _ = serde_json::from_slice::<ClaimOutcome>(&body);
        let _ = serde_json::from_slice::<CompleteOutcome>(&body);
        let _ = serde_json::from_slice::<ReleaseOutcome>(&body);
        let _ = serde_json::from_slice::<Problem>(&body);
    }

    #[test]
    fn fingerprints_are_stable_and_hex(
        method in "[A-Z]{1,7}",
        path in "/[ -~]{0,40}",
        headers in proptest::collection::vec(("[a-z-]{1,12}", proptest::option::of(any::<Vec<u8>>())), 0..4),
        body in any::<Vec<u8>>(),
        canonical_json in any::<bool>(),
    ) {
        let mode = if canonical_json {
            BodyMode::CanonicalJson { exclude: vec!["/x".to_owned()] }
        } else {
            BodyMode::Raw
        };
        let fp = || {
            let mut f = Fingerprint::new(&method, &path);
            for (name, value) in &headers {
                match value {
                    Some(v) => f.header(name, v),
                    None => f.absent_header(name),
                }
            }
            f.finish_with_body(&body, &mode)
        };
        let a = fp();
        prop_assert_eq!(a.len(), 64);
        prop_assert!(a.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        prop_assert_eq!(a, fp());
    }
}

/// The fingerprint of a fixed request is pinned: a change to the framing or to canonical
/// JSON would make every stored record mismatch its retries after an upgrade (422).
#[test]
fn fingerprint_of_a_fixed_request_is_pinned() {
    let mut f = Fingerprint::new("POST", "/v1/payments?x=1");
    f.header("content-type", b"application/json");
    f.absent_header("x-tenant");
    let fp = f.finish_with_body(
        br#"{ "currency": "EUR", "amount": 10.50, "meta": {"b": [1, 2], "a": null} }"#,
        &BodyMode::CanonicalJson {
            exclude: vec!["/meta/b".to_owned()],
        },
    );
    assert_eq!(fp, PINNED);
}

const PINNED: &str = "3edf03e8c308ef1965c10e3119c640c5b127cd7f87d3f844be7b484cf4115c15";
