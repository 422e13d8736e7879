//! Replication: per-peer logs of master-ordered changes, acknowledgements after
//! durability, MBOX summaries, SYNC exchanges, FETCH of bodies, and the repair of stores
//! edited behind the protocol's back.

use super::anti_entropy::EXAMINED_PER_PASS_MAX;
use super::timers::Timer;
use super::{CatchupId, JobId, JobKind, JobState, Server};
use crate::io::ExternalEdit;
use crate::mailbox::{self, MergeOutcome};
use crate::marks::Mark;
use crate::msg::*;
use crate::store::StoreWrite;
use crate::types::*;
use std::collections::BTreeSet;

/// Log entries resent to one peer per pass at most.
const RESEND_PER_PASS_MAX: usize = 1024;
/// Copies of mailboxes whose changes a log to their master dropped, sent per pass at
/// most (`Server::sync_overflowed`); the next pass sends more.
const OVERFLOWED_SENT_PER_PASS_MAX: usize = 64;
/// Anti-entropy periods after which a confirmed copy is checked again.
const RECONFIRM_PERIODS: u64 = 10;

/// What an MBOX is (by its tag): a check of our copy, a replica's confirmation of ours,
/// or an answer to a catch-up of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SummaryKind {
    Check,
    Confirmation,
    Catchup(CatchupId),
}

/// Entries an acknowledgement may list before its lists are looked up in sets rather
/// than scanned.
pub(crate) const ACK_LIST_SCAN_MAX: usize = 8;

/// Unanswered asks for a peer's state kept at most (see `Server::ask_state_once`); past
/// it an ask is sent without being noted.
const STATES_ASKED_MAX: usize = 4096;

impl Server {
    /// Append a master-ordered change to every peer's log and send it to the reachable
    /// ones. `waiter` is the job that waits for the peers' acknowledgements.
    /// A change too large for one command goes as several log entries (see
    /// `limits::change_parts`); the waiter counts a peer once it acknowledged them all.
    pub(crate) fn replicate(&mut self, change: Change, waiter: Option<JobId>) {
        self.replicate_parts(change, waiter, false);
    }

    /// [`Server::replicate`] for a change each peer must have before the changes that
    /// follow it (a RENAME's target before its source's removal): a full log makes room
    /// by dropping other mailboxes' entries first, so the change is logged.
    pub(crate) fn replicate_first(&mut self, change: Change, waiter: Option<JobId>) {
        self.replicate_parts(change, waiter, true);
    }

    fn replicate_parts(&mut self, change: Change, waiter: Option<JobId>, spare: bool) {
        for part in crate::limits::change_parts(change) {
            self.replicate_part(part, waiter, spare);
        }
    }

    fn replicate_part(&mut self, change: Change, waiter: Option<JobId>, spare: bool) {
        let mailbox = change.mailbox().clone();
        // The safety net: a change that still cannot be encoded within the peer's limits
        // is never logged (it would wedge the link); the peer gets the mailbox by SYNC.
        let sendable = crate::limits::change_fits(&change);
        debug_assert!(sendable, "a replicated change does not fit a command line");
        for peer in self.peers() {
            self.make_room(peer, &mailbox, spare);
            if !sendable {
                self.marks.hit(Mark::UnsendableChange);
                self.note(|| format!("cannot send a change of {mailbox} to {peer}: marked for SYNC"));
                self.overflow(peer, BTreeSet::from([mailbox.clone()]));
                continue;
            }
            self.log_for(peer, change.clone(), waiter);
        }
    }

    /// Appends a change to `peer`'s log (`waiter` waits for its acknowledgement) and
    /// sends it if the peer is in reach. False when the log took nothing: the peer will
    /// get the mailbox by SYNC.
    fn log_for(&mut self, peer: Sid, change: Change, waiter: Option<JobId>) -> bool {
        let Some(seq) = self.image.log_append(&mut self.out, peer, change.clone()) else { return false };
        if let Some(job) = waiter {
            self.log_progress.wait_for(peer, seq, job);
        }
        if self.routing.is_reachable(peer) {
            self.log_progress.sent(peer, seq, self.now);
            self.send(peer, Msg::Change { seq, change });
        }
        true
    }

    /// A full log drops the mailbox's entries and marks it for SYNC with that peer, and
    /// the largest others' until there is room; with `spare`, the others' first, and the
    /// mailbox's only if they are not enough.
    fn make_room(&mut self, peer: Sid, mailbox: &MailboxKey, spare: bool) {
        let capacity = self.cfg.log_capacity.max(1);
        let Some(log) = self.image.log(peer) else { return };
        if log.entries.len() < capacity {
            return;
        }
        self.marks.hit(Mark::LogOverflow);
        let own = self.image.logged_counts(peer).find(|(k, _)| *k == mailbox).map_or(0, |(_, n)| n as usize);
        let mut victims = if spare { Vec::new() } else { vec![mailbox.clone()] };
        let mut left = log.entries.len() - if spare { 0 } else { own };
        let counts: Vec<(usize, MailboxKey)> = self
            .image
            .logged_counts(peer)
            .filter(|(k, _)| *k != mailbox)
            .map(|(k, n)| (n as usize, k.clone()))
            .collect();
        let mut by_size = counts;
        by_size.sort_by(|a, b| b.cmp(a));
        for (count, key) in by_size {
            if left < capacity {
                break;
            }
            left -= count;
            victims.push(key);
        }
        if spare && left >= capacity {
            victims.push(mailbox.clone());
        }
        self.overflow(peer, victims.into_iter().collect());
    }

    /// Drops the log entries of `victims` for `peer` and marks them for full SYNC.
    pub(crate) fn overflow(&mut self, peer: Sid, victims: BTreeSet<MailboxKey>) {
        if self.image.log(peer).is_none() {
            return;
        }
        let seqs = self.image.log_overflow(&mut self.out, peer, &victims);
        self.log_progress.dropped(peer, &seqs);
        for v in &victims {
            self.anti_entropy.forget_check(peer, v);
        }
    }

