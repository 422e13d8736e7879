//! From an incident's recordings to a scenario file: every node's recordings
//! (`tandem_core::record`, one file per start) become the scenario that runs the same
//! incident in the simulator: the clients' requests at the instants the nodes got them,
//! the links the nodes saw go down and come back as cuts and restores, a node whose
//! recording ends before the others' as a crash (and its next recording as the restart),
//! and, as expectations, what the real cluster held at the end: each mailbox's count,
//! each message present or expunged, and its flags.
//!
//! Messages are named by their bodies (`m` and the first bytes of the body's SHA-256):
//! a delivery of the same bytes to the same mailbox again is an MTA's retry and keeps
//! the label, so the simulator sends the same bytes again. A client names messages by
//! UID, which the scenario cannot (UIDs are what a run decides): each node's recordings
//! are replayed through this core, and the UID a request names is looked up in the
//! replayed node's store at that input, then named by the label of the message there.
//! The replay needs the bodies (`record.bodies = true`): a peer's change carries its
//! body's checksum, which a stand-in fails. The simulator makes bodies of the recorded
//! sizes.

use crate::replay::{RecordedReads, same_build};
use crate::scenario::{self, Action, Expect, Scenario, TimedEvent, UnchangedSince};
use std::collections::{BTreeMap, BTreeSet};
use tandem_core::record::{self, BodyKey, Frame, Recording};
use tandem_core::{ClientReply, ClientRequest, ExternalEdit, Guid, Input, MailboxKey, Output, Server, Sid};
use tandem_core::{MemberChange, StoreWrite, WriteResult};

/// A peer sees a killed node's links go down a little after the node's last recorded
/// input (its last frames may not have reached the disk) and see them come back a
/// while after it restarted: link changes this close to a node's stop or restart are
/// the crash's, not a partition's.
const CRASH_LINK_BEFORE_MS: u64 = 1_000;
const CRASH_LINK_AFTER_MS: u64 = 5_000;
/// A node whose last recording ends this long before the last input of the incident
/// stopped during it (a crash); nodes that stopped within it were stopped at the end.
const STOPPED_BEFORE_END_MS: u64 = 2_000;
/// A node that started this long after the first one is started late in the scenario.
const LATE_START_MS: u64 = 2_000;
/// What a GUID-named message is called until every recording is read.
const BY_GUID: &str = "\u{0}guid:";

/// A scenario made from recordings, and what it does not reproduce.
#[derive(Clone, Debug)]
pub struct Conversion {
    pub scenario: Scenario,
    /// One line per thing of the incident the scenario leaves out or approximates.
    pub notes: Vec<String>,
}

/// The scenario as a file, its head naming the recordings it came from and what it
/// leaves out.
pub fn to_toml(c: &Conversion, sources: &[String]) -> String {
    let mut comment = format!(
        "Made by `tandem-sim replay --to-scenario` from {} recordings ({} events, {} expectations):\n",
        sources.len(),
        c.scenario.events.len(),
        c.scenario.expects.len()
    );
    for source in sources {
        comment.push_str(&format!("  {source}\n"));
    }
    comment.push_str("The expectations are what the real cluster held at the end.\n");
    if !c.notes.is_empty() {
        comment.push_str("Left out or approximated:\n");
        for note in &c.notes {
            comment.push_str(&format!("- {note}\n"));
        }
    }
    crate::scenario_write::to_toml(&c.scenario, &comment)
}

/// One recording placed on the incident's clock.
struct Placed<'a> {
    sid: Sid,
    start_ms: u64,
    recording: &'a Recording,
}

/// A link change a node saw.
struct LinkSeen {
    at_ms: u64,
    sid: Sid,
    peer: Sid,
    up: bool,
}

