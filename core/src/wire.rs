//! The peer wire codec: every [`Envelope`] becomes one IMAP-like tagged text command.
//!
//! A command is `<src>.<dst>.<hops> <NAME> <args...>\r\n`, e.g. `s1.s3.0 ROOT 7 s1`.
//! Arguments are separated by one space: numbers in decimal (no sign, no leading zeros),
//! GUIDs as 32 lowercase hex digits, server ids as `s<n>`, flags as atoms, `NIL` for an
//! absent value, keywords (enum variants, booleans) as upper-case atoms, lists and
//! fixed groups in parentheses. Strings are IMAP quoted strings (`"a \"b\" \\ c"`) when
//! they hold printable ASCII only, else literals `{n}\r\n<n bytes>`. Message bodies are
//! always literals. After a literal the command line simply continues, as in IMAP.
//!
//! Mailboxes are never written inline: each direction of a connection numbers them. The
//! first command that mentions a mailbox is preceded by a binding line
//! `* MBOX <id> <user> <name>\r\n` and the command carries `<id>`. Ids run from 1 to
//! [`MAILBOX_IDS_MAX`]; when they are all taken the [`Encoder`] rebinds the ids round
//! robin (never one the current command uses), and the [`Decoder`] replaces the old key.
//!
//! | command | arguments after `<tag> <NAME>` |
//! |---|---|
//! | `LINKSTATE` | `<origin-sid> <seq> <epoch> <store-id> (<sid>...)` |
//! | `MEMBERS` | `((<sid> ACTIVE\|LEAVING\|RETIRED <string>)...) <store-id>` |
//! | `ROOT` | `<epoch> <root-sid>` |
//! | `DROPPED` | `<epoch>` |
//! | `WHO` | `<epoch> (<key>...)` |
//! | `MASTER` | `<epoch> <key> <master-sid> <generation>` |
//! | `MASTER-MOVE` | `<tag> <key> <requester-sid>` |
//! | `MOVED` | `<tag> <key> <epoch> <generation> (<state>...)` |
//! | `SAVE` | `<tag> <mbox> <guid> <received> (<flag>...) APPEND\|DELIVERY {n}<body>` |
//! | `CANCEL` | `<tag> <mbox> <guid> [TAKEN\|ORDERED]` (ORDERED: the sender ordered the save as master and answered no retry with it; absent: TAKEN) |
//! | `COPY` | `<tag> <src-mbox> <src-uid> <guid> <dst-mbox> <received> (<flag>...)` |
//! | `EXPUNGE` | `<tag> <mbox> (<uid>...)` |
//! | `STORE` | `<tag> <mbox> (<uid>...) (<add-flag>...) (<remove-flag>...) <unchangedsince>\|NIL <known-modseq>` |
//! | `BARRIER` | `<tag> <mbox>` |
//! | `MERGE` | `<tag> ((<first-uid> <last-uid>)...) <state> ((<guid> {n}<body>)...)` |
//! | `REPLY` | `<tag> <master-sid>\|NIL <result> RECORD <record>\|NIL` |
//! | `R-SAVE` | `<seq> <mbox> <uidvalidity> <record> {n}<body>` |
//! | `R-COPY` | `<seq> <mbox> <uidvalidity> <record>` |
//! | `R-EXPUNGE` | `<seq> <mbox> <uidvalidity> (<tombstone>...)` |
//! | `R-STORE` | `<seq> <mbox> <uidvalidity> <stamp-modseq> <stamp-sid> ((<uid> <guid>)...) (<add-flag>...) (<remove-flag>...)` |
//! | `R-MERGE` | `<seq> <state>` |
//! | `ACK` | `(<seq>...) (<refused-seq>...) <store-id>` |
//! | `MBOX-REQ` | `<tag> <key>` |
//! | `MBOX` | `<tag> <mbox> <uidvalidity> <uidnext> <count> <highest-modseq> <digest>` |
//! | `MBOX-DONE` | `<tag> <count>` |
//! | `SYNC` | `FIRST\|REPLY <state>` |
//! | `FETCH` | `<guid>` |
//! | `BODY` | `<guid> <checksum> {n}<body>` |
//! | `ERROR` | `<string>` |
//!
//! where `<key>` is `MAILBOX <mbox>`, `USER <string>`, `DOMAIN <string>` or `GLOBAL`;
//! `<state>` is `(<mbox> <uidvalidity> <uidnext> <highest-modseq> (<record>...) (<tombstone>...))`;
//! `<record>` is `(<uid> <guid> <received> <size> <checksum> <modseq> ((<flag> SET|CLEAR <modseq> <sid>)...))`,
//! where `<size>` has the claim and the push in its top bits (`MessageRecord::packed_size`);
//! `<tombstone>` is `(<uid> <guid> <modseq> RETIRED|EXPUNGED|LOST|CANCELLED|EXPUNGED-PUSHED|EXPUNGED-DELETED)`; and `<result>` is one of
//! `SAVED <uidvalidity> <uid> <guid>`, `COPIED <uidvalidity> <uid> <guid>`,
//! `EXPUNGED (<uid>...) <modseq>`, `STORED <modseq> (<rejected-uid>...) ((<uid> (<flag>...) <modseq>)...)`,
//! `FAILED TEMPORARY|PERMANENT <string>`, `MAILBOX-DONE <modseq>`, `POSITION <highest-modseq> <digest>`,
//! `MERGED <modseq> (<guid>...)`.
//!
//! Limits: a command's text (everything but message bodies, string literals included) is
//! at most [`LINE_LEN_MAX`] bytes, a body at most [`LITERAL_LEN_MAX`], a list at most
//! [`LIST_LEN_MAX`] elements. Error offsets count from the start of the `input` given to
//! [`Decoder::decode`].

use crate::Error;
use crate::membership::MemberState;
use crate::msg::*;
use crate::types::*;
use std::collections::{BTreeMap, BTreeSet};

/// Largest message body literal; refused from its header, before the bytes arrive.
pub const LITERAL_LEN_MAX: usize = 64 * 1024 * 1024;
/// Largest text of one command (or binding line): all its bytes but message bodies.
pub const LINE_LEN_MAX: usize = 1024 * 1024;
/// Most elements in any parenthesised list.
pub const LIST_LEN_MAX: usize = 1_000_000;
/// Mailbox ids of one connection direction run from 1 to this.
pub const MAILBOX_IDS_MAX: u32 = 1_000_000;

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// One direction's sending state: which mailbox ids the peer's [`Decoder`] knows.
#[derive(Default, Debug, Clone)]
pub struct Encoder {
    ids: BTreeMap<MailboxKey, u32>,
    keys: BTreeMap<u32, MailboxKey>,
    /// Where the round-robin search for an id to rebind starts once all ids are taken.
    evict_next: u32,
    /// Tests lower the id limit; 0 means [`MAILBOX_IDS_MAX`].
    ids_max: u32,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the bytes of one envelope (binding lines first if needed) to `out`.
    /// An envelope the peer's [`Decoder`] would refuse (see [`Encoder::try_encode`]) is
    /// not written at all: the protocol recovers from a lost message, not from a link
    /// that drops on every attempt to send one. The core never asks for such a thing.
    pub fn encode(&mut self, env: &Envelope, out: &mut Vec<u8>) {
        let _ = self.try_encode(env, out);
    }

    /// Appends the bytes of one envelope to `out`, or refuses (appending nothing and
    /// binding nothing) when a line of it would pass [`LINE_LEN_MAX`] or a list
    /// [`LIST_LEN_MAX`], so that the encoder never emits what the decoder refuses.
    pub fn try_encode(&mut self, env: &Envelope, out: &mut Vec<u8>) -> Result<(), Error> {
        let evict_next = self.evict_next;
        let mut w = Writer::new(self);
        w.atom(&format!("{}.{}.{}", env.src, env.dst, env.hops));
        write_msg(&mut w, &env.msg);
        let Writer { line, bindings, body_bytes, list_max, binding_max, undo, .. } = w;
        let too_large = if line.len().saturating_sub(body_bytes) > LINE_LEN_MAX || binding_max > LINE_LEN_MAX {
            Some(Error::TooLarge { what: "command text", limit: LINE_LEN_MAX })
        } else if list_max > LIST_LEN_MAX {
            Some(Error::TooLarge { what: "list", limit: LIST_LEN_MAX })
        } else {
            None
        };
        if let Some(e) = too_large {
            // Forget the bindings this command made: the peer never sees them.
            for (id, key, old) in undo.into_iter().rev() {
                self.ids.remove(&key);
                self.keys.remove(&id);
                if let Some(old) = old {
                    self.keys.insert(id, old.clone());
                    self.ids.insert(old, id);
                }
            }
            self.evict_next = evict_next;
            return Err(e);
        }
        out.extend_from_slice(&bindings);
        out.extend_from_slice(&line);
        out.extend_from_slice(b"\r\n");
        Ok(())
    }

    fn ids_max(&self) -> u32 {
        if self.ids_max == 0 { MAILBOX_IDS_MAX } else { self.ids_max }
    }

    /// The id of `key`; binds one first (appending its line to `bindings`) when the peer
    /// does not know `key`. `used` holds the ids the current command already refers to.
    /// Each new binding is pushed on `undo` as (id, key, the key it replaced).
    fn id_of(
        &mut self,
        key: &MailboxKey,
        used: &mut BTreeSet<u32>,
        bindings: &mut Vec<u8>,
        undo: &mut Vec<(u32, MailboxKey, Option<MailboxKey>)>,
    ) -> u32 {
        if let Some(&id) = self.ids.get(key) {
            used.insert(id);
            return id;
        }
        let id = self.unused_id(used);
        let old = self.keys.insert(id, key.clone());
        if let Some(old) = &old {
            self.ids.remove(old);
        }
        undo.push((id, key.clone(), old));
        self.ids.insert(key.clone(), id);
        used.insert(id);
        bindings.extend_from_slice(format!("* MBOX {id} ").as_bytes());
        put_string(bindings, &key.user);
        bindings.push(b' ');
        put_string(bindings, &key.name);
        bindings.extend_from_slice(b"\r\n");
        id
    }

    /// A fresh id while there are some, then the next id round robin that the current
    /// command does not use. A single command naming more than the limit of distinct
    /// mailboxes gets an id above the limit, which the peer refuses.
    fn unused_id(&mut self, used: &BTreeSet<u32>) -> u32 {
        let max = self.ids_max();
        let bound = u32::try_from(self.keys.len()).unwrap_or(u32::MAX);
        if bound < max {
            return bound + 1;
        }
        if used.len() >= max as usize {
            return max.saturating_add(1);
        }
        let mut id = self.evict_next.clamp(1, max);
        while used.contains(&id) {
            id = id % max + 1;
        }
        self.evict_next = id % max + 1;
        id
    }
}

/// Appends `s` as a quoted string when it is printable ASCII, else as a literal.
fn put_string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(is_quotable) {
        out.push(b'"');
        for b in s.bytes() {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        put_literal(out, s.as_bytes());
    }
}

fn put_literal(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(format!("{{{}}}\r\n", bytes.len()).as_bytes());
    out.extend_from_slice(bytes);
}

fn is_quotable(b: u8) -> bool {
    (0x20..=0x7e).contains(&b)
}

/// Builds one command: its text in `line`, the binding lines it needs in `bindings`.
/// Every token method writes the separating space itself.
struct Writer<'e> {
    enc: &'e mut Encoder,
    line: Vec<u8>,
    bindings: Vec<u8>,
    used: BTreeSet<u32>,
    /// At the start of the command or right after `(`: no space before the next token.
    fresh: bool,
    /// Bytes of message bodies in `line` (they do not count against [`LINE_LEN_MAX`]).
    body_bytes: usize,
    /// The longest list and the longest binding line written.
    list_max: usize,
    binding_max: usize,
    /// Bindings made for this command, to forget if it is refused.
    undo: Vec<(u32, MailboxKey, Option<MailboxKey>)>,
}

