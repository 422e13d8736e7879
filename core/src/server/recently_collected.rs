//! Bindings this server saw collected lately: tombstones turned into retired UIDs (see
//! `tombstones`), by the master here or by a collection it replicated. A copy of one of
//! those bindings that arrives after the collection (a duplicate of a log entry that an
//! acknowledged copy overtook on another path, a state sent before the collection) is a
//! copy of a message the cluster expunged, not mail no other server has: it is dropped
//! before it is merged (explore seeds 167756 and 184755, where a master placed such a
//! copy at a new UID and brought an expunged message back). Past the horizon, or once
//! forgotten (a restart), the merge's own rule applies: a message on a retired UID moves
//! to a new one, as it may be mail that only a disk which forgot the retirement holds.
//!
//! Memory is enough: a late copy travels only on a link (a message in flight, or held
//! in a relay's queue for us), and a restart closes every link, with whatever they
//! held. What reaches a restarted server is what its peers send anew: their logs, which
//! held no change of the mailbox when they confirmed the copy the collection waited for
//! (`tombstones`), and their states, which agree with that copy (the binding tombstoned
//! or retired there too). Only a disk restored from before the expunge brings the
//! binding back after that: its server holds the copy durably and sends it again and
//! again, so the server that drops it also tells it the binding is collected
//! (`Server::tell_collected`), and the copy goes there too; past the horizon the merge's
//! rule above applies.
use crate::types::{Guid, Instant, MailboxKey, MailboxState, Uid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Collected bindings remembered at most, over every mailbox; when full, the oldest go.
pub(crate) const RECENTLY_COLLECTED_MAX: usize = 4096;
/// How long a collected binding is remembered: far longer than any message stays in
/// flight between servers (a copy older than this went through a restart or a disk).
pub(crate) const RECENTLY_COLLECTED_KEPT_US: u64 = 600_000_000;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct RecentlyCollected {
    /// By mailbox, then (UIDVALIDITY, UID, GUID): when the collection was seen here.
    /// A mailbox with none is not listed.
    bindings: BTreeMap<MailboxKey, BTreeMap<(u32, Uid, Guid), Instant>>,
}

impl RecentlyCollected {
    /// The tombstones of these bindings of `mailbox` (at `uidvalidity`) were collected.
    pub(crate) fn note(&mut self, mailbox: &MailboxKey, uidvalidity: u32, collected: &[(Uid, Guid)], now: Instant) {
        let mut count = self.len();
        for &(uid, guid) in collected {
            if count >= RECENTLY_COLLECTED_MAX {
                self.forget_oldest();
                count -= 1;
            }
            if self.bindings.entry(mailbox.clone()).or_default().insert((uidvalidity, uid, guid), now).is_none() {
                count += 1;
            }
        }
        debug_assert_eq!(count, self.len());
        debug_assert!(count <= RECENTLY_COLLECTED_MAX);
    }

    /// Bindings remembered, in all.
    fn len(&self) -> usize {
        self.bindings.values().map(BTreeMap::len).sum()
    }

    fn forget_oldest(&mut self) {
        let oldest = self
            .bindings
            .iter()
            .flat_map(|(k, b)| b.iter().map(move |(binding, at)| (*at, k, *binding)))
            .min()
            .map(|(_, k, binding)| (k.clone(), binding));
        let Some((mailbox, binding)) = oldest else { return };
        if let Some(b) = self.bindings.get_mut(&mailbox) {
            b.remove(&binding);
            if b.is_empty() {
                self.bindings.remove(&mailbox);
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }

    /// Forgets what is older than the horizon.
    pub(crate) fn expire(&mut self, now: Instant) {
        let fresh = |at: &Instant| at.plus_us(RECENTLY_COLLECTED_KEPT_US) > now;
        for b in self.bindings.values_mut() {
            b.retain(|_, at| fresh(at));
        }
        self.bindings.retain(|_, b| !b.is_empty());
    }

    /// The highest UID of `mailbox` (at `uidvalidity`) at which `guid` was collected
    /// lately: a COPY of it back there is a new message (`Server::copy_guid`), as it
    /// is while the tombstone is there.
    pub(crate) fn collected_at(&self, mailbox: &MailboxKey, uidvalidity: u32, guid: Guid) -> Option<Uid> {
        let collected = self.bindings.get(mailbox)?;
        let range = (uidvalidity, 0, Guid(0))..=(uidvalidity, Uid::MAX, Guid(u128::MAX));
        collected.range(range).filter(|((_, _, g), _)| *g == guid).map(|((_, uid, _), _)| *uid).max()
    }

    /// `state` without its records of bindings collected here lately whose message is
    /// not live here (`live_here`) any more, and the bindings that went; None when it has
    /// none.
    /// A message live here at another UID was moved, not expunged: its record stays, and
    /// the merge takes its flag changes to where it lives (scenario
    /// `laptop-flag-during-sync`).
    pub(crate) fn without_collected(
        &self,
        state: &MailboxState,
        live_here: impl Fn(Guid) -> bool,
    ) -> Option<(MailboxState, Vec<(Uid, Guid)>)> {
        let collected = self.bindings.get(&state.mailbox)?;
        let stale = |uid: Uid, guid: Guid| collected.contains_key(&(state.uidvalidity, uid, guid)) && !live_here(guid);
        let dropped: Vec<(Uid, Guid)> =
            state.messages.iter().filter(|r| stale(r.uid, r.guid)).map(|r| (r.uid, r.guid)).collect();
        if dropped.is_empty() {
            return None;
        }
        let mut kept = state.clone();
        kept.messages.retain(|r| !stale(r.uid, r.guid));
        Some((kept, dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::MessageRecord;

    fn mb() -> MailboxKey {
        MailboxKey::from_shared("alice".into(), "INBOX".into())
    }

    fn record(uid: Uid, guid: u128) -> MessageRecord {
        MessageRecord::bare(uid, guid, 1)
    }

    #[test]
    fn a_copy_of_a_collected_binding_is_dropped_and_nothing_else() {
        let mut r = RecentlyCollected::default();
        let mut state = MailboxState::empty(mb(), 7);
        state.messages = vec![record(2, 20), record(3, 30), record(4, 40)];
        assert!(r.without_collected(&state, |_| false).is_none(), "nothing collected yet");
        r.note(&mb(), 7, &[(2, Guid(20)), (3, Guid(99))], Instant(0));
        let (kept, dropped) = r.without_collected(&state, |_| false).expect("one stale copy");
        assert_eq!(dropped, vec![(2, Guid(20))]);
        assert_eq!(kept.messages.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![3, 4], "another GUID at 3 stays");
        assert!(r.without_collected(&state, |g| g == Guid(20)).is_none(), "a message moved, not expunged, stays");
        state.uidvalidity = 8;
        assert!(r.without_collected(&state, |_| false).is_none(), "another incarnation's UIDs mean something else");
        assert_eq!(r.collected_at(&mb(), 7, Guid(20)), Some(2));
        assert_eq!(r.collected_at(&mb(), 8, Guid(20)), None, "another incarnation");
        assert_eq!(r.collected_at(&mb(), 7, Guid(30)), None, "collected at 3 was another GUID");
        r.expire(Instant(RECENTLY_COLLECTED_KEPT_US));
        assert_eq!(r.collected_at(&mb(), 7, Guid(20)), None, "forgotten past the horizon");
        state.uidvalidity = 7;
        assert!(r.without_collected(&state, |_| false).is_none(), "forgotten past the horizon");
    }

    #[test]
    fn the_memory_is_bounded_and_forgets_the_oldest() {
        let mut r = RecentlyCollected::default();
        for uid in 1..=(RECENTLY_COLLECTED_MAX as u32 + 5) {
            r.note(&mb(), 7, &[(uid, Guid(u128::from(uid)))], Instant(u64::from(uid)));
        }
        assert_eq!(r.len(), RECENTLY_COLLECTED_MAX);
        let mut state = MailboxState::empty(mb(), 7);
        state.messages = vec![record(1, 1), record(6, 6)];
        let (kept, _) = r.without_collected(&state, |_| false).expect("the newer one is remembered");
        assert_eq!(kept.messages.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![1], "the oldest was forgotten");
    }
}
