//! What FETCH and SEARCH need from a message's bytes: the MIME tree with each part's byte
//! ranges (for BODY[1.2.HEADER] and the like), header fields, ENVELOPE, BODYSTRUCTURE,
//! addresses and the sent date. The tree is found here, in one pass over the lines with a
//! stack of open parts (no recursion: a sender chooses the nesting); mail-parser parses
//! each part's header fields (Content-Type, addresses, dates) and this module lays its
//! findings out in IMAP's syntax.

use super::address::{self, Entry};
use super::wire::{nstring, string};
use mail_parser::{Address, HeaderValue, MessageParser, MimeHeaders};
use std::ops::Range;

/// MIME nesting walked; a deeper multipart or attached message is one opaque leaf
/// (Dovecot stops at about 100 levels too).
pub const MIME_DEPTH_MAX: usize = 100;
/// MIME parts found in one message; the parts after these are left out of their
/// multipart (their bytes stay in its body).
pub const MIME_PARTS_MAX: usize = 10_000;
/// A longer boundary parameter is not believed (RFC 2046 allows 70 bytes): the part is
/// shown as a leaf. Keeps each line's boundary test short.
const BOUNDARY_LEN_MAX: usize = 256;

/// How a part holds other parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holds {
    /// A leaf: text, an attachment, or a container past the limits.
    Nothing,
    /// A multipart's parts, in order (indices into [`Structure::parts`]).
    Parts(Vec<usize>),
    /// A message/rfc822 part's attached message: a part whose header is that message's
    /// header and whose body is that message's body.
    Message(usize),
}

/// What a part's header says about its content (defaults filled in).
#[derive(Debug, Clone, Default)]
pub struct Content {
    /// Media type and subtype as written (lowercase where a default applies).
    pub main: String,
    pub sub: String,
    pub params: Vec<(String, String)>,
    pub encoding: Option<String>,
    /// Header values as their bytes (BODYSTRUCTURE shows them as written).
    pub id: Option<Vec<u8>>,
    pub description: Option<Vec<u8>>,
    pub disposition: Option<(String, Vec<(String, String)>)>,
    pub language: Vec<String>,
    pub location: Option<Vec<u8>>,
    pub md5: Option<Vec<u8>>,
}

impl Content {
    fn is(&self, main: &str, sub: &str) -> bool {
        self.main.eq_ignore_ascii_case(main) && self.sub.eq_ignore_ascii_case(sub)
    }

    fn boundary(&self) -> Option<&str> {
        self.params.iter().find(|(n, _)| n.eq_ignore_ascii_case("boundary")).map(|(_, v)| v.as_str())
    }
}

/// One part: where its header and body are in the message, and what it holds.
#[derive(Debug, Clone)]
pub struct Part {
    /// The message header (for the message and attached messages) or the MIME header (for
    /// a part of a multipart), up to and including the blank line that ends it.
    pub header: Range<usize>,
    /// What follows the header, up to (not including) the line break before the next
    /// boundary delimiter, or the end of the enclosing part.
    pub body: Range<usize>,
    pub holds: Holds,
    pub content: Content,
    /// Multiparts and attached messages around this part.
    depth: usize,
}

/// A message's MIME tree; `parts[0]` is the message itself.
#[derive(Debug, Clone)]
pub struct Structure {
    pub parts: Vec<Part>,
}

/// What the default media type of a part is: text/plain, or message/rfc822 inside a
/// multipart/digest (RFC 2046 5.1.5).
#[derive(Clone, Copy, PartialEq, Eq)]
enum DefaultType {
    Text,
    Message,
}

/// A part being read: whether its header is still arriving.
struct Open {
    part: usize,
    in_header: bool,
    /// For a multipart whose closing delimiter has not come: its boundary.
    boundary: Option<Vec<u8>>,
    /// Its children's default type.
    child_default: DefaultType,
}

impl Structure {
    /// The MIME tree of `msg`, in one pass over its lines.
    pub fn of(msg: &[u8]) -> Structure {
        let mut parts = vec![Part::starting_at(0, 0)];
        let mut defaults = vec![DefaultType::Text];
        let mut open = vec![Open { part: 0, in_header: true, boundary: None, child_default: DefaultType::Text }];
        let mut pos = 0;
        while pos < msg.len() {
            let line_end = memchr::memchr(b'\n', &msg[pos..]).map(|i| pos + i + 1).unwrap_or(msg.len());
            let line = &msg[pos..line_end];
            if let Some((level, closing)) = delimiter(line, &open) {
                // The line break before a delimiter belongs to the delimiter.
                let content_end = before_line_break(msg, pos);
                for o in open.drain(level + 1..).rev() {
                    let p = &mut parts[o.part];
                    if o.in_header {
                        p.header.end = content_end.max(p.header.start);
                        p.body = p.header.end..p.header.end;
                        p.content = content_of(&msg[p.header.clone()], defaults[o.part]);
                    }
                    p.body.end = content_end.max(p.body.start);
                }
                let Some(multipart) = open.last_mut() else { break };
                if closing {
                    // What follows is the multipart's epilogue, part of its body.
                    multipart.boundary = None;
                } else if parts.len() < MIME_PARTS_MAX {
                    let (parent, default) = (multipart.part, multipart.child_default);
                    let child = parts.len();
                    parts.push(Part::starting_at(line_end, parts[parent].depth + 1));
                    defaults.push(default);
                    if let Holds::Parts(children) = &mut parts[parent].holds {
                        children.push(child);
                    }
                    open.push(Open { part: child, in_header: true, boundary: None, child_default: DefaultType::Text });
                }
                pos = line_end;
                continue;
            }
            if let Some(current) = open.last_mut()
                && current.in_header
                && (line == b"\r\n" || line == b"\n")
            {
                current.in_header = false;
                let index = current.part;
                let header = parts[index].header.start..line_end;
                let content = content_of(&msg[header.clone()], defaults[index]);
                let nested_allowed = parts[index].depth + 1 < MIME_DEPTH_MAX && parts.len() < MIME_PARTS_MAX;
                let boundary = content.boundary().filter(|b| valid(b)).map(|b| b.as_bytes().to_vec());
                let holds = match boundary {
                    Some(b) if content.main.eq_ignore_ascii_case("multipart") && nested_allowed => {
                        let digest = content.sub.eq_ignore_ascii_case("digest");
                        current.boundary = Some(b);
                        current.child_default = if digest { DefaultType::Message } else { DefaultType::Text };
                        Holds::Parts(Vec::new())
                    }
                    _ if content.is("message", "rfc822") && nested_allowed => {
                        // The attached message starts right after this part's header.
                        let attached = parts.len();
                        let depth = parts[index].depth + 1;
                        parts.push(Part::starting_at(line_end, depth));
                        defaults.push(DefaultType::Text);
                        open.push(Open {
                            part: attached,
                            in_header: true,
                            boundary: None,
                            child_default: DefaultType::Text,
                        });
                        Holds::Message(attached)
                    }
                    _ => Holds::Nothing,
                };
                let part = &mut parts[index];
                part.header = header;
                part.body = line_end..line_end;
                part.content = content;
                part.holds = holds;
            }
            pos = line_end;
        }
        for o in open {
            let p = &mut parts[o.part];
            if o.in_header {
                p.header.end = msg.len();
                p.body = msg.len()..msg.len();
                p.content = content_of(&msg[p.header.clone()], defaults[o.part]);
            }
            p.body.end = msg.len();
        }
        Structure { parts }
    }

