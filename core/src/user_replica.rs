//! A user replica's agent: the sans-IO state machine behind `tandem replicate`, which
//! keeps one user's personal store (a laptop's tandem, a cluster of its own) in two-way
//! sync with that user's mailboxes on a cluster.
//!
//! The seed thread's wish ("a cron job that asks my laptop's Dovecot to replicate from
//! my server's Dovecot, without giving it any special permissions") and Timo's answer
//! (safe "by just not allowing user to become replication master", and "not writing
//! (long) replication logs to disk while waiting for it to become online"): the agent is
//! a client of both sides. It never joins the cluster, so it can master nothing there;
//! it reads deltas from modseqs it keeps itself ([`SyncMarks`]), so the cluster keeps
//! no log for it. Per mailbox, a round is:
//!
//! 1. compare both sides' summaries (`ReplicaList`), the replica's first: it says what
//!    part of the user's mail it holds (a partial replica, see [`crate::partial`]) and
//!    which omitted bodies its clients asked for, and the cluster then lists that part.
//!    Equal digests need nothing;
//! 2. pull the replica's changes since the last push (`ReplicaPull`) and push them to
//!    the cluster (`ReplicaPush`), where the mailbox's master merges them exactly as it
//!    merges a peer's SYNC: the same conflict rules, the same renumbering;
//! 3. pull the cluster's changes since the last pull, the merge's outcome included, and
//!    have the replica adopt them (`ReplicaAdopt`) as a replica adopts its master's.
//!
//! A body travels only when the other side says it lacks it (`missing`). Every mailbox
//! goes through its steps at once, so a round costs a few round trips however many
//! mailboxes and messages it carries (a satellite link's second of latency is paid a
//! few times, not once per message). A round ends with the summaries compared again; a
//! mailbox still unequal is synced whole in the next round (a delta can miss a change
//! that reached the cluster's copy out of modseq order), up to `rounds_max`.
use crate::io::{ClientReply, ClientRequest, RequestId};
use crate::msg::WriteResult;
use crate::partial::Partial;
use crate::types::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Which copy a request goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Side {
    /// The user's own store (the laptop).
    Replica,
    /// A server of the cluster (any: pushes reach the mailbox's master through it).
    Cluster,
}

/// Where one mailbox's two copies stood when they last agreed: what the agent keeps
/// between runs (a small file next to the laptop's store).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxMarks {
    /// The cluster's copy: its UIDVALIDITY, and the modseq up to which the replica has
    /// every change of it.
    pub cluster_uidvalidity: u32,
    pub pulled: ModSeq,
    /// The replica's copy: its UIDVALIDITY, and the modseq up to which the cluster has
    /// every change of it.
    pub replica_uidvalidity: u32,
    pub pushed: ModSeq,
    /// UIDs where the replica's binding is one the cluster held (the replica took it
    /// from the cluster, or pushed it there): a message the cluster retires at one of
    /// them later was expunged (or moved) there, never new mail. As ranges (a `Retired`
    /// with nothing collected); UIDs are never bound twice, so it only grows.
    #[serde(default)]
    pub from_cluster: Retired,
}

/// Marks by mailbox name (one user's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncMarks {
    pub mailboxes: BTreeMap<String, MailboxMarks>,
}

/// What a sync did, for the operator (and the benchmarks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    pub rounds: u32,
    /// Mailboxes that needed work, counted once per round.
    pub mailboxes_synced: u64,
    pub records_pushed: u64,
    pub records_pulled: u64,
    pub bodies_pushed: u64,
    pub bodies_pulled: u64,
    pub body_bytes_pushed: u64,
    pub body_bytes_pulled: u64,
    pub requests: u64,
    /// Both copies of every mailbox agreed at the end.
    pub converged: bool,
    /// Mailboxes a round could not finish, and why (each is tried again next round).
    pub failures: Vec<String>,
    /// Omitted bodies a partial replica's clients asked for, brought this sync.
    #[serde(default)]
    pub bodies_on_demand: u64,
    /// Text parts of omitted bodies brought to a partial replica, and their bytes.
    #[serde(default)]
    pub text_parts_pulled: u64,
    #[serde(default)]
    pub text_part_bytes_pulled: u64,
}

/// Rounds a sync makes at most by default: one, and one more for what a delta missed
/// or what changed meanwhile.
pub const ROUNDS_MAX_DEFAULT: u32 = 3;
/// Body fetches for one piece of state at most (each brings up to
/// `ReplicaBodies`' limits); more means a side keeps losing bodies.
const BODY_ROUNDS_MAX: u32 = 64;

