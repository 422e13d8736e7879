//! The oracle: DESIGN.md's invariants, checked against what clients were told and what
//! servers hold. Safety is checked as the run goes (every write a server makes, every
//! answer a client gets); liveness and "nothing acked is lost" at quiescence.

use std::collections::{BTreeMap, BTreeSet};
use tandem_core::*;

pub const NO_ACKED_LOSS: &str = "no_acked_loss";
pub const UIDS_NEVER_REUSED: &str = "uids_never_reused";
pub const MONOTONIC: &str = "monotonic";
pub const FLAGS_AGREE: &str = "flags_agree";
pub const CONVERGENCE: &str = "convergence";
/// A delivery retried while every server was up, connected and agreeing is stored once
/// at the end (its first attempt, if stored, was found and answered with).
pub const RETRIES_STORED_ONCE: &str = "retries_stored_once";
pub const NO_RESURRECTION: &str = "no_resurrection";

/// COPY request times kept per (mailbox, message) at most (`Oracle::copy_request_times`);
/// past it, any COPY excuses the message.
const COPY_TIMES_MAX: usize = 32;
pub const READ_YOUR_WRITES: &str = "read_your_writes";
/// A run whose only faults were crashes and restarts of servers that had handed every
/// change on (their replication logs empty when they went down), with no start-up hold
/// running out, renumbers nothing: a restart is a normal condition.
pub const RESTARTS_RENUMBER_NOTHING: &str = "restarts_renumber_nothing";
/// A partial user replica never causes the expunge of mail it did not hold (issue 17):
/// what it leaves out is not what it deleted.
pub const PARTIAL_HOLDS_ITS_OWN: &str = "partial_holds_its_own";
pub const INVARIANTS: [&str; 10] = [
    NO_ACKED_LOSS,
    UIDS_NEVER_REUSED,
    MONOTONIC,
    FLAGS_AGREE,
    CONVERGENCE,
    NO_RESURRECTION,
    READ_YOUR_WRITES,
    RETRIES_STORED_ONCE,
    RESTARTS_RENUMBER_NOTHING,
    PARTIAL_HOLDS_ITS_OWN,
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub time_us: u64,
    pub detail: String,
}

/// Whether UIDNEXT or HIGHESTMODSEQ went down under the same UIDVALIDITY.
fn went_down(before: (u32, Uid, ModSeq), now: (u32, Uid, ModSeq)) -> bool {
    before.0 == now.0 && (now.1 < before.1 || now.2 < before.2)
}

/// Each message's flags on one server.
/// One store's records by (mailbox, GUID) (the highest UID's, for a message live twice),
/// whose set flags are compared across stores.
type FlagView<'a> = BTreeMap<(&'a MailboxKey, Guid), &'a MessageRecord>;

/// The flags set on a record, in order, without collecting them.
fn set_flags(r: &MessageRecord) -> impl Iterator<Item = &Flag> {
    r.flags.iter().filter(|(_, s)| s.present).map(|(f, _)| f)
}

/// Whether `server` holds the body of `guid` intact: listed in its image, with bytes
/// that match the checksum (a body keeps its checksum once computed, so the same stored
/// bytes are hashed once however often they are checked).
pub fn body_intact(guid: Guid, server: &Server) -> bool {
    let Some(stored) = server.image().bodies.get(&guid) else { return false };
    server.stored_body(guid).is_some_and(|bytes| bytes.checksum() == stored.checksum)
}

/// For one store: each mailbox's messages by GUID (the lowest UID's record).
fn records_by_guid(image: &DiskImage) -> BTreeMap<&MailboxKey, BTreeMap<Guid, &MessageRecord>> {
    image
        .mailboxes
        .iter()
        .map(|(k, m)| {
            let mut by_guid = BTreeMap::new();
            for r in m.messages.values() {
                by_guid.entry(r.guid).or_insert(r);
            }
            (k, by_guid)
        })
        .collect()
}

/// Key of a UID as clients see it.
type UidKey = (MailboxKey, u32, Uid);

/// In one mailbox: the GUID shown on each (UIDVALIDITY, UID).
type Bindings = BTreeMap<(u32, Uid), Guid>;

/// In one mailbox: every GUID shown on each (UIDVALIDITY, UID).
type AnyBindings = BTreeMap<(u32, Uid), BTreeSet<Guid>>;