    /// The part a section's part numbers name (RFC 3501 6.4.5): numbers count the parts
    /// of a multipart; a message/rfc822 part's numbers go on into its attached message;
    /// a message that is not multipart has one part, 1 (itself). An empty path is the
    /// message. `None` if there is no such part.
    pub fn resolve(&self, path: &[u32]) -> Option<usize> {
        let mut selected = 0;
        // Where the next number counts: a multipart, or a message whose part 1 is itself.
        let mut container = Some(0);
        let mut container_is_message = true;
        for n in path {
            let c = container?;
            let index = usize::try_from(n.checked_sub(1)?).ok()?;
            selected = match &self.parts.get(c)?.holds {
                Holds::Parts(children) => *children.get(index)?,
                _ if index == 0 && container_is_message => c,
                _ => return None,
            };
            (container, container_is_message) = match &self.parts.get(selected)?.holds {
                Holds::Parts(_) => (Some(selected), false),
                Holds::Message(attached) => (Some(*attached), true),
                Holds::Nothing => (None, false),
            };
        }
        Some(selected)
    }

    /// The message HEADER and TEXT apply to for part `index`: the message itself for the
    /// root, an attached message for a message/rfc822 part, none otherwise.
    pub fn message_of(&self, index: usize, path_empty: bool) -> Option<&Part> {
        if path_empty {
            return self.parts.first();
        }
        match self.parts.get(index)?.holds {
            Holds::Message(attached) => self.parts.get(attached),
            _ => None,
        }
    }
}

impl Part {
    fn starting_at(start: usize, depth: usize) -> Part {
        Part { header: start..start, body: start..start, holds: Holds::Nothing, content: Content::default(), depth }
    }
}

/// A boundary we look for: not empty, not too long.
fn valid(boundary: &str) -> bool {
    !boundary.is_empty() && boundary.len() <= BOUNDARY_LEN_MAX
}

/// Whether `line` delimits a multipart that is open: (its place in `open`, whether it is
/// the closing delimiter). The innermost multipart is tried first; a delimiter of an
/// outer one also ends every part inside it.
fn delimiter(line: &[u8], open: &[Open]) -> Option<(usize, bool)> {
    let rest = line.strip_prefix(b"--")?;
    for (level, o) in open.iter().enumerate().rev() {
        let Some(boundary) = &o.boundary else { continue };
        let Some(after) = rest.strip_prefix(boundary.as_slice()) else { continue };
        let (closing, after) = match after.strip_prefix(b"--") {
            Some(a) => (true, a),
            None => (false, after),
        };
        // Transport padding (spaces, tabs) may follow the boundary.
        if after.iter().all(|b| b.is_ascii_whitespace()) {
            return Some((level, closing));
        }
    }
    None
}

/// Where the content before the line starting at `pos` ends: before its CRLF or LF.
fn before_line_break(msg: &[u8], pos: usize) -> usize {
    if pos >= 2 && &msg[pos - 2..pos] == b"\r\n" {
        pos - 2
    } else if pos >= 1 && msg[pos - 1] == b'\n' {
        pos - 1
    } else {
        pos
    }
}

fn content_of(header: &[u8], default: DefaultType) -> Content {
    let (main, sub) = match default {
        DefaultType::Text => ("text", "plain"),
        DefaultType::Message => ("message", "rfc822"),
    };
    let mut content = Content { main: main.into(), sub: sub.into(), ..Content::default() };
    let Some(parsed) = MessageParser::default().parse_headers(header) else { return content };
    let part = parsed.root_part();
    if let Some(ct) = part.content_type() {
        // A type without a subtype is not a valid Content-Type; the default stands.
        if let Some(sub) = ct.subtype() {
            content.main = ct.ctype().to_string();
            content.sub = sub.to_string();
        }
        content.params = attributes(ct.attributes());
    }
    content.encoding = part.content_transfer_encoding().map(str::to_string);
    content.id = header_bytes(header, "Content-ID");
    content.description = header_bytes(header, "Content-Description");
    content.disposition = part.content_disposition().map(|d| (d.ctype().to_string(), attributes(d.attributes())));
    content.language = match part.content_language() {
        HeaderValue::Text(t) => vec![t.to_string()],
        HeaderValue::TextList(list) => list.iter().map(|t| t.to_string()).collect(),
        _ => Vec::new(),
    };
    content.location = header_bytes(header, "Content-Location");
    content.md5 = header_bytes(header, "Content-MD5");
    content
}