#[derive(Clone, Debug)]
enum Awaited {
    List,
    PullReplica(MailboxKey),
    Push {
        mailbox: MailboxKey,
        piece: usize,
    },
    BodiesForPush {
        mailbox: MailboxKey,
        piece: usize,
    },
    PullCluster(MailboxKey),
    Adopt {
        mailbox: MailboxKey,
        piece: usize,
    },
    BodiesForAdopt {
        mailbox: MailboxKey,
        piece: usize,
    },
    /// The cluster's copies of omitted bodies the replica's clients asked for.
    WantedBodies(MailboxKey),
    /// The replica keeping them.
    KeepWanted(MailboxKey),
    /// The text parts of omitted bodies the replica lacks, from the cluster.
    TextParts(MailboxKey),
    /// The replica keeping them.
    KeepTextParts(MailboxKey),
}

fn bytes_of(items: &[(Guid, Body)]) -> u64 {
    items.iter().map(|(_, b)| b.len() as u64).sum()
}

/// Text parts asked for in one `ReplicaTextParts` request at most: the cluster reads
/// each whole body (large ones, by definition) to cut it, within `ReplicaBodies`' byte
/// limit; several small requests go at once rather than one that comes back short.
const TEXT_PARTS_PER_REQUEST: usize = 8;
const _: () = assert!(TEXT_PARTS_PER_REQUEST <= crate::server::TEXT_PARTS_ANSWERED_MAX);

/// One mailbox's round.
#[derive(Clone, Debug, Default)]
struct Progress {
    /// Sync it whole: no marks, or a delta left the copies unequal.
    whole: bool,
    /// The replica's HIGHESTMODSEQ when it was pulled for the push.
    pushed_upto: ModSeq,
    pieces: Vec<MailboxState>,
    pieces_left: usize,
    body_rounds: u32,
    /// The lowest push mark the adopted pieces gave (0: push whole next time).
    new_pushed: Option<ModSeq>,
    /// Every adopted piece was taken whole (no conflict left for the cluster to decide):
    /// only then does the pull mark move past what this round pulled.
    took_all: bool,
    /// Bindings the cluster has held (from the marks, and as this round learns them).
    from_cluster: Retired,
    cluster_uidvalidity: u32,
    cluster_highest: ModSeq,
    /// The cluster's summary of the whole mailbox at the pull (after the merge of the push).
    cluster_summary: Option<Summary>,
    /// The replica's own new messages' bodies, given with its pull: they go up with the
    /// first push of the piece that holds them.
    own_bodies: BTreeMap<Guid, Body>,
    /// The replica's summary after an adopt that was the whole pull in one piece.
    replica_summary: Option<Summary>,
    failed: bool,
    /// The replica holds a date window: equal summaries (of the window) do not show a
    /// change it made outside it since the push (see `on_list`).
    windowed: bool,
}

impl Progress {
    /// Both copies were seen alike after this round's adopt: nothing to look at again.
    fn agreed(&self) -> Option<(&Summary, &Summary)> {
        let (r, c) = (self.replica_summary.as_ref()?, self.cluster_summary.as_ref()?);
        let alike =
            !self.failed && self.took_all && (r.uidvalidity, r.count, r.digest) == (c.uidvalidity, c.count, c.digest);
        // Outside a window a change since the push is not in the summaries: only a copy
        // with nothing unpushed is in step (explore seed 475: a message saved outside the
        // window between the pull and the adopt was never pushed).
        let pushed_all = !self.windowed || self.new_pushed.is_some_and(|p| r.highest_modseq <= p);
        (alike && pushed_all).then_some((r, c))
    }
}

impl Progress {
    /// Cuts a state into the pieces that go one per request; how many.
    fn start_pieces(&mut self, state: MailboxState) -> usize {
        self.pieces = crate::limits::state_pieces(state, crate::limits::STATE_PIECE_LEN_MAX);
        self.pieces_left = self.pieces.len();
        self.body_rounds = 0;
        self.pieces_left
    }

    /// The own bodies of a piece's messages, taken (each goes once), within what one
    /// request carries.
    fn own_bodies_of(&mut self, piece: usize) -> Vec<(Guid, Body)> {
        let Some(state) = self.pieces.get(piece) else { return Vec::new() };
        let mut bodies = Vec::new();
        let mut bytes = 0usize;
        for r in &state.messages {
            if bodies.len() >= crate::server::replica_serving::REPLICA_BODIES_MAX {
                break;
            }
            let Some(body) = self.own_bodies.get(&r.guid) else { continue };
            if bytes.saturating_add(body.len()) > crate::server::replica_serving::REPLICA_BODY_BYTES_MAX {
                break;
            }
            bytes = bytes.saturating_add(body.len());
            bodies.push((r.guid, body.clone()));
        }
        for (guid, _) in &bodies {
            self.own_bodies.remove(guid);
        }
        bodies
    }

