//! Link-state routing as a table: our direct links, every server's last announcement of
//! its neighbours, and from them the connected component and a next hop to each server
//! in it. A link counts only when both ends announce it. Ties break on the lowest
//! server id, so routes are deterministic. The table decides; `routing` sends.

use crate::types::Sid;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// How long link changes are collected before they are announced.
pub const LINK_HOLD_US: u64 = 2_000;

/// One server's last announcement.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkAnnouncement {
    pub seq: u64,
    pub epoch: u64,
    pub neighbors: BTreeSet<Sid>,
}

/// What a recomputation changed in the set of reachable servers.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ReachabilityChange {
    pub(crate) gained: Vec<Sid>,
    pub(crate) lost: Vec<Sid>,
}

#[derive(Debug)]
pub(crate) struct RouteTable {
    me: Sid,
    /// The configured servers: announcements name no one else.
    servers: BTreeSet<Sid>,
    links: BTreeSet<Sid>,
    announcements: BTreeMap<Sid, LinkAnnouncement>,
    next_hops: BTreeMap<Sid, Sid>,
    /// Always holds `me`.
    reachable: BTreeSet<Sid>,
}

impl RouteTable {
    pub(crate) fn new(me: Sid, servers: &[Sid]) -> RouteTable {
        RouteTable {
            me,
            servers: servers.iter().copied().collect(),
            links: BTreeSet::new(),
            announcements: BTreeMap::new(),
            next_hops: BTreeMap::new(),
            reachable: BTreeSet::from([me]),
        }
    }

    pub(crate) fn links(&self) -> &BTreeSet<Sid> {
        &self.links
    }

    pub(crate) fn has_link(&self, peer: Sid) -> bool {
        self.links.contains(&peer)
    }

    pub(crate) fn reachable(&self) -> &BTreeSet<Sid> {
        &self.reachable
    }

    pub(crate) fn is_reachable(&self, sid: Sid) -> bool {
        self.reachable.contains(&sid)
    }

    /// Reachable servers other than us, in id order.
    pub(crate) fn reachable_peers(&self) -> Vec<Sid> {
        self.reachable.iter().copied().filter(|s| *s != self.me).collect()
    }

    pub(crate) fn next_hop(&self, dst: Sid) -> Option<Sid> {
        self.next_hops.get(&dst).copied()
    }

    /// A link to a configured peer came up; false for ourselves or a stranger.
    pub(crate) fn link_up(&mut self, peer: Sid) -> bool {
        if peer == self.me || !self.servers.contains(&peer) {
            return false;
        }
        self.links.insert(peer);
        true
    }

    /// True when the link was up.
    pub(crate) fn link_down(&mut self, peer: Sid) -> bool {
        self.links.remove(&peer)
    }

    /// Every other server's announcement, for a new neighbour.
    pub(crate) fn others_announcements(&self) -> Vec<(Sid, LinkAnnouncement)> {
        self.announcements.iter().filter(|(s, _)| **s != self.me).map(|(s, a)| (*s, a.clone())).collect()
    }

    /// Records our own announcement of our current links.
    pub(crate) fn announce_own(&mut self, seq: u64, epoch: u64) -> LinkAnnouncement {
        let own = LinkAnnouncement { seq, epoch, neighbors: self.links.clone() };
        self.announcements.insert(self.me, own.clone());
        own
    }

    /// Records another server's announcement. None if it is not newer than the one we
    /// have (or names a stranger); else the announcement as kept (strangers dropped from
    /// its neighbours) and whether its neighbours changed (routes depend on them only).
    pub(crate) fn learn(
        &mut self,
        origin: Sid,
        seq: u64,
        epoch: u64,
        neighbors: Vec<Sid>,
    ) -> Option<(LinkAnnouncement, bool)> {
        debug_assert_ne!(origin, self.me, "our own announcements are not learned");
        if !self.servers.contains(&origin) || self.announcements.get(&origin).is_some_and(|a| a.seq >= seq) {
            return None;
        }
        let neighbors: BTreeSet<Sid> = neighbors.into_iter().filter(|s| self.servers.contains(s)).collect();
        let changed = self.announcements.get(&origin).is_none_or(|a| a.neighbors != neighbors);
        let announcement = LinkAnnouncement { seq, epoch, neighbors };
        self.announcements.insert(origin, announcement.clone());
        Some((announcement, changed))
    }

