//! Writes the seed corpora under `fuzz/seeds/`: realistic encoded envelopes for
//! `wire_decode`, recorded cluster conversations for `core_messages`. Run from `fuzz/`:
//! `cargo run --example make_seeds` (the scenario_parse seeds are copies of scenarios).
//!
//! A `core_messages` seed is made by playing s1 through the harness while real servers
//! s2 and s3 answer it: whatever s2/s3 send to s1 is encoded with the wire `Encoder` of
//! that connection and appended to the seed as a RAW chunk, so replaying the seed in the
//! harness reproduces the conversation exactly.

use std::collections::BTreeSet;
use std::path::Path;
use tandem_core::wire::Encoder;
use tandem_core::*;
use tandem_fuzz::{Harness, S1, S2, S3, op};

struct Peer {
    server: Server,
    bodies: MemoryBodies,
    last_write: WriteId,
    durable: WriteId,
}

struct Gen {
    h: Harness,
    data: Vec<u8>,
    peers: [Peer; 2],
    /// Encoders of the s2->s1 and s3->s1 connections.
    enc: [Encoder; 2],
    links: BTreeSet<(Sid, Sid)>,
    next_request: u64,
    /// The s2->s1 byte stream alone, a wire_decode seed.
    wire: Vec<u8>,
}

fn idx(sid: Sid) -> usize {
    if sid == S3 { 1 } else { 0 }
}

fn pair(a: Sid, b: Sid) -> (Sid, Sid) {
    (a.min(b), a.max(b))
}

impl Gen {
    fn new() -> Gen {
        let servers = vec![S1, S2, S3];
        let peer = |sid| {
            let bodies = MemoryBodies::default();
            let server = Server::new(Config::new(sid, servers.clone()), 7, Box::new(bodies.clone()));
            Peer { server, bodies, last_write: 0, durable: 0 }
        };
        let mut h = Harness::new();
        h.record(true);
        let mut g = Gen {
            h,
            data: Vec::new(),
            peers: [peer(S2), peer(S3)],
            enc: [Encoder::new(), Encoder::new()],
            links: BTreeSet::new(),
            next_request: 1000,
            wire: Vec::new(),
        };
        // The harness starts with s1-s2 up; s2-s3 up too, s1-s3 down (s3 via relay).
        g.peer_input(S2, Input::LinkUp { peer: S1 });
        g.links.insert(pair(S1, S2));
        g.link(S2, S3, true);
        g.pump();
        g
    }

    fn peer(&mut self, sid: Sid) -> &mut Peer {
        &mut self.peers[idx(sid)]
    }

    fn peer_input(&mut self, sid: Sid, input: Input) {
        let now = self.h.now();
        self.peer(sid).server.handle(now, input);
    }

    /// Appends a chunk to the seed and runs it.
    fn op(&mut self, chunk: &[u8]) {
        self.data.extend_from_slice(chunk);
        self.h.run_ops(chunk);
    }

    fn link(&mut self, a: Sid, b: Sid, up: bool) {
        if up {
            self.links.insert(pair(a, b));
        } else {
            self.links.remove(&pair(a, b));
        }
        for (x, y) in [(a, b), (b, a)] {
            if x == S1 {
                let bits = if y == S3 { 1 } else { 0 } | if up { 0 } else { 2 };
                self.op(&[op::LINK, bits]);
            } else {
                if y == S1 {
                    self.enc[idx(x)] = Encoder::new();
                }
                self.peer_input(x, if up { Input::LinkUp { peer: y } } else { Input::LinkDown { peer: y } });
            }
        }
    }

