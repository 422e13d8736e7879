//! Issue 11: replication never builds a command the peer must refuse, and a peer's
//! absurd numbers are refused instead of overflowing. Two servers whose every message
//! goes through the wire codec (one encoder/decoder pair per direction), as in the node.

use std::collections::BTreeMap;
use tandem_core::store::StoredBody;
use tandem_core::wire::{Decoder, Encoder, LINE_LEN_MAX};
use tandem_core::*;

const S1: Sid = Sid(1);
const S2: Sid = Sid(2);
const STEP_MAX: usize = 2000;

struct Harness {
    servers: BTreeMap<Sid, Server>,
    /// Each server's body store, written as its writes become durable.
    bodies: BTreeMap<Sid, MemoryBodies>,
    codecs: BTreeMap<(Sid, Sid), (Encoder, Decoder)>,
    now: Instant,
    next_id: RequestId,
    replies: BTreeMap<(Sid, RequestId), ClientReply>,
    /// The longest command text sent (binding lines and commands, bodies included).
    longest: usize,
    commands: usize,
}

fn inbox() -> MailboxKey {
    MailboxKey::new("u", "INBOX")
}

/// Both servers start with the same `n`-message INBOX (bodies included).
fn image(n: u32, store: &MemoryBodies) -> DiskImage {
    let key = inbox();
    let mut m = mailbox::new_mailbox(&key);
    let mut db = DiskImage::default();
    let body = Body::from_static(b"Subject: x\r\n\r\nx\r\n");
    let checksum = hash::body_checksum(&body);
    for uid in 1..=n {
        let guid = Guid(u128::from(uid) << 64 | 0xabcd);
        let record = MessageRecord {
            uid,
            guid,
            received: 1,
            size: body.len() as u32,
            checksum,
            modseq: 1,
            flags: Default::default(),
            claimed: false,
            pushed: false,
        };
        m.messages.insert(uid, record);
        db.bodies.insert(guid, StoredBody { checksum, len: body.len() as u64 });
        store.overwrite(guid, body.clone());
    }
    m.uidnext = n + 1;
    m.highest_modseq = 1;
    db.mailboxes.insert(key, m);
    db
}

impl Harness {
    fn new(n: u32) -> Harness {
        let bodies: BTreeMap<Sid, MemoryBodies> =
            [S1, S2].into_iter().map(|sid| (sid, MemoryBodies::default())).collect();
        let servers = [S1, S2]
            .into_iter()
            .map(|sid| {
                let mut cfg = Config::new(sid, vec![S1, S2]);
                cfg.replicas = 1;
                cfg.durability = Durability::Sync;
                cfg.request_timeout_us = 600_000_000;
                (
                    sid,
                    Server::recover(cfg, image(n, &bodies[&sid]), 7 + u64::from(sid.0), Box::new(bodies[&sid].clone())),
                )
            })
            .collect();
        let codecs = [(S1, S2), (S2, S1)].into_iter().map(|d| (d, (Encoder::new(), Decoder::new()))).collect();
        let mut h = Harness {
            servers,
            bodies,
            codecs,
            now: Instant(0),
            next_id: 1,
            replies: BTreeMap::new(),
            longest: 0,
            commands: 0,
        };
        h.pump(Vec::new());
        h.pump(vec![(S1, Input::LinkUp { peer: S2 }), (S2, Input::LinkUp { peer: S1 })]);
        for _ in 0..STEP_MAX {
            if h.servers[&S1].root_active() && h.servers[&S2].term() == h.servers[&S1].term() {
                return h;
            }
            h.tick();
        }
        panic!("s1 never became the active root");
    }

    fn tick(&mut self) {
        self.now = self.now.plus_us(50_000);
        let inputs = self.servers.keys().map(|sid| (*sid, Input::Timer)).collect();
        self.pump(inputs);
    }