/// Everything read from the recordings, before the labels are final.
#[derive(Default)]
struct Reading {
    events: Vec<(u64, Sid, Action)>,
    links: Vec<LinkSeen>,
    /// Per node, its recordings' (start, last input) on the incident's clock.
    lives: BTreeMap<Sid, Vec<(u64, u64)>>,
    /// The store each node had at the end of its last recording.
    last_store: BTreeMap<Sid, Server>,
    /// A message's label, from the reply that stored it.
    label_of_guid: BTreeMap<Guid, String>,
    /// A body's checksum, from the write that stored it (for messages whose reply was
    /// lost). The checksum names a body: the core's writes carry it, not the recording's
    /// SHA-256 keys.
    checksum_of_guid: BTreeMap<Guid, u64>,
    /// The first label given to each body, by checksum.
    label_of_checksum: BTreeMap<u64, String>,
    /// A delivery's label by mailbox and body: the same bytes delivered again are a retry.
    delivery_label: BTreeMap<(MailboxKey, u64), String>,
    used_labels: BTreeSet<String>,
    copies: u64,
    hand_added: u64,
    /// IMAP APPENDs (the simulator delivers every save).
    appends: u64,
    notes: Vec<String>,
}

impl Reading {
    fn new_label(&mut self, stem: &str) -> String {
        let mut label = stem.to_string();
        let mut n = 1;
        while self.used_labels.contains(&label) {
            n += 1;
            label = format!("{stem}-{n}");
        }
        self.used_labels.insert(label.clone());
        label
    }

    /// A new label for a body: `m` and the top half of its checksum.
    fn body_label(&mut self, checksum: u64) -> String {
        let label = self.new_label(&format!("m{:08x}", checksum >> 32));
        self.label_of_checksum.entry(checksum).or_insert_with(|| label.clone());
        label
    }

    fn note(&mut self, line: String) {
        if self.notes.len() < 200 && !self.notes.contains(&line) {
            self.notes.push(line);
        }
    }
}

fn guid_name(guid: Guid) -> String {
    format!("{BY_GUID}{:032x}", guid.0)
}

/// Turns every node's recordings of one incident into a scenario named `name`.
/// `any_build`: convert recordings of another core build (its UIDs may then be looked
/// up in a store this core would have built differently).
pub fn to_scenario(recordings: &[Recording], name: &str, any_build: bool) -> Result<Conversion, String> {
    if recordings.is_empty() {
        return Err("no recording given".into());
    }
    for r in recordings {
        same_build(r, any_build)?;
    }
    // The core's instants count from its run's start, which a rotated file names.
    let first_ms = recordings.iter().map(|r| r.header.clock_origin_unix_ms()).min().unwrap_or(0);
    let mut placed: Vec<Placed<'_>> = recordings
        .iter()
        .map(|r| Placed {
            sid: r.header.cfg.sid,
            start_ms: r.header.clock_origin_unix_ms().saturating_sub(first_ms),
            recording: r,
        })
        .collect();
    placed.sort_by_key(|p| (p.sid, p.start_ms, p.recording.header.started_unix_ms));
    let mut reading = Reading::default();
    for p in &placed {
        read_one(p, &mut reading)?;
    }
    let end_ms = reading.lives.values().flatten().map(|(_, last)| *last).max().unwrap_or(0);
    let mut events: Vec<(u64, Sid, Action)> = std::mem::take(&mut reading.events);
    events.extend(crashes(&reading.lives, end_ms, &mut reading.notes));
    let downs = down_windows(&reading.lives);
    events.extend(link_events(&reading.links, &downs));
    let servers: BTreeSet<Sid> = placed.iter().flat_map(|p| p.recording.header.cfg.servers.clone()).collect();
    for sid in &servers {
        if !reading.lives.contains_key(sid) {
            reading.note(format!("{sid} is configured but has no recording: it runs in the scenario without clients"));
        }
    }
    if reading.appends > 0 {
        let n = reading.appends;
        reading.note(format!(
            "{n} saves were IMAP APPENDs, which the simulator makes deliveries (an APPEND of the same bytes \
             again would be taken for an MTA's retry)"
        ));
    }
    let events = resolve_labels(events, &mut reading);
    let expects = expectations(&mut reading, end_ms);
    let cfg = &placed[0].recording.header.cfg;
    let servers_list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    let skeleton = format!("name = \"{name}\"\n[cluster]\nservers = [{}]\n", servers_list.join(", "));
    let mut s = scenario::parse(&skeleton, None).map_err(|e| format!("building the scenario: {e}"))?;
    s.cluster.replicas = cfg.replicas;
    s.cluster.durability = cfg.durability;
    s.cluster.log_capacity = cfg.log_capacity;
    s.cluster.granularity = cfg.granularity;
    s.cluster.request_timeout_ms = (cfg.request_timeout_us / 1000).max(1);
    s.cluster.tombstone_grace_ms = cfg.tombstone_grace_us / 1000;
    s.cluster.startup_hold_ms = cfg.startup_hold_us / 1000;
    s.settle_ms = 60_000;
    s.heal_at_end = true;
    s.events = events
        .into_iter()
        .enumerate()
        .map(|(line, (at_ms, _, action))| TimedEvent { at_ms, id: None, action, expect: None, line: line + 1 })
        .collect();
    s.expects = expects;
    Ok(Conversion { scenario: s, notes: reading.notes })
}