    fn cluster_held_ranges(&self) -> Vec<(Uid, Uid)> {
        self.from_cluster.ranges.iter().map(|(first, last)| (*first, *last)).collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Listing,
    Syncing,
    Done,
}

/// The agent. Drive it like any sans-IO machine: send every request `poll_request`
/// gives (to its side), hand each answer to `handle_reply`, until `is_done`.
#[derive(Clone, Debug)]
pub struct ReplicaSync {
    user: Arc<str>,
    marks: SyncMarks,
    rounds_max: u32,
    phase: Phase,
    next_id: RequestId,
    outbox: VecDeque<(Side, RequestId, ClientRequest)>,
    waiting: BTreeMap<(Side, RequestId), Awaited>,
    lists: BTreeMap<Side, Vec<Summary>>,
    /// What the replica holds, as its listing said (None: everything).
    partial: Option<Partial>,
    /// Omitted bodies the replica's clients asked for, as its listing said.
    wanted: Vec<(MailboxKey, Guid)>,
    /// Omitted bodies whose text parts the replica lacks, as its listing said.
    texts_wanted: Vec<(MailboxKey, Guid)>,
    /// Text parts asked of the cluster in this sync: not asked twice (one the cluster
    /// cannot give now waits for the next sync rather than holding this one).
    texts_asked: BTreeSet<Guid>,
    /// Mailboxes the last round synced (a second look finds them unequal: whole next).
    synced_last_round: BTreeSet<MailboxKey>,
    /// Mailboxes whose adopt in the last round left a conflict for the cluster: a delta
    /// pull may miss what the conflict needs (explore seed 2325: a tombstone merged into
    /// the cluster's copy under an old modseq), so the next round is whole.
    unresolved_last_round: BTreeSet<MailboxKey>,
    mailboxes: BTreeMap<MailboxKey, Progress>,
    report: SyncReport,
}

impl ReplicaSync {
    pub fn new(user: &str, marks: SyncMarks, rounds_max: u32) -> ReplicaSync {
        let mut sync = ReplicaSync {
            user: user.into(),
            marks,
            rounds_max: rounds_max.max(1),
            phase: Phase::Listing,
            next_id: 1,
            outbox: VecDeque::new(),
            waiting: BTreeMap::new(),
            lists: BTreeMap::new(),
            partial: None,
            wanted: Vec::new(),
            texts_wanted: Vec::new(),
            texts_asked: BTreeSet::new(),
            synced_last_round: BTreeSet::new(),
            unresolved_last_round: BTreeSet::new(),
            mailboxes: BTreeMap::new(),
            report: SyncReport::default(),
        };
        sync.start_round();
        sync
    }

    /// The next request to send, to which side, with the id its answer must carry.
    pub fn poll_request(&mut self) -> Option<(Side, RequestId, ClientRequest)> {
        self.outbox.pop_front()
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    pub fn report(&self) -> &SyncReport {
        &self.report
    }

    /// The marks to keep for the next run (updated as mailboxes finish, so an
    /// interrupted sync keeps what it finished).
    pub fn marks(&self) -> &SyncMarks {
        &self.marks
    }

    /// Requests sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.waiting.len()
    }

    /// The connection to one side was lost: what was outstanding there fails, and the
    /// sync ends without converging (its finished mailboxes keep their marks).
    pub fn side_lost(&mut self, side: Side) {
        let lost: Vec<(Side, RequestId)> = self.waiting.keys().filter(|(s, _)| *s == side).copied().collect();
        for key in lost {
            self.waiting.remove(&key);
        }
        self.outbox.retain(|(s, _, _)| *s != side);
        self.report.failures.push(format!("lost the connection to the {side:?} side"));
        self.report.converged = false;
        self.phase = Phase::Done;
    }