fn attributes(attrs: Option<&[mail_parser::Attribute<'_>]>) -> Vec<(String, String)> {
    attrs.unwrap_or_default().iter().map(|a| (a.name.to_string(), a.value.to_string())).collect()
}

/// The first `name` field of a header, unfolded and trimmed, as its bytes (so a raw
/// 8-bit value is shown as it came). None when absent or empty.
fn header_bytes(header: &[u8], name: &str) -> Option<Vec<u8>> {
    let mut value: Option<Vec<u8>> = None;
    for line in header.split_inclusive(|b| *b == b'\n') {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        match value.as_mut() {
            Some(v) if text.first().is_some_and(|b| *b == b' ' || *b == b'\t') => v.extend_from_slice(text),
            Some(_) => break,
            None => {
                let Some(colon) = memchr::memchr(b':', text) else { continue };
                if text[..colon].trim_ascii().eq_ignore_ascii_case(name.as_bytes()) {
                    value = Some(text[colon + 1..].to_vec());
                }
            }
        }
    }
    let value = value?;
    let value = value.trim_ascii();
    (!value.is_empty()).then(|| value.to_vec())
}

/// Offset where the body starts (after the blank line), or the end if there is none.
pub fn header_end(msg: &[u8]) -> usize {
    let mut pos = 0;
    while pos < msg.len() {
        let line_end = memchr::memchr(b'\n', &msg[pos..]).map(|i| pos + i + 1).unwrap_or(msg.len());
        let line = &msg[pos..line_end];
        if line == b"\r\n" || line == b"\n" {
            return line_end;
        }
        pos = line_end;
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

/// What a BODY[section] names, after its part numbers.
pub enum SectionText<'a> {
    /// BODY[] or BODY[1.2]: the whole message, or the part's body.
    All,
    Header,
    /// HEADER.FIELDS (names) or, with `not`, HEADER.FIELDS.NOT.
    HeaderFields {
        names: &'a [String],
        not: bool,
    },
    Text,
    /// The part's MIME header.
    Mime,
}

/// The bytes BODY[path.text] answers with; `None` when the section names nothing (a part
/// that does not exist, HEADER of a part that is no message): answered as empty.
pub fn section(msg: &[u8], structure: &Structure, path: &[u32], text: SectionText<'_>) -> Option<Vec<u8>> {
    let index = structure.resolve(path)?;
    let bytes = |r: &Range<usize>| msg.get(r.clone()).map(<[u8]>::to_vec);
    match text {
        SectionText::All if path.is_empty() => Some(msg.to_vec()),
        SectionText::All => bytes(&structure.parts.get(index)?.body),
        SectionText::Mime if path.is_empty() => None,
        SectionText::Mime => bytes(&structure.parts.get(index)?.header),
        SectionText::Header => bytes(&structure.message_of(index, path.is_empty())?.header),
        SectionText::Text => bytes(&structure.message_of(index, path.is_empty())?.body),
        SectionText::HeaderFields { names, not } => {
            let header = msg.get(structure.message_of(index, path.is_empty())?.header.clone())?;
            Some(header_fields(header, names, not))
        }
    }
}

/// BINARY[path] (RFC 3516): a leaf part's body decoded from its Content-Transfer-Encoding;
/// the whole message, a multipart or an attached message as they are. `Ok(None)` when
/// there is no such part; `Err` names an encoding that cannot be undone (UNKNOWN-CTE).
pub fn binary_section(msg: &[u8], structure: &Structure, path: &[u32]) -> Result<Option<Vec<u8>>, String> {
    if path.is_empty() {
        return Ok(Some(msg.to_vec()));
    }
    let Some(part) = structure.resolve(path).and_then(|i| structure.parts.get(i)) else { return Ok(None) };
    let body = msg.get(part.body.clone()).unwrap_or_default();
    if part.holds != Holds::Nothing {
        return Ok(Some(body.to_vec()));
    }
    let encoding = part.content.encoding.as_deref().unwrap_or("7bit").trim().to_ascii_lowercase();
    match encoding.as_str() {
        "7bit" | "8bit" | "binary" => Ok(Some(body.to_vec())),
        "base64" => {
            // Line breaks and other whitespace are not part of the data.
            let compact: Vec<u8> = body.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
            mail_parser::decoders::base64::base64_decode(&compact).map(Some).ok_or_else(|| "invalid base64".to_string())
        }
        "quoted-printable" => mail_parser::decoders::quoted_printable::quoted_printable_decode(body)
            .map(Some)
            .ok_or_else(|| "invalid quoted-printable".to_string()),
        other => Err(format!("unknown Content-Transfer-Encoding {other}")),
    }
}

/// A message received as binary (APPEND with a literal8, RFC 3516) with every part
/// declared `Content-Transfer-Encoding: binary`, or holding NUL bytes, re-encoded as
/// base64: what BODY[] answers must be text, and BINARY[] gives the bytes back. `None`
/// when no part needs it.
pub fn encode_binary_parts(msg: &[u8]) -> Option<Vec<u8>> {
    let structure = Structure::of(msg);
    let binary: Vec<&Part> = structure
        .parts
        .iter()
        .filter(|p| p.holds == Holds::Nothing)
        .filter(|p| {
            let encoding = p.content.encoding.as_deref().unwrap_or("7bit").trim().to_ascii_lowercase();
            let body = msg.get(p.body.clone()).unwrap_or_default();
            encoding == "binary" || (matches!(encoding.as_str(), "7bit" | "8bit") && body.contains(&0))
        })
        .collect();
    if binary.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(msg.len() * 4 / 3 + 64);
    let mut copied = 0;
    // Leaves do not overlap, and the walk found them in the order of their bytes.
    for part in binary {
        if part.header.start < copied {
            continue;
        }
        out.extend_from_slice(msg.get(copied..part.header.start)?);
        let header = msg.get(part.header.clone())?;
        let blank = if header.ends_with(b"\r\n\r\n") || header == b"\r\n" {
            2
        } else if header.ends_with(b"\n\n") || header == b"\n" {
            1
        } else {
            0
        };
        let fields = header_fields(&header[..header.len() - blank], &["Content-Transfer-Encoding".to_string()], true);
        // `header_fields` ends with its own blank line; the new field goes before it.
        out.extend_from_slice(&fields[..fields.len() - 2]);
        out.extend_from_slice(b"Content-Transfer-Encoding: base64\r\n");
        if blank > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(&base64_lines(msg.get(part.body.clone())?));
        copied = part.body.end;
    }
    out.extend_from_slice(msg.get(copied..)?);
    Some(out)
}

/// Base64 in lines of 76 characters, each ended by CRLF but the last.
fn base64_lines(bytes: &[u8]) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(bytes.len() * 4 / 3 + bytes.len() / 38 + 4);
    for (i, chunk) in bytes.chunks(3).enumerate() {
        if i > 0 && i % 19 == 0 {
            out.extend_from_slice(b"\r\n");
        }
        let n = chunk.iter().enumerate().fold(0u32, |n, (j, b)| n | u32::from(*b) << (16 - 8 * j));
        for j in 0..4 {
            if j <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * j) & 63) as usize]);
            } else {
                out.push(b'=');
            }
        }
    }
    out
}

/// The bytes of MIME part `path` (1-based numbers as in BODY[1.2]); `None` if no such
/// part. A non-multipart message has one part, 1: its body.
#[cfg(any(test, feature = "fuzzing"))]
pub fn part_bytes<'a>(msg: &'a [u8], path: &[u32]) -> Option<&'a [u8]> {
    let structure = Structure::of(msg);
    let index = structure.resolve(path)?;
    msg.get(structure.parts.get(index)?.body.clone())
}

