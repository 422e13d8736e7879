//! Link-state routing: every server floods its direct links; each computes the connected
//! component and a next hop to every server in it, so a command can be relayed A-B-C
//! when A-C is cut. Ties break on the lowest server id, so routes are deterministic.

use super::Server;
use crate::msg::*;
use crate::store::StoreWrite;
use crate::types::*;
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

impl Server {
    /// Announce our links after they changed.
    pub(crate) fn announce_links(&mut self) {
        let seq = self.db.link_seq.saturating_add(1);
        self.write(StoreWrite::LinkSeq { seq });
        self.db.link_seq = seq;
        let me = self.cfg.sid;
        let epoch = self.db.epoch;
        self.lsdb.insert(me, LinkAnnouncement { seq, epoch, neighbors: self.links.clone() });
        let msg = Msg::LinkState { origin: me, seq, epoch, neighbors: self.links.iter().copied().collect() };
        for &peer in &self.links.clone() {
            self.send_direct(peer, msg.clone());
        }
        self.recompute_routes();
    }

    pub(crate) fn on_link_up(&mut self, peer: Sid) {
        if peer == self.cfg.sid || !self.cfg.servers.contains(&peer) {
            return;
        }
        self.links.insert(peer);
        // A new connection: the peer may have restarted, even with an empty disk, before
        // anyone saw it gone. Check its copies again and resend what it has not acked.
        self.checks.retain(|(p, _), _| *p != peer);
        self.log_sent.retain(|(p, _), _| *p != peer);
        // The new neighbour learns everything we know.
        let known: Vec<(Sid, LinkAnnouncement)> = self.lsdb.iter().map(|(s, a)| (*s, a.clone())).collect();
        for (origin, ann) in known {
            if origin != self.cfg.sid {
                self.send_direct(
                    peer,
                    Msg::LinkState {
                        origin,
                        seq: ann.seq,
                        epoch: ann.epoch,
                        neighbors: ann.neighbors.into_iter().collect(),
                    },
                );
            }
        }
        self.links_changed();
    }

    pub(crate) fn on_link_down(&mut self, peer: Sid) {
        if self.links.remove(&peer) {
            self.links_changed();
        }
    }

    /// Our own view changes at once; the announcement waits a moment so that the many
    /// link changes of one partition or heal go out as one flood, not one per link.
    fn links_changed(&mut self) {
        self.schedule_announcement();
        self.recompute_routes();
    }

    /// Also called when our epoch rises, so that the epoch every server advertises is
    /// its current one.
    pub(crate) fn schedule_announcement(&mut self) {
        if self.announce_due.is_none() {
            self.announce_due = Some(self.now.plus_us(LINK_HOLD_US));
        }
    }

    pub(crate) fn announce_if_due(&mut self) {
        if self.announce_due.is_some_and(|at| at <= self.now) {
            self.announce_due = None;
            self.announce_links();
        }
    }

    pub(crate) fn on_link_state(&mut self, from: Sid, origin: Sid, seq: u64, epoch: u64, neighbors: Vec<Sid>) {
        // Learned before the routes change, so that a term opened because the component
        // grew has an epoch above every epoch in it (even our own from before a disk loss).
        if self.set_epoch(epoch) && self.reachable.contains(&origin) {
            self.check_root();
        }
        if origin == self.cfg.sid {
            // An announcement of ours from before a restart: jump past it.
            if seq > self.db.link_seq {
                self.db.link_seq = seq;
                self.announce_links();
            }
            return;
        }
        if !self.cfg.servers.contains(&origin) {
            return;
        }
        if self.lsdb.get(&origin).is_some_and(|a| a.seq >= seq) {
            return;
        }
        let neighbors: BTreeSet<Sid> = neighbors.into_iter().filter(|s| self.cfg.servers.contains(s)).collect();
        // Routes depend on the announced neighbours only: a newer announcement of the same
        // ones (a new epoch, a flap shorter than the hold) leaves them as they are.
        let same_links = self.lsdb.get(&origin).is_some_and(|a| a.neighbors == neighbors);
        self.lsdb.insert(origin, LinkAnnouncement { seq, epoch, neighbors: neighbors.clone() });
        let msg = Msg::LinkState { origin, seq, epoch, neighbors: neighbors.into_iter().collect() };
        for &peer in &self.links.clone() {
            if peer != from {
                self.send_direct(peer, msg.clone());
            }
        }
        if !same_links {
            self.recompute_routes();
        }
    }