/// Replays one recording through this core, taking the clients' requests (their UIDs
/// named by the store at that input), the link changes, and which message each save
/// stored.
fn read_one(p: &Placed<'_>, r: &mut Reading) -> Result<(), String> {
    let header = &p.recording.header;
    let reads = RecordedReads::default();
    let mut server = crate::replay::start(p.recording, Box::new(reads.clone()))
        .map_err(|e| format!("the {} recording: {e}", p.sid))?;
    let mut bodies: BTreeMap<BodyKey, tandem_core::Body> = BTreeMap::new();
    let mut pending: BTreeMap<u64, String> = BTreeMap::new();
    let mut last_ms = p.start_ms;
    let frames = &p.recording.frames;
    let missing = |key: BodyKey| {
        let hex: String = key.iter().take(8).map(|b| format!("{b:02x}")).collect();
        if header.bodies {
            format!("{} recording: body {hex}… is referred to before its bytes: it is damaged", p.sid)
        } else {
            format!(
                "the {} recording holds no mail (record.bodies = false): an incident becomes a scenario from \
                 recordings made with bodies = true",
                p.sid
            )
        }
    };
    let take = |frame: &Frame, bodies: &mut BTreeMap<BodyKey, tandem_core::Body>| {
        crate::replay::take_body_or_read(frame, bodies, &reads)
    };
    let mut i = 0;
    drain(&mut server, &mut pending, r);
    while i < frames.len() {
        if let Frame::Input { now, input } = &frames[i] {
            let mut j = i + 1;
            while let Some(
                frame @ (Frame::Read { .. } | Frame::Body { .. } | Frame::Checksum { .. } | Frame::TextParts { .. }),
            ) = frames.get(j)
            {
                take(frame, &mut bodies).map_err(missing)?;
                j += 1;
            }
            if j == frames.len() {
                // Cut by a crash while the node handled it: its reads are not all here.
                break;
            }
            let mut input = Input::clone(input);
            record::resolve_bodies(&mut input, &bodies).map_err(missing)?;
            // A damaged file's instants must not overflow the clock.
            let at_ms = p.start_ms.saturating_add(now.0 / 1000);
            last_ms = at_ms;
            take_input(p.sid, at_ms, &input, &server, &mut pending, r);
            server.handle(*now, input);
            drain(&mut server, &mut pending, r);
            i = j;
            continue;
        }
        take(&frames[i], &mut bodies).map_err(missing)?;
        i += 1;
    }
    let runs = r.lives.entry(p.sid).or_default();
    match (&header.resumed, runs.last_mut()) {
        // A file that continues a run (a rotation) extends it: no crash in between.
        (Some(_), Some(run)) if run.0 == p.start_ms => run.1 = run.1.max(last_ms),
        _ => runs.push((p.start_ms, last_ms)),
    }
    r.last_store.insert(p.sid, server);
    Ok(())
}