/// An address list as ENVELOPE shows it, read from the field's own bytes, groups as
/// RFC 3501 marks them: a start (NIL NIL "name" NIL), the members, an end (NIL NIL NIL
/// NIL). `None` when the field is absent or holds no address.
fn address_list(header: &[u8], field: &str) -> Option<Vec<u8>> {
    let entries = address::entries(&header_bytes(header, field)?);
    if entries.is_empty() {
        return None;
    }
    let mut out = b"(".to_vec();
    for entry in entries {
        match entry {
            Entry::Address(a) => {
                out.push(b'(');
                for (n, value) in [a.name.filter(|n| !n.is_empty()), a.route, a.mailbox, a.host].iter().enumerate() {
                    if n > 0 {
                        out.push(b' ');
                    }
                    nstring(&mut out, value.as_deref());
                }
                out.push(b')');
            }
            Entry::GroupStart(name) => {
                out.extend_from_slice(b"(NIL NIL ");
                string(&mut out, &name);
                out.extend_from_slice(b" NIL)");
            }
            Entry::GroupEnd => out.extend_from_slice(b"(NIL NIL NIL NIL)"),
        }
    }
    out.push(b')');
    Some(out)
}

/// ENVELOPE of the message whose header is `header`: date, subject, from, sender,
/// reply-to, to, cc, bcc, in-reply-to, message-id, each as its bytes.
fn envelope_of_header(out: &mut Vec<u8>, header: &[u8]) {
    let from = address_list(header, "From");
    // An absent or empty Sender or Reply-To is the From (RFC 3501 7.4.2).
    let sender = address_list(header, "Sender").or_else(|| from.clone());
    let reply_to = address_list(header, "Reply-To").or_else(|| from.clone());
    let fields = [
        Field::Raw("Date"),
        Field::Raw("Subject"),
        Field::List(from),
        Field::List(sender),
        Field::List(reply_to),
        Field::List(address_list(header, "To")),
        Field::List(address_list(header, "Cc")),
        Field::List(address_list(header, "Bcc")),
        Field::Raw("In-Reply-To"),
        Field::Raw("Message-ID"),
    ];
    out.push(b'(');
    for (n, field) in fields.into_iter().enumerate() {
        if n > 0 {
            out.push(b' ');
        }
        match field {
            Field::Raw(name) => nstring(out, header_bytes(header, name).as_deref()),
            Field::List(Some(list)) => out.extend_from_slice(&list),
            Field::List(None) => out.extend_from_slice(b"NIL"),
        }
    }
    out.push(b')');
}

/// One ENVELOPE field: a header's value, or an address list already laid out.
enum Field {
    Raw(&'static str),
    List(Option<Vec<u8>>),
}

/// ENVELOPE of a message.
pub fn envelope(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    envelope_of_header(&mut out, &msg[..header_end(msg)]);
    out
}

/// The text SEARCH FROM/TO/CC/BCC look in: every address of the header `name` as
/// "Display Name <mailbox@host>" and every group as "group: ...;", so that comments,
/// quoting and folding do not hide an address (Dovecot searches the same form). `None`
/// when the header has no address: the caller then looks in the raw value.
pub fn address_search_text(header: &[u8], name: &str) -> Option<String> {
    let m = MessageParser::default().parse_headers(header)?;
    let value = match name.to_ascii_lowercase().as_str() {
        "from" => m.from(),
        "to" => m.to(),
        "cc" => m.cc(),
        "bcc" => m.bcc(),
        _ => None,
    }?;
    let one = |x: &mail_parser::Addr<'_>| match (x.name.as_deref(), x.address.as_deref()) {
        (Some(n), Some(a)) => format!("{n} <{a}>"),
        (None, Some(a)) => a.to_string(),
        (Some(n), None) => n.to_string(),
        (None, None) => String::new(),
    };
    let text: Vec<String> = match value {
        Address::List(addrs) => addrs.iter().map(one).collect(),
        Address::Group(groups) => groups
            .iter()
            .map(|g| {
                let members: Vec<String> = g.addresses.iter().map(one).collect();
                match g.name.as_deref() {
                    Some(name) => format!("{name}: {};", members.join(", ")),
                    None => members.join(", "),
                }
            })
            .collect(),
    };
    let text = text.join(", ");
    (!text.trim().is_empty()).then_some(text)
}

/// The day the Date: header names, in the sender's own time zone (RFC 3501's SENTON and
/// friends disregard time and zone); `None` when absent or unparseable.
pub fn sent_date(header: &[u8]) -> Option<chrono::NaiveDate> {
    let m = MessageParser::default().parse_headers(header)?;
    let d = m.date()?;
    chrono::NaiveDate::from_ymd_opt(i32::from(d.year), u32::from(d.month), u32::from(d.day))
}

/// What SORT compares, from one message's header.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SortFields {
    /// RFC 5256's base subject.
    pub subject: String,
    /// The mailbox (local part) of the first address; a group's name for a group.
    pub from: String,
    pub to: String,
    pub cc: String,
    /// RFC 5957: the first address's display name, or its address when it has none.
    pub display_from: String,
    pub display_to: String,
    /// The Date: header as seconds since the epoch (UTC).
    pub date: Option<i64>,
}

impl SortFields {
    pub fn of(header: &[u8]) -> SortFields {
        let Some(m) = MessageParser::default().parse_headers(header) else { return SortFields::default() };
        SortFields {
            subject: base_subject(m.subject().unwrap_or_default()),
            from: first_mailbox(m.from()),
            to: first_mailbox(m.to()),
            cc: first_mailbox(m.cc()),
            display_from: first_display(m.from()),
            display_to: first_display(m.to()),
            date: m.date().map(|d| d.to_timestamp()),
        }
    }
}

/// The first address of a list, or the name of a first group (as ENVELOPE's group start
/// carries it in the mailbox field).
enum First<'a> {
    Address(&'a mail_parser::Addr<'a>),
    Group(&'a str),
}

fn first<'a>(a: Option<&'a Address<'a>>) -> Option<First<'a>> {
    match a? {
        Address::List(list) => list.first().map(First::Address),
        Address::Group(groups) => {
            let g = groups.first()?;
            match g.name.as_deref() {
                Some(name) => Some(First::Group(name)),
                None => g.addresses.first().map(First::Address),
            }
        }
    }
}