    /// Feeds the inputs and everything they cause; every peer message is encoded and
    /// decoded, and must decode (the peer never refuses a line).
    fn pump(&mut self, mut queue: Vec<(Sid, Input)>) {
        loop {
            for (sid, input) in std::mem::take(&mut queue) {
                if let Some(server) = self.servers.get_mut(&sid) {
                    server.handle(self.now, input);
                }
            }
            for (&sid, server) in &mut self.servers {
                while let Some(out) = server.poll_output() {
                    match out {
                        Output::Write { id, write } => {
                            self.bodies.entry(sid).or_default().apply(&write);
                            queue.push((sid, Input::Durable { upto: id }));
                        }
                        Output::Reply { id, reply } => {
                            self.replies.insert((sid, id), reply);
                        }
                        Output::Send { to, envelope } => {
                            let (enc, dec) = self.codecs.get_mut(&(sid, to)).expect("a link");
                            let mut bytes = Vec::new();
                            enc.try_encode(&envelope, &mut bytes).expect("the core sent a command that does not fit");
                            for line in bytes.split(|b| *b == b'\n') {
                                self.longest = self.longest.max(line.len());
                            }
                            self.commands += 1;
                            let (decoded, n) = dec.decode(&bytes).expect("the peer refuses").expect("a whole command");
                            assert_eq!(n, bytes.len());
                            assert_eq!(decoded, envelope);
                            queue.push((to, Input::Peer { from: sid, envelope: decoded }));
                        }
                    }
                }
            }
            if queue.is_empty() {
                return;
            }
        }
    }

    fn request_at(&mut self, sid: Sid, request: ClientRequest) -> ClientReply {
        let id = self.next_id;
        self.next_id += 1;
        self.now = self.now.plus_us(1);
        self.pump(vec![(sid, Input::Client { id, request })]);
        for _ in 0..STEP_MAX {
            if let Some(reply) = self.replies.remove(&(sid, id)) {
                return reply;
            }
            self.tick();
        }
        panic!("{sid}: no reply after {STEP_MAX} timer steps");
    }

    /// Ticks until both logs are drained.
    fn settle(&mut self) {
        for _ in 0..STEP_MAX {
            if self.servers.values().all(|s| s.backlog().values().all(|n| *n == 0)) {
                return;
            }
            self.tick();
        }
        panic!("the logs never drained");
    }

    fn mailbox(&self, sid: Sid) -> &store::StoredMailbox {
        &self.servers[&sid].image().mailboxes[&inbox()]
    }
}

const N: u32 = 200_000;

#[test]
fn store_and_expunge_of_200k_messages_fit_the_lines_and_replicate() {
    let mut h = Harness::new(N);
    let seen = Flag::new("\\Seen").unwrap();
    let all: Vec<Uid> = (1..=N).collect();
    // At the master (s1, the root, takes the mailbox): one modseq, logged in parts.
    let reply = h.request_at(
        S1,
        ClientRequest::Store {
            mailbox: inbox(),
            uids: all.clone(),
            add: vec![seen.clone()],
            remove: vec![],
            unchanged_since: None,
        },
    );
    let ClientReply::Write(WriteResult::Stored { modseq, rejected, .. }) = reply else { panic!("{reply:?}") };
    assert!(rejected.is_empty());
    h.settle();
    for sid in [S1, S2] {
        let m = h.mailbox(sid);
        assert_eq!(m.messages.len(), N as usize);
        assert!(m.messages.values().all(|r| r.flags.get(&seen).is_some_and(|f| f.present) && r.modseq == modseq));
    }
    eprintln!("STORE at the master: {} commands, longest line {} bytes", h.commands, h.longest);
    assert!(h.longest <= LINE_LEN_MAX);
    // From the replica (s2): forwarded in parts, answered once.
    let flagged = Flag::new("\\Flagged").unwrap();
    let reply = h.request_at(
        S2,
        ClientRequest::Store {
            mailbox: inbox(),
            uids: all.clone(),
            add: vec![flagged.clone()],
            remove: vec![],
            unchanged_since: None,
        },
    );
    assert!(matches!(reply, ClientReply::Write(WriteResult::Stored { .. })), "{reply:?}");
    h.settle();
    for sid in [S1, S2] {
        assert!(h.mailbox(sid).messages.values().all(|r| r.flags.get(&flagged).is_some_and(|f| f.present)));
    }
    // EXPUNGE of every message, from the replica.
    let reply = h.request_at(S2, ClientRequest::Expunge { mailbox: inbox(), uids: all });
    let ClientReply::Write(WriteResult::Expunged { uids, .. }) = reply else { panic!("{reply:?}") };
    assert_eq!(uids.len(), N as usize);
    h.settle();
    for sid in [S1, S2] {
        let m = h.mailbox(sid);
        assert!(m.messages.is_empty());
        assert_eq!(m.tombstones.len(), N as usize);
    }
    eprintln!("after EXPUNGE: {} commands, longest line {} bytes", h.commands, h.longest);
    assert!(h.longest <= LINE_LEN_MAX);
    assert_eq!(h.servers[&S1].marks().count(Mark::UnsendableChange), 0);
}

