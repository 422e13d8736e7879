//! The server state machine. Inputs arrive through [`Server::handle`]; outputs are
//! drained with [`Server::poll_output`] after every input; [`Server::poll_timeout`] says
//! when to deliver the next [`Input::Timer`].

mod jobs;
mod replication;
mod root;
mod routing;

pub use jobs::{Job, JobKind, JobState, Origin};
pub use root::{EPOCH_SID_BITS, RootState, Term};
pub use routing::LinkAnnouncement;

use crate::io::*;
use crate::mailbox;
use crate::marks::{Mark, Marks};
use crate::msg::*;
use crate::store::{DiskImage, StoreWrite, StoredMailbox};
use crate::types::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A new master's catch-up: it asks every reachable server for its copies and merges
/// the ones that differ before it orders any write, so new UIDs exceed every UID a
/// reachable server has shown.
#[derive(Clone, Debug)]
pub struct Catchup {
    pub tag: u64,
    pub waiting_mbox: BTreeSet<Sid>,
    pub waiting_sync: BTreeSet<(Sid, MailboxKey)>,
    pub deadline: Instant,
}

#[derive(Clone, Debug)]
pub struct Mastership {
    /// None once caught up: the master orders writes.
    pub catchup: Option<Catchup>,
    /// Which master of the key this is in the current term.
    pub generation: u64,
}

/// A MASTER-MOVE handover waiting for the new master's announcement.
#[derive(Clone, Debug)]
pub struct Handoff {
    pub requester: Sid,
    pub tag: u64,
    pub epoch: u64,
    pub generation: u64,
    pub states: Vec<MailboxState>,
}

/// A master's anti-entropy record of one peer's copy of one mailbox.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeerCheck {
    pub confirmed_digest: Option<u64>,
    pub confirmed_at: Option<Instant>,
    pub last_sent: Option<Instant>,
}

/// See [`Server::common_modseq`]: a point both copies of a mailbox had reached.
#[derive(Clone, Copy, Debug)]
pub struct CommonPoint {
    pub modseq: u64,
    pub deltas_left: u8,
}

/// Delta SYNCs tried after a common point before falling back to a full one: a heal
/// can bring a catch-up and an anti-entropy round for the same mailbox.
pub(crate) const DELTA_SYNCS_MAX: u8 = 3;

#[derive(Clone, Debug)]
pub struct WantedBody {
    pub checksum: u64,
    pub hint: Option<Sid>,
    pub attempts: u32,
    pub next_try: Instant,
    pub repair: bool,
    /// A census the mailbox master runs when no peer it tried has the body: it asks every
    /// configured server at once and notes who answered that it has none since `started`.
    pub census: Option<BodyCensus>,
}

#[derive(Clone, Debug)]
pub struct BodyCensus {
    pub started: Instant,
    pub denied: BTreeSet<Sid>,
}