    /// Sends each reachable peer's log entries that were never sent or not acknowledged
    /// within the interval, at most `RESEND_PER_PASS_MAX` per peer; a full pass is
    /// followed by another a tick later.
    pub(crate) fn resend_logs(&mut self) {
        let now = self.now;
        let interval = self.cfg.anti_entropy_us;
        let peers: Vec<Sid> = self.routing.reachable_peers();
        for peer in peers {
            let Some(log) = self.image.log(peer) else { continue };
            let due: Vec<(u64, Change)> = log
                .entries
                .iter()
                .filter(|(seq, _)| self.log_progress.send_due(peer, **seq, now, interval))
                .take(RESEND_PER_PASS_MAX)
                .map(|(s, c)| (*s, c.clone()))
                .collect();
            if due.len() == RESEND_PER_PASS_MAX {
                self.timers.set_earliest(Timer::LogResend, now.plus_us(self.cfg.tick_us));
            }
            for (seq, logged) in due {
                let change = self.with_logged_body(peer, seq, logged);
                if !crate::limits::change_fits(&change) {
                    // A change logged before parts existed (or by a broken build) that
                    // the peer would refuse: drop it, the peer gets the mailbox by SYNC.
                    let mailbox = change.mailbox().clone();
                    self.marks.hit(Mark::UnsendableChange);
                    self.note(|| format!("cannot send logged change {seq} of {mailbox} to {peer}: marked for SYNC"));
                    self.overflow(peer, BTreeSet::from([mailbox]));
                    continue;
                }
                self.log_progress.sent(peer, seq, now);
                self.send(peer, Msg::Change { seq, change });
            }
        }
    }

    /// A logged SAVE references its body (the log holds no bytes): the body goes out as
    /// stored now. A body no longer intact here goes as a COPY (the peer fetches the body
    /// elsewhere), whose acknowledgement counts for no copy of the message.
    fn with_logged_body(&mut self, peer: Sid, seq: u64, logged: Change) -> Change {
        let Change::Save { mailbox, uidvalidity, record, .. } = logged else { return logged };
        match self.image.intact_body(record.guid) {
            Some(body) => Change::Save { mailbox, uidvalidity, record, body },
            None => {
                self.log_progress.counts_for_no_copy(peer, seq);
                self.want_body(record.guid, Some(record.checksum), None, true);
                Change::Copy { mailbox, uidvalidity, record }
            }
        }
    }

    pub(crate) fn on_ack(&mut self, src: Sid, seqs: Vec<u64>, refused: Vec<u64>, store: u64) {
        // Most acknowledgements carry one entry: sets only for long lists (a peer's list is
        // bounded by the line, not by us).
        let held: Option<BTreeSet<u64>> = (seqs.len() > ACK_LIST_SCAN_MAX).then(|| seqs.iter().copied().collect());
        let is_held = |seq: &u64| held.as_ref().map_or_else(|| seqs.contains(seq), |h| h.contains(seq));
        let mut all = Vec::with_capacity(seqs.len() + refused.len());
        all.extend_from_slice(&seqs);
        all.extend(refused);
        let removed = self.image.log_remove(&mut self.out, src, all);
        if removed.is_empty() {
            return;
        }
        for seq in &removed {
            if let Some(job) = self.log_progress.acknowledged(src, *seq, is_held(seq)) {
                self.jobs.peer_acked(job, src, store);
            }
        }
        debug_assert!(
            removed.iter().all(|seq| self.image.log(src).is_none_or(|l| !l.entries.contains_key(seq))),
            "an acknowledged entry leaves the log"
        );
        self.progress_jobs();
    }

    /// Acknowledge received changes whose writes are durable.
    pub(crate) fn flush_acks(&mut self) {
        let out = &self.out;
        // After every input: most find nothing to send.
        if !self.log_progress.has_ready_acks(|write| out.is_durable(write)) {
            return;
        }
        let ready = self.log_progress.take_ready_acks(|write| out.is_durable(write));
        let store = self.image.disk().store_id;
        for (peer, (seqs, refused)) in ready {
            self.send(peer, Msg::Ack { seqs, refused, store });
        }
    }

    /// `peer` has the store `store`, which is not the one we knew (`replaced`), or we
    /// knew none. Another store means a lost or replaced disk: the copies the peer
    /// acknowledged with its old store are gone, and the jobs waiting for copies forget
    /// them, and each waiting SAVE or COPY goes to the new store again; acknowledgements
    /// the new store sent before we heard of it count from now on. What anti-entropy
    /// knew of the old store's copies is dropped: the next SYNC with it is full.
    pub(crate) fn peer_store_changed(&mut self, peer: Sid, store: u64, replaced: bool) {
        if replaced {
            // Explore seed 581473: a leaving server synced a mailbox with its master's
            // new, empty store from the point the old store had reached, so sent nothing,
            // and retired holding the only copy of an acknowledged message.
            self.anti_entropy.forget_peer(peer);
        }
        if replaced && !self.has_bug(crate::Bug::CountsAcksOfLostStores) {
            let dropped = self.jobs.forget_copies_of_other_stores(peer, store);
            let count = dropped.len();
            self.note(|| format!("{peer} has a new store {store:016x}: {count} acknowledged copies no longer count"));
            if count > 0 {
                self.marks.hit(Mark::ReplacedStoreAckDropped);
            }
            for job in dropped {
                self.send_copy_again(peer, job);
            }
        }
        self.progress_jobs();
    }

    /// A waiting SAVE or COPY whose copy on `peer` went with its old store: the message
    /// goes to the new store again, body and all, so that its acknowledgement can count
    /// before the job's deadline (anti-entropy would fill the store too, but no job
    /// waits for that).
    fn send_copy_again(&mut self, peer: Sid, job: JobId) {
        let Some(j) = self.jobs.get(job) else { return };
        let (
            JobKind::Write(WriteRequest::Save { mailbox, .. } | WriteRequest::Copy { dst: mailbox, .. }),
            JobState::Replicating {
                result: WriteResult::Saved { uid, guid, .. } | WriteResult::Copied { uid, guid, .. },
                ..
            },
        ) = (&j.kind, &j.state)
        else {
            return;
        };
        let (mailbox, uid, guid) = (mailbox.clone(), *uid, *guid);
        let Some(m) = self.image.mailbox(&mailbox) else { return };
        let Some(record) = m.messages.get(&uid).filter(|r| r.guid == guid).cloned() else { return };
        let uidvalidity = m.uidvalidity;
        let Some(body) = self.image.intact_body(guid) else { return };
        let change = Change::Save { mailbox: mailbox.clone(), uidvalidity, record, body };
        self.make_room(peer, &mailbox, false);
        if self.log_for(peer, change, Some(job)) {
            self.marks.hit(Mark::CopySentAgain);
        }
    }