#[derive(Clone, Debug, Default)]
pub struct Oracle {
    /// User replicas (laptops): a save they acknowledge reaches the cluster only at their
    /// next sync, and what they show is their own copy, so read-your-writes (a cluster's
    /// promise) neither counts their acknowledgements nor checks their reads.
    apart: BTreeSet<Sid>,
    /// What each server has shown each UID bound to, by server, mailbox and
    /// (UIDVALIDITY, UID).
    shown: BTreeMap<Sid, BTreeMap<MailboxKey, Bindings>>,
    /// Every GUID any server has shown on a UID, by mailbox and (UIDVALIDITY, UID).
    shown_any: BTreeMap<MailboxKey, AnyBindings>,
    /// First UID a client saw for each message, by mailbox and GUID.
    first_uid: BTreeMap<MailboxKey, BTreeMap<Guid, Uid>>,
    /// SAVE/COPY answered OK.
    pub acked: BTreeMap<(MailboxKey, Guid), (Sid, u64)>,
    /// EXPUNGE answered OK, by message and the UID it was expunged at: the servers that
    /// answered it. By UID, as a message copied back after an EXPUNGE and expunged again
    /// has two bindings whose EXPUNGEs stand or fall apart (focus incarnation seed 424426:
    /// the second one answered by a server alone and lost with its disk).
    pub expunged: BTreeMap<(MailboxKey, Guid), BTreeMap<Uid, BTreeSet<Sid>>>,
    /// By message: when the last EXPUNGE of it that was answered OK was asked for. A COPY
    /// asked for later may place it again (see `copy_excuses`); an EXPUNGE that failed or
    /// was never answered does not move this (focus edit seed 609711: a failed EXPUNGE
    /// after a COPY back made the copy look expunged).
    acked_expunge_requested_us: BTreeMap<(MailboxKey, Guid), u64>,
    /// By message and UID: the servers on whose disk a client's EXPUNGE of it was durable
    /// at some point (a tombstone that says so flushed there). A server that answered an
    /// EXPUNGE by asking the master need not be one (async mode, its log overflowed: focus
    /// conflict seed 1018).
    expunge_holders: BTreeMap<(MailboxKey, Guid), BTreeMap<Uid, BTreeSet<Sid>>>,
    /// Servers whose disks were lost for good (see `forget_server`).
    lost_servers: BTreeSet<Sid>,
    /// Every message an EXPUNGE was asked for, answered or not: when they were asked for
    /// and answered (see `ExpungeTimes`). By message, then mailbox (a write's look-up
    /// compares GUIDs first, which is cheap).
    expunge_times: BTreeMap<Guid, BTreeMap<MailboxKey, ExpungeTimes>>,
    /// Where a message a client asked to expunge was placed again (at a UID no EXPUNGE
    /// named), and whether the server that placed it knew of the expunge then (its copy
    /// of the mailbox held a tombstone of the message, or had retired a UID the expunge
    /// named): by binding, the first placement's verdict.
    placed_after_expunge: BTreeMap<(MailboxKey, Uid, Guid), bool>,
    /// A SAVE or COPY answered OK with a binding placed by a server that knew of the
    /// message's expunge, asked for after every EXPUNGE of the message asked for before
    /// it had been answered (a message moved to Trash and moved back once the expunge was
    /// done and collected): owed again, unless an EXPUNGE asked for later took it. A copy
    /// made where the expunge was not known yet (the other side of a partition) may be
    /// taken by it at the heal, as the design says. By message: who answered, when, and
    /// when it was asked for.
    acked_after_expunge: BTreeMap<(MailboxKey, Guid), (Sid, u64, u64)>,
    /// Mailboxes a client asked to DELETE.
    pub deleted_mailboxes: BTreeSet<MailboxKey>,
    /// RENAMEs asked for: from each mailbox to where its messages may have gone.
    pub renamed: BTreeMap<MailboxKey, BTreeSet<MailboxKey>>,
    /// Every (mailbox, message) a COPY (or RENAME) was asked for, and when, the first
    /// [`COPY_TIMES_MAX`]: each may have made one binding. One asked
    /// for before the message's last EXPUNGE there, whose binding that EXPUNGE took, does
    /// not bring it back (see `copy_excuses`).
    copy_request_times: BTreeMap<(MailboxKey, Guid), Vec<u64>>,
    /// The simulated time, set by the world before each step.
    pub now_us: u64,
    /// RENAMEs asked for and not answered yet, by request: (old name, new name). A RENAME
    /// runs at its master whenever it gets there, and takes along what was copied or
    /// moved into the old name meanwhile (focus import seed 304901: a message MOVEd into
    /// Imported while a RENAME of Imported to Archive waited out a restart's hold).
    pending_renames: BTreeMap<u64, (MailboxKey, MailboxKey)>,
    /// COPYs and MOVEs asked for and not answered yet, by request: (target, GUID). One
    /// may run at the master after a RENAME of its target asked for later (both held by
    /// a restart's hold, then forwarded together: focus import seed 315925).
    pending_copies: BTreeMap<u64, (MailboxKey, Guid)>,
    /// Last UIDVALIDITY/UIDNEXT/HIGHESTMODSEQ a client saw per server and mailbox.
    views: BTreeMap<(Sid, MailboxKey), (u32, Uid, ModSeq)>,
    /// Last UIDNEXT/HIGHESTMODSEQ written by each server incarnation.
    written_meta: BTreeMap<(Sid, u64, MailboxKey), (u32, Uid, ModSeq)>,
    pub violations: Vec<Violation>,
    /// Per message and flag: asked to be added / removed by any STORE, and added /
    /// removed by an acknowledged STORE.
    flag_requests: BTreeMap<(MailboxKey, Guid, Flag), FlagHistory>,
    /// Flags a SAVE asked for.
    saved_with: BTreeSet<(MailboxKey, Guid, Flag)>,
    /// Every UID binding a SAVE/COPY answer showed.
    acked_bindings: BTreeSet<(UidKey, Guid)>,
}

/// The EXPUNGEs of one message: when the last was asked for, how many are unanswered
/// (one whose answer never came may still take effect), when the last answer came, and
/// the UIDs they named.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ExpungeTimes {
    last_requested_us: u64,
    unanswered: u32,
    last_answered_us: u64,
    uids: BTreeSet<Uid>,
}

#[derive(Clone, Copy, Debug, Default)]
struct FlagHistory {
    add_requested: bool,
    remove_requested: bool,
    add_acked: bool,
    remove_acked: bool,
}

