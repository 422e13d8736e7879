//! A user replica (`tandem_core::user_replica`) against a two-server cluster, all three
//! real `Server`s driven in one process: the seed thread's laptop, which goes offline,
//! changes things, and syncs back under the cluster's conflict rules.

use std::collections::{BTreeMap, BTreeSet};
use tandem_core::user_replica::{ReplicaSync, Side, SyncMarks, SyncReport};
use tandem_core::*;

const USER: &str = "alice";
const S1: Sid = Sid(1);
const S2: Sid = Sid(2);
/// The laptop: a cluster of its own.
const LAPTOP: Sid = Sid(100);
const STEP_MAX: usize = 2000;

fn key(name: &str) -> MailboxKey {
    MailboxKey::new(USER, name)
}

fn flag(s: &str) -> Flag {
    Flag::new(s).expect("valid flag")
}

struct World {
    servers: BTreeMap<Sid, Server>,
    bodies: BTreeMap<Sid, MemoryBodies>,
    now: Instant,
    next_id: RequestId,
    replies: BTreeMap<(Sid, RequestId), ClientReply>,
}

fn first_line(body: &[u8]) -> Body {
    let end = body.iter().position(|b| *b == b'\n').map_or(body.len(), |i| i + 1);
    Body::copy_from_slice(&body[..end])
}

impl World {
    fn new() -> World {
        World::with_partial(None)
    }

    /// The cluster, and a laptop holding the part `partial` names.
    fn with_partial(partial: Option<tandem_core::partial::Partial>) -> World {
        let mut servers = BTreeMap::new();
        let mut bodies = BTreeMap::new();
        for sid in [S1, S2] {
            // The cluster's driver cuts a message to its text parts: here, its first line.
            let store = MemoryBodies::default().cutting(first_line);
            let mut cfg = Config::new(sid, vec![S1, S2]);
            cfg.replicas = 1;
            servers.insert(sid, Server::new(cfg, 7 + u64::from(sid.0), Box::new(store.clone())));
            bodies.insert(sid, store);
        }
        let store = MemoryBodies::default();
        let mut cfg = Config::new(LAPTOP, vec![LAPTOP]);
        cfg.replicas = 0;
        cfg.user_replica = true;
        cfg.partial = partial;
        servers.insert(LAPTOP, Server::new(cfg, 99, Box::new(store.clone())));
        bodies.insert(LAPTOP, store);
        let mut w = World { servers, bodies, now: Instant(0), next_id: 1, replies: BTreeMap::new() };
        w.pump(vec![(S1, Input::LinkUp { peer: S2 }), (S2, Input::LinkUp { peer: S1 })]);
        for _ in 0..STEP_MAX {
            if w.servers[&S1].root_active() && w.servers[&S2].term() == w.servers[&S1].term() {
                return w;
            }
            w.tick();
        }
        panic!("the cluster never opened a term");
    }

    fn tick(&mut self) {
        self.now = self.now.plus_us(50_000);
        let inputs = self.servers.keys().map(|sid| (*sid, Input::Timer)).collect();
        self.pump(inputs);
    }

    /// Feeds the inputs and everything they cause: writes durable at once, messages
    /// delivered between S1 and S2 (the laptop has no peer link).
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
                            assert_ne!(sid, LAPTOP, "the laptop sent {envelope:?} to {to}");
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