    pub fn handle_reply(&mut self, side: Side, id: RequestId, reply: ClientReply) {
        let Some(awaited) = self.waiting.remove(&(side, id)) else { return };
        if self.phase == Phase::Done {
            return;
        }
        match awaited {
            Awaited::List => self.on_list(side, reply),
            Awaited::PullReplica(mailbox) => self.on_replica_state(mailbox, reply),
            Awaited::Push { mailbox, piece } => self.on_pushed(mailbox, piece, reply),
            Awaited::BodiesForPush { mailbox, piece } => self.on_bodies(mailbox, piece, reply, true),
            Awaited::PullCluster(mailbox) => self.on_cluster_state(mailbox, reply),
            Awaited::Adopt { mailbox, piece } => self.on_adopted(mailbox, piece, reply),
            Awaited::BodiesForAdopt { mailbox, piece } => self.on_bodies(mailbox, piece, reply, false),
            Awaited::WantedBodies(mailbox) => self.on_wanted_bodies(mailbox, reply),
            Awaited::KeepWanted(mailbox) => self.on_kept(mailbox, reply),
            Awaited::TextParts(mailbox) => self.on_text_parts(mailbox, reply),
            Awaited::KeepTextParts(mailbox) => self.on_text_parts_kept(mailbox, reply),
        }
        self.end_round_if_done();
    }

    fn request(&mut self, side: Side, request: ClientRequest, awaited: Awaited) {
        let id = self.next_id;
        self.next_id = self.next_id.saturating_add(1);
        self.report.requests += 1;
        self.waiting.insert((side, id), awaited);
        self.outbox.push_back((side, id, request));
    }

    fn start_round(&mut self) {
        self.report.rounds += 1;
        self.phase = Phase::Listing;
        self.lists.clear();
        self.mailboxes.clear();
        // The replica first (it is local): its answer says what part of the user's mail
        // it holds, which the cluster's listing is then of.
        let user = self.user.clone();
        self.request(Side::Replica, ClientRequest::ReplicaList { user, partial: None }, Awaited::List);
    }

    fn fail(&mut self, mailbox: &MailboxKey, why: String) {
        self.report.failures.push(format!("{mailbox}: {why}"));
        if let Some(p) = self.mailboxes.get_mut(mailbox) {
            p.failed = true;
            p.pieces_left = 0;
        }
    }