impl Oracle {
    /// What the oracle knows that decides its later verdicts, without when it learned
    /// it (a model checker's state key: two runs that reached the same knowledge at
    /// other times are one state).
    pub fn describe_timeless(&self, into: &mut impl std::fmt::Write) -> std::fmt::Result {
        let acked: Vec<(&(MailboxKey, Guid), Sid)> = self.acked.iter().map(|(k, (sid, _))| (k, *sid)).collect();
        let expunged: BTreeSet<&(MailboxKey, Guid)> = self.expunged.keys().collect();
        let expunge_requested: BTreeSet<(&MailboxKey, &Guid)> =
            self.expunge_times.iter().flat_map(|(g, by_mailbox)| by_mailbox.keys().map(move |k| (k, g))).collect();
        write!(
            into,
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}",
            self.shown,
            self.shown_any,
            self.first_uid,
            acked,
            expunged,
            expunge_requested,
            self.deleted_mailboxes,
            self.renamed,
            self.copy_request_times.keys().collect::<Vec<_>>(),
            self.pending_renames,
            self.pending_copies,
            self.views,
            self.written_meta,
            self.flag_requests,
            self.saved_with,
            self.acked_bindings,
            self.expunge_holders,
            self.violations.len()
        )?;
        let owed_again: Vec<(&(MailboxKey, Guid), Sid)> =
            self.acked_after_expunge.iter().map(|(k, (sid, _, _))| (k, *sid)).collect();
        let unanswered: Vec<(&Guid, &MailboxKey, u32)> = self
            .expunge_times
            .iter()
            .flat_map(|(g, by_mailbox)| by_mailbox.iter().map(move |(k, t)| (g, k, t.unanswered)))
            .collect();
        write!(into, "|{owed_again:?}|{unanswered:?}|{:?}", self.copy_excuses_timeless())
    }

    pub fn violate(&mut self, invariant: &'static str, time_us: u64, detail: String) {
        if self.violations.len() < 100 {
            self.violations.push(Violation { invariant, time_us, detail });
        }
    }

    /// A client was shown `uid` bound to `guid` by `server`.
    pub fn shown(&mut self, time_us: u64, server: Sid, mailbox: &MailboxKey, uidvalidity: u32, uid: Uid, guid: Guid) {
        self.shown_all(time_us, server, mailbox, uidvalidity, [(uid, guid)]);
    }

    /// `shown` for several bindings of one mailbox, in order.
    fn shown_all(
        &mut self,
        time_us: u64,
        server: Sid,
        mailbox: &MailboxKey,
        uidvalidity: u32,
        bindings: impl IntoIterator<Item = (Uid, Guid)>,
    ) {
        let bindings: Vec<(Uid, Guid)> = bindings.into_iter().collect();
        if bindings.is_empty() {
            return;
        }
        let by_server = self.shown.entry(server).or_default();
        if !by_server.contains_key(mailbox) {
            by_server.insert(mailbox.clone(), BTreeMap::new());
        }
        if !self.shown_any.contains_key(mailbox) {
            self.shown_any.insert(mailbox.clone(), BTreeMap::new());
        }
        if !self.first_uid.contains_key(mailbox) {
            self.first_uid.insert(mailbox.clone(), BTreeMap::new());
        }
        let (Some(shown), Some(any), Some(first)) =
            (by_server.get_mut(mailbox), self.shown_any.get_mut(mailbox), self.first_uid.get_mut(mailbox))
        else {
            return;
        };
        // A view lists its messages in UID order, and most were shown before: those are
        // found by one walk beside what was shown, not by a lookup each.
        let in_uid_order = bindings.windows(2).all(|w| w[0].0 < w[1].0);
        let bindings = if in_uid_order && bindings.len() > 1 {
            let mut before = shown.range((uidvalidity, 0)..=(uidvalidity, Uid::MAX)).peekable();
            let mut fresh = Vec::new();
            for (uid, guid) in bindings {
                while before.next_if(|((_, u), _)| *u < uid).is_some() {}
                if before.peek().is_none_or(|((_, u), g)| *u != uid || **g != guid) {
                    fresh.push((uid, guid));
                }
            }
            fresh
        } else {
            bindings
        };
        let mut rebound = Vec::new();
        for (uid, guid) in bindings {
            if shown.get(&(uidvalidity, uid)) == Some(&guid) {
                // Shown so before: `any` and `first` have it already.
                continue;
            }
            if let Some(before) = shown.insert((uidvalidity, uid), guid)
                && before != guid
            {
                rebound.push(format!("{server} showed {mailbox} UID {uid} as {before} and later as {guid}"));
            }
            any.entry((uidvalidity, uid)).or_default().insert(guid);
            first.entry(guid).or_insert(uid);
        }
        for detail in rebound {
            self.violate(UIDS_NEVER_REUSED, time_us, detail);
        }
    }

    /// Messages live at a UID other than one a client was shown them at, in the same
    /// mailbox under the same UIDVALIDITY, whose binding there was retired (not
    /// expunged: a message expunged, or renamed away, and copied back gets a new UID
    /// rightly): renumbered (at most `limit` reported).
    pub fn moved_from_shown_uids(&self, servers: &BTreeMap<Sid, &Server>, limit: usize) -> Vec<String> {
        let mut moved = Vec::new();
        for (mailbox, any) in &self.shown_any {
            let mut shown_at: BTreeMap<(u32, Guid), Vec<Uid>> = BTreeMap::new();
            for ((uidvalidity, uid), guids) in any {
                for guid in guids {
                    shown_at.entry((*uidvalidity, *guid)).or_default().push(*uid);
                }
            }
            for (sid, server) in servers {
                let Some(m) = server.image().mailboxes.get(mailbox) else { continue };
                for r in m.messages.values() {
                    let Some(uids) = shown_at.get(&(m.uidvalidity, r.guid)) else { continue };
                    let retired = |uid: Uid| m.tombstones.get(&(uid, r.guid)).is_some_and(|t| !t.expunged);
                    if let Some(was) = uids.iter().find(|u| **u != r.uid && retired(**u)) {
                        moved.push(format!("{sid}: {} in {mailbox} was shown at UID {was}, is at {}", r.guid, r.uid));
                        if moved.len() >= limit {
                            return moved;
                        }
                    }
                }
            }
        }
        moved
    }

    /// The first UID a client saw for a message.
    pub fn first_uid(&self, mailbox: &MailboxKey, guid: Guid) -> Option<Uid> {
        self.first_uid.get(mailbox).and_then(|m| m.get(&guid)).copied()
    }

    /// A server lost its disk for good: a replacement with its id is a new server, whose
    /// clients start over (its UIDs are whatever the cluster's are; the cluster-wide
    /// check at quiescence still covers every UID the lost server showed).
    ///
    /// What it alone showed (bindings it never got to replicate) dies with it: the
    /// cluster-wide record keeps only what other servers showed or acknowledged.
    pub fn forget_server(&mut self, server: Sid) {
        self.lost_servers.insert(server);
        self.shown.remove(&server);
        self.views.retain(|(s, _), _| *s != server);
        let mut any: BTreeMap<MailboxKey, AnyBindings> = BTreeMap::new();
        for by_mailbox in self.shown.values() {
            for (mailbox, bindings) in by_mailbox {
                let into = any.entry(mailbox.clone()).or_default();
                for (key, guid) in bindings {
                    into.entry(*key).or_default().insert(*guid);
                }
            }
        }
        for ((mailbox, uidvalidity, uid), guid) in &self.acked_bindings {
            any.entry(mailbox.clone()).or_default().entry((*uidvalidity, *uid)).or_default().insert(*guid);
        }
        self.shown_any = any;
    }

    pub fn view(&mut self, time_us: u64, server: Sid, view: &MailboxView) {
        self.shown_all(time_us, server, &view.mailbox, view.uidvalidity, view.messages.iter().map(|m| (m.uid, m.guid)));
        let now = (view.uidvalidity, view.uidnext, view.highest_modseq);
        if let Some(before) = self.views.insert((server, view.mailbox.clone()), now)
            && went_down(before, now)
        {
            self.violate(
                MONOTONIC,
                time_us,
                format!(
                    "{server} showed {} UIDNEXT/HIGHESTMODSEQ {}/{} after {}/{}",
                    view.mailbox, now.1, now.2, before.1, before.2
                ),
            );
        }
    }

    /// A write a server asked its disk for: a shown UID must never be rebound, and
    /// UIDNEXT/HIGHESTMODSEQ never go down within one incarnation.
    pub fn write(&mut self, time_us: u64, server: Sid, incarnation: u64, image: &DiskImage, write: &StoreWrite) {
        match write {
            StoreWrite::PutMessage { mailbox, record } => {
                if let Some(t) = self.expunge_times.get(&record.guid).and_then(|m| m.get(mailbox))
                    && !t.uids.contains(&record.uid)
                {
                    // An expunge's tombstone, not a retirement: a master that renumbered
                    // the message in a UID conflict retired its old binding knowing
                    // nothing of an expunge on the other side of a partition (focus
                    // minority seed 120031).
                    let knew = image.mailboxes.get(mailbox).is_some_and(|m| {
                        m.tombstones.values().any(|tomb| tomb.guid == record.guid && tomb.expunged)
                            || t.uids.iter().any(|uid| m.retired.contains(*uid))
                    });
                    self.placed_after_expunge.entry((mailbox.clone(), record.uid, record.guid)).or_insert(knew);
                }
                let uidvalidity = image.mailboxes.get(mailbox).map(|m| m.uidvalidity).unwrap_or(0);
                if let Some(shown) =
                    self.shown.get(&server).and_then(|m| m.get(mailbox)).and_then(|m| m.get(&(uidvalidity, record.uid)))
                    && *shown != record.guid
                {
                    let shown = *shown;
                    self.violate(
                        UIDS_NEVER_REUSED,
                        time_us,
                        format!(
                            "{server} bound {mailbox} UID {} to {} after showing it as {shown}",
                            record.uid, record.guid
                        ),
                    );
                }
            }
            StoreWrite::MailboxMeta { mailbox, uidvalidity, uidnext, highest_modseq } => {
                let now = (*uidvalidity, *uidnext, *highest_modseq);
                if let Some(before) = self.written_meta.insert((server, incarnation, mailbox.clone()), now)
                    && went_down(before, now)
                {
                    self.violate(
                        MONOTONIC,
                        time_us,
                        format!(
                            "{server} wrote {mailbox} UIDNEXT/HIGHESTMODSEQ {}/{} after {}/{}",
                            now.1, now.2, before.1, before.2
                        ),
                    );
                }
            }
            _ => {}
        }
    }

    /// A SAVE or COPY asked for at `issued_us` was answered OK at `time_us`.
    pub fn saved(
        &mut self,
        time_us: u64,
        server: Sid,
        mailbox: &MailboxKey,
        (uidvalidity, uid, guid): (u32, Uid, Guid),
        issued_us: u64,
    ) {
        if uid != 0 {
            self.shown(time_us, server, mailbox, uidvalidity, uid, guid);
            self.acked_bindings.insert(((mailbox.clone(), uidvalidity, uid), guid));
        }
        let key = (mailbox.clone(), guid);
        let placed_knowingly = self.placed_after_expunge.get(&(mailbox.clone(), uid, guid)) == Some(&true);
        if placed_knowingly
            && let Some(t) = self.expunge_times.get(&guid).and_then(|m| m.get(mailbox))
            && t.unanswered == 0
            && t.last_answered_us < issued_us
            && t.last_requested_us < issued_us
        {
            self.acked_after_expunge.insert(key.clone(), (server, time_us, issued_us));
        }
        self.acked.entry(key).or_insert((server, time_us));
    }

    /// A fresh read that caught up with its master's position (asked at `issued_us`)
    /// shows every message of the mailbox whose SAVE or COPY was acknowledged before
    /// it was asked, after the last fault (`faults_until_us`), unless an EXPUNGE, a
    /// DELETE or a RENAME may have taken it out.
    /// `server` is a user replica (see `apart`).
    pub fn set_apart(&mut self, server: Sid) {
        self.apart.insert(server);
    }

    pub fn fresh_view(&mut self, time_us: u64, server: Sid, view: &MailboxView, issued_us: u64, faults_until_us: u64) {
        if self.apart.contains(&server) {
            return;
        }
        let mailbox = &view.mailbox;
        let renamed = self.renamed.contains_key(mailbox) || self.renamed.values().any(|to| to.contains(mailbox));
        if renamed || self.deleted_mailboxes.contains(mailbox) {
            return;
        }
        let mut shown: Vec<Guid> = view.messages.iter().map(|m| m.guid).collect();
        shown.sort_unstable();
        let range = (mailbox.clone(), Guid(0))..=(mailbox.clone(), Guid(u128::MAX));
        let missing: Vec<(Guid, Sid, u64)> = self
            .acked
            .range(range)
            .filter(|(_, (by, acked_us))| {
                *acked_us < issued_us && *acked_us > faults_until_us && !self.apart.contains(by)
            })
            .filter(|((m, g), _)| shown.binary_search(g).is_err() && !self.expunge_asked(m, *g))
            .map(|((_, g), (by, acked_us))| (*g, *by, *acked_us))
            .collect();
        for (guid, by, acked_us) in missing {
            let detail = format!(
                "{server} read {mailbox} fresh (asked at {:.3} ms) without {guid}, acknowledged by {by} at {:.3} ms",
                issued_us as f64 / 1000.0,
                acked_us as f64 / 1000.0
            );
            self.violate(READ_YOUR_WRITES, time_us, detail);
        }
    }

    /// A fresh STATUS: it counts at least every message acknowledged in the mailbox
    /// before it was asked (and not asked to be expunged), as `fresh_view` shows them.
    pub fn fresh_status(
        &mut self,
        time_us: u64,
        server: Sid,
        status: &MailboxStatus,
        issued_us: u64,
        faults_until_us: u64,
    ) {
        if self.apart.contains(&server) {
            return;
        }
        let mailbox = &status.mailbox;
        let renamed = self.renamed.contains_key(mailbox) || self.renamed.values().any(|to| to.contains(mailbox));
        if renamed || self.deleted_mailboxes.contains(mailbox) {
            return;
        }
        let range = (mailbox.clone(), Guid(0))..=(mailbox.clone(), Guid(u128::MAX));
        let owed = self
            .acked
            .range(range)
            .filter(|(_, (by, acked_us))| {
                *acked_us < issued_us && *acked_us > faults_until_us && !self.apart.contains(by)
            })
            .filter(|((m, g), _)| !self.expunge_asked(m, *g))
            .count();
        if status.messages < owed {
            let detail = format!(
                "{server}'s fresh STATUS of {mailbox} (asked at {:.3} ms) counts {} messages, {owed} were acknowledged",
                issued_us as f64 / 1000.0,
                status.messages
            );
            self.violate(READ_YOUR_WRITES, time_us, detail);
        }
        if status.seen > status.messages || status.deleted > status.messages {
            self.violate(
                READ_YOUR_WRITES,
                time_us,
                format!("{server}'s STATUS of {mailbox} is not a count: {status:?}"),
            );
        }
    }

    /// Each delivery retried when the cluster was whole (mailbox, body checksum) is one
    /// message in its mailbox on every live server: two GUIDs with its bytes there mean a
    /// retry was stored as a second message.
    pub fn retries_stored_once(
        &mut self,
        time_us: u64,
        stores: &BTreeMap<Sid, &Server>,
        retried: &BTreeSet<(MailboxKey, u64)>,
    ) {
        for (sid, server) in stores {
            for (mailbox, checksum) in retried {
                let Some(m) = server.image().mailboxes.get(mailbox) else { continue };
                let guids: BTreeSet<Guid> = m.messages.with_checksum(*checksum).map(|r| r.guid).collect();
                if guids.len() > 1 {
                    let detail =
                        format!("{sid} holds a retried delivery in {mailbox} as {} messages: {guids:?}", guids.len());
                    self.violate(RETRIES_STORED_ONCE, time_us, detail);
                }
            }
        }
    }

    /// Whether any client asked for the message to go from the mailbox: an EXPUNGE of
    /// it, a DELETE or a RENAME of the mailbox.
    pub fn removal_asked(&self, mailbox: &MailboxKey, guid: Guid) -> bool {
        self.expunge_asked(mailbox, guid)
            || self.deleted_mailboxes.contains(mailbox)
            || self.renamed.contains_key(mailbox)
    }

    /// Whether a COPY may rightly have placed the message in the mailbox again after an
    /// acknowledged EXPUNGE of it there: one asked for after the last acknowledged
    /// EXPUNGE was (a message moved to Trash and back), or more asked for before it than
    /// the bindings the acknowledged EXPUNGEs named (each COPY made one binding at most; a laptop's, made offline,
    /// may arrive after the EXPUNGE took the cluster's: focus leave seed 38471). Every
    /// COPY asked for before, each binding taken: the message is gone (a laptop's COPY
    /// whose push answer was lost, pushed again after the collection).
    fn copy_excuses(&self, key: &(MailboxKey, Guid)) -> bool {
        let Some(times) = self.copy_request_times.get(key) else { return false };
        let Some(&expunge_us) = self.acked_expunge_requested_us.get(key) else { return true };
        let acked_uids = self.expunged.get(key).map_or(0, |by_uid| by_uid.len());
        let before = times.iter().filter(|t| **t < expunge_us).count();
        times.len() >= COPY_TIMES_MAX || before < times.len() || before > acked_uids
    }

    /// The part of `copy_excuses`' knowledge that is not a time, by message.
    fn copy_excuses_timeless(&self) -> Vec<(&(MailboxKey, Guid), bool)> {
        self.copy_request_times.keys().map(|k| (k, self.copy_excuses(k))).collect()
    }

    /// Whether an EXPUNGE of the message was asked for, answered or not.
    fn expunge_asked(&self, mailbox: &MailboxKey, guid: Guid) -> bool {
        self.expunge_times.get(&guid).is_some_and(|m| m.contains_key(mailbox))
    }

    pub fn expunge_requested(&mut self, time_us: u64, mailbox: &MailboxKey, messages: &[(Uid, Guid)]) {
        for (uid, g) in messages {
            let t = self.expunge_times.entry(*g).or_default().entry(mailbox.clone()).or_default();
            t.last_requested_us = time_us;
            t.unanswered = t.unanswered.saturating_add(1);
            t.uids.insert(*uid);
        }
    }

    /// An EXPUNGE of these messages was answered (each expunged or not there to expunge).
    pub fn expunge_answered(&mut self, time_us: u64, mailbox: &MailboxKey, guids: &[Guid]) {
        for g in guids {
            if let Some(t) = self.expunge_times.get_mut(g).and_then(|m| m.get_mut(mailbox)) {
                t.unanswered = t.unanswered.saturating_sub(1);
                t.last_answered_us = time_us;
            }
        }
    }

    /// A DELETE of the mailbox was asked for: whatever it held may be expunged, including
    /// messages acknowledged later but ordered before the delete at its master.
    pub fn mailbox_delete_requested(&mut self, mailbox: &MailboxKey) {
        self.deleted_mailboxes.insert(mailbox.clone());
    }

    /// A RENAME of `from` to `to` was asked for: a message acknowledged in `from` may
    /// now be live in `to` instead (or further on, if `to` was renamed too). It brings
    /// `from`'s messages (`moving`: those a running server holds there now) to `to` as a
    /// COPY would: one expunged from `to` before (moved away, the old name deleted) is
    /// there again rightly (focus rename seeds 7971, 23625).
    pub fn rename_requested(&mut self, from: &MailboxKey, to: &MailboxKey, moving: impl IntoIterator<Item = Guid>) {
        self.renamed.entry(from.clone()).or_default().insert(to.clone());
        for guid in moving {
            self.copy_requested(to, guid);
            // The message takes its flags along, and with them what was asked of them:
            // a flag removed in the source and added in the target on the far side of a
            // partition is a conflict either way may settle (focus incarnation seeds
            // 31646, 70412), not an acknowledged change lost. Only the asking goes along,
            // which excuses: what was acknowledged in the source is owed there (the
            // RENAME may be refused, or the source live on across a partition).
            let carried: Vec<(Flag, FlagHistory)> = self
                .flag_requests
                .iter()
                .filter(|((m, g, _), _)| m == from && *g == guid)
                .map(|((_, _, f), h)| (f.clone(), *h))
                .collect();
            for (flag, h) in carried {
                let there = self.flag_requests.entry((to.clone(), guid, flag)).or_default();
                there.add_requested |= h.add_requested;
                there.remove_requested |= h.remove_requested;
            }
        }
    }

    /// Client request `id` is a RENAME, not answered yet (see `pending_renames`).
    pub fn rename_pending(&mut self, id: u64, from: &MailboxKey, to: &MailboxKey) {
        self.pending_renames.insert(id, (from.clone(), to.clone()));
        let arriving: Vec<Guid> =
            self.pending_copies.values().filter(|(target, _)| target == from).map(|(_, g)| *g).collect();
        for guid in arriving {
            self.copy_requested(to, guid);
        }
    }

    /// Client request `id` is a COPY (or MOVE) of `guid` into `to`, not answered yet.
    pub fn copy_pending(&mut self, id: u64, to: &MailboxKey, guid: Guid) {
        self.pending_copies.insert(id, (to.clone(), guid));
    }

    /// Client request `id` was answered: a RENAME or COPY it was has run (or never will).
    /// A COPY's (target, GUID asked for).
    pub fn request_answered(&mut self, id: u64) -> Option<(MailboxKey, Guid)> {
        self.pending_renames.remove(&id);
        self.pending_copies.remove(&id)
    }

    /// A COPY asked for as `asked` (target, source GUID) was answered with `guid` placed
    /// in `mailbox`: a GUID derived for a copy back (`Guid::copied_back`) is noted as
    /// copied there too; the asked one was noted when it was asked for.
    pub fn copy_answered(&mut self, mailbox: &MailboxKey, guid: Guid, asked: Option<&(MailboxKey, Guid)>) {
        if asked.is_some_and(|(to, asked)| to == mailbox && *asked == guid) {
            return;
        }
        self.copy_requested(mailbox, guid);
    }

    /// A COPY (or MOVE) of `guid` into `mailbox` was asked for: it may end there, and
    /// wherever a RENAME not answered yet takes `mailbox`'s messages (and on from there).
    pub fn copy_requested(&mut self, mailbox: &MailboxKey, guid: Guid) {
        let mut places = vec![mailbox.clone()];
        while let Some(place) = places.pop() {
            let times = self.copy_request_times.entry((place.clone(), guid)).or_default();
            let first = times.is_empty();
            if times.len() < COPY_TIMES_MAX {
                times.push(self.now_us);
            }
            if !first {
                continue;
            }
            places.extend(self.pending_renames.values().filter(|(from, _)| *from == place).map(|(_, to)| to.clone()));
        }
    }

    /// A write became durable on `server`'s disk: a client's expunge there is noted.
    pub fn durable(&mut self, server: Sid, write: &StoreWrite) {
        if let StoreWrite::PutTombstone { mailbox, tombstone } = write
            && tombstone.expunged
        {
            let holders = self.expunge_holders.entry((mailbox.clone(), tombstone.guid)).or_default();
            holders.entry(tombstone.uid).or_default().insert(server);
        }
    }

    /// An EXPUNGE asked for at `requested_us` was answered OK by `server` for these
    /// messages.
    pub fn expunge_acked(&mut self, server: Sid, mailbox: &MailboxKey, messages: &[(Uid, Guid)], requested_us: u64) {
        for (uid, g) in messages {
            let key = (mailbox.clone(), *g);
            let at = self.acked_expunge_requested_us.entry(key.clone()).or_default();
            *at = (*at).max(requested_us);
            self.expunged.entry(key).or_default().entry(*uid).or_default().insert(server);
        }
    }

    pub fn store_requested(&mut self, mailbox: &MailboxKey, guids: &[Guid], add: &[Flag], remove: &[Flag]) {
        self.note_store(mailbox, guids, add, remove, |h| &mut h.add_requested, |h| &mut h.remove_requested);
    }

    pub fn store_acked(&mut self, mailbox: &MailboxKey, guids: &[Guid], add: &[Flag], remove: &[Flag]) {
        self.note_store(mailbox, guids, add, remove, |h| &mut h.add_acked, |h| &mut h.remove_acked);
    }

    /// Marks, per message and flag, the added or removed side of a STORE's history.
    fn note_store(
        &mut self,
        mailbox: &MailboxKey,
        guids: &[Guid],
        add: &[Flag],
        remove: &[Flag],
        added: fn(&mut FlagHistory) -> &mut bool,
        removed: fn(&mut FlagHistory) -> &mut bool,
    ) {
        for g in guids {
            for f in add {
                *added(self.flag_requests.entry((mailbox.clone(), *g, f.clone())).or_default()) = true;
            }
            for f in remove.iter().filter(|f| !add.contains(f)) {
                *removed(self.flag_requests.entry((mailbox.clone(), *g, f.clone())).or_default()) = true;
            }
        }
    }

    pub fn saved_flags(&mut self, mailbox: &MailboxKey, guid: Guid, flags: &[Flag]) {
        for f in flags {
            self.saved_with.insert((mailbox.clone(), guid, f.clone()));
        }
    }

    /// CONDSTORE: a rejected message must have had a modseq above UNCHANGEDSINCE.
    pub fn stored(&mut self, time_us: u64, server: Sid, unchanged_since: Option<ModSeq>, result: &WriteResult) {
        let WriteResult::Stored { rejected, current, .. } = result else { return };
        for uid in rejected {
            let Some(since) = unchanged_since else {
                self.violate(
                    FLAGS_AGREE,
                    time_us,
                    format!("{server} rejected UID {uid} of a STORE without UNCHANGEDSINCE"),
                );
                continue;
            };
            match current.iter().find(|c| c.uid == *uid) {
                Some(c) if c.modseq > since => {}
                _ => self.violate(
                    FLAGS_AGREE,
                    time_us,
                    format!("{server} rejected UID {uid} though its modseq was not above {since}"),
                ),
            }
        }
    }

    /// Checks at quiescence over the live servers' stores.
    /// `unrecoverable`: messages more of whose copies were destroyed by faults than the
    /// durability mode survives (not counted as losses).
    pub fn at_quiescence(
        &mut self,
        time_us: u64,
        servers: &BTreeMap<Sid, &Server>,
        check_loss: bool,
        unrecoverable: &BTreeSet<Guid>,
    ) {
        let stores: BTreeMap<Sid, &DiskImage> = servers.iter().map(|(sid, s)| (*sid, s.image())).collect();
        let stores = &stores;
        let by_guid: BTreeMap<Sid, _> = stores.iter().map(|(sid, image)| (*sid, records_by_guid(image))).collect();
        // Violations found, reported in the order found once the checks are done.
        let mut found: Vec<(&'static str, String)> = Vec::new();
        if check_loss {
            for ((mailbox, guid), (server, at)) in &self.acked {
                // Where it may be: here, or where a rename asked for may have moved it.
                let places = rename_targets(&self.renamed, mailbox);
                let gone_on_purpose = places.iter().any(|place| {
                    self.expunged.contains_key(&(place.clone(), *guid))
                        || self.expunge_asked(place, *guid)
                        || self.deleted_mailboxes.contains(place)
                });
                // Unless it came back after every EXPUNGE of it was done, and none asked
                // for since may have taken it (a MOVE to Trash and back).
                let taken_since = |issued_us: u64| {
                    places.iter().any(|place| {
                        self.deleted_mailboxes.contains(place)
                            || self
                                .expunge_times
                                .get(guid)
                                .and_then(|m| m.get(place))
                                .is_some_and(|t| t.last_requested_us >= issued_us || t.unanswered > 0)
                    })
                };
                let (server, at) = match self.acked_after_expunge.get(&(mailbox.clone(), *guid)) {
                    _ if !gone_on_purpose => (server, at),
                    Some((again_by, again_at, issued_us)) if !taken_since(*issued_us) => (again_by, again_at),
                    _ => continue,
                };
                if unrecoverable.contains(guid) {
                    continue;
                }
                for sid in stores.keys() {
                    let record = places
                        .iter()
                        .find_map(|place| by_guid[sid].get(place).and_then(|m| m.get(guid)).map(|r| (place, r)));
                    let live = record.is_some();
                    // A partial server holds the record only of a large message, or of one
                    // outside its mailboxes or date (a full server must then have the
                    // body: it is checked there).
                    let omitted = record.is_some_and(|(place, r)| servers[sid].omits_body(place, r));
                    let body = omitted || body_intact(*guid, servers[sid]);
                    if !live || !body {
                        found.push((
                            NO_ACKED_LOSS,
                            format!(
                                "message {guid} acked by {server} at {} ms is {} on {sid}",
                                at / 1000,
                                if live { "without an intact body" } else { "missing from " }.to_string()
                                    + &mailbox.to_string()
                            ),
                        ));
                    }
                }
            }
        }
        // An acknowledged EXPUNGE is final: the message is not live again anywhere
        // (unless a COPY brought it back), whatever copy, log entry or collected
        // tombstone a merge met.
        // Where more disks were lost than the mode survives, an EXPUNGE answered only by
        // servers whose disks were then lost may be undone with them, as a SAVE may be
        // lost (async mode: answered once durable there alone); so may one that only
        // lost disks ever held (answered through a server that asked the master, and
        // never replicated before the master's disk was lost). Each binding's EXPUNGE
        // on its own: one undone leaves the message live (at that UID, or renumbered).
        let lost = |servers: &BTreeSet<Sid>| servers.iter().all(|s| self.lost_servers.contains(s));
        let undone_with_lost_disks = |key: &(MailboxKey, Guid)| {
            !check_loss
                && (self.expunged.get(key).is_some_and(|by_uid| by_uid.values().any(lost))
                    || self
                        .expunge_holders
                        .get(key)
                        .is_some_and(|by_uid| by_uid.values().any(|h| !h.is_empty() && lost(h))))
        };
        for (mailbox, guid) in self.expunged.keys().filter(|k| !self.copy_excuses(k) && !undone_with_lost_disks(k)) {
            for sid in stores.keys() {
                if by_guid[sid].get(mailbox).is_some_and(|m| m.contains_key(guid)) {
                    found.push((
                        NO_RESURRECTION,
                        format!("{sid}: {guid} is live in {mailbox} after an acknowledged EXPUNGE"),
                    ));
                }
            }
        }
        // Where more servers lost their disks than the mode survives (`check_loss` off), a
        // binding no running server showed, that no live server has any trace of at its
        // UID (no record of that message there, no tombstone of it, the UID not retired),
        // was shown by servers since lost and died with them: nothing left can know that
        // UID was used (explore-style runs where every disk holding it was lost). The
        // same message placed again in the mailbox at another UID (a later COPY of it)
        // does not make the lost binding known (focus partial seeds 54022, 163926).
        let traced: BTreeSet<(&MailboxKey, u32, Uid, Guid)> = if check_loss {
            BTreeSet::new()
        } else {
            stores
                .values()
                .flat_map(|image| image.mailboxes.iter())
                .flat_map(|(k, m)| {
                    let v = m.uidvalidity;
                    m.messages
                        .values()
                        .map(|r| (r.uid, r.guid))
                        .chain(m.tombstones.keys().copied())
                        .map(move |(uid, g)| (k, v, uid, g))
                })
                .collect()
        };
        let retired_on_live = |mailbox: &MailboxKey, uidvalidity: u32, uid: Uid| {
            stores.values().any(|image| {
                image.mailboxes.get(mailbox).is_some_and(|m| m.uidvalidity == uidvalidity && m.retired.contains(uid))
            })
        };
        let shown_by_running = |mailbox: &MailboxKey, uidvalidity: u32, uid: Uid, g: &Guid| {
            self.shown.values().any(|by| by.get(mailbox).and_then(|b| b.get(&(uidvalidity, uid))) == Some(g))
        };
        let remembered = |mailbox: &MailboxKey, uidvalidity: u32, uid: Uid, g: &Guid| {
            check_loss
                || shown_by_running(mailbox, uidvalidity, uid, g)
                || traced.contains(&(mailbox, uidvalidity, uid, *g))
                || retired_on_live(mailbox, uidvalidity, uid)
        };
        for (sid, image) in stores {
            for (mailbox, m) in &image.mailboxes {
                for r in m.messages.values() {
                    if let Some(guids) = self.shown_any.get(mailbox).and_then(|s| s.get(&(m.uidvalidity, r.uid)))
                        && guids.iter().any(|g| *g != r.guid && remembered(mailbox, m.uidvalidity, r.uid, g))
                    {
                        found.push((
                            UIDS_NEVER_REUSED,
                            format!(
                                "{sid} ends with {mailbox} UID {} bound to {} though clients saw it as {:?}",
                                r.uid, r.guid, guids
                            ),
                        ));
                    }
                }
            }
        }
        // Flag deltas survive every merge: a flag an acknowledged STORE added that no
        // request ever removed is set at the end, and one an acknowledged STORE removed
        // that no request (nor the SAVE) ever added is clear. Whole-flag-set merges fail.
        // What each request's check needs that is the same on every server, found once.
        let checked: Vec<(&MailboxKey, Guid, &Flag, &FlagHistory, bool)> = if check_loss {
            self.flag_requests
                .iter()
                .filter(|((mailbox, guid, _), _)| {
                    // Expunged (or the mailbox deleted or renamed away, explore seed 539095:
                    // RENAME INBOX took the flagged message along) and copied back: the
                    // message there now is a new copy (same GUID) with its source's flags,
                    // not the one the STOREs changed.
                    !(self.removal_asked(mailbox, *guid)
                        && self.copy_request_times.contains_key(&(mailbox.clone(), *guid)))
                })
                .map(|((mailbox, guid, flag), h)| {
                    let saved_with = h.remove_acked
                        && !h.add_requested
                        && self.saved_with.contains(&(mailbox.clone(), *guid, flag.clone()));
                    (mailbox, *guid, flag, h, saved_with)
                })
                .collect()
        } else {
            Vec::new()
        };
        for sid in stores.keys() {
            for (mailbox, guid, flag, h, saved_with) in &checked {
                let Some(r) = by_guid[sid].get(*mailbox).and_then(|m| m.get(guid)) else { continue };
                let present = r.flags.get(*flag).is_some_and(|s| s.present);
                if h.add_acked && !h.remove_requested && !present {
                    let detail = format!(
                        "{sid}: {guid} in {mailbox} lost {flag}, added by an acknowledged STORE and never removed"
                    );
                    found.push((FLAGS_AGREE, detail));
                }
                if h.remove_acked && !h.add_requested && !saved_with && present {
                    let detail = format!(
                        "{sid}: {guid} in {mailbox} has {flag} back, removed by an acknowledged STORE and never added"
                    );
                    found.push((FLAGS_AGREE, detail));
                }
            }
        }
        let flag_views: BTreeMap<Sid, FlagView> = stores
            .iter()
            .map(|(sid, image)| {
                let flags = image
                    .mailboxes
                    .iter()
                    .flat_map(|(k, m)| m.messages.values().map(move |r| ((k, r.guid), r)))
                    .collect();
                (*sid, flags)
            })
            .collect();
        let mut first: Option<(&Sid, &FlagView)> = None;
        for (sid, flags) in &flag_views {
            match first {
                None => first = Some((sid, flags)),
                Some((s0, f0)) => {
                    // Both views are in key order: one walk side by side, not a lookup each.
                    let mut theirs = f0.iter().peekable();
                    for (k, r) in flags {
                        while theirs.next_if(|(k0, _)| *k0 < k).is_some() {}
                        let other = theirs.peek().filter(|(k0, _)| *k0 == k).map(|(_, r0)| **r0);
                        if let Some(other) = other
                            && !set_flags(other).eq(set_flags(r))
                        {
                            let (f, other) = (r.present_flags(), other.present_flags());
                            found.push((
                                FLAGS_AGREE,
                                format!("{} in {} has flags {f:?} on {sid} but {other:?} on {s0}", k.1, k.0),
                            ));
                        }
                    }
                }
            }
        }
        for (invariant, detail) in found {
            self.violate(invariant, time_us, detail);
        }
    }

    pub fn violated(&self, name: &str) -> bool {
        self.violations.iter().any(|v| v.invariant == name)
    }
}