fn drain(server: &mut Server, pending: &mut BTreeMap<u64, String>, r: &mut Reading) {
    while let Some(output) = server.poll_output() {
        match output {
            Output::Reply {
                id,
                reply: ClientReply::Write(WriteResult::Saved { guid, .. } | WriteResult::Copied { guid, .. }),
            } => {
                if let Some(label) = pending.remove(&id) {
                    r.label_of_guid.entry(guid).or_insert(label);
                }
            }
            Output::Reply { id, .. } => {
                pending.remove(&id);
            }
            Output::Write { write: StoreWrite::PutBody { guid, checksum, .. }, .. } => {
                r.checksum_of_guid.entry(guid).or_insert(checksum);
            }
            _ => {}
        }
    }
}

/// The message a node's store has at `uid` of `mailbox` now, named by its GUID.
fn named(server: &Server, mailbox: &MailboxKey, uid: u32) -> Option<String> {
    let m = server.image().mailboxes.get(mailbox)?;
    m.messages.get(&uid).map(|rec| guid_name(rec.guid))
}

fn take_input(
    sid: Sid,
    at_ms: u64,
    input: &Input,
    server: &Server,
    pending: &mut BTreeMap<u64, String>,
    r: &mut Reading,
) {
    let action = match input {
        Input::LinkUp { peer } | Input::LinkDown { peer } => {
            r.links.push(LinkSeen { at_ms, sid, peer: *peer, up: matches!(input, Input::LinkUp { .. }) });
            return;
        }
        Input::External(edit) => match edit {
            ExternalEdit::Added { mailbox, .. } => {
                r.hand_added += 1;
                let label = r.new_label(&format!("hand{}", r.hand_added));
                Action::HandAdd { server: sid, mailbox: mailbox.clone(), label: Some(label) }
            }
            ExternalEdit::Removed { mailbox, uid } => match named(server, mailbox, *uid) {
                Some(label) => Action::HandDelete { server: sid, mailbox: mailbox.clone(), label },
                None => {
                    return r.note(format!("a file deleted by hand on {sid} at UID {uid} of {mailbox}: unknown there"));
                }
            },
            ExternalEdit::Corrupted { guid } => Action::Corrupt { server: sid, label: guid_name(*guid) },
        },
        Input::Client { id, request } => match client_action(sid, *id, request, server, pending, r) {
            Some(action) => action,
            None => return,
        },
        Input::Peer { .. } | Input::Timer | Input::Durable { .. } => return,
    };
    r.events.push((at_ms, sid, action));
}

