//! Link-state routing as a table: our direct links, every server's last announcement of
//! its neighbours, and from them the connected component and a next hop to each server
//! in it. A link counts only when both ends announce it. Ties break on the lowest
//! server id, so routes are deterministic. The table decides; `routing` sends.
//!
//! Only members count: a link to a server outside the membership (one not added yet,
//! or retired) is remembered apart and carries nothing but membership and link state;
//! announcements are kept from anyone (bounded), so a server added later is routed to
//! at once, and routes use members' announcements and links between members only.

use crate::types::Sid;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// How long link changes are collected before they are announced.
pub const LINK_HOLD_US: u64 = 2_000;

/// One server's last announcement.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkAnnouncement {
    pub seq: u64,
    pub epoch: u64,
    /// The announcing server's store identity (see `DiskImage::store_id`).
    pub store: u64,
    pub neighbors: BTreeSet<Sid>,
}

/// What a recomputation changed in the set of reachable servers.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ReachabilityChange {
    pub(crate) gained: Vec<Sid>,
    pub(crate) lost: Vec<Sid>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RouteTable {
    me: Sid,
    /// The members (see `membership`): routes use no one else.
    servers: BTreeSet<Sid>,
    /// Links up to members.
    links: BTreeSet<Sid>,
    /// Links up to servers outside the membership.
    stranger_links: BTreeSet<Sid>,
    announcements: BTreeMap<Sid, LinkAnnouncement>,
    /// Each member's store identity as last heard: from the member itself when a link to
    /// it comes up (its MEMBERS), or from its newest announcement.
    #[serde(default)]
    stores: BTreeMap<Sid, u64>,
    /// Neighbours whose store we heard from them on the link that is up now: until it
    /// goes down, no announcement (which may be an old one, relayed) overrides it.
    #[serde(default)]
    stores_from_link: BTreeSet<Sid>,
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
            stranger_links: BTreeSet::new(),
            announcements: BTreeMap::new(),
            stores: BTreeMap::new(),
            stores_from_link: BTreeSet::new(),
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

    /// A link up to `peer`, member or not.
    pub(crate) fn has_any_link(&self, peer: Sid) -> bool {
        self.links.contains(&peer) || self.stranger_links.contains(&peer)
    }

    /// Every link up, members' and strangers'.
    pub(crate) fn all_links(&self) -> Vec<Sid> {
        self.links.union(&self.stranger_links).copied().collect()
    }

    /// The membership changed: links move between members' and strangers'. True when
    /// the members' links changed (our announcement must go out again).
    pub(crate) fn set_servers(&mut self, servers: &[Sid]) -> bool {
        self.servers = servers.iter().copied().collect();
        let all: BTreeSet<Sid> = self.links.union(&self.stranger_links).copied().collect();
        let (links, strangers): (BTreeSet<Sid>, BTreeSet<Sid>) =
            all.into_iter().partition(|s| self.servers.contains(s));
        let changed = links != self.links;
        self.links = links;
        self.stranger_links = strangers;
        let (servers, links) = (&self.servers, &self.links);
        self.stores.retain(|s, _| servers.contains(s));
        self.stores_from_link.retain(|s| links.contains(s));
        changed
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

    /// A link to a member came up; false for ourselves or a stranger (whose link is
    /// remembered, up to `MEMBERS_MAX` of them).
    pub(crate) fn link_up(&mut self, peer: Sid) -> bool {
        if peer == self.me {
            return false;
        }
        if !self.servers.contains(&peer) {
            if self.stranger_links.len() < crate::membership::MEMBERS_MAX {
                self.stranger_links.insert(peer);
            }
            return false;
        }
        self.links.insert(peer);
        true
    }

    /// True when a link to a member was up.
    pub(crate) fn link_down(&mut self, peer: Sid) -> bool {
        self.stranger_links.remove(&peer);
        self.stores_from_link.remove(&peer);
        self.links.remove(&peer)
    }

    /// Every other server's announcement, for a new neighbour.
    pub(crate) fn others_announcements(&self) -> Vec<(Sid, LinkAnnouncement)> {
        self.announcements.iter().filter(|(s, _)| **s != self.me).map(|(s, a)| (*s, a.clone())).collect()
    }

    /// `server`'s store identity as last heard (None: not heard yet).
    pub(crate) fn store_of(&self, server: Sid) -> Option<u64> {
        self.stores.get(&server).copied()
    }

    /// `server` has the store `store`, as it or its newest announcement says. Some(the
    /// identity heard before, if any) when this is news. A member's store changes only
    /// by a lost or replaced disk; the table is bounded like the announcements.
    pub(crate) fn heard_store(&mut self, server: Sid, store: u64, on_link: bool) -> Option<Option<u64>> {
        debug_assert_ne!(server, self.me, "our own store is not learned");
        if !self.servers.contains(&server) {
            return None;
        }
        if on_link {
            debug_assert!(self.links.contains(&server), "heard on a link that is up");
            self.stores_from_link.insert(server);
        } else if self.stores_from_link.contains(&server) {
            return None;
        }
        let before = self.stores.insert(server, store);
        debug_assert!(self.stores.len() <= self.servers.len(), "one store per member");
        (before != Some(store)).then_some(before)
    }

    /// Records our own announcement of our current links.
    pub(crate) fn announce_own(&mut self, seq: u64, epoch: u64, store: u64) -> LinkAnnouncement {
        let own = LinkAnnouncement { seq, epoch, store, neighbors: self.links.clone() };
        self.announcements.insert(self.me, own.clone());
        own
    }

    /// Records another server's announcement. None if it is not newer than the one we
    /// have (or would be one too many); else the announcement as kept and whether its
    /// neighbours changed (routes depend on them only).
    pub(crate) fn learn(
        &mut self,
        origin: Sid,
        seq: u64,
        epoch: u64,
        store: u64,
        neighbors: Vec<Sid>,
    ) -> Option<(LinkAnnouncement, bool)> {
        debug_assert_ne!(origin, self.me, "our own announcements are not learned");
        match self.announcements.get(&origin) {
            Some(a) if a.seq >= seq => return None,
            None if self.announcements.len() >= crate::membership::MEMBERS_MAX => return None,
            _ => {}
        }
        let neighbors: BTreeSet<Sid> = neighbors.into_iter().collect();
        let changed = self.announcements.get(&origin).is_none_or(|a| a.neighbors != neighbors);
        let announcement = LinkAnnouncement { seq, epoch, store, neighbors };
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

    /// Whether the servers we reach still reach each other without us: false when we
    /// are the only relay between some of them (retiring us would split the cluster).
    pub(crate) fn others_connected_without_me(&self) -> bool {
        let others: BTreeSet<Sid> = self.reachable.iter().copied().filter(|s| *s != self.me).collect();
        let Some(&start) = others.iter().next() else { return true };
        let mut seen = BTreeSet::from([start]);
        let mut queue = VecDeque::from([start]);
        while let Some(at) = queue.pop_front() {
            for &n in &others {
                if !seen.contains(&n) && self.linked(at, n) {
                    seen.insert(n);
                    queue.push_back(n);
                }
            }
        }
        seen == others
    }

    fn linked(&self, a: Sid, b: Sid) -> bool {
        if !self.servers.contains(&a) && a != self.me || !self.servers.contains(&b) {
            return false;
        }
        let claims = |x: Sid, y: Sid| {
            if x == self.me {
                self.links.contains(&y)
            } else {
                self.announcements.get(&x).is_some_and(|ann| ann.neighbors.contains(&y))
            }
        };
        claims(a, b) && claims(b, a)
    }

    /// The breadth-first search over a matrix of the members: the same search as
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
            let Some(i) = index(x) else { continue };
            for &y in &ann.neighbors {
                let Some(j) = index(y) else { continue };
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
        t.learn(s(2), 1, 0, 0, vec![s(1), s(3)]);
        t.learn(s(3), 1, 0, 0, vec![s(2)]);
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
        t.learn(s(2), 1, 0, 0, vec![s(1)]);
        t.recompute();
        assert!(t.is_reachable(s(2)));
    }

    #[test]
    fn the_middle_of_a_line_is_the_only_relay() {
        let mut t = line();
        t.recompute();
        assert!(t.others_connected_without_me(), "1 is an end: 2 and 3 are linked");
        let mut middle = RouteTable::new(s(2), &[s(1), s(2), s(3)]);
        middle.link_up(s(1));
        middle.link_up(s(3));
        middle.learn(s(1), 1, 0, 0, vec![s(2)]);
        middle.learn(s(3), 1, 0, 0, vec![s(2)]);
        middle.recompute();
        assert_eq!(middle.reachable_peers(), vec![s(1), s(3)]);
        assert!(!middle.others_connected_without_me(), "1 and 3 meet only through 2");
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
    fn stale_announcements_are_ignored_and_strangers_are_not_routed_to() {
        let mut t = line();
        assert!(t.learn(s(2), 1, 0, 0, vec![s(1)]).is_none(), "same seq");
        assert!(t.learn(s(9), 1, 0, 0, vec![s(2)]).is_some(), "kept for when 9 is added");
        let (kept, changed) = t.learn(s(2), 2, 5, 0, vec![s(1), s(3), s(9)]).expect("newer");
        assert!(changed);
        assert_eq!(kept.neighbors, BTreeSet::from([s(1), s(3), s(9)]));
        t.recompute();
        assert!(!t.is_reachable(s(9)), "not a member");
        assert_eq!(t.routes_dense(), Some(t.routes_sparse()));
        t.set_servers(&[s(1), s(2), s(3), s(9)]);
        let change = t.recompute();
        assert_eq!(change.gained, vec![s(9)], "routed to once added");
        assert_eq!(t.next_hop(s(9)), Some(s(2)));
        t.set_servers(&[s(1), s(3)]);
        let change = t.recompute();
        assert_eq!(change.lost, vec![s(2), s(3), s(9)], "2 retired: 3 was behind it");
    }

    #[test]
    fn strangers_and_ourselves_get_no_link_until_added() {
        let mut t = RouteTable::new(s(1), &[s(1), s(2)]);
        assert!(!t.link_up(s(1)));
        assert!(!t.link_up(s(7)));
        assert!(t.links().is_empty());
        assert!(t.has_any_link(s(7)));
        assert!(t.set_servers(&[s(1), s(2), s(7)]), "the link to 7 now counts");
        assert!(t.has_link(s(7)));
        assert!(t.set_servers(&[s(1), s(2)]), "and no longer once 7 is retired");
        assert!(!t.has_link(s(7)) && t.has_any_link(s(7)));
        assert!(!t.link_down(s(7)));
        assert!(!t.has_any_link(s(7)));
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
            t.learn(s(n), 1, 0, 0, vec![s(prev), s(next)]);
        }
        t.recompute();
        assert_eq!(t.routes_dense(), Some(t.routes_sparse()));
        assert_eq!(t.next_hop(s(4)), Some(s(2)), "ties break on the lowest id");
        assert_eq!(t.next_hop(s(5)), Some(s(6)));
    }
}
