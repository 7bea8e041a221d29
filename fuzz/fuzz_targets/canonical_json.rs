//! Canonical JSON, two ways per input:
//! - the bytes as a body: a result or `None`, never a panic; a result is UTF-8 and its own
//!   canonical form (idempotence), with and without excluded pointers;
//! - the bytes as the recipe of a JSON tree, written twice (members in another order,
//!   other whitespace, strings escaped another way): both spellings canonicalize to the
//!   same bytes, which are the tree written canonically by hand.
#![no_main]

use idemgate_protocol::canonical::canonicalize;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

enum Tree {
    Literal(&'static str),
    Number(String),
    Str(String),
    Array(Vec<Tree>),
    Object(Vec<(String, Tree)>),
}

fn tree(u: &mut Unstructured, depth: usize) -> Result<Tree> {
    let kinds = if depth >= 6 { 3 } else { 5 };
    Ok(match u.choose_index(kinds)? {
        0 => Tree::Literal(*u.choose(&["true", "false", "null"])?),
        1 => Tree::Number(number(u)?),
        2 => Tree::Str(u.arbitrary()?),
        3 => Tree::Array(
            (0..u.int_in_range(0..=4)?)
                .map(|_| tree(u, depth + 1))
                .collect::<Result<_>>()?,
        ),
        _ => {
            let mut members: Vec<(String, Tree)> = Vec::new();
            for _ in 0..u.int_in_range(0..=4)? {
                let name: String = u.arbitrary()?;
                let value = tree(u, depth + 1)?;
                // Duplicate names are not JSON the canonicalizer accepts.
                if !members.iter().any(|(n, _)| *n == name) {
                    members.push((name, value));
                }
            }
            Tree::Object(members)
        }
    })
}

/// An RFC 8259 number lexeme.
fn number(u: &mut Unstructured) -> Result<String> {
    let mut s = String::new();
    if u.arbitrary()? {
        s.push('-');
    }
    let int: u64 = u.arbitrary()?;
    s.push_str(&int.to_string());
    if u.arbitrary()? {
        s.push('.');
        s.push_str(&u.int_in_range(0..=999_999u32)?.to_string());
    }
    if u.arbitrary()? {
        s.push(*u.choose(&['e', 'E'])?);
        s.push_str(u.choose(&["", "+", "-"])?);
        s.push_str(&u.int_in_range(0..=400u32)?.to_string());
    }
    Ok(s)
}

/// Writes `t` canonically: members sorted by name, serde_json's string escaping.
fn expected(t: &Tree, out: &mut String) {
    match t {
        Tree::Literal(w) => out.push_str(w),
        Tree::Number(n) => out.push_str(n),
        Tree::Str(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
        Tree::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                expected(v, out);
            }
            out.push(']');
        }
        Tree::Object(members) => {
            let mut sorted: Vec<&(String, Tree)> = members.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            out.push('{');
            for (i, (n, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(n).unwrap_or_default());
                out.push(':');
                expected(v, out);
            }
            out.push('}');
        }
    }
}

/// Writes `t` the other way: members reversed, whitespace everywhere, every string
/// character outside printable ASCII (and every quote and backslash) as `\uXXXX`.
fn respelled(t: &Tree, out: &mut String) {
    const WS: &str = " \t\r\n";
    match t {
        Tree::Literal(w) => out.push_str(w),
        Tree::Number(n) => out.push_str(n),
        Tree::Str(s) => escaped(s, out),
        Tree::Array(items) => {
            out.push_str("[ ");
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str("\n,\t");
                }
                respelled(v, out);
            }
            out.push_str(WS);
            out.push(']');
        }
        Tree::Object(members) => {
            out.push('{');
            out.push_str(WS);
            for (i, (n, v)) in members.iter().rev().enumerate() {
                if i > 0 {
                    out.push_str(" , ");
                }
                escaped(n, out);
                out.push_str(" :\r\n");
                respelled(v, out);
            }
            out.push('}');
        }
    }
}

fn escaped(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        if (' '..='~').contains(&c) && c != '"' && c != '\\' {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04X}"));
            }
        }
    }
    out.push('"');
}

fuzz_target!(|data: &[u8]| {
    let excludes = ["/a".to_owned(), "/0/b".to_owned(), "/~1~0/1".to_owned()];
    for exclude in [&[][..], &excludes[..]] {
        if let Some(c) = canonicalize(data, exclude) {
            assert!(std::str::from_utf8(&c).is_ok(), "canonical JSON is UTF-8");
            assert_eq!(
                canonicalize(&c, &[]).as_deref(),
                Some(c.as_slice()),
                "canonical JSON is its own canonical form"
            );
        }
    }

    let Ok(t) = tree(&mut Unstructured::new(data), 0) else {
        return;
    };
    let mut want = String::new();
    expected(&t, &mut want);
    let mut other = String::new();
    respelled(&t, &mut other);
    let a = canonicalize(want.as_bytes(), &[]);
    let b = canonicalize(other.as_bytes(), &[]);
    assert_eq!(a.as_deref(), Some(want.as_bytes()), "canonical of {want}");
    assert_eq!(b.as_deref(), Some(want.as_bytes()), "canonical of {other}");
});