fn client_action(
    server_sid: Sid,
    id: u64,
    request: &ClientRequest,
    server: &Server,
    pending: &mut BTreeMap<u64, String>,
    r: &mut Reading,
) -> Option<Action> {
    let uids_named = |mailbox: &MailboxKey, uids: &[u32], r: &mut Reading| -> Vec<String> {
        let mut labels = Vec::new();
        for uid in uids {
            match named(server, mailbox, *uid) {
                Some(label) => labels.push(label),
                None => {
                    r.note(format!("a request on {server_sid} named UID {uid} of {mailbox}, which it did not hold"))
                }
            }
        }
        labels
    };
    Some(match request {
        ClientRequest::Save { mailbox, flags, body, delivery, .. } => {
            let key = body.checksum();
            let retried = delivery.then(|| r.delivery_label.get(&(mailbox.clone(), key)).cloned()).flatten();
            let label = match retried {
                Some(label) => label,
                None => {
                    let label = r.body_label(key);
                    if *delivery {
                        r.delivery_label.insert((mailbox.clone(), key), label.clone());
                    } else {
                        r.appends += 1;
                    }
                    label
                }
            };
            pending.insert(id, label.clone());
            Action::Save {
                server: server_sid,
                mailbox: mailbox.clone(),
                label: Some(label),
                flags: flags.clone(),
                size: body.len(),
            }
        }
        ClientRequest::Import { mailbox, uidvalidity, uid, flags, body, .. } => {
            let key = body.checksum();
            let label = r.label_of_checksum.get(&key).cloned().unwrap_or_else(|| r.body_label(key));
            pending.insert(id, label.clone());
            Action::Import {
                server: server_sid,
                mailbox: mailbox.clone(),
                label,
                uidvalidity: *uidvalidity,
                uid: *uid,
                flags: flags.clone(),
                size: body.len(),
            }
        }
        ClientRequest::Copy { src, src_uid, dst } => {
            let label = uids_named(src, &[*src_uid], r).pop()?;
            r.copies += 1;
            let as_label = r.new_label(&format!("copy{}", r.copies));
            pending.insert(id, as_label.clone());
            Action::Copy {
                server: server_sid,
                from: src.clone(),
                label,
                to: dst.clone(),
                as_label: Some(as_label),
                moving: false,
            }
        }
        ClientRequest::Expunge { mailbox, uids } => {
            let labels = uids_named(mailbox, uids, r);
            if labels.is_empty() {
                return None;
            }
            Action::Expunge { server: server_sid, mailbox: mailbox.clone(), labels }
        }
        ClientRequest::Store { mailbox, uids, add, remove, unchanged_since } => {
            let labels = uids_named(mailbox, uids, r);
            if labels.is_empty() {
                return None;
            }
            Action::Store {
                server: server_sid,
                mailbox: mailbox.clone(),
                labels,
                add: add.clone(),
                remove: remove.clone(),
                unchanged_since: unchanged_since.map(UnchangedSince::Value),
            }
        }
        ClientRequest::Read { mailbox } => Action::Read { server: server_sid, mailbox: mailbox.clone(), fresh: false },
        ClientRequest::FreshRead { mailbox } => {
            Action::Read { server: server_sid, mailbox: mailbox.clone(), fresh: true }
        }
        ClientRequest::FreshStatus { mailbox } => Action::Status { server: server_sid, mailbox: mailbox.clone() },
        ClientRequest::MasterMove { mailbox } => Action::MasterMove { server: server_sid, mailbox: mailbox.clone() },
        ClientRequest::CreateMailbox { mailbox, special_use } => {
            Action::CreateMailbox { server: server_sid, mailbox: mailbox.clone(), special_use: *special_use }
        }
        ClientRequest::DeleteMailbox { mailbox } => {
            Action::DeleteMailbox { server: server_sid, mailbox: mailbox.clone() }
        }
        ClientRequest::RenameMailbox { from, to } => {
            Action::RenameMailbox { server: server_sid, from: from.clone(), to: to.clone() }
        }
        ClientRequest::ImportMailbox { mailbox, .. } => {
            r.note(format!(
                "an imported empty mailbox {mailbox} on {server_sid} is created plainly (its UIDVALIDITY is not kept)"
            ));
            Action::CreateMailbox { server: server_sid, mailbox: mailbox.clone(), special_use: Default::default() }
        }
        ClientRequest::Membership { change } => match change {
            MemberChange::Add { sid, .. } => Action::MemberAdd { server: server_sid, member: *sid },
            MemberChange::Leave { sid } => Action::MemberRemove { server: server_sid, member: *sid, lost: false },
            MemberChange::Lost { sid } => Action::MemberRemove { server: server_sid, member: *sid, lost: true },
        },
        ClientRequest::Subscription { mailbox, .. } => {
            r.note(format!("subscriptions (to {mailbox} on {server_sid}) are not scenario ops: left out"));
            return None;
        }
        ClientRequest::ReplicaPush { state, .. } => {
            r.note(format!(
                "a user replica's push of {} on {server_sid} is not a scenario op: left out",
                state.mailbox
            ));
            return None;
        }
        // Reads change nothing; an adopt happens on a user replica, not on a cluster node.
        ClientRequest::ReplicaList { .. }
        | ClientRequest::ReplicaPull { .. }
        | ClientRequest::ReplicaBodies { .. }
        | ClientRequest::ReplicaAdopt { .. }
        | ClientRequest::ReplicaKeepBodies { .. }
        | ClientRequest::ReplicaTextParts { .. }
        | ClientRequest::ReplicaKeepTextParts { .. }
        | ClientRequest::ReadTextParts { .. }
        | ClientRequest::FetchBody { .. } => return None,
    })
}

