//! Link-state routing, the server's side: it floods its direct links, relays
//! announcements, and sends every envelope by the next hop the [`RouteTable`] gives, so
//! a command can be relayed A-B-C when A-C is cut.

use super::Server;
use super::route_table::LINK_HOLD_US;
use super::route_table::ReachabilityChange;
use super::timers::Timer;
use crate::msg::*;
use crate::types::*;

impl Server {
    /// Announce our links after they changed, numbered past `seen` (an announcement of
    /// ours from before a restart) and every earlier one.
    pub(crate) fn announce_links(&mut self, seen: u64) {
        let seq = self.image.next_link_seq(&mut self.out, seen);
        let me = self.cfg.sid;
        let own = self.routing.announce_own(seq, self.image.disk().epoch, self.image.disk().store_id);
        let msg = Msg::LinkState {
            origin: me,
            seq,
            epoch: own.epoch,
            store: own.store,
            neighbors: own.neighbors.into_iter().collect(),
        };
        for peer in self.routing.links().clone() {
            self.send_direct(peer, msg.clone());
        }
        self.recompute_routes();
    }

    pub(crate) fn on_link_up(&mut self, peer: Sid) {
        let member = self.routing.link_up(peer);
        if peer != self.cfg.sid {
            // Every neighbour, member or not, learns the membership: a server added
            // while its links were down, or retired while it was away, hears of it here.
            self.send_members(peer);
        }
        if !member {
            return;
        }
        // A new connection: the peer may have restarted, even with an empty disk, before
        // anyone saw it gone. Check its copies again and resend what it has not acked.
        self.anti_entropy.recheck_peer(peer);
        self.log_progress.resend_all(peer);
        self.timers.set_earliest(Timer::LogResend, self.now);
        self.send_announcements(peer);
        self.links_changed();
    }

    /// A new neighbour learns every other server's announcement we know.
    pub(crate) fn send_announcements(&mut self, peer: Sid) {
        for (origin, ann) in self.routing.others_announcements() {
            let neighbors = ann.neighbors.into_iter().collect();
            let msg = Msg::LinkState { origin, seq: ann.seq, epoch: ann.epoch, store: ann.store, neighbors };
            self.send_direct(peer, msg);
        }
    }

    pub(crate) fn on_link_down(&mut self, peer: Sid) {
        if self.routing.link_down(peer) {
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
    /// Our announcement goes out `LINK_HOLD_US` after the first change that needs it.
    pub(crate) fn schedule_announcement(&mut self) {
        if !self.timers.is_armed(Timer::Announce) {
            self.timers.set(Timer::Announce, self.now.plus_us(LINK_HOLD_US));
        }
    }

    pub(crate) fn on_link_state(
        &mut self,
        from: Sid,
        origin: Sid,
        seq: u64,
        epoch: u64,
        store: u64,
        neighbors: Vec<Sid>,
    ) {
        // Before the epoch is learned: whether this store was ever in a term. Our own
        // announcement from before a lost disk counts too (a peer relays it back first).
        self.heard_peer_epoch(from, epoch);
        // Learned before the routes change, so that a term opened because the component
        // grew has an epoch above every epoch in it (even our own from before a disk loss).
        if self.set_epoch(epoch) && self.routing.is_reachable(origin) {
            self.check_root();
        }
        if origin == self.cfg.sid {
            // An announcement of ours from before a restart: jump past it.
            if seq > self.image.disk().link_seq {
                self.announce_links(seq);
            }
            return;
        }
        let Some((kept, changed)) = self.routing.learn(origin, seq, epoch, store, neighbors) else { return };
        let msg = Msg::LinkState { origin, seq, epoch, store, neighbors: kept.neighbors.into_iter().collect() };
        for peer in self.routing.links().clone() {
            if peer != from {
                self.send_direct(peer, msg.clone());
            }
        }
        if changed {
            self.recompute_routes();
        }
        self.heard_store(origin, store, false);
    }

    /// `server` has the store `store`, as it said on the link up now (`on_link`) or as
    /// its newest announcement says.
    pub(crate) fn heard_store(&mut self, server: Sid, store: u64, on_link: bool) {
        if let Some(before) = self.routing.heard_store(server, store, on_link) {
            self.peer_store_changed(server, store, before.is_some());
        }
    }

    pub(crate) fn recompute_routes(&mut self) {
        let ReachabilityChange { gained, lost } = self.routing.recompute();
        debug_assert!(self.routing.is_reachable(self.cfg.sid), "we always reach ourselves");
        debug_assert!(gained.iter().chain(&lost).all(|s| *s != self.cfg.sid), "we never gain or lose ourselves");
        debug_assert!(gained.iter().all(|s| self.routing.next_hop(*s).is_some()), "a server gained has a route");
        if gained.is_empty() && lost.is_empty() {
            return;
        }
        if !gained.is_empty() {
            self.anti_entropy.kick();
            self.body_fetch.kick();
        }
        self.on_reachability_changed(&gained, &lost);
    }

    pub fn is_reachable(&self, sid: Sid) -> bool {
        self.routing.is_reachable(sid)
    }

    /// Sends an envelope towards its destination, relaying through the next hop.
    pub(crate) fn route(&mut self, envelope: Envelope) {
        if let Some(hop) = self.hop_towards(envelope.dst) {
            self.out.send(hop, envelope);
        }
    }

    /// The next hop towards `dst`; None for ourselves and when there is no route (then
    /// the envelope is dropped: the replication log resends once the peer is reachable,
    /// requests time out).
    fn hop_towards(&mut self, dst: Sid) -> Option<Sid> {
        if dst == self.cfg.sid {
            return None;
        }
        let hop = self.routing.next_hop(dst)?;
        if hop != dst {
            self.marks.hit(crate::Mark::RelayUsed);
        }
        Some(hop)
    }

    pub(crate) fn send(&mut self, to: Sid, msg: Msg) {
        let envelope = Envelope { src: self.cfg.sid, dst: to, hops: 0, msg };
        self.route(envelope);
    }

    /// [`Server::send`] once every write issued so far is durable (see
    /// `Outbox::send_when_durable`). The hop is chosen now; if that link is gone by then,
    /// the message is lost like any other sent on it.
    pub(crate) fn send_when_durable(&mut self, to: Sid, msg: Msg) {
        if let Some(hop) = self.hop_towards(to) {
            let envelope = Envelope { src: self.cfg.sid, dst: to, hops: 0, msg };
            self.out.send_when_durable(hop, envelope);
        }
    }

    /// Link-state travels hop by hop only.
    fn send_direct(&mut self, to: Sid, msg: Msg) {
        let envelope = Envelope { src: self.cfg.sid, dst: to, hops: 0, msg };
        self.out.send(to, envelope);
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