impl<'e> Writer<'e> {
    fn new(enc: &'e mut Encoder) -> Self {
        Writer {
            enc,
            line: Vec::new(),
            bindings: Vec::new(),
            used: BTreeSet::new(),
            fresh: true,
            body_bytes: 0,
            list_max: 0,
            binding_max: 0,
            undo: Vec::new(),
        }
    }

    fn sep(&mut self) {
        if !self.fresh {
            self.line.push(b' ');
        }
        self.fresh = false;
    }

    fn atom(&mut self, atom: &str) -> &mut Self {
        self.sep();
        self.line.extend_from_slice(atom.as_bytes());
        self
    }

    fn num(&mut self, n: impl Into<u64>) -> &mut Self {
        self.atom(&n.into().to_string())
    }

    fn guid(&mut self, guid: Guid) -> &mut Self {
        self.atom(&guid.to_string())
    }

    fn sid(&mut self, sid: Sid) -> &mut Self {
        self.atom(&sid.to_string())
    }

    fn flag(&mut self, flag: &Flag) -> &mut Self {
        self.atom(flag.as_str())
    }

    fn string(&mut self, s: &str) -> &mut Self {
        self.sep();
        put_string(&mut self.line, s);
        self
    }

    fn body(&mut self, body: &[u8]) -> &mut Self {
        self.sep();
        put_literal(&mut self.line, body);
        self.body_bytes += body.len();
        self
    }

    fn mailbox(&mut self, key: &MailboxKey) -> &mut Self {
        let before = self.bindings.len();
        let id = self.enc.id_of(key, &mut self.used, &mut self.bindings, &mut self.undo);
        self.binding_max = self.binding_max.max((self.bindings.len() - before).saturating_sub(2));
        self.num(id)
    }

    fn opt<T>(&mut self, value: Option<T>, f: impl FnOnce(&mut Self, T)) -> &mut Self {
        match value {
            Some(v) => f(self, v),
            None => {
                self.atom("NIL");
            }
        }
        self
    }

    /// `(` items `)`.
    fn list<I: IntoIterator>(&mut self, items: I, mut f: impl FnMut(&mut Self, I::Item)) -> &mut Self {
        self.sep();
        self.line.push(b'(');
        self.fresh = true;
        let mut n = 0;
        for item in items {
            f(self, item);
            n += 1;
        }
        self.list_max = self.list_max.max(n);
        self.line.push(b')');
        self.fresh = false;
        self
    }

    /// A fixed group of fields in parentheses.
    fn group(&mut self, f: impl FnOnce(&mut Self)) -> &mut Self {
        self.sep();
        self.line.push(b'(');
        self.fresh = true;
        f(self);
        self.line.push(b')');
        self.fresh = false;
        self
    }

    fn flags(&mut self, flags: &[Flag]) -> &mut Self {
        self.list(flags, |w, f| {
            w.flag(f);
        })
    }

    fn uids(&mut self, uids: &[Uid]) -> &mut Self {
        self.list(uids, |w, &uid| {
            w.num(uid);
        })
    }
}

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// One direction's receiving state: the mailbox ids the peer's [`Encoder`] bound.
#[derive(Default, Debug, Clone)]
pub struct Decoder {
    mailboxes: BTreeMap<u32, MailboxKey>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one envelope from the front of `input`. Ok(Some((env, consumed))) when a
    /// whole command (with its binding lines) is there; Ok(None) when more bytes are
    /// needed (a TCP stream may cut anywhere); Err on malformed bytes. Binding lines
    /// consumed before a command are included in `consumed`. Never panics.
    ///
    /// Retry semantics: binding lines take effect only together with the command that
    /// follows them. On Ok(None) and on Err the decoder is unchanged, so the caller keeps
    /// every unconsumed byte and calls again with the same front plus what arrived since
    /// (each call parses from the start of `input`). After an Err the stream cannot be
    /// resynchronised: drop the connection.
    pub fn decode(&mut self, input: &[u8]) -> Result<Option<(Envelope, usize)>, Error> {
        let mut r = Reader::new(input, &self.mailboxes);
        let result = r.envelope();
        let (consumed, pending) = (r.pos, r.pending);
        match result {
            Ok(env) => {
                self.mailboxes.extend(pending);
                Ok(Some((env, consumed)))
            }
            Err(Stop::More) => Ok(None),
            Err(Stop::Bad(e)) => Err(e),
        }
    }
}

/// Whether `env` can be encoded within the decoder's limits (with a fresh encoder: a
/// binding line, if needed, is checked too).
pub fn fits(env: &Envelope) -> bool {
    Encoder::new().try_encode(env, &mut Vec::new()).is_ok()
}

/// Convenience for tests and the simulator's wire switch: encodes with a fresh pair and
/// decodes back.
pub fn roundtrip(env: &Envelope) -> Result<Envelope, Error> {
    let mut bytes = Vec::new();
    Encoder::new().encode(env, &mut bytes);
    match Decoder::new().decode(&bytes)? {
        Some((decoded, n)) if n == bytes.len() => Ok(decoded),
        Some((_, n)) => Err(Error::Decode { offset: n, expected: "the end of the input".into() }),
        None => Err(Error::Decode { offset: bytes.len(), expected: "a complete command".into() }),
    }
}

/// Why parsing stopped: the input ends too early, or it is wrong.
enum Stop {
    More,
    Bad(Error),
}

type Parse<T> = Result<T, Stop>;

fn too_large<T>(what: &'static str, limit: usize) -> Parse<T> {
    Err(Stop::Bad(Error::TooLarge { what, limit }))
}

/// A cursor over `input`. A command is read one line segment at a time: `line_end` is
/// the CR of the current segment, found before any token of it is read, so tokens never
/// wait for bytes; only a segment's CRLF and a literal's bytes can be missing.
struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
    line_end: usize,
    /// Text bytes of the current command so far (segments and string literals).
    text: usize,
    /// At the start of a line or right after `(`: no space before the next token.
    fresh: bool,
    table: &'a BTreeMap<u32, MailboxKey>,
    /// Bindings read before the command, committed with it.
    pending: BTreeMap<u32, MailboxKey>,
}

impl<'a> Reader<'a> {
    fn new(input: &'a [u8], table: &'a BTreeMap<u32, MailboxKey>) -> Self {
        Reader { input, pos: 0, line_end: 0, text: 0, fresh: true, table, pending: BTreeMap::new() }
    }

    fn bad<T>(&self, offset: usize, expected: impl Into<String>) -> Parse<T> {
        Err(Stop::Bad(Error::Decode { offset, expected: expected.into() }))
    }

    // -- lines ---------------------------------------------------------------------------

    /// Binding lines, then one command.
    fn envelope(&mut self) -> Parse<Envelope> {
        let mut bindings = 0usize;
        loop {
            if self.pos >= self.input.len() {
                return Err(Stop::More);
            }
            self.text = 0;
            self.fresh = true;
            self.find_line()?;
            if self.rest_of_line().first() != Some(&b'*') {
                return self.command();
            }
            if bindings >= MAILBOX_IDS_MAX as usize {
                return too_large("mailbox bindings before one command", MAILBOX_IDS_MAX as usize);
            }
            self.binding()?;
            bindings += 1;
        }
    }

    /// Sets `line_end` to the CRLF ending the segment at `pos`, within the text budget.
    fn find_line(&mut self) -> Parse<()> {
        let budget = LINE_LEN_MAX.saturating_sub(self.text);
        let rest = self.input.get(self.pos..).unwrap_or(&[]);
        let window = rest.get(..budget.saturating_add(2)).unwrap_or(rest);
        match window.windows(2).position(|pair| pair == b"\r\n") {
            Some(len) => {
                self.line_end = self.pos + len;
                self.text += len;
                Ok(())
            }
            None if rest.len() > budget.saturating_add(1) => too_large("command text", LINE_LEN_MAX),
            None => Err(Stop::More),
        }
    }