pub struct Server {
    pub(crate) cfg: Config,
    pub(crate) db: DiskImage,
    pub(crate) now: Instant,
    pub(crate) rng: ChaCha8Rng,
    outputs: VecDeque<Output>,
    last_write: WriteId,
    durable_upto: WriteId,
    pub(crate) marks: Marks,
    // Routing.
    pub(crate) links: BTreeSet<Sid>,
    pub(crate) lsdb: BTreeMap<Sid, LinkAnnouncement>,
    pub(crate) routes: BTreeMap<Sid, Sid>,
    pub(crate) reachable: BTreeSet<Sid>,
    // Root and masters.
    pub(crate) term: Term,
    pub(crate) root_state: RootState,
    pub(crate) master_cache: BTreeMap<MasterKey, Sid>,
    /// Generation of each master named by the root or announced; older news is ignored.
    pub(crate) cache_generation: BTreeMap<MasterKey, u64>,
    pub(crate) mastered: BTreeMap<MasterKey, Mastership>,
    pub(crate) lookups: BTreeMap<MasterKey, Instant>,
    pub(crate) need_master_check: bool,
    pub(crate) moving: BTreeSet<MasterKey>,
    /// Keys we gave up by MASTER-MOVE whose new master has not announced itself yet:
    /// the handover is resent until it has, so a lost MOVED never leaves a key masterless.
    pub(crate) handoffs: BTreeMap<MasterKey, Handoff>,
    // Requests in progress here.
    pub(crate) next_tag: u64,
    pub(crate) jobs: BTreeMap<u64, Job>,
    pub(crate) pending_reads: Vec<(RequestId, WriteId, ClientReply)>,
    // Replication.
    /// Changes received and not yet acknowledged: (peer, seq, our write, whether we
    /// applied it).
    pub(crate) pending_acks: Vec<(Sid, u64, WriteId, bool)>,
    pub(crate) ack_waiters: BTreeMap<(Sid, u64), u64>,
    /// Per (job tag, peer): log entries of the job's change (a change too large for one
    /// command goes in parts) that peer has yet to acknowledge; it counts as a copy at 0.
    pub(crate) parts_left: BTreeMap<(u64, Sid), usize>,
    pub(crate) log_sent: BTreeMap<(Sid, u64), Instant>,
    pub(crate) checks: BTreeMap<(Sid, MailboxKey), PeerCheck>,
    /// Our HIGHESTMODSEQ when a peer last showed the same digest as ours, and how many
    /// delta SYNCs (changes after it) may still be tried before a full one. Kept across
    /// link changes (that is when it pays); lost on restart, then SYNC is full.
    pub(crate) common_modseq: BTreeMap<(Sid, MailboxKey), CommonPoint>,
    pub(crate) dirty: BTreeMap<MailboxKey, Option<Instant>>,
    pub(crate) wanted_bodies: BTreeMap<Guid, WantedBody>,
    /// FETCHes sent and not yet answered, with when we stop waiting: at most
    /// `FETCH_WINDOW_MAX`, refilled as bodies arrive.
    pub(crate) fetching: BTreeMap<Guid, Instant>,
    /// Set by whatever may let more FETCHes go out; acted on once after the input.
    pub(crate) fetch_kick: bool,
    /// Set when a peer became reachable or a mastership became ready: checking copies
    /// then (not at the next slow tick, up to a second later) starts a resync at once.
    pub(crate) anti_entropy_kick: bool,
    pub(crate) scrub_cursor: Option<Guid>,
    /// Whether each stored body matched its checksum when last checked: a cache of
    /// `body_checksum(bytes) == checksum`, dropped whenever the stored body changes (all
    /// changes go through `put_body`, `remove_body` and `replace_body_bytes`).
    pub(crate) body_verdicts: BTreeMap<Guid, bool>,
    /// Each mailbox's digest, kept up to date by `write` from the writes that change the
    /// mailbox (built from the store when first needed).
    pub(crate) digests: BTreeMap<MailboxKey, mailbox::DigestParts>,
    /// Messages that may lack a body: written while it was not here (see `write`).
    pub(crate) scrub_suspects: BTreeSet<(MailboxKey, Uid)>,
    /// A body was removed (or the server just started): the next scrub looks at every
    /// message.
    pub(crate) scrub_rescan: bool,
    next_tick: Instant,
    last_slow_tick: Instant,
    /// When our pending link-state announcement goes out.
    pub(crate) announce_due: Option<Instant>,
    /// Role changes (root terms, masterships) for a readable timeline, when asked for.
    notes: Option<Vec<String>>,
}

impl Server {
    /// A server starting with an empty store.
    pub fn new(cfg: Config, seed: u64) -> Server {
        Server::recover(cfg, DiskImage::default(), seed)
    }