/// A node whose recording stops before the incident's end, or that has a later
/// recording, crashed then (and restarted with the later one); one that started late
/// is down until it started.
fn crashes(lives: &BTreeMap<Sid, Vec<(u64, u64)>>, end_ms: u64, notes: &mut Vec<String>) -> Vec<(u64, Sid, Action)> {
    let mut out = Vec::new();
    for (&sid, runs) in lives {
        if let Some(&(start, _)) = runs.first()
            && start > LATE_START_MS
        {
            notes.push(format!("{sid} started {start} ms after the first node: it is down until then"));
            out.push((0, sid, Action::Crash { server: sid }));
            out.push((start, sid, Action::Restart { server: sid }));
        }
        for (k, &(_, last)) in runs.iter().enumerate() {
            let next = runs.get(k + 1).map(|(start, _)| *start);
            let stopped = next.is_some() || last.saturating_add(STOPPED_BEFORE_END_MS) < end_ms;
            if !stopped {
                continue;
            }
            out.push((last.saturating_add(1), sid, Action::Crash { server: sid }));
            if let Some(start) = next {
                out.push((start.max(last.saturating_add(2)), sid, Action::Restart { server: sid }));
            }
        }
    }
    out
}

/// When each node was down (from a little before its last recorded input to a while
/// after its restart), on the incident's clock.
fn down_windows(lives: &BTreeMap<Sid, Vec<(u64, u64)>>) -> BTreeMap<Sid, Vec<(u64, u64)>> {
    let mut out: BTreeMap<Sid, Vec<(u64, u64)>> = BTreeMap::new();
    for (&sid, runs) in lives {
        // Before it started (it had no link yet).
        if let Some(&(start, _)) = runs.first() {
            out.entry(sid).or_default().push((0, start));
        }
        for (k, &(_, last)) in runs.iter().enumerate() {
            // After its last recording (a crash, or the end) it stays down.
            let until = runs.get(k + 1).map(|(start, _)| start.saturating_add(CRASH_LINK_AFTER_MS)).unwrap_or(u64::MAX);
            out.entry(sid).or_default().push((last.saturating_sub(CRASH_LINK_BEFORE_MS), until));
        }
    }
    out
}

/// The links the nodes saw go down while both ends ran (a partition, a cut) as cuts,
/// and their return as restores; a link change of a node that was starting, stopping
/// or down is the node's, which the crashes already say.
fn link_events(links: &[LinkSeen], downs: &BTreeMap<Sid, Vec<(u64, u64)>>) -> Vec<(u64, Sid, Action)> {
    let down_at = |sid: Sid, t: u64| downs.get(&sid).is_some_and(|w| w.iter().any(|(a, b)| *a <= t && t <= *b));
    let mut seen: Vec<&LinkSeen> = links.iter().collect();
    seen.sort_by_key(|l| (l.at_ms, l.sid, l.peer));
    let mut cut: BTreeSet<(Sid, Sid)> = BTreeSet::new();
    let mut out = Vec::new();
    for l in seen {
        let pair = (l.sid.min(l.peer), l.sid.max(l.peer));
        if l.up {
            if cut.remove(&pair) {
                out.push((l.at_ms, pair.0, Action::Restore { a: pair.0, b: pair.1 }));
            }
        } else if !down_at(l.sid, l.at_ms) && !down_at(l.peer, l.at_ms) && cut.insert(pair) {
            out.push((l.at_ms, pair.0, Action::Cut { a: pair.0, b: pair.1 }));
        }
    }
    out
}