    fn rest_of_line(&self) -> &'a [u8] {
        self.input.get(self.pos..self.line_end).unwrap_or(&[])
    }

    fn peek(&self) -> Option<u8> {
        self.rest_of_line().first().copied()
    }

    /// `* MBOX <id> <user> <name>`
    fn binding(&mut self) -> Parse<()> {
        let (at, word) = self.token()?;
        if word != b"*" {
            return self.bad(at, "'*' starting a binding line");
        }
        let (at, word) = self.token()?;
        if word != b"MBOX" {
            return self.bad(at, "MBOX after '*'");
        }
        let (at, id) = self.u32_at()?;
        if id == 0 {
            return self.bad(at, "a mailbox id from 1 up");
        }
        if id > MAILBOX_IDS_MAX {
            return too_large("mailbox id", MAILBOX_IDS_MAX as usize);
        }
        let key = MailboxKey::from_shared(self.string()?.into(), self.string()?.into());
        self.end()?;
        self.pending.insert(id, key);
        Ok(())
    }

    /// `<src>.<dst>.<hops> <NAME> <args...>`
    fn command(&mut self) -> Parse<Envelope> {
        let (at, word) = self.token()?;
        let Some((src, dst, hops)) = parse_tag(word) else {
            return self.bad(at, "a tag <src>.<dst>.<hops> such as s1.s2.0");
        };
        let (at, name) = self.token()?;
        let msg = read_msg(self, name, at)?;
        self.end()?;
        Ok(Envelope { src, dst, hops, msg })
    }

    /// The end of the command: its final CRLF.
    fn end(&mut self) -> Parse<()> {
        if self.pos != self.line_end {
            return self.bad(self.pos, "the end of the command (CRLF)");
        }
        self.pos += 2;
        Ok(())
    }

    // -- tokens --------------------------------------------------------------------------

    fn sep(&mut self) -> Parse<()> {
        if self.fresh {
            self.fresh = false;
            return Ok(());
        }
        match self.peek() {
            Some(b' ') => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => self.bad(self.pos, "a space"),
            None => self.bad(self.pos, "more arguments (the command ended early)"),
        }
    }

    /// The next word: the bytes up to a space, `)` or the end of the segment, and where
    /// it starts. Words are checked by their callers.
    fn token(&mut self) -> Parse<(usize, &'a [u8])> {
        self.sep()?;
        let line = self.rest_of_line();
        let len = line.iter().position(|&b| b == b' ' || b == b')').unwrap_or(line.len());
        let at = self.pos;
        self.pos += len;
        Ok((at, line.get(..len).unwrap_or(&[])))
    }

    fn u64(&mut self) -> Parse<u64> {
        let (at, word) = self.token()?;
        parse_decimal(word).or_else(|expected| self.bad(at, expected))
    }

    fn u32(&mut self) -> Parse<u32> {
        Ok(self.u32_at()?.1)
    }

    /// A u32 and where it starts.
    fn u32_at(&mut self) -> Parse<(usize, u32)> {
        let (at, word) = self.token()?;
        let n = parse_decimal(word).or_else(|expected| self.bad(at, expected))?;
        let n = u32::try_from(n).or_else(|_| self.bad(at, "a number of at most 4294967295"))?;
        Ok((at, n))
    }

    fn guid(&mut self) -> Parse<Guid> {
        let (at, word) = self.token()?;
        parse_guid(word).map_or_else(|| self.bad(at, "a GUID (32 lowercase hex digits)"), Ok)
    }

    fn sid(&mut self) -> Parse<Sid> {
        let (at, word) = self.token()?;
        parse_sid(word).map_or_else(|| self.bad(at, "a server id s<n> (n up to 4294967295)"), Ok)
    }

    fn flag(&mut self) -> Parse<Flag> {
        let (at, word) = self.token()?;
        match std::str::from_utf8(word).ok().map(Flag::new) {
            Some(Ok(flag)) => Ok(flag),
            _ => self.bad(at, "a flag (an atom such as \\Seen or $Junk)"),
        }
    }

    fn string(&mut self) -> Parse<String> {
        self.sep()?;
        let at = self.pos;
        let bytes = match self.peek() {
            Some(b'"') => self.quoted()?,
            Some(b'{') => self.literal(false)?.to_vec(),
            _ => return self.bad(at, "a string (\"quoted\" or a {n} literal)"),
        };
        String::from_utf8(bytes).or_else(|_| self.bad(at, "a string of UTF-8 text"))
    }

    fn quoted(&mut self) -> Parse<Vec<u8>> {
        let start = self.pos;
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return self.bad(start, "a closing '\"' (unterminated quoted string)"),
                Some(b'"') => break,
                Some(b'\\') => match self.rest_of_line().get(1) {
                    Some(&c @ (b'"' | b'\\')) => {
                        out.push(c);
                        self.pos += 2;
                    }
                    _ => {
                        return self.bad(self.pos, "\\\" or \\\\ (the only escapes in a quoted string)");
                    }
                },
                Some(b) if is_quotable(b) => {
                    out.push(b);
                    self.pos += 1;
                }
                Some(_) => {
                    return self.bad(self.pos, "a printable ASCII character in a quoted string");
                }
            }
        }
        self.pos += 1;
        Ok(out)
    }

    fn body(&mut self) -> Parse<Body> {
        self.sep()?;
        if self.peek() != Some(b'{') {
            return self.bad(self.pos, "a message body literal {n}");
        }
        Ok(Body::copy_from_slice(self.literal(true)?))
    }

    /// `{n}\r\n<n bytes>` at `pos`; then reads up to the CRLF of the following segment.
    /// A body counts against [`LITERAL_LEN_MAX`], a string against the command text.
    fn literal(&mut self, body: bool) -> Parse<&'a [u8]> {
        let start = self.pos;
        let header = self.rest_of_line().get(1..).unwrap_or(&[]);
        let Some(close) = header.iter().position(|&b| b == b'}') else {
            return self.bad(start, "a literal header {n}");
        };
        let n = parse_decimal(header.get(..close).unwrap_or(&[])).or_else(|e| self.bad(start + 1, e))?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if body && n > LITERAL_LEN_MAX {
            return too_large("literal", LITERAL_LEN_MAX);
        }
        if !body && n > LINE_LEN_MAX.saturating_sub(self.text) {
            return too_large("command text", LINE_LEN_MAX);
        }
        self.pos = start + close + 2;
        if self.pos != self.line_end {
            return self.bad(self.pos, "CRLF right after the literal header");
        }
        let first = self.line_end + 2;
        let Some(bytes) = first.checked_add(n).and_then(|last| self.input.get(first..last)) else {
            return Err(Stop::More);
        };
        if !body {
            self.text += n;
        }
        self.pos = first + n;
        self.find_line()?;
        Ok(bytes)
    }

    /// `NIL`, or what `f` reads.
    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Parse<T>) -> Parse<Option<T>> {
        let (pos, fresh) = (self.pos, self.fresh);
        if self.token()?.1 == b"NIL" {
            return Ok(None);
        }
        (self.pos, self.fresh) = (pos, fresh);
        f(self).map(Some)
    }

    fn open(&mut self) -> Parse<()> {
        self.sep()?;
        if self.peek() != Some(b'(') {
            return self.bad(self.pos, "'('");
        }
        self.pos += 1;
        self.fresh = true;
        Ok(())
    }

    fn close(&mut self) -> bool {
        if self.peek() != Some(b')') {
            return false;
        }
        self.pos += 1;
        self.fresh = false;
        true
    }

    /// `(` elements read by `f`, separated by spaces, `)`.
    fn list<T>(&mut self, mut f: impl FnMut(&mut Self) -> Parse<T>) -> Parse<Vec<T>> {
        self.open()?;
        let mut items = Vec::new();
        while !self.close() {
            if items.len() >= LIST_LEN_MAX {
                return too_large("list", LIST_LEN_MAX);
            }
            items.push(f(self)?);
        }
        Ok(items)
    }

    /// A fixed group of fields in parentheses.
    fn group<T>(&mut self, f: impl FnOnce(&mut Self) -> Parse<T>) -> Parse<T> {
        self.open()?;
        let value = f(self)?;
        if !self.close() {
            return self.bad(self.pos, "')'");
        }
        Ok(value)
    }

    fn flags(&mut self) -> Parse<Vec<Flag>> {
        self.list(Self::flag)
    }

    fn uids(&mut self) -> Parse<Vec<Uid>> {
        self.list(Self::u32)
    }

    /// A mailbox id, bound by this command's binding lines or an earlier command's.
    fn mailbox(&mut self) -> Parse<MailboxKey> {
        let (at, id) = self.u32_at()?;
        match self.pending.get(&id).or_else(|| self.table.get(&id)) {
            Some(key) => Ok(key.clone()),
            None => self.bad(at, format!("a mailbox id bound by * MBOX (id {id} is unbound)")),
        }
    }
}

/// A decimal number without sign or leading zeros, or what was expected instead.
fn parse_decimal(word: &[u8]) -> Result<u64, &'static str> {
    if word.is_empty() || !word.iter().all(u8::is_ascii_digit) {
        return Err("a decimal number");
    }
    if word.len() > 1 && word.first() == Some(&b'0') {
        return Err("a decimal number without leading zeros");
    }
    word.iter()
        .try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
        .ok_or("a number of at most 18446744073709551615")
}

fn parse_sid(word: &[u8]) -> Option<Sid> {
    let n = parse_decimal(word.strip_prefix(b"s")?).ok()?;
    u32::try_from(n).ok().map(Sid)
}

fn parse_guid(word: &[u8]) -> Option<Guid> {
    if word.len() != 32 || !word.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let text = std::str::from_utf8(word).ok()?;
    u128::from_str_radix(text, 16).ok().map(Guid)
}

/// `<src>.<dst>.<hops>`
fn parse_tag(word: &[u8]) -> Option<(Sid, Sid, u8)> {
    let mut parts = word.split(|&b| b == b'.');
    let src = parse_sid(parts.next()?)?;
    let dst = parse_sid(parts.next()?)?;
    let hops = u8::try_from(parse_decimal(parts.next()?).ok()?).ok()?;
    match parts.next() {
        Some(_) => None,
        None => Some((src, dst, hops)),
    }
}

// ---------------------------------------------------------------------------------------
// Layouts: each `write_x` is next to its `read_x`, field for field.
// ---------------------------------------------------------------------------------------

fn write_msg(w: &mut Writer, msg: &Msg) {
    w.atom(msg.name());
    write_fields(w, msg);
}

/// The fields of routing, root and mastership messages (the rest: see
/// `write_replication_msg`).
fn write_fields(w: &mut Writer, msg: &Msg) {
    match msg {
        Msg::LinkState { origin, seq, epoch, store, neighbors } => {
            w.sid(*origin).num(*seq).num(*epoch).num(*store).list(neighbors, |w, &s| {
                w.sid(s);
            });
        }
        Msg::Members { members, store } => {
            let entries: Vec<(Sid, &crate::membership::Member)> = members.entries().collect();
            w.list(&entries, |w, (sid, m)| {
                w.group(|w| {
                    w.sid(*sid).atom(member_state_atom(m.state)).string(&m.address);
                });
            })
            .num(*store);
        }
        Msg::Root { epoch, root } => {
            w.num(*epoch).sid(*root);
        }
        Msg::Dropped { epoch } => {
            w.num(*epoch);
        }
        Msg::Who { epoch, keys } => {
            w.num(*epoch).list(keys, write_master_key);
        }
        Msg::MasterIs { epoch, key, master, generation } => {
            w.num(*epoch);
            write_master_key(w, key);
            w.sid(*master).num(*generation);
        }
        Msg::MasterMove { tag, key, requester } => {
            w.num(*tag);
            write_master_key(w, key);
            w.sid(*requester);
        }
        Msg::MoveDone { tag, key, epoch, generation, states } => {
            w.num(*tag);
            write_master_key(w, key);
            w.num(*epoch).num(*generation).list(states, write_state);
        }
        other => write_replication_msg(w, other),
    }
}

fn write_reply(w: &mut Writer, tag: u64, master: Option<Sid>, result: &WriteResult, record: Option<&MessageRecord>) {
    w.num(tag).opt(master, |w, s| {
        w.sid(s);
    });
    write_result(w, result);
    match record {
        Some(r) => {
            w.atom("RECORD");
            write_record(w, r);
        }
        None => {
            w.atom("NIL");
        }
    }
}

/// The fields of requests, replies, log changes, summaries, SYNCs and bodies.
fn write_replication_msg(w: &mut Writer, msg: &Msg) {
    match msg {
        Msg::LinkState { .. }
        | Msg::Members { .. }
        | Msg::Root { .. }
        | Msg::Dropped { .. }
        | Msg::Who { .. }
        | Msg::MasterIs { .. }
        | Msg::MasterMove { .. }
        | Msg::MoveDone { .. } => debug_assert!(false, "{} is written by write_fields", msg.name()),
        Msg::Request { tag, request } => {
            w.num(*tag);
            write_request(w, request);
        }
        Msg::Reply { tag, master, result, record } => write_reply(w, *tag, *master, result, record.as_ref()),
        Msg::Change { seq, change } => {
            w.num(*seq);
            write_change(w, change);
        }
        Msg::Ack { seqs, refused, store } => {
            w.list(seqs, |w, &seq| {
                w.num(seq);
            })
            .list(refused, |w, &seq| {
                w.num(seq);
            })
            .num(*store);
        }
        Msg::MboxRequest { tag, key } => {
            w.num(*tag);
            write_master_key(w, key);
        }
        Msg::Mbox { tag, summary: s } => {
            w.num(*tag).mailbox(&s.mailbox);
            w.num(s.uidvalidity).num(s.uidnext).num(s.count);
            w.num(s.highest_modseq).num(s.digest);
        }
        Msg::MboxDone { tag, count } => {
            w.num(*tag).num(*count);
        }
        Msg::Sync { reply, state } => {
            w.atom(if *reply { "REPLY" } else { "FIRST" });
            write_state(w, state);
        }
        Msg::SyncPart { state } => {
            write_state(w, state);
        }
        Msg::Fetch { guid } => {
            w.guid(*guid);
        }
        Msg::Body { guid, checksum, body } => {
            w.guid(*guid).num(*checksum).body(body);
        }
        Msg::NoBody { guid } => {
            w.guid(*guid);
        }
        Msg::Error { text } => {
            w.string(text);
        }
    }
}