    fn on_list(&mut self, side: Side, reply: ClientReply) {
        let (summaries, partial, wanted, texts_wanted) = match reply {
            ClientReply::ReplicaList { summaries, partial, wanted, texts_wanted } => {
                (summaries, partial, wanted, texts_wanted)
            }
            other => {
                self.report.failures.push(format!("the {side:?} side could not list the mailboxes: {other:?}"));
                self.phase = Phase::Done;
                return;
            }
        };
        if side == Side::Replica {
            self.partial = partial.filter(|p| !p.is_whole());
            self.wanted = wanted;
            self.texts_wanted = texts_wanted;
            let (user, partial) = (self.user.clone(), self.partial.clone());
            self.request(Side::Cluster, ClientRequest::ReplicaList { user, partial }, Awaited::List);
        }
        // Only the user's own mailboxes, of those the replica holds, whatever a side
        // answered (a mailbox of the replica's outside its patterns stays its own).
        let user = self.user.clone();
        let held = |s: &Summary| self.partial.as_ref().is_none_or(|p| p.holds_mailbox(&s.mailbox.name));
        let summaries: Vec<Summary> = summaries.into_iter().filter(|s| s.mailbox.user == user && held(s)).collect();
        self.lists.insert(side, summaries);
        if self.lists.len() < 2 {
            return;
        }
        let by_key = |list: Option<&Vec<Summary>>| -> BTreeMap<MailboxKey, Summary> {
            list.into_iter().flatten().map(|s| (s.mailbox.clone(), s.clone())).collect()
        };
        let replica = by_key(self.lists.get(&Side::Replica));
        let cluster = by_key(self.lists.get(&Side::Cluster));
        let keys: BTreeSet<MailboxKey> = replica.keys().chain(cluster.keys()).cloned().collect();
        let mut work = Vec::new();
        // A date window's summaries count only the messages inside it: a change the
        // replica made to one outside (a flag, an old-dated APPEND) must still go up, so
        // its copy is in step only when nothing changed there since the last push.
        let windowed = self.partial.as_ref().is_some_and(|p| p.since_s > 0);
        for key in keys {
            let (r, c) = (replica.get(&key), cluster.get(&key));
            let pushed_all = |r: &Summary| {
                !windowed || self.marks.mailboxes.get(&*key.name).is_some_and(|m| r.highest_modseq <= m.pushed)
            };
            if let (Some(r), Some(c)) = (r, c)
                && (r.uidvalidity, r.count, r.digest) == (c.uidvalidity, c.count, c.digest)
                && pushed_all(r)
            {
                // In step: everything each holds now the other has, so every UID the
                // replica has bound so far is at a binding the cluster holds.
                let mut from_cluster = self
                    .marks
                    .mailboxes
                    .get(&*key.name)
                    .filter(|m| m.replica_uidvalidity == r.uidvalidity)
                    .map(|m| m.from_cluster.clone())
                    .unwrap_or_default();
                if r.uidnext > 1 {
                    from_cluster.insert_range(1, r.uidnext - 1);
                }
                self.marks.mailboxes.insert(
                    key.name.to_string(),
                    MailboxMarks {
                        cluster_uidvalidity: c.uidvalidity,
                        pulled: c.highest_modseq,
                        replica_uidvalidity: r.uidvalidity,
                        pushed: r.highest_modseq,
                        // Equal copies: every binding of the replica's is the cluster's.
                        from_cluster,
                    },
                );
                continue;
            }
            work.push((key, r.cloned(), c.cloned()));
        }
        let wanted_work = self.fetch_wanted(&cluster);
        let texts = std::mem::take(&mut self.texts_wanted);
        let texts_work = self.fetch_text_parts(texts.into_iter().filter(|(m, _)| cluster.contains_key(m)));
        if work.is_empty() && !wanted_work && !texts_work {
            self.report.converged = true;
            self.phase = Phase::Done;
            return;
        }
        if self.report.rounds > self.rounds_max {
            self.report.converged = false;
            self.phase = Phase::Done;
            return;
        }
        self.phase = Phase::Syncing;
        let previous = std::mem::take(&mut self.synced_last_round);
        let unresolved = std::mem::take(&mut self.unresolved_last_round);
        for (key, replica_summary, cluster_summary) in work {
            self.report.mailboxes_synced += 1;
            let marks = self.marks.mailboxes.get(&*key.name).cloned();
            // Synced last round, unequal now, and neither side changed since: a delta
            // cannot mend it, a whole state does. A side that changed since (a
            // collection of tombstones, a new message) brings its delta.
            let unchanged = |m: &MailboxMarks| {
                replica_summary.as_ref().is_none_or(|r| r.highest_modseq <= m.pushed)
                    && cluster_summary.as_ref().is_none_or(|c| c.highest_modseq <= m.pulled)
            };
            let whole =
                marks.as_ref().is_none_or(|m| previous.contains(&key) && (unchanged(m) || unresolved.contains(&key)));
            self.synced_last_round.insert(key.clone());
            // Only for the incarnation of the mailbox the replica holds.
            let from_cluster = marks
                .as_ref()
                .filter(|m| Some(m.replica_uidvalidity) == replica_summary.as_ref().map(|r| r.uidvalidity))
                .map(|m| m.from_cluster.clone())
                .unwrap_or_default();
            self.mailboxes.insert(key.clone(), Progress { whole, from_cluster, windowed, ..Progress::default() });
            let marks = marks.as_ref();
            match replica_summary {
                Some(r) => {
                    let since = marks.filter(|m| !whole && m.replica_uidvalidity == r.uidvalidity).map(|m| m.pushed);
                    self.request(
                        Side::Replica,
                        ClientRequest::ReplicaPull { mailbox: key.clone(), since, partial: None },
                        Awaited::PullReplica(key),
                    );
                }
                // Nothing to push: the cluster's copy comes down.
                None => self.pull_cluster(&key, cluster_summary.as_ref()),
            }
        }
    }

    fn pull_cluster(&mut self, key: &MailboxKey, cluster_summary: Option<&Summary>) {
        let whole = self.mailboxes.get(key).is_none_or(|p| p.whole);
        let marks = self.marks.mailboxes.get(&*key.name);
        let since = marks
            .filter(|m| !whole && cluster_summary.is_none_or(|c| c.uidvalidity == m.cluster_uidvalidity))
            .map(|m| m.pulled);
        let partial = self.partial.clone();
        self.request(
            Side::Cluster,
            ClientRequest::ReplicaPull { mailbox: key.clone(), since, partial },
            Awaited::PullCluster(key.clone()),
        );
    }

    /// Asks the cluster for the omitted bodies the replica's clients want, a request per
    /// mailbox the cluster has. Whether any was asked for.
    fn fetch_wanted(&mut self, cluster: &BTreeMap<MailboxKey, Summary>) -> bool {
        let mut by_mailbox: BTreeMap<MailboxKey, Vec<Guid>> = BTreeMap::new();
        for (mailbox, guid) in std::mem::take(&mut self.wanted) {
            if cluster.contains_key(&mailbox) {
                by_mailbox.entry(mailbox).or_default().push(guid);
            }
        }
        let asked = !by_mailbox.is_empty();
        for (mailbox, mut guids) in by_mailbox {
            guids.truncate(crate::server::replica_serving::REPLICA_BODIES_MAX);
            self.request(
                Side::Cluster,
                ClientRequest::ReplicaBodies { mailbox: mailbox.clone(), guids },
                Awaited::WantedBodies(mailbox),
            );
        }
        asked
    }

