//! Writing IMAP response syntax: strings as atoms, quoted strings or literals.

/// A string as a quoted string when it can be one, else as a literal.
pub fn quoted_or_literal(bytes: &[u8]) -> String {
    let quotable = bytes.len() < 1024 && bytes.iter().all(|b| (0x20..0x7f).contains(b));
    if quotable {
        let mut s = String::with_capacity(bytes.len() + 2);
        s.push('"');
        for &b in bytes {
            if b == b'"' || b == b'\\' {
                s.push('\\');
            }
            s.push(b as char);
        }
        s.push('"');
        s
    } else {
        format!("{{{}}}\r\n{}", bytes.len(), String::from_utf8_lossy(bytes))
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

/// A literal of raw bytes (bodies must keep their bytes; no lossy text conversion).
pub fn literal(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(format!("{{{}}}\r\n", bytes.len()).as_bytes());
    out.extend_from_slice(bytes);
}
