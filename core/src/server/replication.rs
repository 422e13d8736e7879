//! Replication: per-peer logs of master-ordered changes, acknowledgements after
//! durability, MBOX summaries, SYNC exchanges, FETCH of bodies, and the repair of stores
//! edited behind the protocol's back.

use super::{BodyCensus, CommonPoint, DELTA_SYNCS_MAX, PeerCheck, Server, WantedBody};
use crate::hash::body_checksum;
use crate::io::ExternalEdit;
use crate::mailbox::{self, MergeOutcome};
use crate::marks::Mark;
use crate::msg::*;
use crate::store::{StoreWrite, StoredBody};
use crate::types::*;
use std::collections::{BTreeMap, BTreeSet};

/// Log entries resent to one peer per tick at most.
const RESEND_PER_TICK_MAX: usize = 1024;
/// Bodies checked against their checksum per scrub.
const SCRUB_PER_TICK_MAX: usize = 256;
const FETCH_RETRY_US: u64 = 100_000;
/// FETCHes in flight at once: enough to fill a fast link, few enough that a resync of a
/// large mailbox does not queue its whole body traffic at once.
const FETCH_WINDOW_MAX: usize = 256;
/// A census whose answers did not all arrive is started again after this long.
const CENSUS_TIMEOUT_US: u64 = 5_000_000;
/// Anti-entropy periods after which a confirmed copy is checked again.
const RECONFIRM_PERIODS: u64 = 10;

impl Server {
    /// Append a master-ordered change to every peer's log and send it to the reachable
    /// ones. `waiter` is the job that waits for the peers' acknowledgements.
    /// A change too large for one command goes as several log entries (see
    /// `limits::change_parts`); the waiter counts a peer once it acknowledged them all.
    pub(crate) fn replicate(&mut self, change: Change, waiter: Option<u64>) {
        for part in crate::limits::change_parts(change) {
            self.replicate_part(part, waiter);
        }
    }

    fn replicate_part(&mut self, change: Change, waiter: Option<u64>) {
        let mailbox = change.mailbox().clone();
        // The safety net: a change that still cannot be encoded within the peer's limits
        // is never logged (it would wedge the link); the peer gets the mailbox by SYNC.
        let sendable = crate::limits::change_fits(&change);
        debug_assert!(sendable, "a replicated change does not fit a command line");
        for peer in self.peers() {
            self.make_room(peer, &mailbox);
            if !sendable {
                self.marks.hit(Mark::UnsendableChange);
                self.note(|| format!("cannot send a change of {mailbox} to {peer}: marked for SYNC"));
                self.overflow(peer, BTreeSet::from([mailbox.clone()]));
                continue;
            }
            let log = self.db.logs.entry(peer).or_default();
            if log.overflowed.contains(&mailbox) {
                // The peer will get this mailbox by SYNC.
                continue;
            }
            let seq = log.next_seq;
            log.next_seq += 1;
            log.entries.insert(seq, change.clone());
            self.write(StoreWrite::LogAppend { peer, seq, change: change.clone() });
            if let Some(tag) = waiter {
                self.ack_waiters.insert((peer, seq), tag);
                *self.parts_left.entry((tag, peer)).or_default() += 1;
            }
            if self.reachable.contains(&peer) {
                self.log_sent.insert((peer, seq), self.now);
                self.send(peer, Msg::Change { seq, change: change.clone() });
            }
        }
    }

    /// A full log drops the mailbox's entries and marks it for SYNC with that peer.
    fn make_room(&mut self, peer: Sid, mailbox: &MailboxKey) {
        let capacity = self.cfg.log_capacity.max(1);
        let Some(log) = self.db.logs.get(&peer) else { return };
        if log.entries.len() < capacity {
            return;
        }
        self.marks.hit(Mark::LogOverflow);
        let mut victims = vec![mailbox.clone()];
        let mut counts: BTreeMap<MailboxKey, usize> = BTreeMap::new();
        for change in log.entries.values() {
            *counts.entry(change.mailbox().clone()).or_default() += 1;
        }
        let mut left = log.entries.len() - counts.get(mailbox).copied().unwrap_or(0);
        let mut by_size: Vec<(usize, MailboxKey)> =
            counts.into_iter().filter(|(k, _)| k != mailbox).map(|(k, c)| (c, k)).collect();
        by_size.sort_by(|a, b| b.cmp(a));
        for (count, key) in by_size {
            if left < capacity {
                break;
            }
            left -= count;
            victims.push(key);
        }
        self.overflow(peer, victims.into_iter().collect());
    }

