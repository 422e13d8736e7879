//! Property tests of the sequential semantics of SAVE/COPY/EXPUNGE/STORE/CONDSTORE,
//! driven through the real `tandem_core::Server` (a one-server cluster, so every write is
//! ordered by the same master), against a plain reference model of the mailboxes.
//!
//! The model mirrors the core where the core is right. Where the core departs from IMAP
//! the model follows the core and says so (`DEVIATION`); where the core looks wrong, the
//! case is kept as an ignored test below and excluded from the generator, nothing else.

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use tandem_core::*;

const USER: &str = "u";
const NAMES: [&str; 2] = ["INBOX", "Other"];
const FLAGS: [&str; 4] = ["\\Seen", "\\Flagged", "\\Answered", "$Work"];
/// Timers fed while waiting for one reply before the test fails.
const STEP_MAX: usize = 1000;

fn key(name: &str) -> MailboxKey {
    MailboxKey::new(USER, name)
}

fn flag(s: &str) -> Flag {
    Flag::new(s).expect("valid flag")
}

fn flags_of(set: &BTreeSet<String>) -> Vec<Flag> {
    set.iter().map(|s| flag(s)).collect()
}

// ---------------------------------------------------------------------------------------
// Harness. Clients talk to s1; every write is made durable at once; Timers until each
// reply.
//
// A lone server never opens a root term (`check_root` runs only when reachability
// changes, and a server with no peers never sees a change; see
// `lone_server_serves_writes`, ignored), so the one-server cluster of the brief cannot
// serve a write. The harness starts s1 linked to a real s2 until s1 is root of both,
// then either cuts the link for good (`Mode::Isolated`: s1 alone, root and master of
// everything, what a one-server cluster should be) or keeps s2 as a passive replica
// (`Mode::Linked`: s2 is READ too and must show the same state).

const S1: Sid = Sid(1);
const S2: Sid = Sid(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Isolated,
    Linked,
}

struct Harness {
    servers: BTreeMap<Sid, Server>,
    /// Each server's body store, written as its writes become durable.
    bodies: BTreeMap<Sid, MemoryBodies>,
    linked: bool,
    now: Instant,
    next_id: RequestId,
    replies: BTreeMap<(Sid, RequestId), ClientReply>,
    issued: BTreeSet<(Sid, RequestId)>,
}

impl Harness {
    fn new(durability: Durability, mode: Mode) -> Harness {
        let bodies: BTreeMap<Sid, MemoryBodies> =
            [S1, S2].into_iter().map(|sid| (sid, MemoryBodies::default())).collect();
        let servers = [S1, S2]
            .into_iter()
            .map(|sid| {
                let mut cfg = Config::new(sid, vec![S1, S2]);
                cfg.replicas = 0;
                cfg.durability = durability;
                (sid, Server::new(cfg, 7 + u64::from(sid.0), Box::new(bodies[&sid].clone())))
            })
            .collect();
        let mut h = Harness {
            servers,
            bodies,
            linked: true,
            now: Instant(0),
            next_id: 1,
            replies: BTreeMap::new(),
            issued: BTreeSet::new(),
        };
        h.pump(Vec::new());
        h.input(S1, Input::LinkUp { peer: S2 });
        h.input(S2, Input::LinkUp { peer: S1 });
        let settled = |h: &Harness| {
            let (a, b) = (&h.servers[&S1], &h.servers[&S2]);
            a.root_active() && b.term() == a.term()
        };
        for _ in 0..STEP_MAX {
            if settled(&h) {
                break;
            }
            h.tick();
        }
        assert!(settled(&h), "s1 never became the active root of s1+s2");
        if mode == Mode::Isolated {
            h.linked = false;
            h.servers.remove(&S2);
            h.input(S1, Input::LinkDown { peer: S2 });
        }
        h
    }

    fn input(&mut self, sid: Sid, input: Input) {
        self.pump(vec![(sid, input)]);
    }

    fn tick(&mut self) {
        self.now = self.now.plus_us(self.servers[&S1].config().tick_us);
        let inputs = self.servers.keys().map(|sid| (*sid, Input::Timer)).collect();
        self.pump(inputs);
    }

    /// Feed the inputs, then everything they cause: writes made durable in order,
    /// messages delivered over the link, until nothing moves.
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
                            assert!(self.issued.remove(&(sid, id)), "{sid}: reply to unknown request {id}: {reply:?}");
                            self.replies.insert((sid, id), reply);
                        }
                        Output::Send { to, envelope } => {
                            assert!(self.linked, "{sid} sent {envelope:?} to {to} with no link");
                            queue.push((to, Input::Peer { from: sid, envelope }));
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
        self.issued.insert((sid, id));
        self.now = self.now.plus_us(1);
        self.input(sid, Input::Client { id, request: request.clone() });
        for _ in 0..STEP_MAX {
            if let Some(reply) = self.replies.remove(&(sid, id)) {
                return reply;
            }
            self.tick();
        }
        panic!("{sid}: no reply to {request:?} after {STEP_MAX} timer steps");
    }

    fn request(&mut self, request: ClientRequest) -> ClientReply {
        self.request_at(S1, request)
    }

    fn read(&mut self, name: &str) -> ClientReply {
        self.request(ClientRequest::Read { mailbox: key(name) })
    }
}

