//! How the replication logs are doing, both ways. Outgoing: when each entry of a peer's
//! log was last sent, and which job waits for which entries (a change too large for one
//! command goes as several entries, and a peer counts as a copy once it acknowledged
//! all of them). Incoming: changes received whose acknowledgement waits until the
//! writes they made are durable. The logs themselves are on disk (see `image`).

use crate::io::WriteId;
use crate::types::{Instant, Sid};
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub(crate) struct LogProgress {
    /// When each (peer, seq) entry was last sent.
    sent_at: BTreeMap<(Sid, u64), Instant>,
    /// The job (by tag) waiting for each (peer, seq) entry.
    waiters: BTreeMap<(Sid, u64), u64>,
    /// Per (job tag, peer): entries of the job's change that peer has yet to acknowledge.
    parts_left: BTreeMap<(u64, Sid), usize>,
    /// Changes received and not yet acknowledged: (peer, seq, our last write when it
    /// was applied, whether we took it).
    owed: Vec<(Sid, u64, WriteId, bool)>,
}

/// Acknowledgements that may go out now, per peer: (taken, refused) sequence numbers.
pub(crate) type ReadyAcks = BTreeMap<Sid, (Vec<u64>, Vec<u64>)>;

impl LogProgress {
    pub(crate) fn sent(&mut self, peer: Sid, seq: u64, now: Instant) {
        self.sent_at.insert((peer, seq), now);
    }

    /// Whether an entry is due to be sent: never sent, or last sent `interval_us` ago.
    pub(crate) fn send_due(&self, peer: Sid, seq: u64, now: Instant, interval_us: u64) -> bool {
        self.sent_at.get(&(peer, seq)).is_none_or(|at| now.0.saturating_sub(at.0) >= interval_us)
    }

    /// Everything in `peer`'s log goes out again at once (a new link, or it came back).
    pub(crate) fn resend_all(&mut self, peer: Sid) {
        self.sent_at.retain(|(p, _), _| *p != peer);
    }

    /// Job `tag` waits for `peer` to acknowledge entry `seq`.
    pub(crate) fn wait_for(&mut self, peer: Sid, seq: u64, tag: u64) {
        self.waiters.insert((peer, seq), tag);
        *self.parts_left.entry((tag, peer)).or_default() += 1;
    }

    /// Entry `seq` went to `peer` without what makes it a copy (its body): the job
    /// waiting for it is not helped by its acknowledgement.
    pub(crate) fn counts_for_no_copy(&mut self, peer: Sid, seq: u64) {
        self.waiters.remove(&(peer, seq));
    }

    /// Entries dropped from a log (it overflowed): nobody waits for them.
    pub(crate) fn dropped(&mut self, peer: Sid, seqs: &[u64]) {
        for s in seqs {
            self.sent_at.remove(&(peer, *s));
            self.waiters.remove(&(peer, *s));
        }
    }

    /// `peer` acknowledged entry `seq`, having taken it (`held`) or refused it. Returns
    /// the job for which `peer` now counts as a copy: the last of its entries was taken.
    pub(crate) fn acknowledged(&mut self, peer: Sid, seq: u64, held: bool) -> Option<u64> {
        self.sent_at.remove(&(peer, seq));
        let tag = self.waiters.remove(&(peer, seq))?;
        if !held {
            // The peer did not take the change: it is no copy of the message.
            return None;
        }
        let left = self.parts_left.entry((tag, peer)).or_insert(1);
        *left = left.saturating_sub(1);
        if *left > 0 {
            return None;
        }
        self.parts_left.remove(&(tag, peer));
        Some(tag)
    }

    /// Job `tag` is over: its entries are still delivered, but nobody waits for them.
    pub(crate) fn job_over(&mut self, tag: u64) {
        self.waiters.retain(|_, t| *t != tag);
        self.parts_left.retain(|(t, _), _| *t != tag);
    }

    /// A change from `peer`'s log was handled; its acknowledgement waits for `write`.
    pub(crate) fn owe(&mut self, peer: Sid, seq: u64, write: WriteId, taken: bool) {
        self.owed.push((peer, seq, write, taken));
    }

    /// Acknowledgements whose writes are durable, taken out of those owed.
    pub(crate) fn take_ready_acks(&mut self, is_durable: impl Fn(WriteId) -> bool) -> ReadyAcks {
        let mut ready = ReadyAcks::new();
        if self.owed.is_empty() {
            return ready;
        }
        let owed = std::mem::take(&mut self.owed);
        for (peer, seq, write, taken) in owed {
            if !is_durable(write) {
                self.owed.push((peer, seq, write, taken));
                continue;
            }
            let (seqs, refused) = ready.entry(peer).or_default();
            if taken { seqs } else { refused }.push(seq);
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_counts_once_every_part_is_taken() {
        let mut p = LogProgress::default();
        p.wait_for(Sid(2), 10, 7);
        p.wait_for(Sid(2), 11, 7);
        assert_eq!(p.acknowledged(Sid(2), 10, true), None, "one part left");
        assert_eq!(p.acknowledged(Sid(2), 11, true), Some(7));
        assert_eq!(p.acknowledged(Sid(2), 11, true), None, "acknowledged once");
    }

    #[test]
    fn a_refused_change_is_no_copy() {
        let mut p = LogProgress::default();
        p.wait_for(Sid(3), 1, 9);
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
        p.wait_for(Sid(2), 1, 7);
        p.wait_for(Sid(3), 1, 8);
        p.dropped(Sid(2), &[1]);
        p.job_over(8);
        assert_eq!(p.acknowledged(Sid(2), 1, true), None);
        assert_eq!(p.acknowledged(Sid(3), 1, true), None);
    }
}