    /// A change from a peer's log.
    pub(crate) fn on_change(&mut self, src: Sid, seq: u64, change: Change) {
        let message = match &change {
            Change::Save { mailbox, record, .. } | Change::Copy { mailbox, record, .. } => {
                Some((mailbox.clone(), record.guid))
            }
            _ => None,
        };
        // A partial server takes the record of a large message without its body; its
        // acknowledgement counts for no copy of the message (see `omitted_bodies`).
        let (change, body_dropped) = match change {
            Change::Save { mailbox, uidvalidity, record, body } if self.drops_replicated_body(&mailbox, &record) => {
                // What it keeps of the message: its text parts.
                self.keep_text_parts(&record, &body);
                (Change::Copy { mailbox, uidvalidity, record }, true)
            }
            change => (change, false),
        };
        let (fragment, lacks_messages) = self.fragment_of(src, change);
        let out = self.merge_log_piece(src, &fragment);
        let applied = !out.unresolved && !out.needs_senders_state;
        let counts = if lacks_messages {
            // A flag change for a message we do not hold is no copy of it (focus restore
            // seed 600448: a replica that lacked a message acknowledged its \Seen, the
            // master's store was then restored from before the message, and the
            // acknowledged flag was on no server). Our SYNC with the master brings the
            // message; the client may retry meanwhile.
            self.marks.hit(Mark::UnheldChangeRefused);
            false
        } else if body_dropped {
            self.has_bug(crate::Bug::PartialAckCountsAsCopy)
        } else {
            // A message held without its body is no copy either: the bytes that came
            // failed their checksum (the master's own were damaged unseen, explore seed
            // 439077), or none came and ours is missing or known damaged. Its master
            // must not count us; we fetch the body meanwhile.
            message.is_none_or(|(mailbox, guid)| self.holds_body_or_not_live(&mailbox, guid))
        };
        self.log_progress.owe(src, seq, self.out.last_write(), applied && counts);
    }

    /// Whether a message we took from a change is a copy here: live with a body not
    /// known to be damaged (bytes that came with the change were checked on arrival; a
    /// body stored before is not read again for this), or not live at all (expunged
    /// meanwhile: nothing is left to count or to wait for).
    fn holds_body_or_not_live(&self, mailbox: &MailboxKey, guid: Guid) -> bool {
        let live = self.image.mailbox(mailbox).is_some_and(|m| m.messages.has_guid(guid));
        !live || self.image.body_not_known_bad(guid)
    }

    /// The piece of mailbox state a change carries, and whether it names a message we
    /// hold neither live nor expunged. Bodies are stored on the way.
    fn fragment_of(&mut self, src: Sid, change: Change) -> (MailboxState, bool) {
        let empty = MailboxState::empty;
        match change {
            Change::Save { mailbox, uidvalidity, record, body } => {
                self.store_body(record.guid, record.checksum, body, Some(src));
                self.fragment_of(src, Change::Copy { mailbox, uidvalidity, record })
            }
            Change::Copy { mailbox, uidvalidity, record } => {
                let mut f = empty(mailbox, uidvalidity);
                f.uidnext = record.uid.saturating_add(1);
                f.highest_modseq = record.modseq;
                f.messages.push(record);
                (f, false)
            }
            Change::Expunge { mailbox, uidvalidity, tombstones } => {
                let mut f = empty(mailbox, uidvalidity);
                f.uidnext = tombstones.iter().map(|t| t.uid.saturating_add(1)).max().unwrap_or(1);
                f.highest_modseq = tombstones.iter().map(|t| t.modseq).max().unwrap_or(0);
                f.tombstones = tombstones;
                (f, false)
            }
            Change::Store { mailbox, uidvalidity, stamp, messages, add, remove } => {
                let key = self.master_key(&mailbox);
                let is_master = self.masters.masters(&key);
                let mut f = empty(mailbox.clone(), uidvalidity);
                f.highest_modseq = stamp.modseq;
                let local = self.image.mailbox(&mailbox);
                let mut missing = false;
                for (uid, guid) in messages {
                    // The change follows the message if a renumbering moved it meanwhile.
                    let ours = local
                        .and_then(|m| m.messages.get(&uid))
                        .filter(|r| r.guid == guid)
                        .or_else(|| local.and_then(|m| m.messages.find_guid(guid)));
                    let Some(ours) = ours else {
                        let dead = local.is_some_and(|m| m.tombstones.contains_key(&(uid, guid)));
                        missing |= !dead;
                        continue;
                    };
                    let uid = ours.uid;
                    let mut r = ours.clone();
                    r.flags = add
                        .iter()
                        .map(|fl| (fl.clone(), FlagState { present: true, stamp }))
                        .chain(remove.iter().map(|fl| (fl.clone(), FlagState { present: false, stamp })))
                        .collect();
                    r.modseq = r.modseq.max(stamp.modseq);
                    f.uidnext = f.uidnext.max(uid.saturating_add(1));
                    f.messages.push(r);
                }
                if missing && !is_master {
                    // A flag change for a message we do not have: our copy lags.
                    self.anti_entropy.mark_dirty(mailbox);
                }
                (f, missing)
            }
            Change::Merge { state } => (*state, false),
        }
    }

    /// Join a piece of state from `src` into our copy: as master (deciding conflicts and
    /// replicating the outcome) or as a replica (refusing conflicts, asking for SYNC).
    pub(crate) fn merge_foreign(&mut self, src: Sid, state: &MailboxState) -> MergeOutcome {
        self.merge_from_peer(src, state, false)
    }

    /// A peer's piece of state merged in our role for its mailbox; `from_log`: a log
    /// entry's piece (`MergeRules::from_log`), not a copy's state.
    fn merge_from_peer(&mut self, src: Sid, state: &MailboxState, from_log: bool) -> MergeOutcome {
        let key = self.master_key(&state.mailbox);
        let is_master = self.masters.masters(&key);
        let mut rules = self.merge_rules();
        rules.from_master = self.masters.cached(&key) == Some(src);
        rules.from_log = from_log;
        self.merge_state_by(state, is_master, rules, Some(src))
    }

    /// [`Server::merge_foreign`] of a log entry's piece of state (see
    /// `MergeRules::from_log`). A piece a master may not decide alone is answered with
    /// our state as a SYNC request: the sender's state comes back and decides it.
    fn merge_log_piece(&mut self, src: Sid, piece: &MailboxState) -> MergeOutcome {
        let out = self.merge_from_peer(src, piece, true);
        if out.needs_senders_state {
            self.marks.hit(Mark::LogCopySettledBySync);
            let mailbox = &piece.mailbox;
            self.note(|| format!("a copy {src} logged in {mailbox} of a message expunged here: its state decides"));
            // A heal brings a peer's whole log at once: one state asked for settles every
            // copy it logged before it answered (on one path they reach us before the
            // answer; one that came round another way is settled by anti-entropy), so the
            // next copies wait for that answer rather than each asking for it again.
            if self.ask_state_once(src, mailbox) {
                self.send_state(src, mailbox, false);
            }
        }
        out
    }

    /// Whether to ask `peer` for its state of `mailbox` now (and note that we did): not
    /// while an earlier ask is unanswered and younger than a request's deadline.
    fn ask_state_once(&mut self, peer: Sid, mailbox: &MailboxKey) -> bool {
        let key = (peer, mailbox.clone());
        let timeout_us = self.cfg.request_timeout_us;
        if self.states_asked.get(&key).is_some_and(|at| self.now.0.saturating_sub(at.0) < timeout_us) {
            self.marks.hit(Mark::StateAskedAlready);
            return false;
        }
        if self.states_asked.len() < STATES_ASKED_MAX || self.states_asked.contains_key(&key) {
            self.states_asked.insert(key, self.now);
        }
        debug_assert!(self.states_asked.len() <= STATES_ASKED_MAX);
        true
    }