/// Failure reasons are free text: compare kinds only.
fn normalize(reply: ClientReply) -> ClientReply {
    match reply {
        ClientReply::Write(WriteResult::Failed { kind, .. }) => {
            ClientReply::Write(WriteResult::Failed { kind, reason: String::new() })
        }
        ClientReply::Failed { kind, .. } => ClientReply::Failed { kind, reason: String::new() },
        other => other,
    }
}

fn permanent() -> ClientReply {
    ClientReply::Write(WriteResult::Failed { kind: FailKind::Permanent, reason: String::new() })
}

// ---------------------------------------------------------------------------------------
// Reference model.

#[derive(Clone, Debug)]
struct MMsg {
    guid: Guid,
    flags: BTreeSet<String>,
    modseq: ModSeq,
}

#[derive(Clone, Debug)]
struct MBox {
    uidnext: Uid,
    hms: ModSeq,
    messages: BTreeMap<Uid, MMsg>,
    /// GUIDs expunged from this mailbox, with the UID they had: a COPY of one back in
    /// is a new message under a GUID derived from both (`Guid::copied_back`), as IMAP
    /// makes a new message; the core's tombstone keeps the old GUID out.
    expunged: BTreeMap<Guid, Uid>,
}

impl MBox {
    fn new() -> MBox {
        MBox { uidnext: 1, hms: 0, messages: BTreeMap::new(), expunged: BTreeMap::new() }
    }
}

#[derive(Clone, Debug, Default)]
struct Model {
    boxes: BTreeMap<String, MBox>,
    /// Every GUID the server handed out.
    guids: BTreeSet<Guid>,
}

impl Model {
    fn uidnext(&self, name: &str) -> Uid {
        self.boxes.get(name).map_or(1, |b| b.uidnext)
    }

    fn hms(&self, name: &str) -> ModSeq {
        self.boxes.get(name).map_or(0, |b| b.hms)
    }

    /// SAVE: the GUID comes from the server's reply; everything else is predicted.
    fn save(&mut self, name: &str, flags: BTreeSet<String>, reply: ClientReply) {
        let b = self.boxes.entry(name.to_string()).or_insert_with(MBox::new);
        let ClientReply::Write(WriteResult::Saved { uidvalidity, uid, guid }) = reply else {
            panic!("SAVE into {name}: expected Saved, got {reply:?}");
        };
        assert_eq!(uidvalidity, key(name).initial_uidvalidity(), "SAVE uidvalidity");
        assert_eq!(uid, b.uidnext, "SAVE uid");
        assert!(b.messages.keys().all(|u| *u < uid), "new UID {uid} not above the live ones");
        assert!(self.guids.insert(guid), "SAVE reused GUID {guid}");
        b.uidnext += 1;
        b.hms += 1;
        b.messages.insert(uid, MMsg { guid, flags, modseq: b.hms });
    }

    fn copy(&mut self, src: &str, src_uid: Uid, dst: &str) -> ClientReply {
        let Some(msg) = self.boxes.get(src).and_then(|b| b.messages.get(&src_uid)) else {
            return permanent();
        };
        if src == dst {
            return permanent();
        }
        let mut guid = msg.guid;
        let flags = msg.flags.clone();
        let b = self.boxes.entry(dst.to_string()).or_insert_with(MBox::new);
        let uidvalidity = key(dst).initial_uidvalidity();
        for generation in 0.. {
            if generation == 16 {
                return permanent();
            }
            // DEVIATION (design): a GUID is live at most once per mailbox, so a second COPY
            // of the same message answers with the existing UID instead of making a new one.
            if let Some((&uid, _)) = b.messages.iter().find(|(_, m)| m.guid == guid) {
                return ClientReply::Write(WriteResult::Copied { uidvalidity, uid, guid });
            }
            let Some(&expunged_uid) = b.expunged.get(&guid) else { break };
            guid = guid.copied_back(&key(dst), expunged_uid);
        }
        let uid = b.uidnext;
        b.uidnext += 1;
        b.hms += 1;
        // COPY keeps the message's flags (RFC 3501).
        b.messages.insert(uid, MMsg { guid, flags, modseq: b.hms });
        ClientReply::Write(WriteResult::Copied { uidvalidity, uid, guid })
    }

    fn expunge(&mut self, name: &str, uids: &[Uid]) -> ClientReply {
        let Some(b) = self.boxes.get_mut(name) else { return permanent() };
        let mut removed = Vec::new();
        for uid in uids {
            if let Some(m) = b.messages.remove(uid) {
                b.expunged.insert(m.guid, *uid);
                removed.push(*uid);
            }
        }
        if !removed.is_empty() {
            b.hms += 1;
        }
        ClientReply::Write(WriteResult::Expunged { uids: removed, modseq: b.hms })
    }