fn read_msg(r: &mut Reader, name: &[u8], at: usize) -> Parse<Msg> {
    Ok(match name {
        b"LINKSTATE" => Msg::LinkState {
            origin: r.sid()?,
            seq: r.u64()?,
            epoch: r.u64()?,
            store: r.u64()?,
            neighbors: r.list(Reader::sid)?,
        },
        b"MEMBERS" => {
            let entries = r.list(|r| {
                r.group(|r| {
                    let sid = r.sid()?;
                    let state = [MemberState::Active, MemberState::Leaving, MemberState::Retired]
                        [read_keyword(r, &["ACTIVE", "LEAVING", "RETIRED"])?];
                    let address = r.string()?;
                    Ok((sid, crate::membership::Member { state, address }))
                })
            })?;
            Msg::Members { members: crate::membership::Membership::from_entries(entries), store: r.u64()? }
        }
        b"ROOT" => Msg::Root { epoch: r.u64()?, root: r.sid()? },
        b"DROPPED" => Msg::Dropped { epoch: r.u64()? },
        b"WHO" => Msg::Who { epoch: r.u64()?, keys: r.list(read_master_key)? },
        b"MASTER" => {
            Msg::MasterIs { epoch: r.u64()?, key: read_master_key(r)?, master: r.sid()?, generation: r.u64()? }
        }
        b"MASTER-MOVE" => Msg::MasterMove { tag: r.u64()?, key: read_master_key(r)?, requester: r.sid()? },
        b"MOVED" => Msg::MoveDone {
            tag: r.u64()?,
            key: read_master_key(r)?,
            epoch: r.u64()?,
            generation: r.u64()?,
            states: r.list(read_state)?,
        },
        b"SAVE" | b"IMPORT" | b"CANCEL" | b"COPY" | b"EXPUNGE" | b"STORE" | b"MAILBOX" | b"RENAME" | b"BARRIER"
        | b"MERGE" => Msg::Request { tag: r.u64()?, request: read_request(r, name)? },
        b"REPLY" => Msg::Reply {
            tag: r.u64()?,
            master: r.opt(Reader::sid)?,
            result: read_result(r)?,
            record: match read_keyword(r, &["NIL", "RECORD"])? {
                0 => None,
                _ => Some(read_record(r)?),
            },
        },
        b"R-SAVE" | b"R-COPY" | b"R-EXPUNGE" | b"R-STORE" | b"R-MERGE" => {
            Msg::Change { seq: r.u64()?, change: read_change(r, name)? }
        }
        b"ACK" => Msg::Ack { seqs: r.list(Reader::u64)?, refused: r.list(Reader::u64)?, store: r.u64()? },
        b"MBOX-REQ" => Msg::MboxRequest { tag: r.u64()?, key: read_master_key(r)? },
        b"MBOX" => Msg::Mbox {
            tag: r.u64()?,
            summary: Summary {
                mailbox: r.mailbox()?,
                uidvalidity: r.u32()?,
                uidnext: r.u32()?,
                count: r.u32()?,
                highest_modseq: r.u64()?,
                digest: r.u64()?,
            },
        },
        b"MBOX-DONE" => Msg::MboxDone { tag: r.u64()?, count: r.u32()? },
        b"SYNC" => Msg::Sync { reply: read_keyword(r, &["FIRST", "REPLY"])? == 1, state: read_state(r)? },
        b"SYNC-PART" => Msg::SyncPart { state: read_state(r)? },
        b"FETCH" => Msg::Fetch { guid: r.guid()? },
        b"BODY" => Msg::Body { guid: r.guid()?, checksum: r.u64()?, body: r.body()? },
        b"NOBODY" => Msg::NoBody { guid: r.guid()? },
        b"ERROR" => Msg::Error { text: r.string()? },
        _ => {
            return r.bad(at, format!("a known command, not {:?}", String::from_utf8_lossy(name)));
        }
    })
}

fn member_state_atom(state: MemberState) -> &'static str {
    match state {
        MemberState::Active => "ACTIVE",
        MemberState::Leaving => "LEAVING",
        MemberState::Retired => "RETIRED",
    }
}

/// One of `keywords`, as its index.
fn read_keyword(r: &mut Reader, keywords: &[&str]) -> Parse<usize> {
    let (at, word) = r.token()?;
    match keywords.iter().position(|k| k.as_bytes() == word) {
        Some(i) => Ok(i),
        None => r.bad(at, format!("one of {}", keywords.join(", "))),
    }
}

fn write_master_key(w: &mut Writer, key: &MasterKey) {
    match key {
        MasterKey::Mailbox(k) => w.atom("MAILBOX").mailbox(k),
        MasterKey::User(user) => w.atom("USER").string(user),
        MasterKey::Domain(domain) => w.atom("DOMAIN").string(domain),
        MasterKey::Global => w.atom("GLOBAL"),
    };
}

fn read_master_key(r: &mut Reader) -> Parse<MasterKey> {
    Ok(match read_keyword(r, &["MAILBOX", "USER", "DOMAIN", "GLOBAL"])? {
        0 => MasterKey::Mailbox(r.mailbox()?),
        1 => MasterKey::User(r.string()?),
        2 => MasterKey::Domain(r.string()?),
        _ => MasterKey::Global,
    })
}

fn write_request(w: &mut Writer, request: &WriteRequest) {
    match request {
        WriteRequest::Save { mailbox, guid, received, flags, body, delivery } => {
            w.mailbox(mailbox).guid(*guid).num(*received).flags(flags);
            w.atom(if *delivery { "DELIVERY" } else { "APPEND" }).body(body);
        }
        WriteRequest::Import { mailbox, guid, received, flags, body, uidvalidity, uid } => {
            w.mailbox(mailbox).guid(*guid).num(*received).flags(flags).num(*uidvalidity).num(*uid).body(body);
        }
        WriteRequest::Cancel { mailbox, guid, sender_ordered } => {
            w.mailbox(mailbox).guid(*guid).atom(if *sender_ordered { "ORDERED" } else { "TAKEN" });
        }
        WriteRequest::Copy { src, src_uid, guid, dst, received, flags } => {
            w.mailbox(src).num(*src_uid).guid(*guid).mailbox(dst).num(*received).flags(flags);
        }
        WriteRequest::Expunge { mailbox, messages } => {
            w.mailbox(mailbox);
            write_uid_guids(w, messages);
        }
        WriteRequest::Store { mailbox, messages, add, remove, unchanged_since, known_modseq } => {
            w.mailbox(mailbox);
            write_uid_guids(w, messages);
            w.flags(add).flags(remove);
            w.opt(*unchanged_since, |w, m| {
                w.num(m);
            });
            w.num(*known_modseq);
        }
        WriteRequest::Mailbox { mailbox, action } => {
            w.mailbox(mailbox).atom(match action {
                MailboxAction::Create => "CREATE",
                MailboxAction::CreateWithUse(_) => "CREATE-USE",
                MailboxAction::Delete => "DELETE",
                MailboxAction::Subscribe => "SUBSCRIBE",
                MailboxAction::Unsubscribe => "UNSUBSCRIBE",
                MailboxAction::CreateWithValidity(_) => "CREATE-VALIDITY",
            });
            match action {
                MailboxAction::CreateWithUse(special_use) => {
                    w.num(special_use.0);
                }
                MailboxAction::CreateWithValidity(uidvalidity) => {
                    w.num(*uidvalidity);
                }
                _ => {}
            }
        }
        WriteRequest::Rename { from, to } => {
            w.mailbox(from).mailbox(to);
        }
        WriteRequest::Barrier { mailbox } => {
            w.mailbox(mailbox);
        }
        WriteRequest::Merge { state, bodies, from_cluster } => {
            w.list(from_cluster, |w, &(first, last)| {
                w.group(|w| {
                    w.num(first).num(last);
                });
            });
            write_state(w, state);
            w.list(bodies, |w, (guid, body)| {
                w.group(|w| {
                    w.guid(*guid).body(body);
                });
            });
        }
    }
}

/// `((<uid> <guid>)...)`: messages as the sender's client saw them.
fn write_uid_guids(w: &mut Writer, messages: &[(Uid, Guid)]) {
    w.list(messages, |w, &(uid, guid)| {
        w.group(|w| {
            w.num(uid).guid(guid);
        });
    });
}

fn read_uid_guids(r: &mut Reader) -> Parse<Vec<(Uid, Guid)>> {
    r.list(|r| r.group(|r| Ok((r.u32()?, r.guid()?))))
}

/// `name` is one of SAVE, COPY, EXPUNGE, STORE (checked by [`read_msg`]).
fn read_request(r: &mut Reader, name: &[u8]) -> Parse<WriteRequest> {
    Ok(match name {
        b"SAVE" => WriteRequest::Save {
            mailbox: r.mailbox()?,
            guid: r.guid()?,
            received: r.u64()?,
            flags: r.flags()?,
            delivery: read_keyword(r, &["APPEND", "DELIVERY"])? == 1,
            body: r.body()?,
        },
        b"IMPORT" => WriteRequest::Import {
            mailbox: r.mailbox()?,
            guid: r.guid()?,
            received: r.u64()?,
            flags: r.flags()?,
            uidvalidity: r.u32()?,
            uid: r.u32()?,
            body: r.body()?,
        },
        b"CANCEL" => WriteRequest::Cancel {
            mailbox: r.mailbox()?,
            guid: r.guid()?,
            // Absent from a node of the version before (its word is not given).
            sender_ordered: r.peek() == Some(b' ') && read_keyword(r, &["TAKEN", "ORDERED"])? == 1,
        },
        b"COPY" => WriteRequest::Copy {
            src: r.mailbox()?,
            src_uid: r.u32()?,
            guid: r.guid()?,
            dst: r.mailbox()?,
            received: r.u64()?,
            flags: r.flags()?,
        },
        b"EXPUNGE" => WriteRequest::Expunge { mailbox: r.mailbox()?, messages: read_uid_guids(r)? },
        b"MAILBOX" => {
            let mailbox = r.mailbox()?;
            let keywords = ["CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE", "CREATE-USE", "CREATE-VALIDITY"];
            let action = match read_keyword(r, &keywords)? {
                0 => MailboxAction::Create,
                1 => MailboxAction::Delete,
                2 => MailboxAction::Subscribe,
                3 => MailboxAction::Unsubscribe,
                4 => MailboxAction::CreateWithUse(read_special_use(r)?),
                _ => MailboxAction::CreateWithValidity(r.u32()?),
            };
            WriteRequest::Mailbox { mailbox, action }
        }
        b"RENAME" => WriteRequest::Rename { from: r.mailbox()?, to: r.mailbox()? },
        b"BARRIER" => WriteRequest::Barrier { mailbox: r.mailbox()? },
        b"MERGE" => WriteRequest::Merge {
            from_cluster: r.list(|r| r.group(|r| Ok((r.u32()?, r.u32()?))))?,
            state: Box::new(read_state(r)?),
            bodies: r.list(|r| r.group(|r| Ok((r.guid()?, r.body()?))))?,
        },
        _ => WriteRequest::Store {
            mailbox: r.mailbox()?,
            messages: read_uid_guids(r)?,
            add: r.flags()?,
            remove: r.flags()?,
            unchanged_since: r.opt(Reader::u64)?,
            known_modseq: r.u64()?,
        },
    })
}

fn write_result(w: &mut Writer, result: &WriteResult) {
    match result {
        WriteResult::Saved { uidvalidity, uid, guid } => {
            w.atom("SAVED").num(*uidvalidity).num(*uid).guid(*guid);
        }
        WriteResult::Copied { uidvalidity, uid, guid } => {
            w.atom("COPIED").num(*uidvalidity).num(*uid).guid(*guid);
        }
        WriteResult::Expunged { uids, modseq } => {
            w.atom("EXPUNGED").uids(uids).num(*modseq);
        }
        WriteResult::Stored { modseq, rejected, current } => {
            w.atom("STORED").num(*modseq).uids(rejected).list(current, |w, c| {
                w.group(|w| {
                    w.num(c.uid).flags(&c.flags).num(c.modseq);
                });
            });
        }
        WriteResult::Failed { kind, reason } => {
            let kind = match kind {
                FailKind::Temporary => "TEMPORARY",
                FailKind::Permanent => "PERMANENT",
            };
            w.atom("FAILED").atom(kind).string(reason);
        }
        WriteResult::MailboxDone { modseq } => {
            w.atom("MAILBOX-DONE").num(*modseq);
        }
        WriteResult::Position { highest_modseq, digest } => {
            w.atom("POSITION").num(*highest_modseq).num(*digest);
        }
        WriteResult::Merged { modseq, missing } => {
            w.atom("MERGED").num(*modseq).list(missing, |w, guid| {
                w.guid(*guid);
            });
        }
    }
}

