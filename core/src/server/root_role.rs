//! The root term as this server sees it, and, while it is the root, what the root keeps:
//! which members have dropped their masterships (the root answers no lookup before they
//! all have), the authoritative table of who masters what in this term with each key's
//! generation, and lookups held until the term is active. `root` decides when terms
//! open and are accepted; this keeps their rules.

use crate::types::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Bits of an epoch that hold the id of the root that opened it.
pub const EPOCH_SID_BITS: u32 = 16;
const EPOCH_SID_MASK: u64 = (1 << EPOCH_SID_BITS) - 1;
/// The last round an epoch can hold (peers' epochs are bounded far below it, see
/// `limits::EPOCH_MAX`): the round never wraps.
pub(crate) const EPOCH_ROUND_LAST: u64 = u64::MAX >> EPOCH_SID_BITS;

/// Root term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Term {
    pub epoch: u64,
    /// None right after a restart, before any term is known.
    pub root: Option<Sid>,
}

impl Term {
    /// Higher epoch wins; on equal epochs the lower root id wins. Any term with a root
    /// beats having none (a server that just restarted takes the term it is offered).
    pub fn beats(&self, other: &Term) -> bool {
        if other.root.is_none() {
            return self.root.is_some();
        }
        let rank = |t: &Term| (t.epoch, std::cmp::Reverse(t.root.map(|s| s.0).unwrap_or(u32::MAX)));
        rank(self) > rank(other)
    }

    /// The epoch of the next term `root` opens above `seen`: two roots on the two sides
    /// of a partition never open terms with the same epoch (messages name a term by its
    /// epoch), because the low bits are the root's id.
    pub fn next_epoch(seen: u64, root: Sid) -> u64 {
        let round = (seen >> EPOCH_SID_BITS).saturating_add(1).min(EPOCH_ROUND_LAST);
        (round << EPOCH_SID_BITS) | (u64::from(root.0) & EPOCH_SID_MASK)
    }
}

/// What the root keeps about its own term.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RootState {
    /// Servers that have dropped their masterships in this term.
    pub dropped: BTreeSet<Sid>,
    /// Servers reachable when the term opened: the root stays silent until all of them
    /// (those still reachable) have dropped.
    pub members: BTreeSet<Sid>,
    pub active: bool,
    /// The authoritative table: who masters what in this term.
    pub table: BTreeMap<MasterKey, Sid>,
    /// The generation of each key's master in this term (kept when a master is lost).
    pub generations: BTreeMap<MasterKey, u64>,
    /// Lookups held while the root is not yet active: (asker, key).
    pub held: Vec<(Sid, MasterKey)>,
}

/// A term that became active: its members, and the lookups held until then.
pub(crate) type Activation = (BTreeSet<Sid>, Vec<(Sid, MasterKey)>);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RootRole {
    me: Sid,
    term: Term,
    /// Meaningful while we are the root of `term`; empty otherwise.
    state: RootState,
}

impl RootRole {
    /// After a start: the highest epoch seen, no root yet.
    pub(crate) fn new(me: Sid, epoch: u64) -> RootRole {
        RootRole { me, term: Term { epoch, root: None }, state: RootState::default() }
    }

    pub(crate) fn term(&self) -> Term {
        self.term
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.term.epoch
    }

    pub(crate) fn root(&self) -> Option<Sid> {
        self.term.root
    }

    pub(crate) fn is_root(&self) -> bool {
        self.term.root == Some(self.me)
    }

    /// We are the root and every member has dropped: lookups are answered.
    pub(crate) fn active(&self) -> bool {
        self.is_root() && self.state.active
    }

    /// We open a term at `epoch` with `members` (ourselves included, already dropped).
    pub(crate) fn open(&mut self, epoch: u64, members: BTreeSet<Sid>) {
        debug_assert!(Term { epoch, root: Some(self.me) }.beats(&self.term) || epoch == self.term.epoch);
        debug_assert!(members.contains(&self.me));
        self.term = Term { epoch, root: Some(self.me) };
        self.state = RootState { dropped: BTreeSet::from([self.me]), members, ..RootState::default() };
    }

    /// We take another root's term.
    pub(crate) fn accept(&mut self, term: Term) {
        debug_assert!(term.beats(&self.term));
        self.term = term;
        self.state = RootState::default();
    }

    /// Whether reachable servers are outside this term's members (the component grew).
    pub(crate) fn grew(&self, reachable: &BTreeSet<Sid>) -> bool {
        reachable.iter().any(|s| !self.state.members.contains(s))
    }

    pub(crate) fn member_dropped(&mut self, from: Sid) {
        self.state.dropped.insert(from);
    }

    /// Whether this term's table names `server` master of anything.
    pub(crate) fn table_names(&self, server: Sid) -> bool {
        self.state.table.values().any(|m| *m == server)
    }

    pub(crate) fn has_dropped(&self, from: Sid) -> bool {
        self.state.dropped.contains(&from)
    }

    /// Reachable servers that have not dropped yet (the term is sent to them).
    pub(crate) fn not_dropped(&self, reachable: &BTreeSet<Sid>) -> Vec<Sid> {
        reachable.iter().copied().filter(|s| !self.state.dropped.contains(s)).collect()
    }