    /// A server restarting from what its disk holds. Volatile state (links, routes,
    /// master cache, masterships, requests in progress) starts empty.
    pub fn recover(cfg: Config, db: DiskImage, seed: u64) -> Server {
        let incarnation = db.incarnation + 1;
        let mut server = Server {
            rng: ChaCha8Rng::seed_from_u64(seed ^ incarnation.rotate_left(32) ^ u64::from(cfg.sid.0)),
            term: Term { epoch: db.epoch, root: None },
            reachable: BTreeSet::from([cfg.sid]),
            cfg,
            db,
            now: Instant(0),
            outputs: VecDeque::new(),
            last_write: 0,
            durable_upto: 0,
            marks: Marks::default(),
            links: BTreeSet::new(),
            lsdb: BTreeMap::new(),
            routes: BTreeMap::new(),
            root_state: RootState::default(),
            master_cache: BTreeMap::new(),
            cache_generation: BTreeMap::new(),
            mastered: BTreeMap::new(),
            lookups: BTreeMap::new(),
            need_master_check: true,
            moving: BTreeSet::new(),
            handoffs: BTreeMap::new(),
            next_tag: incarnation << 40,
            jobs: BTreeMap::new(),
            pending_reads: Vec::new(),
            pending_acks: Vec::new(),
            ack_waiters: BTreeMap::new(),
            parts_left: BTreeMap::new(),
            log_sent: BTreeMap::new(),
            checks: BTreeMap::new(),
            common_modseq: BTreeMap::new(),
            dirty: BTreeMap::new(),
            wanted_bodies: BTreeMap::new(),
            fetching: BTreeMap::new(),
            fetch_kick: false,
            anti_entropy_kick: false,
            scrub_cursor: None,
            body_verdicts: BTreeMap::new(),
            digests: BTreeMap::new(),
            scrub_suspects: BTreeSet::new(),
            scrub_rescan: true,
            next_tick: Instant(0),
            last_slow_tick: Instant(0),
            announce_due: None,
            notes: None,
        };
        server.db.incarnation = incarnation;
        server.write(StoreWrite::Incarnation { incarnation });
        // A restarted server rejoins a component that grew, so the root opens a new
        // term and every new master checks this server's copies in its catch-up.
        server
    }

