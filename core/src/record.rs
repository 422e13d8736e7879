//! Recordings of one server's inputs, for replay (`tandem-sim replay`): what a node gave
//! its core, in order, with the instant of each, the bodies the core read from its store
//! while handling it, and a digest of what the core asked for in return. The same inputs
//! fed to the same core build give the same outputs (the core is deterministic): a
//! difference names the first input where another build, a non-determinism in the core
//! or a bug in the shell went another way.
//!
//! The file: [`MAGIC`], then frames, each `len: u32 LE`, `check: u32 LE` (FNV-1a of the
//! payload, low half), the payload (a [`Frame`] through [`crate::codec`]). The first
//! frame is the [`Header`]: the configuration, the seed and the store the core started
//! from. A torn last frame (the node crashed while writing it) ends the recording there.
//!
//! Bodies: every body in a frame is a reference ([`body_ref`]: the recorder's content
//! key, a SHA-256 in the node, and the length). With `bodies` on, each distinct body's
//! bytes are written once, in a [`Frame::Body`] before the first frame that refers to it;
//! with it off the file holds no mail, and it can be read and shown but not replayed.

use crate::codec::{Bincode, RecordCodec};
use crate::io::{ClientRequest, Config, ExternalEdit, Input, Output};
use crate::msg::{Change, Msg, WriteRequest};
use crate::store::DiskImage;
use crate::types::{Body, Guid, Instant};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const MAGIC: &[u8; 8] = b"TDMREC\x00\x01";
/// The layout of [`Frame`]; a reader refuses another. 3: the header's store image holds
/// the memory of collections (`DiskImage::collected`).
pub const FORMAT: u32 = 3;
/// A frame longer than this is damage, not a frame (a body is far smaller).
pub const FRAME_BYTES_MAX: usize = 1 << 30;
const FRAME_HEAD_BYTES: usize = 8;

/// A body's content key (SHA-256 in the node).
pub type BodyKey = [u8; 32];

/// Where a recording starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    /// The recording core's [`crate::BUILD`].
    pub build: String,
    pub cfg: Config,
    /// The seed `Server::recover` was given.
    pub seed: u64,
    /// The store the core recovered from.
    pub disk: DiskImage,
    /// Whether body bytes are in the file.
    pub bodies: bool,
    /// When the recording started (wall clock, for the reader; nothing replays by it).
    pub started_unix_ms: u64,
    /// A file that continues a run the previous file recorded (a recording rotates when
    /// it grows): the core resumes from a snapshot instead of recovering from `disk`.
    pub resumed: Option<Resumed>,
}

/// Where a file that continues a run begins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    /// `Server::snapshot` between the previous file's last input and this file's first.
    /// None when recorded without bodies: the core's state holds bodies in flight,
    /// which such a file must not (it is read, not replayed, like its predecessors).
    pub snapshot: Option<Vec<u8>>,
    /// When the node's run began: the core's instants count from there.
    pub run_started_unix_ms: u64,
    /// The file this one continues.
    pub previous: String,
}