    fn on_wanted_bodies(&mut self, mailbox: MailboxKey, reply: ClientReply) {
        let bodies = match reply {
            ClientReply::ReplicaBodies { bodies } => bodies,
            other => {
                self.report.failures.push(format!("{mailbox}: the cluster could not read wanted bodies: {other:?}"));
                return;
            }
        };
        // None: expunged on the cluster since (the next sync takes the message away).
        self.report.body_bytes_pulled += bytes_of(&bodies);
        if !bodies.is_empty() {
            let request = ClientRequest::ReplicaKeepBodies { mailbox: mailbox.clone(), bodies };
            self.request(Side::Replica, request, Awaited::KeepWanted(mailbox));
        }
    }

    /// Asks the cluster for text parts the replica lacks (of mailboxes the cluster has),
    /// none twice in one sync. Whether any was asked for.
    fn fetch_text_parts(&mut self, wanted: impl Iterator<Item = (MailboxKey, Guid)>) -> bool {
        let mut by_mailbox: BTreeMap<MailboxKey, Vec<Guid>> = BTreeMap::new();
        for (mailbox, guid) in wanted {
            if self.texts_asked.insert(guid) {
                by_mailbox.entry(mailbox).or_default().push(guid);
            }
        }
        let asked = !by_mailbox.is_empty();
        for (mailbox, guids) in by_mailbox {
            for chunk in guids.chunks(TEXT_PARTS_PER_REQUEST) {
                let request = ClientRequest::ReplicaTextParts { mailbox: mailbox.clone(), guids: chunk.to_vec() };
                self.request(Side::Cluster, request, Awaited::TextParts(mailbox.clone()));
            }
        }
        asked
    }

    fn on_text_parts(&mut self, mailbox: MailboxKey, reply: ClientReply) {
        let parts = match reply {
            ClientReply::ReplicaTextParts { parts } => parts,
            other => {
                self.report.failures.push(format!("{mailbox}: the cluster could not read text parts: {other:?}"));
                return;
            }
        };
        // None: gone from the cluster since, or its body is not on the server asked.
        self.report.text_part_bytes_pulled += bytes_of(&parts);
        if !parts.is_empty() {
            let request = ClientRequest::ReplicaKeepTextParts { mailbox: mailbox.clone(), parts };
            self.request(Side::Replica, request, Awaited::KeepTextParts(mailbox));
        }
    }

    fn on_text_parts_kept(&mut self, mailbox: MailboxKey, reply: ClientReply) {
        match reply {
            ClientReply::BodiesKept { kept } => self.report.text_parts_pulled += u64::from(kept),
            other => self.report.failures.push(format!("{mailbox}: the replica did not keep text parts: {other:?}")),
        }
    }

    fn on_kept(&mut self, mailbox: MailboxKey, reply: ClientReply) {
        match reply {
            ClientReply::BodiesKept { kept } => self.report.bodies_on_demand += u64::from(kept),
            other => {
                self.report.failures.push(format!("{mailbox}: the replica did not keep the wanted bodies: {other:?}"))
            }
        }
    }

    fn on_replica_state(&mut self, mailbox: MailboxKey, reply: ClientReply) {
        let (state, summary, own_bodies) = match reply {
            ClientReply::ReplicaState { state, summary, own_bodies } => (state, summary, own_bodies),
            other => return self.fail(&mailbox, format!("the replica could not be read: {other:?}")),
        };
        let Some(p) = self.mailboxes.get_mut(&mailbox) else { return };
        if summary.is_none() {
            // Gone from the replica since the listing: nothing to push.
            self.pull_cluster(&mailbox, None);
            return;
        }
        p.pushed_upto = state.highest_modseq;
        p.own_bodies = own_bodies.into_iter().collect();
        self.report.records_pushed += (state.messages.len() + state.tombstones.len()) as u64;
        for piece in 0..p.start_pieces(*state) {
            let bodies = self.mailboxes.get_mut(&mailbox).map(|p| p.own_bodies_of(piece)).unwrap_or_default();
            self.push_piece(&mailbox, piece, bodies);
        }
    }

