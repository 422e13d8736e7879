//! What FETCH needs from a message's bytes: header/text splits, header fields, MIME
//! parts, ENVELOPE and BODYSTRUCTURE. mail-parser does the MIME parsing; this module
//! only lays its findings out in IMAP's syntax.

use super::wire::{nstring, quoted_or_literal};
use mail_parser::{Address, MessageParser, MessagePart, MimeHeaders, PartType};

/// Offset where the body starts (after the blank line), or the end if there is none.
pub fn header_end(msg: &[u8]) -> usize {
    if let Some(i) = msg.windows(4).position(|w| w == b"\r\n\r\n") {
        return i + 4;
    }
    if let Some(i) = msg.windows(2).position(|w| w == b"\n\n") {
        return i + 2;
    }
    msg.len()
}

/// Header lines (with their continuations) whose name is (or, with `not`, is not) in
/// `names`, followed by the blank line, as RFC 3501 returns them.
pub fn header_fields(header: &[u8], names: &[String], not: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut keep = false;
    for line in header.split_inclusive(|b| *b == b'\n') {
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            let name = line.split(|b| *b == b':').next().unwrap_or_default();
            let name = String::from_utf8_lossy(name).trim().to_ascii_lowercase();
            keep = names.iter().any(|n| n.eq_ignore_ascii_case(&name)) != not;
        }
        if keep {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The bytes of MIME part `path` (1-based numbers as in BODY[1.2]); `None` if no such
/// part. A non-multipart message has one part, 1: its body.
pub fn part_bytes<'a>(msg: &'a [u8], path: &[u32]) -> Option<&'a [u8]> {
    let parsed = MessageParser::default().parse(msg)?;
    let mut part = parsed.root_part();
    for (depth, n) in path.iter().enumerate() {
        match &part.body {
            PartType::Multipart(children) => {
                let id = *children.get((*n as usize).checked_sub(1)?)?;
                part = parsed.parts.get(id as usize)?;
            }
            _ if *n == 1 && depth == path.len() - 1 => {}
            _ => return None,
        }
    }
    let (start, end) = (part.offset_body as usize, part.offset_end as usize);
    msg.get(start..end.min(msg.len()))
}

fn addresses(a: Option<&Address<'_>>) -> String {
    let Some(a) = a else { return "NIL".into() };
    let list: Vec<String> = match a {
        Address::List(addrs) => addrs.iter().map(|x| address(x.name.as_deref(), x.address.as_deref())).collect(),
        Address::Group(groups) => groups
            .iter()
            .flat_map(|g| g.addresses.iter().map(|x| address(x.name.as_deref(), x.address.as_deref())))
            .collect(),
    };
    if list.is_empty() { "NIL".into() } else { format!("({})", list.join("")) }
}

fn address(name: Option<&str>, addr: Option<&str>) -> String {
    let (mailbox, host) = match addr.and_then(|a| a.rsplit_once('@')) {
        Some((m, h)) => (Some(m), Some(h)),
        None => (addr, None),
    };
    let s = |v: Option<&str>| nstring(v.map(str::as_bytes));
    format!("({} NIL {} {})", s(name), s(mailbox), s(host))
}

/// ENVELOPE: date, subject, from, sender, reply-to, to, cc, bcc, in-reply-to, message-id.
pub fn envelope(msg: &[u8]) -> String {
    let Some(m) = MessageParser::default().parse(msg) else {
        return "(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)".into();
    };
    let raw = |name: &str| nstring(m.header_raw(name).map(|v| v.trim().as_bytes()));
    let from = addresses(m.from());
    let sender = m.sender().map(|a| addresses(Some(a))).unwrap_or_else(|| from.clone());
    let reply_to = m.reply_to().map(|a| addresses(Some(a))).unwrap_or_else(|| from.clone());
    format!(
        "({} {} {} {} {} {} {} {} {} {})",
        raw("Date"),
        raw("Subject"),
        from,
        sender,
        reply_to,
        addresses(m.to()),
        addresses(m.cc()),
        addresses(m.bcc()),
        raw("In-Reply-To"),
        raw("Message-ID"),
    )
}