    /// Forgets the asks older than a request's deadline: their answer was lost, and the
    /// next copy asks again (anti-entropy settles the mailbox meanwhile).
    pub(crate) fn expire_states_asked(&mut self) {
        let (now, timeout_us) = (self.now, self.cfg.request_timeout_us);
        self.states_asked.retain(|_, at| now.0.saturating_sub(at.0) < timeout_us);
    }

    /// [`Server::merge_foreign`] in the role and under the rules given: also a user
    /// replica's copy merged by its master (no peer sent it, `src` None), or the
    /// cluster's copy taken by a user replica.
    pub(crate) fn merge_state_by(
        &mut self,
        state: &MailboxState,
        is_master: bool,
        rules: crate::MergeRules,
        src: Option<Sid>,
    ) -> MergeOutcome {
        let reuse_bug = self.has_bug(crate::Bug::ReuseUidAfterRenumber);
        let mailbox = state.mailbox.clone();
        let fresh;
        let here = self.image.mailbox(&mailbox);
        let live_here = |guid: Guid| here.is_some_and(|m| m.messages.has_guid(guid));
        // Only a peer's state: a user replica's push has its own rule for its copies of
        // bindings the cluster forgot (`replica_serving::forgotten_here`), which the
        // broken variant `replica-resurrects` must still be caught breaking.
        let late_copies = src.and_then(|_| self.recently_collected.without_collected(state, live_here));
        let state = match late_copies {
            Some((kept, dropped)) => {
                self.marks.hit(Mark::CollectedCopyDropped);
                let count = dropped.len();
                self.note(|| format!("{count} copies of bindings collected here dropped from {mailbox}"));
                if let Some(peer) = src {
                    self.tell_collected(peer, &mailbox, state.uidvalidity, &dropped);
                }
                fresh = kept;
                &fresh
            }
            None => state,
        };
        let out = self.image.merge(&mut self.out, state, is_master, &rules, reuse_bug);
        if !out.collected.is_empty()
            && let Some(uidvalidity) = self.image.mailbox(&mailbox).map(|m| m.uidvalidity)
        {
            self.remember_collected(&mailbox, uidvalidity, &out.collected);
        }
        for r in &out.records {
            if !self.image.has_body(&r.guid) && !self.omits_body(&mailbox, r) {
                self.want_body(r.guid, Some(r.checksum), src, false);
            }
        }
        if out.renumbered > 0 {
            self.marks.hit(Mark::UidConflictRenumbered);
        }
        if out.tombstone_conflict {
            self.marks.hit(Mark::TombstoneConflict);
        }
        if out.new_validity {
            self.marks.hit(Mark::ValidityAdopted);
        }
        if out.unresolved {
            self.marks.hit(Mark::ReplicaConflictRefused);
            self.anti_entropy.mark_dirty(mailbox.clone());
        }
        if is_master && out.changed() {
            let Some(m) = self.image.mailbox(&mailbox) else { return out };
            let fragment = MailboxState {
                mailbox: mailbox.clone(),
                uidvalidity: m.uidvalidity,
                uidnext: m.uidnext,
                highest_modseq: m.highest_modseq,
                messages: out.records.clone(),
                tombstones: out.tombstones.clone(),
                lifecycle: m.lifecycle,
                // Retired UIDs travel when they changed (they are joined, so all of them
                // or only the new ones would do alike).
                retired: if out.retired_changed { m.retired.clone() } else { Default::default() },
            };
            self.replicate(Change::Merge { state: Box::new(fragment) }, None);
        }
        out
    }

    /// Tells `peer`, whose copy holds bindings collected here lately, that they are gone:
    /// SYNC-PARTs (merged, never answered: no exchange can loop on it) with our retired
    /// UIDs and a tombstone of each such binding on its retired UID, which the peer takes
    /// (`mailbox::drop_collected_copies`) where it would otherwise keep the copy for the
    /// master to move. Such a copy is a late one in flight (the peer has seen the
    /// collection: the piece changes nothing there) or one a store restored from a backup
    /// older than the expunge brought back (focus restore seed 71, restarted past the
    /// grace: the copy stayed on the restored replica while the others dropped it each
    /// time it came, and the copies never agreed; seed 46: a restored master moved it to
    /// a new UID, the expunged message back).
    /// Only within the incarnation the bindings were collected in, and only those our
    /// retired UIDs still cover: a piece of another incarnation would be a copy of it to
    /// merge, not a word about the sender's. Every binding of the mailbox remembered
    /// collected is named, not only those dropped (`Server::name_collected`).
    fn tell_collected(&mut self, peer: Sid, mailbox: &MailboxKey, uidvalidity: u32, dropped: &[(Uid, Guid)]) {
        let Some(m) = self.image.mailbox(mailbox).filter(|m| m.uidvalidity == uidvalidity) else { return };
        let mut state = MailboxState {
            mailbox: mailbox.clone(),
            uidvalidity: m.uidvalidity,
            uidnext: m.uidnext,
            highest_modseq: m.highest_modseq,
            messages: Vec::new(),
            tombstones: Vec::new(),
            lifecycle: m.lifecycle,
            retired: m.retired.clone(),
        };
        if self.name_collected(&mut state, dropped) == 0 {
            return;
        }
        for piece in self.state_pieces(state) {
            self.send(peer, Msg::SyncPart { state: piece });
        }
    }

    pub(crate) fn on_mbox_request(&mut self, src: Sid, catchup: CatchupId, key: MasterKey) {
        let summaries = self.image.summaries_where(|k| key.covers(k));
        let count = u32::try_from(summaries.len()).unwrap_or(u32::MAX);
        for summary in summaries {
            self.send(src, Msg::Mbox { tag: catchup.0, summary });
        }
        self.send(src, Msg::MboxDone { tag: catchup.0, count });
    }

    fn send_state(&mut self, to: Sid, mailbox: &MailboxKey, reply: bool) {
        // Past a point both copies reached, only what changed since goes out; if that
        // does not make the copies equal, the later tries (and at last a full SYNC) do.
        let since = self.anti_entropy.take_delta_base(to, mailbox);
        self.image.create_mailbox(&mut self.out, mailbox, None);
        let Some(m) = self.image.mailbox(mailbox) else { return };
        let mut state = mailbox::state_since(mailbox, m, since);
        self.name_collected(&mut state, &[]);
        self.send_sync(to, reply, state);
    }