    fn push_piece(&mut self, mailbox: &MailboxKey, piece: usize, bodies: Vec<(Guid, Body)>) {
        let Some(p) = self.mailboxes.get(mailbox) else { return };
        let Some(state) = p.pieces.get(piece).cloned() else { return };
        let from_cluster = p.cluster_held_ranges();
        self.report.bodies_pushed += bodies.len() as u64;
        self.report.body_bytes_pushed += bytes_of(&bodies);
        self.request(
            Side::Cluster,
            ClientRequest::ReplicaPush { state, bodies, from_cluster },
            Awaited::Push { mailbox: mailbox.clone(), piece },
        );
    }

    fn adopt_piece(&mut self, mailbox: &MailboxKey, piece: usize, bodies: Vec<(Guid, Body)>) {
        let Some(p) = self.mailboxes.get(mailbox) else { return };
        let Some(state) = p.pieces.get(piece).cloned() else { return };
        let (pushed_upto, from_cluster) = (p.pushed_upto, p.cluster_held_ranges());
        self.report.bodies_pulled += bodies.len() as u64;
        self.report.body_bytes_pulled += bytes_of(&bodies);
        self.request(
            Side::Replica,
            ClientRequest::ReplicaAdopt { state, bodies, pushed_upto, from_cluster },
            Awaited::Adopt { mailbox: mailbox.clone(), piece },
        );
    }

    /// A push or an adopt answered `missing`: the bodies come from the other side.
    fn fetch_bodies(&mut self, mailbox: &MailboxKey, piece: usize, missing: Vec<Guid>, for_push: bool) {
        let Some(p) = self.mailboxes.get_mut(mailbox) else { return };
        p.body_rounds += 1;
        if p.body_rounds > BODY_ROUNDS_MAX {
            return self.fail(mailbox, "bodies keep going missing".into());
        }
        let (side, awaited) = if for_push {
            (Side::Replica, Awaited::BodiesForPush { mailbox: mailbox.clone(), piece })
        } else {
            (Side::Cluster, Awaited::BodiesForAdopt { mailbox: mailbox.clone(), piece })
        };
        self.request(side, ClientRequest::ReplicaBodies { mailbox: mailbox.clone(), guids: missing }, awaited);
    }

    fn on_bodies(&mut self, mailbox: MailboxKey, piece: usize, reply: ClientReply, for_push: bool) {
        let bodies = match reply {
            ClientReply::ReplicaBodies { bodies } => bodies,
            other => return self.fail(&mailbox, format!("bodies could not be read: {other:?}")),
        };
        if bodies.is_empty() {
            let from = if for_push { "replica" } else { "cluster" };
            return self.fail(&mailbox, format!("the {from} does not have the bodies the other side lacks"));
        }
        if for_push { self.push_piece(&mailbox, piece, bodies) } else { self.adopt_piece(&mailbox, piece, bodies) }
    }

    fn on_pushed(&mut self, mailbox: MailboxKey, piece: usize, reply: ClientReply) {
        match reply {
            ClientReply::Write(WriteResult::Merged { missing, .. }) if !missing.is_empty() => {
                self.fetch_bodies(&mailbox, piece, missing, true)
            }
            ClientReply::Write(WriteResult::Merged { .. }) => {
                let Some(p) = self.mailboxes.get_mut(&mailbox) else { return };
                if let Some(pushed) = p.pieces.get(piece) {
                    // The cluster holds these bindings now (or retired them for a move).
                    // Kept in the marks at once, not only when this round's adopt ends: a
                    // round cut off after the push would leave the next one pushing the
                    // same copies as never seen, and a binding the cluster expunged and
                    // collected meanwhile would come back at a new UID (`explore --focus
                    // laptop` seed 68044).
                    let uidvalidity = pushed.uidvalidity;
                    let fresh = || MailboxMarks { replica_uidvalidity: uidvalidity, ..MailboxMarks::default() };
                    let marks = self.marks.mailboxes.entry(mailbox.name.to_string()).or_insert_with(fresh);
                    if marks.replica_uidvalidity != uidvalidity {
                        *marks = fresh();
                    }
                    for uid in pushed.messages.iter().map(|r| r.uid).filter(|uid| *uid > 0) {
                        p.from_cluster.insert_range(uid, uid);
                        marks.from_cluster.insert_range(uid, uid);
                    }
                }
                p.pieces_left = p.pieces_left.saturating_sub(1);
                if p.pieces_left == 0 && !p.failed {
                    let summary =
                        self.lists.get(&Side::Cluster).and_then(|l| l.iter().find(|s| s.mailbox == mailbox)).cloned();
                    self.pull_cluster(&mailbox, summary.as_ref());
                }
            }
            other => self.fail(&mailbox, format!("the cluster refused the push: {other:?}")),
        }
    }