/// MIME nesting walked for BODYSTRUCTURE; deeper parts are shown as one opaque leaf
/// (Dovecot stops at about 100 levels too). A message nests at most this deep for us.
pub const MIME_DEPTH_MAX: usize = 100;
/// MIME parts described for one message; the rest are left out of their multipart.
pub const MIME_PARTS_MAX: usize = 10_000;

/// BODYSTRUCTURE (non-extensible form plus nothing: BODY's layout, which clients accept
/// for both). The walk is iterative and bounded by [`MIME_DEPTH_MAX`] and
/// [`MIME_PARTS_MAX`]: a sender chooses the nesting.
pub fn bodystructure(msg: &[u8]) -> String {
    match MessageParser::default().parse(msg) {
        Some(m) => structure_of(&m, msg),
        None => format!("(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" {} 0)", msg.len()),
    }
}

/// A multipart whose children are being described.
struct Frame {
    children: Vec<u32>,
    next: usize,
    subtype: String,
    text: String,
}

fn structure_of(m: &mail_parser::Message<'_>, raw: &[u8]) -> String {
    let mut parts_seen = 1usize;
    let mut stack: Vec<Frame> = Vec::new();
    let mut current = Some(m.root_part());
    loop {
        // Describe `current` (a leaf) or open a frame for it (a multipart in bounds).
        if let Some(part) = current.take() {
            let children = match &part.body {
                PartType::Multipart(c) if stack.len() + 1 < MIME_DEPTH_MAX => Some(c.clone()),
                _ => None,
            };
            match children {
                Some(children) => {
                    stack.push(Frame { children, next: 0, subtype: subtype_of(part), text: String::from("(") })
                }
                None => {
                    let leaf = leaf_structure(part, raw);
                    match stack.last_mut() {
                        Some(frame) => frame.text.push_str(&leaf),
                        None => return leaf,
                    }
                }
            }
        }
        let Some(frame) = stack.last_mut() else { return String::from("NIL") };
        let next_child = frame.children.get(frame.next).and_then(|id| m.parts.get(*id as usize));
        frame.next += 1;
        match next_child {
            Some(child) if parts_seen < MIME_PARTS_MAX => {
                parts_seen += 1;
                current = Some(child);
            }
            Some(_) => {}
            None if frame.next <= frame.children.len() => {}
            None => {
                let Some(done) = stack.pop() else { return String::from("NIL") };
                let mut text = done.text;
                if text.len() == 1 {
                    // A multipart needs a body: an empty one is shown as an empty text part.
                    text.push_str("(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" 0 0)");
                }
                text.push(' ');
                text.push_str(&quoted_or_literal(done.subtype.as_bytes()));
                text.push(')');
                match stack.last_mut() {
                    Some(parent) => parent.text.push_str(&text),
                    None => return text,
                }
            }
        }
    }
}

fn subtype_of(part: &MessagePart<'_>) -> String {
    part.content_type().and_then(|c| c.subtype()).map(|s| s.to_ascii_uppercase()).unwrap_or_else(|| "PLAIN".into())
}

