//! Bindings this server saw collected lately: tombstones turned into retired UIDs (see
//! `tombstones`), by the master here or by a collection it replicated. A copy of one of
//! those bindings that arrives after the collection (a duplicate of a log entry that an
//! acknowledged copy overtook on another path, a state sent before the collection, a
//! store put back from before the expunge) is a copy of a message the cluster expunged,
//! not mail no other server has: it is dropped before it is merged (explore seeds 167756
//! and 184755, where a master placed such a copy at a new UID and brought an expunged
//! message back). Past the horizon (seven days) or beyond the newest 65,536, the merge's
//! own rule applies: a message on a retired UID moves to a new one, as it may be mail
//! that only a disk which forgot the retirement holds.
//!
//! The bindings are kept on disk too ([`DiskImage::collected`], written lazily by the
//! server as they come and go), so that a restart does not forget them: a late copy
//! travels only on a link, and a restart closes every link, but a disk restored from
//! before the expunge holds the copy durably and sends it again and again, whenever its
//! server comes back, and the servers that saw the collection may all have restarted
//! since (a rolling upgrade). The server that drops such a copy also tells its sender the
//! binding is collected (`Server::tell_collected`), and the copy goes there too. A
//! binding loaded at a start is aged from the clock's origin ([`LOADED_AT`]): in the
//! node, whose clock starts at every start, a restart makes a server remember it
//! longer, never shorter (at most the bound's 65,536 then); in the simulator, whose
//! clock runs on, from the run's start, far longer ago than its runs last. When it was
//! collected is not kept, so a loaded
//! binding does not count for a COPY back (`collected_at`): the message takes its own
//! GUID, as before bindings were kept on disk, and the merge's rule for a logged copy
//! against a stale tombstone (`MergeRules::from_log`) settles it.
//!
//! [`DiskImage::collected`]: crate::store::DiskImage::collected
use crate::store::StoreWrite;
use crate::types::{Guid, Instant, MailboxKey, MailboxState, Tombstone, Uid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Collected bindings remembered at most, over every mailbox (some 200 bytes each with
/// the age index, and some 40 more for the image of the disk's copy, so about 16 MB at
/// most); when full, the oldest go.
pub(crate) const RECENTLY_COLLECTED_MAX: usize = 65_536;

/// The most collected bindings one state names (`Server::name_collected`): about 1.5 MB
/// of command text in pieces, sent with every SYNC of a mailbox that has them for as
/// long as they are remembered; what a user expunges from one mailbox in a week, in
/// all but a mass clean-up.
pub(crate) const NAMES_PER_STATE_MAX: usize = 16_384;

/// How long a collected binding is remembered: far longer than any message stays in
/// flight between servers, and long enough that a store put back from a VM or
/// filesystem snapshot of the last days (its identity kept, nothing to tell it from the
/// store it was) has its copies of bindings collected since dropped by any server
/// that saw the collection, restarted since or not, rather than moved to new UIDs as
/// mail (the `restore` focus with the restore put past a ten-minute memory brought
/// expunged mail back in 239 of 1,000 seeds, the identity kept or not, by hand; the
/// `late-restore` focus restarts the others first).
pub(crate) const RECENTLY_COLLECTED_KEPT_US: u64 = 7 * 24 * 3600 * 1_000_000;

/// How long a COPY back into a mailbox of a message whose binding there was collected
/// still takes a derived GUID (`Server::copy_guid`): the ten minutes this memory kept
/// before it kept bindings for days, so that a message moved to Trash and back ever so
/// often in a week is not refused as "copied back too often".
pub(crate) const COPY_BACK_AFTER_COLLECTION_US: u64 = 600_000_000;

/// When a binding loaded from disk at a start was collected, for this memory: the
/// clock's origin (see the module's comment). No collection is seen at that instant (it
/// waits for a grace past the start).
pub(crate) const LOADED_AT: Instant = Instant(0);

/// (UIDVALIDITY, UID, GUID).
pub(crate) type Binding = (u32, Uid, Guid);

/// Bindings forgotten, by mailbox, each once.
pub(crate) type Forgotten = BTreeMap<MailboxKey, Vec<Binding>>;

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
                let _bounded = r.note(mailbox, uidvalidity, &[(uid, guid)], at);
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
    /// Returns the bindings forgotten to keep the bound (the oldest), by mailbox.
    #[must_use = "what the bound forgot is forgotten on disk too"]
    pub(crate) fn note(
        &mut self,
        mailbox: &MailboxKey,
        uidvalidity: u32,
        collected: &[(Uid, Guid)],
        now: Instant,
    ) -> Forgotten {
        let mut forgotten = Forgotten::new();
        for &(uid, guid) in collected {
            let binding = (uidvalidity, uid, guid);
            if let Some(before) = self.bindings.entry(mailbox.clone()).or_default().insert(binding, now) {
                self.by_age.remove(&(before, mailbox.clone(), binding));
            }
            self.by_age.insert((now, mailbox.clone(), binding));
            if self.by_age.len() > RECENTLY_COLLECTED_MAX {
                self.forget_oldest(&mut forgotten);
            }
        }
        debug_assert_eq!(self.by_age.len(), self.len(), "the age index holds every binding once");
        debug_assert!(self.by_age.len() <= RECENTLY_COLLECTED_MAX);
        forgotten
    }

    /// The memory a start finds on disk, every binding noted at [`LOADED_AT`], with what
    /// the bound made it forget (a disk can hold more: a hand edit, a corrupt table).
    pub(crate) fn loaded(
        on_disk: &BTreeMap<MailboxKey, std::collections::BTreeSet<Binding>>,
    ) -> (RecentlyCollected, Forgotten) {
        let now = LOADED_AT;
        let mut r = RecentlyCollected::default();
        let mut forgotten = Forgotten::new();
        for (mailbox, bindings) in on_disk {
            for &(uidvalidity, uid, guid) in bindings {
                for (m, gone) in r.note(mailbox, uidvalidity, &[(uid, guid)], now) {
                    forgotten.entry(m).or_default().extend(gone);
                }
            }
        }
        (r, forgotten)
    }

    /// The bindings of `mailbox` at `uidvalidity` remembered collected.
    pub(crate) fn bindings_of(&self, mailbox: &MailboxKey, uidvalidity: u32) -> impl Iterator<Item = (Uid, Guid)> + '_ {
        self.noted_in(mailbox, uidvalidity).map(|(&(_, uid, guid), _)| (uid, guid))
    }

    /// The bindings of `mailbox` at `uidvalidity`, by UID, with when each was noted.
    pub(crate) fn bindings_noted(
        &self,
        mailbox: &MailboxKey,
        uidvalidity: u32,
    ) -> impl Iterator<Item = ((Uid, Guid), Instant)> + '_ {
        self.noted_in(mailbox, uidvalidity).map(|(&(_, uid, guid), &at)| ((uid, guid), at))
    }

    /// The bindings of `mailbox` at `uidvalidity`, with when each was noted.
    fn noted_in(&self, mailbox: &MailboxKey, uidvalidity: u32) -> impl Iterator<Item = (&Binding, &Instant)> + '_ {
        let range = (uidvalidity, 0, Guid(0))..=(uidvalidity, Uid::MAX, Guid(u128::MAX));
        self.bindings.get(mailbox).into_iter().flat_map(move |b| b.range(range.clone()))
    }

    /// Every binding remembered, by mailbox: what the disk must hold too.
    pub(crate) fn bindings(&self) -> impl Iterator<Item = (&MailboxKey, impl Iterator<Item = &Binding>)> {
        self.bindings.iter().map(|(mailbox, bindings)| (mailbox, bindings.keys()))
    }

    /// Bindings remembered, in all.
    fn len(&self) -> usize {
        self.bindings.values().map(BTreeMap::len).sum()
    }

    fn forget_oldest(&mut self, forgotten: &mut Forgotten) {
        let Some((_, mailbox, binding)) = self.by_age.pop_first() else { return };
        let known = self.bindings.get_mut(&mailbox).and_then(|b| b.remove(&binding));
        debug_assert!(known.is_some(), "the age index names remembered bindings");
        if self.bindings.get(&mailbox).is_some_and(BTreeMap::is_empty) {
            self.bindings.remove(&mailbox);
        }
        forgotten.entry(mailbox).or_default().push(binding);
    }

    pub(crate) fn is_empty(&self) -> bool {
        debug_assert_eq!(self.bindings.is_empty(), self.by_age.is_empty());
        self.bindings.is_empty()
    }

    /// Forgets what is older than the horizon; returns it, by mailbox.
    #[must_use = "what expired is forgotten on disk too"]
    pub(crate) fn expire(&mut self, now: Instant) -> Forgotten {
        let mut forgotten = Forgotten::new();
        while self.by_age.first().is_some_and(|(at, _, _)| at.plus_us(RECENTLY_COLLECTED_KEPT_US) <= now) {
            self.forget_oldest(&mut forgotten);
        }
        forgotten
    }

    /// The highest UID of `mailbox` (at `uidvalidity`) at which `guid` was collected in
    /// the last [`COPY_BACK_AFTER_COLLECTION_US`] (seen since the start, not loaded): a
    /// COPY of it back there is a new message (`Server::copy_guid`), as it is while the
    /// tombstone is there.
    pub(crate) fn collected_at(&self, mailbox: &MailboxKey, uidvalidity: u32, guid: Guid, now: Instant) -> Option<Uid> {
        self.noted_in(mailbox, uidvalidity)
            .filter(|((_, _, g), at)| {
                *g == guid && **at != LOADED_AT && at.plus_us(COPY_BACK_AFTER_COLLECTION_US) > now
            })
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

impl super::Server {
    /// The tombstones of these bindings of `mailbox` were collected here: remembered, in
    /// memory and on disk.
    pub(crate) fn remember_collected(&mut self, mailbox: &MailboxKey, uidvalidity: u32, bindings: &[(Uid, Guid)]) {
        if bindings.is_empty() {
            return;
        }
        let forgotten = self.recently_collected.note(mailbox, uidvalidity, bindings, self.now);
        self.commit(StoreWrite::Collected { mailbox: mailbox.clone(), uidvalidity, bindings: bindings.to_vec() });
        self.forget_collected_on_disk(forgotten);
    }

    /// Forgets collected bindings past the horizon, on disk too.
    pub(crate) fn expire_collected(&mut self) {
        let forgotten = self.recently_collected.expire(self.now);
        self.forget_collected_on_disk(forgotten);
    }

    /// Names in `state` of our copy, as tombstones on their retired UIDs, the bindings
    /// remembered collected here that its retired UIDs cover and whose message is not
    /// live here at another UID (that was a move: the copy there is the message), those
    /// in `first` first; returns how many. A state that tells retired UIDs without naming
    /// them would have a store that went back (a restored backup, a VM snapshot put
    /// back) move the copies it holds of them to new UIDs as mail only it has: the
    /// expunged mail back (focus late-restore seeds 1463 and 3345). Named, its merge
    /// drops them (`mailbox::drop_collected_copies`); a copy that has the retirement
    /// already drops the tombstones with it, and one of another incarnation ignores them
    /// (`mailbox::without_names_of_another_incarnation`).
    /// At most [`NAMES_PER_STATE_MAX`]: a state too large for one command goes in pieces,
    /// and each name travels in the piece of the retired range that covers it
    /// (`limits::state_pieces`), never ahead of it, where it would be taken for a
    /// client's expunge of every copy of its GUID. Past the bound, the merge's rule
    /// applies to those not named (moved to new UIDs).
    pub(crate) fn name_collected(&self, state: &mut MailboxState, first: &[(Uid, Guid)]) -> usize {
        let remembered = self.recently_collected.bindings_of(&state.mailbox, state.uidvalidity).next().is_some();
        if state.retired.is_default() || !remembered {
            return 0;
        }
        let Some(m) = self.image.mailbox(&state.mailbox).filter(|m| m.uidvalidity == state.uidvalidity) else {
            return 0;
        };
        let names_in = |state: &MailboxState| state.tombstones.iter().filter(|t| state.retired.covers(t)).count();
        let room = NAMES_PER_STATE_MAX.saturating_sub(names_in(state));
        let mut told: std::collections::BTreeSet<(Uid, Guid)> =
            state.tombstones.iter().map(|t| (t.uid, t.guid)).collect();
        let before = state.tombstones.len();
        let mut name = |&(uid, guid): &(Uid, Guid)| {
            if m.messages.has_guid(guid) || !told.insert((uid, guid)) {
                return None;
            }
            state.retired.name(uid, guid)
        };
        let asked: Vec<Tombstone> = first.iter().filter_map(&mut name).take(room).collect();
        let remembered: Vec<((Uid, Guid), Instant)> =
            self.recently_collected.bindings_noted(&state.mailbox, state.uidvalidity).collect();
        let mut from_memory: Vec<(Tombstone, Instant)> =
            remembered.iter().filter_map(|(binding, at)| name(binding).map(|t| (t, *at))).collect();
        let room_left = room - asked.len();
        if from_memory.len() > room_left {
            // Past the bound, those collected last (a store put back holds those expunged
            // after its backup was taken), the highest UIDs among equals; in UID order still.
            let mut newest: Vec<usize> = (0..from_memory.len()).collect();
            newest.sort_unstable_by_key(|&i| std::cmp::Reverse((from_memory[i].1, i)));
            let kept: std::collections::BTreeSet<usize> = newest.into_iter().take(room_left).collect();
            let mut index = 0..;
            from_memory.retain(|_| index.next().is_some_and(|i| kept.contains(&i)));
            debug_assert_eq!(from_memory.len(), room_left, "the bound is filled, not passed");
        }
        state.tombstones.extend(asked);
        state.tombstones.extend(from_memory.into_iter().map(|(t, _)| t));
        debug_assert!(
            state.tombstones.len() == before || names_in(state) <= NAMES_PER_STATE_MAX,
            "names are added only up to the bound"
        );
        state.tombstones.len() - before
    }

    /// The memory of collections the disk holds, at a start.
    pub(super) fn load_collected(&mut self) {
        let on_disk = &self.image.disk().collected;
        let (memory, forgotten) = if self.has_bug(crate::Bug::ForgetsCollectionsAtRestart) {
            let all = on_disk.iter().map(|(m, b)| (m.clone(), b.iter().copied().collect())).collect();
            (RecentlyCollected::default(), all)
        } else {
            RecentlyCollected::loaded(on_disk)
        };
        self.recently_collected = memory;
        self.forget_collected_on_disk(forgotten);
    }

    fn forget_collected_on_disk(&mut self, forgotten: Forgotten) {
        for (mailbox, bindings) in forgotten {
            self.commit(StoreWrite::ForgetCollected { mailbox, bindings });
        }
        debug_assert!(self.collected_on_disk_as_remembered(), "the disk holds what the memory of collections does");
    }

    fn collected_on_disk_as_remembered(&self) -> bool {
        let on_disk = &self.image.disk().collected;
        on_disk.values().filter(|b| !b.is_empty()).count() == self.recently_collected.bindings().count()
            && self
                .recently_collected
                .bindings()
                .all(|(mailbox, bindings)| on_disk.get(mailbox).is_some_and(|kept| kept.iter().eq(bindings)))
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
        let _ = r.note(&mb(), 7, &[(2, Guid(20)), (3, Guid(99))], Instant(1));
        let (kept, dropped) = r.without_collected(&state, |_| false).expect("one stale copy");
        assert_eq!(dropped, vec![(2, Guid(20))]);
        assert_eq!(kept.messages.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![3, 4], "another GUID at 3 stays");
        assert!(r.without_collected(&state, |g| g == Guid(20)).is_none(), "a message moved, not expunged, stays");
        state.uidvalidity = 8;
        assert!(r.without_collected(&state, |_| false).is_none(), "another incarnation's UIDs mean something else");
        assert_eq!(r.collected_at(&mb(), 7, Guid(20), Instant(1)), Some(2));
        assert_eq!(r.collected_at(&mb(), 8, Guid(20), Instant(1)), None, "another incarnation");
        assert_eq!(r.collected_at(&mb(), 7, Guid(30), Instant(1)), None, "collected at 3 was another GUID");
        let later = Instant(1 + COPY_BACK_AFTER_COLLECTION_US);
        assert_eq!(r.collected_at(&mb(), 7, Guid(20), later), None, "a copy back takes its own GUID again");
        assert!(r.without_collected(&state_at(7), |_| false).is_some(), "a late copy is still dropped");
        let _ = r.expire(Instant(1 + RECENTLY_COLLECTED_KEPT_US));
        assert_eq!(r.collected_at(&mb(), 7, Guid(20), Instant(1)), None, "forgotten past the horizon");
        state.uidvalidity = 7;
        assert!(r.without_collected(&state, |_| false).is_none(), "forgotten past the horizon");
    }

    #[test]
    fn a_binding_noted_again_is_aged_from_the_later_time_and_kept_once() {
        let mut r = RecentlyCollected::default();
        let _ = r.note(&mb(), 7, &[(2, Guid(20))], Instant(0));
        let _ = r.note(&mb(), 7, &[(2, Guid(20))], Instant(5));
        assert_eq!((r.len(), r.by_age.len()), (1, 1));
        assert!(r.expire(Instant(RECENTLY_COLLECTED_KEPT_US)).is_empty());
        assert!(r.without_collected(&state_at(7), |_| false).is_some(), "noted again at 5: still remembered");
        let gone = r.expire(Instant(RECENTLY_COLLECTED_KEPT_US + 5));
        assert_eq!(gone, Forgotten::from([(mb(), vec![(7, 2, Guid(20))])]));
        assert!(r.is_empty(), "forgotten past the horizon from the later time");
    }

    #[test]
    fn a_snapshot_holds_the_bindings_and_the_index_is_rebuilt() {
        let mut r = RecentlyCollected::default();
        let _ = r.note(&mb(), 7, &[(2, Guid(20)), (3, Guid(30))], Instant(4));
        let back: RecentlyCollected = CollectedBindings::from(r.clone()).into();
        assert_eq!(format!("{back:?}"), format!("{r:?}"));
        assert_eq!(back.by_age, r.by_age);
    }

    #[test]
    fn the_memory_is_bounded_and_forgets_the_oldest() {
        let mut r = RecentlyCollected::default();
        let mut forgotten = Vec::new();
        for uid in 1..=(RECENTLY_COLLECTED_MAX as u32 + 5) {
            let gone = r.note(&mb(), 7, &[(uid, Guid(u128::from(uid)))], Instant(u64::from(uid)));
            forgotten.extend(gone.into_values().flatten());
        }
        assert_eq!(r.len(), RECENTLY_COLLECTED_MAX);
        assert_eq!(forgotten, (1..=5).map(|uid| (7, uid, Guid(u128::from(uid)))).collect::<Vec<_>>(), "the oldest");
        let mut state = MailboxState::empty(mb(), 7);
        state.messages = vec![record(1, 1), record(6, 6)];
        let (kept, _) = r.without_collected(&state, |_| false).expect("the newer one is remembered");
        assert_eq!(kept.messages.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![1], "the oldest was forgotten");
    }

    #[test]
    fn a_start_loads_what_the_disk_holds_aged_from_the_start_and_bounded() {
        let mut on_disk: BTreeMap<MailboxKey, std::collections::BTreeSet<Binding>> = BTreeMap::new();
        on_disk
            .entry(mb())
            .or_default()
            .extend((1..=(RECENTLY_COLLECTED_MAX as u32 + 2)).map(|uid| (7, uid, Guid(u128::from(uid) * 10))));
        let start = LOADED_AT;
        let (r, forgotten) = RecentlyCollected::loaded(&on_disk);
        assert_eq!(r.len(), RECENTLY_COLLECTED_MAX);
        assert_eq!(forgotten, Forgotten::from([(mb(), vec![(7, 1, Guid(10)), (7, 2, Guid(20))])]), "the first");
        let (kept, dropped) = r.without_collected(&state_at(7), |_| false).expect("3 and 4 are remembered");
        assert_eq!(dropped, vec![(3, Guid(30)), (4, Guid(40))]);
        assert_eq!(kept.messages.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![2], "2 was forgotten");
        assert_eq!(r.collected_at(&mb(), 7, Guid(30), Instant(1)), None, "not for a COPY back");
        let mut r = r;
        assert!(r.expire(start.plus_us(RECENTLY_COLLECTED_KEPT_US - 1)).is_empty(), "aged from the start");
        assert_eq!(
            r.expire(start.plus_us(RECENTLY_COLLECTED_KEPT_US)).values().map(Vec::len).sum::<usize>(),
            RECENTLY_COLLECTED_MAX
        );
    }

    #[test]
    fn a_restarted_server_names_what_its_disk_remembers_up_to_the_bound() {
        use crate::io::Config;
        use crate::store::{DiskImage, MemoryBodies, StoredMailbox};
        use crate::types::{Retired, Sid};
        let mut disk = DiskImage::default();
        let mut inbox = StoredMailbox { uidvalidity: 7, uidnext: 10, highest_modseq: 6, ..StoredMailbox::default() };
        inbox.retired = Retired { ranges: [(2, 4)].into_iter().collect(), collected: 5 };
        // The message collected at UID 4 was moved, not expunged: it lives at 6.
        inbox.messages.insert(6, MessageRecord::bare(6, 40, 6));
        disk.mailboxes.insert(mb(), inbox);
        let remembered = [(7, 2, Guid(20)), (7, 3, Guid(30)), (7, 4, Guid(40)), (8, 2, Guid(99))];
        disk.collected.insert(mb(), remembered.into_iter().collect());
        let cfg = Config::new(Sid(1), vec![Sid(1), Sid(2), Sid(3)]);
        let mut s = super::super::Server::recover(cfg, disk, 1, Box::new(MemoryBodies::default()));
        assert!(s.collected_on_disk_as_remembered());
        let ours = |s: &super::super::Server| {
            let m = s.image.mailbox(&mb()).expect("the mailbox");
            let mut state = MailboxState::empty(mb(), 7);
            state.retired = m.retired.clone();
            state
        };
        // Our state with `filler` names already in it (of bindings nobody remembers).
        let ours_named = |s: &super::super::Server, filler: usize| {
            let mut state = ours(s);
            state.retired.insert_range(100, 100 + filler as Uid);
            state.tombstones =
                (0..filler).filter_map(|i| state.retired.name(100 + i as Uid, Guid(1000 + i as u128))).collect();
            state
        };
        let mut state = ours(&s);
        assert_eq!(s.name_collected(&mut state, &[]), 2);
        let named: Vec<(Uid, Guid)> = state.tombstones.iter().map(|t| (t.uid, t.guid)).collect();
        assert_eq!(named, vec![(2, Guid(20)), (3, Guid(30))], "not the moved one, nor another incarnation's");
        assert!(state.tombstones.iter().all(|t| state.retired.covers(t)), "each on a retired UID it covers");
        assert_eq!(s.name_collected(&mut state, &[]), 0, "each named once");
        let mut state = ours(&s);
        state.retired = Retired::default();
        assert_eq!(s.name_collected(&mut state, &[]), 0, "a state that tells no retired UIDs");
        let mut state = ours(&s);
        state.uidvalidity = 8;
        assert_eq!(s.name_collected(&mut state, &[]), 0, "another incarnation than our copy's");
        // Room for two names only: the one asked for first, then another remembered.
        let filler = NAMES_PER_STATE_MAX - 2;
        let mut state = ours_named(&s, filler);
        assert!(crate::limits::state_len(&state) > crate::limits::STATE_PIECE_LEN_MAX, "more than one piece");
        assert_eq!(s.name_collected(&mut state, &[(2, Guid(20))]), 2);
        let named: Vec<(Uid, Guid)> = state.tombstones[filler..].iter().map(|t| (t.uid, t.guid)).collect();
        assert_eq!(named, vec![(2, Guid(20)), (3, Guid(30))]);
        assert_eq!(s.name_collected(&mut state, &[]), 0, "no room left");
        // Room for one: the newest remembered (loaded together at the start, so the
        // highest UID).
        let filler = NAMES_PER_STATE_MAX - 1;
        let mut state = ours_named(&s, filler);
        assert_eq!(s.name_collected(&mut state, &[]), 1);
        assert_eq!(state.tombstones.last().map(|t| (t.uid, t.guid)), Some((3, Guid(30))));
        // Collected again since the start, (2, 20) is the newest now.
        let mut again = ours(&s);
        again.tombstones = state.tombstones[..filler].to_vec();
        again.retired = state.retired.clone();
        let _forgotten = s.recently_collected.note(&mb(), 7, &[(2, Guid(20))], Instant(500));
        assert_eq!(s.name_collected(&mut again, &[]), 1);
        assert_eq!(again.tombstones.last().map(|t| (t.uid, t.guid)), Some((2, Guid(20))));
        // Tombstones that are no names leave the room as it was.
        let mut state = ours(&s);
        state.tombstones =
            (0..NAMES_PER_STATE_MAX as Uid).map(|i| Tombstone::expunge(100 + i, Guid(5000), 6)).collect();
        assert_eq!(s.name_collected(&mut state, &[]), 2);
        assert_eq!(s.recently_collected.collected_at(&mb(), 7, Guid(30), Instant(1)), None, "loaded: no COPY back");
    }
}
