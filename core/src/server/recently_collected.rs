//! Bindings this server saw collected lately: tombstones turned into retired UIDs (see
//! `tombstones`), by the master here or by a collection it replicated. A copy of one of
//! those bindings that arrives after the collection (a duplicate of a log entry that an
//! acknowledged copy overtook on another path, a state sent before the collection) is a
//! copy of a message the cluster expunged, not mail no other server has: it is dropped
//! before it is merged (explore seeds 167756 and 184755, where a master placed such a
//! copy at a new UID and brought an expunged message back). Past the horizon (seven
//! days), beyond the newest 65,536, or once forgotten (a restart), the merge's own rule
//! applies: a message on a retired UID moves to a new one, as it may be mail that only
//! a disk which forgot the retirement holds.
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

/// Collected bindings remembered at most, over every mailbox (some 200 bytes each with
/// the age index, so about 13 MB at most); when full, the oldest go.
pub(crate) const RECENTLY_COLLECTED_MAX: usize = 65_536;
/// How long a collected binding is remembered: far longer than any message stays in
/// flight between servers, and long enough that a store put back from a VM or
/// filesystem snapshot of the last days (its identity kept, nothing to tell it from the
/// store it was) has its copies of bindings collected since dropped by any server
/// that saw the collection and has not restarted since, rather than moved to new UIDs
/// as mail (the `restore` focus with the restore put past a ten-minute memory brought
/// expunged mail back in 239 of 1,000 seeds, the identity kept or not, by hand).
pub(crate) const RECENTLY_COLLECTED_KEPT_US: u64 = 7 * 24 * 3600 * 1_000_000;

/// How long a COPY back into a mailbox of a message whose binding there was collected
/// still takes a derived GUID (`Server::copy_guid`): the ten minutes this memory kept
/// before it kept bindings for days, so that a message moved to Trash and back ever so
/// often in a week is not refused as "copied back too often".
pub(crate) const COPY_BACK_AFTER_COLLECTION_US: u64 = 600_000_000;

type Binding = (u32, Uid, Guid);

#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(from = "CollectedBindings", into = "CollectedBindings")]
pub(crate) struct RecentlyCollected {
    /// By mailbox, then (UIDVALIDITY, UID, GUID): when the collection was seen here.
    /// A mailbox with none is not listed.
    bindings: BTreeMap<MailboxKey, BTreeMap<Binding, Instant>>,
    /// The same entries by age, so that the oldest go in O(log n) when the memory is
    /// full or past the horizon.
    by_age: std::collections::BTreeSet<(Instant, MailboxKey, Binding)>,
}

/// What a snapshot holds (a recording's, see `Server::snapshot`): the bindings alone, as
/// before the age index, which is rebuilt from them, so a file cannot give an index that
/// disagrees with its bindings, nor more than the bound.
#[derive(Clone, Default, Serialize, Deserialize)]
struct CollectedBindings {
    bindings: BTreeMap<MailboxKey, BTreeMap<Binding, Instant>>,
}

impl From<CollectedBindings> for RecentlyCollected {
    fn from(c: CollectedBindings) -> RecentlyCollected {
        let mut r = RecentlyCollected::default();
        for (mailbox, bindings) in &c.bindings {
            for (&(uidvalidity, uid, guid), &at) in bindings {
                r.note(mailbox, uidvalidity, &[(uid, guid)], at);
            }
        }
        r
    }
}

impl From<RecentlyCollected> for CollectedBindings {
    fn from(r: RecentlyCollected) -> CollectedBindings {
        CollectedBindings { bindings: r.bindings }
    }
}

/// As before the age index (the state hash of a trace shows this): the index is the
/// bindings again.
impl std::fmt::Debug for RecentlyCollected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecentlyCollected").field("bindings", &self.bindings).finish()
    }
}

impl RecentlyCollected {
    /// The tombstones of these bindings of `mailbox` (at `uidvalidity`) were collected.
    pub(crate) fn note(&mut self, mailbox: &MailboxKey, uidvalidity: u32, collected: &[(Uid, Guid)], now: Instant) {
        for &(uid, guid) in collected {
            let binding = (uidvalidity, uid, guid);
            if let Some(before) = self.bindings.entry(mailbox.clone()).or_default().insert(binding, now) {
                self.by_age.remove(&(before, mailbox.clone(), binding));
            }
            self.by_age.insert((now, mailbox.clone(), binding));
            if self.by_age.len() > RECENTLY_COLLECTED_MAX {
                self.forget_oldest();
            }
        }
        debug_assert_eq!(self.by_age.len(), self.len(), "the age index holds every binding once");
        debug_assert!(self.by_age.len() <= RECENTLY_COLLECTED_MAX);
    }