    fn linked(&self, a: Sid, b: Sid) -> bool {
        let claims = |x: Sid, y: Sid| {
            if x == self.cfg.sid {
                self.links.contains(&y)
            } else {
                self.lsdb.get(&x).is_some_and(|ann| ann.neighbors.contains(&y))
            }
        };
        claims(a, b) && claims(b, a)
    }

    /// Breadth-first search from us over links both ends announce. Routes and
    /// reachability are a function of our links and the announced neighbours only.
    pub(crate) fn recompute_routes(&mut self) {
        let (next_hop, seen) = match self.routes_dense() {
            Some(found) => found,
            None => self.routes_sparse(),
        };
        debug_assert!(self.routes_sparse() == (next_hop.clone(), seen.clone()), "dense routes differ");
        let before = std::mem::take(&mut self.reachable);
        self.routes = next_hop;
        self.reachable = seen;
        if before != self.reachable {
            let gained: Vec<Sid> = self.reachable.difference(&before).copied().collect();
            let lost: Vec<Sid> = before.difference(&self.reachable).copied().collect();
            if !gained.is_empty() {
                self.anti_entropy_kick = true;
                self.fetch_kick = true;
            }
            self.on_reachability_changed(&gained, &lost);
        }
    }

    /// The breadth-first search over a matrix of the configured servers (None if a
    /// server outside the configuration is involved): the same search as
    /// `routes_sparse`, visiting neighbours in the same (id) order.
    fn routes_dense(&self) -> Option<(BTreeMap<Sid, Sid>, BTreeSet<Sid>)> {
        let me = self.cfg.sid;
        let mut ids: Vec<Sid> = self.cfg.servers.clone();
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
        for (&x, ann) in &self.lsdb {
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
        let next_hop = hop.iter().enumerate().filter_map(|(i, h)| h.map(|h| (ids[i], ids[h]))).collect();
        let reachable = seen.iter().enumerate().filter(|(_, s)| **s).map(|(i, _)| ids[i]).collect();
        Some((next_hop, reachable))
    }

    fn routes_sparse(&self) -> (BTreeMap<Sid, Sid>, BTreeSet<Sid>) {
        let me = self.cfg.sid;
        let mut next_hop: BTreeMap<Sid, Sid> = BTreeMap::new();
        let mut seen: BTreeSet<Sid> = BTreeSet::from([me]);
        let mut queue: VecDeque<Sid> = VecDeque::new();
        for &n in &self.links {
            if self.linked(me, n) && seen.insert(n) {
                next_hop.insert(n, n);
                queue.push_back(n);
            }
        }
        while let Some(at) = queue.pop_front() {
            let hop = next_hop[&at];
            let neighbors: Vec<Sid> =
                self.lsdb.get(&at).map(|a| a.neighbors.iter().copied().collect()).unwrap_or_default();
            for n in neighbors {
                if self.linked(at, n) && seen.insert(n) {
                    next_hop.insert(n, hop);
                    queue.push_back(n);
                }
            }
        }
        (next_hop, seen)
    }

    pub fn is_reachable(&self, sid: Sid) -> bool {
        self.reachable.contains(&sid)
    }

    /// Sends an envelope towards its destination, relaying through the next hop.
    pub(crate) fn route(&mut self, envelope: Envelope) {
        if envelope.dst == self.cfg.sid {
            return;
        }
        if let Some(&hop) = self.routes.get(&envelope.dst) {
            if hop != envelope.dst {
                self.marks.hit(crate::Mark::RelayUsed);
            }
            self.push_send(hop, envelope);
        }
        // No route: dropped. The replication log resends once the peer is reachable;
        // requests time out.
    }

    pub(crate) fn send(&mut self, to: Sid, msg: Msg) {
        let envelope = Envelope { src: self.cfg.sid, dst: to, hops: 0, msg };
        self.route(envelope);
    }

    /// Link-state travels hop by hop only.
    fn send_direct(&mut self, to: Sid, msg: Msg) {
        let envelope = Envelope { src: self.cfg.sid, dst: to, hops: 0, msg };
        self.push_send(to, envelope);
    }

    /// Relay an envelope that is not for us.
    pub(crate) fn relay(&mut self, mut envelope: Envelope) {
        if envelope.hops >= HOPS_MAX {
            return;
        }
        envelope.hops += 1;
        self.route(envelope);
    }
}