    fn send(&mut self, sid: Sid, request: ClientRequest) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        self.now = self.now.plus_us(1);
        self.pump(vec![(sid, Input::Client { id, request })]);
        id
    }

    fn request(&mut self, sid: Sid, request: ClientRequest) -> ClientReply {
        let id = self.send(sid, request.clone());
        for _ in 0..STEP_MAX {
            if let Some(reply) = self.replies.remove(&(sid, id)) {
                return reply;
            }
            self.tick();
        }
        panic!("{sid}: no reply to {request:?}");
    }

    fn save(&mut self, sid: Sid, name: &str, text: &str, flags: &[&str]) -> Uid {
        self.save_sized(sid, name, text, flags, (1_700_000_000, 0))
    }

    /// A save received at `received`, its body padded with `padding` bytes.
    fn save_sized(
        &mut self,
        sid: Sid,
        name: &str,
        text: &str,
        flags: &[&str],
        (received, padding): (u64, usize),
    ) -> Uid {
        let request = ClientRequest::Save {
            mailbox: key(name),
            received,
            flags: flags.iter().map(|f| flag(f)).collect(),
            body: Body::from(format!("Subject: {text}\r\n\r\n{text}\r\n{}", "x".repeat(padding)).into_bytes()),
            delivery: false,
        };
        match self.request(sid, request) {
            ClientReply::Write(WriteResult::Saved { uid, .. }) => uid,
            other => panic!("{sid}: SAVE {text} to {name}: {other:?}"),
        }
    }

    fn write(&mut self, sid: Sid, request: ClientRequest) {
        let reply = self.request(sid, request.clone());
        let ok = matches!(reply, ClientReply::Write(ref r) if !matches!(r, WriteResult::Failed { .. }));
        assert!(ok, "{sid}: {request:?}: {reply:?}");
    }

    fn view(&mut self, sid: Sid, name: &str) -> MailboxView {
        match self.request(sid, ClientRequest::Read { mailbox: key(name) }) {
            ClientReply::Read(view) => view,
            other => panic!("{sid}: READ {name}: {other:?}"),
        }
    }

    /// (UID, body text, flags) of every message, as a client sees them.
    fn contents(&mut self, sid: Sid, name: &str) -> Vec<(Uid, String, Vec<String>)> {
        let view = self.view(sid, name);
        let server = &self.servers[&sid];
        view.messages
            .iter()
            .map(|m| {
                let body =
                    server.stored_body(m.guid).map(|b| String::from_utf8_lossy(&b).to_string()).unwrap_or_default();
                let subject = body.lines().next().unwrap_or("").trim_start_matches("Subject: ").to_string();
                (m.uid, subject, m.flags.iter().map(|f| f.as_str().to_string()).collect())
            })
            .collect()
    }

    fn mailbox_names(&self, sid: Sid) -> BTreeSet<String> {
        self.servers[&sid]
            .image()
            .mailboxes
            .iter()
            .filter(|(k, m)| &*k.user == USER && m.visible())
            .map(|(k, _)| k.name.to_string())
            .collect()
    }

    /// Runs the agent between the laptop and `home` until it is done.
    fn sync(&mut self, home: Sid, marks: SyncMarks) -> (SyncReport, SyncMarks) {
        let mut agent = ReplicaSync::new(USER, marks, 3);
        let mut sent: BTreeMap<(Sid, RequestId), (Side, RequestId)> = BTreeMap::new();
        for _ in 0..STEP_MAX {
            while let Some((side, agent_id, request)) = agent.poll_request() {
                let sid = if side == Side::Replica { LAPTOP } else { home };
                let id = self.send(sid, request);
                sent.insert((sid, id), (side, agent_id));
            }
            let answered: Vec<(Sid, RequestId)> =
                sent.keys().filter(|k| self.replies.contains_key(k)).copied().collect();
            for k in answered {
                let reply = self.replies.remove(&k).expect("answered");
                let (side, agent_id) = sent.remove(&k).expect("sent");
                agent.handle_reply(side, agent_id, reply);
            }
            if agent.is_done() {
                return (agent.report().clone(), agent.marks().clone());
            }
            if agent.outstanding() > 0 && sent.keys().all(|k| !self.replies.contains_key(k)) {
                self.tick();
            }
        }
        panic!("the sync never ended: {:?}", agent.report());
    }

    fn assert_same(&mut self, names: &[&str]) {
        assert_eq!(self.mailbox_names(LAPTOP), self.mailbox_names(S1), "the same folders");
        for name in names {
            let (laptop, cluster) = (self.contents(LAPTOP, name), self.contents(S1, name));
            assert_eq!(laptop, cluster, "{name}: the laptop and the cluster show the same messages");
            assert_eq!(self.view(LAPTOP, name).uidvalidity, self.view(S1, name).uidvalidity, "{name}");
        }
    }
}

fn subjects(contents: &[(Uid, String, Vec<String>)]) -> BTreeSet<String> {
    contents.iter().map(|(_, s, _)| s.clone()).collect()
}

