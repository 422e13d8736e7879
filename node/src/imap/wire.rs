//! Writing IMAP response syntax: strings as atoms, quoted strings or literals.

/// A string as a quoted string when it can be one, else as a literal.
pub fn quoted_or_literal(bytes: &[u8]) -> String {
    let quotable = bytes.len() < 1024 && bytes.iter().all(|b| (0x20..0x7f).contains(b));
    if quotable {
        quoted(bytes.iter().map(|&b| b as char))
    } else {
        // The literal's length is counted on the text written, never on the bytes it
        // came from: bytes that are not UTF-8 (an 8-bit header) become U+FFFD, which
        // is longer, and a length counted before that would desynchronise the client.
        let text = String::from_utf8_lossy(bytes);
        format!("{{{}}}\r\n{text}", text.len())
    }
}

/// NIL or a string.
pub fn nstring(bytes: Option<&[u8]>) -> String {
    bytes.map(quoted_or_literal).unwrap_or_else(|| "NIL".into())
}

/// A mailbox name: an atom when it is one, else quoted.
pub fn astring(s: &str) -> String {
    let atom = !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_graphic() && !b"(){ %*\"\\]".contains(&b))
        && !s.eq_ignore_ascii_case("NIL");
    if atom { s.to_string() } else { quoted_or_literal(s.as_bytes()) }
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

/// A literal of raw bytes (bodies must keep their bytes; no lossy text conversion).
pub fn literal(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(format!("{{{}}}\r\n", bytes.len()).as_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The bytes a client reads back from a string written by `quoted_or_literal`: the
    /// literal's declared length must be exactly what follows it.
    fn read_back(written: &str) -> Option<Vec<u8>> {
        if let Some(rest) = written.strip_prefix('{') {
            let (len, text) = rest.split_once("}\r\n")?;
            let len: usize = len.parse().ok()?;
            (text.len() == len).then(|| text.as_bytes().to_vec())
        } else {
            let inner = written.strip_prefix('"')?.strip_suffix('"')?;
            let mut out = Vec::new();
            let mut escaped = false;
            for b in inner.bytes() {
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

    #[test]
    fn an_eight_bit_header_gets_a_literal_of_its_true_length() {
        let written = quoted_or_literal(b"Subject \xff\xfe caf\xc3\xa9");
        assert_eq!(read_back(&written), Some("Subject \u{fffd}\u{fffd} café".as_bytes().to_vec()));
    }

    proptest! {
        #[test]
        fn every_string_reads_back_as_written(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let written = quoted_or_literal(&bytes);
            let back = read_back(&written);
            prop_assert!(back.is_some(), "unreadable: {written:?}");
            if std::str::from_utf8(&bytes).is_ok() {
                prop_assert_eq!(back.unwrap_or_default(), bytes);
            }
        }
    }
}