fn read_result(r: &mut Reader) -> Parse<WriteResult> {
    Ok(
        match read_keyword(
            r,
            &["SAVED", "COPIED", "EXPUNGED", "STORED", "FAILED", "MAILBOX-DONE", "POSITION", "MERGED"],
        )? {
            0 => WriteResult::Saved { uidvalidity: r.u32()?, uid: r.u32()?, guid: r.guid()? },
            1 => WriteResult::Copied { uidvalidity: r.u32()?, uid: r.u32()?, guid: r.guid()? },
            2 => WriteResult::Expunged { uids: r.uids()?, modseq: r.u64()? },
            3 => WriteResult::Stored {
                modseq: r.u64()?,
                rejected: r.uids()?,
                current: r
                    .list(|r| r.group(|r| Ok(CurrentFlags { uid: r.u32()?, flags: r.flags()?, modseq: r.u64()? })))?,
            },
            5 => WriteResult::MailboxDone { modseq: r.u64()? },
            6 => WriteResult::Position { highest_modseq: r.u64()?, digest: r.u64()? },
            7 => WriteResult::Merged { modseq: r.u64()?, missing: r.list(Reader::guid)? },
            _ => WriteResult::Failed {
                kind: match read_keyword(r, &["TEMPORARY", "PERMANENT"])? {
                    0 => FailKind::Temporary,
                    _ => FailKind::Permanent,
                },
                reason: r.string()?,
            },
        },
    )
}

fn write_change(w: &mut Writer, change: &Change) {
    match change {
        Change::Save { mailbox, uidvalidity, record, body } => {
            w.mailbox(mailbox).num(*uidvalidity);
            write_record(w, record);
            w.body(body);
        }
        Change::Copy { mailbox, uidvalidity, record } => {
            w.mailbox(mailbox).num(*uidvalidity);
            write_record(w, record);
        }
        Change::Expunge { mailbox, uidvalidity, tombstones } => {
            w.mailbox(mailbox).num(*uidvalidity).list(tombstones, write_tombstone);
        }
        Change::Store { mailbox, uidvalidity, stamp, messages, add, remove } => {
            w.mailbox(mailbox).num(*uidvalidity).num(stamp.modseq).sid(stamp.sid);
            w.list(messages, |w, &(uid, guid)| {
                w.group(|w| {
                    w.num(uid).guid(guid);
                });
            });
            w.flags(add).flags(remove);
        }
        Change::Merge { state } => write_state(w, state),
    }
}

/// `name` is one of R-SAVE, R-COPY, R-EXPUNGE, R-STORE, R-MERGE (checked by [`read_msg`]).
fn read_change(r: &mut Reader, name: &[u8]) -> Parse<Change> {
    Ok(match name {
        b"R-SAVE" => {
            Change::Save { mailbox: r.mailbox()?, uidvalidity: r.u32()?, record: read_record(r)?, body: r.body()? }
        }
        b"R-COPY" => Change::Copy { mailbox: r.mailbox()?, uidvalidity: r.u32()?, record: read_record(r)? },
        b"R-EXPUNGE" => {
            Change::Expunge { mailbox: r.mailbox()?, uidvalidity: r.u32()?, tombstones: r.list(read_tombstone)? }
        }
        b"R-STORE" => Change::Store {
            mailbox: r.mailbox()?,
            uidvalidity: r.u32()?,
            stamp: Stamp { modseq: r.u64()?, sid: r.sid()? },
            messages: r.list(|r| r.group(|r| Ok((r.u32()?, r.guid()?))))?,
            add: r.flags()?,
            remove: r.flags()?,
        },
        _ => Change::Merge { state: Box::new(read_state(r)?) },
    })
}

fn write_state(w: &mut Writer, state: &MailboxState) {
    w.group(|w| {
        w.mailbox(&state.mailbox).num(state.uidvalidity).num(state.uidnext).num(state.highest_modseq);
        w.list(&state.messages, write_record).list(&state.tombstones, write_tombstone);
        w.num(state.lifecycle.created_at).num(state.lifecycle.deleted_at);
        w.num(state.lifecycle.subscribed_at).num(state.lifecycle.unsubscribed_at);
        let ranges: Vec<(Uid, Uid)> = state.retired.ranges.iter().map(|(a, b)| (*a, *b)).collect();
        w.num(state.retired.collected).list(&ranges, |w, (first, last)| {
            w.group(|w| {
                w.num(*first).num(*last);
            });
        });
        // Last and only when set, so a state without one reads as it always did.
        if state.lifecycle.special_use_at > 0 {
            w.num(state.lifecycle.special_use_at).num(state.lifecycle.special_use.0);
        }
    });
}

/// A special-use set: a number whose bits all name a use.
fn read_special_use(r: &mut Reader) -> Parse<SpecialUse> {
    let at = r.pos;
    let bits = r.u32()?;
    match u8::try_from(bits).map(SpecialUse) {
        Ok(special_use) if special_use.is_valid() => Ok(special_use),
        _ => r.bad(at, "a special-use set (bits 1 to 64)"),
    }
}

fn read_retired(r: &mut Reader) -> Parse<Retired> {
    let collected = r.u64()?;
    let at = r.pos;
    let ranges = r.list(|r| r.group(|r| Ok((r.u32()?, r.u32()?))))?;
    let mut retired = Retired { ranges: BTreeMap::new(), collected };
    for (first, last) in ranges {
        if first == 0 || first > last {
            return r.bad(at, "retired UID ranges that run upwards from 1");
        }
        retired.insert_range(first, last);
    }
    Ok(retired)
}

fn read_state(r: &mut Reader) -> Parse<MailboxState> {
    r.group(|r| {
        let mut state = MailboxState {
            mailbox: r.mailbox()?,
            uidvalidity: r.u32()?,
            uidnext: r.u32()?,
            highest_modseq: r.u64()?,
            messages: r.list(read_record)?,
            tombstones: r.list(read_tombstone)?,
            lifecycle: Lifecycle {
                created_at: r.u64()?,
                deleted_at: r.u64()?,
                subscribed_at: r.u64()?,
                unsubscribed_at: r.u64()?,
                ..Lifecycle::default()
            },
            retired: read_retired(r)?,
        };
        if r.peek() == Some(b' ') {
            let at = r.pos;
            state.lifecycle.special_use_at = r.u64()?;
            state.lifecycle.special_use = read_special_use(r)?;
            if state.lifecycle.special_use_at == 0 {
                return r.bad(at, "a special use's modseq from 1 up");
            }
        }
        Ok(state)
    })
}

fn write_record(w: &mut Writer, m: &MessageRecord) {
    w.group(|w| {
        // The claim and the push ride in the size's top bits (`MessageRecord::packed_size`).
        w.num(m.uid).guid(m.guid).num(m.received).num(m.packed_size()).num(m.checksum).num(m.modseq);
        w.list(&m.flags, |w, (flag, state)| {
            w.group(|w| {
                w.flag(flag).atom(if state.present { "SET" } else { "CLEAR" });
                w.num(state.stamp.modseq).sid(state.stamp.sid);
            });
        });
    });
}

fn read_record(r: &mut Reader) -> Parse<MessageRecord> {
    r.group(|r| {
        let (uid, guid, received) = (r.u32()?, r.guid()?, r.u64()?);
        let PackedSize { size, claimed, pushed } = MessageRecord::unpack_size(r.u32()?);
        Ok(MessageRecord {
            uid,
            guid,
            received,
            size,
            checksum: r.u64()?,
            modseq: r.u64()?,
            flags: read_flag_states(r)?.into(),
            claimed,
            pushed,
        })
    })
}

/// `((<flag> SET|CLEAR <modseq> <sid>)...)`, each flag at most once.
fn read_flag_states(r: &mut Reader) -> Parse<BTreeMap<Flag, FlagState>> {
    let entries = r.list(|r| {
        r.group(|r| {
            let at = r.pos;
            let flag = r.flag()?;
            let present = read_keyword(r, &["CLEAR", "SET"])? == 1;
            let stamp = Stamp { modseq: r.u64()?, sid: r.sid()? };
            Ok((at, flag, FlagState { present, stamp }))
        })
    })?;
    let mut flags = BTreeMap::new();
    for (at, flag, state) in entries {
        if flags.insert(flag, state).is_some() {
            return r.bad(at, "a flag not already listed for this message");
        }
    }
    Ok(flags)
}

fn write_tombstone(w: &mut Writer, t: &Tombstone) {
    w.group(|w| {
        w.num(t.uid).guid(t.guid).num(t.modseq).atom(Tombstone::FATE_NAMES[usize::from(t.fate_code())]);
    });
}