    /// Activates the term if no reachable member is still to drop. Returns the held
    /// lookups to answer, or None if the term stays silent (or is not ours).
    pub(crate) fn try_activate(&mut self, reachable: &BTreeSet<Sid>) -> Option<Activation> {
        if !self.is_root() || self.state.active {
            return None;
        }
        let waiting = self.state.members.iter().any(|s| reachable.contains(s) && !self.state.dropped.contains(s));
        if waiting {
            return None;
        }
        self.state.active = true;
        Some((self.state.members.clone(), std::mem::take(&mut self.state.held)))
    }

    /// Holds a lookup until the term is active (at most `held_max`).
    pub(crate) fn hold(&mut self, asker: Sid, key: MasterKey, held_max: usize) {
        if self.state.held.len() < held_max {
            self.state.held.push((asker, key));
        }
    }

    /// `peer` is out of reach: it masters nothing in our table, and if it comes back it
    /// must drop its masterships again (it may have had its own root meanwhile).
    pub(crate) fn peer_lost(&mut self, peer: Sid) {
        if !self.is_root() {
            return;
        }
        self.state.table.retain(|_, m| *m != peer);
        self.state.members.remove(&peer);
        self.state.dropped.remove(&peer);
    }

    pub(crate) fn table(&self) -> &BTreeMap<MasterKey, Sid> {
        &self.state.table
    }

    pub(crate) fn generation(&self, key: &MasterKey) -> u64 {
        self.state.generations.get(key).copied().unwrap_or(0)
    }

    /// Records `master` for `key` at `generation`.
    pub(crate) fn record(&mut self, key: MasterKey, master: Sid, generation: u64) {
        self.state.table.insert(key.clone(), master);
        self.state.generations.insert(key, generation);
    }

    /// The master of `key` for a lookup by `asker`: the recorded one if `usable`, else
    /// the asker, as the key's next generation. Returns (master, generation).
    pub(crate) fn assign(&mut self, key: &MasterKey, asker: Sid, usable: impl Fn(Sid) -> bool) -> (Sid, u64) {
        debug_assert!(self.is_root(), "only the root assigns masters");
        let recorded = self.state.table.get(key).copied().filter(|m| usable(*m));
        let master = match recorded {
            Some(m) => m,
            None => {
                self.state.table.insert(key.clone(), asker);
                let g = self.state.generations.entry(key.clone()).or_insert(0);
                *g = g.saturating_add(1);
                asker
            }
        };
        (master, self.generation(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::of(&MailboxKey::from_shared("alice".into(), "INBOX".into()), Granularity::Mailbox)
    }

    fn set(ids: &[u32]) -> BTreeSet<Sid> {
        ids.iter().map(|i| Sid(*i)).collect()
    }

    #[test]
    fn terms_order_by_epoch_then_lowest_root() {
        let t = |epoch, root| Term { epoch, root: Some(Sid(root)) };
        assert!(t(2, 5).beats(&t(1, 1)));
        assert!(t(2, 1).beats(&t(2, 5)));
        assert!(!t(2, 5).beats(&t(2, 1)));
        assert!(t(0, 9).beats(&Term { epoch: 7, root: None }));
    }

    #[test]
    fn two_roots_never_open_the_same_epoch() {
        let a = Term::next_epoch(5 << EPOCH_SID_BITS, Sid(1));
        let b = Term::next_epoch(5 << EPOCH_SID_BITS, Sid(2));
        assert_ne!(a, b);
        assert!(a > 5 << EPOCH_SID_BITS && b > 5 << EPOCH_SID_BITS);
        assert_eq!(Term::next_epoch(u64::MAX, Sid(1)) >> EPOCH_SID_BITS, EPOCH_ROUND_LAST, "never wraps");
    }

    #[test]
    fn a_term_is_silent_until_every_reachable_member_dropped() {
        let mut r = RootRole::new(Sid(1), 0);
        r.open(Term::next_epoch(0, Sid(1)), set(&[1, 2, 3]));
        r.hold(Sid(2), key(), 10);
        assert!(r.try_activate(&set(&[1, 2, 3])).is_none());
        r.member_dropped(Sid(2));
        assert!(r.try_activate(&set(&[1, 2, 3])).is_none(), "3 has not dropped");
        let (members, held) = r.try_activate(&set(&[1, 2])).expect("3 is out of reach");
        assert_eq!(members, set(&[1, 2, 3]));
        assert_eq!(held, vec![(Sid(2), key())]);
        assert!(r.active());
    }

    #[test]
    fn a_lookup_gets_the_recorded_master_or_the_asker() {
        let mut r = RootRole::new(Sid(1), 0);
        r.open(Term::next_epoch(0, Sid(1)), set(&[1, 2, 3]));
        assert_eq!(r.assign(&key(), Sid(2), |_| true), (Sid(2), 1));
        assert_eq!(r.assign(&key(), Sid(3), |_| true), (Sid(2), 1), "recorded and reachable");
        assert_eq!(r.assign(&key(), Sid(3), |s| s != Sid(2)), (Sid(3), 2), "a new generation");
        r.peer_lost(Sid(3));
        assert!(r.table().is_empty());
        assert_eq!(r.generation(&key()), 2, "the generation survives the master");
    }

    #[test]
    fn accepting_a_term_forgets_the_root_state() {
        let mut r = RootRole::new(Sid(2), 0);
        r.open(Term::next_epoch(0, Sid(2)), set(&[2]));
        r.record(key(), Sid(2), 1);
        r.accept(Term { epoch: Term::next_epoch(1 << EPOCH_SID_BITS, Sid(1)), root: Some(Sid(1)) });
        assert!(!r.is_root() && r.table().is_empty());
        assert!(r.grew(&set(&[1, 2])), "a non-root has no members");
    }
}
