//! Bodies this server lacks or holds damaged, and the FETCHes that bring them: which
//! peer to ask next, how many may be in flight, when to retry, and the census a master
//! runs when no peer it tried has the body. Whether to give up on a body is decided by
//! the server (`replication`), which knows what else is in flight.

use crate::types::{Guid, Instant, Sid};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

const FETCH_RETRY_US: u64 = 100_000;
/// FETCHes in flight at once: enough to fill a fast link, few enough that a resync of a
/// large mailbox does not queue its whole body traffic at once.
const FETCH_WINDOW_MAX: usize = 256;
/// A census whose answers did not all arrive is started again after this long.
const CENSUS_TIMEOUT_US: u64 = 5_000_000;
/// Bodies omitted here by design that peers asked us for, remembered at most (see
/// `BodyFetch::asked_for_omitted`): when full, the oldest ask is forgotten.
const OMITTED_ASKS_MAX: usize = 1024;
/// An ask for an omitted body is forgotten after this long: a peer that goes round its
/// peers comes back well within it (a retry waits at most a second), and one that
/// found the body elsewhere never comes back.
const OMITTED_ASK_KEPT_US: u64 = 60_000_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WantedBody {
    /// The checksum the body must have (0: take the one it comes with).
    pub checksum: u64,
    /// A peer likely to have it, asked first.
    pub hint: Option<Sid>,
    pub attempts: u32,
    pub next_try: Instant,
    /// Ours is damaged (or was removed by hand): a repair, not a first copy.
    pub repair: bool,
    /// A census the mailbox master runs when no peer it tried has the body: it asks every
    /// configured server at once and notes who answered that it has none since `started`.
    pub census: Option<BodyCensus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BodyCensus {
    pub started: Instant,
    pub denied: BTreeSet<Sid>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct BodyFetch {
    wanted: BTreeMap<Guid, WantedBody>,
    /// FETCHes sent and not yet answered, with when we stop waiting: at most
    /// `FETCH_WINDOW_MAX`, refilled as bodies arrive.
    in_flight: BTreeMap<Guid, Instant>,
    /// Set by whatever may let more FETCHes go out; acted on once after the input.
    kick: bool,
    /// Bodies this server omits by design (a partial server) that peers asked it for,
    /// with when first asked and who asked: at most `OMITTED_ASKS_MAX`.
    #[serde(default)]
    omitted_asks: BTreeMap<Guid, (Instant, BTreeSet<Sid>)>,
}

impl BodyFetch {
    /// Wants a body (a second call for the same body changes nothing).
    pub(crate) fn want(&mut self, guid: Guid, checksum: u64, hint: Option<Sid>, repair: bool, now: Instant) {
        self.wanted.entry(guid).or_insert(WantedBody {
            checksum,
            hint,
            attempts: 0,
            next_try: now,
            repair,
            census: None,
        });
        // One fetch pass after the input, not one per wanted body: a SYNC can want
        // thousands.
        self.kick = true;
    }

    pub(crate) fn is_wanted(&self, guid: &Guid) -> bool {
        self.wanted.contains_key(guid)
    }

    pub(crate) fn count(&self) -> usize {
        self.wanted.len()
    }

    /// The checksum an arriving body must have, and whether it repairs ours; None if
    /// the body is not wanted.
    pub(crate) fn expected(&self, guid: &Guid, offered_checksum: u64) -> Option<(u64, bool)> {
        let w = self.wanted.get(guid)?;
        Some((if w.checksum != 0 { w.checksum } else { offered_checksum }, w.repair))
    }

    /// A FETCH brought the body: its slot is free for another.
    pub(crate) fn fetched(&mut self, guid: &Guid) {
        self.wanted.remove(guid);
        self.in_flight.remove(guid);
        self.kick = true;
    }

    /// The body came some other way (with a change).
    pub(crate) fn not_wanted(&mut self, guid: &Guid) {
        self.wanted.remove(guid);
    }

    /// Keeps wanting only the bodies `keep` accepts.
    pub(crate) fn retain(&mut self, keep: impl Fn(&Guid) -> bool) {
        self.wanted.retain(|g, _| keep(g));
    }

    pub(crate) fn kick(&mut self) {
        self.kick = true;
    }

    pub(crate) fn take_kick(&mut self) -> bool {
        std::mem::take(&mut self.kick)
    }

    /// Wanted bodies whose next try is due, as many as the window has room for.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<Guid> {
        let wanted = &self.wanted;
        self.in_flight.retain(|g, until| *until > now && wanted.contains_key(g));
        let room = FETCH_WINDOW_MAX.saturating_sub(self.in_flight.len());
        let due: Vec<Guid> = self
            .wanted
            .iter()
            .filter(|(g, w)| w.next_try <= now && !self.in_flight.contains_key(g))
            .map(|(g, _)| *g)
            .take(room)
            .collect();
        debug_assert!(self.in_flight.len() + due.len() <= FETCH_WINDOW_MAX);
        due
    }

    /// Whether a due body was tried at every one of `peers_count` peers without a
    /// census running: a census may then decide whether the body is anywhere.
    pub(crate) fn census_due(&self, guid: &Guid, peers_count: usize, now: Instant) -> bool {
        let Some(w) = self.wanted.get(guid) else { return false };
        let census_stale = w.census.as_ref().is_some_and(|c| c.started.plus_us(CENSUS_TIMEOUT_US) <= now);
        (w.census.is_none() || census_stale) && w.attempts as usize >= peers_count
    }

    /// The peer to ask for a due body next: round after round, the hint first and then
    /// each other peer in turn (each once a round); the FETCH counts as in flight until
    /// its retry is due. A round that asks each peer once is what lets a peer that
    /// omits the body by design take a second ask as "no other server has it"
    /// (`asked_for_omitted`).
    pub(crate) fn ask(&mut self, guid: Guid, peers: &[Sid], now: Instant) -> Option<Sid> {
        let w = self.wanted.get_mut(&guid)?;
        let (attempts, offset) = (w.attempts as usize, guid.0 as usize);
        let target = match w.hint.filter(|h| peers.contains(h) && peers.len() > 1) {
            Some(h) => match attempts % peers.len() {
                0 => h,
                step => *peers.iter().filter(|p| **p != h).nth((step - 1 + offset) % (peers.len() - 1))?,
            },
            None => *peers.get((attempts + offset) % peers.len().max(1))?,
        };
        w.attempts = w.attempts.saturating_add(1);
        w.next_try = now.plus_us(FETCH_RETRY_US * u64::from(w.attempts.min(10)));
        self.in_flight.insert(guid, w.next_try);
        Some(target)
    }

    /// `src` asked us for a body we omit by design. True when it asked before: a peer
    /// asks each of its peers in turn, so a second ask means it tried every other server
    /// without finding the body. The master that omits it is then the one to look for
    /// it and, if it is nowhere, to run the census that gives it up (a peer's census
    /// may not: it masters none of the mailboxes holding it).
    pub(crate) fn asked_for_omitted(&mut self, guid: Guid, src: Sid, now: Instant) -> bool {
        if self.wanted.contains_key(&guid) {
            return false;
        }
        if let Some((since, askers)) = self.omitted_asks.get_mut(&guid)
            && since.plus_us(OMITTED_ASK_KEPT_US) > now
        {
            if !askers.insert(src) {
                self.omitted_asks.remove(&guid);
                return true;
            }
            return false;
        }
        if self.omitted_asks.len() >= OMITTED_ASKS_MAX && !self.omitted_asks.contains_key(&guid) {
            let oldest = self.omitted_asks.iter().min_by_key(|(g, (since, _))| (*since, **g)).map(|(g, _)| *g);
            if let Some(oldest) = oldest {
                self.omitted_asks.remove(&oldest);
            }
        }
        self.omitted_asks.insert(guid, (now, BTreeSet::from([src])));
        debug_assert!(self.omitted_asks.len() <= OMITTED_ASKS_MAX);
        false
    }

    /// Forgets the asks for omitted bodies `keep` rejects (no message holds them any
    /// more, or we hold the body now), and those kept long enough.
    pub(crate) fn retain_omitted_asks(&mut self, keep: impl Fn(&Guid) -> bool, now: Instant) {
        self.omitted_asks.retain(|g, (since, _)| since.plus_us(OMITTED_ASK_KEPT_US) > now && keep(g));
    }

    pub(crate) fn omitted_asks_count(&self) -> usize {
        self.omitted_asks.len()
    }

    /// A census of `guid` starts now (every configured server is asked).
    pub(crate) fn start_census(&mut self, guid: Guid, now: Instant) {
        if let Some(w) = self.wanted.get_mut(&guid) {
            w.census = Some(BodyCensus { started: now, denied: BTreeSet::new() });
            w.next_try = now.plus_us(FETCH_RETRY_US * 10);
        }
    }

    /// The next try of `guid` (a census again, if it is still due) at most one retry
    /// interval from now.
    pub(crate) fn retry_soon(&mut self, guid: Guid, now: Instant) {
        if let Some(w) = self.wanted.get_mut(&guid) {
            w.next_try = w.next_try.min(now.plus_us(FETCH_RETRY_US));
        }
    }

    /// `src` has no intact copy of `guid`. True when that completes a census: every
    /// server in `others` has said so (the census is then over).
    pub(crate) fn denied(&mut self, guid: Guid, src: Sid, others: &[Sid]) -> bool {
        // The slot is free; the body is tried again (elsewhere) when its retry is due.
        self.in_flight.remove(&guid);
        let Some(w) = self.wanted.get_mut(&guid) else { return false };
        let Some(census) = w.census.as_mut() else { return false };
        census.denied.insert(src);
        if !others.iter().all(|s| census.denied.contains(s)) {
            return false;
        }
        w.census = None;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_ask_for_an_omitted_body_from_one_peer_means_it_tried_everyone() {
        let mut f = BodyFetch::default();
        let t = Instant(1_000);
        assert!(!f.asked_for_omitted(Guid(7), Sid(2), t));
        assert!(!f.asked_for_omitted(Guid(7), Sid(3), t), "another peer's first ask");
        assert!(f.asked_for_omitted(Guid(7), Sid(2), t), "s2 came round again");
        assert_eq!(f.omitted_asks_count(), 0, "settled: the body is wanted here now");
        f.want(Guid(8), 1, None, false, t);
        assert!(!f.asked_for_omitted(Guid(8), Sid(2), t));
        assert!(!f.asked_for_omitted(Guid(8), Sid(2), t), "wanted here already: nothing to start");
        assert!(!f.asked_for_omitted(Guid(9), Sid(2), t));
        let late = t.plus_us(OMITTED_ASK_KEPT_US);
        assert!(!f.asked_for_omitted(Guid(9), Sid(2), late), "an ask that old is forgotten: a first ask again");
        for g in 0..(OMITTED_ASKS_MAX as u128 + 10) {
            f.asked_for_omitted(Guid(100 + g), Sid(2), late.plus_us(g as u64));
        }
        assert_eq!(f.omitted_asks_count(), OMITTED_ASKS_MAX, "bounded");
        assert!(!f.asked_for_omitted(Guid(100), Sid(2), late), "the oldest was forgotten to make room");
    }

    #[test]
    fn the_hint_is_asked_first_then_the_others_in_turn() {
        let mut f = BodyFetch::default();
        let peers = [Sid(2), Sid(3)];
        f.want(Guid(4), 9, Some(Sid(3)), false, Instant(0));
        assert!(f.take_kick());
        assert_eq!(f.due(Instant(0)), vec![Guid(4)]);
        assert_eq!(f.ask(Guid(4), &peers, Instant(0)), Some(Sid(3)));
        assert!(f.due(Instant(0)).is_empty(), "in flight until its retry");
        let retry = Instant(FETCH_RETRY_US);
        assert_eq!(f.due(retry), vec![Guid(4)]);
        assert_eq!(f.ask(Guid(4), &peers, retry), Some(Sid(2)), "the other peer, not the hint again");
        let (second, third) = (Instant(FETCH_RETRY_US * 3), Instant(FETCH_RETRY_US * 6));
        let asked = [f.ask(Guid(4), &peers, second), f.ask(Guid(4), &peers, third)];
        assert!(asked.contains(&Some(Sid(2))) && asked.contains(&Some(Sid(3))), "then every peer in turn");
    }

    #[test]
    fn a_census_starts_once_everyone_was_tried() {
        let mut f = BodyFetch::default();
        let peers = [Sid(2)];
        f.want(Guid(1), 9, None, false, Instant(0));
        assert!(!f.census_due(&Guid(1), peers.len(), Instant(0)));
        assert_eq!(f.ask(Guid(1), &peers, Instant(0)), Some(Sid(2)));
        assert!(f.census_due(&Guid(1), peers.len(), Instant(0)));
        f.start_census(Guid(1), Instant(0));
        assert!(!f.denied(Guid(1), Sid(2), &[Sid(2), Sid(3)]));
        assert!(f.denied(Guid(1), Sid(3), &[Sid(2), Sid(3)]), "every other server said no");
        assert!(!f.denied(Guid(1), Sid(3), &[Sid(2), Sid(3)]), "the census is over");
    }

    #[test]
    fn a_wanted_body_keeps_its_checksum() {
        let mut f = BodyFetch::default();
        f.want(Guid(1), 0, None, true, Instant(0));
        f.want(Guid(2), 7, None, false, Instant(0));
        assert_eq!(f.expected(&Guid(1), 5), Some((5, true)), "0 takes the offered one");
        assert_eq!(f.expected(&Guid(2), 5), Some((7, false)));
        f.fetched(&Guid(2));
        assert_eq!(f.expected(&Guid(2), 5), None);
        f.retain(|_| false);
        assert_eq!(f.count(), 0);
    }

    #[test]
    fn the_window_bounds_fetches_in_flight() {
        let mut f = BodyFetch::default();
        let peers = [Sid(2)];
        for g in 0..(FETCH_WINDOW_MAX as u128 + 10) {
            f.want(Guid(g), 1, None, false, Instant(0));
        }
        let due = f.due(Instant(0));
        assert_eq!(due.len(), FETCH_WINDOW_MAX);
        for g in due {
            f.ask(g, &peers, Instant(0));
        }
        assert!(f.due(Instant(0)).is_empty());
    }
}
