//! Who masters what, as this server knows it: the keys it masters (each with its
//! catch-up until it is ready), the master cache (hints, with the generation of the
//! news so older news never overrides newer), lookups sent to the root, MASTER-MOVEs in
//! flight and handovers not yet confirmed. A new term (see `root`) drops all of it.

use super::jobs::JobId;
use crate::types::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A new master's catch-up: it asks every reachable server for its copies and merges
/// the ones that differ before it orders any write, so new UIDs exceed every UID a
/// reachable server has shown.
/// A catch-up's number, drawn with the job numbers (so unique across restarts); MBOX
/// messages carry it as their wire tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CatchupId(pub u64);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Catchup {
    /// Carried by the MBOX answers, so answers to an older catch-up are ignored.
    pub id: CatchupId,
    pub waiting_mbox: BTreeSet<Sid>,
    pub waiting_sync: BTreeSet<(Sid, MailboxKey)>,
    pub deadline: Instant,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Mastership {
    /// None once caught up: the master orders writes.
    pub catchup: Option<Catchup>,
    /// Which master of the key this is in the current term.
    pub generation: u64,
}

/// A MASTER-MOVE handover waiting for the new master's announcement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Handoff {
    pub requester: Sid,
    /// The requester's job that asked for the MASTER-MOVE.
    pub requester_job: JobId,
    pub epoch: u64,
    pub generation: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Masters {
    mastered: BTreeMap<MasterKey, Mastership>,
    cache: BTreeMap<MasterKey, Sid>,
    /// Generation of each master named by the root or announced.
    generations: BTreeMap<MasterKey, u64>,
    /// When we last asked the root about a key.
    lookups: BTreeMap<MasterKey, Instant>,
    /// Every mailbox needs a known master (so anti-entropy reaches it): set when that
    /// may no longer hold.
    check_due: bool,
    /// Keys whose MASTER-MOVE (asked by us) is in flight: writes to them wait.
    moving: BTreeSet<MasterKey>,
    /// Keys we gave up by MASTER-MOVE whose new master has not announced itself yet:
    /// the handover is resent until it has, so a lost MOVED never leaves a key masterless.
    handoffs: BTreeMap<MasterKey, Handoff>,
}

impl Masters {
    pub(crate) fn new() -> Masters {
        Masters { check_due: true, ..Masters::default() }
    }

    // Masterships.

    pub(crate) fn masters(&self, key: &MasterKey) -> bool {
        self.mastered.contains_key(key)
    }

    /// Whether we master `key` and have caught up: we order its writes.
    pub(crate) fn masters_ready(&self, key: &MasterKey) -> bool {
        self.mastered.get(key).is_some_and(|m| m.catchup.is_none())
    }

    /// Whether a mastership of ours is still catching up.
    pub(crate) fn has_catchups(&self) -> bool {
        self.mastered.values().any(|m| m.catchup.is_some())
    }

    pub(crate) fn any_ready(&self) -> bool {
        self.ready().next().is_some()
    }

    pub(crate) fn ready_keys(&self) -> Vec<MasterKey> {
        self.ready().map(|(k, _)| k.clone()).collect()
    }

    pub(crate) fn ready_generations(&self) -> Vec<(MasterKey, u64)> {
        self.ready().map(|(k, m)| (k.clone(), m.generation)).collect()
    }

    fn ready(&self) -> impl Iterator<Item = (&MasterKey, &Mastership)> {
        self.mastered.iter().filter(|(_, m)| m.catchup.is_none())
    }

    /// We master `key` from now on (and no longer look it up or cache another master).
    pub(crate) fn start(&mut self, key: MasterKey, mastership: Mastership) {
        self.cache.remove(&key);
        self.mastered.insert(key, mastership);
    }

    pub(crate) fn stop(&mut self, key: &MasterKey) -> Option<Mastership> {
        self.mastered.remove(key)
    }

    /// Whether catch-up `id` is running for `key`.
    pub(crate) fn catching_up(&self, key: &MasterKey, id: CatchupId) -> bool {
        self.catchup(key).is_some_and(|c| c.id == id)
    }

