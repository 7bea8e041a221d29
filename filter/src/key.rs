//! Parsing the `Idempotency-Key` field value.
//!
//! The IETF draft (draft-ietf-httpapi-idempotency-key-header-07, section 2.1) defines the
//! field as an RFC 8941 Item of type sf-string: `Idempotency-Key: "8e03978e-..."`. Many
//! clients (Stripe's among them) send the bare value, so a bare value of visible ASCII
//! without quotes, backslashes, commas or semicolons is accepted too.

use idemgate_protocol::validate_key;

/// Parses one `Idempotency-Key` field value into the key.
///
/// # Errors
/// A human-readable reason (for problem details `detail`): an unterminated or badly
/// escaped sf-string, parameters or a list (`,`) after the value, a character outside
/// visible ASCII, or a key that fails [`validate_key`] (empty, over 255 characters).
pub fn parse_key(raw: &str) -> Result<String, String> {
    let v = raw.trim_matches(|c| c == ' ' || c == '\t');
    let key = if let Some(rest) = v.strip_prefix('"') {
        parse_sf_string(rest)?
    } else {
        parse_bare(v)?
    };
    validate_key(&key)?;
    Ok(key)
}

/// RFC 8941 section 4.2.5: after the opening DQUOTE, `\"` and `\\` are the only escapes,
/// characters are %x20-7E, and the closing DQUOTE ends the item.
fn parse_sf_string(rest: &str) -> Result<String, String> {
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, e @ ('"' | '\\'))) => out.push(e),
                _ => return Err("the idempotency key has an invalid escape: only \\\" and \\\\ are allowed in an sf-string".into()),
            },
            '"' => {
                let tail = &rest[i + 1..];
                if tail.is_empty() {
                    return Ok(out);
                }
                if tail.trim_start().starts_with(',') {
                    return Err("the Idempotency-Key field holds a list; send exactly one key".into());
                }
                return Err("the Idempotency-Key field has parameters or text after the quoted key, which are not supported".into());
            }
            ' '..='~' => out.push(c),
            _ => {
                return Err(format!(
                    "the idempotency key holds the character U+{:04X}; only printable ASCII is allowed",
                    u32::from(c)
                ))
            }
        }
    }
    Err("the idempotency key's sf-string has no closing double quote".into())
}

fn parse_bare(v: &str) -> Result<String, String> {
    if let Some(c) = v.chars().find(|c| !('!'..='~').contains(c)) {
        return Err(if c == ' ' || c == '\t' {
            "an unquoted idempotency key must not contain spaces; quote it as an sf-string".into()
        } else {
            format!(
                "the idempotency key holds the character U+{:04X}; only printable ASCII is allowed",
                u32::from(c)
            )
        });
    }
    if v.contains(',') {
        return Err("the Idempotency-Key field holds a list; send exactly one key".into());
    }
    if v.contains(';') || v.contains('"') || v.contains('\\') {
        return Err("an unquoted idempotency key must not contain ';', '\"' or '\\'; quote it as an sf-string".into());
    }
    Ok(v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_sf_strings_and_bare_tokens() {
        assert_eq!(parse_key("\"abc\"").unwrap(), "abc");
        assert_eq!(parse_key("  \"a b\\\"c\\\\\"  ").unwrap(), "a b\"c\\");
        assert_eq!(
            parse_key("550e8400-e29b-41d4-a716-446655440000").unwrap(),
            "550e8400-e29b-41d4-a716-446655440000"
        );
        assert_eq!(parse_key("tok:en/1").unwrap(), "tok:en/1");
        assert_eq!(parse_key(&"x".repeat(255)).unwrap().len(), 255);
    }

    #[test]
    fn rejects_malformed_keys() {
        for bad in [
            "",
            "\"\"",
            "\"abc",
            "\"a\\nb\"",
            "\"a\";p=1",
            "\"a\", \"b\"",
            "a, b",
            "a b",
            "a;b",
            "\"a\u{1}b\"",
            "a\u{7f}",
            "é",
            "\"é\"",
        ] {
            assert!(parse_key(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_key(&"x".repeat(256)).unwrap_err().contains("255"));
        assert!(parse_key(&format!("\"{}\"", "y".repeat(256))).is_err());
        assert!(parse_key("\" a\"").is_err(), "leading space inside quotes");
    }
}