    /// Delivers messages until everything is quiet.
    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut busy = false;
            for (hop, env) in self.h.take_sent() {
                if self.links.contains(&pair(S1, hop)) {
                    self.peer_input(hop, Input::Peer { from: S1, envelope: env });
                    busy = true;
                }
            }
            for sid in [S2, S3] {
                let mut outs = Vec::new();
                while let Some(o) = self.peer(sid).server.poll_output() {
                    outs.push(o);
                }
                for o in outs {
                    busy = true;
                    match o {
                        Output::Write { id, write } => {
                            // Applied at once: only what a restart would keep depends on it.
                            self.peer(sid).bodies.apply(&write);
                            self.peer(sid).last_write = id;
                        }
                        Output::Reply { .. } => {}
                        Output::Send { to, envelope } => {
                            if !self.links.contains(&pair(sid, to)) {
                                continue;
                            }
                            if to == S1 {
                                let raw = if sid == S3 { op::RAW_S3 } else { op::RAW_S2 };
                                let mut chunk = vec![raw];
                                self.enc[idx(sid)].encode(&envelope, &mut chunk);
                                if sid == S2 {
                                    self.wire.extend_from_slice(&chunk[1..]);
                                }
                                self.op(&chunk);
                            } else {
                                self.peer_input(to, Input::Peer { from: sid, envelope });
                            }
                        }
                    }
                }
                let p = self.peer(sid);
                if p.durable < p.last_write {
                    let upto = p.last_write;
                    p.durable = upto;
                    self.peer_input(sid, Input::Durable { upto });
                    busy = true;
                }
            }
            if self.h.has_pending_writes() {
                self.op(&[op::DURABLE, 255]);
                busy = true;
            }
            if !busy {
                return;
            }
        }
        panic!("no quiescence");
    }

    /// Lets `ms` of time pass, firing every server's timers.
    fn tick(&mut self, ms: u64) {
        let end = self.h.now().plus_us(ms * 1000);
        while self.h.now() < end {
            let before = self.h.now();
            let next = self.h.server().poll_timeout().max(before);
            if next > end {
                break;
            }
            self.op(&[op::TIMER, if next > before { 0 } else { 10 }]);
            self.pump();
            for sid in [S2, S3] {
                if self.peer(sid).server.poll_timeout() <= self.h.now() {
                    self.peer_input(sid, Input::Timer);
                }
            }
            self.pump();
        }
    }

    fn client_s1(&mut self, chunk: &[u8]) {
        let mut c = vec![op::CLIENT];
        c.extend_from_slice(chunk);
        self.op(&c);
        self.pump();
    }

    /// s2 sends s1 its whole copy of `mailbox` (SYNC FIRST), as a master would.
    fn sync_from_s2(&mut self, mailbox: &MailboxKey) {
        let Some(m) = self.peer(S2).server.image().mailboxes.get(mailbox).cloned() else { return };
        let state = MailboxState {
            mailbox: mailbox.clone(),
            uidvalidity: m.uidvalidity,
            uidnext: m.uidnext,
            highest_modseq: m.highest_modseq,
            messages: m.messages.values().cloned().collect(),
            tombstones: m.tombstones.values().copied().collect(),
            lifecycle: m.lifecycle,
            retired: m.retired.clone(),
        };
        let envelope = Envelope { src: S2, dst: S1, hops: 0, msg: Msg::Sync { reply: false, state } };
        let mut chunk = vec![op::RAW_S2];
        self.enc[0].encode(&envelope, &mut chunk);
        self.wire.extend_from_slice(&chunk[1..]);
        self.op(&chunk);
        self.pump();
    }

    fn client_peer(&mut self, sid: Sid, request: ClientRequest) {
        self.next_request += 1;
        let id = self.next_request;
        self.peer_input(sid, Input::Client { id, request });
        self.pump();
    }

    fn write(&self, dir: &Path, name: &str) {
        write_seed(dir, name, &self.data);
        if name == "s2-master-forwarding" || name == "partition-uid-conflict" {
            let wire = dir.parent().unwrap().join("wire_decode");
            write_seed(&wire, &format!("recorded-{name}"), &self.wire);
        }
    }
}

fn write_seed(dir: &Path, name: &str, data: &[u8]) {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    let note = if data.len() >= 4096 { "  (over 4 KB!)" } else { "" };
    println!("{} {} bytes{note}", path.display(), data.len());
}

fn key(user: &str, name: &str) -> MailboxKey {
    MailboxKey::new(user, name)
}

fn flag(s: &str) -> Flag {
    Flag::new(s).unwrap()
}

fn save_req(mailbox: MailboxKey, body: &str) -> ClientRequest {
    ClientRequest::Save {
        mailbox,
        received: 1_700_000_000,
        flags: vec![flag("\\Seen")],
        body: body.as_bytes().to_vec().into(),
        delivery: true,
    }
}