#[test]
fn long_mailbox_names_and_too_many_flags_are_refused() {
    let mut h = Harness::new(3);
    let long = MailboxKey::new("u", &"a".repeat(limits::MAILBOX_NAME_LEN_MAX + 1));
    let reply = h.request_at(S2, ClientRequest::CreateMailbox { mailbox: long, special_use: SpecialUse::NONE });
    assert!(matches!(reply, ClientReply::Write(WriteResult::Failed { kind: FailKind::Permanent, .. })), "{reply:?}");
    let deep = MailboxKey::new("u", &vec!["a"; limits::MAILBOX_DEPTH_MAX + 1].join("/"));
    let reply = h.request_at(S2, ClientRequest::CreateMailbox { mailbox: deep, special_use: SpecialUse::NONE });
    assert!(matches!(reply, ClientReply::Write(WriteResult::Failed { kind: FailKind::Permanent, .. })), "{reply:?}");
    let flags: Vec<Flag> = (0..=limits::FLAGS_PER_REQUEST_MAX).map(|i| Flag::new(&format!("k{i}")).unwrap()).collect();
    let reply = h.request_at(
        S1,
        ClientRequest::Store { mailbox: inbox(), uids: vec![1], add: flags, remove: vec![], unchanged_since: None },
    );
    assert!(matches!(reply, ClientReply::Write(WriteResult::Failed { kind: FailKind::Permanent, .. })), "{reply:?}");
    let ok = MailboxKey::new("u", &"a".repeat(limits::MAILBOX_NAME_LEN_MAX));
    let reply = h.request_at(S2, ClientRequest::CreateMailbox { mailbox: ok, special_use: SpecialUse::NONE });
    assert!(matches!(reply, ClientReply::Write(WriteResult::MailboxDone { .. })), "{reply:?}");
}