#[test]
fn a_laptop_takes_the_users_mail_then_syncs_offline_changes_both_ways() {
    let mut w = World::new();
    for (n, flags) in [(1, vec![]), (2, vec!["\\Seen"]), (3, vec![])] {
        w.save(S1, "INBOX", &format!("server-{n}"), &flags);
    }
    w.save(S2, "Archive", "old", &["\\Seen"]);

    // First sync: the laptop was empty.
    let (first, marks) = w.sync(S2, SyncMarks::default());
    assert!(first.converged, "{first:?}");
    assert_eq!(first.bodies_pulled, 4, "each body comes down once: {first:?}");
    assert_eq!(first.bodies_pushed, 0, "{first:?}");
    w.assert_same(&["INBOX", "Archive"]);
    let inbox_before = w.contents(LAPTOP, "INBOX");

    // Nothing changed: one look at both lists, and nothing else.
    let (idle, marks) = w.sync(S2, marks);
    assert!(idle.converged && idle.requests == 2 && idle.mailboxes_synced == 0, "{idle:?}");

    // Offline: the laptop saves two messages (UIDs 4 and 5 here), files server-1 into
    // a new folder (copy and expunge), flags server-3, writes a draft in a new folder.
    w.save(LAPTOP, "INBOX", "laptop-a", &[]);
    w.save(LAPTOP, "INBOX", "laptop-b", &["\\Seen"]);
    w.write(LAPTOP, ClientRequest::CreateMailbox { mailbox: key("Projects"), special_use: Default::default() });
    w.write(LAPTOP, ClientRequest::Copy { src: key("INBOX"), src_uid: 1, dst: key("Projects") });
    w.write(LAPTOP, ClientRequest::Expunge { mailbox: key("INBOX"), uids: vec![1] });
    let store = |uids: Vec<Uid>, add: &[&str], remove: &[&str]| ClientRequest::Store {
        mailbox: key("INBOX"),
        uids,
        add: add.iter().map(|f| flag(f)).collect(),
        remove: remove.iter().map(|f| flag(f)).collect(),
        unchanged_since: None,
    };
    w.write(LAPTOP, store(vec![3], &["\\Flagged"], &[]));
    w.save(LAPTOP, "Drafts", "draft", &["\\Draft"]);
    // Meanwhile on the cluster: a new message takes UID 4 (a conflict with the
    // laptop's), webmail clears \Seen of server-2 and sets $Work on server-3.
    w.save(S1, "INBOX", "server-4", &[]);
    w.write(S2, store(vec![2], &[], &["\\Seen"]));
    w.write(S2, store(vec![3], &["$Work"], &[]));

    let (back, marks) = w.sync(S2, marks);
    assert!(back.converged, "{back:?}");
    // The laptop's three new messages go up; the filed copy is the same message, whose
    // body the cluster has; only server-4 comes down.
    assert_eq!(back.bodies_pushed, 3, "{back:?}");
    assert_eq!(back.bodies_pulled, 1, "{back:?}");
    w.assert_same(&["INBOX", "Archive", "Projects", "Drafts"]);
    let inbox = w.contents(S1, "INBOX");
    assert_eq!(
        subjects(&inbox),
        ["laptop-a", "laptop-b", "server-2", "server-3", "server-4"].map(String::from).into(),
        "no message lost, the expunged one gone: {inbox:?}"
    );
    // UID 4 was shown for two messages (laptop-a on the laptop, server-4 on the
    // cluster): both moved above every UID either side used; none keeps 4.
    assert!(inbox.iter().all(|(uid, _, _)| *uid != 4), "{inbox:?}");
    let uid_of = |s: &str| inbox.iter().find(|(_, subject, _)| subject == s).map(|m| m.0).expect("present");
    assert!(uid_of("laptop-a") > 5 && uid_of("server-4") > 5, "{inbox:?}");
    // Flag deltas from both sides: server-3 has both, server-2 lost \Seen.
    let flags_of = |s: &str| inbox.iter().find(|(_, subject, _)| subject == s).map(|m| m.2.clone()).expect("present");
    assert_eq!(flags_of("server-3"), vec!["$Work".to_string(), "\\Flagged".to_string()]);
    assert!(flags_of("server-2").is_empty());
    // Messages the two sides never disagreed on kept their UIDs.
    assert_eq!(uid_of("server-2"), 2);
    assert_eq!(inbox_before.iter().find(|m| m.1 == "server-3").map(|m| m.0), Some(uid_of("server-3")));
    assert_eq!(subjects(&w.contents(S1, "Projects")), ["server-1".to_string()].into());

    // And the replica of the cluster holds the same.
    assert_eq!(w.contents(S2, "INBOX"), inbox);
    let (again, _) = w.sync(S2, marks);
    assert!(again.converged && again.mailboxes_synced == 0, "{again:?}");
}