fn core_seeds(dir: &Path) {
    let inbox = key("alice", "INBOX");

    // Start-up: link-state flooding, s1 opens a root term, s2 and s3 drop.
    let mut g = Gen::new();
    g.tick(200);
    g.write(dir, "startup");

    // s1 masters alice/INBOX: save, flag, expunge, copy, read; R-* changes acked by s2.
    let mut g = Gen::new();
    g.tick(100);
    // CLIENT Save: kind 0, mailbox 0, received, flag mask, body length, body.
    g.client_s1(&[0, 0, 9, 0b1, 5, b'h', b'e', b'l', b'l', b'o']);
    g.tick(60);
    g.client_s1(&[0, 0, 9, 0, 3, b'a', b'b', b'c']);
    g.tick(60);
    g.client_s1(&[3, 0, 0b11, 0b10, 0b1, 0]); // Store uids 1,2 +\Flagged -\Seen
    g.tick(60);
    g.client_s1(&[1, 0, 2, 1]); // Copy uid 2 to alice/Sent
    g.tick(60);
    g.client_s1(&[2, 0, 0b1]); // Expunge uid 1
    g.tick(60);
    g.client_s1(&[3, 0, 0b10, 0b1000, 0, 2]); // Store uid 2 +$Junk UNCHANGEDSINCE 1
    g.tick(60);
    g.client_s1(&[4, 0]); // Read
    g.tick(100);
    g.client_peer(S2, ClientRequest::MasterMove { mailbox: inbox.clone() });
    g.tick(100);
    g.write(dir, "s1-master-writes");

    // s2 gets a mail for alice/INBOX: WHO to the root s1, s2 masters it, catch-up
    // (MBOX-REQ, MBOX, MBOX-DONE), then R-SAVE to s1; s1 forwards a STORE to s2.
    let mut g = Gen::new();
    g.tick(100);
    g.client_peer(S2, save_req(inbox.clone(), "Subject: hi\r\n\r\nfrom s2\r\n"));
    g.tick(150);
    g.client_s1(&[3, 0, 0b1, 0b1000, 0, 0]); // Store uid 1 +$Junk, forwarded to s2
    g.tick(100);
    g.client_s1(&[0, 0, 1, 0, 2, b'x', b'y']); // Save forwarded to s2
    g.tick(100);
    g.write(dir, "s2-master-forwarding");

    // s3 (behind s2) masters bob's INBOX; everything reaches s1 relayed by s2.
    let mut g = Gen::new();
    g.tick(100);
    g.client_peer(S3, save_req(key("bob@example.org", "INBOX"), "relayed"));
    g.tick(200);
    g.client_s1(&[2, 2, 0b1]); // Expunge uid 1 of bob's INBOX, forwarded to s3
    g.tick(200);
    g.write(dir, "s3-relayed");

    // MASTER-MOVE: s2 masters alice/INBOX, then a client at s1 moves it to s1.
    let mut g = Gen::new();
    g.tick(100);
    g.client_peer(S2, save_req(inbox.clone(), "m1"));
    g.tick(150);
    g.client_s1(&[5, 0]);
    g.tick(200);
    g.client_s1(&[0, 0, 1, 0, 2, b'm', b'2']);
    g.tick(100);
    g.write(dir, "master-move");

    // The seed thread's UID conflict: a partition, a save on each side, a heal; merges,
    // SYNC both ways and R-MERGE.
    let mut g = Gen::new();
    g.tick(100);
    g.client_s1(&[0, 0, 1, 0, 2, b'm', b'1']);
    g.tick(100);
    g.link(S1, S2, false);
    g.pump();
    g.tick(100);
    g.client_s1(&[0, 0, 2, 0, 2, b'm', b'3']);
    g.client_peer(S2, save_req(inbox.clone(), "m2"));
    g.tick(300);
    g.link(S1, S2, true);
    g.pump();
    g.tick(1500);
    g.sync_from_s2(&inbox);
    g.tick(100);
    g.write(dir, "partition-uid-conflict");

    // A hand edit at s1 and a corrupted body: FETCH/BODY repair.
    let mut g = Gen::new();
    g.tick(100);
    g.client_peer(S2, save_req(key("carol@example.org", "Archive"), "keep me"));
    g.tick(200);
    g.op(&[op::EXTERNAL, 2, 0, 4, b'b', b'a', b'd', b'!']);
    g.pump();
    g.op(&[op::EXTERNAL, 0, 0, 7, 3, 2, b'h', b'i']);
    g.pump();
    g.tick(1200);
    g.write(dir, "external-edits");

    // No peer bytes at all: s1 talking to the harness's own RESPOND answers, a restart.
    let data = [
        op::TIMER,
        0,
        op::RESPOND,
        0,
        op::RESPOND,
        0,
        op::CLIENT,
        0,
        1,
        5,
        0,
        2,
        b'h',
        b'i',
        op::DURABLE,
        255,
        op::TIMER,
        0,
        op::RESPOND,
        0,
        op::RESPOND,
        0,
        op::RESPOND,
        0,
        op::DURABLE,
        255,
        op::RESTART,
        op::TIMER,
        0,
        op::RESPOND,
        0,
        op::TIMER,
        100,
    ];
    write_seed(dir, "respond-restart", &data);
}