#[test]
fn absurd_numbers_from_a_peer_are_refused() {
    let mut h = Harness::new(3);
    let epoch = h.servers[&S1].term().epoch;
    let record = |uid: Uid, modseq: ModSeq| MessageRecord {
        uid,
        guid: Guid(77),
        received: 1,
        size: 1,
        checksum: hash::body_checksum(b"x"),
        modseq,
        flags: Default::default(),
        claimed: false,
        pushed: false,
    };
    let absurd = [
        Msg::LinkState { origin: S2, seq: 999_999, epoch: u64::MAX, store: 1, neighbors: vec![S1] },
        Msg::LinkState { origin: S2, seq: u64::MAX, epoch: 1, store: 1, neighbors: vec![S1] },
        Msg::Root { epoch: u64::MAX, root: S2 },
        Msg::Dropped { epoch: u64::MAX },
        Msg::Change {
            seq: 1_000,
            change: Change::Save {
                mailbox: inbox(),
                uidvalidity: h.mailbox(S1).uidvalidity,
                record: record(u32::MAX, 5),
                body: Body::from_static(b"x"),
            },
        },
        Msg::Change {
            seq: 1_001,
            change: Change::Store {
                mailbox: inbox(),
                uidvalidity: h.mailbox(S1).uidvalidity,
                stamp: Stamp { modseq: u64::MAX, sid: S2 },
                messages: vec![(1, Guid(1 << 64 | 0xabcd))],
                add: vec![Flag::new("\\Seen").unwrap()],
                remove: vec![],
            },
        },
    ];
    for msg in absurd {
        let envelope = Envelope { src: S2, dst: S1, hops: 0, msg };
        h.pump(vec![(S1, Input::Peer { from: S2, envelope })]);
    }
    assert_eq!(h.servers[&S1].marks().count(Mark::PeerInputRefused), 6);
    assert_eq!(h.servers[&S1].term().epoch, epoch, "the epoch moved");
    assert!(h.servers[&S1].image().epoch <= limits::EPOCH_MAX);
    assert!(h.mailbox(S1).messages.get(&u32::MAX).is_none());
    assert!(h.mailbox(S1).highest_modseq <= limits::MODSEQ_MAX);
    for _ in 0..40 {
        h.tick();
    }
    // Still one root, and writes still work and replicate.
    assert!(h.servers[&S1].root_active());
    assert_eq!(h.servers[&S2].term(), h.servers[&S1].term());
    let reply = h.request_at(
        S2,
        ClientRequest::Save {
            mailbox: inbox(),
            received: 2,
            flags: vec![],
            body: Body::from_static(b"hello"),
            delivery: false,
        },
    );
    let ClientReply::Write(WriteResult::Saved { uid, .. }) = reply else { panic!("{reply:?}") };
    assert_eq!(uid, 4);
    h.settle();
    assert_eq!(h.mailbox(S1).messages.len(), 4);
    assert_eq!(h.mailbox(S2).messages.len(), 4);
}

/// Sizes `limits::UIDS_PER_CHANGE_MAX`: a maximal R-STORE, R-EXPUNGE and forwarded
/// STORE (largest numbers, longest mailbox name, most and longest flags) stay within
/// 80% of a line; the codec refuses, and writes nothing for, one that does not fit.
#[test]
fn maximal_parts_fit_a_line() {
    let n = limits::UIDS_PER_CHANGE_MAX;
    let mailbox =
        MailboxKey::new(&"u".repeat(limits::USER_LEN_MAX), &"\u{e9}".repeat(limits::MAILBOX_NAME_LEN_MAX / 2));
    let flags: Vec<Flag> = (0..limits::FLAGS_PER_REQUEST_MAX)
        .map(|i| Flag::new(&format!("{i:0>width$}", width = types::FLAG_LEN_MAX)).unwrap())
        .collect();
    let messages: Vec<(Uid, Guid)> = (0..n).map(|_| (u32::MAX, Guid(u128::MAX))).collect();
    let tombstone = Tombstone::retirement(u32::MAX, Guid(u128::MAX), u64::MAX);
    let msgs = [
        Msg::Change {
            seq: u64::MAX,
            change: Change::Store {
                mailbox: mailbox.clone(),
                uidvalidity: u32::MAX,
                stamp: Stamp { modseq: u64::MAX, sid: Sid(u32::MAX) },
                messages: messages.clone(),
                add: flags.clone(),
                remove: flags.clone(),
            },
        },
        Msg::Change {
            seq: u64::MAX,
            change: Change::Expunge { mailbox: mailbox.clone(), uidvalidity: u32::MAX, tombstones: vec![tombstone; n] },
        },
        Msg::Request {
            tag: u64::MAX,
            request: WriteRequest::Store {
                mailbox: mailbox.clone(),
                messages: messages.clone(),
                add: flags.clone(),
                remove: flags.clone(),
                unchanged_since: Some(u64::MAX),
                known_modseq: u64::MAX,
            },
        },
    ];
    for msg in msgs {
        let env = Envelope { src: Sid(u32::MAX), dst: Sid(u32::MAX), hops: msg::HOPS_MAX, msg };
        let mut bytes = Vec::new();
        Encoder::new().try_encode(&env, &mut bytes).expect("a maximal part fits");
        let longest = bytes.split(|b| *b == b'\n').map(|l| l.len()).max().unwrap_or(0);
        eprintln!("maximal {}: {longest} bytes", env.msg.name());
        assert!(longest <= LINE_LEN_MAX * 8 / 10, "{} takes {longest} bytes", env.msg.name());
        assert!(matches!(Decoder::new().decode(&bytes), Ok(Some(_))));
    }
    // Twice the parts: refused, nothing written, and the encoder still in step.
    let mut enc = Encoder::new();
    let mut dec = Decoder::new();
    let too_big = Envelope {
        src: S1,
        dst: S2,
        hops: 0,
        msg: Msg::Change {
            seq: 1,
            change: Change::Expunge { mailbox: mailbox.clone(), uidvalidity: 1, tombstones: vec![tombstone; 2 * n] },
        },
    };
    let mut bytes = Vec::new();
    assert!(enc.try_encode(&too_big, &mut bytes).is_err());
    assert!(bytes.is_empty());
    let small = Envelope {
        msg: Msg::Change { seq: 2, change: Change::Expunge { mailbox, uidvalidity: 1, tombstones: vec![tombstone] } },
        ..too_big
    };
    enc.encode(&small, &mut bytes);
    assert_eq!(dec.decode(&bytes).expect("decodes").map(|(e, _)| e), Some(small));
}