    /// `limits::state_pieces` at the command budget, marking a split state with names.
    fn state_pieces(&mut self, state: MailboxState) -> Vec<MailboxState> {
        let named = state.tombstones.iter().any(|t| state.retired.covers(t));
        let pieces = crate::limits::state_pieces(state, crate::limits::STATE_PIECE_LEN_MAX);
        if named && pieces.len() > 1 {
            self.marks.hit(Mark::NamedStateSplit);
        }
        pieces
    }

    /// Sends a mailbox state as one SYNC, or, when its text would pass half of
    /// `wire::LINE_LEN_MAX` (a mailbox of some ten thousand messages), as SYNC-PARTs
    /// followed by a SYNC with the rest. Each piece carries the mailbox's meta; pieces
    /// merge like log fragments.
    pub(crate) fn send_sync(&mut self, to: Sid, reply: bool, state: MailboxState) {
        let mut pieces = self.state_pieces(state);
        let last = pieces.pop();
        for piece in pieces {
            self.send(to, Msg::SyncPart { state: piece });
        }
        if let Some(state) = last {
            self.send(to, Msg::Sync { reply, state });
        }
    }

    /// Sends MOVED. States too large for one command go ahead as SYNC-PARTs, and MOVED
    /// then carries only their meta (UIDNEXT, HIGHESTMODSEQ, lifecycle), which is what
    /// keeps the new master from reusing a UID; anti-entropy brings anything lost.
    pub(crate) fn send_move_done(
        &mut self,
        to: Sid,
        requester_job: JobId,
        key: MasterKey,
        epoch: u64,
        generation: u64,
        mut states: Vec<MailboxState>,
    ) {
        for state in &mut states {
            self.name_collected(state, &[]);
        }
        let len = |s: &MailboxState| {
            s.messages.iter().map(crate::limits::record_len).sum::<usize>()
                + s.tombstones.len() * crate::limits::TOMBSTONE_LEN
                + 256
        };
        if states.iter().map(len).sum::<usize>() > crate::limits::STATE_PIECE_LEN_MAX {
            for state in &mut states {
                let meta = MailboxState { messages: Vec::new(), tombstones: Vec::new(), ..state.clone() };
                let whole = std::mem::replace(state, meta);
                for piece in self.state_pieces(whole) {
                    self.send(to, Msg::SyncPart { state: piece });
                }
            }
        }
        self.send(to, Msg::MoveDone { tag: requester_job.0, key, epoch, generation, states });
    }

    /// A peer's summary of a mailbox (`kind`): an answer to our catch-up, a master's
    /// (or a fresh read's) check of our copy, or a replica's confirmation of ours.
    pub(crate) fn on_mbox(&mut self, src: Sid, kind: SummaryKind, summary: Summary) {
        let catchup = match kind {
            SummaryKind::Catchup(id) => Some(id),
            SummaryKind::Check | SummaryKind::Confirmation => None,
        };
        let mailbox = summary.mailbox.clone();
        let key = self.master_key(&mailbox);
        let equal = self.summary_of(&mailbox).as_ref() == Some(&summary);
        if equal {
            self.anti_entropy.agreed(src, mailbox.clone(), summary.highest_modseq);
        } else if self.anti_entropy.common_point(src, &mailbox).is_some_and(|p| {
            let ours = self.image.mailbox(&mailbox).map(|m| m.uidvalidity);
            summary.highest_modseq < p.modseq || Some(summary.uidvalidity) != ours
        }) {
            // The peer is behind the common point (it lost its disk) or holds another
            // incarnation of the mailbox: only a full SYNC can repair that.
            self.anti_entropy.forget_common_point(src, &mailbox);
        }
        if let Some(catchup) = catchup {
            if !self.masters.catching_up(&key, catchup) {
                return;
            }
            if !equal {
                self.masters.await_sync(&key, src, mailbox.clone());
                self.marks.hit(Mark::DigestMismatch);
                // Created (and written) with the peer's UIDVALIDITY: the catch-up merges
                // its copy as the same mailbox.
                self.image.create_mailbox(&mut self.out, &mailbox, Some(summary.uidvalidity));
                self.send_state(src, &mailbox, false);
            }
            return;
        }
        let i_master = self.masters.masters_ready(&key);
        if equal && kind == SummaryKind::Check && !i_master && self.masters.cached(&key).is_none_or(|m| m == src) {
            // The master's check found our copy the same: a newcomer trusts it now. A
            // fresh read's comparison, from a server that took us for the master, is a
            // Check too: a sender other than the master we know is not taken; with no
            // master known (after every term change, until asked) the check is, or a
            // newcomer's copies wait long to count (the laptop focus: a third as many).
            self.copy_confirmed(&mailbox);
        }
        if equal {
            if i_master {
                self.anti_entropy.confirmed(src, mailbox.clone(), summary.digest, self.now);
                self.image.clear_overflow(&mut self.out, src, &mailbox);
            } else if kind == SummaryKind::Check && self.image.is_overflowed(src, &mailbox) {
                // The master holds every change of ours our log to it dropped: the
                // overflow is over (see `sync_overflowed`); the confirmation follows at
                // the next check.
                self.image.clear_overflow(&mut self.out, src, &mailbox);
            } else if kind == SummaryKind::Check
                && !self.logs_hold(&mailbox)
                && let Some(mine) = self.summary_of(&mailbox)
            {
                self.leaving_confirmed(src, &mailbox);
                // Our confirmation is what lets the master collect the mailbox's
                // tombstones: it is given for a copy a crash here cannot take back, with
                // none of the mailbox's changes still on their way from here. It answers
                // a check only, never another confirmation: two servers that had each
                // stopped mastering the mailbox answered each other's every round trip
                // for ever (explore seed 101347).
                self.send_when_durable(src, Msg::Mbox { tag: crate::msg::MBOX_CONFIRMATION, summary: mine });
            }
            return;
        }
        self.marks.hit(Mark::DigestMismatch);
        // A mailbox we lack is created with the sender's UIDVALIDITY, as in a catch-up:
        // one made with a fresh UIDVALIDITY would be another incarnation of the name,
        // whose messages this server would renumber if it became the mailbox's master
        // before its copy took the master's (a new, empty server did exactly that).
        self.image.create_mailbox(&mut self.out, &mailbox, Some(summary.uidvalidity));
        self.send_state(src, &mailbox, false);
    }

    /// Whether any of our replication logs holds a change of `mailbox`.
    fn logs_hold(&self, mailbox: &MailboxKey) -> bool {
        self.member_servers.iter().any(|peer| self.image.is_logged(*peer, mailbox))
    }

    pub(crate) fn on_mbox_done(&mut self, src: Sid, catchup: CatchupId, count: u32) {
        let _ = count;
        self.masters.listed(catchup, src);
        self.finish_catchups();
    }