    /// Breadth-first search from us over links both ends announce. Routes and
    /// reachability are a function of our links and the announced neighbours only.
    pub(crate) fn recompute(&mut self) -> ReachabilityChange {
        let (next_hops, seen) = match self.routes_dense() {
            Some(found) => found,
            None => self.routes_sparse(),
        };
        debug_assert!(self.routes_sparse() == (next_hops.clone(), seen.clone()), "dense routes differ");
        debug_assert!(seen.contains(&self.me), "we always reach ourselves");
        let before = std::mem::replace(&mut self.reachable, seen);
        self.next_hops = next_hops;
        ReachabilityChange {
            gained: self.reachable.difference(&before).copied().collect(),
            lost: before.difference(&self.reachable).copied().collect(),
        }
    }

    fn linked(&self, a: Sid, b: Sid) -> bool {
        let claims = |x: Sid, y: Sid| {
            if x == self.me {
                self.links.contains(&y)
            } else {
                self.announcements.get(&x).is_some_and(|ann| ann.neighbors.contains(&y))
            }
        };
        claims(a, b) && claims(b, a)
    }

    /// The breadth-first search over a matrix of the configured servers (None if a
    /// server outside the configuration is involved): the same search as
    /// `routes_sparse`, visiting neighbours in the same (id) order.
    fn routes_dense(&self) -> Option<(BTreeMap<Sid, Sid>, BTreeSet<Sid>)> {
        let me = self.me;
        let mut ids: Vec<Sid> = self.servers.iter().copied().collect();
        ids.push(me);
        ids.sort_unstable();
        ids.dedup();
        let n = ids.len();
        let index = |s: Sid| ids.binary_search(&s).ok();
        let me_i = index(me)?;
        // claims[x * n + y]: x has (we) or announces (others) a link to y. A row read
        // in order lists x's neighbours in id order.
        let mut claims = vec![false; n * n];
        for &y in &self.links {
            let j = index(y)?;
            claims[me_i * n + j] = true;
        }
        for (&x, ann) in &self.announcements {
            if x == me {
                continue;
            }
            let i = index(x)?;
            for &y in &ann.neighbors {
                let j = index(y)?;
                claims[i * n + j] = true;
            }
        }
        let linked = |a: usize, b: usize| claims[a * n + b] && claims[b * n + a];
        let mut hop: Vec<Option<usize>> = vec![None; n];
        let mut seen = vec![false; n];
        seen[me_i] = true;
        let mut queue: VecDeque<usize> = VecDeque::new();
        for j in 0..n {
            if linked(me_i, j) && !seen[j] {
                seen[j] = true;
                hop[j] = Some(j);
                queue.push_back(j);
            }
        }
        while let Some(at) = queue.pop_front() {
            let via = hop[at];
            for j in 0..n {
                if linked(at, j) && !seen[j] {
                    seen[j] = true;
                    hop[j] = via;
                    queue.push_back(j);
                }
            }
        }
        let next_hops = hop.iter().enumerate().filter_map(|(i, h)| h.map(|h| (ids[i], ids[h]))).collect();
        let reachable = seen.iter().enumerate().filter(|(_, s)| **s).map(|(i, _)| ids[i]).collect();
        Some((next_hops, reachable))
    }