    /// Drops the log entries of `victims` for `peer` and marks them for full SYNC.
    fn overflow(&mut self, peer: Sid, victims: BTreeSet<MailboxKey>) {
        let Some(log) = self.db.logs.get_mut(&peer) else { return };
        let seqs: Vec<u64> =
            log.entries.iter().filter(|(_, c)| victims.contains(c.mailbox())).map(|(s, _)| *s).collect();
        for s in &seqs {
            log.entries.remove(s);
        }
        for v in &victims {
            log.overflowed.insert(v.clone());
        }
        for s in &seqs {
            self.log_sent.remove(&(peer, *s));
            self.ack_waiters.remove(&(peer, *s));
        }
        self.write(StoreWrite::LogRemove { peer, seqs });
        for v in victims {
            self.checks.remove(&(peer, v.clone()));
            self.write(StoreWrite::LogOverflow { peer, mailbox: v, overflowed: true });
        }
    }

    pub(crate) fn resend_logs(&mut self) {
        let now = self.now;
        let interval = self.cfg.anti_entropy_us;
        let peers: Vec<Sid> = self.reachable.iter().copied().filter(|p| *p != self.cfg.sid).collect();
        for peer in peers {
            let Some(log) = self.db.logs.get(&peer) else { continue };
            let due: Vec<(u64, Change)> = log
                .entries
                .iter()
                .filter(|(seq, _)| {
                    self.log_sent.get(&(peer, **seq)).is_none_or(|at| now.0.saturating_sub(at.0) >= interval)
                })
                .take(RESEND_PER_TICK_MAX)
                .map(|(s, c)| (*s, c.clone()))
                .collect();
            for (seq, change) in due {
                if !crate::limits::change_fits(&change) {
                    // A change logged before parts existed (or by a broken build) that
                    // the peer would refuse: drop it, the peer gets the mailbox by SYNC.
                    let mailbox = change.mailbox().clone();
                    self.marks.hit(Mark::UnsendableChange);
                    self.note(|| format!("cannot send logged change {seq} of {mailbox} to {peer}: marked for SYNC"));
                    self.overflow(peer, BTreeSet::from([mailbox]));
                    continue;
                }
                self.log_sent.insert((peer, seq), now);
                self.send(peer, Msg::Change { seq, change });
            }
        }
    }

    pub(crate) fn on_ack(&mut self, src: Sid, seqs: Vec<u64>, refused: Vec<u64>) {
        let Some(log) = self.db.logs.get_mut(&src) else { return };
        let held: BTreeSet<u64> = seqs.iter().copied().collect();
        let removed: Vec<u64> = seqs.into_iter().chain(refused).filter(|s| log.entries.remove(s).is_some()).collect();
        if removed.is_empty() {
            return;
        }
        for seq in &removed {
            self.log_sent.remove(&(src, *seq));
            let waiter = self.ack_waiters.remove(&(src, *seq));
            if !held.contains(seq) {
                // The peer did not take the change: it is no copy of the message.
                continue;
            }
            let Some(tag) = waiter else { continue };
            let left = self.parts_left.entry((tag, src)).or_insert(1);
            *left = left.saturating_sub(1);
            if *left > 0 {
                // More parts of the change to come from this peer.
                continue;
            }
            self.parts_left.remove(&(tag, src));
            if let Some(job) = self.jobs.get_mut(&tag)
                && let super::JobState::Replicating { acked, .. } = &mut job.state
            {
                acked.insert(src);
            }
        }
        self.write(StoreWrite::LogRemove { peer: src, seqs: removed });
        self.progress_jobs();
    }

    /// Acknowledge received changes whose writes are durable.
    pub(crate) fn flush_acks(&mut self) {
        if self.pending_acks.is_empty() {
            return;
        }
        let mut ready: BTreeMap<Sid, (Vec<u64>, Vec<u64>)> = BTreeMap::new();
        let pending = std::mem::take(&mut self.pending_acks);
        for (peer, seq, write, applied) in pending {
            if !self.is_durable(write) {
                self.pending_acks.push((peer, seq, write, applied));
                continue;
            }
            let (seqs, refused) = ready.entry(peer).or_default();
            if applied { seqs } else { refused }.push(seq);
        }
        for (peer, (seqs, refused)) in ready {
            self.send(peer, Msg::Ack { seqs, refused });
        }
    }