    pub(crate) fn on_sync(&mut self, src: Sid, reply: bool, state: MailboxState) {
        if !reply {
            self.marks.hit(Mark::FullSync);
        }
        let mailbox = state.mailbox.clone();
        if !self.states_asked.is_empty() {
            self.states_asked.remove(&(src, mailbox.clone()));
        }
        let out = self.merge_foreign(src, &state);
        if !reply {
            self.send_state(src, &mailbox, true);
            return;
        }
        let key = self.master_key(&mailbox);
        self.masters.synced(&key, src, &mailbox);
        if !out.unresolved && self.masters.cached(&key) == Some(src) {
            self.anti_entropy.clean(&mailbox);
        }
        self.finish_catchups();
    }

    /// Masters check, about once per `anti_entropy_us`, each peer's copy of every
    /// mailbox whose state the peer has not confirmed, once the log to it is drained.
    /// One pass examines at most `EXAMINED_PER_PASS_MAX` mailboxes per peer and the next
    /// goes on from there, so the work per pass is bounded whatever the store holds.
    pub(crate) fn anti_entropy(&mut self) {
        if !self.masters.any_ready() {
            return;
        }
        for peer in self.routing.reachable_peers() {
            let (candidates, resume_after) = self.pass_candidates(peer);
            self.anti_entropy.pass_ended(peer, resume_after);
            for mailbox in candidates {
                let Some(summary) = self.summary_to_check(peer, &mailbox) else { continue };
                self.anti_entropy.summary_sent(peer, summary.mailbox.clone(), summary.digest, self.now);
                self.send(peer, Msg::Mbox { tag: 0, summary });
            }
        }
    }

    /// The mailboxes of this pass for `peer` that we master and whose changes to it are
    /// all delivered, in key order from where the last pass stopped; and where the next
    /// pass starts (None: this one went all the way round).
    fn pass_candidates(&self, peer: Sid) -> (Vec<MailboxKey>, Option<MailboxKey>) {
        self.image.mailbox_pass(self.anti_entropy.pass_start(peer), EXAMINED_PER_PASS_MAX, |key, _| {
            !self.image.is_logged(peer, key) && self.masters.masters_ready(&self.master_key(key))
        })
    }

    /// Our summary of `mailbox`, when `peer`'s copy is due to be checked: not confirmed
    /// at our digest lately, and no summary sent within the interval.
    fn summary_to_check(&mut self, peer: Sid, mailbox: &MailboxKey) -> Option<Summary> {
        let now = self.now;
        let interval = self.cfg.anti_entropy_us;
        let check = self.anti_entropy.check(peer, mailbox);
        let summary = self.image.summary(mailbox)?;
        // A confirmed copy is checked again now and then: a peer may have lost its disk
        // and come back before anyone saw it gone, or been edited by hand.
        let fresh = check.confirmed_at.is_some_and(|at| now.0.saturating_sub(at.0) < interval * RECONFIRM_PERIODS);
        if check.confirmed_digest == Some(summary.digest) && fresh {
            return None;
        }
        if check.last_sent.is_some_and(|at| now.0.saturating_sub(at.0) < interval) {
            return None;
        }
        // A copy confirmed lately, of a mailbox that changed since the last pass, is
        // checked once the mailbox settles (or its confirmation grows old), not on every
        // pass: each change reached the peer through the log, acknowledged (only a
        // drained log makes a candidate), and a busy mailbox's summary every pass to
        // every peer was a fifth of all peer messages under steady load. A log that
        // dropped the mailbox's changes (overflow) is checked at once.
        let changing = check.examined_digest.is_some_and(|d| d != summary.digest);
        if changing && fresh && !self.image.is_overflowed(peer, mailbox) {
            self.anti_entropy.examined(peer, mailbox.clone(), summary.digest);
            return None;
        }
        Some(summary)
    }

    /// A mailbox whose changes our log to its master dropped (the log overflowed), which
    /// we do not master: our copy goes to the master, at most once per
    /// `anti_entropy_us`, until the master's check finds the copies equal (which clears
    /// the overflow, `on_mbox`). The master's anti-entropy checks only the mailboxes it
    /// holds: one only we hold, made here while we mastered it on the other side of a
    /// partition, would otherwise never reach it (explore seed 1818703: an acknowledged
    /// COPY into a new mailbox lost to the rest of the cluster).
    pub(crate) fn sync_overflowed(&mut self) {
        let (now, interval) = (self.now, self.cfg.anti_entropy_us);
        let mut due: Vec<(Sid, MailboxKey)> = Vec::new();
        for (peer, log) in self.image.logs() {
            if !self.routing.is_reachable(*peer) {
                continue;
            }
            for mailbox in &log.overflowed {
                if due.len() >= OVERFLOWED_SENT_PER_PASS_MAX {
                    break;
                }
                let key = self.master_key(mailbox);
                if self.masters.masters(&key) || self.masters.cached(&key) != Some(*peer) {
                    continue;
                }
                let sent = self.anti_entropy.check(*peer, mailbox).last_sent;
                if sent.is_some_and(|at| now.0.saturating_sub(at.0) < interval) {
                    continue;
                }
                due.push((*peer, mailbox.clone()));
            }
        }
        for (master, mailbox) in due {
            let digest = self.image.summary(&mailbox).map_or(0, |s| s.digest);
            self.anti_entropy.summary_sent(master, mailbox.clone(), digest, now);
            self.marks.hit(Mark::OverflowedCopySent);
            self.send_state(master, &mailbox, false);
        }
    }

    /// Replicas holding a conflict they may not decide send their copy to the master.
    pub(crate) fn sync_dirty(&mut self) {
        let now = self.now;
        for (mailbox, last) in self.anti_entropy.dirty() {
            let key = self.master_key(&mailbox);
            if self.masters.masters(&key) {
                self.anti_entropy.clean(&mailbox);
                continue;
            }
            if last.is_some_and(|at| now.0.saturating_sub(at.0) < self.cfg.anti_entropy_us) {
                continue;
            }
            match self.masters.cached(&key).filter(|m| self.routing.is_reachable(*m)) {
                Some(master) => {
                    self.anti_entropy.dirty_sent(mailbox.clone(), now);
                    self.send_state(master, &mailbox, false);
                }
                None => self.lookup_master(&key),
            }
        }
    }

    pub(crate) fn want_body(&mut self, guid: Guid, checksum: Option<u64>, hint: Option<Sid>, repair: bool) {
        let checksum = checksum
            .or_else(|| self.image.mailboxes().values().find_map(|m| m.messages.find_guid(guid)).map(|r| r.checksum))
            .unwrap_or(0);
        self.body_fetch.want(guid, checksum, hint, repair, self.now);
    }