    pub fn sid(&self) -> Sid {
        self.cfg.sid
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// What the store holds, as the core sees it (durable or about to be).
    pub fn image(&self) -> &DiskImage {
        &self.db
    }
    pub fn term(&self) -> Term {
        self.term
    }
    pub fn marks(&self) -> &Marks {
        &self.marks
    }
    pub fn reachable(&self) -> &BTreeSet<Sid> {
        &self.reachable
    }
    /// The master cache: hints, corrected by the next forwarded request that uses them.
    pub fn masters_known(&self) -> &BTreeMap<MasterKey, Sid> {
        &self.master_cache
    }
    /// At the root: who masters what in this term (empty elsewhere).
    pub fn root_table(&self) -> &BTreeMap<MasterKey, Sid> {
        &self.root_state.table
    }
    /// Keys this server masters and has caught up on.
    pub fn mastered_ready(&self) -> Vec<MasterKey> {
        self.mastered.iter().filter(|(_, m)| m.catchup.is_none()).map(|(k, _)| k.clone()).collect()
    }
    pub fn summaries(&self) -> Vec<Summary> {
        self.db
            .mailboxes
            .iter()
            .map(|(k, m)| match self.digests.get(k).filter(|parts| parts.fits(m)) {
                Some(parts) => mailbox::summary_with_digest(k, m, parts.digest(m)),
                None => mailbox::summary(k, m),
            })
            .collect()
    }
    /// The mailboxes a client of `user` is shown (IMAP LIST): see [`crate::types::Lifecycle`].
    pub fn visible_summaries(&self, user: &str) -> Vec<Summary> {
        self.db
            .mailboxes
            .iter()
            .filter(|(k, m)| k.user == user && m.visible())
            .map(|(k, m)| mailbox::summary(k, m))
            .collect()
    }
    /// Unacknowledged log entries per peer.
    pub fn backlog(&self) -> BTreeMap<Sid, usize> {
        self.db.logs.iter().map(|(p, l)| (*p, l.entries.len())).collect()
    }
    pub fn jobs_in_progress(&self) -> usize {
        self.jobs.len()
    }
    pub fn wanted_bodies(&self) -> usize {
        self.wanted_bodies.len()
    }
    pub fn dirty_mailboxes(&self) -> usize {
        self.dirty.len()
    }

    /// Feed one input. Drain `poll_output` afterwards.
    pub fn handle(&mut self, now: Instant, input: Input) {
        debug_assert!(now >= self.now, "time went backwards");
        self.now = self.now.max(now);
        match input {
            Input::Peer { from, envelope } => self.on_envelope(from, envelope),
            Input::Client { id, request } => self.on_client(id, request),
            Input::Timer => self.on_timer(),
            Input::LinkUp { peer } => self.on_link_up(peer),
            Input::LinkDown { peer } => self.on_link_down(peer),
            Input::Durable { upto } => self.on_durable(upto),
            Input::External(edit) => self.on_external(edit),
        }
        if std::mem::take(&mut self.fetch_kick) {
            self.fetch_wanted_bodies();
        }
        if std::mem::take(&mut self.anti_entropy_kick) {
            self.anti_entropy();
        }
        self.check_all_masters();
        self.flush_acks();
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    pub fn poll_timeout(&self) -> Instant {
        let tick = self.next_tick.max(self.now);
        match self.announce_due {
            Some(at) => tick.min(at.max(self.now)),
            None => tick,
        }
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
        }
    }

    pub(crate) fn push_send(&mut self, to: Sid, envelope: Envelope) {
        self.outputs.push_back(Output::Send { to, envelope });
    }

    pub(crate) fn push_reply(&mut self, id: RequestId, reply: ClientReply) {
        self.outputs.push_back(Output::Reply { id, reply });
    }

    /// Record a durable write (already applied to `db` by the caller) and emit it.
    pub(crate) fn write(&mut self, write: StoreWrite) -> WriteId {
        match &write {
            StoreWrite::PutMessage { mailbox, record } => {
                if let Some(parts) = self.digests.get_mut(mailbox) {
                    parts.put_record(record);
                }
                if !self.db.bodies.contains_key(&record.guid) {
                    self.scrub_suspects.insert((mailbox.clone(), record.uid));
                }
            }
            StoreWrite::RemoveBody { .. } => self.scrub_rescan = true,
            StoreWrite::RemoveMessage { mailbox, uid } => {
                if let Some(parts) = self.digests.get_mut(mailbox) {
                    parts.remove_record(*uid);
                }
            }
            StoreWrite::PutTombstone { mailbox, tombstone } => {
                if let Some(parts) = self.digests.get_mut(mailbox) {
                    parts.put_tombstone(tombstone);
                }
            }
            _ => {}
        }
        self.last_write += 1;
        self.outputs.push_back(Output::Write { id: self.last_write, write });
        self.last_write
    }

    pub(crate) fn last_write(&self) -> WriteId {
        self.last_write
    }

    pub(crate) fn is_durable(&self, id: WriteId) -> bool {
        id <= self.durable_upto
    }

    pub(crate) fn new_tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    pub(crate) fn new_guid(&mut self) -> Guid {
        let hi = u128::from(self.rng.next_u64());
        let lo = u128::from(self.rng.next_u64());
        Guid((hi << 64 | lo) ^ (u128::from(self.cfg.sid.0) << 96))
    }

    pub(crate) fn mailbox_mut(&mut self, key: &MailboxKey) -> &mut StoredMailbox {
        self.db.mailboxes.entry(key.clone()).or_insert_with(|| mailbox::new_mailbox(key))
    }

    /// A mailbox's summary, its digest kept up to date (see `digests`).
    pub(crate) fn summary_of(&mut self, key: &MailboxKey) -> Option<Summary> {
        let m = self.db.mailboxes.get(key)?;
        Some(cached_summary(&mut self.digests, key, m))
    }

    pub(crate) fn master_key(&self, mailbox: &MailboxKey) -> MasterKey {
        MasterKey::of(mailbox, self.cfg.granularity)
    }

    pub(crate) fn peers(&self) -> Vec<Sid> {
        self.cfg.servers.iter().copied().filter(|s| *s != self.cfg.sid).collect()
    }

    fn on_envelope(&mut self, from: Sid, envelope: Envelope) {
        if !self.links.contains(&from) {
            // Only a neighbour over a link we know is up may talk to us.
            return;
        }
        if envelope.dst != self.cfg.sid {
            if let Msg::LinkState { .. } = envelope.msg {
                return;
            }
            self.relay(envelope);
            return;
        }
        if !self.cfg.servers.contains(&envelope.src) {
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
                self.send(src, Msg::Ack { seqs: Vec::new(), refused: vec![seq] });
            }
            return;
        }
        match envelope.msg {
            Msg::LinkState { origin, seq, epoch, neighbors } => self.on_link_state(from, origin, seq, epoch, neighbors),
            Msg::Root { epoch, root } => self.on_root(src, epoch, root),
            Msg::Dropped { epoch } => self.on_dropped(src, epoch),
            Msg::Who { epoch, keys } => self.on_who(src, epoch, keys),
            Msg::MasterIs { epoch, key, master, generation } => self.on_master_is(src, epoch, key, master, generation),
            Msg::MasterMove { tag, key, requester } => self.on_master_move(src, tag, key, requester),
            Msg::MoveDone { tag, key, epoch, generation, states } => {
                self.on_move_done(tag, key, epoch, generation, states)
            }
            Msg::Request { tag, request } => self.on_peer_request(src, tag, request),
            Msg::Reply { tag, master, result, record } => self.on_peer_reply(src, tag, master, result, record),
            Msg::Change { seq, change } => self.on_change(src, seq, change),
            Msg::Ack { seqs, refused } => self.on_ack(src, seqs, refused),
            Msg::MboxRequest { tag, key } => self.on_mbox_request(src, tag, key),
            Msg::Mbox { tag, summary } => self.on_mbox(src, tag, summary),
            Msg::MboxDone { tag, count } => self.on_mbox_done(src, tag, count),
            Msg::Sync { reply, state } => self.on_sync(src, reply, state),
            Msg::SyncPart { state } => {
                self.merge_foreign(src, &state, false);
            }
            Msg::Fetch { guid } => self.on_fetch(src, guid),
            Msg::Body { guid, checksum, body } => self.on_body(src, guid, checksum, body),
            Msg::NoBody { guid } => self.on_no_body(src, guid),
            Msg::Error { .. } => {}
        }
    }

