//! Writing IMAP response syntax: strings as atoms, quoted strings or literals.

/// Appends a string: quoted when it can be, else a literal of exactly these bytes (a
/// byte that is not UTF-8, an 8-bit header, goes out as it came in).
pub fn string(out: &mut Vec<u8>, bytes: &[u8]) {
    let quotable = bytes.len() < 1024 && bytes.iter().all(|b| (0x20..0x7f).contains(b));
    if quotable {
        out.extend_from_slice(quoted(bytes.iter().map(|&b| b as char)).as_bytes());
    } else {
        text_literal(out, bytes);
    }
}

/// Appends NIL or a string.
pub fn nstring(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(bytes) => string(out, bytes),
        None => out.extend_from_slice(b"NIL"),
    }
}

/// Text as a quoted string when it can be one, else as a literal of its bytes.
pub fn quoted_or_literal(text: &str) -> String {
    let mut out = Vec::new();
    string(&mut out, text.as_bytes());
    // Only whole characters were copied, so the result is the text's own UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// A mailbox name: an atom when it is one, else quoted.
pub fn astring(s: &str) -> String {
    let atom = !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_graphic() && !b"(){ %*\"\\]".contains(&b))
        && !s.eq_ignore_ascii_case("NIL");
    if atom { s.to_string() } else { quoted_or_literal(s) }
}

/// A mailbox name for a client with UTF8=ACCEPT (RFC 6855): an atom, else a quoted
/// string, UTF-8 included, else a literal.
pub fn astring_utf8(s: &str) -> String {
    let quotable = s.len() < 1024 && !s.is_empty() && !s.chars().any(char::is_control);
    if !quotable || s.is_ascii() {
        return astring(s);
    }
    quoted(s.chars())
}

/// A quoted string of these characters, `"` and `\` escaped.
fn quoted(chars: impl Iterator<Item = char>) -> String {
    let mut out = String::from('"');
    for c in chars {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A literal of a message's text: its bytes as they are, except NUL, which RFC 3501
/// forbids in a literal and which becomes 0x80 as in Dovecot (BINARY can carry it).
pub fn text_literal(out: &mut Vec<u8>, bytes: &[u8]) {
    if memchr::memchr(0, bytes).is_none() {
        literal(out, bytes);
        return;
    }
    let cleaned: Vec<u8> = bytes.iter().map(|b| if *b == 0 { 0x80 } else { *b }).collect();
    literal(out, &cleaned);
}

/// A literal of raw bytes (bodies must keep their bytes; no lossy text conversion).
pub fn literal(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(format!("{{{}}}\r\n", bytes.len()).as_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The bytes a client reads back from a string written by `string`: the literal's
    /// declared length must be exactly what follows it.
    fn read_back(written: &[u8]) -> Option<Vec<u8>> {
        if let Some(rest) = written.strip_prefix(b"{") {
            let close = rest.windows(3).position(|w| w == b"}\r\n")?;
            let len: usize = std::str::from_utf8(&rest[..close]).ok()?.parse().ok()?;
            let text = &rest[close + 3..];
            (text.len() == len).then(|| text.to_vec())
        } else {
            let inner = written.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
            let mut out = Vec::new();
            let mut escaped = false;
            for &b in inner {
                if !escaped && b == b'\\' {
                    escaped = true;
                    continue;
                }
                escaped = false;
                out.push(b);
            }
            Some(out)
        }
    }

    fn written(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        string(&mut out, bytes);
        out
    }

    #[test]
    fn an_eight_bit_header_goes_out_as_its_own_bytes() {
        let bytes = b"Subject \xff\xfe caf\xc3\xa9";
        assert_eq!(written(bytes), b"{16}\r\nSubject \xff\xfe caf\xc3\xa9");
        assert_eq!(quoted_or_literal("caf\u{e9}"), "{5}\r\ncaf\u{e9}");
    }

    proptest! {
        #[test]
        fn every_string_reads_back_as_written(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let back = read_back(&written(&bytes));
            let sent: Vec<u8> = bytes.iter().map(|b| if *b == 0 { 0x80 } else { *b }).collect();
            prop_assert_eq!(back, Some(sent));
        }
    }
}
