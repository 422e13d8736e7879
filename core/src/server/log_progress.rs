//! How the replication logs are doing, both ways. Outgoing: when each entry of a peer's
//! log was last sent, and which job waits for which entries (a change too large for one
//! command goes as several entries, and a peer counts as a copy once it acknowledged
//! all of them). Incoming: changes received whose acknowledgement waits until the
//! writes they made are durable. The logs themselves are on disk (see `image`).

use super::jobs::JobId;
use crate::io::WriteId;
use crate::types::{Instant, Sid};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct LogProgress {
    /// When each (peer, seq) entry was last sent.
    sent_at: BTreeMap<(Sid, u64), Instant>,
    /// The same, oldest send first: when the next resend is due, without a scan.
    sent_order: BTreeSet<(Instant, Sid, u64)>,
    /// The job (by id) waiting for each (peer, seq) entry.
    waiters: BTreeMap<(Sid, u64), JobId>,
    /// Per (job id, peer): entries of the job's change that peer has yet to acknowledge.
    parts_left: BTreeMap<(JobId, Sid), usize>,
    /// Changes received and not yet acknowledged: (peer, seq, our last write when it
    /// was applied, whether we took it).
    owed: Vec<(Sid, u64, WriteId, bool)>,
}

/// Acknowledgements that may go out now, per peer: (taken, refused) sequence numbers.
pub(crate) type ReadyAcks = BTreeMap<Sid, (Vec<u64>, Vec<u64>)>;

impl LogProgress {
    pub(crate) fn sent(&mut self, peer: Sid, seq: u64, now: Instant) {
        if let Some(before) = self.sent_at.insert((peer, seq), now) {
            self.sent_order.remove(&(before, peer, seq));
        }
        self.sent_order.insert((now, peer, seq));
        debug_assert_eq!(self.sent_at.len(), self.sent_order.len());
    }

    fn forget_sent(&mut self, peer: Sid, seq: u64) {
        if let Some(at) = self.sent_at.remove(&(peer, seq)) {
            self.sent_order.remove(&(at, peer, seq));
        }
        debug_assert_eq!(self.sent_at.len(), self.sent_order.len());
    }

    /// When the oldest entry sent and not acknowledged is due to go again.
    pub(crate) fn next_resend(&self, interval_us: u64) -> Option<Instant> {
        self.sent_order.first().map(|(at, _, _)| at.plus_us(interval_us))
    }

    /// Whether an entry is due to be sent: never sent, or last sent `interval_us` ago.
    pub(crate) fn send_due(&self, peer: Sid, seq: u64, now: Instant, interval_us: u64) -> bool {
        self.sent_at.get(&(peer, seq)).is_none_or(|at| now.0.saturating_sub(at.0) >= interval_us)
    }

    /// Everything in `peer`'s log goes out again at once (a new link, or it came back).
    pub(crate) fn resend_all(&mut self, peer: Sid) {
        self.sent_at.retain(|(p, _), _| *p != peer);
        self.sent_order.retain(|(_, p, _)| *p != peer);
        debug_assert_eq!(self.sent_at.len(), self.sent_order.len());
    }

    /// Job `id` waits for `peer` to acknowledge entry `seq`.
    pub(crate) fn wait_for(&mut self, peer: Sid, seq: u64, id: JobId) {
        self.waiters.insert((peer, seq), id);
        *self.parts_left.entry((id, peer)).or_default() += 1;
    }

    /// Entry `seq` went to `peer` without what makes it a copy (its body): the job
    /// waiting for it is not helped by its acknowledgement.
    pub(crate) fn counts_for_no_copy(&mut self, peer: Sid, seq: u64) {
        self.waiters.remove(&(peer, seq));
    }

    /// Entries dropped from a log (it overflowed): nobody waits for them.
    pub(crate) fn dropped(&mut self, peer: Sid, seqs: &[u64]) {
        for s in seqs {
            self.forget_sent(peer, *s);
            self.waiters.remove(&(peer, *s));
        }
    }

    /// `peer` acknowledged entry `seq`, having taken it (`held`) or refused it. Returns
    /// the job for which `peer` now counts as a copy: the last of its entries was taken.
    pub(crate) fn acknowledged(&mut self, peer: Sid, seq: u64, held: bool) -> Option<JobId> {
        self.forget_sent(peer, seq);
        let id = self.waiters.remove(&(peer, seq))?;
        if !held {
            // The peer did not take the change: it is no copy of the message.
            return None;
        }
        let left = self.parts_left.entry((id, peer)).or_insert(1);
        *left = left.saturating_sub(1);
        if *left > 0 {
            return None;
        }
        self.parts_left.remove(&(id, peer));
        Some(id)
    }