    fn store(
        &mut self,
        name: &str,
        uids: &[Uid],
        add: &BTreeSet<String>,
        remove: &BTreeSet<String>,
        since: Option<ModSeq>,
    ) -> ClientReply {
        let Some(b) = self.boxes.get_mut(name) else { return permanent() };
        let modseq = b.hms + 1;
        let mut rejected = Vec::new();
        let mut current = Vec::new();
        let mut changed = false;
        for uid in uids {
            let Some(m) = b.messages.get_mut(uid) else { continue };
            if since.is_some_and(|s| m.modseq > s) {
                rejected.push(*uid);
                current.push(CurrentFlags { uid: *uid, flags: flags_of(&m.flags), modseq: m.modseq });
                continue;
            }
            m.flags.extend(add.iter().cloned());
            for f in remove.difference(add) {
                m.flags.remove(f);
            }
            // Even a STORE that changes no flag gives the message a new modseq.
            m.modseq = modseq;
            changed = true;
        }
        if changed {
            b.hms = modseq;
        }
        ClientReply::Write(WriteResult::Stored { modseq: b.hms, rejected, current })
    }

    fn view(&self, name: &str) -> ClientReply {
        let Some(b) = self.boxes.get(name) else {
            return ClientReply::Failed { kind: FailKind::Permanent, reason: String::new() };
        };
        ClientReply::Read(MailboxView {
            mailbox: key(name),
            uidvalidity: key(name).initial_uidvalidity(),
            uidnext: b.uidnext,
            highest_modseq: b.hms,
            messages: b
                .messages
                .iter()
                .map(|(uid, m)| MessageView {
                    uid: *uid,
                    guid: m.guid,
                    flags: flags_of(&m.flags),
                    modseq: m.modseq,
                    // Every message of the model is saved with this date and body.
                    received: 1_700_000_000,
                    size: b"Subject: model\r\n\r\nbody\r\n".len() as u32,
                })
                .collect(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Operations: abstract picks, made concrete against the model's state when run.

#[derive(Clone, Debug)]
enum Op {
    Save { mbox: usize, flags: Vec<usize> },
    Copy { src: usize, uid: u32, dst: usize },
    Expunge { mbox: usize, uids: Vec<u32> },
    Store { mbox: usize, uids: Vec<u32>, add: Vec<usize>, remove: Vec<usize>, since: Option<i64> },
}

/// A UID in 1..uidnext+2, so that some are missing.
fn pick_uid(model: &Model, name: &str, raw: u32) -> Uid {
    1 + raw % (model.uidnext(name) + 1)
}

/// UIDs without repeats. A UID named twice in one EXPUNGE/STORE is the core bug kept in
/// `expunge_duplicate_uid_reported_once` and `store_duplicate_uid_counts_once`; it is the
/// one case the generator leaves out.
fn pick_uids(model: &Model, name: &str, raw: &[u32]) -> Vec<Uid> {
    let mut seen = BTreeSet::new();
    raw.iter().map(|r| pick_uid(model, name, *r)).filter(|u| seen.insert(*u)).collect()
}

fn flag_set(picks: &[usize]) -> BTreeSet<String> {
    picks.iter().map(|i| FLAGS[*i].to_string()).collect()
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let mbox = 0..NAMES.len();
    let flags = || prop::collection::vec(0..FLAGS.len(), 0..3);
    let uids = || prop::collection::vec(any::<u32>(), 0..4);
    prop_oneof![
        4 => (mbox.clone(), flags()).prop_map(|(mbox, flags)| Op::Save { mbox, flags }),
        2 => (mbox.clone(), any::<u32>(), mbox.clone()).prop_map(|(src, uid, dst)| Op::Copy { src, uid, dst }),
        2 => (mbox.clone(), uids()).prop_map(|(mbox, uids)| Op::Expunge { mbox, uids }),
        4 => (mbox, uids(), flags(), flags(), prop::option::weighted(0.4, -3i64..=1))
            .prop_map(|(mbox, uids, add, remove, since)| Op::Store { mbox, uids, add, remove, since }),
    ]
}

/// Run one op against the server and the model; panics on any difference.
fn step(h: &mut Harness, model: &mut Model, op: &Op) -> String {
    match op {
        Op::Save { mbox, flags } => {
            let name = NAMES[*mbox];
            let set = flag_set(flags);
            let request = ClientRequest::Save {
                mailbox: key(name),
                received: 1_700_000_000,
                flags: flags.iter().map(|i| flag(FLAGS[*i])).collect(),
                // Each save its own bytes: equal bytes would be taken for a retry.
                body: Body::from(format!("Subject: {:05}\r\n\r\nbody\r\n", h.next_id % 100_000).into_bytes()),
                delivery: false,
            };
            let text = format!("{request:?}");
            let reply = h.request(request);
            model.save(name, set, reply);
            text
        }
        Op::Copy { src, uid, dst } => {
            let (src, dst) = (NAMES[*src], NAMES[*dst]);
            let src_uid = pick_uid(model, src, *uid);
            let request = ClientRequest::Copy { src: key(src), src_uid, dst: key(dst) };
            let text = format!("{request:?}");
            let before = model.uidnext(dst);
            let got = normalize(h.request(request));
            let want = model.copy(src, src_uid, dst);
            assert_eq!(got, want, "reply to {text}");
            if model.uidnext(dst) != before {
                let Some(b) = model.boxes.get(dst) else { unreachable!() };
                assert_eq!(b.messages.keys().next_back(), Some(&before), "COPY got a UID below UIDNEXT");
            }
            text
        }
        Op::Expunge { mbox, uids } => {
            let name = NAMES[*mbox];
            let uids = pick_uids(model, name, uids);
            let request = ClientRequest::Expunge { mailbox: key(name), uids: uids.clone() };
            let text = format!("{request:?}");
            let got = normalize(h.request(request));
            assert_eq!(got, model.expunge(name, &uids), "reply to {text}");
            text
        }
        Op::Store { mbox, uids, add, remove, since } => {
            let name = NAMES[*mbox];
            let uids = pick_uids(model, name, uids);
            let since = since.map(|off| model.hms(name).saturating_add_signed(off));
            let request = ClientRequest::Store {
                mailbox: key(name),
                uids: uids.clone(),
                add: add.iter().map(|i| flag(FLAGS[*i])).collect(),
                remove: remove.iter().map(|i| flag(FLAGS[*i])).collect(),
                unchanged_since: since,
            };
            let text = format!("{request:?}");
            let got = normalize(h.request(request));
            let want = model.store(name, &uids, &flag_set(add), &flag_set(remove), since);
            assert_eq!(got, want, "reply to {text}");
            text
        }
    }
}

/// READ every mailbox at every server and compare with the model; check that UIDNEXT
/// and HIGHESTMODSEQ never went down.
type Seen = BTreeMap<(Sid, &'static str), (Uid, ModSeq)>;

fn check_views(h: &mut Harness, model: &Model, last: &mut Seen, after: &str) {
    let sids: Vec<Sid> = h.servers.keys().copied().collect();
    for sid in sids {
        for name in NAMES {
            let got = normalize(h.request_at(sid, ClientRequest::Read { mailbox: key(name) }));
            assert_eq!(got, model.view(name), "{sid}: READ {name} after {after}");
            if let ClientReply::Read(view) = got {
                let (uidnext, hms) = last.get(&(sid, name)).copied().unwrap_or((1, 0));
                assert!(view.uidnext >= uidnext, "{sid}: UIDNEXT of {name} went down after {after}");
                assert!(view.highest_modseq >= hms, "{sid}: HIGHESTMODSEQ of {name} went down after {after}");
                assert!(view.messages.iter().all(|m| m.uid < view.uidnext && m.modseq <= view.highest_modseq));
                last.insert((sid, name), (view.uidnext, view.highest_modseq));
            }
        }
    }
}

fn run(durability: Durability, mode: Mode, ops: &[Op]) {
    let mut h = Harness::new(durability, mode);
    let mut model = Model::default();
    let mut last = Seen::new();
    let mut trace = Vec::new();
    for op in ops {
        trace.push(step(&mut h, &mut model, op));
        check_views(&mut h, &model, &mut last, &trace.join("; "));
    }
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op_strategy(), 1..60)
}

proptest! {
    /// One server alone, sync mode (replicas = 0).
    #[test]
    fn model_sync(ops in ops()) {
        run(Durability::Sync, Mode::Isolated, &ops);
    }

    /// One server alone, async mode.
    #[test]
    fn model_async(ops in ops()) {
        run(Durability::Async, Mode::Isolated, &ops);
    }

    /// Writes at s1 (the master), READs at s1 and at its replica s2.
    #[test]
    fn model_sync_with_replica(ops in ops()) {
        run(Durability::Sync, Mode::Linked, &ops);
    }
}

// ---------------------------------------------------------------------------------------
// Specific cases.

fn save(h: &mut Harness, name: &str, flags: &[&str]) -> Uid {
    let request = ClientRequest::Save {
        mailbox: key(name),
        received: 1_700_000_000,
        flags: flags.iter().map(|f| flag(f)).collect(),
        // Each save its own bytes: equal bytes would be taken for a retry.
        body: Body::from(format!("Subject: case {}\r\n\r\nbody\r\n", h.next_id).into_bytes()),
        delivery: false,
    };
    match h.request(request) {
        ClientReply::Write(WriteResult::Saved { uid, .. }) => uid,
        other => panic!("SAVE failed: {other:?}"),
    }
}

fn store(h: &mut Harness, uids: &[Uid], add: &[&str], remove: &[&str], since: Option<ModSeq>) -> WriteResult {
    let request = ClientRequest::Store {
        mailbox: key("INBOX"),
        uids: uids.to_vec(),
        add: add.iter().map(|f| flag(f)).collect(),
        remove: remove.iter().map(|f| flag(f)).collect(),
        unchanged_since: since,
    };
    match h.request(request) {
        ClientReply::Write(result) => result,
        other => panic!("STORE: {other:?}"),
    }
}

fn view(h: &mut Harness, name: &str) -> MailboxView {
    match h.read(name) {
        ClientReply::Read(view) => view,
        other => panic!("READ {name}: {other:?}"),
    }
}

#[test]
fn seed_flag_example_sequential() {
    for (durability, mode) in [(Durability::Sync, Mode::Isolated), (Durability::Async, Mode::Linked)] {
        let mut h = Harness::new(durability, mode);
        let uid = save(&mut h, "INBOX", &["\\Flagged"]);
        store(&mut h, &[uid], &["\\Answered"], &[], None);
        store(&mut h, &[uid], &["\\Seen"], &[], None);
        let last = store(&mut h, &[uid], &[], &["\\Flagged"], None);
        assert_eq!(last, WriteResult::Stored { modseq: 4, rejected: vec![], current: vec![] });
        let v = view(&mut h, "INBOX");
        assert_eq!(v.messages.len(), 1);
        assert_eq!(v.messages[0].flags, vec![flag("\\Answered"), flag("\\Seen")]);
        assert_eq!((v.messages[0].modseq, v.highest_modseq, v.uidnext), (4, 4, 2));
    }
}

#[test]
fn condstore_rejects_messages_changed_since() {
    let mut h = Harness::new(Durability::Sync, Mode::Isolated);
    let a = save(&mut h, "INBOX", &[]); // modseq 1
    let b = save(&mut h, "INBOX", &[]); // modseq 2
    store(&mut h, &[a], &["\\Seen"], &[], None); // a: modseq 3
    let r = store(&mut h, &[a, b], &["\\Flagged"], &[], Some(2));
    let current = vec![CurrentFlags { uid: a, flags: vec![flag("\\Seen")], modseq: 3 }];
    assert_eq!(r, WriteResult::Stored { modseq: 4, rejected: vec![a], current: current.clone() });
    // Everything rejected: no new modseq.
    let r = store(&mut h, &[a], &["\\Answered"], &[], Some(2));
    assert_eq!(r, WriteResult::Stored { modseq: 4, rejected: vec![a], current });
    let v = view(&mut h, "INBOX");
    let flags: Vec<_> = v.messages.iter().map(|m| (m.uid, m.flags.clone(), m.modseq)).collect();
    assert_eq!(flags, vec![(a, vec![flag("\\Seen")], 3), (b, vec![flag("\\Flagged")], 4)]);
    assert_eq!(v.highest_modseq, 4);
}

#[test]
fn expunge_then_save_gets_a_fresh_uid() {
    let mut h = Harness::new(Durability::Async, Mode::Isolated);
    let uids: Vec<Uid> = (0..3).map(|_| save(&mut h, "INBOX", &[])).collect();
    assert_eq!(uids, vec![1, 2, 3]);
    let r = h.request(ClientRequest::Expunge { mailbox: key("INBOX"), uids: vec![3, 9, 2] });
    assert_eq!(r, ClientReply::Write(WriteResult::Expunged { uids: vec![3, 2], modseq: 4 }));
    assert_eq!(save(&mut h, "INBOX", &[]), 4);
    let r = h.request(ClientRequest::Expunge { mailbox: key("INBOX"), uids: vec![1, 4] });
    assert_eq!(r, ClientReply::Write(WriteResult::Expunged { uids: vec![1, 4], modseq: 6 }));
    assert_eq!(save(&mut h, "INBOX", &[]), 5);
    let v = view(&mut h, "INBOX");
    assert_eq!(v.messages.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![5]);
    assert_eq!((v.uidnext, v.highest_modseq), (6, 7));
}

#[test]
fn copy_failures_and_unknown_mailboxes() {
    let mut h = Harness::new(Durability::Sync, Mode::Isolated);
    assert_eq!(normalize(h.read("INBOX")), ClientReply::Failed { kind: FailKind::Permanent, reason: String::new() });
    let uid = save(&mut h, "INBOX", &["\\Seen"]);
    let copy = |src: &str, src_uid, dst: &str| ClientRequest::Copy { src: key(src), src_uid, dst: key(dst) };
    assert_eq!(normalize(h.request(copy("INBOX", uid + 1, "Other"))), permanent());
    assert_eq!(normalize(h.request(copy("INBOX", uid, "INBOX"))), permanent());
    assert_eq!(normalize(h.request(copy("Other", 1, "INBOX"))), permanent());
    let r = h.request(ClientRequest::Expunge { mailbox: key("Other"), uids: vec![1] });
    assert_eq!(normalize(r), permanent());
    assert_eq!(normalize(h.read("Other")), ClientReply::Failed { kind: FailKind::Permanent, reason: String::new() });
    let ClientReply::Write(WriteResult::Copied { uid: copied, .. }) = h.request(copy("INBOX", uid, "Other")) else {
        panic!("COPY failed")
    };
    assert_eq!(copied, 1);
    let v = view(&mut h, "Other");
    assert_eq!((v.uidnext, v.highest_modseq, v.messages[0].modseq), (2, 1, 1));
}

#[test]
fn a_message_moved_to_trash_and_back_is_a_new_message_in_its_old_mailbox() {
    let mut h = Harness::new(Durability::Sync, Mode::Linked);
    let copy = |src: &str, src_uid, dst: &str| ClientRequest::Copy { src: key(src), src_uid, dst: key(dst) };
    let expunge = |mailbox: &str, uid| ClientRequest::Expunge { mailbox: key(mailbox), uids: vec![uid] };
    let copied = |reply: ClientReply| match reply {
        ClientReply::Write(WriteResult::Copied { uid, guid, .. }) => (uid, guid),
        other => panic!("COPY failed: {other:?}"),
    };
    let uid = save(&mut h, "INBOX", &["\\Seen"]);
    let original = view(&mut h, "INBOX").messages[0].guid;
    // A MOVE to Trash: a COPY, then the EXPUNGE of the source.
    let (in_trash, trash_guid) = copied(h.request(copy("INBOX", uid, "Trash")));
    assert_eq!(trash_guid, original, "a COPY elsewhere keeps the GUID");
    h.request(expunge("INBOX", uid));
    // And back: INBOX holds a tombstone of the GUID, so the copy is a new message.
    let (back, back_guid) = copied(h.request(copy("Trash", in_trash, "INBOX")));
    assert!(back > uid, "a new UID above the expunged one");
    assert_ne!(back_guid, original, "the expunged GUID stays expunged");
    let again = copied(h.request(copy("Trash", in_trash, "INBOX")));
    assert_eq!(again, (back, back_guid), "the same COPY again places nothing more");
    h.request(expunge("Trash", in_trash));
    let inbox = view(&mut h, "INBOX");
    let kept: Vec<_> = inbox.messages.iter().map(|m| (m.uid, m.guid, m.flags.clone())).collect();
    assert_eq!(kept, vec![(back, back_guid, vec![flag("\\Seen")])], "flags travel with the move back");
    assert!(view(&mut h, "Trash").messages.is_empty());
    // Twice more round the same way: each time another GUID, each placed once.
    let (to_trash, _) = copied(h.request(copy("INBOX", back, "Trash")));
    h.request(expunge("INBOX", back));
    let (third, third_guid) = copied(h.request(copy("Trash", to_trash, "INBOX")));
    assert!(third > back);
    assert!(third_guid != back_guid && third_guid != original);
    assert_eq!(view(&mut h, "INBOX").messages.len(), 1);
}

fn rename(h: &mut Harness, from: &str, to: &str) -> ClientReply {
    h.request(ClientRequest::RenameMailbox { from: key(from), to: key(to) })
}

#[test]
fn rename_onto_a_new_name_keeps_uids_and_flags_under_the_uidvalidity_of_its_path() {
    for mode in [Mode::Isolated, Mode::Linked] {
        let mut h = Harness::new(Durability::Sync, mode);
        assert!(matches!(
            h.request(ClientRequest::CreateMailbox { mailbox: key("Work"), special_use: SpecialUse::NONE }),
            ClientReply::Write(WriteResult::MailboxDone { .. })
        ));
        let a = save(&mut h, "Work", &["\\Seen"]);
        let b = save(&mut h, "Work", &["$Later"]);
        h.request(ClientRequest::Expunge { mailbox: key("Work"), uids: vec![a] });
        let before = view(&mut h, "Work");
        assert!(matches!(rename(&mut h, "Work", "Done"), ClientReply::Write(WriteResult::MailboxDone { .. })));
        let after = view(&mut h, "Done");
        assert_eq!(after.uidnext, before.uidnext, "{mode:?}");
        // A UIDVALIDITY of the rename's path: not the old name's, and the same wherever
        // that RENAME is made (see `MailboxKey::renamed_uidvalidity`).
        assert_eq!(after.uidvalidity, key("Done").renamed_uidvalidity(&key("Work"), before.uidvalidity), "{mode:?}");
        assert_ne!(after.uidvalidity, before.uidvalidity, "{mode:?}");
        assert_eq!(
            after.messages.iter().map(|m| (m.uid, m.guid, m.flags.clone())).collect::<Vec<_>>(),
            before.messages.iter().map(|m| (m.uid, m.guid, m.flags.clone())).collect::<Vec<_>>()
        );
        assert_eq!(after.messages[0].uid, b);
        let gone = ClientReply::Failed { kind: FailKind::Permanent, reason: String::new() };
        assert_eq!(normalize(h.read("Work")), gone, "{mode:?}: the old name is gone");
        if mode == Mode::Linked {
            let replica = h.request_at(S2, ClientRequest::Read { mailbox: key("Done") });
            assert_eq!(normalize(replica), normalize(ClientReply::Read(after.clone())));
        }
        // The old name comes back with its own history: no UID of it is shown again.
        h.request(ClientRequest::CreateMailbox { mailbox: key("Work"), special_use: SpecialUse::NONE });
        let again = view(&mut h, "Work");
        assert_eq!((again.uidvalidity, again.uidnext), (before.uidvalidity, before.uidnext));
        assert!(again.messages.is_empty());
    }
}

#[test]
fn rename_onto_a_deleted_name_gives_a_new_uidvalidity_and_continues_its_uids() {
    let mut h = Harness::new(Durability::Sync, Mode::Isolated);
    save(&mut h, "Old", &[]);
    save(&mut h, "Old", &[]);
    let old = view(&mut h, "Old");
    h.request(ClientRequest::DeleteMailbox { mailbox: key("Old") });
    let moved = save(&mut h, "New", &["\\Flagged"]);
    let guid = view(&mut h, "New").messages[0].guid;
    assert_eq!(moved, 1);
    assert!(matches!(rename(&mut h, "New", "Old"), ClientReply::Write(WriteResult::MailboxDone { .. })));
    let v = view(&mut h, "Old");
    assert_ne!(v.uidvalidity, old.uidvalidity, "a new incarnation of the name");
    assert_eq!(v.messages.iter().map(|m| (m.uid, m.guid)).collect::<Vec<_>>(), vec![(old.uidnext, guid)]);
    assert_eq!(v.messages[0].flags, vec![flag("\\Flagged")]);
}

#[test]
fn rename_onto_a_name_that_held_one_of_the_messages_is_refused_not_lost() {
    let mut h = Harness::new(Durability::Sync, Mode::Isolated);
    let uid = save(&mut h, "X", &[]);
    h.request(ClientRequest::Copy { src: key("X"), src_uid: uid, dst: key("From") });
    h.request(ClientRequest::DeleteMailbox { mailbox: key("X") });
    assert_eq!(normalize(rename(&mut h, "From", "X")), permanent());
    assert_eq!(view(&mut h, "From").messages.len(), 1, "the message stays where it was");
}

#[test]
fn rename_refusals_and_inbox() {
    let mut h = Harness::new(Durability::Sync, Mode::Isolated);
    let uid = save(&mut h, "INBOX", &[]);
    save(&mut h, "Taken", &[]);
    assert_eq!(normalize(rename(&mut h, "Nothing", "Else")), permanent());
    assert_eq!(normalize(rename(&mut h, "INBOX", "Taken")), permanent());
    assert_eq!(normalize(rename(&mut h, "Taken", "INBOX")), permanent());
    assert_eq!(normalize(rename(&mut h, "Taken", "Taken/Below")), permanent());
    assert_eq!(normalize(rename(&mut h, "Taken", "Taken")), permanent());
    // INBOX: its messages move, INBOX stays (empty).
    assert!(matches!(rename(&mut h, "INBOX", "Archive"), ClientReply::Write(WriteResult::MailboxDone { .. })));
    assert_eq!(view(&mut h, "Archive").messages.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![uid]);
    let inbox = view(&mut h, "INBOX");
    assert!(inbox.messages.is_empty());
    assert_eq!(save(&mut h, "INBOX", &[]), uid + 1, "INBOX never reuses a UID");
}

// ---------------------------------------------------------------------------------------
// Divergences from IMAP, kept failing until the core is fixed.

/// RFC 3501 6.4.7: COPY keeps the flags (and the internal date). The core copies with no
/// flags: `execute` calls `master_save(&dst, guid, received, &[], None, tag)`.
#[test]
fn copy_preserves_flags() {
    let mut h = Harness::new(Durability::Sync, Mode::Isolated);
    let uid = save(&mut h, "INBOX", &["\\Seen", "$Work"]);
    h.request(ClientRequest::Copy { src: key("INBOX"), src_uid: uid, dst: key("Other") });
    let v = view(&mut h, "Other");
    assert_eq!(v.messages[0].flags, vec![flag("$Work"), flag("\\Seen")]);
}

/// EXPUNGE naming a UID twice (a client's `UID EXPUNGE 1,1` or `1:2,2`) removes it once
/// but reports it twice: `master_expunge` maps the request's (UID, our UID) pairs, one
/// per name, to the reply. A front end turning the reply into `* n EXPUNGE` lines would
/// send one too many. Minimal sequence: SAVE INBOX; EXPUNGE INBOX [1, 1].
#[test]
fn expunge_duplicate_uid_reported_once() {
    let mut h = Harness::new(Durability::Sync, Mode::Isolated);
    let uid = save(&mut h, "INBOX", &[]);
    let r = h.request(ClientRequest::Expunge { mailbox: key("INBOX"), uids: vec![uid, uid] });
    assert_eq!(r, ClientReply::Write(WriteResult::Expunged { uids: vec![uid], modseq: 2 }));
}

/// STORE naming a UID twice applies to it twice: the second pass sees the modseq the
/// first pass just gave it, so with UNCHANGEDSINCE the message is both changed and
/// reported as rejected (RFC 7162 MODIFIED for a message whose flags were set), and
/// without it the reply carries spurious `current` flags. Minimal sequence:
/// SAVE INBOX; STORE INBOX [1, 1] +\Seen UNCHANGEDSINCE 1.
#[test]
fn store_duplicate_uid_counts_once() {
    let mut h = Harness::new(Durability::Sync, Mode::Isolated);
    let uid = save(&mut h, "INBOX", &[]);
    let r = store(&mut h, &[uid, uid], &["\\Seen"], &[], Some(1));
    assert_eq!(r, WriteResult::Stored { modseq: 2, rejected: vec![], current: vec![] });
    let r = store(&mut h, &[uid, uid], &["\\Flagged"], &[], None);
    assert_eq!(r, WriteResult::Stored { modseq: 3, rejected: vec![], current: vec![] });
}

/// A one-server cluster never serves a write: `check_root` runs only when reachability
/// changes, and a server with no peers starts with itself reachable and never sees a
/// change, so it never opens a root term, no master is ever found and every write times
/// out with "no master reachable in time". The same holds for any server that starts
/// with no link up (DESIGN.md: each side of a partition proceeds on its own).
/// Minimal sequence: Config::new(s1, [s1]), replicas = 0; SAVE INBOX; Timers.
#[test]
fn lone_server_serves_writes() {
    let mut cfg = Config::new(S1, vec![S1]);
    cfg.replicas = 0;
    let tick = cfg.tick_us;
    let mut server = Server::new(cfg, 7, Box::new(MemoryBodies::default()));
    let mut now = Instant(0);
    let request = ClientRequest::Save {
        mailbox: key("INBOX"),
        received: 0,
        flags: vec![],
        body: Body::from_static(b"x"),
        delivery: false,
    };
    let mut input = Some(Input::Client { id: 1, request });
    for _ in 0..STEP_MAX {
        server.handle(now, input.take().unwrap_or(Input::Timer));
        let mut writes = Vec::new();
        while let Some(out) = server.poll_output() {
            match out {
                Output::Write { id, .. } => writes.push(id),
                Output::Reply { reply, .. } => {
                    assert!(matches!(reply, ClientReply::Write(WriteResult::Saved { uid: 1, .. })), "{reply:?}");
                    return;
                }
                Output::Send { .. } => {}
            }
        }
        for id in writes {
            server.handle(now, Input::Durable { upto: id });
        }
        now = now.plus_us(tick);
    }
    panic!("no reply to SAVE");
}

/// A server restored from its snapshot (`Server::snapshot` and `Server::resume`, how a
/// recording begins a new file in the middle of a run) is the same server: the same
/// state digest, and on the same inputs the same replies and the same state after.
#[test]
fn a_resumed_snapshot_is_the_same_server() {
    let save = |n: u32| ClientRequest::Save {
        mailbox: key("INBOX"),
        received: 1_700_000_000,
        flags: vec![],
        body: Body::from(format!("Subject: {n}\r\n\r\nbody {n}\r\n").into_bytes()),
        delivery: true,
    };
    let mut h = Harness::new(Durability::Sync, Mode::Linked);
    for n in 0..3 {
        h.request_at(if n % 2 == 0 { S1 } else { S2 }, save(n));
    }
    let mut servers = BTreeMap::new();
    let mut bodies = BTreeMap::new();
    for (sid, server) in &h.servers {
        let store = h.bodies[sid].deep_copy();
        let snapshot = server.snapshot().expect("a snapshot");
        let resumed = Server::resume(&snapshot, Box::new(store.clone())).expect("it resumes");
        assert_eq!(resumed.state_digest(), server.state_digest(), "{sid}");
        servers.insert(*sid, resumed);
        bodies.insert(*sid, store);
    }
    let mut twin = Harness {
        servers,
        bodies,
        linked: h.linked,
        now: h.now,
        next_id: h.next_id,
        replies: BTreeMap::new(),
        issued: BTreeSet::new(),
    };
    assert!(Server::resume(b"not a snapshot", Box::new(MemoryBodies::default())).is_err());
    for n in 3..7 {
        let at = if n % 2 == 0 { S1 } else { S2 };
        assert_eq!(h.request_at(at, save(n)), twin.request_at(at, save(n)), "save {n}");
    }
    assert_eq!(h.read("INBOX"), twin.read("INBOX"));
    for sid in [S1, S2] {
        assert_eq!(h.servers[&sid].state_digest(), twin.servers[&sid].state_digest(), "{sid}");
    }
}