#[test]
fn a_cluster_server_refuses_to_adopt_answers_only_the_mailboxs_bodies_and_merges_nothing_without_its_body() {
    let mut w = World::new();
    w.save(S1, "INBOX", "one", &[]);
    let state = MailboxState::empty(key("INBOX"), 1);
    let adopt = ClientRequest::ReplicaAdopt { state, bodies: Vec::new(), pushed_upto: 0, from_cluster: Vec::new() };
    assert!(
        matches!(w.request(S2, adopt), ClientReply::Failed { kind: FailKind::Permanent, .. }),
        "only a user replica adopts the cluster's decisions"
    );
    // Another user's message is not read by naming its GUID in one's own mailbox.
    let bob = MailboxKey::new("bob", "INBOX");
    let request = ClientRequest::Save {
        mailbox: bob.clone(),
        received: 1,
        flags: Vec::new(),
        body: Body::from_static(b"Subject: for bob\r\n\r\nsecret\r\n"),
        delivery: false,
    };
    let bobs = match w.request(S1, request) {
        ClientReply::Write(WriteResult::Saved { guid, .. }) => guid,
        other => panic!("{other:?}"),
    };
    let ask = |mailbox: MailboxKey| ClientRequest::ReplicaBodies { mailbox, guids: vec![bobs] };
    assert!(matches!(w.request(S1, ask(key("INBOX"))), ClientReply::ReplicaBodies { bodies } if bodies.is_empty()));
    assert!(matches!(w.request(S1, ask(bob)), ClientReply::ReplicaBodies { bodies } if bodies.len() == 1));
    // A push that names a message whose body neither side has changes nothing.
    let pulled = match w.request(S1, ClientRequest::ReplicaPull { mailbox: key("INBOX"), since: None, partial: None }) {
        ClientReply::ReplicaState { state, .. } => state,
        other => panic!("{other:?}"),
    };
    let mut forged = pulled.clone();
    let mut record = forged.messages[0].clone();
    record.uid = 7;
    record.guid = Guid(42);
    forged.messages = vec![record];
    match w.request(S2, ClientRequest::ReplicaPush { state: *forged, bodies: Vec::new(), from_cluster: Vec::new() }) {
        ClientReply::Write(WriteResult::Merged { missing, .. }) => assert_eq!(missing, vec![Guid(42)]),
        other => panic!("{other:?}"),
    }
    assert_eq!(w.view(S1, "INBOX").messages.len(), 1, "nothing merged without its body");
    // A body that does not match its record's checksum is not taken for it.
    let mut forged = pulled;
    forged.messages[0].uid = 8;
    forged.messages[0].guid = Guid(43);
    let bodies = vec![(Guid(43), Body::from_static(b"other bytes"))];
    match w.request(S2, ClientRequest::ReplicaPush { state: *forged, bodies, from_cluster: Vec::new() }) {
        ClientReply::Write(WriteResult::Merged { missing, .. }) => assert_eq!(missing, vec![Guid(43)]),
        other => panic!("{other:?}"),
    }
}

