//! CATENATE (RFC 4469): an APPEND whose message is made of parts, text literals and
//! IMAP URLs (RFC 5092) of messages or sections this user can read; and UTF8=ACCEPT's
//! `UTF8 (literal8)` message (RFC 6855 section 4), one part. imap-codec
//! 2.0.0-alpha.10 does not parse it, so the command is read here; the session resolves
//! each URL, joins the parts and hands the result on as a plain APPEND (one per message,
//! with MULTIAPPEND), which the codec parses as it parses any APPEND.
//!
//! One forward pass over bytes the fragmentizer has already bounded: no recursion, no
//! backtracking, at most [`super::multiappend::MESSAGES_MAX`] messages and
//! [`PARTS_MAX`] parts in each.

use super::multiappend::{MESSAGES_MAX, astring_end, literal_end, options_end};
use std::ops::Range;

/// Parts of one CATENATE at most.
pub const PARTS_MAX: usize = 64;

/// One message to append: `options` (flags and date, as the client wrote them, each
/// followed by a space) and its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub options: Vec<u8>,
    pub parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Text(Vec<u8>),
    Url(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Catenate {
    pub tag: Vec<u8>,
    /// The mailbox as the client wrote it (atom, quoted string or literal).
    pub mailbox: Vec<u8>,
    pub messages: Vec<Message>,
}

/// The CATENATE in `message`; None when it is not an APPEND with a CATENATE (the codec
/// or MULTIAPPEND handles it); Err with a reason the client is told (BAD).
pub fn parse(message: &[u8]) -> Option<Result<Catenate, String>> {
    let tag_end = memchr::memchr(b' ', message)?;
    let command_start = tag_end + 1;
    let command_end = command_start + memchr::memchr(b' ', &message[command_start..])?;
    if !message[command_start..command_end].eq_ignore_ascii_case(b"APPEND") {
        return None;
    }
    // Cheap test first: most APPENDs carry neither.
    if !contains_ignore_case(message, b"CATENATE") && !contains_ignore_case(message, b"UTF8 (") {
        return None;
    }
    let mailbox_start = command_end + 1;
    let mailbox_end = astring_end(message, mailbox_start)?;
    let mut at = mailbox_end;
    let mut messages = Vec::new();
    let mut any_catenate = false;
    loop {
        if message.get(at) != Some(&b' ') {
            return Some(Err("APPEND wants a message after the mailbox".into()));
        }
        let options_start = at + 1;
        at = match options_end(message, options_start) {
            Some(next) => next,
            None => return Some(Err("malformed flags or date".into())),
        };
        let options = message[options_start..at].to_vec();
        let parts = if starts_with_ignore_case(&message[at..], b"UTF8 (") {
            any_catenate = true;
            match literal(message, at + b"UTF8 (".len()) {
                Some((data, end)) if message.get(end) == Some(&b')') => {
                    at = end + 1;
                    vec![Part::Text(message[data].to_vec())]
                }
                _ => return Some(Err("UTF8 wants (literal8)".into())),
            }
        } else if starts_with_ignore_case(&message[at..], b"CATENATE (") {
            any_catenate = true;
            at += b"CATENATE (".len();
            match parts(message, &mut at) {
                Ok(parts) => parts,
                Err(why) => return Some(Err(why)),
            }
        } else {
            match literal(message, at) {
                Some((data, end)) => {
                    at = end;
                    vec![Part::Text(message[data].to_vec())]
                }
                None => return Some(Err("APPEND wants a literal or CATENATE (parts)".into())),
            }
        };
        messages.push(Message { options, parts });
        if messages.len() > MESSAGES_MAX {
            return Some(Err(format!("at most {MESSAGES_MAX} messages in one APPEND")));
        }
        if message[at..].starts_with(b"\r\n") || message[at..].starts_with(b"\n") || at == message.len() {
            break;
        }
    }
    if !any_catenate {
        return None;
    }
    Some(Ok(Catenate {
        tag: message[..tag_end].to_vec(),
        mailbox: message[mailbox_start..mailbox_end].to_vec(),
        messages,
    }))
}

/// `TEXT literal` and `URL astring` parts up to the closing parenthesis (`at` is just
/// after the opening one; it ends just after the closing one).
fn parts(message: &[u8], at: &mut usize) -> Result<Vec<Part>, String> {
    let mut out = Vec::new();
    loop {
        if out.len() >= PARTS_MAX {
            return Err(format!("at most {PARTS_MAX} parts in one CATENATE"));
        }
        let rest = message.get(*at..).unwrap_or_default();
        if starts_with_ignore_case(rest, b"TEXT ") {
            let (data, end) = literal(message, *at + 5).ok_or("TEXT wants a literal")?;
            out.push(Part::Text(message[data].to_vec()));
            *at = end;
        } else if starts_with_ignore_case(rest, b"URL ") {
            let start = *at + 4;
            let end = astring_end(message, start).ok_or("URL wants a string")?;
            out.push(Part::Url(astring_text(&message[start..end]).ok_or("a malformed URL string")?));
            *at = end;
        } else {
            return Err("CATENATE parts are TEXT literals and URL strings".into());
        }
        match message.get(*at) {
            Some(b')') => {
                *at += 1;
                return Ok(out);
            }
            Some(b' ') => *at += 1,
            _ => return Err("an unclosed CATENATE".into()),
        }
    }
}

/// A literal's data and where the literal ends.
fn literal(message: &[u8], at: usize) -> Option<(Range<usize>, usize)> {
    let end = literal_end(message, at)?;
    let newline = at + memchr::memchr(b'\n', &message[at..end])?;
    Some((newline + 1..end, end))
}

/// An astring's text: an atom as it is, a quoted string unescaped, a literal's data.
fn astring_text(raw: &[u8]) -> Option<String> {
    let bytes = match raw.first()? {
        b'"' => {
            let inner = raw.get(1..raw.len().checked_sub(1)?)?;
            let mut out = Vec::with_capacity(inner.len());
            let mut escaped = false;
            for &b in inner {
                if !escaped && b == b'\\' {
                    escaped = true;
                    continue;
                }
                escaped = false;
                out.push(b);
            }
            out
        }
        b'{' | b'~' => {
            let newline = memchr::memchr(b'\n', raw)?;
            raw[newline + 1..].to_vec()
        }
        _ => raw.to_vec(),
    };
    String::from_utf8(bytes).ok()
}

fn starts_with_ignore_case(bytes: &[u8], prefix: &[u8]) -> bool {
    bytes.len() >= prefix.len() && bytes[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn contains_ignore_case(bytes: &[u8], needle: &[u8]) -> bool {
    bytes.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// An IMAP URL (RFC 5092) naming a message of this server, as CATENATE uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub mailbox: String,
    pub uidvalidity: Option<u32>,
    pub uid: u32,
    /// The section as written (`HEADER`, `TEXT`, `1.2`, `1.MIME`...), upper case; empty
    /// for the whole message.
    pub section: String,
    /// `partial=offset.length` (the length to the end when absent).
    pub partial: Option<(u64, Option<u64>)>,
}

/// The message a CATENATE URL names: `/mailbox[;UIDVALIDITY=n]/;UID=n[/;SECTION=s]
/// [/;PARTIAL=o[.l]]`, or the same after `imap://authority`. A URL with URLAUTH or
/// anything else is refused: it names nothing this server can vouch for.
pub fn parse_url(url: &str) -> Result<Url, String> {
    let path = if starts_with_ignore_case(url.as_bytes(), b"imap://") {
        let after = &url[7..];
        &after[after.find('/').ok_or("a URL without a path")?..]
    } else {
        url
    };
    let path = path.strip_prefix('/').ok_or("a URL path starts with /")?;
    let lower = path.to_ascii_lowercase();
    let uid_at = lower.find("/;uid=").ok_or("a URL names a message by ;UID=")?;
    let (mailbox_part, rest) = (&path[..uid_at], &path[uid_at + 6..]);
    let (encoded_mailbox, uidvalidity) = match mailbox_part.to_ascii_lowercase().find(";uidvalidity=") {
        Some(i) => {
            let v = &mailbox_part[i + 13..];
            (&mailbox_part[..i], Some(v.parse::<u32>().map_err(|_| "a bad UIDVALIDITY")?))
        }
        None => (mailbox_part, None),
    };
    let mailbox = percent_decode(encoded_mailbox).ok_or("a bad %-escape in the mailbox")?;
    if mailbox.is_empty() {
        return Err("a URL without a mailbox".into());
    }
    let mut pieces = rest.split("/;");
    let uid: u32 = pieces.next().unwrap_or_default().parse().map_err(|_| "a bad UID")?;
    if uid == 0 {
        return Err("UID 0 names no message".into());
    }
    let mut section = String::new();
    let mut partial = None;
    for piece in pieces {
        let (key, value) = piece.split_once('=').ok_or("a URL part without a value")?;
        match key.to_ascii_lowercase().as_str() {
            "section" if section.is_empty() && partial.is_none() => {
                section = percent_decode(value).ok_or("a bad %-escape in the section")?.to_ascii_uppercase();
                if section.is_empty() {
                    return Err("an empty section".into());
                }
            }
            "partial" if partial.is_none() => {
                let (offset, length) = match value.split_once('.') {
                    Some((o, l)) => (o, Some(l.parse::<u64>().map_err(|_| "a bad partial length")?)),
                    None => (value, None),
                };
                partial = Some((offset.parse::<u64>().map_err(|_| "a bad partial offset")?, length));
            }
            other => {
                return Err(format!(
                    "this server does not take ;{} in a URL",
                    other.chars().take(16).collect::<String>()
                ));
            }
        }
    }
    Ok(Url { mailbox, uidvalidity, uid, section, partial })
}

/// RFC 3986 %-decoding into UTF-8 text.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<Result<Catenate, String>> {
        parse(s.as_bytes())
    }

    #[test]
    fn catenate_parts_are_read() {
        let c = p(
            "a APPEND box (\\Seen) CATENATE (TEXT {3}\r\nabc URL \"/box/;uid=2/;section=header\" TEXT {2+}\r\nde)\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.tag, b"a");
        assert_eq!(c.mailbox, b"box");
        assert_eq!(c.messages.len(), 1);
        assert_eq!(c.messages[0].options, b"(\\Seen) ");
        assert_eq!(
            c.messages[0].parts,
            vec![
                Part::Text(b"abc".to_vec()),
                Part::Url("/box/;uid=2/;section=header".into()),
                Part::Text(b"de".to_vec())
            ]
        );
        // MULTIAPPEND mixing CATENATE and a plain literal, flags and a date.
        let c = p(
            "b APPEND \"my box\" CATENATE (URL \"/x/;uid=1\") (\\Answered) \"1-Jan-2020 00:00:00 +0000\" {1}\r\nz\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.mailbox, b"\"my box\"");
        assert_eq!(c.messages[1].options, b"(\\Answered) \"1-Jan-2020 00:00:00 +0000\" ");
        assert_eq!(c.messages[1].parts, vec![Part::Text(b"z".to_vec())]);
        // UTF8=ACCEPT's APPEND data.
        let c = p("c APPEND INBOX UTF8 (~{4}\r\ndéf)\r\n").unwrap().unwrap();
        assert_eq!(c.messages[0].parts, vec![Part::Text("déf".as_bytes().to_vec())]);
        assert!(p("c APPEND INBOX UTF8 (~{4}\r\ndéf\r\n").unwrap().is_err());
    }

    #[test]
    fn other_commands_and_broken_ones() {
        assert!(p("a APPEND box {3}\r\nabc\r\n").is_none(), "no CATENATE");
        assert!(p("a FETCH 1 (BODY[])\r\n").is_none());
        assert!(p("a APPEND box CATENATE (TEXT abc)\r\n").unwrap().is_err());
        assert!(p("a APPEND box CATENATE (URL \"/x/;uid=1\"\r\n").unwrap().is_err());
        assert!(p("a APPEND box CATENATE (BODY \"/x/;uid=1\")\r\n").unwrap().is_err());
        let many = format!("a APPEND box CATENATE ({})\r\n", vec!["URL \"/x/;uid=1\""; PARTS_MAX + 1].join(" "));
        assert!(p(&many).unwrap().is_err());
    }

    #[test]
    fn urls_are_read() {
        let u = parse_url("/INBOX;UIDVALIDITY=785799047/;UID=113330/;section=1.5.9").unwrap();
        assert_eq!(
            u,
            Url {
                mailbox: "INBOX".into(),
                uidvalidity: Some(785799047),
                uid: 113330,
                section: "1.5.9".into(),
                partial: None
            }
        );
        let u = parse_url("imap://joe@example.com/a%20b/c/;uid=20/;partial=100000.1").unwrap();
        assert_eq!((u.mailbox.as_str(), u.uid, u.partial), ("a b/c", 20, Some((100000, Some(1)))));
        assert!(parse_url("/INBOX/;uid=0").is_err());
        assert!(parse_url("INBOX/;uid=1").is_err());
        assert!(parse_url("/INBOX;uidvalidity=x/;uid=1").is_err());
        assert!(parse_url("/INBOX/;uid=1/;urlauth=anonymous:internal:0123").is_err());
        assert!(parse_url("/%zz/;uid=1").is_err());
    }
}
