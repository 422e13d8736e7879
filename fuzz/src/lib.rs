//! Fuzz harnesses for tandem, shared by the cargo-fuzz targets in `fuzz_targets/` and by
//! the seed generator `examples/make_seeds.rs`.

use std::collections::{BTreeMap, VecDeque};
use tandem_core::wire::{Decoder, Encoder};
use tandem_core::*;

// ---------------------------------------------------------------------------------------
// wire_decode
// ---------------------------------------------------------------------------------------

/// Decodes `data` as one connection's stream. Every envelope decoded must come back
/// unchanged from a fresh `Encoder` and a fresh `Decoder`, consumed whole.
pub fn wire_decode(data: &[u8]) {
    let mut dec = Decoder::new();
    let mut at = 0;
    while at < data.len() {
        let Ok(Some((env, n))) = dec.decode(&data[at..]) else { break };
        assert!(n > 0 && n <= data.len() - at, "consumed {n} of {} bytes", data.len() - at);
        at += n;
        let mut bytes = Vec::new();
        Encoder::new().encode(&env, &mut bytes);
        match Decoder::new().decode(&bytes) {
            Ok(Some((again, m))) => {
                assert_eq!(
                    again,
                    env,
                    "re-encoded envelope decodes differently from {:?}",
                    String::from_utf8_lossy(&bytes)
                );
                assert_eq!(
                    m,
                    bytes.len(),
                    "re-encoded envelope not consumed whole: {:?}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            other => panic!("re-encoded {env:?} does not decode: {other:?} from {:?}", String::from_utf8_lossy(&bytes)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// scenario_parse
// ---------------------------------------------------------------------------------------

/// Parses `data` (when UTF-8) as a scenario file: Ok or Err, never a panic.
pub fn scenario_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match tandem_sim::scenario::parse(text, None) {
        Ok(s) => {
            std::hint::black_box(format!("{s:?}"));
        }
        Err(e) => {
            std::hint::black_box(e.to_string());
        }
    }
}

// ---------------------------------------------------------------------------------------
// core_messages
// ---------------------------------------------------------------------------------------

pub const S1: Sid = Sid(1);
pub const S2: Sid = Sid(2);
pub const S3: Sid = Sid(3);

/// The first byte of each chunk, modulo [`op::COUNT`], selects the input.
pub mod op {
    /// A wire command (with its binding lines) from the s2 connection, delivered as it is.
    pub const RAW_S2: u8 = 0;
    /// A wire command from the s3 connection, delivered as it is (ignored unless s3 is up).
    pub const RAW_S3: u8 = 1;
    /// From the s2 connection, src forced to s2 and dst to s1.
    pub const FORCED_S2: u8 = 2;
    /// From the s2 connection, src forced to s3 and dst to s1 (s2 relays for s3).
    pub const FORCED_RELAY: u8 = 3;
    /// From the s3 connection, src forced to s3 and dst to s1.
    pub const FORCED_S3: u8 = 4;
    /// `[TIMER, b]`: b = 0 jumps to `poll_timeout`, else time advances b*b*100 us.
    pub const TIMER: u8 = 5;
    /// `[DURABLE, b]`: b >= 128 makes every write durable, else b more writes.
    pub const DURABLE: u8 = 6;
    /// `[CLIENT, kind, args...]`: a client request on a few mailboxes.
    pub const CLIENT: u8 = 7;
    /// `[LINK, b]`: bit 0 picks s2/s3, bit 1 down instead of up.
    pub const LINK: u8 = 8;
    /// `[RESPOND, b]`: a plausible answer from the peer to one of s1's recent sends.
    pub const RESPOND: u8 = 9;
    /// `[EXTERNAL, kind, args...]`: a hand edit of the store.
    pub const EXTERNAL: u8 = 10;
    /// `[RESTART]`: crash and recover from the durable writes; s2 linked again.
    pub const RESTART: u8 = 11;
    pub const COUNT: u8 = 12;
}

const MAILBOXES: [(&str, &str); 4] =
    [("alice", "INBOX"), ("alice", "Sent"), ("bob@example.org", "INBOX"), ("carol@example.org", "Archive")];
const FLAGS: [&str; 5] = ["\\Seen", "\\Flagged", "\\Deleted", "$Junk", "work"];
const QUEUE_MAX: usize = 256;

fn config() -> Config {
    Config::new(S1, vec![S1, S2, S3])
}

fn mailbox(b: u8) -> MailboxKey {
    let (user, name) = MAILBOXES[usize::from(b) % MAILBOXES.len()];
    MailboxKey::new(user, name)
}

fn flags(mask: u8) -> Vec<Flag> {
    FLAGS.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, f)| Flag::new(f).unwrap()).collect()
}

fn uids(mask: u8) -> Vec<Uid> {
    (0..8).filter(|i| mask & (1 << i) != 0).map(|i| i + 1).collect()
}

/// Reads argument bytes; past the end every byte is 0.
struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos = (self.pos + 1).min(self.data.len());
        b
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let end = (self.pos + n).min(self.data.len());
        let s = &self.data[self.pos..end];
        self.pos = end;
        s
    }
    fn rest(&self) -> &[u8] {
        &self.data[self.pos..]
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
}

/// Server s1 of a three-server cluster, with the shell around it played from bytes.
pub struct Harness {
    server: Server,
    now: Instant,
    /// The receiving side of the s2 and s3 connections.
    decoders: [Decoder; 2],
    links: [bool; 2],
    /// Writes issued and not yet durable, and the durable disk for restarts.
    pending: VecDeque<(WriteId, StoreWrite)>,
    last_write: WriteId,
    durable: WriteId,
    disk: DiskImage,
    /// The bytes of the bodies `disk` lists (s1's body store).
    disk_bodies: MemoryBodies,
    /// s1's recent sends (hop, envelope), for RESPOND.
    queue: VecDeque<(Sid, Envelope)>,
    /// Bodies seen on the way in or out, for answering FETCH.
    bodies: BTreeMap<Guid, Body>,
    next_request: RequestId,
    /// Every send since the last `take_sent` (only when recording, for the generator).
    recording: bool,
    sent: Vec<(Sid, Envelope)>,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    /// s1 with its link to s2 up.
    pub fn new() -> Harness {
        let disk_bodies = MemoryBodies::default();
        let mut h = Harness {
            server: Server::new(config(), 7, Box::new(disk_bodies.clone())),
            disk_bodies,
            now: Instant(0),
            decoders: [Decoder::new(), Decoder::new()],
            links: [false, false],
            pending: VecDeque::new(),
            last_write: 0,
            durable: 0,
            disk: DiskImage::default(),
            queue: VecDeque::new(),
            bodies: BTreeMap::new(),
            next_request: 1,
            recording: false,
            sent: Vec::new(),
        };
        h.drain();
        h.set_link(S2, true);
        h
    }

    pub fn record(&mut self, on: bool) {
        self.recording = on;
    }

    pub fn take_sent(&mut self) -> Vec<(Sid, Envelope)> {
        std::mem::take(&mut self.sent)
    }

    pub fn now(&self) -> Instant {
        self.now
    }

    pub fn server(&self) -> &Server {
        &self.server
    }

    pub fn has_pending_writes(&self) -> bool {
        self.durable < self.last_write
    }

    fn input(&mut self, input: Input) {
        self.server.handle(self.now, input);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(output) = self.server.poll_output() {
            match output {
                Output::Write { id, write } => {
                    self.last_write = self.last_write.max(id);
                    self.pending.push_back((id, write));
                }
                Output::Send { to, envelope } => {
                    self.note_bodies(&envelope.msg);
                    if self.recording {
                        self.sent.push((to, envelope.clone()));
                    }
                    if self.queue.len() >= QUEUE_MAX {
                        self.queue.pop_front();
                    }
                    self.queue.push_back((to, envelope));
                }
                Output::Reply { .. } => {}
            }
        }
    }

    fn note_bodies(&mut self, msg: &Msg) {
        match msg {
            Msg::Request { request: WriteRequest::Save { guid, body, .. }, .. }
            | Msg::Change { change: Change::Save { record: MessageRecord { guid, .. }, body, .. }, .. }
            | Msg::Body { guid, body, .. } => {
                self.bodies.insert(*guid, body.clone());
            }
            _ => {}
        }
    }

    fn make_durable(&mut self, upto: WriteId) {
        let upto = upto.min(self.last_write);
        while let Some((id, _)) = self.pending.front()
            && *id <= upto
        {
            let (_, write) = self.pending.pop_front().unwrap();
            self.disk_bodies.apply(&write);
            self.disk.apply(&write);
        }
        self.durable = self.durable.max(upto);
        self.input(Input::Durable { upto });
    }

    fn index(sid: Sid) -> usize {
        if sid == S3 { 1 } else { 0 }
    }

    fn set_link(&mut self, peer: Sid, up: bool) {
        let i = Self::index(peer);
        self.links[i] = up;
        // A new connection starts with fresh mailbox bindings; sends over the old one
        // are lost.
        self.decoders[i] = Decoder::new();
        self.queue.retain(|(hop, _)| *hop != peer);
        self.input(if up { Input::LinkUp { peer } } else { Input::LinkDown { peer } });
    }

    fn deliver(&mut self, from: Sid, envelope: Envelope) {
        self.note_bodies(&envelope.msg);
        self.input(Input::Peer { from, envelope });
    }

    fn timer(&mut self, b: u8) {
        let at = if b == 0 { self.server.poll_timeout() } else { self.now.plus_us(u64::from(b).pow(2) * 100) };
        self.now = self.now.max(at);
        self.input(Input::Timer);
    }

    fn restart(&mut self) {
        self.pending.clear();
        self.last_write = 0;
        self.durable = 0;
        self.queue.clear();
        self.links = [false, false];
        self.decoders = [Decoder::new(), Decoder::new()];
        self.server = Server::recover(config(), self.disk.clone(), 7, Box::new(self.disk_bodies.clone()));
        self.drain();
        self.set_link(S2, true);
    }

    /// Runs the chunks in `data`.
    pub fn run_ops(&mut self, data: &[u8]) {
        let mut r = Bytes { data, pos: 0 };
        while !r.done() {
            let op = r.byte() % op::COUNT;
            match op {
                op::RAW_S2 | op::RAW_S3 | op::FORCED_S2 | op::FORCED_RELAY | op::FORCED_S3 => {
                    let from = if matches!(op, op::RAW_S3 | op::FORCED_S3) { S3 } else { S2 };
                    let i = Self::index(from);
                    match self.decoders[i].decode(r.rest()) {
                        Ok(Some((mut envelope, n))) => {
                            r.take(n);
                            match op {
                                op::FORCED_S2 => (envelope.src, envelope.dst) = (S2, S1),
                                op::FORCED_RELAY | op::FORCED_S3 => (envelope.src, envelope.dst) = (S3, S1),
                                _ => {}
                            }
                            self.deliver(from, envelope);
                        }
                        // Skip the broken command: to the end of its line.
                        Ok(None) | Err(_) => {
                            let rest = r.rest();
                            let n = rest.windows(2).position(|w| w == b"\r\n").map_or(rest.len(), |p| p + 2);
                            r.take(n);
                        }
                    }
                }
                op::TIMER => {
                    let b = r.byte();
                    self.timer(b);
                }
                op::DURABLE => {
                    let b = r.byte();
                    let upto = if b >= 128 { self.last_write } else { self.durable + u64::from(b) };
                    self.make_durable(upto);
                }
                op::CLIENT => {
                    let request = client_request(&mut r);
                    let id = self.next_request;
                    self.next_request += 1;
                    self.input(Input::Client { id, request });
                }
                op::LINK => {
                    let b = r.byte();
                    let peer = if b & 1 == 0 { S2 } else { S3 };
                    self.set_link(peer, b & 2 == 0);
                }
                op::RESPOND => {
                    let b = r.byte();
                    self.respond(b);
                }
                op::EXTERNAL => {
                    let edit = self.external_edit(&mut r);
                    self.input(Input::External(edit));
                }
                op::RESTART => self.restart(),
                _ => unreachable!(),
            }
        }
    }

    /// Makes everything durable and lets timers run past an anti-entropy period.
    pub fn finish(&mut self) {
        self.make_durable(self.last_write);
        for _ in 0..2 {
            self.now = self.now.plus_us(1_100_000);
            self.input(Input::Timer);
            self.make_durable(self.last_write);
        }
    }

    fn external_edit(&mut self, r: &mut Bytes) -> ExternalEdit {
        let kind = r.byte();
        match kind % 3 {
            0 => {
                let mailbox = mailbox(r.byte());
                let guid = Guid(u128::from(r.byte()) << 100 | 0xe);
                let received = u64::from(r.byte());
                let n = usize::from(r.byte() % 16);
                ExternalEdit::Added { mailbox, guid, received, body: r.take(n).to_vec().into() }
            }
            1 => ExternalEdit::Removed { mailbox: mailbox(r.byte()), uid: Uid::from(r.byte() % 8 + 1) },
            _ => {
                let b = r.byte();
                let guid = self.bodies.keys().nth(usize::from(b) % self.bodies.len().max(1)).copied();
                let n = usize::from(r.byte() % 16);
                let guid = guid.unwrap_or(Guid(u128::from(b)));
                self.disk_bodies.overwrite(guid, r.take(n).to_vec().into());
                ExternalEdit::Corrupted { guid }
            }
        }
    }

    /// Answers one of s1's recent sends the way a peer plausibly would: bit 7..4 pick
    /// which (counted from the oldest), bits 3..0 vary the answer.
    fn respond(&mut self, b: u8) {
        if self.queue.is_empty() {
            return;
        }
        let at = usize::from(b >> 4) % self.queue.len();
        let (hop, sent) = self.queue.remove(at).unwrap();
        let v = b & 0xf;
        let peer = sent.dst;
        if peer == S1 {
            return;
        }
        let pick = |v: u8| [peer, S1, if peer == S2 { S3 } else { S2 }][usize::from(v) % 3];
        let msg = match sent.msg {
            Msg::Root { epoch, .. } => {
                if v % 4 == 3 {
                    Msg::Root { epoch: epoch + 1, root: pick(v >> 2) }
                } else {
                    Msg::Dropped { epoch }
                }
            }
            Msg::Who { epoch, keys } => {
                let Some(key) = keys.into_iter().next() else { return };
                Msg::MasterIs { epoch, key, master: pick(v), generation: u64::from(v >> 2) }
            }
            Msg::MasterMove { tag, key, .. } => {
                let epoch = self.server.term().epoch;
                let states = if v % 2 == 0 {
                    Vec::new()
                } else {
                    self.server
                        .image()
                        .mailboxes
                        .iter()
                        .filter(|(k, _)| key.covers(k))
                        .map(|(k, m)| MailboxState {
                            mailbox: k.clone(),
                            uidvalidity: m.uidvalidity,
                            uidnext: m.uidnext,
                            highest_modseq: m.highest_modseq,
                            messages: m.messages.values().cloned().collect(),
                            tombstones: m.tombstones.values().copied().collect(),
                            lifecycle: m.lifecycle,
                            retired: m.retired.clone(),
                        })
                        .collect()
                };
                Msg::MoveDone { tag, key, epoch, generation: u64::from(v >> 1) + 1, states }
            }
            Msg::Request { tag, request } => {
                let master = if v & 8 == 0 { Some(peer) } else { None };
                let uid = Uid::from(v % 4 + 1);
                // The master's record of a SAVE/COPY, as it would send it back.
                let record = |guid: Guid, received: u64, flags: &[Flag], body: Option<&Body>| {
                    let body = body.map(|b| b.as_ref()).unwrap_or(b"");
                    let stamp = Stamp { modseq: 5, sid: peer };
                    let flags = flags.iter().map(|f| (f.clone(), FlagState { present: true, stamp })).collect();
                    let size = u32::try_from(body.len()).unwrap_or(u32::MAX);
                    MessageRecord { uid, guid, received, size, checksum: hash::body_checksum(body), modseq: 5, flags, claimed: false, pushed: false }
                };
                let (result, record) = match (v % 4, request) {
                    (1, _) => (WriteResult::Failed { kind: FailKind::Temporary, reason: "busy".into() }, None),
                    (2, _) => (WriteResult::Failed { kind: FailKind::Permanent, reason: "no".into() }, None),
                    (_, WriteRequest::Save { mailbox, guid, received, flags, body, .. }) => (
                        WriteResult::Saved { uidvalidity: mailbox.initial_uidvalidity(), uid, guid },
                        (v & 4 == 0).then(|| record(guid, received, &flags, Some(&body))),
                    ),
                    (_, WriteRequest::Import { guid, received, flags, body, uidvalidity, uid: at, .. }) => (
                        WriteResult::Saved { uidvalidity, uid: at, guid },
                        (v & 4 == 0).then(|| MessageRecord { uid: at, ..record(guid, received, &flags, Some(&body)) }),
                    ),
                    (_, WriteRequest::Cancel { .. }) => (
                        WriteResult::Expunged { uids: if v & 4 == 0 { vec![uid] } else { Vec::new() }, modseq: 5 },
                        None,
                    ),
                    (_, WriteRequest::Copy { dst, guid, received, flags, .. }) => (
                        WriteResult::Copied { uidvalidity: dst.initial_uidvalidity(), uid, guid },
                        (v & 4 == 0).then(|| record(guid, received, &flags, self.bodies.get(&guid))),
                    ),
                    (_, WriteRequest::Expunge { messages, .. }) => {
                        (WriteResult::Expunged { uids: messages.iter().map(|(u, _)| *u).collect(), modseq: 5 }, None)
                    }
                    (_, WriteRequest::Store { messages, add, .. }) => {
                        let current = messages
                            .iter()
                            .map(|(u, _)| CurrentFlags { uid: *u, flags: add.clone(), modseq: 6 })
                            .collect();
                        (WriteResult::Stored { modseq: 6, rejected: Vec::new(), current }, None)
                    }
                    (_, WriteRequest::Mailbox { .. } | WriteRequest::Rename { .. }) => {
                        (WriteResult::MailboxDone { modseq: 7 }, None)
                    }
                    (_, WriteRequest::Barrier { .. }) => {
                        (WriteResult::Position { highest_modseq: 7, digest: u64::from(v) }, None)
                    }
                    // A user replica's push: merged, or (now and then) wanting its bodies.
                    (_, WriteRequest::Merge { state, .. }) => {
                        let missing =
                            if v & 4 == 0 { Vec::new() } else { state.messages.iter().map(|r| r.guid).collect() };
                        (WriteResult::Merged { modseq: 8, missing }, None)
                    }
                };
                Msg::Reply { tag, master, result, record }
            }
            Msg::Change { seq, .. } => {
                // Now and then from another store (the peer lost its disk meanwhile).
                let store = 1 + u64::from(v % 7 == 0);
                if v % 5 == 0 {
                    Msg::Ack { seqs: Vec::new(), refused: vec![seq], store }
                } else {
                    Msg::Ack { seqs: vec![seq], refused: Vec::new(), store }
                }
            }
            Msg::MboxRequest { tag, .. } => Msg::MboxDone { tag, count: 0 },
            Msg::Mbox { mut summary, .. } => {
                summary.digest ^= u64::from(v % 2);
                Msg::Mbox { tag: 0, summary }
            }
            Msg::Sync { reply: false, mut state } => {
                if v % 2 == 1 {
                    state.highest_modseq += 1;
                }
                Msg::Sync { reply: true, state }
            }
            Msg::Fetch { guid } if v % 8 == 7 => Msg::NoBody { guid },
            Msg::Fetch { guid } => {
                let body = self
                    .bodies
                    .get(&guid)
                    .cloned()
                    .filter(|_| v % 4 != 3)
                    .unwrap_or_else(|| Body::from_static(b"junk"));
                let checksum = hash::body_checksum(&body);
                Msg::Body { guid, checksum, body }
            }
            _ => return,
        };
        self.deliver(hop, Envelope { src: peer, dst: S1, hops: 0, msg });
    }
}

fn client_request(r: &mut Bytes) -> ClientRequest {
    match r.byte() % 8 {
        0 => {
            let mailbox = mailbox(r.byte());
            let received = u64::from(r.byte());
            let flags = flags(r.byte());
            let n = usize::from(r.byte() % 32);
            ClientRequest::Save { mailbox, received, flags, body: r.take(n).to_vec().into(), delivery: false }
        }
        1 => {
            ClientRequest::Copy { src: mailbox(r.byte()), src_uid: Uid::from(r.byte() % 8 + 1), dst: mailbox(r.byte()) }
        }
        2 => ClientRequest::Expunge { mailbox: mailbox(r.byte()), uids: uids(r.byte()) },
        3 => {
            let mailbox = mailbox(r.byte());
            let uids = uids(r.byte());
            let add = flags(r.byte());
            let remove = flags(r.byte());
            let unchanged_since = r.byte().checked_sub(1).map(u64::from);
            ClientRequest::Store { mailbox, uids, add, remove, unchanged_since }
        }
        4 => ClientRequest::Read { mailbox: mailbox(r.byte()) },
        5 => ClientRequest::MasterMove { mailbox: mailbox(r.byte()) },
        6 => ClientRequest::CreateMailbox { mailbox: mailbox(r.byte()), special_use: SpecialUse(r.byte() & 127) },
        _ => ClientRequest::DeleteMailbox { mailbox: mailbox(r.byte()) },
    }
}

/// The core_messages target: s1 fed the chunks of `data`, then settled.
pub fn core_messages(data: &[u8]) {
    let mut h = Harness::new();
    h.run_ops(data);
    h.finish();
}