/// The seed thread's "replicate only certain folders over certain date ranges (or only
/// parts of certain messages, eg excluding large attachments)", and Timo's FETCH-SMALL
/// that remembers what it dropped "so that they could later be downloaded again".
#[test]
fn a_partial_laptop_holds_its_folders_its_window_and_small_bodies_and_fetches_the_rest_on_demand() {
    let partial = tandem_core::partial::Partial {
        mailboxes: vec!["INBOX".into(), "Notes".into()],
        since_s: 1_500,
        body_bytes_max: Some(1000),
        keep_fetched: true,
    };
    let mut w = World::with_partial(Some(partial));
    w.save_sized(S1, "INBOX", "old", &[], (1_000, 0));
    w.save_sized(S1, "INBOX", "small", &[], (2_000, 0));
    let big = w.save_sized(S1, "INBOX", "big", &[], (2_000, 5000));
    w.save_sized(S2, "Archive", "archived", &[], (2_000, 0));

    let (first, marks) = w.sync(S2, SyncMarks::default());
    assert!(first.converged, "{first:?}");
    assert_eq!(first.bodies_pulled, 1, "only the small body in the window comes down: {first:?}");
    assert_eq!(w.mailbox_names(LAPTOP), ["INBOX".to_string()].into(), "Archive is not held");
    let inbox = w.contents(LAPTOP, "INBOX");
    assert_eq!(inbox.iter().map(|m| m.0).collect::<Vec<_>>(), vec![2, 3], "the window, at the cluster's UIDs");
    assert_eq!(inbox[1].1, "", "the big body is omitted: {inbox:?}");
    let (idle, marks) = w.sync(S2, marks);
    assert!(idle.converged && idle.mailboxes_synced == 0, "what is not held is not a difference: {idle:?}");

    // A client reads the big one: told to come back; the next sync brings it.
    let fetch = ClientRequest::FetchBody { mailbox: key("INBOX"), uid: big };
    assert!(matches!(w.request(LAPTOP, fetch.clone()), ClientReply::Failed { kind: FailKind::Temporary, .. }));
    let (brought, marks) = w.sync(S2, marks);
    assert!(brought.converged && brought.bodies_on_demand == 1, "{brought:?}");
    match w.request(LAPTOP, fetch) {
        ClientReply::Body { body, .. } => assert!(body.starts_with(b"Subject: big"), "the cluster's bytes"),
        other => panic!("the body is here now: {other:?}"),
    }

    // Offline on the laptop: "small" expunged, a note written, a folder of its own
    // (outside its patterns) made. The cluster flags the old message the laptop never held.
    w.write(LAPTOP, ClientRequest::Expunge { mailbox: key("INBOX"), uids: vec![2] });
    w.save(LAPTOP, "Notes", "note", &[]);
    w.save(LAPTOP, "Private", "diary", &[]);
    let flag_old = ClientRequest::Store {
        mailbox: key("INBOX"),
        uids: vec![1],
        add: vec![flag("\\Flagged")],
        remove: Vec::new(),
        unchanged_since: None,
    };
    w.write(S1, flag_old);
    let (back, marks) = w.sync(S2, marks);
    assert!(back.converged, "{back:?}");
    let cluster = subjects(&w.contents(S1, "INBOX"));
    assert_eq!(cluster, ["old", "big"].map(String::from).into(), "the expunge went up, nothing else went");
    assert_eq!(subjects(&w.contents(S1, "Notes")), ["note".to_string()].into());
    assert!(!w.mailbox_names(S1).contains("Private"), "a folder outside the patterns stays the laptop's");
    assert_eq!(subjects(&w.contents(S1, "Archive")), ["archived".to_string()].into());
    assert_eq!(subjects(&w.contents(LAPTOP, "INBOX")), ["big".to_string()].into(), "still not the old one");
    let (again, _) = w.sync(S2, marks);
    assert!(again.converged && again.mailboxes_synced == 0, "{again:?}");
}

#[test]
fn a_body_fetched_for_one_read_is_dropped_again_when_not_kept() {
    let partial =
        tandem_core::partial::Partial { body_bytes_max: Some(100), keep_fetched: false, ..Default::default() };
    let mut w = World::with_partial(Some(partial));
    let big = w.save_sized(S1, "INBOX", "big", &[], (2_000, 500));
    let (_, marks) = w.sync(S2, SyncMarks::default());
    let fetch = ClientRequest::FetchBody { mailbox: key("INBOX"), uid: big };
    assert!(matches!(w.request(LAPTOP, fetch.clone()), ClientReply::Failed { kind: FailKind::Temporary, .. }));
    let (brought, marks) = w.sync(S2, marks);
    assert_eq!(brought.bodies_on_demand, 1, "{brought:?}");
    // A restart between the fetch and the read forgets nothing: the body is still on loan.
    let laptop = &w.servers[&LAPTOP];
    let (cfg, disk) = (laptop.config().clone(), laptop.image().clone());
    w.servers.insert(LAPTOP, Server::recover(cfg, disk, 100, Box::new(w.bodies[&LAPTOP].clone())));
    w.tick();
    assert!(matches!(w.request(LAPTOP, fetch.clone()), ClientReply::Body { .. }));
    assert!(matches!(w.request(LAPTOP, fetch), ClientReply::Failed { kind: FailKind::Temporary, .. }), "dropped");
    // The scrub does not take the omitted body for a lost one: nothing to repair, and
    // the copies still agree.
    for _ in 0..50 {
        w.tick();
    }
    let (again, _) = w.sync(S2, marks);
    assert!(again.converged && again.mailboxes_synced == 0, "{again:?}");
    assert_eq!(w.servers[&LAPTOP].wanted_bodies(), 0, "neither the adopt nor the scrub wants an omitted body");
}