impl Header {
    /// When the core's instant 0 was, on the wall clock: the run's start, which for the
    /// first file of a run is the file's.
    pub fn clock_origin_unix_ms(&self) -> u64 {
        self.resumed.as_ref().map(|r| r.run_started_unix_ms).unwrap_or(self.started_unix_ms)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Header(Box<Header>),
    /// The bytes of the body with this key, before the first frame that refers to it.
    Body {
        key: BodyKey,
        bytes: Body,
    },
    /// An input, given to the core at `now`.
    Input {
        now: Instant,
        input: Box<Input>,
    },
    /// The core read a body from its store (while handling the last input).
    Read {
        guid: Guid,
        body: Option<Body>,
    },
    /// What the core asked for since the last input: how many outputs, and their digest
    /// ([`OutputDigest`]).
    Outputs {
        count: u32,
        digest: u64,
    },
    /// The core asked its store for a body's checksum (the scrub's question, which a
    /// store may answer without reading the bytes): recorded as the answer, not the
    /// body, so a scrub pass does not copy the mail it checks into the recording.
    Checksum {
        guid: Guid,
        checksum: Option<u64>,
    },
    /// The core asked its store to cut a body to its text parts (for a partial replica):
    /// the answer, its bytes kept like a read body's.
    TextParts {
        guid: Guid,
        parts: Option<Body>,
    },
}

/// The first fields of a header frame, which every format keeps in place.
#[derive(Deserialize)]
enum FramePrefix {
    Header(HeaderPrefix),
}

#[derive(Deserialize)]
struct HeaderPrefix {
    format: u32,
    build: String,
}

fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A frame as it goes into the file.
pub fn frame_bytes(frame: &Frame) -> Result<Vec<u8>, String> {
    let payload = Bincode::encode(frame)?;
    if payload.len() > FRAME_BYTES_MAX {
        return Err(format!("a frame of {} bytes is over the limit of {FRAME_BYTES_MAX}", payload.len()));
    }
    let mut out = Vec::with_capacity(FRAME_HEAD_BYTES + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&(fnv(&payload, FNV_OFFSET) as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// A recording read back.
#[derive(Clone, Debug)]
pub struct Recording {
    pub header: Header,
    /// Every frame after the header, in order.
    pub frames: Vec<Frame>,
    /// Why the file ended before its last byte (a torn frame from a crash), if it did.
    pub torn: Option<String>,
}

/// Reads a recording's bytes. A damaged or torn frame ends it (kept in `torn`); a file
/// that is not a recording, has no header or another format is an error.
pub fn parse(bytes: &[u8]) -> Result<Recording, String> {
    let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or("not a tandem recording (no magic at its start)")?;
    let mut at = 0usize;
    let mut frames = Vec::new();
    let mut torn = None;
    while at < rest.len() {
        let Some(head) = rest.get(at..at + FRAME_HEAD_BYTES) else {
            torn = Some(format!("a torn frame head at byte {}", at + MAGIC.len()));
            break;
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let check = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let start = at + FRAME_HEAD_BYTES;
        let Some(payload) = (len <= FRAME_BYTES_MAX).then(|| rest.get(start..start + len)).flatten() else {
            torn = Some(format!("a frame of {len} bytes at byte {} runs past the end", at + MAGIC.len()));
            break;
        };
        if fnv(payload, FNV_OFFSET) as u32 != check {
            torn = Some(format!("a frame at byte {} fails its check", at + MAGIC.len()));
            break;
        }
        match Bincode::decode::<Frame>(payload) {
            Ok(frame) => frames.push(frame),
            Err(e) => {
                torn = Some(format!("a frame at byte {} does not decode: {e}", at + MAGIC.len()));
                break;
            }
        }
        at = start + len;
    }
    if frames.is_empty() {
        // A header another build laid out differently: say whose it is.
        let payload = rest.get(FRAME_HEAD_BYTES..).unwrap_or_default();
        if let Ok(FramePrefix::Header(prefix)) = Bincode::decode_prefix::<FramePrefix>(payload)
            && (prefix.format != FORMAT || prefix.build != crate::BUILD)
        {
            return Err(format!(
                "recorded by core build {} (format {}), and this is core build {} (format {FORMAT}): \
                 its header does not read here; replay it with the core that made it",
                prefix.build,
                prefix.format,
                crate::BUILD
            ));
        }
    }
    let mut frames = frames.into_iter();
    let header = match frames.next() {
        Some(Frame::Header(h)) => *h,
        _ => return Err(torn.unwrap_or_else(|| "the recording has no header".into())),
    };
    if header.format != FORMAT {
        return Err(format!("recording format {} (this build reads format {FORMAT})", header.format));
    }
    Ok(Recording { header, frames: frames.collect(), torn })
}

const REF_MAGIC: &[u8; 8] = b"\x00TDMREF\x00";
const REF_BYTES: usize = 8 + 32 + 8;

/// The stand-in a recording keeps in place of a body: its key and length.
pub fn body_ref(key: &BodyKey, len: u64) -> Body {
    let mut out = Vec::with_capacity(REF_BYTES);
    out.extend_from_slice(REF_MAGIC);
    out.extend_from_slice(key);
    out.extend_from_slice(&len.to_le_bytes());
    Body::from(out)
}

/// The key and length a stand-in names (None if `body` is not one).
pub fn parse_body_ref(body: &[u8]) -> Option<(BodyKey, u64)> {
    if body.len() != REF_BYTES || !body.starts_with(REF_MAGIC) {
        return None;
    }
    let key: BodyKey = body[8..40].try_into().ok()?;
    let len = u64::from_le_bytes(body[40..48].try_into().ok()?);
    Some((key, len))
}

/// Calls `f` on every body an input carries (a client's SAVE, a peer's change, FETCH
/// answer or forwarded write, a file dropped in by hand).
pub fn for_each_body(input: &mut Input, f: &mut dyn FnMut(&mut Body)) {
    match input {
        Input::Peer { envelope, .. } => match &mut envelope.msg {
            Msg::Request { request: WriteRequest::Save { body, .. } | WriteRequest::Import { body, .. }, .. } => {
                f(body)
            }
            Msg::Change { change: Change::Save { body, .. }, .. } => f(body),
            Msg::Body { body, .. } => f(body),
            _ => {}
        },
        Input::Client { request: ClientRequest::Save { body, .. } | ClientRequest::Import { body, .. }, .. } => f(body),
        Input::External(ExternalEdit::Added { body, .. }) => f(body),
        Input::Client { .. }
        | Input::Timer
        | Input::LinkUp { .. }
        | Input::LinkDown { .. }
        | Input::Durable { .. }
        | Input::External(ExternalEdit::Removed { .. } | ExternalEdit::Corrupted { .. }) => {}
    }
}

/// Puts back the bytes of every body reference in `input` from `bodies`; the first key
/// missing is the error.
pub fn resolve_bodies(input: &mut Input, bodies: &BTreeMap<BodyKey, Body>) -> Result<(), BodyKey> {
    let mut missing = None;
    for_each_body(input, &mut |body| resolve_one(body, bodies, &mut missing));
    missing.map_or(Ok(()), Err)
}

/// Puts back one body's bytes (see [`resolve_bodies`]).
pub fn resolve_one(body: &mut Body, bodies: &BTreeMap<BodyKey, Body>, missing: &mut Option<BodyKey>) {
    let Some((key, _)) = parse_body_ref(body) else { return };
    match bodies.get(&key) {
        Some(bytes) => *body = bytes.clone(),
        None => {
            missing.get_or_insert(key);
        }
    }
}

/// A running digest of a core's outputs: their count and an FNV-1a over their encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputDigest {
    pub count: u32,
    pub digest: u64,
}

impl Default for OutputDigest {
    fn default() -> Self {
        OutputDigest { count: 0, digest: FNV_OFFSET }
    }
}

struct FnvWriter(u64);

impl bincode::enc::write::Writer for FnvWriter {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        // Eight bytes a step (bodies pass through here on every output that carries one):
        // a digest for telling runs apart, not a defence against forgery.
        let mut chunks = bytes.chunks_exact(8);
        let mut h = self.0;
        for chunk in &mut chunks {
            let word =
                u64::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7]]);
            h = (h ^ word).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
        }
        self.0 = fnv(chunks.remainder(), h);
        Ok(())
    }
}