    /// A change from a peer's log.
    pub(crate) fn on_change(&mut self, src: Sid, seq: u64, change: Change) {
        let fragment = self.fragment_of(src, change);
        let applied = match fragment {
            Some(fragment) => !self.merge_foreign(src, &fragment, true).unresolved,
            None => true,
        };
        self.pending_acks.push((src, seq, self.last_write(), applied));
    }

    /// The piece of mailbox state a change carries. Bodies are stored on the way.
    fn fragment_of(&mut self, src: Sid, change: Change) -> Option<MailboxState> {
        let empty = |mailbox: MailboxKey, uidvalidity: u32| MailboxState {
            mailbox,
            uidvalidity,
            uidnext: 1,
            highest_modseq: 0,
            messages: Vec::new(),
            tombstones: Vec::new(),
            lifecycle: Default::default(),
        };
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
                Some(f)
            }
            Change::Expunge { mailbox, uidvalidity, tombstones } => {
                let mut f = empty(mailbox, uidvalidity);
                f.uidnext = tombstones.iter().map(|t| t.uid.saturating_add(1)).max().unwrap_or(1);
                f.highest_modseq = tombstones.iter().map(|t| t.modseq).max().unwrap_or(0);
                f.tombstones = tombstones;
                Some(f)
            }
            Change::Store { mailbox, uidvalidity, stamp, messages, add, remove } => {
                let key = self.master_key(&mailbox);
                let is_master = self.mastered.contains_key(&key);
                let mut f = empty(mailbox.clone(), uidvalidity);
                f.highest_modseq = stamp.modseq;
                let local = self.db.mailboxes.get(&mailbox);
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
                    self.dirty.entry(mailbox).or_insert(None);
                }
                Some(f)
            }
            Change::Merge { state } => Some(state),
        }
    }

    /// Join a piece of state from `src` into our copy: as master (deciding conflicts and
    /// replicating the outcome) or as a replica (refusing conflicts, asking for SYNC).
    pub(crate) fn merge_foreign(&mut self, src: Sid, state: &MailboxState, from_log: bool) -> MergeOutcome {
        let key = self.master_key(&state.mailbox);
        let is_master = self.mastered.contains_key(&key);
        let rules = self.merge_rules();
        let reuse_bug = self.has_bug(crate::Bug::ReuseUidAfterRenumber);
        let mailbox = state.mailbox.clone();
        let is_new = !self.db.mailboxes.contains_key(&mailbox);
        let m = self.mailbox_mut(&mailbox);
        if is_new {
            m.uidvalidity = state.uidvalidity;
        }
        let out = if is_master {
            mailbox::merge_as_master(m, state, &rules)
        } else {
            mailbox::merge_as_replica(m, state, &rules)
        };
        if reuse_bug
            && is_master
            && out.renumbered > 0
            && let Some(retired) = out.tombstones.iter().filter(|t| !t.expunged).map(|t| t.uid).min()
        {
            m.uidnext = retired;
        }
        let _ = from_log;
        if is_new {
            self.persist_meta(&mailbox);
        }
        self.persist_outcome(&mailbox, &out);
        for r in &out.records {
            if !self.db.bodies.contains_key(&r.guid) {
                self.want_body(r.guid, Some(r.checksum), Some(src), false);
            }
        }
        if out.renumbered > 0 {
            self.marks.hit(Mark::UidConflictRenumbered);
        }
        if out.tombstone_conflict {
            self.marks.hit(Mark::TombstoneConflict);
        }
        if out.unresolved {
            self.marks.hit(Mark::ReplicaConflictRefused);
            self.dirty.entry(mailbox.clone()).or_insert(None);
        }
        if is_master && out.changed() {
            let Some(m) = self.db.mailboxes.get(&mailbox) else { return out };
            let fragment = MailboxState {
                mailbox: mailbox.clone(),
                uidvalidity: m.uidvalidity,
                uidnext: m.uidnext,
                highest_modseq: m.highest_modseq,
                messages: out.records.clone(),
                tombstones: out.tombstones.clone(),
                lifecycle: m.lifecycle,
            };
            self.replicate(Change::Merge { state: fragment }, None);
        }
        out
    }

    fn persist_outcome(&mut self, mailbox: &MailboxKey, out: &MergeOutcome) {
        if out.lifecycle_changed
            && let Some(lifecycle) = self.db.mailboxes.get(mailbox).map(|m| m.lifecycle)
        {
            self.write(StoreWrite::MailboxLifecycle { mailbox: mailbox.clone(), lifecycle });
        }
        for t in &out.tombstones {
            self.write(StoreWrite::PutTombstone { mailbox: mailbox.clone(), tombstone: *t });
        }
        for uid in &out.removed {
            self.write(StoreWrite::RemoveMessage { mailbox: mailbox.clone(), uid: *uid });
        }
        for r in &out.records {
            self.write(StoreWrite::PutMessage { mailbox: mailbox.clone(), record: r.clone() });
        }
        if out.changed() {
            self.persist_meta(mailbox);
        }
    }

    pub(crate) fn on_mbox_request(&mut self, src: Sid, tag: u64, key: MasterKey) {
        let digests = &mut self.digests;
        let summaries: Vec<Summary> = self
            .db
            .mailboxes
            .iter()
            .filter(|(k, _)| key.covers(k))
            .map(|(k, m)| super::cached_summary(digests, k, m))
            .collect();
        let count = u32::try_from(summaries.len()).unwrap_or(u32::MAX);
        for summary in summaries {
            self.send(src, Msg::Mbox { tag, summary });
        }
        self.send(src, Msg::MboxDone { tag, count });
    }

    fn send_state(&mut self, to: Sid, mailbox: &MailboxKey, reply: bool) {
        let is_new = !self.db.mailboxes.contains_key(mailbox);
        // Past a point both copies reached, only what changed since goes out; if that
        // does not make the copies equal, the later tries (and at last a full SYNC) do.
        let since = match self.common_modseq.get_mut(&(to, mailbox.clone())) {
            Some(point) if point.deltas_left > 0 => {
                point.deltas_left -= 1;
                Some(point.modseq)
            }
            Some(_) => {
                self.common_modseq.remove(&(to, mailbox.clone()));
                None
            }
            None => None,
        };
        let m = self.mailbox_mut(mailbox);
        let state = mailbox::state_since(mailbox, m, since);
        if is_new {
            self.persist_meta(mailbox);
        }
        self.send_sync(to, reply, state);
    }

    /// Sends a mailbox state as one SYNC, or, when its text would pass half of
    /// `wire::LINE_LEN_MAX` (a mailbox of some ten thousand messages), as SYNC-PARTs
    /// followed by a SYNC with the rest. Each piece carries the mailbox's meta; pieces
    /// merge like log fragments.
    pub(crate) fn send_sync(&mut self, to: Sid, reply: bool, state: MailboxState) {
        let mut pieces = crate::limits::state_pieces(state, crate::limits::STATE_PIECE_LEN_MAX);
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
        tag: u64,
        key: MasterKey,
        epoch: u64,
        generation: u64,
        mut states: Vec<MailboxState>,
    ) {
        let len = |s: &MailboxState| {
            s.messages.iter().map(crate::limits::record_len).sum::<usize>()
                + s.tombstones.len() * crate::limits::TOMBSTONE_LEN
                + 256
        };
        if states.iter().map(len).sum::<usize>() > crate::limits::STATE_PIECE_LEN_MAX {
            for state in &mut states {
                let meta = MailboxState { messages: Vec::new(), tombstones: Vec::new(), ..state.clone() };
                let whole = std::mem::replace(state, meta);
                for piece in crate::limits::state_pieces(whole, crate::limits::STATE_PIECE_LEN_MAX) {
                    self.send(to, Msg::SyncPart { state: piece });
                }
            }
        }
        self.send(to, Msg::MoveDone { tag, key, epoch, generation, states });
    }

    pub(crate) fn on_mbox(&mut self, src: Sid, tag: u64, summary: Summary) {
        let mailbox = summary.mailbox.clone();
        let key = self.master_key(&mailbox);
        let equal = self.summary_of(&mailbox).as_ref() == Some(&summary);
        if equal {
            let point = CommonPoint { modseq: summary.highest_modseq, deltas_left: DELTA_SYNCS_MAX };
            self.common_modseq.insert((src, mailbox.clone()), point);
        } else if self.common_modseq.get(&(src, mailbox.clone())).is_some_and(|p| {
            let ours = self.db.mailboxes.get(&mailbox).map(|m| m.uidvalidity);
            summary.highest_modseq < p.modseq || Some(summary.uidvalidity) != ours
        }) {
            // The peer is behind the common point (it lost its disk) or holds another
            // incarnation of the mailbox: only a full SYNC can repair that.
            self.common_modseq.remove(&(src, mailbox.clone()));
        }
        if tag != 0 {
            // A catch-up answer.
            let Some(c) = self.mastered.get_mut(&key).and_then(|m| m.catchup.as_mut()).filter(|c| c.tag == tag) else {
                return;
            };
            if !equal {
                c.waiting_sync.insert((src, mailbox.clone()));
                self.marks.hit(Mark::DigestMismatch);
                if !self.db.mailboxes.contains_key(&mailbox) {
                    let m = self.mailbox_mut(&mailbox);
                    m.uidvalidity = summary.uidvalidity;
                }
                self.send_state(src, &mailbox, false);
            }
            return;
        }
        let i_master = self.mastered.get(&key).is_some_and(|m| m.catchup.is_none());
        if equal {
            if i_master {
                let check = self.checks.entry((src, mailbox.clone())).or_default();
                check.confirmed_digest = Some(summary.digest);
                check.confirmed_at = Some(self.now);
                self.clear_overflow(src, &mailbox);
            } else if let Some(mine) = self.summary_of(&mailbox) {
                self.send(src, Msg::Mbox { tag: 0, summary: mine });
            }
            return;
        }
        self.marks.hit(Mark::DigestMismatch);
        self.send_state(src, &mailbox, false);
    }

    fn clear_overflow(&mut self, peer: Sid, mailbox: &MailboxKey) {
        if let Some(log) = self.db.logs.get_mut(&peer)
            && log.overflowed.remove(mailbox)
        {
            self.write(StoreWrite::LogOverflow { peer, mailbox: mailbox.clone(), overflowed: false });
        }
    }

    pub(crate) fn on_mbox_done(&mut self, src: Sid, tag: u64, count: u32) {
        let _ = count;
        for m in self.mastered.values_mut() {
            if let Some(c) = m.catchup.as_mut()
                && c.tag == tag
            {
                c.waiting_mbox.remove(&src);
            }
        }
        self.finish_catchups();
    }

    pub(crate) fn on_sync(&mut self, src: Sid, reply: bool, state: MailboxState) {
        if !reply {
            self.marks.hit(Mark::FullSync);
        }
        let mailbox = state.mailbox.clone();
        let out = self.merge_foreign(src, &state, false);
        if !reply {
            self.send_state(src, &mailbox, true);
            return;
        }
        let key = self.master_key(&mailbox);
        if let Some(c) = self.mastered.get_mut(&key).and_then(|m| m.catchup.as_mut()) {
            c.waiting_sync.remove(&(src, mailbox.clone()));
        }
        if !out.unresolved && self.master_cache.get(&key) == Some(&src) {
            self.dirty.remove(&mailbox);
        }
        self.finish_catchups();
    }

    /// Masters check, about once per `anti_entropy_us`, each peer's copy of every
    /// mailbox whose state the peer has not confirmed, once the log to it is drained.
    pub(crate) fn anti_entropy(&mut self) {
        let now = self.now;
        let interval = self.cfg.anti_entropy_us;
        let keys: Vec<MasterKey> = self.mastered_ready();
        if keys.is_empty() {
            return;
        }
        let peers: Vec<Sid> = self.reachable.iter().copied().filter(|p| *p != self.cfg.sid).collect();
        for peer in peers {
            let in_flight: BTreeSet<MailboxKey> = self
                .db
                .logs
                .get(&peer)
                .map(|l| l.entries.values().map(|c| c.mailbox().clone()).collect())
                .unwrap_or_default();
            let mut to_send = Vec::new();
            for (mailbox, m) in &self.db.mailboxes {
                if in_flight.contains(mailbox) || !keys.iter().any(|k| k.covers(mailbox)) {
                    continue;
                }
                let check = self.checks.get(&(peer, mailbox.clone())).copied().unwrap_or_default();
                let summary = super::cached_summary(&mut self.digests, mailbox, m);
                // A confirmed copy is checked again now and then: a peer may have lost its
                // disk and come back before anyone saw it gone, or been edited by hand.
                let fresh =
                    check.confirmed_at.is_some_and(|at| now.0.saturating_sub(at.0) < interval * RECONFIRM_PERIODS);
                if check.confirmed_digest == Some(summary.digest) && fresh {
                    continue;
                }
                if check.last_sent.is_some_and(|at| now.0.saturating_sub(at.0) < interval) {
                    continue;
                }
                to_send.push(summary);
            }
            for summary in to_send {
                self.checks.insert(
                    (peer, summary.mailbox.clone()),
                    PeerCheck { confirmed_digest: None, confirmed_at: None, last_sent: Some(now) },
                );
                self.send(peer, Msg::Mbox { tag: 0, summary });
            }
        }
    }

    /// Replicas holding a conflict they may not decide send their copy to the master.
    pub(crate) fn sync_dirty(&mut self) {
        let now = self.now;
        let dirty: Vec<(MailboxKey, Option<Instant>)> = self.dirty.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for (mailbox, last) in dirty {
            let key = self.master_key(&mailbox);
            if self.mastered.contains_key(&key) {
                self.dirty.remove(&mailbox);
                continue;
            }
            if last.is_some_and(|at| now.0.saturating_sub(at.0) < self.cfg.anti_entropy_us) {
                continue;
            }
            match self.master_cache.get(&key).copied().filter(|m| self.reachable.contains(m)) {
                Some(master) => {
                    self.dirty.insert(mailbox.clone(), Some(now));
                    self.send_state(master, &mailbox, false);
                }
                None => self.lookup_master(&key),
            }
        }
    }

    pub(crate) fn want_body(&mut self, guid: Guid, checksum: Option<u64>, hint: Option<Sid>, repair: bool) {
        let checksum = checksum
            .or_else(|| self.db.mailboxes.values().find_map(|m| m.messages.find_guid(guid)).map(|r| r.checksum))
            .unwrap_or(0);
        self.wanted_bodies.entry(guid).or_insert(WantedBody {
            checksum,
            hint,
            attempts: 0,
            next_try: self.now,
            repair,
            census: None,
        });
        // One fetch pass after the input, not one per wanted body: a SYNC can want
        // thousands.
        self.fetch_kick = true;
    }

    pub(crate) fn fetch_wanted_bodies(&mut self) {
        let now = self.now;
        let peers: Vec<Sid> = self.reachable.iter().copied().filter(|p| *p != self.cfg.sid).collect();
        if peers.is_empty() {
            return;
        }
        let wanted = &self.wanted_bodies;
        self.fetching.retain(|g, until| *until > now && wanted.contains_key(g));
        let room = FETCH_WINDOW_MAX.saturating_sub(self.fetching.len());
        let due: Vec<Guid> = self
            .wanted_bodies
            .iter()
            .filter(|(g, w)| w.next_try <= now && !self.fetching.contains_key(g))
            .map(|(g, _)| *g)
            .take(room)
            .collect();
        debug_assert!(self.fetching.len() + due.len() <= FETCH_WINDOW_MAX);
        for guid in due {
            let Some(w) = self.wanted_bodies.get(&guid) else { continue };
            let census_stale = w.census.as_ref().is_some_and(|c| c.started.plus_us(CENSUS_TIMEOUT_US) <= now);
            let tried_everyone = w.attempts as usize >= peers.len();
            if (w.census.is_none() || census_stale) && tried_everyone && self.may_run_census(guid) {
                self.start_census(guid);
                continue;
            }
            let Some(w) = self.wanted_bodies.get_mut(&guid) else { continue };
            let target = match w.hint.filter(|h| w.attempts == 0 && peers.contains(h)) {
                Some(h) => h,
                None => peers[(w.attempts as usize + guid.0 as usize) % peers.len()],
            };
            w.attempts = w.attempts.saturating_add(1);
            w.next_try = now.plus_us(FETCH_RETRY_US * u64::from(w.attempts.min(10)));
            self.fetching.insert(guid, w.next_try);
            self.send(target, Msg::Fetch { guid });
        }
    }

    pub(crate) fn on_fetch(&mut self, src: Sid, guid: Guid) {
        let Some(intact) = self.stored_body_intact(guid) else {
            self.send(src, Msg::NoBody { guid });
            return;
        };
        let Some(body) = self.db.bodies.get(&guid) else { return };
        if !intact {
            // Never hand out a corrupted body; repair our own instead.
            let checksum = body.checksum;
            self.want_body(guid, Some(checksum), None, true);
            self.send(src, Msg::NoBody { guid });
            return;
        }
        let msg = Msg::Body { guid, checksum: body.checksum, body: body.bytes.clone() };
        self.send(src, msg);
    }

    pub(crate) fn on_body(&mut self, src: Sid, guid: Guid, checksum: u64, body: Vec<u8>) {
        let Some(w) = self.wanted_bodies.get(&guid) else { return };
        let expected = if w.checksum != 0 { w.checksum } else { checksum };
        if body_checksum(&body) != expected {
            return;
        }
        let repair = w.repair;
        self.wanted_bodies.remove(&guid);
        self.fetching.remove(&guid);
        self.fetch_kick = true;
        self.put_intact_body(guid, expected, body.clone());
        self.write(StoreWrite::PutBody { guid, checksum: expected, bytes: body });
        if repair {
            self.marks.hit(Mark::BodyRepaired);
        }
        let _ = src;
        self.body_arrived(guid);
    }

    /// A census may decide that a body is gone for good only where nothing that could
    /// still bring it is in flight: we are the ready master of every mailbox that holds
    /// the message, no write of ours on those mailboxes is pending, every replica has
    /// acknowledged every change we logged for them, and every configured server is
    /// reachable to be asked.
    fn may_run_census(&self, guid: Guid) -> bool {
        if !self.cfg.servers.iter().all(|s| self.reachable.contains(s)) {
            return false;
        }
        let holders = self.mailboxes_holding(guid);
        if holders.is_empty() {
            return false;
        }
        holders.iter().all(|mailbox| {
            let key = self.master_key(mailbox);
            let ready = self.mastered.get(&key).is_some_and(|m| m.catchup.is_none());
            let job_pending = self.jobs.values().any(|j| j.key == key);
            let unacked = self.db.logs.values().any(|l| l.entries.values().any(|c| c.mailbox() == mailbox));
            ready && !job_pending && !unacked
        })
    }

    fn mailboxes_holding(&self, guid: Guid) -> Vec<MailboxKey> {
        self.db.mailboxes.iter().filter(|(_, m)| m.messages.has_guid(guid)).map(|(k, _)| k.clone()).collect()
    }

    fn start_census(&mut self, guid: Guid) {
        let now = self.now;
        let Some(w) = self.wanted_bodies.get_mut(&guid) else { return };
        w.census = Some(BodyCensus { started: now, denied: BTreeSet::new() });
        w.next_try = now.plus_us(FETCH_RETRY_US * 10);
        let others: Vec<Sid> = self.cfg.servers.iter().copied().filter(|s| *s != self.cfg.sid).collect();
        for s in others {
            self.send(s, Msg::Fetch { guid });
        }
    }

    pub(crate) fn on_no_body(&mut self, src: Sid, guid: Guid) {
        let me = self.cfg.sid;
        // The slot is free; the body is tried again (elsewhere) when its retry is due.
        self.fetching.remove(&guid);
        let Some(w) = self.wanted_bodies.get_mut(&guid) else { return };
        let Some(census) = w.census.as_mut() else { return };
        census.denied.insert(src);
        if !self.cfg.servers.iter().all(|s| *s == me || census.denied.contains(s)) {
            return;
        }
        w.census = None;
        if !self.may_run_census(guid) {
            return;
        }
        // No server has an intact copy: the message can never be read again. Expunging it
        // is the only way the servers agree; it was never acknowledged to a client, or a
        // copy would have survived (a client is told of a save only once enough servers
        // hold the body).
        for mailbox in self.mailboxes_holding(guid) {
            let messages: Vec<(Uid, Guid)> = self.db.mailboxes[&mailbox]
                .messages
                .values()
                .filter(|r| r.guid == guid)
                .map(|r| (r.uid, r.guid))
                .collect();
            self.note(|| format!("body {guid} is on no server: expunging it from {mailbox}"));
            self.submit_write(super::Origin::Internal, WriteRequest::Expunge { mailbox, messages });
        }
    }

    /// Whether the stored body of `guid` matches its checksum (None: no body stored).
    pub(crate) fn stored_body_intact(&mut self, guid: Guid) -> Option<bool> {
        let body = self.db.bodies.get(&guid)?;
        Some(*self.body_verdicts.entry(guid).or_insert_with(|| body_checksum(&body.bytes) == body.checksum))
    }

    /// Store a body whose bytes were checked against `checksum`.
    pub(crate) fn put_intact_body(&mut self, guid: Guid, checksum: u64, bytes: Vec<u8>) {
        self.db.bodies.insert(guid, StoredBody { checksum, bytes });
        self.body_verdicts.insert(guid, true);
    }

    /// Keep a body that arrived with a change, if it is intact and new here.
    pub(crate) fn store_body(&mut self, guid: Guid, checksum: u64, body: Vec<u8>, src: Option<Sid>) {
        if self.stored_body_intact(guid) == Some(true) {
            return;
        }
        if body_checksum(&body) != checksum {
            self.want_body(guid, Some(checksum), src, false);
            return;
        }
        self.wanted_bodies.remove(&guid);
        self.put_intact_body(guid, checksum, body.clone());
        self.write(StoreWrite::PutBody { guid, checksum, bytes: body });
        self.body_arrived(guid);
    }

    /// Check some bodies against their checksums, and that every message has a body.
    pub(crate) fn scrub_bodies(&mut self) {
        let start = self.scrub_cursor.map(|g| Guid(g.0.wrapping_add(1))).unwrap_or(Guid(0));
        let verdicts = &mut self.body_verdicts;
        let batch: Vec<(Guid, u64, bool)> = self
            .db
            .bodies
            .range(start..)
            .take(SCRUB_PER_TICK_MAX)
            .map(|(g, b)| {
                (*g, b.checksum, *verdicts.entry(*g).or_insert_with(|| body_checksum(&b.bytes) == b.checksum))
            })
            .collect();
        self.scrub_cursor = if batch.len() < SCRUB_PER_TICK_MAX { None } else { batch.last().map(|b| b.0) };
        for (guid, checksum, intact) in batch {
            if !intact {
                self.want_body(guid, Some(checksum), None, true);
            }
        }
        // Messages (in mailbox and UID order) with no body here and none wanted. Only a
        // message written while its body was not here, or any after a body was removed,
        // can lack one (see `write`): those are the ones looked at.
        if self.scrub_rescan {
            self.scrub_rescan = false;
            self.scrub_suspects = self
                .db
                .mailboxes
                .iter()
                .flat_map(|(k, m)| m.messages.values().map(move |r| (k, r)))
                .filter(|(_, r)| !self.db.bodies.contains_key(&r.guid))
                .map(|(k, r)| (k.clone(), r.uid))
                .collect();
        }
        let mut missing: Vec<(Guid, u64)> = Vec::new();
        let (db, wanted) = (&self.db, &self.wanted_bodies);
        self.scrub_suspects.retain(|(k, uid)| {
            let Some(r) = db.mailboxes.get(k).and_then(|m| m.messages.get(uid)) else { return false };
            if db.bodies.contains_key(&r.guid) {
                return false;
            }
            if !wanted.contains_key(&r.guid) {
                missing.push((r.guid, r.checksum));
            }
            true
        });
        debug_assert_eq!(
            missing,
            self.db
                .mailboxes
                .values()
                .flat_map(|m| m.messages.values())
                .filter(|r| !self.db.bodies.contains_key(&r.guid) && !self.wanted_bodies.contains_key(&r.guid))
                .map(|r| (r.guid, r.checksum))
                .collect::<Vec<_>>(),
            "scrub suspects missed a message without a body"
        );
        for (guid, checksum) in missing {
            self.want_body(guid, Some(checksum), None, true);
        }
        if !self.wanted_bodies.is_empty() {
            // A body whose every message was expunged meanwhile is no longer wanted.
            let mut referenced: Vec<Guid> =
                self.db.mailboxes.values().flat_map(|m| m.messages.values()).map(|r| r.guid).collect();
            referenced.sort_unstable();
            let awaited: BTreeSet<Guid> = self
                .jobs
                .values()
                .filter_map(|j| match j.state {
                    super::JobState::WaitingBody { guid } => Some(guid),
                    _ => None,
                })
                .collect();
            self.wanted_bodies.retain(|g, _| referenced.binary_search(g).is_ok() || awaited.contains(g));
        }
    }

    pub(crate) fn on_external(&mut self, edit: ExternalEdit) {
        match edit {
            ExternalEdit::Added { mailbox, guid, received, body } => {
                let request = WriteRequest::Save { mailbox, guid, received, flags: Vec::new(), body };
                self.submit_write(super::Origin::Internal, request);
            }
            ExternalEdit::Removed { mailbox, uid } => {
                let Some(record) = self.db.mailboxes.get(&mailbox).and_then(|m| m.messages.get(&uid)).cloned() else {
                    return;
                };
                self.body_verdicts.remove(&record.guid);
                if self.db.bodies.remove(&record.guid).is_some() {
                    self.write(StoreWrite::RemoveBody { guid: record.guid });
                }
                self.want_body(record.guid, Some(record.checksum), None, true);
            }
            ExternalEdit::Corrupted { guid, body } => {
                let Some(stored) = self.db.bodies.get_mut(&guid) else { return };
                stored.bytes = body.clone();
                self.body_verdicts.remove(&guid);
                let checksum = stored.checksum;
                self.write(StoreWrite::PutBody { guid, checksum, bytes: body });
            }
        }
    }
}