/// A partial laptop gets the text parts of what it omits in the sync that brings the
/// record; an agent's text parts request is answered for a bounded number of messages.
#[test]
fn a_partial_laptop_gets_text_parts_and_a_request_for_them_is_bounded() {
    let partial = tandem_core::partial::Partial { body_bytes_max: Some(100), ..Default::default() };
    let mut w = World::with_partial(Some(partial));
    for n in 0..20 {
        w.save_sized(S1, "INBOX", &format!("big {n}"), &[], (1_700_000_000, 500));
    }
    let (report, _) = w.sync(S2, SyncMarks::default());
    assert!(report.converged, "{report:?}");
    assert_eq!(report.text_parts_pulled, 20, "{report:?}");
    let laptop = w.servers[&LAPTOP].image();
    assert_eq!(laptop.text_parts.len(), 20);
    assert!(laptop.text_parts.values().all(|t| t.starts_with(b"Subject: big ") && t.len() < 20), "first lines only");
    let guids: Vec<Guid> = w.view(S1, "INBOX").messages.iter().map(|m| m.guid).collect();
    let asked = ClientRequest::ReplicaTextParts { mailbox: key("INBOX"), guids };
    match w.request(S1, asked) {
        ClientReply::ReplicaTextParts { parts } => {
            assert_eq!(parts.len(), tandem_core::server::TEXT_PARTS_ANSWERED_MAX)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_laptops_own_incarnation_that_wins_moves_the_cluster_and_is_never_left() {
    let mut w = World::new();
    // Offline, the laptop makes INBOX itself: the name's own UIDVALIDITY, laptop-1 shown
    // at UID 1. The cluster's INBOX is an IMPORT's, under a lesser UIDVALIDITY.
    let own = key("INBOX").initial_uidvalidity();
    assert!(own > 1, "the import's UIDVALIDITY must be the lesser");
    assert_eq!(w.save(LAPTOP, "INBOX", "laptop-1", &[]), 1);
    let import = ClientRequest::Import {
        mailbox: key("INBOX"),
        uidvalidity: 1,
        uid: 30,
        received: 1_700_000_000,
        flags: Vec::new(),
        body: Body::from(b"Subject: imported\r\n\r\nimported\r\n".to_vec()),
    };
    w.write(S1, import);
    assert_eq!(w.view(S1, "INBOX").uidvalidity, 1);

    // The laptop's incarnation wins (both gave out UIDs; its UIDVALIDITY is the
    // greater): the push moves the cluster to it, the laptop keeps its UID 1, and the
    // imported message takes a new UID in it.
    let (report, _) = w.sync(S2, SyncMarks::default());
    assert!(report.converged, "{report:?}");
    w.assert_same(&["INBOX"]);
    assert_eq!(w.view(S1, "INBOX").uidvalidity, own);
    let inbox = w.contents(S1, "INBOX");
    assert_eq!(inbox.iter().find(|m| m.1 == "laptop-1").map(|m| m.0), Some(1), "{inbox:?}");
    assert!(inbox.iter().any(|m| m.1 == "imported" && m.0 > 30), "{inbox:?}");
    // The job ran at the mailbox's master, S1 (where the IMPORT was).
    assert_eq!(w.servers[&S1].marks().count(Mark::PushMovedIncarnation), 1);

    // Its adopt never leaves a winning incarnation for the cluster's: the laptop, given
    // the cluster's lesser copy directly, refuses it and keeps its own.
    let mut other = World::new();
    assert_eq!(other.save(LAPTOP, "INBOX", "laptop-1", &[]), 1);
    // The cluster's copy binds UID 1 to the laptop's own message too: under another
    // UIDVALIDITY that is no binding the laptop holds as the cluster does.
    let ours = other.servers[&LAPTOP].image().mailboxes[&key("INBOX")].messages.get(&1).cloned().expect("UID 1");
    let mut lesser = MailboxState::empty(key("INBOX"), 1);
    lesser.uidnext = 31;
    lesser.highest_modseq = 1;
    lesser.messages.push(ours);
    let reply = other.request(
        LAPTOP,
        ClientRequest::ReplicaAdopt { state: lesser, bodies: Vec::new(), pushed_upto: 0, from_cluster: Vec::new() },
    );
    assert!(
        matches!(reply, ClientReply::ReplicaAdopted { pushed_upto: 0, ref held, .. } if held.is_empty()),
        "{reply:?}"
    );
    assert_eq!(other.view(LAPTOP, "INBOX").uidvalidity, own);
    assert_eq!(other.contents(LAPTOP, "INBOX").first().map(|m| m.0), Some(1));
    assert_eq!(other.servers[&LAPTOP].marks().count(Mark::ReplicaKeptOwnIncarnation), 1);
}