fn first_mailbox(a: Option<&Address<'_>>) -> String {
    match first(a) {
        Some(First::Address(x)) => {
            // A bare word ("To: d") is read as a name without an address: it is the
            // mailbox there.
            let address = x.address.as_deref().or(x.name.as_deref()).unwrap_or_default();
            address.rsplit_once('@').map(|(local, _)| local).unwrap_or(address).to_string()
        }
        Some(First::Group(name)) => name.to_string(),
        None => String::new(),
    }
}

fn first_display(a: Option<&Address<'_>>) -> String {
    match first(a) {
        Some(First::Address(x)) => match x.name.as_deref().map(str::trim).filter(|n| !n.is_empty()) {
            Some(name) => name.to_string(),
            None => x.address.as_deref().unwrap_or_default().to_string(),
        },
        Some(First::Group(name)) => name.to_string(),
        None => String::new(),
    }
}

/// RFC 5256 2.1's base subject of a (decoded) subject: whitespace runs made one space,
/// then trailing "(fwd)", leading "Re:", "Fw:", "Fwd:" (with [blob]s before or inside
/// them) and a leading [blob] removed until none is left, and a "[fwd: ...]" wrapper
/// unwrapped. Each pass removes text, so the loops end.
pub fn base_subject(subject: &str) -> String {
    base_subject_and_reply(subject).0
}

/// [`base_subject`], and whether a reply or forward marker ("Re:", "Fwd:", "(fwd)",
/// "[fwd: ...]") was taken off (THREAD=REFERENCES joins replies under originals).
pub fn base_subject_and_reply(subject: &str) -> (String, bool) {
    let mut reply = false;
    let mut s = String::with_capacity(subject.len());
    for word in subject.split([' ', '\t', '\r', '\n']) {
        if !word.is_empty() {
            if !s.is_empty() || subject.starts_with([' ', '\t']) {
                s.push(' ');
            }
            s.push_str(word);
        }
    }
    let mut s = s.as_str();
    loop {
        // (2) trailers: "(fwd)" and spaces.
        loop {
            let trimmed = s.trim_end_matches(' ');
            match trimmed.len().checked_sub(5).filter(|at| trimmed.is_char_boundary(*at)) {
                Some(at) if trimmed[at..].eq_ignore_ascii_case("(fwd)") => {
                    s = &trimmed[..at];
                    reply = true;
                }
                _ => {
                    s = trimmed;
                    break;
                }
            }
        }
        // (3)-(5) leaders and blobs.
        loop {
            let before = s.len();
            while let Some((rest, marker)) = strip_leader(s) {
                s = rest;
                reply |= marker;
            }
            if let Some(rest) = strip_blob(s).filter(|rest| !rest.trim().is_empty()) {
                s = rest;
            }
            if s.len() == before {
                break;
            }
        }
        // (6) "[fwd: ...]".
        let wrapped = s.len() >= 6 && s.is_char_boundary(5) && s[..5].eq_ignore_ascii_case("[fwd:") && s.ends_with(']');
        if !wrapped {
            return (s.to_string(), reply);
        }
        s = &s[5..s.len() - 1];
        reply = true;
    }
}

/// subj-leader: (*subj-blob subj-refwd) / WSP; the rest after it, and whether it was a
/// reply or forward marker.
fn strip_leader(s: &str) -> Option<(&str, bool)> {
    if let Some(rest) = s.strip_prefix(' ') {
        return Some((rest, false));
    }
    let mut p = s;
    while let Some(rest) = strip_blob(p) {
        p = rest;
    }
    let starts = |p: &str, word: &str| {
        p.len() >= word.len() && p.is_char_boundary(word.len()) && p[..word.len()].eq_ignore_ascii_case(word)
    };
    let after = if starts(p, "re") {
        &p[2..]
    } else if starts(p, "fwd") {
        &p[3..]
    } else if starts(p, "fw") {
        &p[2..]
    } else {
        return None;
    };
    let after = after.trim_start_matches(' ');
    let after = strip_blob(after).unwrap_or(after);
    after.strip_prefix(':').map(|rest| (rest, true))
}

/// What THREAD needs from one message's header.
pub struct ThreadFields {
    pub message_id: Option<String>,
    /// References, or the first In-Reply-To without them (RFC 5256 4.(1)).
    pub references: Vec<String>,
    pub subject: String,
    pub reply: bool,
    /// The Date: header as seconds since the epoch (UTC).
    pub date: Option<i64>,
}

impl ThreadFields {
    pub fn of(header: &[u8]) -> ThreadFields {
        let Some(m) = MessageParser::default().parse_headers(header) else {
            return ThreadFields {
                message_id: None,
                references: Vec::new(),
                subject: String::new(),
                reply: false,
                date: None,
            };
        };
        let ids = |name: &str| m.header_raw(name).map(message_ids).unwrap_or_default();
        let mut references = ids("References");
        if references.is_empty() {
            references = ids("In-Reply-To").into_iter().take(1).collect();
        }
        let (subject, reply) = base_subject_and_reply(m.subject().unwrap_or_default());
        ThreadFields {
            message_id: ids("Message-ID").into_iter().next(),
            references,
            subject,
            reply,
            date: m.date().map(|d| d.to_timestamp()),
        }
    }
}

/// The `<...>` message identifiers in a header value, in order.
fn message_ids(value: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut rest = value;
    while let Some(open) = rest.find('<') {
        let Some(len) = rest[open..].find('>') else { break };
        let id: String = rest[open..open + len + 1].chars().filter(|c| !c.is_whitespace()).collect();
        if id.len() > 2 {
            ids.push(id);
        }
        rest = &rest[open + len + 1..];
    }
    ids
}

/// subj-blob: "[" *BLOBCHAR "]" *WSP; the rest after it.
fn strip_blob(s: &str) -> Option<&str> {
    let inner = s.strip_prefix('[')?;
    let end = inner.find(['[', ']'])?;
    inner[end..].strip_prefix(']').map(|rest| rest.trim_start_matches(' '))
}

/// BODYSTRUCTURE (with `extensible`: extension data as RFC 3501 gives it for
/// BODYSTRUCTURE) or BODY (without). Built bottom-up with an explicit stack; the tree is
/// already bounded by [`MIME_DEPTH_MAX`] and [`MIME_PARTS_MAX`].
#[cfg(test)]
pub fn bodystructure(msg: &[u8], extensible: bool) -> String {
    // Tests read it as text; the bytes of their messages are UTF-8.
    String::from_utf8_lossy(&describe(msg, &Structure::of(msg), extensible)).into_owned()
}

/// A container whose children are being described.
struct Frame {
    part: usize,
    children: Vec<usize>,
    next: usize,
    text: Vec<u8>,
}