    pub(crate) fn send_error(&mut self, to: Sid, text: String) {
        let envelope = Envelope { src: self.cfg.sid, dst: to, hops: 0, msg: Msg::Error { text } };
        self.push_send(to, envelope);
    }

    fn on_durable(&mut self, upto: WriteId) {
        debug_assert!(upto <= self.last_write, "durable beyond the last write issued");
        self.durable_upto = self.durable_upto.max(upto.min(self.last_write));
        let reads = std::mem::take(&mut self.pending_reads);
        for (id, write, reply) in reads {
            if self.is_durable(write) {
                self.push_reply(id, reply);
            } else {
                self.pending_reads.push((id, write, reply));
            }
        }
        self.progress_jobs();
    }

    pub(crate) fn on_reachability_changed(&mut self, gained: &[Sid], lost: &[Sid]) {
        for &peer in gained {
            let seqs: Vec<u64> =
                self.db.logs.get(&peer).map(|l| l.entries.keys().copied().collect()).unwrap_or_default();
            for seq in seqs {
                self.log_sent.remove(&(peer, seq));
            }
            self.checks.retain(|(p, _), _| *p != peer);
        }
        for &peer in lost {
            if self.is_root() {
                self.root_state.table.retain(|_, m| *m != peer);
                // A server that comes back must drop its masterships again: it may have
                // had its own root meanwhile.
                self.root_state.members.remove(&peer);
                self.root_state.dropped.remove(&peer);
            }
            self.master_cache.retain(|_, m| *m != peer);
            for m in self.mastered.values_mut() {
                if let Some(c) = m.catchup.as_mut() {
                    c.waiting_mbox.remove(&peer);
                    c.waiting_sync.retain(|(p, _)| *p != peer);
                }
            }
            self.requeue_forwarded_to(peer);
        }
        self.check_root();
        self.resend_logs();
        self.finish_catchups();
    }