    /// Job `id` is over: its entries are still delivered, but nobody waits for them.
    pub(crate) fn job_over(&mut self, id: JobId) {
        self.waiters.retain(|_, t| *t != id);
        self.parts_left.retain(|(t, _), _| *t != id);
    }

    /// A change from `peer`'s log was handled; its acknowledgement waits for `write`.
    pub(crate) fn owe(&mut self, peer: Sid, seq: u64, write: WriteId, taken: bool) {
        self.owed.push((peer, seq, write, taken));
    }

    /// Acknowledgements whose writes are durable, taken out of those owed.
    /// Whether any owed acknowledgement waits on a durable write. Acknowledgements are
    /// owed in the order of their writes, so the first owed tells.
    pub(crate) fn has_ready_acks(&self, is_durable: impl Fn(WriteId) -> bool) -> bool {
        debug_assert!(self.owed.windows(2).all(|w| w[0].2 <= w[1].2), "acknowledgements owed in write order");
        self.owed.first().is_some_and(|(_, _, write, _)| is_durable(*write))
    }

    pub(crate) fn take_ready_acks(&mut self, is_durable: impl Fn(WriteId) -> bool) -> ReadyAcks {
        let mut ready = ReadyAcks::new();
        if self.owed.is_empty() {
            return ready;
        }
        // In place: most calls find nothing durable yet, and a taken vector would be
        // grown again from empty each time.
        self.owed.retain(|&(peer, seq, write, taken)| {
            if !is_durable(write) {
                return true;
            }
            let (seqs, refused) = ready.entry(peer).or_default();
            if taken { seqs } else { refused }.push(seq);
            false
        });
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_counts_once_every_part_is_taken() {
        let mut p = LogProgress::default();
        p.wait_for(Sid(2), 10, JobId(7));
        p.wait_for(Sid(2), 11, JobId(7));
        assert_eq!(p.acknowledged(Sid(2), 10, true), None, "one part left");
        assert_eq!(p.acknowledged(Sid(2), 11, true), Some(JobId(7)));
        assert_eq!(p.acknowledged(Sid(2), 11, true), None, "acknowledged once");
    }

    #[test]
    fn a_refused_change_is_no_copy() {
        let mut p = LogProgress::default();
        p.wait_for(Sid(3), 1, JobId(9));
        assert_eq!(p.acknowledged(Sid(3), 1, false), None);
    }

    #[test]
    fn entries_are_resent_after_the_interval_or_a_new_link() {
        let mut p = LogProgress::default();
        p.sent(Sid(2), 1, Instant(100));
        assert!(!p.send_due(Sid(2), 1, Instant(150), 100));
        assert!(p.send_due(Sid(2), 1, Instant(200), 100));
        p.resend_all(Sid(2));
        assert!(p.send_due(Sid(2), 1, Instant(150), 100));
    }

    #[test]
    fn the_next_resend_follows_the_oldest_unacknowledged_send() {
        let mut p = LogProgress::default();
        assert_eq!(p.next_resend(100), None);
        p.sent(Sid(2), 1, Instant(100));
        p.sent(Sid(3), 1, Instant(120));
        assert_eq!(p.next_resend(100), Some(Instant(200)));
        p.sent(Sid(2), 1, Instant(300));
        assert_eq!(p.next_resend(100), Some(Instant(220)), "a resend moves the entry back");
        p.acknowledged(Sid(3), 1, true);
        assert_eq!(p.next_resend(100), Some(Instant(400)));
        p.resend_all(Sid(2));
        assert_eq!(p.next_resend(100), None);
    }

    #[test]
    fn acks_wait_for_durability_and_keep_their_order() {
        let mut p = LogProgress::default();
        p.owe(Sid(2), 1, 5, true);
        p.owe(Sid(2), 2, 6, false);
        p.owe(Sid(3), 1, 9, true);
        let ready = p.take_ready_acks(|w| w <= 6);
        assert_eq!(ready.get(&Sid(2)), Some(&(vec![1], vec![2])));
        assert!(!ready.contains_key(&Sid(3)));
        assert_eq!(p.take_ready_acks(|_| true).get(&Sid(3)), Some(&(vec![1], vec![])));
    }

    #[test]
    fn an_overflow_or_a_finished_job_leaves_nobody_waiting() {
        let mut p = LogProgress::default();
        p.wait_for(Sid(2), 1, JobId(7));
        p.wait_for(Sid(3), 1, JobId(8));
        p.dropped(Sid(2), &[1]);
        p.job_over(JobId(8));
        assert_eq!(p.acknowledged(Sid(2), 1, true), None);
        assert_eq!(p.acknowledged(Sid(3), 1, true), None);
    }
}