/// What a session is told changed after the modseq it has shown: nothing for an unchanged
/// mailbox, the changed records and the ended bindings otherwise, on the master and on
/// the replica alike; None for another UIDVALIDITY.
#[test]
fn changes_since_a_modseq_are_what_changed_after_it() {
    let mut h = Harness::new(5);
    let validity = h.mailbox(S1).uidvalidity;
    for sid in [S1, S2] {
        let none = h.servers[&sid].changes_since(&inbox(), validity, 1).expect("the mailbox is there");
        assert_eq!((none.count, none.changed.len(), none.gone.len()), (5, 0, 0));
        assert!(h.servers[&sid].changes_since(&inbox(), validity ^ 1, 1).is_none());
    }
    let seen = Flag::new("\\Seen").unwrap();
    let reply = h.request_at(
        S1,
        ClientRequest::Store {
            mailbox: inbox(),
            uids: vec![2],
            add: vec![seen],
            remove: vec![],
            unchanged_since: None,
        },
    );
    let ClientReply::Write(WriteResult::Stored { modseq, .. }) = reply else { panic!("{reply:?}") };
    h.settle();
    let reply = h.request_at(S1, ClientRequest::Expunge { mailbox: inbox(), uids: vec![3] });
    assert!(matches!(reply, ClientReply::Write(WriteResult::Expunged { .. })), "{reply:?}");
    h.settle();
    for sid in [S1, S2] {
        let since_start = h.servers[&sid].changes_since(&inbox(), validity, 1).expect("the mailbox is there");
        assert_eq!(since_start.changed.iter().map(|m| m.uid).collect::<Vec<_>>(), [2], "{sid}");
        assert_eq!(since_start.gone, [3], "{sid}");
        assert_eq!(since_start.count, 4);
        let since_store = h.servers[&sid].changes_since(&inbox(), validity, modseq).expect("the mailbox is there");
        assert!(since_store.changed.is_empty(), "{sid}: {since_store:?}");
        assert_eq!(since_store.gone, [3]);
        let now = h.servers[&sid].changes_since(&inbox(), validity, since_store.highest_modseq).unwrap();
        assert!(now.changed.is_empty() && now.gone.is_empty());
    }
}