/// The final label of a message named by GUID: the label of the save that stored it,
/// or the first label of its body.
fn final_label(name: &str, r: &Reading) -> Option<String> {
    let Some(hex) = name.strip_prefix(BY_GUID) else { return Some(name.to_string()) };
    let guid = Guid(u128::from_str_radix(hex, 16).ok()?);
    r.label_of_guid
        .get(&guid)
        .cloned()
        .or_else(|| r.checksum_of_guid.get(&guid).and_then(|c| r.label_of_checksum.get(c).cloned()))
}

/// Orders the events and names every message by its label; a request naming only
/// messages no recorded save stored (mail from before the recordings) is left out.
fn resolve_labels(mut events: Vec<(u64, Sid, Action)>, r: &mut Reading) -> Vec<(u64, Sid, Action)> {
    events.sort_by_key(|(at, sid, _)| (*at, *sid));
    let mut out = Vec::new();
    let mut unknown = 0usize;
    for (at, sid, mut action) in events {
        let mut fix = |name: &mut String| match final_label(name, r) {
            Some(label) => {
                *name = label;
                true
            }
            None => {
                unknown += 1;
                false
            }
        };
        let keep = match &mut action {
            Action::Expunge { labels, .. } | Action::Store { labels, .. } => {
                labels.retain_mut(|l| fix(l));
                !labels.is_empty()
            }
            Action::Copy { label, .. } | Action::HandDelete { label, .. } | Action::Corrupt { label, .. } => fix(label),
            _ => true,
        };
        if keep {
            out.push((at, sid, action));
        }
    }
    if unknown > 0 {
        r.note(format!(
            "{unknown} references to messages no recorded save stored (mail from before the recordings) are left out"
        ));
    }
    out
}

/// What the real cluster held at the end, as the scenario's expectations: what every
/// node still running then held alike (a recording's last moments may not have reached
/// its file, so a node may seem to lack the last change; that is left unchecked and
/// said in a note).
fn expectations(r: &mut Reading, end_ms: u64) -> Vec<Expect> {
    type Contents = BTreeMap<MailboxKey, BTreeMap<Guid, Vec<tandem_core::Flag>>>;
    let running: Vec<Sid> = r
        .lives
        .iter()
        .filter(|(_, runs)| runs.last().is_some_and(|(_, last)| last.saturating_add(STOPPED_BEFORE_END_MS) >= end_ms))
        .map(|(sid, _)| *sid)
        .collect();
    let held: Vec<Contents> = running
        .iter()
        .filter_map(|sid| r.last_store.get(sid))
        .map(|server| {
            let image = server.image();
            image
                .mailboxes
                .iter()
                .map(|(k, m)| {
                    let messages = m
                        .messages
                        .values()
                        .map(|rec| {
                            let mut flags = rec.present_flags();
                            flags.sort();
                            (rec.guid, flags)
                        })
                        .collect();
                    (k.clone(), messages)
                })
                .collect()
        })
        .collect();
    if held.is_empty() {
        r.note("no node ran to the end: no expectations but the invariants".into());
        return vec![Expect::Invariants];
    }
    let mailboxes: BTreeSet<&MailboxKey> = held.iter().flat_map(|h| h.keys()).collect();
    let mut expects = vec![Expect::Invariants];
    let mut anywhere: BTreeMap<Guid, usize> = BTreeMap::new();
    for h in &held {
        for messages in h.values() {
            for guid in messages.keys() {
                *anywhere.entry(*guid).or_default() += 1;
            }
        }
    }
    let mut unlabelled = 0usize;
    for mailbox in mailboxes {
        let copies: Vec<Option<&BTreeMap<Guid, Vec<tandem_core::Flag>>>> =
            held.iter().map(|h| h.get(mailbox)).collect();
        let counts: BTreeSet<usize> = copies.iter().map(|c| c.map(|m| m.len()).unwrap_or(0)).collect();
        match counts.len() {
            1 => {
                expects.push(Expect::Count { mailbox: mailbox.clone(), count: counts.into_iter().next().unwrap_or(0) })
            }
            _ => r.note(format!(
                "the running nodes held {counts:?} messages of {mailbox} at the end: its count is not checked"
            )),
        }
        let guids: BTreeSet<Guid> = copies.iter().flatten().flat_map(|m| m.keys().copied()).collect();
        for guid in guids {
            let flags: Vec<Option<&Vec<tandem_core::Flag>>> =
                copies.iter().map(|c| c.and_then(|m| m.get(&guid))).collect();
            let Some(label) = final_label(&guid_name(guid), r) else {
                unlabelled += 1;
                continue;
            };
            if flags.iter().any(Option::is_none) {
                r.note(format!("{label} was in {mailbox} on some running nodes only at the end: not checked"));
                continue;
            }
            expects.push(Expect::Present { label: label.clone() });
            let alike: BTreeSet<&Vec<tandem_core::Flag>> = flags.iter().flatten().copied().collect();
            // A label names one message; one held in two mailboxes (a COPY keeping it)
            // may carry other flags in each.
            if alike.len() == 1 && anywhere.get(&guid) == Some(&held.len()) {
                let flags = alike.into_iter().next().cloned().unwrap_or_default();
                expects.push(Expect::Flags { label, flags });
            }
        }
    }
    if unlabelled > 0 {
        r.note(format!("{unlabelled} messages held at the end came from before the recordings: only counted"));
    }
    let present: BTreeSet<String> = anywhere.keys().filter_map(|g| final_label(&guid_name(*g), r)).collect();
    let stored: BTreeSet<(Guid, String)> = r.label_of_guid.iter().map(|(g, l)| (*g, l.clone())).collect();
    for (guid, label) in stored {
        if !anywhere.contains_key(&guid) && !present.contains(&label) {
            expects.push(Expect::Absent { label });
        }
    }
    expects
}