    /// The catch-up of `key` waits for a SYNC answer from `peer` for `mailbox`.
    pub(crate) fn await_sync(&mut self, key: &MasterKey, peer: Sid, mailbox: MailboxKey) {
        if let Some(c) = self.catchup_mut(key) {
            c.waiting_sync.insert((peer, mailbox));
        }
    }

    pub(crate) fn synced(&mut self, key: &MasterKey, peer: Sid, mailbox: &MailboxKey) {
        if let Some(c) = self.catchup_mut(key) {
            c.waiting_sync.remove(&(peer, mailbox.clone()));
        }
    }

    /// `peer` listed all its mailboxes for catch-up `id`.
    pub(crate) fn listed(&mut self, id: CatchupId, peer: Sid) {
        for c in self.mastered.values_mut().filter_map(|m| m.catchup.as_mut()).filter(|c| c.id == id) {
            c.waiting_mbox.remove(&peer);
        }
    }

    /// Keys whose catch-up heard from everyone (or ran out of time).
    pub(crate) fn finished_catchups(&self, now: Instant) -> Vec<MasterKey> {
        let done = |c: &Catchup| (c.waiting_mbox.is_empty() && c.waiting_sync.is_empty()) || c.deadline <= now;
        self.mastered.iter().filter(|(_, m)| m.catchup.as_ref().is_some_and(done)).map(|(k, _)| k.clone()).collect()
    }

    /// Whether the catch-up of `key` has every answer it waited for (it did not end by
    /// its deadline).
    pub(crate) fn catchup_heard_all(&self, key: &MasterKey) -> bool {
        self.catchup(key).is_some_and(|c| c.waiting_mbox.is_empty() && c.waiting_sync.is_empty())
    }

    /// The catch-up of `key` is over: we order its writes from now on.
    pub(crate) fn caught_up(&mut self, key: &MasterKey) {
        if let Some(m) = self.mastered.get_mut(key) {
            m.catchup = None;
        }
    }

    fn catchup(&self, key: &MasterKey) -> Option<&Catchup> {
        self.mastered.get(key).and_then(|m| m.catchup.as_ref())
    }

    fn catchup_mut(&mut self, key: &MasterKey) -> Option<&mut Catchup> {
        self.mastered.get_mut(key).and_then(|m| m.catchup.as_mut())
    }

    // The master cache.

    pub(crate) fn cached(&self, key: &MasterKey) -> Option<Sid> {
        self.cache.get(key).copied()
    }

    pub(crate) fn known(&self) -> &BTreeMap<MasterKey, Sid> {
        &self.cache
    }

    /// Whether some master of `key` is known (us, or a cached one).
    pub(crate) fn knows(&self, key: &MasterKey) -> bool {
        self.mastered.contains_key(key) || self.cache.contains_key(key)
    }

    pub(crate) fn remember(&mut self, key: MasterKey, master: Sid) {
        self.cache.insert(key, master);
    }

    pub(crate) fn forget(&mut self, key: &MasterKey) {
        self.cache.remove(key);
    }

    pub(crate) fn generation(&self, key: &MasterKey) -> u64 {
        self.generations.get(key).copied().unwrap_or(0)
    }

    /// Our mastership of `key` counts from at least `generation` (a handover's that
    /// reached us after the root made us master): the generation it has now.
    pub(crate) fn raise_generation(&mut self, key: &MasterKey, generation: u64) -> u64 {
        let raised = self.generation(key).max(generation);
        self.generations.insert(key.clone(), raised);
        if let Some(m) = self.mastered.get_mut(key) {
            m.generation = m.generation.max(raised);
        }
        raised
    }

    pub(crate) fn set_generation(&mut self, key: MasterKey, generation: u64) {
        self.generations.insert(key, generation);
    }