impl OutputDigest {
    pub fn add(&mut self, output: &Output) {
        let mut writer = FnvWriter(self.digest);
        // Encoding into a hash cannot fail (the writer takes every byte).
        let _ = bincode::serde::encode_into_writer(output, &mut writer, bincode::config::standard());
        self.digest = writer.0;
        self.count = self.count.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Sid;

    fn header() -> Header {
        Header {
            format: FORMAT,
            build: crate::BUILD.into(),
            cfg: Config::new(Sid(1), vec![Sid(1), Sid(2)]),
            seed: 7,
            disk: DiskImage::default(),
            bodies: true,
            started_unix_ms: 0,
            resumed: None,
        }
    }

    fn file(frames: &[Frame]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for f in frames {
            out.extend(frame_bytes(f).unwrap());
        }
        out
    }

    #[test]
    fn a_recording_reads_back_and_a_torn_tail_ends_it() {
        let frames = vec![
            Frame::Header(Box::new(header())),
            Frame::Input { now: Instant(5), input: Box::new(Input::Timer) },
            Frame::Outputs { count: 0, digest: 1 },
        ];
        let bytes = file(&frames);
        let back = parse(&bytes).unwrap();
        assert_eq!(back.header, header());
        assert_eq!(back.frames, frames[1..]);
        assert!(back.torn.is_none());
        let cut = parse(&bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(cut.frames, frames[1..2]);
        assert!(cut.torn.is_some());
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(parse(&flipped).unwrap().torn.unwrap().contains("check"));
        assert!(parse(b"not a recording").is_err());
        let mut other = header();
        other.format = FORMAT + 1;
        assert!(parse(&file(&[Frame::Header(Box::new(other))])).unwrap_err().contains("format"));
    }

    #[test]
    fn a_body_reference_stands_in_for_the_body_and_resolves_back() {
        let body = Body::from_static(b"Subject: hi\r\n\r\nhello\r\n");
        let key = [9u8; 32];
        let mut input = Input::Client {
            id: 1,
            request: ClientRequest::Save {
                mailbox: crate::types::MailboxKey::new("u", "INBOX"),
                received: 0,
                flags: vec![],
                body: body.clone(),
                delivery: false,
            },
        };
        let original = input.clone();
        for_each_body(&mut input, &mut |b| *b = body_ref(&key, b.len() as u64));
        assert_ne!(input, original);
        assert_eq!(resolve_bodies(&mut input.clone(), &BTreeMap::new()), Err(key));
        resolve_bodies(&mut input, &BTreeMap::from([(key, body)])).unwrap();
        assert_eq!(input, original);
        assert_eq!(parse_body_ref(b"short"), None);
    }

    proptest::proptest! {
        /// A damaged or hostile file is an error or a torn tail, never a panic.
        #[test]
        fn any_bytes_after_the_magic_read_without_panic(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend(&tail);
            let _ = parse(&bytes);
            let mut real = file(&[Frame::Header(Box::new(header())), Frame::Input { now: Instant(1), input: Box::new(Input::Timer) }]);
            let at = tail.first().map_or(0, |b| usize::from(*b) % real.len());
            real.truncate(at.max(MAGIC.len()));
            real.extend(&tail);
            let _ = parse(&real);
        }
    }

    #[test]
    fn the_output_digest_tells_outputs_apart() {
        let mut a = OutputDigest::default();
        let mut b = OutputDigest::default();
        a.add(&Output::Write { id: 1, write: crate::store::StoreWrite::RemoveBody { guid: Guid(1) } });
        b.add(&Output::Write { id: 1, write: crate::store::StoreWrite::RemoveBody { guid: Guid(2) } });
        assert_ne!(a, b);
        assert_eq!(a.count, 1);
    }
}
