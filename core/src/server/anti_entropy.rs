//! What anti-entropy remembers: for a master, each peer's copy of each mailbox (when we
//! last sent our summary, when the peer last showed the same digest); for both sides,
//! the last point two copies agreed on, so a resync can send only what changed since;
//! and for a replica, the mailboxes holding a conflict it may not decide (dirty), whose
//! copy goes to the master.

use crate::types::{Instant, MailboxKey, MasterKey, ModSeq, Sid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Delta SYNCs tried after a common point before falling back to a full one: a heal
/// can bring a catch-up and an anti-entropy round for the same mailbox.
pub(crate) const DELTA_SYNCS_MAX: u8 = 3;

/// Mailboxes a master examines per peer in one anti-entropy pass at most; the next pass
/// goes on where this one stopped, so a store of any size is checked round by round
/// with bounded work per pass.
pub(crate) const EXAMINED_PER_PASS_MAX: usize = 2048;

/// A master's anti-entropy record of one peer's copy of one mailbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCheck {
    pub confirmed_digest: Option<u64>,
    pub confirmed_at: Option<Instant>,
    pub last_sent: Option<Instant>,
    /// The digest the peer last confirmed and when it first confirmed it: kept across
    /// new summaries, so tombstone collection knows how long the copies have agreed.
    pub agreed_since: Option<(u64, Instant)>,
    /// Our digest when a pass last looked at this copy: a digest that moved since
    /// means the mailbox is still changing (see `Server::summary_to_check`).
    #[serde(default)]
    pub examined_digest: Option<u64>,
}

/// A point both copies of a mailbox had reached, and how many delta SYNCs may still be
/// tried from it before a full one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonPoint {
    pub modseq: ModSeq,
    pub deltas_left: u8,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct AntiEntropy {
    checks: BTreeMap<(Sid, MailboxKey), PeerCheck>,
    /// Kept across link changes (that is when it pays); lost on restart, then SYNC is
    /// full.
    common: BTreeMap<(Sid, MailboxKey), CommonPoint>,
    /// Mailboxes whose copy must go to the master, with when it last went.
    dirty: BTreeMap<MailboxKey, Option<Instant>>,
    /// Per peer, the last mailbox the previous pass examined when it stopped short.
    resume_after: BTreeMap<Sid, MailboxKey>,
    /// The last mailbox the previous tombstone-collection pass examined when it stopped
    /// short.
    collect_after: Option<MailboxKey>,
    /// Set when a peer became reachable or a mastership became ready: checking copies
    /// then (not at the next maintenance pass, up to a second later) starts a resync at once.
    kick: bool,
}

impl AntiEntropy {
    pub(crate) fn check(&self, peer: Sid, mailbox: &MailboxKey) -> PeerCheck {
        self.checks.get(&(peer, mailbox.clone())).copied().unwrap_or_default()
    }

    /// Our summary of `mailbox`, at `digest`, went to `peer`; its confirmation is awaited
    /// again.
    pub(crate) fn summary_sent(&mut self, peer: Sid, mailbox: MailboxKey, digest: u64, now: Instant) {
        let check = self.checks.entry((peer, mailbox)).or_default();
        *check = PeerCheck {
            last_sent: Some(now),
            agreed_since: check.agreed_since,
            examined_digest: Some(digest),
            ..PeerCheck::default()
        };
    }

    /// A pass looked at `peer`'s copy of `mailbox` while ours was at `digest`, and sent
    /// nothing.
    pub(crate) fn examined(&mut self, peer: Sid, mailbox: MailboxKey, digest: u64) {
        self.checks.entry((peer, mailbox)).or_default().examined_digest = Some(digest);
    }

    /// `peer` showed the same digest as ours.
    pub(crate) fn confirmed(&mut self, peer: Sid, mailbox: MailboxKey, digest: u64, now: Instant) {
        let check = self.checks.entry((peer, mailbox)).or_default();
        check.confirmed_digest = Some(digest);
        check.confirmed_at = Some(now);
        if check.agreed_since.is_none_or(|(d, _)| d != digest) {
            check.agreed_since = Some((digest, now));
        }
    }

    /// Since when `peer` has shown `digest` for `mailbox` (None: it has not, or not
    /// since it was last reconnected).
    pub(crate) fn agreed_since(&self, peer: Sid, mailbox: &MailboxKey, digest: u64) -> Option<Instant> {
        let check = self.checks.get(&(peer, mailbox.clone()))?;
        check.agreed_since.filter(|(d, _)| *d == digest).map(|(_, at)| at)
    }