#[cfg(test)]
mod tests {
    use super::*;

    fn life(runs: &[(u64, u64)]) -> BTreeMap<Sid, Vec<(u64, u64)>> {
        BTreeMap::from([(Sid(1), runs.to_vec()), (Sid(2), vec![(0, 30_000)])])
    }

    #[test]
    fn a_second_recording_is_a_crash_and_a_restart() {
        let mut notes = Vec::new();
        let events = crashes(&life(&[(0, 10_000), (12_000, 30_000)]), 30_000, &mut notes);
        let kinds: Vec<(u64, Sid, String)> = events.iter().map(|(at, sid, a)| (*at, *sid, format!("{a:?}"))).collect();
        assert_eq!(
            kinds,
            vec![
                (10_001, Sid(1), "Crash { server: Sid(1) }".to_string()),
                (12_000, Sid(1), "Restart { server: Sid(1) }".to_string())
            ]
        );
        assert!(notes.is_empty());
    }

    #[test]
    fn a_link_lost_with_a_crashed_node_is_not_a_cut_and_a_partition_is() {
        let lives = life(&[(0, 10_000), (12_000, 30_000)]);
        let downs = down_windows(&lives);
        let seen = |at_ms, sid, peer, up| LinkSeen { at_ms, sid: Sid(sid), peer: Sid(peer), up };
        let links = vec![
            seen(10_050, 2, 1, false), // s1 was killed
            seen(12_500, 2, 1, true),
            seen(20_000, 1, 2, false), // a partition
            seen(20_010, 2, 1, false),
            seen(25_000, 2, 1, true),
            seen(25_001, 1, 2, true),
        ];
        let events: Vec<(u64, String)> =
            link_events(&links, &downs).iter().map(|(at, _, a)| (*at, format!("{a:?}"))).collect();
        assert_eq!(
            events,
            vec![
                (20_000, "Cut { a: Sid(1), b: Sid(2) }".to_string()),
                (25_000, "Restore { a: Sid(1), b: Sid(2) }".to_string())
            ]
        );
    }
}
