//! The server state machine. Inputs arrive through [`Server::handle`]; outputs are
//! drained with [`Server::poll_output`] after every input; [`Server::poll_timeout`] says
//! when to deliver the next [`Input::Timer`].

use serde::{Deserialize, Serialize};
mod anti_entropy;
mod body_fetch;
mod cancels;
mod filling;
mod fresh_reads;
mod image;
mod job_table;
mod jobs;
pub use jobs::mailbox_view;
mod log_progress;
mod masters;
mod members;
pub(crate) mod omitted_bodies;
pub use omitted_bodies::TEXT_PARTS_ANSWERED_MAX;
mod outbox;
mod recently_collected;
pub(crate) mod replica_serving;
mod replication;
use replication::SummaryKind;
mod root;
mod root_role;
mod route_table;
mod routing;
mod timers;
mod tombstones;

pub use jobs::{Job, JobId, JobKind, JobState, Origin};
use root_role::RootRole;
pub use root_role::{EPOCH_SID_BITS, RootState, Term};
pub use route_table::LinkAnnouncement;
use route_table::RouteTable;

use crate::io::*;
use crate::mailbox;
use crate::marks::{Mark, Marks};
use crate::msg::*;
use crate::store::{BodyStore, DiskImage, StoreWrite};
use crate::types::*;
use anti_entropy::AntiEntropy;
use body_fetch::BodyFetch;
use fresh_reads::FreshReads;
use image::Image;
use job_table::JobTable;
use log_progress::LogProgress;
use masters::{Catchup, CatchupId, Handoff, Masters, Mastership};
use outbox::Outbox;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use timers::{Timer, TimerTable};

#[derive(Serialize, Deserialize)]
pub struct Server {
    cfg: Config,
    now: Instant,
    rng: ChaCha8Rng,
    marks: Marks,
    /// What the store holds (see `image`): changed only through `Server::commit`.
    image: Image,
    /// What goes out, in order (see `outbox`).
    out: Outbox,
    /// Links, link-state announcements and routes (see `route_table`).
    routing: RouteTable,
    /// The root term, and the root's table while we are the root (see `root_role`).
    root_role: RootRole,
    /// Masterships, the master cache, lookups and handovers (see `masters`).
    masters: Masters,
    /// Requests in progress here (see `job_table`).
    jobs: JobTable,
    /// Log entries sent and acknowledged, and acknowledgements owed (see `log_progress`).
    log_progress: LogProgress,
    /// Peers' copies checked, common points, dirty mailboxes (see `anti_entropy`).
    anti_entropy: AntiEntropy,
    /// Bodies wanted and FETCHes in flight (see `body_fetch`).
    body_fetch: BodyFetch,
    /// Every deadline, by name (see `timers`).
    timers: TimerTable,
    /// Role changes (root terms, masterships) for a readable timeline, when asked for.
    notes: Option<Vec<String>>,
    /// Whether this incarnation still waits to hear its peers (see `root`).
    startup: StartupHold,
    /// Reads waiting for this server's copies to reach their master's position (see
    /// `fresh_reads`).
    fresh_reads: FreshReads,
    /// Who is in the cluster (see `members`).
    members: crate::membership::Membership,
    /// The servers routes and replication use (`Server::routing_servers`), kept for
    /// the many loops over peers.
    member_servers: Vec<Sid>,
    /// While this server leaves the cluster: what it still waits for.
    leaving: Option<members::Leaving>,
    /// Stored bodies no record holds, with when that was first seen (see
    /// `collect_bodies`).
    unreferenced_since: BTreeMap<Guid, Instant>,
    /// Saves ordered here as master, for cancels (see `cancels`).
    ordered_saves: cancels::OrderedSaves,
    /// A partial replica's omitted bodies its clients asked for (see `omitted_bodies`).
    #[serde(default)]
    omitted: omitted_bodies::OmittedBodies,
    /// A user replica's messages kept against a census's loss (`mailbox::adopt_rule`
    /// step 6): their bodies go up with the next push. Learnt again at each adopt, so
    /// not stored.
    #[serde(default)]
    kept_lost: BTreeMap<MailboxKey, std::collections::BTreeSet<Guid>>,
    /// A user replica's records its adopts dropped lately while it held their bodies, by
    /// GUID, with when (see `replica_serving::DROPPED_LATELY_MAX`). In memory only.
    #[serde(default)]
    dropped_lately: BTreeMap<Guid, (MessageRecord, Instant)>,
    /// Bindings whose tombstones were collected lately (see `recently_collected`).
    #[serde(default)]
    recently_collected: recently_collected::RecentlyCollected,
    /// Peers asked for their state of a mailbox to settle the copies they logged of
    /// messages expunged here (`Server::merge_log_piece`), with when: further such
    /// copies from that peer wait for that state instead of asking again.
    #[serde(default)]
    states_asked: BTreeMap<(Sid, MailboxKey), Instant>,
    /// Whether this incarnation has heard a peer's link state (see `filling`).
    #[serde(default)]
    peer_heard: bool,
}