/// A part described as one body (a multipart past the depth limit included).
fn leaf_structure(part: &MessagePart<'_>, raw: &[u8]) -> String {
    let ctype = part.content_type();
    let main = ctype.map(|c| c.ctype().to_ascii_uppercase()).unwrap_or_else(|| "TEXT".into());
    let sub = subtype_of(part);
    let params = ctype
        .and_then(|c| c.attributes())
        .map(|attrs| {
            attrs
                .iter()
                .map(|a| {
                    format!(
                        "{} {}",
                        quoted_or_literal(a.name.to_ascii_uppercase().as_bytes()),
                        quoted_or_literal(a.value.as_bytes())
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|s| !s.is_empty())
        .map(|s| format!("({s})"))
        .unwrap_or_else(|| if main == "TEXT" { "(\"CHARSET\" \"US-ASCII\")".into() } else { "NIL".into() });
    let encoding = part.content_transfer_encoding().unwrap_or("7BIT").to_ascii_uppercase();
    let body = raw.get(part.offset_body as usize..(part.offset_end as usize).min(raw.len())).unwrap_or_default();
    let id = nstring(part.content_id().map(str::as_bytes));
    let description = nstring(part.content_description().map(str::as_bytes));
    let basic = format!(
        "{} {} {params} {id} {description} {} {}",
        quoted_or_literal(main.as_bytes()),
        quoted_or_literal(sub.as_bytes()),
        quoted_or_literal(encoding.as_bytes()),
        body.len()
    );
    if main == "TEXT" {
        let lines = body.iter().filter(|b| **b == b'\n').count();
        format!("({basic} {lines})")
    } else {
        format!("({basic})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIL: &[u8] = b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: Hi there\r\n\
Message-ID: <1@example.org>\r\nX-Long: a\r\n continued\r\n\r\nHello\r\nWorld\r\n";

    #[test]
    fn header_fields_keep_continuations_and_end_blank() {
        let h = &MAIL[..header_end(MAIL)];
        assert_eq!(
            header_fields(h, &["subject".into(), "X-LONG".into()], false),
            b"Subject: Hi there\r\nX-Long: a\r\n continued\r\n\r\n"
        );
        let not = header_fields(h, &["subject".into(), "x-long".into(), "message-id".into()], true);
        assert_eq!(not, b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\n\r\n");
    }

    #[test]
    fn envelope_and_structure_of_a_simple_mail() {
        let e = envelope(MAIL);
        assert!(e.contains("\"Hi there\""), "{e}");
        assert!(e.contains("((\"Alice\" NIL \"alice\" \"example.org\"))"), "{e}");
        assert!(e.ends_with("NIL \"<1@example.org>\")"), "{e}");
        let b = bodystructure(MAIL);
        assert!(b.starts_with("(\"TEXT\" \"PLAIN\""), "{b}");
        assert_eq!(part_bytes(MAIL, &[1]), Some(&b"Hello\r\nWorld\r\n"[..]));
        assert_eq!(part_bytes(MAIL, &[2]), None);
    }

    /// `depth` multiparts, each inside the one before, around one text part.
    pub(crate) fn nested_multiparts(depth: usize) -> Vec<u8> {
        let mut mail = b"From: a@example.org\r\nSubject: deep\r\nMIME-Version: 1.0\r\n".to_vec();
        for i in 0..depth {
            mail.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n").as_bytes(),
            );
        }
        mail.extend_from_slice(b"Content-Type: text/plain\r\n\r\nhello\r\n");
        for i in (0..depth).rev() {
            mail.extend_from_slice(format!("--b{i}--\r\n").as_bytes());
        }
        mail
    }

    #[test]
    fn deep_nesting_is_cut_at_the_depth_limit_without_recursion() {
        let mail = nested_multiparts(8000);
        let started = std::time::Instant::now();
        let b = bodystructure(&mail);
        let depth = b.bytes().take_while(|c| *c == b'(').count();
        assert!(depth <= MIME_DEPTH_MAX + 1, "{depth}");
        assert!(depth >= 50, "{depth}");
        assert_eq!(b.matches('(').count(), b.matches(')').count());
        eprintln!("8000 levels: {} bytes of BODYSTRUCTURE in {:?}", b.len(), started.elapsed());
        // A shallow multipart still shows every level.
        let b = bodystructure(&nested_multiparts(3));
        assert!(b.starts_with("((((\"TEXT\" \"PLAIN\""), "{b}");
        assert!(b.ends_with(" \"MIXED\") \"MIXED\") \"MIXED\")"), "{b}");
    }

    #[test]
    fn many_parts_are_capped() {
        let mut mail = b"Content-Type: multipart/mixed; boundary=\"x\"\r\n\r\n".to_vec();
        for _ in 0..(MIME_PARTS_MAX + 50) {
            mail.extend_from_slice(b"--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n");
        }
        mail.extend_from_slice(b"--x--\r\n");
        let b = bodystructure(&mail);
        assert!(b.matches("\"PLAIN\"").count() < MIME_PARTS_MAX, "{}", b.matches("\"PLAIN\"").count());
    }
}
