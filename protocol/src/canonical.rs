//! Canonical JSON for fingerprints: object members sorted by name, no insignificant
//! whitespace, strings re-escaped one way, and numbers kept exactly as written.
//!
//! Numbers are not parsed into floats: `0.3` and `0.30000000000000001`, or two integers
//! above 2^64, are the same `f64` but may be different amounts to an upstream that parses
//! decimals exactly, so they must never fingerprint alike. (`1.0` and `1` differ too: a
//! retry that changes how a number is written is treated as another request, the safe
//! direction.) Nesting is limited to [`MAX_DEPTH`] so a hostile body cannot exhaust the
//! wasm stack; deeper, duplicated members or anything not RFC 8259 JSON is "not JSON".

/// Deepest nesting of arrays and objects accepted.
pub const MAX_DEPTH: usize = 128;

enum Json {
    Literal(&'static str),
    /// A number lexeme, verbatim.
    Number(String),
    Str(String),
    Array(Vec<Json>),
    /// Members sorted by name.
    Object(Vec<(String, Json)>),
}

struct Parser<'a> {
    text: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while matches!(self.text.get(self.at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn value(&mut self, depth: usize) -> Option<Json> {
        self.skip_ws();
        match self.peek()? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => self.string().map(Json::Str),
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.literal("null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &'static str) -> Option<Json> {
        let end = self.at + word.len();
        (self.text.get(self.at..end)? == word.as_bytes()).then(|| {
            self.at = end;
            Json::Literal(word)
        })
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        self.at - start
    }

    /// RFC 8259 section 6: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Option<Json> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        let lexeme = std::str::from_utf8(self.text.get(start..self.at)?).ok()?;
        Some(Json::Number(lexeme.to_owned()))
    }

    /// A string token, decoded (escapes and control characters checked by serde_json).
    fn string(&mut self) -> Option<String> {
        let start = self.at;
        self.at += 1;
        loop {
            match self.peek()? {
                b'\\' => self.at += 2,
                b'"' => break,
                _ => self.at += 1,
            }
        }
        self.at += 1;
        let token = std::str::from_utf8(self.text.get(start..self.at)?).ok()?;
        serde_json::from_str(token).ok()
    }

    fn array(&mut self, depth: usize) -> Option<Json> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.at += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Some(Json::Array(items));
        }
        loop {
            items.push(self.value(depth)?);
            self.skip_ws();
            match self.peek()? {
                b',' => self.at += 1,
                b']' => {
                    self.at += 1;
                    return Some(Json::Array(items));
                }
                _ => return None,
            }
        }
    }

    fn object(&mut self, depth: usize) -> Option<Json> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.at += 1;
        let mut members: Vec<(String, Json)> = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Some(Json::Object(members));
        }
        loop {
            self.skip_ws();
            if self.peek()? != b'"' {
                return None;
            }
            let name = self.string()?;
            self.skip_ws();
            if self.peek()? != b':' {
                return None;
            }
            self.at += 1;
            let value = self.value(depth)?;
            members.push((name, value));
            self.skip_ws();
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    members.sort_by(|a, b| a.0.cmp(&b.0));
                    // Duplicate names are ambiguous (RFC 8259 section 4): not canonical.
                    if members.windows(2).any(|w| w[0].0 == w[1].0) {
                        return None;
                    }
                    return Some(Json::Object(members));
                }
                _ => return None,
            }
        }
    }
}

fn parse(body: &[u8]) -> Option<Json> {
    let mut p = Parser { text: body, at: 0 };
    let value = p.value(0)?;
    p.skip_ws();
    (p.at == body.len()).then_some(value)
}