/// A just-started server's wait before it may open a root term (`Config::startup_hold_us`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum StartupHold {
    /// No input yet: the hold starts with the first one (the driver's clock starts there).
    NotStarted,
    Until(Instant),
    Over,
}

/// A stored body whose bytes are missing or fail their checksum (see
/// [`Server::checked_body`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyDamaged;

/// Mixed into the driver's seed when a new store draws its identity.
const STORE_ID_SALT: u64 = 0x5354_4f52_4549_4421;

impl Server {
    /// A server starting with an empty store; `bodies` is where the driver keeps the
    /// bytes of the bodies it is asked to write (see [`BodyStore`]).
    pub fn new(cfg: Config, seed: u64, bodies: Box<dyn BodyStore>) -> Server {
        Server::recover(cfg, DiskImage::default(), seed, bodies)
    }

    /// A server restarting from what its disk holds: `disk` with the metadata, `bodies`
    /// with the bytes. Volatile state (links, routes, master cache, masterships,
    /// requests in progress) starts empty.
    pub fn recover(cfg: Config, disk: DiskImage, seed: u64, bodies: Box<dyn BodyStore>) -> Server {
        let incarnation = disk.incarnation.saturating_add(1);
        let mut members = crate::membership::Membership::seed(&cfg.servers);
        members.join(&disk.members);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ incarnation.rotate_left(32) ^ u64::from(cfg.sid.0));
        let job_numbers_start = rng.next_u64();
        let mut server = Server {
            rng,
            root_role: RootRole::new(cfg.sid, disk.epoch),
            routing: RouteTable::new(cfg.sid, &[cfg.sid]),
            cfg,
            image: Image::new(disk, bodies),
            out: Outbox::default(),
            now: Instant(0),
            marks: Marks::default(),
            masters: Masters::new(),
            jobs: JobTable::new(incarnation, job_numbers_start),
            log_progress: LogProgress::default(),
            anti_entropy: AntiEntropy::default(),
            body_fetch: BodyFetch::default(),
            timers: TimerTable::default(),
            notes: None,
            startup: StartupHold::NotStarted,
            fresh_reads: FreshReads::default(),
            members,
            member_servers: Vec::new(),
            leaving: None,
            unreferenced_since: BTreeMap::new(),
            ordered_saves: Default::default(),
            omitted: Default::default(),
            kept_lost: Default::default(),
            dropped_lately: Default::default(),
            recently_collected: Default::default(),
            states_asked: BTreeMap::new(),
            peer_heard: false,
        };
        server.member_servers = server.routing_servers();
        server.routing.set_servers(&server.member_servers);
        if server.members.state(server.cfg.sid) == Some(crate::membership::MemberState::Leaving) {
            server.start_leaving();
        }
        // The first timer finds out whether the server is alone (then it is its own
        // root); maintenance starts an interval later.
        server.timers.set(Timer::Retry, Instant(0));
        server.timers.set(Timer::Maintenance, Instant(server.cfg.anti_entropy_us));
        // From its own generator, so that the server's stream of random numbers is the
        // same whether its store is new or not.
        let drawn = ChaCha8Rng::seed_from_u64(seed ^ STORE_ID_SALT ^ u64::from(server.cfg.sid.0)).next_u64().max(1);
        server.note_restored_store();
        let started = server.image.start_incarnation(&mut server.out, drawn);
        debug_assert_eq!(started, incarnation);
        if server.image.finish_interrupted_merges(&mut server.out) > 0 {
            server.marks.hit(Mark::InterruptedMergeFinished);
        }
        server.load_collected();
        // A restarted server rejoins a component that grew, so the root opens a new
        // term and every new master checks this server's copies in its catch-up.
        server
    }

    /// The whole state of this server (the store's metadata, roles, requests in
    /// progress, logs, deadlines, the random generator), for a recording that begins in
    /// the middle of a run: [`Server::resume`] makes it a server again. Taken between
    /// inputs, once the outputs are drained (an output not yet taken would be lost).
    /// The bodies are the driver's and are not in it, but the bytes of bodies in flight
    /// (saves in progress, writes not yet durable) are.
    pub fn snapshot(&self) -> Result<Vec<u8>, String> {
        debug_assert!(self.out.drained(), "a snapshot is taken with the outputs drained");
        <crate::codec::Bincode as crate::codec::RecordCodec>::encode(self)
    }

    /// A server in the state [`Server::snapshot`] took, reading bodies from `bodies`
    /// (which must hold what the driver's store held then).
    pub fn resume(snapshot: &[u8], bodies: Box<dyn BodyStore>) -> Result<Server, String> {
        let mut server: Server = <crate::codec::Bincode as crate::codec::RecordCodec>::decode(snapshot)?;
        server.image.set_bodies(bodies);
        Ok(server)
    }

    /// This server in the same state, reading bodies from `bodies`, which must hold
    /// what the driver's store for this server holds now (a copy of it, so that the two
    /// futures do not share writes): for a model checker that explores every next input
    /// from one state. The two go on independently and, given the same inputs, alike.
    pub fn fork(&self, bodies: Box<dyn BodyStore>) -> Server {
        Server {
            cfg: self.cfg.clone(),
            now: self.now,
            rng: self.rng.clone(),
            marks: self.marks.clone(),
            image: self.image.fork(bodies),
            out: self.out.clone(),
            routing: self.routing.clone(),
            root_role: self.root_role.clone(),
            masters: self.masters.clone(),
            jobs: self.jobs.clone(),
            log_progress: self.log_progress.clone(),
            anti_entropy: self.anti_entropy.clone(),
            body_fetch: self.body_fetch.clone(),
            timers: self.timers.clone(),
            notes: self.notes.clone(),
            startup: self.startup,
            fresh_reads: self.fresh_reads.clone(),
            members: self.members.clone(),
            member_servers: self.member_servers.clone(),
            leaving: self.leaving.clone(),
            unreferenced_since: self.unreferenced_since.clone(),
            ordered_saves: self.ordered_saves.clone(),
            omitted: self.omitted.clone(),
            kept_lost: self.kept_lost.clone(),
            dropped_lately: self.dropped_lately.clone(),
            recently_collected: self.recently_collected.clone(),
            states_asked: self.states_asked.clone(),
            peer_heard: self.peer_heard,
        }
    }

    /// A hash of the protocol state: everything that decides what this server does next
    /// (its store, roles, requests in progress, logs, deadlines, random generator),
    /// without the caches (digests, reference counts, scrub verdicts), the coverage
    /// marks, the notes and outputs not yet taken. Two servers with the same digest
    /// behave alike from here on the same inputs; a model checker explores a state
    /// reached twice once.
    pub fn state_digest(&self) -> u64 {
        let mut h = crate::hash::Fnv64::default();
        let _ = self.describe_state(&mut h);
        h.0
    }

    /// Writes what [`Server::state_digest`] hashes.
    pub fn describe_state(&self, h: &mut impl std::fmt::Write) -> std::fmt::Result {
        // Not `now`: every input brings its own, and nothing is decided by the last one.
        write!(h, "{:?}|{:?}|", self.cfg.sid, self.rng.get_word_pos())?;
        self.image.describe_state(h)?;
        write!(
            h,
            "|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
            self.routing,
            self.root_role,
            self.masters,
            self.jobs,
            self.log_progress,
            self.anti_entropy,
            self.body_fetch,
            self.timers,
            self.startup,
            self.fresh_reads,
            self.members,
            self.member_servers,
            self.leaving,
            self.unreferenced_since,
            self.ordered_saves,
        )?;
        // Only a partial replica ever has any (and a state without them hashes as before).
        if !self.omitted.is_empty() {
            write!(h, "|{:?}", self.omitted)?;
        }
        if !self.kept_lost.is_empty() {
            write!(h, "|{:?}", self.kept_lost)?;
        }
        if !self.dropped_lately.is_empty() {
            let dropped: Vec<&Guid> = self.dropped_lately.keys().collect();
            write!(h, "|{dropped:?}")?;
        }
        if !self.recently_collected.is_empty() {
            write!(h, "|{:?}", self.recently_collected)?;
        }
        if !self.states_asked.is_empty() {
            write!(h, "|{:?}", self.states_asked)?;
        }
        if self.peer_heard {
            write!(h, "|peer heard")?;
        }
        Ok(())
    }

    pub fn sid(&self) -> Sid {
        self.cfg.sid
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// `server`'s store identity as this server last heard it (None: not heard yet).
    pub fn peer_store(&self, server: Sid) -> Option<u64> {
        self.routing.store_of(server)
    }
    /// What the store holds, as the core sees it (durable or about to be).
    pub fn image(&self) -> &DiskImage {
        self.image.disk()
    }
    /// What a client reading `mailbox` is shown now: its durable state.
    pub fn read(&self, mailbox: &MailboxKey) -> ClientReply {
        self.read_view(mailbox)
    }
    /// What changed in `mailbox`'s durable state after `since` (a HIGHESTMODSEQ a
    /// session has shown under `uidvalidity`); None when the session must read the
    /// mailbox whole (no such mailbox, another UIDVALIDITY, a modseq from the future).
    /// An unchanged mailbox costs a lookup, a changed one a range of its modseq index and
    /// a pass over its tombstones.
    pub fn changes_since(
        &self,
        mailbox: &MailboxKey,
        uidvalidity: u32,
        since: crate::types::ModSeq,
    ) -> Option<crate::io::MailboxChanges> {
        let m = self.image.durable_mailbox(mailbox).filter(|m| m.visible())?;
        if m.uidvalidity != uidvalidity || m.highest_modseq < since {
            return None;
        }
        let mut changes = crate::io::MailboxChanges {
            highest_modseq: m.highest_modseq,
            count: m.messages.len(),
            ..Default::default()
        };
        if m.highest_modseq == since {
            return Some(changes);
        }
        let mut changed: Vec<MessageView> = m.messages.changed_since(since).map(jobs::message_view).collect();
        changed.sort_unstable_by_key(|v| v.uid);
        changes.changed = changed;
        let mut gone: Vec<Uid> = m
            .tombstones
            .values()
            .filter(|t| t.modseq > since && m.messages.get(&t.uid).is_none_or(|r| r.guid != t.guid))
            .map(|t| t.uid)
            .collect();
        gone.dedup();
        changes.gone = gone;
        Some(changes)
    }

    /// A body's bytes for a client's read: Ok(Some) when they match their checksum,
    /// Ok(None) when the image lists no such body, Err when the store holds none or
    /// damaged bytes (the driver reports that as `ExternalEdit::Corrupted`, and the
    /// body is fetched again). Changes nothing here.
    pub fn checked_body(&self, guid: Guid) -> Result<Option<Body>, BodyDamaged> {
        let Some(stored) = self.image.body(&guid) else { return Ok(None) };
        match self.image.stored_bytes(guid) {
            Some(bytes) if bytes.checksum() == stored.checksum => Ok(Some(bytes)),
            _ => Err(BodyDamaged),
        }
    }
    /// The bytes stored for a body the image lists, as they are now (not checked):
    /// from the driver's store once durable, from memory until then.
    pub fn stored_body(&self, guid: Guid) -> Option<Body> {
        self.image.stored_bytes(guid)
    }
    pub fn term(&self) -> Term {
        self.root_role.term()
    }
    pub fn marks(&self) -> &Marks {
        &self.marks
    }
    pub fn reachable(&self) -> &BTreeSet<Sid> {
        self.routing.reachable()
    }
    /// The master cache: hints, corrected by the next forwarded request that uses them.
    pub fn masters_known(&self) -> &BTreeMap<MasterKey, Sid> {
        self.masters.known()
    }
    /// At the root: who masters what in this term (empty elsewhere).
    pub fn root_table(&self) -> &BTreeMap<MasterKey, Sid> {
        self.root_role.table()
    }
    /// Keys this server masters and has caught up on.
    pub fn mastered_ready(&self) -> Vec<MasterKey> {
        self.masters.ready_keys()
    }
    pub fn summaries(&self) -> Vec<Summary> {
        self.image.summaries()
    }
    /// The mailboxes a client of `user` is shown (IMAP LIST): see [`crate::types::Lifecycle`].
    pub fn visible_summaries(&self, user: &str) -> Vec<Summary> {
        self.image
            .mailboxes()
            .iter()
            .filter(|(k, m)| &*k.user == user && m.visible())
            .map(|(k, m)| mailbox::summary(k, m))
            .collect()
    }
    /// The names of the mailboxes `user` is subscribed to (some may no longer exist: a
    /// subscription outlives its mailbox), in name order.
    pub fn subscriptions(&self, user: &str) -> Vec<String> {
        self.image
            .mailboxes()
            .iter()
            .filter(|(k, m)| &*k.user == user && m.lifecycle.subscribed())
            .map(|(k, _)| k.name.to_string())
            .collect()
    }
    /// The special uses clients gave `user`'s mailboxes (CREATE-SPECIAL-USE), by name;
    /// a mailbox no client gave one is not listed.
    pub fn special_uses(&self, user: &str) -> Vec<(String, SpecialUse)> {
        self.image
            .mailboxes()
            .iter()
            .filter(|(k, m)| &*k.user == user && m.visible())
            .filter_map(|(k, m)| Some((k.name.to_string(), m.lifecycle.special_use()?)))
            .collect()
    }
    /// Unacknowledged log entries per peer.
    pub fn backlog(&self) -> BTreeMap<Sid, usize> {
        self.image.logs().iter().map(|(p, l)| (*p, l.entries.len())).collect()
    }
    pub fn jobs_in_progress(&self) -> usize {
        self.jobs.len()
    }
    pub fn wanted_bodies(&self) -> usize {
        self.body_fetch.count()
    }
    pub fn dirty_mailboxes(&self) -> usize {
        self.anti_entropy.dirty_count()
    }

    /// Feed one input. Drain `poll_output` afterwards.
    pub fn handle(&mut self, now: Instant, input: Input) {
        debug_assert!(now >= self.now, "time went backwards");
        self.now = self.now.max(now);
        if self.startup == StartupHold::NotStarted {
            self.startup = StartupHold::Until(self.now.plus_us(self.cfg.startup_hold_us));
        }
        match input {
            Input::Peer { from, envelope } => self.on_envelope(from, envelope),
            Input::Client { id, request } => self.on_client(id, request),
            Input::Timer => self.on_timer(),
            Input::LinkUp { peer } => self.on_link_up(peer),
            Input::LinkDown { peer } => self.on_link_down(peer),
            Input::Durable { upto } => self.on_durable(upto),
            Input::External(edit) => self.on_external(edit),
        }
        if self.body_fetch.take_kick() {
            self.fetch_wanted_bodies();
        }
        if self.anti_entropy.take_kick() {
            self.anti_entropy();
        }
        self.check_all_masters();
        // A peer's change may bring a waiting read's copy to its master's position.
        self.answer_fresh_reads();
        self.flush_acks();
        self.arm_timers();
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop()
    }

    /// When to deliver the next [`Input::Timer`]: the earliest deadline of the timer
    /// table (maintenance is always armed).
    pub fn poll_timeout(&self) -> Instant {
        let next = self.timers.next().unwrap_or(self.now.plus_us(self.cfg.anti_entropy_us));
        next.max(self.now)
    }

    /// Keep notes of role changes (for traces); `take_notes` drains them.
    pub fn keep_notes(&mut self, on: bool) {
        self.notes = on.then(Vec::new);
    }

    pub fn take_notes(&mut self) -> Vec<String> {
        self.notes.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub(crate) fn note(&mut self, note: impl FnOnce() -> String) {
        if let Some(notes) = self.notes.as_mut() {
            notes.push(note());
        }
    }

    /// Whether a deliberately broken variant is switched on (never without the
    /// `broken` feature).
    pub(crate) fn has_bug(&self, bug: crate::Bug) -> bool {
        #[cfg(feature = "broken")]
        {
            self.cfg.bug == Some(bug)
        }
        #[cfg(not(feature = "broken"))]
        {
            let _ = bug;
            false
        }
    }

    pub(crate) fn merge_rules(&self) -> crate::MergeRules {
        crate::MergeRules {
            whole_flag_sets: self.has_bug(crate::Bug::WholeFlagSets),
            ignore_tombstones: self.has_bug(crate::Bug::IgnoreTombstones),
            replica_overwrites: self.has_bug(crate::Bug::ReplicaOverwritesUid),
            from_master: false,
            revive_lost: false,
            cancels_remove_claimed: self.has_bug(crate::Bug::CancelClaimedSaves),
            laptop_leaves_incarnation: false,
            from_log: false,
            log_copy_loses: self.has_bug(crate::Bug::ExpungeWinsOverLogCopy),
        }
    }

    /// Applies a write to the image and emits it: the one way the store changes.
    pub(crate) fn commit(&mut self, write: StoreWrite) -> WriteId {
        self.image.commit(&mut self.out, write)
    }

    pub(crate) fn new_guid(&mut self) -> Guid {
        let hi = u128::from(self.rng.next_u64());
        let lo = u128::from(self.rng.next_u64());
        // The origin in the low bits: GUIDs still sort by random bits.
        Guid(((hi << 64 | lo) & !Guid::ORIGIN_MASK) | (u128::from(self.cfg.sid.0) & Guid::ORIGIN_MASK))
    }

    /// A mailbox's summary, its digest kept up to date.
    pub(crate) fn summary_of(&mut self, key: &MailboxKey) -> Option<Summary> {
        self.image.summary(key)
    }

    pub(crate) fn master_key(&self, mailbox: &MailboxKey) -> MasterKey {
        MasterKey::of(mailbox, self.cfg.granularity)
    }

    fn on_envelope(&mut self, from: Sid, envelope: Envelope) {
        if !self.routing.has_any_link(from) {
            // Only a neighbour over a link we know is up may talk to us.
            return;
        }
        if !self.routing.has_link(from) {
            // A neighbour outside the membership (not added yet, or retired) is told
            // and heard about membership and links only.
            match envelope.msg {
                Msg::Members { members, .. } if envelope.dst == self.cfg.sid => self.on_members(&members),
                Msg::LinkState { origin, seq, epoch, store, neighbors } if !self.retired() => {
                    self.on_link_state(from, origin, seq, epoch, store, neighbors)
                }
                _ => {}
            }
            return;
        }
        if envelope.dst != self.cfg.sid {
            if let Msg::LinkState { .. } = envelope.msg {
                return;
            }
            self.relay(envelope);
            return;
        }
        if !self.is_member(envelope.src) {
            self.send_error(from, format!("unknown server {}", envelope.src));
            return;
        }
        let src = envelope.src;
        if let Err(why) = crate::limits::check_peer_msg(&envelope.msg) {
            // A number no server could have reached, or a mailbox no client could have
            // made: acting on it could overflow or wedge something, so it is dropped (a
            // change is acked as refused, so the sender's log does not keep it forever).
            self.marks.hit(Mark::PeerInputRefused);
            let name = envelope.msg.name();
            self.note(|| format!("refuses {name} from {src}: {why}"));
            if let Msg::Change { seq, .. } = envelope.msg {
                let store = self.image.disk().store_id;
                self.send(src, Msg::Ack { seqs: Vec::new(), refused: vec![seq], store });
            }
            return;
        }
        match envelope.msg {
            Msg::LinkState { origin, seq, epoch, store, neighbors } => {
                self.on_link_state(from, origin, seq, epoch, store, neighbors)
            }
            Msg::Members { members, store } => {
                self.on_members(&members);
                // Said by the neighbour itself on this link: its store now.
                if src == from {
                    self.heard_store(src, store, true);
                }
            }
            Msg::Root { epoch, root } => self.on_root(src, epoch, root),
            Msg::Dropped { epoch } => self.on_dropped(src, epoch),
            Msg::Who { epoch, keys } => self.on_who(src, epoch, keys),
            Msg::MasterIs { epoch, key, master, generation } => self.on_master_is(src, epoch, key, master, generation),
            // A wire tag names the sender's job in a request, ours in an answer.
            Msg::MasterMove { tag, key, requester } => self.on_master_move(src, JobId(tag), key, requester),
            Msg::MoveDone { tag, key, epoch, generation, states } => {
                self.on_move_done(src, JobId(tag), key, epoch, generation, states)
            }
            Msg::Request { tag, request } => self.on_peer_request(src, JobId(tag), request),
            Msg::Reply { tag, master, result, record } => self.on_peer_reply(src, JobId(tag), master, result, record),
            Msg::Change { seq, change } => self.on_change(src, seq, change),
            Msg::Ack { seqs, refused, store } => self.on_ack(src, seqs, refused, store),
            // A catch-up's number; 0 in an unsolicited MBOX (anti-entropy).
            Msg::MboxRequest { tag, key } => self.on_mbox_request(src, CatchupId(tag), key),
            Msg::Mbox { tag, summary } => {
                let kind = match tag {
                    0 => SummaryKind::Check,
                    crate::msg::MBOX_CONFIRMATION => SummaryKind::Confirmation,
                    id => SummaryKind::Catchup(CatchupId(id)),
                };
                self.on_mbox(src, kind, summary)
            }
            Msg::MboxDone { tag, count } => self.on_mbox_done(src, CatchupId(tag), count),
            Msg::Sync { reply, state } => self.on_sync(src, reply, state),
            Msg::SyncPart { state } => {
                self.merge_foreign(src, &state);
            }
            Msg::Fetch { guid } => self.on_fetch(src, guid),
            Msg::Body { guid, checksum, body } => self.on_body(src, guid, checksum, body),
            Msg::NoBody { guid } => self.on_no_body(src, guid),
            Msg::Error { .. } => {}
        }
    }

    pub(crate) fn send_error(&mut self, to: Sid, text: String) {
        let envelope = Envelope { src: self.cfg.sid, dst: to, hops: 0, msg: Msg::Error { text } };
        self.out.send(to, envelope);
    }

    fn on_durable(&mut self, upto: WriteId) {
        self.out.durable(upto);
        self.image.durable(upto);
        self.progress_jobs();
    }

    pub(crate) fn on_reachability_changed(&mut self, gained: &[Sid], lost: &[Sid]) {
        for &peer in gained {
            // Everything in its log goes out again, and every copy of its is checked.
            self.log_progress.resend_all(peer);
            self.anti_entropy.recheck_peer(peer);
        }
        for &peer in lost {
            // Its log goes out in full when it is back (above); until then nothing is
            // resent to it.
            self.log_progress.resend_all(peer);
            self.root_role.peer_lost(peer);
            self.masters.peer_lost(peer);
            self.requeue_forwarded_to(peer);
        }
        self.check_root();
        self.resend_logs();
        self.finish_catchups();
    }

    fn on_timer(&mut self) {
        for timer in self.timers.take_expired(self.now) {
            match timer {
                Timer::Announce => self.announce_links(0),
                Timer::Retry => self.retry_waiting_work(),
                Timer::JobDeadline => self.expire_jobs(),
                Timer::FreshReadDeadline => self.answer_fresh_reads(),
                Timer::LogResend => self.resend_logs(),
                Timer::Maintenance => {
                    self.timers.set(Timer::Maintenance, self.now.plus_us(self.cfg.anti_entropy_us));
                    self.maintain();
                }
            }
        }
    }

    /// Arms each timer for the work left after an input (see `timers`).
    fn arm_timers(&mut self) {
        match self.jobs.next_deadline() {
            Some(at) => self.timers.set(Timer::JobDeadline, at),
            None => self.timers.stop(Timer::JobDeadline),
        }
        match self.fresh_reads.next_deadline() {
            Some(at) => self.timers.set(Timer::FreshReadDeadline, at),
            None => self.timers.stop(Timer::FreshReadDeadline),
        }
        if let Some(at) = self.log_progress.next_resend(self.cfg.anti_entropy_us) {
            // A resend that was due and did not go (its peer is out of reach, or the
            // pass was full) is tried a tick later, not again at once.
            let at = if at <= self.now { self.now.plus_us(self.cfg.tick_us) } else { at };
            self.timers.set_earliest(Timer::LogResend, at);
        }
        if self.has_waiting_work() {
            if !self.timers.is_armed(Timer::Retry) {
                self.timers.set(Timer::Retry, self.now.plus_us(self.cfg.tick_us));
            }
        } else {
            self.timers.stop(Timer::Retry);
        }
        debug_assert!(self.timers.is_armed(Timer::Maintenance), "maintenance is always armed");
        debug_assert_eq!(self.timers.is_armed(Timer::JobDeadline), self.jobs.len() > 0, "a job is never forgotten");
        debug_assert!(
            self.log_progress.next_resend(0).is_none() || self.timers.is_armed(Timer::LogResend),
            "an unacknowledged entry is resent"
        );
    }

    /// Work that waits on something no input announces, so it is polled.
    fn has_waiting_work(&self) -> bool {
        self.jobs.has_queued()
            || matches!(self.startup, StartupHold::Until(_))
            || (self.is_root() && !self.root_role.active())
            || self.masters.has_catchups()
            || self.body_fetch.count() > 0
            // A user replica's body read held for bodies from peers is answered once
            // they are here, no longer wanted (a census gave one up) or at its deadline,
            // which no input announces (explore seed 218709).
            || self.omitted.has_waiting()
    }

    fn retry_waiting_work(&mut self) {
        // A server that starts alone (after its start-up hold), or lost every link, is
        // its own root.
        self.check_root();
        if self.is_root() && !self.root_role.active() {
            self.broadcast_term();
        }
        for key in self.jobs.queued_keys() {
            if !self.masters.knows(&key) {
                self.lookup_master(&key);
            }
            self.requeue_jobs_for(&key);
        }
        self.finish_catchups();
        self.fetch_wanted_bodies();
    }

    fn maintain(&mut self) {
        self.check_root();
        // Every mailbox keeps a master: one whose master was lost (or whose
        // MASTER-MOVE answer went astray) gets one again.
        self.masters.request_check();
        self.resend_handoffs();
        self.announce_masterships();
        self.resend_lookups();
        self.anti_entropy();
        self.sync_dirty();
        self.sync_overflowed();
        self.scrub_bodies();
        self.collect_bodies();
        self.collect_tombstones();
        self.expire_collected();
        self.expire_states_asked();
        self.finish_leaving();
        self.forget_old_saves();
    }

    fn resend_handoffs(&mut self) {
        for (key, h) in self.masters.handoffs() {
            if h.epoch != self.root_role.epoch() {
                self.masters.handoff_done(&key);
                continue;
            }
            // Our copy as it is now, not as it was at the handover: it has taken the new
            // master's changes since, and a copy frozen then would bring back what was
            // expunged meanwhile (once its tombstones were collected).
            let states = self.states_covered_by(&key);
            self.send_move_done(h.requester, h.requester_job, key, h.epoch, h.generation, states);
        }
    }

    /// Masters remind the root what they master, so a lost report cannot leave the
    /// root's table naming a server that gave the key away.
    fn announce_masterships(&mut self) {
        let Some(root) = self.root_role.root().filter(|r| *r != self.cfg.sid) else { return };
        let epoch = self.root_role.epoch();
        for (key, generation) in self.masters.ready_generations() {
            self.send(root, Msg::MasterIs { epoch, key, master: self.cfg.sid, generation });
        }
    }

    fn resend_lookups(&mut self) {
        // A lost answer is asked again; a root that never answers is replaced by failover.
        for key in self.masters.take_stale_lookups(self.now, self.cfg.anti_entropy_us) {
            self.lookup_master(&key);
        }
        if self.masters.check_due() {
            self.check_all_masters();
        }
    }
}