    fn routes_sparse(&self) -> (BTreeMap<Sid, Sid>, BTreeSet<Sid>) {
        let me = self.me;
        let mut next_hops: BTreeMap<Sid, Sid> = BTreeMap::new();
        let mut seen: BTreeSet<Sid> = BTreeSet::from([me]);
        let mut queue: VecDeque<(Sid, Sid)> = VecDeque::new();
        for &n in &self.links {
            if self.linked(me, n) && seen.insert(n) {
                next_hops.insert(n, n);
                queue.push_back((n, n));
            }
        }
        while let Some((at, hop)) = queue.pop_front() {
            let neighbors: Vec<Sid> =
                self.announcements.get(&at).map(|a| a.neighbors.iter().copied().collect()).unwrap_or_default();
            for n in neighbors {
                if self.linked(at, n) && seen.insert(n) {
                    next_hops.insert(n, hop);
                    queue.push_back((n, hop));
                }
            }
        }
        (next_hops, seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u32) -> Sid {
        Sid(n)
    }

    /// Server 1's table in a line 1-2-3 (3 is not linked to 1).
    fn line() -> RouteTable {
        let mut t = RouteTable::new(s(1), &[s(1), s(2), s(3)]);
        t.link_up(s(2));
        t.learn(s(2), 1, 0, vec![s(1), s(3)]);
        t.learn(s(3), 1, 0, vec![s(2)]);
        t
    }

    #[test]
    fn a_line_routes_through_the_middle() {
        let mut t = line();
        let change = t.recompute();
        assert_eq!(change.gained, vec![s(2), s(3)]);
        assert_eq!(t.next_hop(s(3)), Some(s(2)));
        assert_eq!(t.next_hop(s(2)), Some(s(2)));
        assert_eq!(t.reachable_peers(), vec![s(2), s(3)]);
    }

    #[test]
    fn a_link_counts_only_when_both_ends_announce_it() {
        let mut t = RouteTable::new(s(1), &[s(1), s(2)]);
        t.link_up(s(2));
        t.recompute();
        assert!(!t.is_reachable(s(2)), "2 has not announced the link yet");
        t.learn(s(2), 1, 0, vec![s(1)]);
        t.recompute();
        assert!(t.is_reachable(s(2)));
    }

    #[test]
    fn losing_the_middle_loses_the_far_end() {
        let mut t = line();
        t.recompute();
        assert!(t.link_down(s(2)));
        let change = t.recompute();
        assert_eq!(change.lost, vec![s(2), s(3)]);
        assert_eq!(t.next_hop(s(3)), None);
        assert_eq!(t.reachable().iter().copied().collect::<Vec<_>>(), vec![s(1)]);
    }

    #[test]
    fn stale_and_foreign_announcements_are_ignored() {
        let mut t = line();
        assert!(t.learn(s(2), 1, 0, vec![s(1)]).is_none(), "same seq");
        assert!(t.learn(s(9), 1, 0, vec![s(1)]).is_none(), "not configured");
        let (kept, changed) = t.learn(s(2), 2, 5, vec![s(1), s(3), s(9)]).expect("newer");
        assert!(!changed, "the same neighbours once strangers are dropped");
        assert_eq!(kept.neighbors, BTreeSet::from([s(1), s(3)]));
    }

    #[test]
    fn strangers_and_ourselves_get_no_link() {
        let mut t = RouteTable::new(s(1), &[s(1), s(2)]);
        assert!(!t.link_up(s(1)));
        assert!(!t.link_up(s(7)));
        assert!(t.links().is_empty());
    }

    #[test]
    fn dense_and_sparse_searches_agree_on_a_ring() {
        let servers: Vec<Sid> = (1..=6).map(s).collect();
        let mut t = RouteTable::new(s(1), &servers);
        t.link_up(s(2));
        t.link_up(s(6));
        for n in 2..=6u32 {
            let prev = if n == 1 { 6 } else { n - 1 };
            let next = if n == 6 { 1 } else { n + 1 };
            t.learn(s(n), 1, 0, vec![s(prev), s(next)]);
        }
        t.recompute();
        assert_eq!(t.routes_dense(), Some(t.routes_sparse()));
        assert_eq!(t.next_hop(s(4)), Some(s(2)), "ties break on the lowest id");
        assert_eq!(t.next_hop(s(5)), Some(s(6)));
    }
}