/// Removes the member or element a JSON Pointer (RFC 6901) names, if present.
fn remove(value: &mut Json, pointer: &str) {
    let Some(rest) = pointer.strip_prefix('/') else {
        return;
    };
    let tokens: Vec<String> = rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    let Some((last, parents)) = tokens.split_last() else {
        return;
    };
    let mut target = value;
    for t in parents {
        let next = match target {
            Json::Object(members) => members.iter_mut().find(|(n, _)| n == t).map(|(_, v)| v),
            Json::Array(items) => t.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        };
        match next {
            Some(n) => target = n,
            None => return,
        }
    }
    match target {
        Json::Object(members) => members.retain(|(n, _)| n != last),
        Json::Array(items) => {
            if let Ok(i) = last.parse::<usize>() {
                if i < items.len() {
                    items.remove(i);
                }
            }
        }
        _ => {}
    }
}

fn write(value: &Json, out: &mut Vec<u8>) {
    match value {
        Json::Literal(w) => out.extend_from_slice(w.as_bytes()),
        Json::Number(n) => out.extend_from_slice(n.as_bytes()),
        Json::Str(s) => write_str(s, out),
        Json::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(v, out);
            }
            out.push(b']');
        }
        Json::Object(members) => {
            out.push(b'{');
            for (i, (n, v)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(n, out);
                out.push(b':');
                write(v, out);
            }
            out.push(b'}');
        }
    }
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    // serde_json escapes a string one deterministic way; serializing a str cannot fail.
    out.extend_from_slice(serde_json::to_string(s).unwrap_or_default().as_bytes());
}

/// Canonical bytes of the JSON `body` with the `exclude` pointers removed, or `None` when
/// the body is not JSON (empty, malformed, duplicate member names, nested deeper than
/// [`MAX_DEPTH`]).
pub fn canonicalize(body: &[u8], exclude: &[String]) -> Option<Vec<u8>> {
    let mut value = parse(body)?;
    for pointer in exclude {
        remove(&mut value, pointer);
    }
    let mut out = Vec::with_capacity(body.len());
    write(&value, &mut out);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> Option<String> {
        canonicalize(s.as_bytes(), &[]).map(|b| String::from_utf8(b).unwrap_or_default())
    }

    #[test]
    fn sorts_members_and_drops_whitespace() {
        assert_eq!(
            canon(" { \"b\" : [1, {\"d\":null, \"c\":true}], \"a\":\"x\" } ").as_deref(),
            Some(r#"{"a":"x","b":[1,{"c":true,"d":null}]}"#)
        );
    }

    #[test]
    fn numbers_are_kept_exactly_as_written() {
        assert_ne!(
            canon(r#"{"amount":0.3}"#),
            canon(r#"{"amount":0.30000000000000001}"#)
        );
        assert_ne!(canon("18446744073709551616"), canon("18446744073709551617"));
        assert_eq!(canon("-1.5e+10").as_deref(), Some("-1.5e+10"));
        for bad in ["01", "1.", ".5", "-", "1e", "+1", "NaN", "0x10"] {
            assert_eq!(canon(bad), None, "{bad}");
        }
    }

    #[test]
    fn strings_are_decoded_then_escaped_one_way() {
        assert_eq!(canon(r#""\u00e9\/""#), canon("\"é/\""));
        assert_eq!(
            canon("\"a\u{1}\""),
            None,
            "raw control characters are not JSON"
        );
        assert_eq!(canon(r#""\x""#), None);
    }

    #[test]
    fn rejects_what_is_not_one_json_value() {
        for bad in [
            "",
            "{",
            "{}}",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{\"a\":1,\"a\":2}",
            "tru",
            "[1] [2]",
        ] {
            assert_eq!(canon(bad), None, "{bad:?}");
        }
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(canon(&deep), None);
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(canon(&ok).is_some());
        let hostile = "[".repeat(1_000_000);
        assert_eq!(canon(&hostile), None, "no stack exhaustion");
    }

    #[test]
    fn pointers_remove_members_and_elements() {
        let body = br#"{"a":{"b/c":1,"keep":2},"list":[0,1,2],"t":3}"#;
        let out = canonicalize(
            body,
            &[
                "/a/b~1c".into(),
                "/list/1".into(),
                "/t".into(),
                "/missing/x".into(),
            ],
        );
        assert_eq!(
            out.as_deref(),
            Some(br#"{"a":{"keep":2},"list":[0,2]}"#.as_slice())
        );
    }
}