    fn on_timer(&mut self) {
        self.announce_if_due();
        if self.now < self.next_tick {
            return;
        }
        self.next_tick = self.now.plus_us(self.cfg.tick_us);
        // A server that starts alone (or lost every link) is its own root.
        self.check_root();
        self.expire_jobs();
        if self.is_root() && !self.root_state.active {
            self.broadcast_term();
        }
        let keys: BTreeSet<MasterKey> =
            self.jobs.values().filter(|j| matches!(j.state, JobState::Queued)).map(|j| j.key.clone()).collect();
        for key in keys {
            if !self.mastered.contains_key(&key) && !self.master_cache.contains_key(&key) {
                self.lookup_master(&key);
            }
            self.requeue_jobs_for(&key);
        }
        self.finish_catchups();
        self.resend_logs();
        self.fetch_wanted_bodies();
        if self.now.0.saturating_sub(self.last_slow_tick.0) >= self.cfg.anti_entropy_us {
            self.last_slow_tick = self.now;
            // Every mailbox keeps a master: one whose master was lost (or whose
            // MASTER-MOVE answer went astray) gets one again.
            self.need_master_check = true;
            self.resend_handoffs();
            self.announce_masterships();
            self.resend_lookups();
            self.anti_entropy();
            self.sync_dirty();
            self.scrub_bodies();
        }
    }

    fn resend_handoffs(&mut self) {
        let pending: Vec<(MasterKey, Handoff)> = self.handoffs.iter().map(|(k, h)| (k.clone(), h.clone())).collect();
        for (key, h) in pending {
            if h.epoch != self.term.epoch {
                self.handoffs.remove(&key);
                continue;
            }
            self.send_move_done(h.requester, h.tag, key, h.epoch, h.generation, h.states);
        }
    }

    /// Masters remind the root what they master, so a lost report cannot leave the
    /// root's table naming a server that gave the key away.
    fn announce_masterships(&mut self) {
        let Some(root) = self.term.root.filter(|r| *r != self.cfg.sid) else { return };
        let epoch = self.term.epoch;
        let ready: Vec<(MasterKey, u64)> =
            self.mastered.iter().filter(|(_, m)| m.catchup.is_none()).map(|(k, m)| (k.clone(), m.generation)).collect();
        for (key, generation) in ready {
            self.send(root, Msg::MasterIs { epoch, key, master: self.cfg.sid, generation });
        }
    }

    fn resend_lookups(&mut self) {
        // A lost answer is asked again; a root that never answers is replaced by failover.
        let stale: Vec<MasterKey> = self
            .lookups
            .iter()
            .filter(|(_, at)| self.now.0.saturating_sub(at.0) >= self.cfg.anti_entropy_us)
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            self.lookups.remove(&key);
            self.lookup_master(&key);
        }
        if self.need_master_check {
            self.check_all_masters();
        }
    }
}

/// `mailbox::summary` with the digest kept in `digests` (see `Server::digests`).
pub(crate) fn cached_summary(
    digests: &mut BTreeMap<MailboxKey, mailbox::DigestParts>,
    key: &MailboxKey,
    m: &StoredMailbox,
) -> Summary {
    let digest = match digests.get(key) {
        Some(parts) if parts.fits(m) => parts.digest(m),
        _ => {
            let parts = mailbox::DigestParts::of(m);
            let d = parts.digest(m);
            digests.insert(key.clone(), parts);
            d
        }
    };
    mailbox::summary_with_digest(key, m, digest)
}