/// [`bodystructure`] of a structure already found.
pub fn describe(msg: &[u8], structure: &Structure, extensible: bool) -> Vec<u8> {
    let parts = &structure.parts;
    let mut stack: Vec<Frame> = Vec::new();
    let mut current = Some(0usize);
    loop {
        if let Some(index) = current.take() {
            let Some(part) = parts.get(index) else { return b"NIL".to_vec() };
            let children = match &part.holds {
                Holds::Parts(children) => Some(children.clone()),
                Holds::Message(attached) => Some(vec![*attached]),
                Holds::Nothing => None,
            };
            match children {
                Some(children) => stack.push(Frame { part: index, children, next: 0, text: Vec::new() }),
                None => match stack.last_mut() {
                    Some(frame) => single_part(&mut frame.text, msg, part, None, extensible),
                    None => {
                        let mut leaf = Vec::new();
                        single_part(&mut leaf, msg, part, None, extensible);
                        return leaf;
                    }
                },
            }
        }
        let Some(frame) = stack.last_mut() else { return b"NIL".to_vec() };
        if let Some(child) = frame.children.get(frame.next) {
            frame.next += 1;
            current = Some(*child);
            continue;
        }
        let Some(done) = stack.pop() else { return b"NIL".to_vec() };
        let Some(part) = parts.get(done.part) else { return b"NIL".to_vec() };
        let mut text = Vec::new();
        match part.holds {
            Holds::Message(attached) => {
                let header = parts.get(attached).and_then(|a| msg.get(a.header.clone())).unwrap_or_default();
                let mut envelope = Vec::new();
                envelope_of_header(&mut envelope, header);
                single_part(&mut text, msg, part, Some((envelope, done.text)), extensible);
            }
            _ => multipart(&mut text, part, done.text, extensible),
        }
        match stack.last_mut() {
            Some(parent) => parent.text.extend_from_slice(&text),
            None => return text,
        }
    }
}

/// An uppercase token as a string (types, subtypes, encodings, parameter names).
fn upper(out: &mut Vec<u8>, text: &str) {
    string(out, text.to_ascii_uppercase().as_bytes());
}

fn param_list(out: &mut Vec<u8>, params: &[(String, String)]) {
    if params.is_empty() {
        out.extend_from_slice(b"NIL");
        return;
    }
    out.push(b'(');
    for (n, (name, value)) in params.iter().enumerate() {
        if n > 0 {
            out.push(b' ');
        }
        upper(out, name);
        out.push(b' ');
        string(out, value.as_bytes());
    }
    out.push(b')');
}

/// body-fld-dsp, body-fld-lang, body-fld-loc.
fn disposition_language_location(out: &mut Vec<u8>, c: &Content) {
    match &c.disposition {
        Some((kind, params)) => {
            out.push(b'(');
            upper(out, kind);
            out.push(b' ');
            param_list(out, params);
            out.push(b')');
        }
        None => out.extend_from_slice(b"NIL"),
    }
    out.push(b' ');
    match c.language.as_slice() {
        [] => out.extend_from_slice(b"NIL"),
        [one] => string(out, one.as_bytes()),
        many => {
            out.push(b'(');
            for (n, language) in many.iter().enumerate() {
                if n > 0 {
                    out.push(b' ');
                }
                string(out, language.as_bytes());
            }
            out.push(b')');
        }
    }
    out.push(b' ');
    nstring(out, c.location.as_deref());
}

fn multipart(out: &mut Vec<u8>, part: &Part, children: Vec<u8>, extensible: bool) {
    out.push(b'(');
    // A multipart needs a body: one with no parts is shown with an empty text part.
    if children.is_empty() {
        out.extend_from_slice(b"(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" 0 0)");
    } else {
        out.extend_from_slice(&children);
    }
    out.push(b' ');
    upper(out, &part.content.sub);
    if extensible {
        out.push(b' ');
        param_list(out, &part.content.params);
        out.push(b' ');
        disposition_language_location(out, &part.content);
    }
    out.push(b')');
}

