//! MULTIAPPEND (RFC 3502): one APPEND with several messages. imap-codec 2.0.0-alpha.10
//! parses one message per APPEND, so a command it refuses is split here into one APPEND
//! per message, each made of the original bytes (tag, mailbox, flags, date, literal), which
//! the codec then parses as it parses any APPEND.
//!
//! One forward pass over bytes the fragmentizer has already bounded (the whole command is
//! at most one message's size limit plus slack): no recursion, no backtracking, and at
//! most [`MESSAGES_MAX`] messages.

/// Messages in one MULTIAPPEND at most.
pub const MESSAGES_MAX: usize = 1000;

/// The single-message APPEND commands `message` holds, when it is an APPEND of two or
/// more messages; None for anything else (the caller reports the codec's refusal).
pub fn split(message: &[u8]) -> Option<Vec<Vec<u8>>> {
    let tag_end = memchr::memchr(b' ', message)?;
    let mut at = tag_end + 1;
    let command_end = at + memchr::memchr(b' ', &message[at..])?;
    if !message[at..command_end].eq_ignore_ascii_case(b"APPEND") {
        return None;
    }
    let mailbox_start = command_end + 1;
    let mailbox_end = astring_end(message, mailbox_start)?;
    let head = &message[..mailbox_end];
    at = mailbox_end;
    let mut commands = Vec::new();
    loop {
        if message.get(at) != Some(&b' ') {
            return None;
        }
        let part_start = at;
        at = options_end(message, at + 1)?;
        at = literal_end(message, at)?;
        let mut command = Vec::with_capacity(head.len() + (at - part_start) + 2);
        command.extend_from_slice(head);
        command.extend_from_slice(&message[part_start..at]);
        command.extend_from_slice(b"\r\n");
        commands.push(command);
        if commands.len() > MESSAGES_MAX {
            return None;
        }
        if message[at..].starts_with(b"\r\n") || message[at..].starts_with(b"\n") {
            break;
        }
    }
    (commands.len() >= 2).then_some(commands)
}

/// Where an APPEND message's optional flag list and date (each followed by a space)
/// that start at `at` end.
pub(super) fn options_end(message: &[u8], mut at: usize) -> Option<usize> {
    if message.get(at) == Some(&b'(') {
        at += memchr::memchr(b')', message.get(at..)?)? + 1;
        at = expect(message, at, b" ")?;
    }
    if message.get(at) == Some(&b'"') {
        at = quoted_end(message, at)?;
        at = expect(message, at, b" ")?;
    }
    Some(at)
}

pub(super) fn expect(message: &[u8], at: usize, what: &[u8]) -> Option<usize> {
    message.get(at..)?.starts_with(what).then_some(at + what.len())
}

/// Where an astring (atom, quoted string or literal) that starts at `at` ends.
pub(super) fn astring_end(message: &[u8], at: usize) -> Option<usize> {
    match message.get(at)? {
        b'"' => quoted_end(message, at),
        b'{' | b'~' => literal_end(message, at),
        _ => Some(at + memchr::memchr2(b' ', b'\r', &message[at..]).unwrap_or(message.len() - at)),
    }
}

/// Where a quoted string that starts at `at` (on its opening quote) ends.
pub(super) fn quoted_end(message: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    while i < message.len() {
        match message[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            b'\r' | b'\n' => return None,
            _ => i += 1,
        }
    }
    None
}

/// Where a literal (`{n}`, `{n+}` or a literal8 `~{n}`, then CRLF and n bytes) that
/// starts at `at` ends.
pub(super) fn literal_end(message: &[u8], at: usize) -> Option<usize> {
    let mut i = at;
    if message.get(i) == Some(&b'~') {
        i += 1;
    }
    i = expect(message, i, b"{")?;
    let close = i + memchr::memchr(b'}', message.get(i..)?)?;
    let digits = message.get(i..close)?.strip_suffix(b"+").unwrap_or(&message[i..close]);
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let len: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let data = expect(message, close + 1, b"\r\n").or_else(|| expect(message, close + 1, b"\n"))?;
    let end = data.checked_add(len)?;
    (end <= message.len()).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_str(s: &str) -> Option<Vec<String>> {
        split(s.as_bytes()).map(|v| v.into_iter().map(|c| String::from_utf8(c).unwrap()).collect())
    }

    #[test]
    fn an_append_of_several_messages_becomes_one_append_each() {
        let got =
            split_str("a1 APPEND INBOX (\\Seen) {3}\r\nabc {2+}\r\nde \"24-Mar-2007 23:00:00 +0200\" ~{1}\r\nf\r\n");
        assert_eq!(
            got.unwrap(),
            [
                "a1 APPEND INBOX (\\Seen) {3}\r\nabc\r\n",
                "a1 APPEND INBOX {2+}\r\nde\r\n",
                "a1 APPEND INBOX \"24-Mar-2007 23:00:00 +0200\" ~{1}\r\nf\r\n",
            ]
        );
        let got = split_str("b APPEND \"my box\" {1}\r\nx (\\Flagged) \"d\" {1}\r\ny\r\n").unwrap();
        assert_eq!(got[1], "b APPEND \"my box\" (\\Flagged) \"d\" {1}\r\ny\r\n");
        let got = split_str("c APPEND {5}\r\nINBOX {1}\r\nx {1}\r\ny\r\n").unwrap();
        assert_eq!(got[0], "c APPEND {5}\r\nINBOX {1}\r\nx\r\n");
    }

    #[test]
    fn anything_else_is_left_to_the_codec_error() {
        assert!(split_str("a1 APPEND INBOX {3}\r\nabc\r\n").is_none(), "one message");
        assert!(split_str("a1 FETCH 1 (FLAGS)\r\n").is_none());
        assert!(split_str("a1 APPEND INBOX {3}\r\nab").is_none(), "short literal");
        assert!(split_str("a1 APPEND INBOX {3}\r\nabc {x}\r\nd\r\n").is_none());
        assert!(split_str("a1 APPEND INBOX {99999999999}\r\nabc {1}\r\nd\r\n").is_none());
        assert!(split_str("a1 APPEND \"unterminated {1}\r\nx {1}\r\ny\r\n").is_none());
        let many = format!("a APPEND INBOX{}\r\n", " {1}\r\nx".repeat(MESSAGES_MAX + 1));
        assert!(split_str(&many).is_none(), "too many messages");
        assert!(split_str("").is_none());
    }
}