/// Why the live servers do not agree yet, or None when they have converged: the same
/// mailboxes, messages, UIDs, flags and tombstones, the same lifecycles (created,
/// deleted, subscribed, special use), intact bodies, one root, one master per master
/// key.
pub fn divergence(servers: &BTreeMap<Sid, &Server>) -> Option<String> {
    let mut iter = servers.iter();
    let (s0, first) = iter.next()?;
    let img0 = first.image();
    for (sid, server) in servers {
        let image = server.image();
        for (mailbox, m) in &image.mailboxes {
            for r in m.messages.values() {
                let ok = server.omits_body(mailbox, r) || body_intact(r.guid, server);
                if !ok {
                    return Some(format!("{sid} lacks an intact body for {} in {mailbox}", r.guid));
                }
            }
        }
        if server.jobs_in_progress() > 0 {
            return Some(format!("{sid} still has {} requests in progress", server.jobs_in_progress()));
        }
    }
    for (sid, server) in iter {
        let img = server.image();
        let keys0: Vec<&MailboxKey> = img0.mailboxes.keys().collect();
        let keys: Vec<&MailboxKey> = img.mailboxes.keys().collect();
        if keys0 != keys {
            return Some(format!("{s0} has mailboxes {keys0:?} but {sid} has {keys:?}"));
        }
        for (k, m0) in &img0.mailboxes {
            let m = &img.mailboxes[k];
            if m0.uidvalidity != m.uidvalidity || m0.uidnext != m.uidnext || m0.highest_modseq != m.highest_modseq {
                return Some(format!(
                    "{k}: {s0} has UIDVALIDITY/UIDNEXT/HIGHESTMODSEQ {}/{}/{} but {sid} has {}/{}/{}",
                    m0.uidvalidity, m0.uidnext, m0.highest_modseq, m.uidvalidity, m.uidnext, m.highest_modseq
                ));
            }
            // The records only: the indexes kept beside them follow from them.
            if !m0.messages.iter().eq(m.messages.iter()) {
                let first_diff = m0
                    .messages
                    .iter()
                    .find(|(u, r)| m.messages.get(u) != Some(r))
                    .map(|(u, r)| format!("UID {u}: {r:?} vs {:?}", m.messages.get(u)))
                    .or_else(|| {
                        m.messages
                            .iter()
                            .find(|(u, _)| !m0.messages.contains_key(u))
                            .map(|(u, r)| format!("UID {u} only on {sid}: {r:?}"))
                    })
                    .unwrap_or_default();
                return Some(format!(
                    "{k}: messages differ between {s0} ({}) and {sid} ({}); first difference {first_diff}",
                    m0.messages.len(),
                    m.messages.len()
                ));
            }
            if m0.tombstones != m.tombstones {
                return Some(format!("{k}: tombstones differ between {s0} and {sid}"));
            }
            if m0.lifecycle != m.lifecycle {
                return Some(format!("{k}: {s0} has {:?} but {sid} has {:?}", m0.lifecycle, m.lifecycle));
            }
        }
    }
    if let Some((sid, _)) = servers.iter().find(|(_, s)| s.members() != first.members()) {
        return Some(format!("{s0} and {sid} disagree on the membership"));
    }
    let roots: BTreeSet<Option<Sid>> = servers.values().map(|s| s.term().root).collect();
    if roots.len() != 1 || roots.iter().next().copied().flatten().is_none_or(|r| !servers.contains_key(&r)) {
        return Some(format!("servers disagree on the root: {roots:?}"));
    }
    let mut masters: BTreeMap<MasterKey, BTreeSet<Sid>> = BTreeMap::new();
    for (sid, server) in servers {
        for key in server.mastered_ready() {
            masters.entry(key).or_default().insert(*sid);
        }
    }
    // The root's table must name the master; other servers' caches are hints that the
    // next request through them corrects.
    let root = roots.iter().next().copied().flatten();
    if let Some(table) = root.and_then(|r| servers.get(&r)).map(|s| s.root_table()) {
        for (key, set) in &masters {
            if let Some(m) = table.get(key)
                && !set.contains(m)
            {
                return Some(format!("the root records {m} as master of {key} but {set:?} master it"));
            }
        }
    }
    if let Some((key, set)) = masters.iter().find(|(_, s)| s.len() > 1) {
        return Some(format!("{key} has several masters: {set:?}"));
    }
    let granularity = first.config().granularity;
    for k in img0.mailboxes.keys() {
        let key = MasterKey::of(k, granularity);
        if !masters.contains_key(&key) {
            return Some(format!("{key} has no master"));
        }
    }
    None
}

/// `mailbox` and every mailbox a rename asked for may have moved its messages to, each
/// once, in the order found (bounded by the renames asked for).
fn rename_targets(renamed: &BTreeMap<MailboxKey, BTreeSet<MailboxKey>>, mailbox: &MailboxKey) -> Vec<MailboxKey> {
    let mut seen = vec![mailbox.clone()];
    let mut i = 0;
    while i < seen.len() {
        for to in renamed.get(&seen[i]).into_iter().flatten() {
            if !seen.contains(to) {
                seen.push(to.clone());
            }
        }
        i += 1;
    }
    seen
}