    /// Where the next tombstone-collection pass starts: after this mailbox.
    pub(crate) fn collection_start(&self) -> Option<&MailboxKey> {
        self.collect_after.as_ref()
    }

    pub(crate) fn collection_ended(&mut self, last: Option<MailboxKey>) {
        self.collect_after = last;
    }

    /// Where the next pass for `peer` starts: after this mailbox (None: at the first).
    pub(crate) fn pass_start(&self, peer: Sid) -> Option<&MailboxKey> {
        self.resume_after.get(&peer)
    }

    /// A pass for `peer` stopped after `last` (None: it went all the way round).
    pub(crate) fn pass_ended(&mut self, peer: Sid, last: Option<MailboxKey>) {
        match last {
            Some(k) => self.resume_after.insert(peer, k),
            None => self.resume_after.remove(&peer),
        };
    }

    pub(crate) fn forget_check(&mut self, peer: Sid, mailbox: &MailboxKey) {
        self.checks.remove(&(peer, mailbox.clone()));
    }

    /// Every peer's copy of the mailboxes `key` covers is checked again (a new
    /// mastership: what was confirmed to an earlier one says nothing of the changes
    /// made meanwhile by another master). Since when a peer has shown a digest stays:
    /// it is about that digest only, whoever mastered the mailbox then.
    pub(crate) fn recheck_mailboxes(&mut self, key: &MasterKey, peers: &[Sid]) {
        let recheck =
            |check: &mut PeerCheck| *check = PeerCheck { agreed_since: check.agreed_since, ..PeerCheck::default() };
        match key {
            // One mailbox, the common key: found directly, not by a walk of every check.
            MasterKey::Mailbox(mailbox) => {
                for &peer in peers {
                    if let Some(check) = self.checks.get_mut(&(peer, mailbox.clone())) {
                        recheck(check);
                    }
                }
            }
            _ => self.checks.iter_mut().filter(|((_, k), _)| key.covers(k)).for_each(|(_, check)| recheck(check)),
        }
    }

    /// Every copy of `peer`'s is checked again (it may have restarted with another disk).
    pub(crate) fn recheck_peer(&mut self, peer: Sid) {
        self.checks.retain(|(p, _), _| *p != peer);
    }

    /// `peer` has another store now (its disk was lost or replaced): nothing we knew of
    /// its copies holds, least of all a point they had reached, from which a SYNC would
    /// send only what changed since and leave out everything before it.
    pub(crate) fn forget_peer(&mut self, peer: Sid) {
        self.checks.retain(|(p, _), _| *p != peer);
        self.common.retain(|(p, _), _| *p != peer);
        self.resume_after.remove(&peer);
    }

    /// Both copies reached `modseq`.
    pub(crate) fn agreed(&mut self, peer: Sid, mailbox: MailboxKey, modseq: ModSeq) {
        self.common.insert((peer, mailbox), CommonPoint { modseq, deltas_left: DELTA_SYNCS_MAX });
    }

    pub(crate) fn common_point(&self, peer: Sid, mailbox: &MailboxKey) -> Option<CommonPoint> {
        self.common.get(&(peer, mailbox.clone())).copied()
    }

    pub(crate) fn forget_common_point(&mut self, peer: Sid, mailbox: &MailboxKey) {
        self.common.remove(&(peer, mailbox.clone()));
    }

    /// Where a SYNC to `peer` may start: the common point, while delta SYNCs are left
    /// (one is used up); None for a full SYNC.
    pub(crate) fn take_delta_base(&mut self, peer: Sid, mailbox: &MailboxKey) -> Option<ModSeq> {
        let key = (peer, mailbox.clone());
        match self.common.get_mut(&key) {
            Some(point) if point.deltas_left > 0 => {
                point.deltas_left -= 1;
                Some(point.modseq)
            }
            Some(_) => {
                self.common.remove(&key);
                None
            }
            None => None,
        }
    }

    pub(crate) fn mark_dirty(&mut self, mailbox: MailboxKey) {
        self.dirty.entry(mailbox).or_insert(None);
    }

    pub(crate) fn clean(&mut self, mailbox: &MailboxKey) {
        self.dirty.remove(mailbox);
    }

    /// Our copy of a dirty mailbox went to its master.
    pub(crate) fn dirty_sent(&mut self, mailbox: MailboxKey, now: Instant) {
        self.dirty.insert(mailbox, Some(now));
    }