    pub(crate) fn fetch_wanted_bodies(&mut self) {
        self.answer_waiting_bodies();
        let now = self.now;
        let peers: Vec<Sid> = self.routing.reachable_peers();
        if peers.is_empty() {
            return;
        }
        for guid in self.body_fetch.due(now) {
            if self.body_fetch.census_due(&guid, peers.len(), now) && self.census_mailboxes(guid).is_some() {
                self.start_census(guid);
                continue;
            }
            if let Some(target) = self.body_fetch.ask(guid, &peers, now) {
                self.send(target, Msg::Fetch { guid });
            }
        }
    }

    pub(crate) fn on_fetch(&mut self, src: Sid, guid: Guid) {
        self.leaving_served_body();
        let Some(checksum) = self.image.body(&guid).map(|b| b.checksum) else {
            self.send(src, Msg::NoBody { guid });
            self.look_for_omitted_body(src, guid);
            return;
        };
        let Some(body) = self.image.intact_body(guid) else {
            // Never hand out a corrupted body; repair our own instead.
            self.want_body(guid, Some(checksum), None, true);
            self.send(src, Msg::NoBody { guid });
            return;
        };
        self.send(src, Msg::Body { guid, checksum, body });
    }

    pub(crate) fn on_body(&mut self, src: Sid, guid: Guid, checksum: u64, body: Body) {
        let Some((expected, repair)) = self.body_fetch.expected(&guid, checksum) else { return };
        if body.checksum() != expected {
            return;
        }
        self.body_fetch.fetched(&guid);
        self.image.put_checked_body(&mut self.out, guid, expected, body);
        if repair {
            self.marks.hit(Mark::BodyRepaired);
        }
        let _ = src;
        self.body_arrived(guid);
    }

    /// A peer asked for a body we lack. If we omit it by design (a partial server) in a
    /// mailbox we master and the peer asked before, it found the body on no other
    /// server: we want it ourselves, so that we find it or, if no server has it, our
    /// census gives it up (only a master's census may).
    /// Only while every server is reachable: a peer cut off from the holder asks us
    /// again too, and the census could not run anyway.
    fn look_for_omitted_body(&mut self, src: Sid, guid: Guid) {
        if !self.omits_some()
            || !self.image.is_referenced(guid)
            || !self.member_servers.iter().all(|s| self.routing.is_reachable(*s))
        {
            return;
        }
        let mastered_omitted = self.image.mailboxes().iter().find_map(|(key, m)| {
            let r = m.messages.find_guid(guid)?;
            (self.omits(key, r) && self.masters.masters(&self.master_key(key))).then_some(r.checksum)
        });
        let Some(checksum) = mastered_omitted else { return };
        if self.body_fetch.asked_for_omitted(guid, src, self.now) {
            self.note(|| format!("{src} found omitted body {guid} on no other server: looking for it"));
            self.want_body(guid, Some(checksum), None, false);
        }
    }

    /// The mailboxes a census of `guid` may give the message up in: those holding it that
    /// we are the ready master of. A census may decide that a body is gone for good only
    /// where nothing that could still bring it is in flight: no write of ours on those
    /// mailboxes is pending, every replica has acknowledged every change we logged for
    /// them, and every configured server is reachable to be asked. None where that does
    /// not hold or we master no mailbox holding it. A mailbox holding it that another
    /// server masters is that master's to give up, by its own census (general seed
    /// 2199143: a COPY put a message whose body no server held intact into a mailbox of
    /// another master, and a census that waited to master every holder never ran).
    fn census_mailboxes(&self, guid: Guid) -> Option<Vec<MailboxKey>> {
        if !self.member_servers.iter().all(|s| self.routing.is_reachable(*s)) {
            return None;
        }
        let mastered: Vec<MailboxKey> = self
            .mailboxes_holding(guid)
            .into_iter()
            .filter(|mailbox| self.masters.masters_ready(&self.master_key(mailbox)))
            .collect();
        let quiet = mastered.iter().all(|mailbox| {
            let job_pending = self.jobs.any_for(&self.master_key(mailbox));
            let unacked = self.image.logs().values().any(|l| l.entries.values().any(|c| c.mailbox() == mailbox));
            !job_pending && !unacked
        });
        (!mastered.is_empty() && quiet).then_some(mastered)
    }

    fn mailboxes_holding(&self, guid: Guid) -> Vec<MailboxKey> {
        self.image.mailboxes().iter().filter(|(_, m)| m.messages.has_guid(guid)).map(|(k, _)| k.clone()).collect()
    }

    fn start_census(&mut self, guid: Guid) {
        self.body_fetch.start_census(guid, self.now);
        let others: Vec<Sid> = self.peers();
        for s in others {
            self.send(s, Msg::Fetch { guid });
        }
    }

    pub(crate) fn on_no_body(&mut self, src: Sid, guid: Guid) {
        if !self.body_fetch.denied(guid, src, &self.peers()) {
            return;
        }
        let Some(mastered) = self.census_mailboxes(guid) else {
            // Every server said it has none, but something of ours on those mailboxes is
            // in flight (often another census's expunge): a census again soon rather than
            // a whole retry interval later. Many bodies lost at once (unacknowledged
            // saves a store put back from a backup had alone) then go within seconds,
            // not one a second (focus late-restore seeds 2529 and 17511: some thirty
            // were still being given up 30 s after the heal).
            self.body_fetch.retry_soon(guid, self.now);
            return;
        };
        // No server has an intact copy: the message can never be read again. Expunging it
        // is the only way the servers agree; it was never acknowledged to a client, or a
        // copy would have survived (a client is told of a save only once enough servers
        // hold the body).
        for mailbox in mastered {
            let messages: Vec<(Uid, Guid)> = self.image.mailboxes()[&mailbox]
                .messages
                .values()
                .filter(|r| r.guid == guid)
                .map(|r| (r.uid, r.guid))
                .collect();
            self.note(|| format!("body {guid} is on no server: expunging it from {mailbox}"));
            self.submit_write(super::Origin::Internal, WriteRequest::Expunge { mailbox, messages });
        }
    }

    /// Keep a body that arrived with a change, if it is intact and new here.
    pub(crate) fn store_body(&mut self, guid: Guid, checksum: u64, body: Body, src: Option<Sid>) {
        if self.image.body_intact(guid) == Some(true) {
            return;
        }
        if body.checksum() != checksum {
            self.want_body(guid, Some(checksum), src, false);
            return;
        }
        self.body_fetch.not_wanted(&guid);
        self.image.put_checked_body(&mut self.out, guid, checksum, body);
        self.body_arrived(guid);
    }