    /// Bindings remembered, in all.
    fn len(&self) -> usize {
        self.bindings.values().map(BTreeMap::len).sum()
    }

    fn forget_oldest(&mut self) {
        let Some((_, mailbox, binding)) = self.by_age.pop_first() else { return };
        let known = self.bindings.get_mut(&mailbox).and_then(|b| b.remove(&binding));
        debug_assert!(known.is_some(), "the age index names remembered bindings");
        if self.bindings.get(&mailbox).is_some_and(BTreeMap::is_empty) {
            self.bindings.remove(&mailbox);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        debug_assert_eq!(self.bindings.is_empty(), self.by_age.is_empty());
        self.bindings.is_empty()
    }

    /// Forgets what is older than the horizon.
    pub(crate) fn expire(&mut self, now: Instant) {
        while self.by_age.first().is_some_and(|(at, _, _)| at.plus_us(RECENTLY_COLLECTED_KEPT_US) <= now) {
            self.forget_oldest();
        }
    }

    /// The highest UID of `mailbox` (at `uidvalidity`) at which `guid` was collected in
    /// the last [`COPY_BACK_AFTER_COLLECTION_US`]: a COPY of it back there is a new
    /// message (`Server::copy_guid`), as it is while the tombstone is there.
    pub(crate) fn collected_at(&self, mailbox: &MailboxKey, uidvalidity: u32, guid: Guid, now: Instant) -> Option<Uid> {
        let collected = self.bindings.get(mailbox)?;
        let range = (uidvalidity, 0, Guid(0))..=(uidvalidity, Uid::MAX, Guid(u128::MAX));
        collected
            .range(range)
            .filter(|((_, _, g), at)| *g == guid && at.plus_us(COPY_BACK_AFTER_COLLECTION_US) > now)
            .map(|((_, uid, _), _)| *uid)
            .max()
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

    fn state_at(uidvalidity: u32) -> MailboxState {
        let mut state = MailboxState::empty(mb(), uidvalidity);
        state.messages = vec![record(2, 20), record(3, 30), record(4, 40)];
        state
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
        assert_eq!(r.collected_at(&mb(), 7, Guid(20), Instant(0)), Some(2));
        assert_eq!(r.collected_at(&mb(), 8, Guid(20), Instant(0)), None, "another incarnation");
        assert_eq!(r.collected_at(&mb(), 7, Guid(30), Instant(0)), None, "collected at 3 was another GUID");
        let later = Instant(COPY_BACK_AFTER_COLLECTION_US);
        assert_eq!(r.collected_at(&mb(), 7, Guid(20), later), None, "a copy back takes its own GUID again");
        assert!(r.without_collected(&state_at(7), |_| false).is_some(), "a late copy is still dropped");
        r.expire(Instant(RECENTLY_COLLECTED_KEPT_US));
        assert_eq!(r.collected_at(&mb(), 7, Guid(20), Instant(0)), None, "forgotten past the horizon");
        state.uidvalidity = 7;
        assert!(r.without_collected(&state, |_| false).is_none(), "forgotten past the horizon");
    }

    #[test]
    fn a_binding_noted_again_is_aged_from_the_later_time_and_kept_once() {
        let mut r = RecentlyCollected::default();
        r.note(&mb(), 7, &[(2, Guid(20))], Instant(0));
        r.note(&mb(), 7, &[(2, Guid(20))], Instant(5));
        assert_eq!((r.len(), r.by_age.len()), (1, 1));
        r.expire(Instant(RECENTLY_COLLECTED_KEPT_US));
        assert!(r.without_collected(&state_at(7), |_| false).is_some(), "noted again at 5: still remembered");
        r.expire(Instant(RECENTLY_COLLECTED_KEPT_US + 5));
        assert!(r.is_empty(), "forgotten past the horizon from the later time");
    }

    #[test]
    fn a_snapshot_holds_the_bindings_and_the_index_is_rebuilt() {
        let mut r = RecentlyCollected::default();
        r.note(&mb(), 7, &[(2, Guid(20)), (3, Guid(30))], Instant(4));
        let back: RecentlyCollected = CollectedBindings::from(r.clone()).into();
        assert_eq!(format!("{back:?}"), format!("{r:?}"));
        assert_eq!(back.by_age, r.by_age);
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