fn wire_seeds(dir: &Path) {
    let inbox = key("alice", "INBOX");
    let odd = key("bob \"the\" \\builder\\", "Sent Items");
    let wild = key("zoë@例え.jp", "Ünïcödé\r\n");
    let guid = Guid(0xdead_beef_0000_0000_0000_0000_0000_0001);
    let env = |src, dst, msg| Envelope { src: Sid(src), dst: Sid(dst), hops: 0, msg };
    let mut flags = std::collections::BTreeMap::new();
    flags.insert(flag("\\Seen"), FlagState { present: true, stamp: Stamp { modseq: 3, sid: S1 } });
    flags.insert(flag("$Junk"), FlagState { present: false, stamp: Stamp { modseq: 4, sid: S2 } });
    let record =
        MessageRecord {
            uid: 1,
            guid,
            received: 1_700_000_000,
            size: 5,
            checksum: 77,
            modseq: 4,
            flags: flags.into(),
            claimed: false,
            pushed: false,
        };
    let state = MailboxState {
        mailbox: inbox.clone(),
        uidvalidity: 77,
        uidnext: 3,
        highest_modseq: 9,
        messages: vec![record.clone()],
        tombstones: vec![Tombstone::expunge(2, Guid(2), 8)],
        lifecycle: Default::default(),
        retired: Default::default(),
    };
    let mk = MasterKey::Mailbox(inbox.clone());
    let streams: Vec<(&str, Vec<Envelope>)> = vec![
        (
            "routing",
            vec![
                env(2, 1, Msg::LinkState { origin: S2, seq: 3, epoch: 1, store: 2, neighbors: vec![S1, S3] }),
                env(1, 2, Msg::Root { epoch: 5, root: S1 }),
                env(2, 1, Msg::Dropped { epoch: 5 }),
                env(
                    2,
                    1,
                    Msg::Who { epoch: 5, keys: vec![mk.clone(), MasterKey::User("alice".into()), MasterKey::Global] },
                ),
                env(1, 2, Msg::MasterIs { epoch: 5, key: mk.clone(), master: S2, generation: 1 }),
            ],
        ),
        (
            "save",
            vec![env(
                2,
                1,
                Msg::Request {
                    tag: 1 << 40 | 1,
                    request: WriteRequest::Save {
                        mailbox: wild.clone(),
                        guid,
                        received: 1_700_000_000,
                        flags: vec![flag("\\Seen"), flag("work")],
                        body: Body::from_static(b"Subject: hi\r\n\r\nbody\0with NUL\r\n"),
                        delivery: true,
                    },
                },
            )],
        ),
        (
            "requests",
            vec![
                env(
                    2,
                    1,
                    Msg::Request {
                        tag: 2,
                        request: WriteRequest::Copy {
                            src: inbox.clone(),
                            src_uid: 4,
                            guid,
                            dst: odd.clone(),
                            received: 0,
                            flags: vec![flag("\\Seen")],
                        },
                    },
                ),
                env(
                    2,
                    1,
                    Msg::Request {
                        tag: 3,
                        request: WriteRequest::Expunge { mailbox: inbox.clone(), messages: vec![(4, Guid(4))] },
                    },
                ),
                env(
                    2,
                    1,
                    Msg::Request {
                        tag: 4,
                        request: WriteRequest::Store {
                            mailbox: inbox.clone(),
                            messages: vec![(1, Guid(1)), (2, Guid(2))],
                            add: vec![flag("\\Seen")],
                            remove: vec![flag("\\Flagged")],
                            unchanged_since: Some(11),
                            known_modseq: 12,
                        },
                    },
                ),
            ],
        ),
        (
            "replies",
            vec![
                env(
                    1,
                    2,
                    Msg::Reply {
                        tag: 9,
                        master: Some(S1),
                        result: WriteResult::Saved { uidvalidity: 77, uid: 11, guid },
                        record: Some(MessageRecord { uid: 11, ..record.clone() }),
                    },
                ),
                env(
                    1,
                    2,
                    Msg::Reply {
                        tag: 9,
                        master: None,
                        result: WriteResult::Expunged { uids: vec![4, 5], modseq: 100 },
                        record: None,
                    },
                ),
                env(
                    1,
                    2,
                    Msg::Reply {
                        tag: 9,
                        master: Some(S1),
                        result: WriteResult::Stored {
                            modseq: 101,
                            rejected: vec![2],
                            current: vec![CurrentFlags { uid: 2, flags: vec![flag("\\Answered")], modseq: 90 }],
                        },
                        record: None,
                    },
                ),
                env(
                    1,
                    2,
                    Msg::Reply {
                        tag: 9,
                        master: None,
                        result: WriteResult::Failed {
                            kind: FailKind::Permanent,
                            reason: "no \"such\"\nmessage".into(),
                        },
                        record: None,
                    },
                ),
            ],
        ),
        (
            "changes",
            vec![
                env(
                    1,
                    2,
                    Msg::Change {
                        seq: 1,
                        change: Change::Save {
                            mailbox: inbox.clone(),
                            uidvalidity: 77,
                            record: record.clone(),
                            body: Body::from_static(b"hello"),
                        },
                    },
                ),
                env(
                    1,
                    2,
                    Msg::Change {
                        seq: 2,
                        change: Change::Copy { mailbox: odd.clone(), uidvalidity: 78, record: record.clone() },
                    },
                ),
                env(
                    1,
                    2,
                    Msg::Change {
                        seq: 3,
                        change: Change::Expunge {
                            mailbox: inbox.clone(),
                            uidvalidity: 77,
                            tombstones: vec![Tombstone::retirement(1, guid, 102)],
                        },
                    },
                ),
                env(
                    1,
                    2,
                    Msg::Change {
                        seq: 4,
                        change: Change::Store {
                            mailbox: inbox.clone(),
                            uidvalidity: 77,
                            stamp: Stamp { modseq: 103, sid: S1 },
                            messages: vec![(1, guid)],
                            add: vec![flag("$Junk")],
                            remove: vec![],
                        },
                    },
                ),
                env(1, 2, Msg::Change { seq: 5, change: Change::Merge { state: Box::new(state.clone()) } }),
                env(2, 1, Msg::Ack { seqs: vec![1, 2, 3, 4, 5], refused: Vec::new(), store: 2 }),
            ],
        ),
        (
            "anti-entropy",
            vec![
                env(1, 2, Msg::MboxRequest { tag: 12, key: mk.clone() }),
                env(
                    2,
                    1,
                    Msg::Mbox {
                        tag: 12,
                        summary: Summary {
                            mailbox: inbox.clone(),
                            uidvalidity: 77,
                            uidnext: 3,
                            count: 1,
                            highest_modseq: 9,
                            digest: 0x1234,
                        },
                    },
                ),
                env(2, 1, Msg::MboxDone { tag: 12, count: 1 }),
                env(1, 2, Msg::Sync { reply: false, state: state.clone() }),
                env(2, 1, Msg::Sync { reply: true, state: state.clone() }),
                env(1, 2, Msg::Fetch { guid }),
                env(2, 1, Msg::Body { guid, checksum: 77, body: Body::from_static(b"hello") }),
            ],
        ),
        (
            "master-move",
            vec![
                env(1, 2, Msg::MasterMove { tag: 8, key: MasterKey::Domain("example.org".into()), requester: S1 }),
                env(
                    2,
                    1,
                    Msg::MoveDone { tag: 8, key: mk.clone(), epoch: 5, generation: 2, states: vec![state.clone()] },
                ),
                env(3, 1, Msg::Error { text: "é \"q\"".into() }),
            ],
        ),
    ];
    for (name, envs) in streams {
        let mut enc = Encoder::new();
        let mut data = Vec::new();
        for e in &envs {
            enc.encode(e, &mut data);
        }
        write_seed(dir, name, &data);
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    wire_seeds(&root.join("wire_decode"));
    core_seeds(&root.join("core_messages"));
}