/// A part described as one body; `attached` carries a message/rfc822 part's ENVELOPE
/// and the attached message's own structure.
fn single_part(out: &mut Vec<u8>, msg: &[u8], part: &Part, attached: Option<(Vec<u8>, Vec<u8>)>, extensible: bool) {
    let c = &part.content;
    let main = c.main.to_ascii_uppercase();
    out.push(b'(');
    upper(out, &main);
    out.push(b' ');
    upper(out, &c.sub);
    out.push(b' ');
    if c.params.is_empty() && main == "TEXT" {
        out.extend_from_slice(b"(\"CHARSET\" \"US-ASCII\")");
    } else {
        param_list(out, &c.params);
    }
    out.push(b' ');
    nstring(out, c.id.as_deref());
    out.push(b' ');
    nstring(out, c.description.as_deref());
    out.push(b' ');
    upper(out, c.encoding.as_deref().unwrap_or("7BIT"));
    let body = msg.get(part.body.clone()).unwrap_or_default();
    let lines = memchr::memchr_iter(b'\n', body).count();
    out.extend_from_slice(format!(" {}", body.len()).as_bytes());
    match attached {
        Some((envelope, structure)) => {
            out.push(b' ');
            out.extend_from_slice(&envelope);
            out.push(b' ');
            out.extend_from_slice(&structure);
            out.extend_from_slice(format!(" {lines}").as_bytes());
        }
        None if main == "TEXT" => out.extend_from_slice(format!(" {lines}").as_bytes()),
        None => {}
    }
    if extensible {
        out.push(b' ');
        nstring(out, c.md5.as_deref());
        out.push(b' ');
        disposition_language_location(out, c);
    }
    out.push(b')');
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
        let e = String::from_utf8_lossy(&envelope(MAIL)).into_owned();
        assert!(e.contains("\"Hi there\""), "{e}");
        assert!(e.contains("((\"Alice\" NIL \"alice\" \"example.org\"))"), "{e}");
        assert!(e.ends_with("NIL \"<1@example.org>\")"), "{e}");
        let b = bodystructure(MAIL, false);
        assert_eq!(b, "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" 14 2)");
        assert_eq!(part_bytes(MAIL, &[1]), Some(&b"Hello\r\nWorld\r\n"[..]));
        assert_eq!(part_bytes(MAIL, &[2]), None);
        assert_eq!(header_end(b"\r\nbody"), 2);
    }

    /// imaptest's fetch-body-mime message.
    const NESTED: &[u8] = b"From: user@domain.org\r\nDate: Sat, 24 Mar 2007 23:00:00 +0200\r\nMime-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"foo\r\n bar\"\r\n\r\nRoot MIME prologue\r\n\r\n--foo bar\r\n\
Content-Type: text/x-myown; charset=us-ascii\r\n\r\nhello\r\n\r\n--foo bar\r\nContent-Type: message/rfc822\r\n\r\n\
From: sub@domain.org\r\nDate: Sun, 12 Aug 2012 12:34:56 +0300\r\nSubject: submsg\r\n\
Content-Type: multipart/alternative; boundary=\"sub1\"\r\n\r\nSub MIME prologue\r\n--sub1\r\n\
Content-Type: text/html\r\n\r\n<p>Hello world</p>\r\n\r\n--sub1\r\nContent-Type: text/plain\r\n\r\n\
Hello another world\r\n\r\n--sub1--\r\nSub MIME epilogue\r\n\r\n--foo bar--\r\nRoot MIME epilogue\r\n";

    fn sec(path: &[u32], text: SectionText<'_>) -> String {
        let s = Structure::of(NESTED);
        String::from_utf8(section(NESTED, &s, path, text).unwrap_or_default()).unwrap()
    }

    #[test]
    fn sections_under_part_numbers_and_attached_messages() {
        assert_eq!(sec(&[1], SectionText::All), "hello\r\n");
        assert_eq!(sec(&[1], SectionText::Mime), "Content-Type: text/x-myown; charset=us-ascii\r\n\r\n");
        assert_eq!(sec(&[2], SectionText::Mime), "Content-Type: message/rfc822\r\n\r\n");
        assert!(sec(&[2], SectionText::All).starts_with("From: sub@domain.org\r\n"));
        assert!(sec(&[2], SectionText::All).ends_with("Sub MIME epilogue\r\n"));
        assert_eq!(
            sec(&[2], SectionText::Header),
            "From: sub@domain.org\r\nDate: Sun, 12 Aug 2012 12:34:56 +0300\r\nSubject: submsg\r\n\
Content-Type: multipart/alternative; boundary=\"sub1\"\r\n\r\n"
        );
        let names = ["from".to_string(), "subject".to_string()];
        assert_eq!(
            sec(&[2], SectionText::HeaderFields { names: &names, not: false }),
            "From: sub@domain.org\r\nSubject: submsg\r\n\r\n"
        );
        assert!(sec(&[2], SectionText::Text).starts_with("Sub MIME prologue\r\n--sub1"));
        assert_eq!(sec(&[2, 1], SectionText::All), "<p>Hello world</p>\r\n");
        assert_eq!(sec(&[2, 1], SectionText::Mime), "Content-Type: text/html\r\n\r\n");
        assert_eq!(sec(&[2, 2], SectionText::All), "Hello another world\r\n");
        assert_eq!(sec(&[3], SectionText::All), "");
        assert_eq!(sec(&[1], SectionText::Header), "");
    }

    #[test]
    fn attached_messages_nest_and_digests_default_to_messages() {
        let mail = b"Content-Type: message/rfc822\r\n\r\nContent-Type: message/rfc822\r\n\r\nSubject: in\r\n\r\nHello world\r\n";
        let s = Structure::of(mail);
        let get = |path: &[u32], text| String::from_utf8(section(mail, &s, path, text).unwrap_or_default()).unwrap();
        assert_eq!(
            get(&[1], SectionText::All),
            "Content-Type: message/rfc822\r\n\r\nSubject: in\r\n\r\nHello world\r\n"
        );
        assert_eq!(get(&[1, 1], SectionText::All), "Subject: in\r\n\r\nHello world\r\n");
        assert_eq!(get(&[1, 1, 1], SectionText::All), "Hello world\r\n");
        assert_eq!(get(&[1, 1], SectionText::Header), "Subject: in\r\n\r\n");
        assert_eq!(get(&[1, 1], SectionText::Text), "Hello world\r\n");

        let digest = b"Content-Type: multipart/digest; boundary=\"foo\"\r\n\r\nprologue\r\n\r\n--foo \r\n\r\n\
From: m1@example.com\r\nSubject: m1\r\n\r\nm1 body\r\n\r\n--foo \r\nX-Mime: m2 header\r\n\r\nSubject: m2\r\n\r\nm2 body\r\n\r\n--foo--\r\n\r\nepilogue\r\n";
        let s = Structure::of(digest);
        let get = |path: &[u32], text| String::from_utf8(section(digest, &s, path, text).unwrap_or_default()).unwrap();
        assert_eq!(get(&[1], SectionText::Mime), "\r\n");
        assert_eq!(get(&[1], SectionText::All), "From: m1@example.com\r\nSubject: m1\r\n\r\nm1 body\r\n");
        assert_eq!(get(&[1], SectionText::Header), "From: m1@example.com\r\nSubject: m1\r\n\r\n");
        assert_eq!(get(&[1], SectionText::Text), "m1 body\r\n");
        assert_eq!(get(&[2], SectionText::Mime), "X-Mime: m2 header\r\n\r\n");
        assert_eq!(get(&[2], SectionText::Text), "m2 body\r\n");
    }

    #[test]
    fn bodystructure_of_an_attached_message_has_its_envelope_structure_and_lines() {
        let b = bodystructure(NESTED, false);
        assert!(b.starts_with("((\"TEXT\" \"X-MYOWN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 7 1)"), "{b}");
        assert!(b.contains("(\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\" "), "{b}");
        assert!(
            b.contains("(\"Sun, 12 Aug 2012 12:34:56 +0300\" \"submsg\" ((NIL NIL \"sub\" \"domain.org\"))"),
            "{b}"
        );
        assert!(b.contains(" \"ALTERNATIVE\") 18) \"MIXED\")"), "{b}");
        let ext = bodystructure(NESTED, true);
        assert!(ext.ends_with(" \"MIXED\" (\"BOUNDARY\" \"foo bar\") NIL NIL NIL)"), "{ext}");
    }

    #[test]
    fn envelope_keeps_raw_8bit_headers_and_empty_groups() {
        let mail = b"Subject: caf\xe9 cr\xe8me\r\nTo: undisclosed-recipients:;\r\nFrom: a@b.org\r\n\r\nbody\r\n";
        let e = envelope(mail);
        // 8-bit bytes come back as they are, in a literal.
        assert!(e.windows(13).any(|w| w == b"{10}\r\ncaf\xe9 cr"), "{}", e.escape_ascii());
        let e = String::from_utf8_lossy(&e);
        assert!(e.contains("((NIL NIL \"undisclosed-recipients\" NIL)(NIL NIL NIL NIL))"), "{e}");
    }

    #[test]
    fn envelope_groups_and_routes() {
        let mail = b"From: user@domain (Real Name)\r\nTo: group: g1@d1.org, g2@d2.org;, group2: g3@d3.org;\r\n\
Cc: group:;, group2: (foo) ;\r\nBcc: <@route:user@domain>\r\n\r\nbody\r\n";
        let e = String::from_utf8_lossy(&envelope(mail)).into_owned();
        assert!(e.contains("((NIL NIL \"group\" NIL)(NIL NIL \"g1\" \"d1.org\")(NIL NIL \"g2\" \"d2.org\")(NIL NIL NIL NIL)(NIL NIL \"group2\" NIL)(NIL NIL \"g3\" \"d3.org\")(NIL NIL NIL NIL))"), "{e}");
        assert!(
            e.contains("((NIL NIL \"group\" NIL)(NIL NIL NIL NIL)(NIL NIL \"group2\" NIL)(NIL NIL NIL NIL))"),
            "{e}"
        );
        assert!(e.contains("((\"Real Name\" NIL \"user\" \"domain\"))"), "{e}");
        assert!(e.contains("((NIL \"@route\" \"user\" \"domain\"))"), "{e}");
    }

    #[test]
    fn addresses_and_dates_for_search() {
        let h = b"From: <user-from (comment)@ (comment) domain.org>\r\nTo: groupname: a@b.org;\r\n\
Date: Sun, 25 Mar 2007 00:00:00 +0200\r\n\r\n";
        // Comments become the display name; the address itself is whole again.
        assert!(address_search_text(h, "FROM").is_some_and(|t| t.ends_with("<user-from@domain.org>")));
        assert_eq!(address_search_text(h, "to").as_deref(), Some("groupname: a@b.org;"));
        assert_eq!(address_search_text(h, "cc"), None);
        assert_eq!(sent_date(h), chrono::NaiveDate::from_ymd_opt(2007, 3, 25));
        assert_eq!(sent_date(b"Date: someday\r\n\r\n"), None);
    }

    #[test]
    fn base_subjects_as_rfc_5256_strips_them() {
        for (subject, base) in [
            ("[foo] Fwd: [bar] Re: fw: b (fWd)  (fwd)", "b"),
            ("Re: [FWD: c]", "c"),
            ("[xyz]", "[xyz]"),
            (" ", ""),
            ("Ad: Re: Ad: Re: Ad: x", "Ad: Re: Ad: Re: Ad: x"),
            ("re: [fwd: [fwd: re: [fwd: babylon]]]", "babylon"),
            ("b (a)", "b (a)"),
            ("Re:\t hello   world", "hello world"),
            ("[fwd:]", ""),
        ] {
            assert_eq!(base_subject(subject), base, "{subject:?}");
        }
        let f = SortFields::of(b"From: foo bar <a@b.c>\r\nCc: user2: blah@d.org;\r\nTo: d\r\n\r\n");
        assert_eq!((f.from.as_str(), f.display_from.as_str()), ("a", "foo bar"));
        assert_eq!((f.cc.as_str(), f.to.as_str(), f.display_to.as_str()), ("user2", "d", "d"));
    }

    #[test]
    fn thread_fields_read_message_ids() {
        let h = b"Message-ID: <a@b>\r\nIn-Reply-To: <x@y> (comment) <z@y>\r\nSubject: Re: [list] hi (fwd)\r\n\r\n";
        let f = ThreadFields::of(h);
        assert_eq!(f.message_id.as_deref(), Some("<a@b>"));
        assert_eq!(f.references, vec!["<x@y>".to_string()]);
        assert_eq!((f.subject.as_str(), f.reply), ("hi", true));
        let f = ThreadFields::of(b"References: <1@x>\r\n <2@x>\r\nIn-Reply-To: <3@x>\r\nSubject: hi\r\n\r\n");
        assert_eq!(f.references, vec!["<1@x>".to_string(), "<2@x>".to_string()]);
        assert_eq!((f.message_id, f.reply), (None, false));
    }

    #[test]
    fn binary_parts_are_stored_as_base64_and_decoded_again() {
        let mail = b"From: a@b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n\0-\xe4\n\r\n";
        let stored = encode_binary_parts(mail).unwrap();
        let text = String::from_utf8(stored.clone()).unwrap();
        assert!(
            text.starts_with(
                "From: a@b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            ),
            "{text}"
        );
        let s = Structure::of(&stored);
        assert_eq!(binary_section(&stored, &s, &[1]).unwrap().unwrap(), b"\0-\xe4\n\r\n");
        assert_eq!(encode_binary_parts(MAIL), None);
        let long: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let encoded = base64_lines(&long);
        assert!(encoded.split(|b| *b == b'\n').all(|l| l.len() <= 77));
        let compact: Vec<u8> = encoded.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
        assert_eq!(mail_parser::decoders::base64::base64_decode(&compact).unwrap(), long);
        let qp = b"Content-Transfer-Encoding: quoted-printable\r\n\r\nfoo=3Dbar=\r\nbaz\r\n";
        assert_eq!(binary_section(qp, &Structure::of(qp), &[1]).unwrap().unwrap(), b"foo=barbaz\r\n");
        let odd = b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin\r\n";
        assert!(binary_section(odd, &Structure::of(odd), &[1]).is_err());
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
        let b = bodystructure(&mail, true);
        let depth = b.bytes().take_while(|c| *c == b'(').count();
        assert!(depth <= MIME_DEPTH_MAX + 1, "{depth}");
        assert!(depth >= 50, "{depth}");
        assert_eq!(b.matches('(').count(), b.matches(')').count());
        eprintln!("8000 levels: {} bytes of BODYSTRUCTURE in {:?}", b.len(), started.elapsed());
        // Attached messages count as levels too.
        let mut attached = Vec::new();
        for _ in 0..5000 {
            attached.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
        }
        let b = bodystructure(&attached, false);
        assert_eq!(b.matches('(').count(), b.matches(')').count());
        assert!(Structure::of(&attached).parts.len() <= MIME_DEPTH_MAX, "{}", Structure::of(&attached).parts.len());
        // A shallow multipart still shows every level.
        let b = bodystructure(&nested_multiparts(3), false);
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
        let b = bodystructure(&mail, false);
        assert!(b.matches("\"PLAIN\"").count() < MIME_PARTS_MAX, "{}", b.matches("\"PLAIN\"").count());
    }
}