fn read_tombstone(r: &mut Reader) -> Parse<Tombstone> {
    r.group(|r| {
        let (uid, guid, modseq) = (r.u32()?, r.guid()?, r.u64()?);
        let at = r.pos;
        let fate = read_keyword(r, &Tombstone::FATE_NAMES)?;
        match u8::try_from(fate).ok().and_then(|code| Tombstone::with_fate(uid, guid, modseq, code)) {
            Some(t) => Ok(t),
            None => r.bad(at, "a tombstone's fate"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flag(s: &str) -> Flag {
        Flag::new(s).unwrap()
    }

    fn key(user: &str, name: &str) -> MailboxKey {
        MailboxKey::new(user, name)
    }

    fn env(src: u32, dst: u32, hops: u8, msg: Msg) -> Envelope {
        Envelope { src: Sid(src), dst: Sid(dst), hops, msg }
    }

    fn record(uid: Uid) -> MessageRecord {
        let stamp = |modseq, sid| Stamp { modseq, sid: Sid(sid) };
        MessageRecord {
            uid,
            guid: Guid(0x0123_4567_89ab_cdef_0011_2233_4455_6677 + u128::from(uid)),
            received: 1_700_000_000 + u64::from(uid),
            size: 1234,
            checksum: u64::MAX - u64::from(uid),
            modseq: 40 + u64::from(uid),
            flags: Flags::from(BTreeMap::from([
                (flag("\\Seen"), FlagState { present: true, stamp: stamp(41, 1) }),
                (flag("\\Deleted"), FlagState { present: false, stamp: stamp(42, 2) }),
                (flag("$Junk"), FlagState { present: true, stamp: stamp(u64::MAX, u32::MAX) }),
            ])),
            claimed: false,
            pushed: false,
        }
    }

    fn state(mailbox: MailboxKey) -> MailboxState {
        MailboxState {
            mailbox,
            uidvalidity: 77,
            uidnext: 10,
            highest_modseq: 99,
            messages: vec![record(1), record(2), MessageRecord { flags: Flags::default(), ..record(3) }],
            tombstones: vec![Tombstone::expunge(4, Guid(u128::MAX), 5), Tombstone::retirement(5, Guid(0), 0)],
            lifecycle: Lifecycle {
                created_at: 3,
                deleted_at: 7,
                subscribed_at: 5,
                unsubscribed_at: 4,
                special_use: SpecialUse(32),
                special_use_at: 6,
            },
            retired: Retired { ranges: [(6, 6), (8, 9)].into_iter().collect(), collected: 98 },
        }
    }

    /// Every Msg variant and every nested enum variant, with mailbox names that need
    /// quoting, escapes and literals.
    fn samples() -> Vec<Envelope> {
        let inbox = key("alice@example.org", "INBOX");
        let odd = key("bob \"the\" \\builder\\", "Sent Items");
        let wild = key("zoë@例え.jp", "Ünïcödé\r\n\0{3}\r\n\"");
        let guid = Guid(0xdead_beef_0000_0000_0000_0000_0000_0001);
        let keys = vec![
            MasterKey::Mailbox(odd.clone()),
            MasterKey::User("alice@example.org".into()),
            MasterKey::Domain("例え.jp".into()),
            MasterKey::Global,
        ];
        let store = |unchanged_since| WriteRequest::Store {
            mailbox: inbox.clone(),
            messages: vec![(1, Guid(1)), (2, Guid(2)), (u32::MAX, Guid(u128::MAX))],
            add: vec![flag("\\Seen"), flag("work")],
            remove: vec![flag("\\Flagged")],
            unchanged_since,
            known_modseq: 12,
        };
        let reply = |master, result| Msg::Reply { tag: 9, master, result, record: None };
        let change = |seq, change| Msg::Change { seq, change };
        vec![
            env(
                1,
                2,
                0,
                Msg::LinkState { origin: Sid(1), seq: 3, epoch: 65537, store: 9, neighbors: vec![Sid(2), Sid(3)] },
            ),
            env(1, 2, 0, Msg::LinkState { origin: Sid(7), seq: 0, epoch: 0, store: u64::MAX, neighbors: vec![] }),
            env(
                1,
                2,
                0,
                Msg::Members {
                    members: crate::membership::Membership::from_entries([
                        (Sid(1), crate::membership::Member { state: MemberState::Active, address: String::new() }),
                        (
                            Sid(4),
                            crate::membership::Member { state: MemberState::Leaving, address: "10.0.0.4:7101".into() },
                        ),
                        (Sid(9), crate::membership::Member { state: MemberState::Retired, address: "h\u{e9}".into() }),
                    ]),
                    store: 3,
                },
            ),
            env(1, 2, 1, Msg::Root { epoch: 5, root: Sid(1) }),
            env(2, 1, 0, Msg::Dropped { epoch: 5 }),
            env(2, 1, 0, Msg::Who { epoch: 5, keys: keys.clone() }),
            env(2, 1, 0, Msg::Who { epoch: 6, keys: vec![] }),
            env(1, 3, 2, Msg::MasterIs { epoch: 5, key: keys[0].clone(), master: Sid(3), generation: 1 }),
            env(1, 3, 2, Msg::MasterIs { epoch: 5, key: keys[3].clone(), master: Sid(3), generation: u64::MAX }),
            env(3, 1, 0, Msg::MasterMove { tag: 8, key: keys[1].clone(), requester: Sid(3) }),
            env(
                1,
                3,
                0,
                Msg::MoveDone {
                    tag: 8,
                    key: keys[2].clone(),
                    epoch: u64::MAX,
                    generation: 7,
                    states: vec![state(inbox.clone()), state(wild.clone())],
                },
            ),
            env(1, 3, 0, Msg::MoveDone { tag: 8, key: MasterKey::Global, epoch: 1, generation: 2, states: vec![] }),
            env(
                2,
                1,
                0,
                Msg::Request {
                    tag: 1,
                    request: WriteRequest::Save {
                        mailbox: wild.clone(),
                        guid,
                        received: 1_700_000_000,
                        flags: vec![flag("\\Seen")],
                        body: Body::from_static(b"Subject: hi\r\n\r\nbody\0with NUL\r\n"),
                        delivery: true,
                    },
                },
            ),
            env(
                2,
                1,
                0,
                Msg::Request {
                    tag: 2,
                    request: WriteRequest::Copy {
                        src: inbox.clone(),
                        src_uid: 4,
                        guid,
                        dst: odd.clone(),
                        received: 0,
                        flags: vec![],
                    },
                },
            ),
            env(
                2,
                1,
                0,
                Msg::Request {
                    tag: 3,
                    request: WriteRequest::Expunge { mailbox: inbox.clone(), messages: vec![(4, Guid(4))] },
                },
            ),
            env(2, 1, 0, Msg::Request { tag: 4, request: store(Some(11)) }),
            env(2, 1, 0, Msg::Request { tag: 5, request: store(None) }),
            env(
                2,
                1,
                0,
                Msg::Request {
                    tag: 6,
                    request: WriteRequest::Mailbox { mailbox: odd.clone(), action: MailboxAction::Create },
                },
            ),
            env(
                2,
                1,
                0,
                Msg::Request {
                    tag: 7,
                    request: WriteRequest::Mailbox { mailbox: wild.clone(), action: MailboxAction::Delete },
                },
            ),
            env(
                2,
                1,
                0,
                Msg::Request {
                    tag: 9,
                    request: WriteRequest::Mailbox {
                        mailbox: wild.clone(),
                        action: MailboxAction::CreateWithUse(SpecialUse(34)),
                    },
                },
            ),
            env(2, 1, 0, Msg::Request { tag: 8, request: WriteRequest::Barrier { mailbox: odd.clone() } }),
            env(
                2,
                1,
                0,
                Msg::Request {
                    tag: 10,
                    request: WriteRequest::Merge {
                        state: Box::new(state(odd.clone())),
                        bodies: vec![(Guid(7), b"a body\r\n".to_vec().into()), (Guid(u128::MAX), Body::default())],
                        from_cluster: vec![(1, 4), (6, 6)],
                    },
                },
            ),
            env(
                1,
                2,
                0,
                reply(Some(Sid(1)), WriteResult::Merged { modseq: 12, missing: vec![Guid(1), Guid(u128::MAX)] }),
            ),
            env(1, 2, 0, reply(Some(Sid(1)), WriteResult::MailboxDone { modseq: 12 })),
            env(1, 2, 0, reply(Some(Sid(1)), WriteResult::Position { highest_modseq: 13, digest: u64::MAX })),
            env(1, 2, 0, reply(Some(Sid(1)), WriteResult::Saved { uidvalidity: 77, uid: 11, guid })),
            env(1, 2, 0, reply(None, WriteResult::Copied { uidvalidity: 77, uid: 12, guid })),
            env(1, 2, 0, reply(Some(Sid(1)), WriteResult::Expunged { uids: vec![4, 5], modseq: 100 })),
            env(
                1,
                2,
                0,
                reply(
                    Some(Sid(1)),
                    WriteResult::Stored {
                        modseq: 101,
                        rejected: vec![2],
                        current: vec![
                            CurrentFlags { uid: 2, flags: vec![flag("\\Answered")], modseq: 90 },
                            CurrentFlags { uid: 3, flags: vec![], modseq: 91 },
                        ],
                    },
                ),
            ),
            env(1, 2, 0, reply(None, WriteResult::Failed { kind: FailKind::Temporary, reason: "no quorum".into() })),
            env(
                1,
                2,
                0,
                reply(None, WriteResult::Failed { kind: FailKind::Permanent, reason: "no \"such\"\nmessage".into() }),
            ),
            env(
                1,
                2,
                0,
                change(
                    1,
                    Change::Save { mailbox: inbox.clone(), uidvalidity: 77, record: record(1), body: Body::new() },
                ),
            ),
            env(1, 2, 0, change(2, Change::Copy { mailbox: odd.clone(), uidvalidity: 78, record: record(2) })),
            env(
                1,
                2,
                0,
                change(
                    3,
                    Change::Expunge {
                        mailbox: inbox.clone(),
                        uidvalidity: 77,
                        tombstones: vec![Tombstone::expunge(1, guid, 102)],
                    },
                ),
            ),
            env(
                1,
                2,
                0,
                change(
                    4,
                    Change::Store {
                        mailbox: inbox.clone(),
                        uidvalidity: 77,
                        stamp: Stamp { modseq: 103, sid: Sid(1) },
                        messages: vec![(2, guid), (3, Guid(3))],
                        add: vec![flag("\\Seen")],
                        remove: vec![flag("\\Draft"), flag("$Junk")],
                    },
                ),
            ),
            env(1, 2, 0, change(5, Change::Merge { state: Box::new(state(odd.clone())) })),
            env(2, 1, 0, Msg::Ack { seqs: vec![1, 2, 3, u64::MAX], refused: vec![4], store: 17 }),
            env(2, 1, 0, Msg::Ack { seqs: vec![], refused: vec![], store: 0 }),
            env(3, 1, 0, Msg::MboxRequest { tag: 10, key: keys[0].clone() }),
            env(
                1,
                3,
                0,
                Msg::Mbox {
                    tag: 10,
                    summary: Summary {
                        mailbox: wild.clone(),
                        uidvalidity: 77,
                        uidnext: 10,
                        count: 3,
                        highest_modseq: 99,
                        digest: 0xfeed,
                    },
                },
            ),
            env(1, 3, 0, Msg::MboxDone { tag: 10, count: 1 }),
            env(1, 3, 0, Msg::Sync { reply: false, state: state(inbox.clone()) }),
            env(3, 1, 0, Msg::Sync { reply: true, state: state(inbox.clone()) }),
            env(3, 1, 0, Msg::SyncPart { state: state(inbox.clone()) }),
            env(3, 1, 0, Msg::Fetch { guid }),
            env(
                1,
                3,
                0,
                Msg::Body { guid, checksum: 42, body: Body::from_static(b"\r\n\0{5}\r\n* MBOX 1 \"a\" \"b\"\r\n") },
            ),
            env(1, 3, 0, Msg::Body { guid: Guid(0), checksum: 0, body: Body::new() }),
            env(3, 1, 0, Msg::NoBody { guid }),
            env(1, 3, 0, Msg::Error { text: "bad \"thing\" \\ here".into() }),
            env(1, 3, 0, Msg::Error { text: "multi\r\nline ✓".into() }),
            env(1, 3, 0, Msg::Error { text: String::new() }),
        ]
    }

    fn encode_all(envs: &[Envelope]) -> Vec<u8> {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        for e in envs {
            enc.encode(e, &mut out);
        }
        out
    }

    /// Decodes a whole stream; fails if bytes are left over.
    fn decode_all(bytes: &[u8]) -> Result<Vec<Envelope>, Error> {
        let mut dec = Decoder::new();
        let mut envs = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            match dec.decode(&bytes[at..])? {
                Some((e, n)) => {
                    assert!(n > 0);
                    envs.push(e);
                    at += n;
                }
                None => {
                    return Err(Error::Decode { offset: at, expected: "more bytes".into() });
                }
            }
        }
        Ok(envs)
    }

    /// Decodes a stream arriving in pieces of the given sizes (cycled), as from TCP.
    fn decode_chunked(bytes: &[u8], sizes: &[usize]) -> Vec<Envelope> {
        let mut dec = Decoder::new();
        let mut buf = Vec::new();
        let mut envs = Vec::new();
        let mut rest = bytes;
        for &size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, tail) = rest.split_at(size.min(rest.len()));
            buf.extend_from_slice(piece);
            rest = tail;
            while let Some((e, n)) = dec.decode(&buf).unwrap() {
                envs.push(e);
                buf.drain(..n);
            }
        }
        assert!(buf.is_empty());
        envs
    }

    fn decode_err(bytes: &[u8]) -> Error {
        match Decoder::new().decode(bytes) {
            Err(e) => e,
            Ok(r) => panic!("expected an error, got {r:?}"),
        }
    }

    fn decode_error_at(bytes: &[u8], offset: usize, needle: &str) {
        match decode_err(bytes) {
            Error::Decode { offset: o, expected } => {
                assert_eq!(o, offset, "offset for {:?}: {expected}", String::from_utf8_lossy(bytes));
                assert!(expected.contains(needle), "{expected:?} should mention {needle:?}");
            }
            e => panic!("expected Error::Decode, got {e:?}"),
        }
    }

    const G: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn samples_cover_every_command() {
        let names: BTreeSet<&str> = samples().iter().map(|e| e.msg.name()).collect();
        assert_eq!(names.len(), 31, "{names:?}");
    }

    #[test]
    fn a_cancel_without_the_senders_word_is_taken_as_not_ordered() {
        let request = |sender_ordered| WriteRequest::Cancel {
            mailbox: MailboxKey::new("a", "INBOX"),
            guid: Guid(7),
            sender_ordered,
        };
        let ordered = env(1, 2, 0, Msg::Request { tag: 4, request: request(true) });
        let text = String::from_utf8(encode_all(std::slice::from_ref(&ordered))).unwrap();
        assert!(text.contains(" ORDERED"), "{text}");
        let older = text.replace(" ORDERED", "");
        let decoded = decode_all(older.as_bytes()).unwrap();
        assert_eq!(decoded, vec![env(1, 2, 0, Msg::Request { tag: 4, request: request(false) })]);
    }

    #[test]
    fn every_variant_roundtrips() {
        let envs = samples();
        for e in &envs {
            assert_eq!(&roundtrip(e).unwrap(), e);
        }
        assert_eq!(decode_all(&encode_all(&envs)).unwrap(), envs);
    }

    #[test]
    fn reencoding_a_decoded_stream_gives_the_same_bytes() {
        let bytes = encode_all(&samples());
        let decoded = decode_all(&bytes).unwrap();
        assert_eq!(encode_all(&decoded), bytes);
    }

    #[test]
    fn layout_is_readable() {
        let e = env(
            1,
            3,
            0,
            Msg::Request {
                tag: 7,
                request: WriteRequest::Save {
                    mailbox: key("bob", "INBOX"),
                    guid: Guid(1),
                    received: 5,
                    flags: vec![flag("\\Seen"), flag("$Junk")],
                    body: Body::from_static(b"hi"),
                    delivery: false,
                },
            },
        );
        let mut out = Vec::new();
        Encoder::new().encode(&e, &mut out);
        let expected = "* MBOX 1 \"bob\" \"INBOX\"\r\n\
             s1.s3.0 SAVE 7 1 00000000000000000000000000000001 5 (\\Seen $Junk) APPEND {2}\r\nhi\r\n";
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        let mut out = Vec::new();
        Encoder::new().encode(&env(2, 1, 4, Msg::Error { text: "é \"q\"".into() }), &mut out);
        assert_eq!(out, "s2.s1.4 ERROR {6}\r\né \"q\"\r\n".as_bytes());
    }

    #[test]
    fn stream_fed_one_byte_at_a_time() {
        let envs = samples();
        let bytes = encode_all(&envs);
        let mut dec = Decoder::new();
        let mut buf = Vec::new();
        let mut decoded = Vec::new();
        for &b in &bytes {
            buf.push(b);
            if let Some((e, n)) = dec.decode(&buf).unwrap() {
                // A command completes exactly with its last byte.
                assert_eq!(n, buf.len());
                decoded.push(e);
                buf.clear();
            }
        }
        assert!(buf.is_empty());
        assert_eq!(decoded, envs);
    }

    #[test]
    fn one_binding_per_mailbox_and_connection() {
        let mb = key("u", "box");
        let e = env(
            1,
            2,
            0,
            Msg::Request {
                tag: 1,
                request: WriteRequest::Expunge { mailbox: mb.clone(), messages: vec![(1, Guid(1))] },
            },
        );
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        enc.encode(&e, &mut out);
        enc.encode(&e, &mut out);
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(text.matches("* MBOX").count(), 1, "{text}");
        assert_eq!(decode_all(&out).unwrap(), vec![e.clone(), e.clone()]);
        // A second encoder (a new connection) binds again.
        let mut fresh = Vec::new();
        Encoder::new().encode(&e, &mut fresh);
        assert!(fresh.starts_with(b"* MBOX 1 \"u\" \"box\"\r\n"));
        // A copy between two new mailboxes binds both before the command.
        let copy = WriteRequest::Copy {
            src: key("u", "a"),
            src_uid: 1,
            guid: Guid(2),
            dst: key("u", "b"),
            received: 3,
            flags: vec![],
        };
        let mut out = Vec::new();
        enc.encode(&env(1, 2, 0, Msg::Request { tag: 2, request: copy }), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("* MBOX 2 \"u\" \"a\"\r\n* MBOX 3 \"u\" \"b\"\r\ns1.s2.0 COPY 2 2 1 "), "{text}");
    }

    #[test]
    fn rebinding_replaces_the_old_key() {
        let line = |id: &str| format!("s1.s2.0 MBOX 0 {id} 1 1 0 0 0\r\n");
        let mut dec = Decoder::new();
        let first = format!("* MBOX 1 \"u\" \"a\"\r\n{}", line("1"));
        let (e, n) = dec.decode(first.as_bytes()).unwrap().unwrap();
        assert_eq!(n, first.len());
        let Msg::Mbox { summary, .. } = e.msg else { panic!() };
        assert_eq!(summary.mailbox, key("u", "a"));
        let second = format!("* MBOX 1 \"u\" \"b\"\r\n{}", line("1"));
        let (e, _) = dec.decode(second.as_bytes()).unwrap().unwrap();
        let Msg::Mbox { summary, .. } = e.msg else { panic!() };
        assert_eq!(summary.mailbox, key("u", "b"));
        let (e, _) = dec.decode(line("1").as_bytes()).unwrap().unwrap();
        let Msg::Mbox { summary, .. } = e.msg else { panic!() };
        assert_eq!(summary.mailbox, key("u", "b"));
    }

    #[test]
    fn encoder_recycles_ids_but_not_within_a_command() {
        let mut enc = Encoder { ids_max: 2, ..Encoder::new() };
        let copy = |a: &str, b: &str| {
            let request = WriteRequest::Copy {
                src: key("u", a),
                src_uid: 1,
                guid: Guid(2),
                dst: key("u", b),
                received: 3,
                flags: vec![],
            };
            env(1, 2, 0, Msg::Request { tag: 1, request })
        };
        let envs = vec![copy("a", "b"), copy("c", "a"), copy("b", "c"), copy("c", "d"), copy("d", "c")];
        let mut out = Vec::new();
        for e in &envs {
            enc.encode(e, &mut out);
        }
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(!text.contains("* MBOX 3"), "{text}");
        assert_eq!(decode_all(&out).unwrap(), envs);
    }

    #[test]
    fn unknown_mailbox_id_is_an_error() {
        decode_error_at(b"s1.s2.0 EXPUNGE 1 7 (1)\r\n", 18, "id 7 is unbound");
        decode_error_at(b"* MBOX 0 \"u\" \"a\"\r\n", 7, "mailbox id");
        let too_big = format!("* MBOX {} \"u\" \"a\"\r\n", MAILBOX_IDS_MAX + 1);
        assert!(matches!(decode_err(too_big.as_bytes()), Error::TooLarge { what: "mailbox id", .. }));
    }

    #[test]
    fn bindings_take_effect_only_with_their_command() {
        let mut dec = Decoder::new();
        let full = b"* MBOX 1 \"u\" \"a\"\r\ns1.s2.0 EXPUNGE 1 1 ((1 00000000000000000000000000000001))\r\n";
        let cut = full.len() - 3;
        assert_eq!(dec.decode(&full[..cut]).unwrap(), None);
        // Nothing was committed: the id is still unknown on its own...
        assert!(matches!(
            dec.decode(b"s1.s2.0 EXPUNGE 1 1 ((1 00000000000000000000000000000001))\r\n"),
            Err(Error::Decode { .. })
        ));
        // ...and the retry with the whole input works.
        let (e, n) = dec.decode(full).unwrap().unwrap();
        assert_eq!(n, full.len());
        assert_eq!(
            e.msg,
            Msg::Request {
                tag: 1,
                request: WriteRequest::Expunge { mailbox: key("u", "a"), messages: vec![(1, Guid(1))] }
            }
        );
        let (_, n) =
            dec.decode(b"s1.s2.0 EXPUNGE 1 1 ((1 00000000000000000000000000000001))\r\nrest").unwrap().unwrap();
        assert_eq!(n, "s1.s2.0 EXPUNGE 1 1 ((1 00000000000000000000000000000001))\r\n".len());
    }

    #[test]
    fn incomplete_input_asks_for_more() {
        let mut dec = Decoder::new();
        assert_eq!(dec.decode(b"").unwrap(), None);
        assert_eq!(dec.decode(b"s1.s2.0 DROPPED 5\r").unwrap(), None);
        assert_eq!(dec.decode(b"s1.s2.0 BODY 0123456789abcdef0123456789abcdef 1 {5}\r\nabc").unwrap(), None);
        assert_eq!(dec.decode(b"s1.s2.0 BODY 0123456789abcdef0123456789abcdef 1 {5}\r\nabcde").unwrap(), None);
    }

    #[test]
    fn garbage_line() {
        decode_error_at(b"hello world\r\n", 0, "a tag");
        decode_error_at(b"\r\n", 0, "a tag");
        decode_error_at(b"s1.s2.0 DROPPED 5 6\r\n", 17, "end of the command");
        decode_error_at(b"s1.s2.0 DROPPED\r\n", 15, "more arguments");
        decode_error_at(b"s1.s2.0  DROPPED 5\r\n", 8, "a known command");
    }

    #[test]
    fn unknown_command() {
        decode_error_at(b"s1.s2.0 FOO 1 2\r\n", 8, "a known command, not \"FOO\"");
    }

    #[test]
    fn bad_guid() {
        decode_error_at(b"s1.s2.0 FETCH 0123456789ABCDEF0123456789abcdef\r\n", 14, "GUID");
        decode_error_at(b"s1.s2.0 FETCH 0123456789abcdef0123456789abcdef0\r\n", 14, "GUID");
        decode_error_at(b"s1.s2.0 FETCH 0123\r\n", 14, "GUID");
    }

    #[test]
    fn bad_flag() {
        let input = format!("* MBOX 1 \"u\" \"a\"\r\ns1.s2.0 SAVE 1 1 {G} 5 (\\Seen \\Se(en) {{0}}\r\n\r\n");
        let at = input.find("\\Se(").unwrap();
        decode_error_at(input.as_bytes(), at, "a flag");
        let input = "* MBOX 1 \"u\" \"a\"\r\ns1.s2.0 R-STORE 1 1 1 1 s1 () (\\) ()\r\n";
        decode_error_at(input.as_bytes(), input.find("\\)").unwrap(), "a flag");
    }

    #[test]
    fn duplicate_flag_in_a_record() {
        let input =
            format!("* MBOX 1 \"u\" \"a\"\r\ns1.s2.0 R-COPY 1 1 1 (1 {G} 1 1 1 1 ((a SET 1 s1) (a CLEAR 2 s1)))\r\n");
        let at = input.find("a CLEAR").unwrap();
        decode_error_at(input.as_bytes(), at, "not already listed");
    }

    #[test]
    fn huge_literal() {
        let input = format!("s1.s2.0 BODY {G} 1 {{999999999999}}\r\n");
        assert_eq!(decode_err(input.as_bytes()), Error::TooLarge { what: "literal", limit: LITERAL_LEN_MAX });
        let input = format!("s1.s2.0 BODY {G} 1 {{99999999999999999999999}}\r\n");
        decode_error_at(input.as_bytes(), 49, "at most 18446744073709551615");
        // A string literal counts against the command text.
        assert!(matches!(decode_err(b"s1.s2.0 ERROR {2000000}\r\n"), Error::TooLarge { what: "command text", .. }));
        decode_error_at(b"s1.s2.0 ERROR {5} \r\nabcde\r\n", 17, "CRLF right after the literal header");
    }

    #[test]
    fn unterminated_quoted_string() {
        decode_error_at(b"s1.s2.0 ERROR \"abc\r\n", 14, "unterminated quoted string");
        decode_error_at(b"s1.s2.0 ERROR \"a\\bc\"\r\n", 16, "escapes");
        decode_error_at(b"s1.s2.0 ERROR \"a\tb\"\r\n", 16, "printable ASCII");
        decode_error_at(b"s1.s2.0 ERROR {2}\r\n\xff\xfe\r\n", 14, "UTF-8");
    }

    #[test]
    fn number_overflow() {
        decode_error_at(b"s1.s2.0 DROPPED 18446744073709551616\r\n", 16, "at most 18446744073709551615");
        decode_error_at(b"s1.s2.0 MBOX-DONE 1 4294967296\r\n", 20, "at most 4294967295");
        decode_error_at(b"s1.s2.0 ROOT 1 s4294967296\r\n", 15, "server id");
        decode_error_at(b"s1.s2.256 DROPPED 1\r\n", 0, "a tag");
        decode_error_at(b"s1.s2.0 DROPPED 01\r\n", 16, "leading zeros");
        decode_error_at(b"s1.s2.0 DROPPED -1\r\n", 16, "a decimal number");
    }

    #[test]
    fn line_too_long() {
        let mut input = b"s1.s2.0 ERROR \"".to_vec();
        input.resize(LINE_LEN_MAX + 1, b'a');
        assert_eq!(Decoder::new().decode(&input).unwrap(), None);
        input.push(b'a');
        assert_eq!(decode_err(&input), Error::TooLarge { what: "command text", limit: LINE_LEN_MAX });
        // Exactly at the limit is fine.
        let mut input = b"s1.s2.0 ERROR \"".to_vec();
        input.resize(LINE_LEN_MAX - 1, b'a');
        input.extend_from_slice(b"\"\r\n");
        assert!(Decoder::new().decode(&input).unwrap().is_some());
    }

    #[test]
    fn list_too_long() {
        // The command text limit keeps lists of real commands shorter than LIST_LEN_MAX;
        // check the list limit itself on a reader.
        let mut input = b"(".to_vec();
        for _ in 0..=LIST_LEN_MAX {
            input.extend_from_slice(b"1 ");
        }
        input.extend_from_slice(b")\r\n");
        let table = BTreeMap::new();
        let mut r = Reader::new(&input, &table);
        r.line_end = input.len() - 2;
        match r.list(Reader::u32) {
            Err(Stop::Bad(e)) => assert_eq!(e, Error::TooLarge { what: "list", limit: LIST_LEN_MAX }),
            _ => panic!("expected the list limit"),
        }
    }

    fn text() -> impl Strategy<Value = String> {
        let c = prop_oneof![
            4 => proptest::char::range('a', 'z'),
            1 => Just('"'),
            1 => Just('\\'),
            1 => Just(' '),
            1 => Just('\r'),
            1 => Just('\n'),
            1 => Just('\0'),
            1 => Just('{'),
            1 => any::<char>(),
        ];
        proptest::collection::vec(c, 0..12).prop_map(|cs| cs.into_iter().collect())
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        let b = prop_oneof![4 => any::<u8>(), 1 => Just(b'\r'), 1 => Just(b'\n'), 1 => Just(0u8)];
        proptest::collection::vec(b, 0..64)
    }

    fn mailbox_key() -> impl Strategy<Value = MailboxKey> {
        // A small user space so that streams reuse bindings.
        (prop_oneof![Just("u".to_string()), text()], text())
            .prop_map(|(user, name)| MailboxKey::from_shared(user.into(), name.into()))
    }

    fn any_flag() -> impl Strategy<Value = Flag> {
        "\\\\?[A-Za-z$][A-Za-z0-9$_.-]{0,6}".prop_map(|s| Flag::new(&s).unwrap())
    }

    fn flag_list() -> impl Strategy<Value = Vec<Flag>> {
        proptest::collection::vec(any_flag(), 0..4)
    }

    /// Fragments of valid and invalid syntax, for streams that get deep into the parser.
    fn soup_token() -> impl Strategy<Value = String> {
        let words = [
            " ",
            "(",
            ")",
            "\r\n",
            "\"",
            "\\",
            "NIL",
            "1",
            "0",
            "18446744073709551616",
            "s1",
            G,
            "{3}\r\nabc",
            "{0}\r\n",
            "{9}\r\n",
            "SAVE",
            "R-MERGE",
            "SYNC",
            "SYNC-PART",
            "REPLY",
            "STORED",
            "MAILBOX",
            "\\Seen",
            "SET",
            "* MBOX 2 \"u\" \"b\"\r\n",
            "s1.s2.0 ",
        ];
        prop_oneof![
            4 => prop::sample::select(words.to_vec()).prop_map(str::to_string),
            1 => text(),
        ]
    }

    fn guid() -> impl Strategy<Value = Guid> {
        any::<u128>().prop_map(Guid)
    }

    fn message_record() -> impl Strategy<Value = MessageRecord> {
        let flag_state = (any::<bool>(), any::<u64>(), any::<u32>())
            .prop_map(|(present, modseq, sid)| FlagState { present, stamp: Stamp { modseq, sid: Sid(sid) } });
        let flags = proptest::collection::btree_map(any_flag(), flag_state, 0..4);
        // A size below the claim's and the push's bits (`MessageRecord::packed_size`), as
        // every size is.
        let size = (0..=SIZE_BITS, any::<bool>(), any::<bool>());
        (any::<u32>(), guid(), any::<u64>(), size, any::<u64>(), any::<u64>(), flags).prop_map(
            |(uid, guid, received, (size, claimed, pushed), checksum, modseq, flags)| MessageRecord {
                uid,
                guid,
                received,
                size,
                checksum,
                modseq,
                flags: flags.into(),
                claimed,
                pushed,
            },
        )
    }

    fn envelope() -> impl Strategy<Value = Envelope> {
        let save = (mailbox_key(), guid(), any::<u64>(), flag_list(), bytes()).prop_map(
            |(mailbox, guid, received, flags, body)| Msg::Request {
                tag: 1,
                request: WriteRequest::Save {
                    mailbox,
                    guid,
                    received,
                    flags,
                    delivery: received % 2 == 0,
                    body: body.into(),
                },
            },
        );
        let store = (
            mailbox_key(),
            proptest::collection::vec((any::<u32>(), any::<u128>().prop_map(Guid)), 0..4),
            flag_list(),
            flag_list(),
            any::<Option<u64>>(),
            any::<u64>(),
        )
            .prop_map(|(mailbox, messages, add, remove, unchanged_since, known_modseq)| Msg::Request {
                tag: 2,
                request: WriteRequest::Store { mailbox, messages, add, remove, unchanged_since, known_modseq },
            });
        let change_save = (any::<u64>(), mailbox_key(), any::<u32>(), message_record(), bytes()).prop_map(
            |(seq, mailbox, uidvalidity, record, body)| Msg::Change {
                seq,
                change: Change::Save { mailbox, uidvalidity, record, body: body.into() },
            },
        );
        let tombstone = (any::<u32>(), guid(), any::<u64>(), 0u8..=4)
            .prop_filter_map("a fate", |(uid, guid, modseq, fate)| Tombstone::with_fate(uid, guid, modseq, fate));
        let sync = (
            any::<bool>(),
            mailbox_key(),
            any::<(u32, u32, u64)>(),
            proptest::collection::vec(message_record(), 0..3),
            proptest::collection::vec(tombstone, 0..3),
            any::<(u64, u64)>(),
            (any::<u64>(), proptest::collection::vec((1..u32::MAX / 2, 0..1000u32), 0..4)),
        )
            .prop_map(
                |(
                    reply,
                    mailbox,
                    (uidvalidity, uidnext, highest_modseq),
                    messages,
                    tombstones,
                    (created_at, deleted_at),
                    (collected, ranges),
                )| {
                    let mut retired = Retired { ranges: BTreeMap::new(), collected };
                    for (first, len) in ranges {
                        retired.insert_range(first, first + len);
                    }
                    Msg::Sync {
                        reply,
                        state: MailboxState {
                            mailbox,
                            uidvalidity,
                            uidnext,
                            highest_modseq,
                            messages,
                            tombstones,
                            lifecycle: Lifecycle {
                                created_at,
                                deleted_at,
                                subscribed_at: deleted_at / 2,
                                unsubscribed_at: created_at / 3,
                                // Every other state carries a special use.
                                special_use: SpecialUse(if created_at % 2 == 0 { 0 } else { (created_at % 128) as u8 }),
                                special_use_at: if created_at % 2 == 0 { 0 } else { created_at / 5 + 1 },
                            },
                            retired,
                        },
                    }
                },
            );
        let mbox = (any::<u64>(), mailbox_key(), any::<(u32, u32, u32, u64, u64)>()).prop_map(
            |(tag, mailbox, (uidvalidity, uidnext, count, highest_modseq, digest))| Msg::Mbox {
                tag,
                summary: Summary { mailbox, uidvalidity, uidnext, count, highest_modseq, digest },
            },
        );
        let error = text().prop_map(|text| Msg::Error { text });
        let failed = (any::<bool>(), text()).prop_map(|(temporary, reason)| Msg::Reply {
            tag: 3,
            master: None,
            record: None,
            result: WriteResult::Failed {
                kind: if temporary { FailKind::Temporary } else { FailKind::Permanent },
                reason,
            },
        });
        let import = (mailbox_key(), guid(), any::<u64>(), flag_list(), bytes(), any::<u32>(), any::<u32>()).prop_map(
            |(mailbox, guid, received, flags, body, uidvalidity, uid)| Msg::Request {
                tag: 2,
                request: WriteRequest::Import { mailbox, guid, received, flags, body: body.into(), uidvalidity, uid },
            },
        );
        let create = (mailbox_key(), any::<u32>()).prop_map(|(mailbox, v)| Msg::Request {
            tag: 3,
            request: WriteRequest::Mailbox { mailbox, action: MailboxAction::CreateWithValidity(v) },
        });
        let cancel = (mailbox_key(), guid(), any::<bool>()).prop_map(|(mailbox, guid, sender_ordered)| Msg::Request {
            tag: 4,
            request: WriteRequest::Cancel { mailbox, guid, sender_ordered },
        });
        let msg = prop_oneof![save, import, create, cancel, store, change_save, sync, mbox, error, failed];
        (any::<u32>(), any::<u32>(), any::<u8>(), msg).prop_map(|(src, dst, hops, msg)| env(src, dst, hops, msg))
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Decoder::new().decode(&input);
        }

        #[test]
        fn mutated_streams_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6), cut in any::<prop::sample::Index>()) {
            let mut bytes = encode_all(&samples());
            for (i, b) in edits {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            let bytes = &bytes[..cut.index(bytes.len() + 1)];
            let mut dec = Decoder::new();
            let mut at = 0;
            while let Ok(Some((_, n))) = dec.decode(&bytes[at..]) {
                prop_assert!(n > 0 && at + n <= bytes.len());
                at += n;
            }
        }

        #[test]
        fn token_soup_never_panics(tokens in proptest::collection::vec(soup_token(), 0..40)) {
            let mut input = b"* MBOX 1 \"u\" \"a\"\r\ns1.s2.0 ".to_vec();
            for t in tokens {
                input.extend_from_slice(t.as_bytes());
            }
            let mut dec = Decoder::new();
            let mut at = 0;
            while let Ok(Some((_, n))) = dec.decode(&input[at..]) {
                prop_assert!(n > 0 && at + n <= input.len());
                at += n;
            }
        }

        #[test]
        fn random_envelopes_roundtrip(
            envs in proptest::collection::vec(envelope(), 1..6),
            chunks in proptest::collection::vec(1usize..40, 1..20),
        ) {
            for e in &envs {
                prop_assert_eq!(&roundtrip(e).unwrap(), e);
            }
            let bytes = encode_all(&envs);
            let decoded = decode_all(&bytes).unwrap();
            prop_assert_eq!(&decoded, &envs);
            prop_assert_eq!(encode_all(&decoded), bytes.clone());
            prop_assert_eq!(decode_chunked(&bytes, &chunks), envs);
        }
    }
}