    /// `peer` is out of reach: it masters nothing we know of, and no catch-up waits for it.
    pub(crate) fn peer_lost(&mut self, peer: Sid) {
        self.cache.retain(|_, m| *m != peer);
        for c in self.mastered.values_mut().filter_map(|m| m.catchup.as_mut()) {
            c.waiting_mbox.remove(&peer);
            c.waiting_sync.retain(|(p, _)| *p != peer);
        }
    }

    /// A new term: forget every master and stop mastering. Returns the keys we mastered.
    pub(crate) fn drop_all(&mut self) -> Vec<MasterKey> {
        self.handoffs.clear();
        self.cache.clear();
        self.generations.clear();
        self.lookups.clear();
        self.check_due = true;
        let dropped: Vec<MasterKey> = std::mem::take(&mut self.mastered).into_keys().collect();
        debug_assert!(!self.knows_any());
        dropped
    }

    fn knows_any(&self) -> bool {
        !self.mastered.is_empty() || !self.cache.is_empty()
    }

    // Lookups at the root.

    /// Whether a lookup of `key` went out less than `window_us` ago.
    pub(crate) fn lookup_recent(&self, key: &MasterKey, now: Instant, window_us: u64) -> bool {
        self.lookups.get(key).is_some_and(|sent| now.0.saturating_sub(sent.0) < window_us)
    }

    pub(crate) fn lookup_sent(&mut self, key: MasterKey, now: Instant) {
        self.lookups.insert(key, now);
    }

    pub(crate) fn lookup_answered(&mut self, key: &MasterKey) {
        self.lookups.remove(key);
    }

    /// Lookups unanswered for `age_us` or more; they are forgotten (to be asked again).
    pub(crate) fn take_stale_lookups(&mut self, now: Instant, age_us: u64) -> Vec<MasterKey> {
        let stale: Vec<MasterKey> = self
            .lookups
            .iter()
            .filter(|(_, at)| now.0.saturating_sub(at.0) >= age_us)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &stale {
            self.lookups.remove(key);
        }
        stale
    }

    pub(crate) fn request_check(&mut self) {
        self.check_due = true;
    }

    pub(crate) fn check_due(&self) -> bool {
        self.check_due
    }

    pub(crate) fn check_done(&mut self) {
        self.check_due = false;
    }

    // MASTER-MOVE.

    pub(crate) fn is_moving(&self, key: &MasterKey) -> bool {
        self.moving.contains(key)
    }

    pub(crate) fn set_moving(&mut self, key: MasterKey) {
        self.moving.insert(key);
    }

    pub(crate) fn done_moving(&mut self, key: &MasterKey) {
        self.moving.remove(key);
    }

    /// We gave `key` up: it is mastered by the requester from now on, at `generation`.
    pub(crate) fn hand_off(&mut self, key: MasterKey, handoff: Handoff) {
        debug_assert!(!self.mastered.contains_key(&key), "a key handed off is no longer ours");
        self.cache.insert(key.clone(), handoff.requester);
        self.generations.insert(key.clone(), handoff.generation);
        self.handoffs.insert(key, handoff);
    }

    pub(crate) fn handoffs(&self) -> Vec<(MasterKey, Handoff)> {
        self.handoffs.iter().map(|(k, h)| (k.clone(), h.clone())).collect()
    }

    pub(crate) fn handoff_done(&mut self, key: &MasterKey) {
        self.handoffs.remove(key);
    }