    /// Check some bodies against their checksums, and that every message has a body.
    pub(crate) fn scrub_bodies(&mut self) {
        let (wanted, cfg) = (&self.body_fetch, &self.cfg);
        // A body a partial replica omits on purpose is not missing (see `crate::partial`).
        let found = self.image.scrub(|k, r| {
            wanted.is_wanted(&r.guid) || cfg.partial.as_ref().is_some_and(|p| p.leaves_out_body(cfg.user_replica, k, r))
        });
        for (guid, checksum) in found.corrupt {
            self.want_body(guid, Some(checksum), None, true);
        }
        for (guid, checksum) in found.missing {
            self.want_body(guid, Some(checksum), None, true);
        }
        if self.body_fetch.count() > 0 {
            // A body whose every message was expunged meanwhile is no longer wanted (the
            // image counts the live records of each GUID: a lookup, not a pass).
            let awaited = self.jobs.awaited_bodies();
            let image = &self.image;
            self.body_fetch.retain(|g| image.is_referenced(*g) || awaited.contains(g));
        }
        if self.body_fetch.omitted_asks_count() > 0 {
            let image = &self.image;
            self.body_fetch.retain_omitted_asks(|g| image.is_referenced(*g) && !image.has_body(g), self.now);
        }
    }

    /// Deletes bodies no live message holds: expunged everywhere here, not in any peer's
    /// log, not wanted, not needed by a job. A COPY or a replica's FETCH that comes later
    /// finds no body here and is served by a server that still holds the message.
    pub(crate) fn collect_bodies(&mut self) {
        self.collect_text_parts();
        let candidates: Vec<Guid> = self.image.unreferenced_bodies().take(COLLECT_PER_PASS_MAX).collect();
        // A body no record here holds may still be needed: the message may have moved
        // (a RENAME whose new mailbox arrives later, by SYNC after a log overflow) to a
        // master that never had its bytes. It is kept a few maintenance passes after it
        // lost its last record, in which that SYNC comes (an overflow makes the master's
        // anti-entropy check that mailbox at its next pass).
        let keep_us = self.cfg.anti_entropy_us * BODY_KEEP_PASSES;
        let now = self.now;
        self.unreferenced_since.retain(|g, _| candidates.binary_search(g).is_ok());
        let mut due = Vec::with_capacity(candidates.len());
        for guid in candidates {
            let since = *self.unreferenced_since.entry(guid).or_insert(now);
            if now.0.saturating_sub(since.0) >= keep_us {
                due.push(guid);
            }
        }
        let candidates = due;
        if candidates.is_empty() {
            return;
        }
        let in_use = self.jobs.bodies_in_use();
        let logged: BTreeSet<Guid> = self
            .image
            .logs()
            .values()
            .flat_map(|l| l.entries.values())
            .flat_map(logged_guids)
            .filter(|g| candidates.binary_search(g).is_ok())
            .collect();
        for guid in candidates {
            if self.image.is_referenced(guid)
                || in_use.contains(&guid)
                || logged.contains(&guid)
                || self.body_fetch.is_wanted(&guid)
            {
                continue;
            }
            self.image.remove_unreferenced_body(&mut self.out, guid);
            self.unreferenced_since.remove(&guid);
        }
        debug_assert!(self.image.refs_consistent(), "live reference counts match the mailboxes");
    }

    pub(crate) fn on_external(&mut self, edit: ExternalEdit) {
        match edit {
            ExternalEdit::Added { mailbox, guid, received, body } => {
                let request = WriteRequest::Save { mailbox, guid, received, flags: Vec::new(), body, delivery: false };
                self.submit_write(super::Origin::Internal, request);
            }
            ExternalEdit::Removed { mailbox, uid } => {
                let Some(record) = self.image.mailbox(&mailbox).and_then(|m| m.messages.get(&uid)).cloned() else {
                    return;
                };
                if self.image.has_body(&record.guid) {
                    self.commit(StoreWrite::RemoveBody { guid: record.guid });
                }
                self.want_body(record.guid, Some(record.checksum), None, true);
            }
            ExternalEdit::Corrupted { guid } => self.image.body_changed(guid),
        }
    }
}

/// Bodies collected per maintenance pass at most.
const COLLECT_PER_PASS_MAX: usize = 256;
/// Maintenance passes a body no record holds is kept at least (see `collect_bodies`).
const BODY_KEEP_PASSES: u64 = 2;

/// The GUIDs a logged change refers to.
fn logged_guids(change: &Change) -> Vec<Guid> {
    match change {
        Change::Save { record, .. } | Change::Copy { record, .. } => vec![record.guid],
        Change::Merge { state } => state.messages.iter().map(|r| r.guid).collect(),
        Change::Expunge { .. } | Change::Store { .. } => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Config;
    use crate::store::{DiskImage, MemoryBodies};

    fn server() -> Server {
        Server::recover(
            Config::new(Sid(1), vec![Sid(1), Sid(2), Sid(3)]),
            DiskImage::default(),
            1,
            Box::new(MemoryBodies::default()),
        )
    }

    #[test]
    fn a_peers_state_is_asked_for_once_until_it_answers_or_the_ask_expires() {
        let mut s = server();
        let (inbox, other) = (MailboxKey::new("u@d", "INBOX"), MailboxKey::new("u@d", "Trash"));
        s.now = Instant(1_000);
        assert!(s.ask_state_once(Sid(2), &inbox), "the first copy asks");
        assert!(!s.ask_state_once(Sid(2), &inbox), "the next copies wait for that answer");
        assert!(!s.ask_state_once(Sid(2), &inbox));
        assert_eq!(s.marks().count(Mark::StateAskedAlready), 2);
        assert!(s.ask_state_once(Sid(2), &other), "another mailbox asks for itself");
        assert!(s.ask_state_once(Sid(3), &inbox), "another peer is asked for its own state");
        // The peer's state comes: the next copy it logs asks again.
        s.on_sync(Sid(2), true, MailboxState::empty(inbox.clone(), 7));
        assert!(s.ask_state_once(Sid(2), &inbox), "after the answer, a new copy asks again");
        // An answer lost: past a request's deadline the next copy asks again, and the
        // maintenance pass forgets the old asks.
        s.now = Instant(1_000 + s.cfg.request_timeout_us - 1);
        assert!(!s.ask_state_once(Sid(3), &inbox));
        s.now = Instant(1_000 + s.cfg.request_timeout_us);
        assert!(s.ask_state_once(Sid(3), &inbox), "an unanswered ask expires");
        s.now = Instant(1_000 + 3 * s.cfg.request_timeout_us);
        s.expire_states_asked();
        assert!(s.states_asked.is_empty(), "expired asks are forgotten");
    }

    #[test]
    fn asks_beyond_the_limit_are_sent_without_being_noted() {
        let mut s = server();
        s.now = Instant(1);
        for i in 0..STATES_ASKED_MAX {
            assert!(s.ask_state_once(Sid(2), &MailboxKey::new("u@d", &format!("box{i}"))));
        }
        let extra = MailboxKey::new("u@d", "one more");
        assert!(s.ask_state_once(Sid(2), &extra));
        assert!(s.ask_state_once(Sid(2), &extra), "not noted, so asked again");
        assert_eq!(s.states_asked.len(), STATES_ASKED_MAX);
    }
}