    fn on_cluster_state(&mut self, mailbox: MailboxKey, reply: ClientReply) {
        let (state, summary) = match reply {
            ClientReply::ReplicaState { state, summary, .. } => (state, summary),
            other => return self.fail(&mailbox, format!("the cluster could not be read: {other:?}")),
        };
        let Some(p) = self.mailboxes.get_mut(&mailbox) else { return };
        if summary.is_none() {
            // Neither side has it any more.
            p.pieces_left = 0;
            return;
        }
        p.cluster_uidvalidity = state.uidvalidity;
        p.cluster_highest = state.highest_modseq;
        p.cluster_summary = summary;
        p.replica_summary = None;
        p.new_pushed = None;
        p.took_all = true;
        self.report.records_pulled += (state.messages.len() + state.tombstones.len()) as u64;
        for piece in 0..p.start_pieces(*state) {
            self.adopt_piece(&mailbox, piece, Vec::new());
        }
    }

    fn on_adopted(&mut self, mailbox: MailboxKey, piece: usize, reply: ClientReply) {
        match reply {
            ClientReply::ReplicaAdopted { missing, .. } if !missing.is_empty() => {
                self.fetch_bodies(&mailbox, piece, missing, false)
            }
            ClientReply::ReplicaAdopted { pushed_upto, held, summary, texts_wanted, .. } => {
                // The text parts of what came without its body, in this round.
                self.fetch_text_parts(texts_wanted.into_iter().map(|g| (mailbox.clone(), g)));
                let Some(p) = self.mailboxes.get_mut(&mailbox) else { return };
                // Pieces may be adopted in any order: only a single piece's summary is
                // the copy as the whole pull left it.
                if p.pieces.len() == 1 {
                    p.replica_summary = summary;
                }
                p.new_pushed = Some(p.new_pushed.map_or(pushed_upto, |m| m.min(pushed_upto)));
                // A push mark of 0 is the replica's word that a conflict was left over.
                p.took_all &= pushed_upto != 0;
                for (first, last) in held {
                    p.from_cluster.insert_range(first, last);
                }
                p.pieces_left = p.pieces_left.saturating_sub(1);
                if p.pieces_left == 0 && !p.failed && !p.took_all {
                    self.unresolved_last_round.insert(mailbox.clone());
                }
                let Some(p) = self.mailboxes.get_mut(&mailbox) else { return };
                if p.pieces_left == 0 && !p.failed {
                    // What was not all taken is pulled again from where the last
                    // complete adopt left off.
                    let before = self.marks.mailboxes.get(&*mailbox.name);
                    let pulled = match before {
                        _ if p.took_all => p.cluster_highest,
                        Some(m) if m.cluster_uidvalidity == p.cluster_uidvalidity => m.pulled.min(p.cluster_highest),
                        _ => 0,
                    };
                    let marks = MailboxMarks {
                        cluster_uidvalidity: p.cluster_uidvalidity,
                        pulled,
                        // The replica takes the cluster's UIDVALIDITY when it adopts. One
                        // that kept its own (it wins) answered a push mark of 0, so the
                        // next round pushes it whole, and these marks, of another
                        // incarnation than it holds, give that round no ranges.
                        replica_uidvalidity: p.cluster_uidvalidity,
                        pushed: p.new_pushed.unwrap_or(0),
                        from_cluster: p.from_cluster.clone(),
                    };
                    self.marks.mailboxes.insert(mailbox.name.to_string(), marks);
                    if let Some((r, c)) = p.agreed() {
                        // In step, as a listing would have found them: every binding the
                        // replica holds is one the cluster holds.
                        let mut from_cluster = p.from_cluster.clone();
                        if r.uidnext > 1 {
                            from_cluster.insert_range(1, r.uidnext - 1);
                        }
                        let marks = MailboxMarks {
                            cluster_uidvalidity: c.uidvalidity,
                            pulled: c.highest_modseq,
                            replica_uidvalidity: r.uidvalidity,
                            pushed: r.highest_modseq,
                            from_cluster,
                        };
                        self.marks.mailboxes.insert(mailbox.name.to_string(), marks);
                    }
                }
            }
            other => self.fail(&mailbox, format!("the replica refused the cluster's copy: {other:?}")),
        }
    }

    fn end_round_if_done(&mut self) {
        if self.phase != Phase::Syncing || !self.waiting.is_empty() {
            return;
        }
        // Every mailbox's requests are answered. When each one's adopt left the two copies
        // alike, the sync is done: a look again would cost a round trip to find that.
        if self.mailboxes.values().all(|p| p.agreed().is_some()) {
            self.report.converged = true;
            self.phase = Phase::Done;
            return;
        }
        self.start_round();
    }
}