    pub(crate) fn dirty(&self) -> Vec<(MailboxKey, Option<Instant>)> {
        self.dirty.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    pub(crate) fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    pub(crate) fn kick(&mut self) {
        self.kick = true;
    }

    pub(crate) fn take_kick(&mut self) -> bool {
        std::mem::take(&mut self.kick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb() -> MailboxKey {
        MailboxKey::from_shared("alice".into(), "INBOX".into())
    }

    #[test]
    fn a_common_point_allows_a_few_deltas_then_a_full_sync() {
        let mut a = AntiEntropy::default();
        assert_eq!(a.take_delta_base(Sid(2), &mb()), None, "no common point: full");
        a.agreed(Sid(2), mb(), 40);
        for _ in 0..DELTA_SYNCS_MAX {
            assert_eq!(a.take_delta_base(Sid(2), &mb()), Some(40));
        }
        assert_eq!(a.take_delta_base(Sid(2), &mb()), None);
        assert_eq!(a.common_point(Sid(2), &mb()), None, "the used-up point is gone");
    }

    #[test]
    fn a_peer_with_a_new_store_gets_full_syncs_only() {
        let mut a = AntiEntropy::default();
        a.agreed(Sid(2), mb(), 40);
        a.agreed(Sid(3), mb(), 40);
        a.confirmed(Sid(2), mb(), 77, Instant(10));
        a.forget_peer(Sid(2));
        assert_eq!(a.take_delta_base(Sid(2), &mb()), None, "the old store's point is gone");
        assert_eq!(a.check(Sid(2), &mb()), PeerCheck::default(), "and every confirmation of it");
        assert_eq!(a.take_delta_base(Sid(3), &mb()), Some(40), "other peers keep theirs");
    }

    #[test]
    fn a_sent_summary_waits_for_a_new_confirmation() {
        let mut a = AntiEntropy::default();
        a.confirmed(Sid(2), mb(), 77, Instant(10));
        assert_eq!(a.check(Sid(2), &mb()).confirmed_digest, Some(77));
        a.summary_sent(Sid(2), mb(), 77, Instant(20));
        assert_eq!(
            a.check(Sid(2), &mb()),
            PeerCheck {
                confirmed_digest: None,
                confirmed_at: None,
                last_sent: Some(Instant(20)),
                agreed_since: Some((77, Instant(10))),
                examined_digest: Some(77),
            }
        );
        assert_eq!(a.agreed_since(Sid(2), &mb(), 77), Some(Instant(10)), "agreement outlives a new summary");
        a.confirmed(Sid(2), mb(), 77, Instant(30));
        assert_eq!(a.agreed_since(Sid(2), &mb(), 77), Some(Instant(10)), "a reconfirmation keeps the start");
        a.confirmed(Sid(2), mb(), 78, Instant(40));
        assert_eq!(a.agreed_since(Sid(2), &mb(), 78), Some(Instant(40)), "another digest starts again");
        assert_eq!(a.agreed_since(Sid(2), &mb(), 77), None);
        a.recheck_peer(Sid(2));
        assert_eq!(a.check(Sid(2), &mb()), PeerCheck::default());
    }

    #[test]
    fn a_dirty_mailbox_keeps_when_it_was_sent() {
        let mut a = AntiEntropy::default();
        a.mark_dirty(mb());
        a.dirty_sent(mb(), Instant(5));
        a.mark_dirty(mb());
        assert_eq!(a.dirty(), vec![(mb(), Some(Instant(5)))], "marking again keeps the time");
        a.clean(&mb());
        assert_eq!(a.dirty_count(), 0);
    }

    #[test]
    fn a_pass_resumes_where_the_last_stopped() {
        let mut ae = AntiEntropy::default();
        assert_eq!(ae.pass_start(Sid(2)), None);
        ae.pass_ended(Sid(2), Some(mb()));
        assert_eq!(ae.pass_start(Sid(2)), Some(&mb()));
        assert_eq!(ae.pass_start(Sid(3)), None, "each peer has its own place");
        ae.pass_ended(Sid(2), None);
        assert_eq!(ae.pass_start(Sid(2)), None);
    }

    #[test]
    fn a_kick_is_taken_once() {
        let mut a = AntiEntropy::default();
        a.kick();
        assert!(a.take_kick());
        assert!(!a.take_kick());
    }
}