    /// `from` announced itself master of `key` at `generation`: a handover to it is done.
    pub(crate) fn announced(&mut self, key: &MasterKey, from: Sid, generation: u64) {
        if self.handoffs.get(key).is_some_and(|h| h.requester == from && generation >= h.generation) {
            self.handoffs.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> MasterKey {
        MasterKey::of(&MailboxKey::from_shared("alice".into(), n.into()), Granularity::Mailbox)
    }

    fn catching_up(id: u64, peers: &[u32], deadline: u64) -> Mastership {
        let catchup = Catchup {
            id: CatchupId(id),
            waiting_mbox: peers.iter().map(|p| Sid(*p)).collect(),
            waiting_sync: BTreeSet::new(),
            deadline: Instant(deadline),
        };
        Mastership { catchup: Some(catchup), generation: 1 }
    }

    #[test]
    fn a_catchup_ends_when_every_peer_answered() {
        let mut m = Masters::new();
        m.start(key("A"), catching_up(7, &[2, 3], 1_000));
        assert!(m.masters(&key("A")) && !m.masters_ready(&key("A")));
        m.listed(CatchupId(7), Sid(2));
        m.await_sync(&key("A"), Sid(3), MailboxKey::from_shared("alice".into(), "A".into()));
        m.listed(CatchupId(7), Sid(3));
        assert!(m.finished_catchups(Instant(0)).is_empty(), "a SYNC is still awaited");
        m.synced(&key("A"), Sid(3), &MailboxKey::from_shared("alice".into(), "A".into()));
        assert_eq!(m.finished_catchups(Instant(0)), vec![key("A")]);
        m.caught_up(&key("A"));
        assert!(m.masters_ready(&key("A")));
        assert_eq!(m.ready_keys(), vec![key("A")]);
    }

    #[test]
    fn a_catchup_ends_at_its_deadline_or_when_its_peers_are_lost() {
        let mut m = Masters::new();
        m.start(key("A"), catching_up(7, &[2], 1_000));
        m.start(key("B"), catching_up(8, &[3], 5_000));
        assert_eq!(m.finished_catchups(Instant(1_000)), vec![key("A")]);
        m.caught_up(&key("A"));
        m.peer_lost(Sid(3));
        assert_eq!(m.finished_catchups(Instant(1_000)), vec![key("B")]);
    }

    #[test]
    fn answers_to_another_catchup_are_ignored() {
        let mut m = Masters::new();
        m.start(key("A"), catching_up(7, &[2], 1_000));
        m.listed(CatchupId(6), Sid(2));
        assert!(m.finished_catchups(Instant(0)).is_empty());
        assert!(m.catching_up(&key("A"), CatchupId(7)) && !m.catching_up(&key("A"), CatchupId(6)));
    }

    #[test]
    fn a_new_term_forgets_everything() {
        let mut m = Masters::new();
        m.check_done();
        m.start(key("A"), Mastership { catchup: None, generation: 1 });
        m.remember(key("B"), Sid(2));
        m.set_generation(key("B"), 4);
        m.lookup_sent(key("C"), Instant(0));
        assert_eq!(m.drop_all(), vec![key("A")]);
        assert!(!m.knows(&key("A")) && !m.knows(&key("B")));
        assert_eq!(m.generation(&key("B")), 0);
        assert!(m.check_due(), "every mailbox needs a master again");
        assert!(!m.lookup_recent(&key("C"), Instant(0), 10));
    }

    #[test]
    fn a_handoff_names_the_new_master_until_it_announces_itself() {
        let mut m = Masters::new();
        m.start(key("A"), Mastership { catchup: None, generation: 1 });
        let generation = m.stop(&key("A")).map(|s| s.generation + 1).unwrap_or(0);
        m.hand_off(key("A"), Handoff { requester: Sid(2), requester_job: JobId(9), epoch: 1, generation });
        assert_eq!(m.cached(&key("A")), Some(Sid(2)));
        assert_eq!(m.generation(&key("A")), 2);
        m.announced(&key("A"), Sid(3), 5);
        assert_eq!(m.handoffs().len(), 1, "only the requester's announcement counts");
        m.announced(&key("A"), Sid(2), 1);
        assert_eq!(m.handoffs().len(), 1, "an older generation does not count");
        m.announced(&key("A"), Sid(2), 2);
        assert!(m.handoffs().is_empty());
    }

    #[test]
    fn stale_lookups_are_taken_once() {
        let mut m = Masters::new();
        m.lookup_sent(key("A"), Instant(0));
        m.lookup_sent(key("B"), Instant(900));
        assert!(m.lookup_recent(&key("B"), Instant(1_000), 500));
        assert_eq!(m.take_stale_lookups(Instant(1_000), 500), vec![key("A")]);
        assert!(m.take_stale_lookups(Instant(1_000), 500).is_empty());
    }
}
