//! The root and its failover. The root is the lowest server id of the connected
//! component. A new root opens a term with an epoch above every epoch it has seen; every
//! server that accepts the term flushes its master cache, drops its masterships and says
//! so; the root answers no master lookup from a server until that server has dropped.
//! Terms order by (epoch, lowest root id), so two roots that meet after a partition agree
//! which one wins, and the winner opens a fresh term so both sides' masters are dropped.
//! The term and the root's table are kept by [`RootRole`](super::root_role::RootRole).

use super::root_role::Term;
use super::{Server, StartupHold};
use crate::msg::*;
use crate::types::*;
use std::collections::BTreeSet;

impl Server {
    pub fn is_root(&self) -> bool {
        self.root_role.is_root()
    }

    pub fn root_active(&self) -> bool {
        self.root_role.active()
    }

    /// The lowest reachable active member (a leaving server is root only of a
    /// component without one).
    fn designated_root(&self) -> Sid {
        let reachable = self.routing.reachable();
        reachable
            .iter()
            .copied()
            .find(|s| self.members.is_active(*s))
            .or_else(|| reachable.iter().next().copied())
            .unwrap_or(self.cfg.sid)
    }

    /// Called whenever reachability or the term changes: the lowest reachable server
    /// opens a new term when it is not root yet, when the component grew beyond the
    /// term's members, or when it has heard of a higher epoch.
    pub(crate) fn check_root(&mut self) {
        if self.retired() {
            return;
        }
        let designated = self.designated_root();
        if designated != self.cfg.sid {
            if self.is_root() {
                // A lower server is reachable again: tell it our term, so that it opens
                // one above our epoch and both sides drop their masters.
                self.send(designated, Msg::Root { epoch: self.root_role.epoch(), root: self.cfg.sid });
            } else if self.root_role.root().is_none() {
                // We have no term (we just started, and held back): ask the server that
                // should lead us for its term by naming it root. Its term may count us
                // as a member from before our restart, so nothing else would send it.
                self.send(designated, Msg::Root { epoch: self.root_role.epoch(), root: designated });
            }
            return;
        }
        if self.holding_at_start() {
            return;
        }
        if !self.is_root() && self.alone_unfilled() {
            // Alone with a store not filled yet (see `filling`): no term, so no mastership
            // here; requests wait for a peer (and time out), reads are refused.
            self.marks.hit(crate::Mark::UnfilledAloneMastersNothing);
            return;
        }
        let grew = self.root_role.grew(self.routing.reachable());
        let behind = self.image.disk().epoch > self.root_role.epoch();
        if !self.is_root() || grew || behind {
            self.open_term();
        }
        // A member lost before it answered DROPPED is no longer waited for: without this
        // a link cut in the middle of opening a term left the term inactive, and every
        // write on this side queued until the partition healed.
        self.check_root_active();
    }

    /// Whether a just-started server still waits to hear its peers before it opens a
    /// term: until `Config::startup_hold_us` has passed since its first input, or every
    /// configured server is reachable, whichever comes first. Ends once for good: a link
    /// lost later is failed over at once, as always.
    fn holding_at_start(&mut self) -> bool {
        if self.has_bug(crate::Bug::SkipStartupHold) {
            self.startup = StartupHold::Over;
            return false;
        }
        let until = match self.startup {
            StartupHold::Over => return false,
            StartupHold::NotStarted => return true,
            StartupHold::Until(until) => until,
        };
        let everyone = self.member_servers.iter().all(|s| self.routing.is_reachable(*s));
        if self.now < until && !everyone {
            return true;
        }
        self.startup = StartupHold::Over;
        if !everyone {
            self.marks.hit(crate::Mark::StartupHoldExpired);
            self.note(|| "start-up hold over without hearing every server".to_string());
        }
        false
    }

    pub(crate) fn open_term(&mut self) {
        let before = self.image.disk().epoch.max(self.root_role.epoch());
        let epoch = Term::next_epoch(before, self.cfg.sid);
        // Above every epoch seen, unless the epochs ran out (peers cannot get there, see
        // `limits::EPOCH_MAX`, but a store edited by hand can): then terms stay at the last.
        debug_assert!(
            epoch > before || before >> super::EPOCH_SID_BITS >= super::root_role::EPOCH_ROUND_LAST,
            "a new term's epoch is above every epoch seen"
        );
        self.set_epoch(epoch);
        self.marks.hit(crate::Mark::RootElected);
        // The new term's (silent) root state first: dropping masterships requeues jobs,
        // and their lookups must wait for this term, not be answered from the old one.
        self.root_role.open(epoch, self.routing.reachable().clone());
        self.note(|| format!("opens root term {epoch}"));
        self.drop_masterships();
        self.broadcast_term();
        self.check_root_active();
        debug_assert!(self.is_root() && self.root_role.epoch() == epoch, "we are root of the new term");
    }

    /// Raises the highest epoch seen; true when it rose.
    pub(crate) fn set_epoch(&mut self, epoch: u64) -> bool {
        if !self.image.raise_epoch(&mut self.out, epoch) {
            return false;
        }
        self.schedule_announcement();
        true
    }

    /// Sends the term to every member that has not dropped yet (also used for resends).
    pub(crate) fn broadcast_term(&mut self) {
        let Some(root) = self.root_role.root() else { return };
        let epoch = self.root_role.epoch();
        for s in self.root_role.not_dropped(self.routing.reachable()) {
            self.send(s, Msg::Root { epoch, root });
        }
    }

    fn check_root_active(&mut self) {
        let Some((members, held)) = self.root_role.try_activate(self.routing.reachable()) else { return };
        self.note(|| format!("root term active, members {members:?}"));
        for (asker, key) in held {
            self.answer_lookup(asker, key);
        }
    }

    pub(crate) fn on_root(&mut self, from: Sid, epoch: u64, root: Sid) {
        self.heard_peer_epoch(from, epoch);
        if root == self.cfg.sid && from != self.cfg.sid {
            self.on_term_asked(from, epoch);
            return;
        }
        let offered = Term { epoch, root: Some(root) };
        if offered == self.root_role.term() {
            if !self.is_root() {
                self.send(root, Msg::Dropped { epoch });
            }
            return;
        }
        if !offered.beats(&self.root_role.term()) {
            // Tell the sender about the better term we know.
            if let Some(ours) = self.root_role.root() {
                self.send(from, Msg::Root { epoch: self.root_role.epoch(), root: ours });
            }
            return;
        }
        self.set_epoch(epoch);
        self.root_role.accept(offered);
        self.note(|| format!("accepts root {root} term {epoch}"));
        self.drop_masterships();
        self.send(root, Msg::Dropped { epoch });
        // A designated root that heard of a higher epoch opens a term above it.
        self.check_root();
    }

    /// `from` names us root of a term: it has none (see `check_root`), or it answers an
    /// offer of ours with what it believes our term is. Either way it learns our term
    /// from the next one we open: a root treats it as a member that left and came back
    /// (a restarted server holds none of the masterships our table may still give it,
    /// and a new term drops them everywhere), and a designated root that is not root
    /// yet opens one once its own start-up hold allows.
    ///
    /// An ask below our epoch from a server that has not dropped in our term was sent
    /// before it heard the term (on a link with seconds of latency it arrives after we
    /// sent it ours): it holds nothing of this term, so the term is all it needs. Taking
    /// it as back would open another term, which the next ask in flight would undo in
    /// turn: terms without end on a satellite link.
    fn on_term_asked(&mut self, from: Sid, epoch: u64) {
        self.set_epoch(epoch);
        if self.is_root() && epoch < self.root_role.epoch() && !self.root_role.has_dropped(from) {
            debug_assert!(!self.root_role.table_names(from), "a server that never dropped masters nothing");
            self.marks.hit(crate::Mark::StaleTermAskAnswered);
            self.send(from, Msg::Root { epoch: self.root_role.epoch(), root: self.cfg.sid });
            return;
        }
        if self.is_root() {
            self.note(|| format!("{from} asks for our term: it is taken as back"));
            self.root_role.peer_lost(from);
        }
        self.check_root();
    }

    pub(crate) fn on_dropped(&mut self, from: Sid, epoch: u64) {
        self.heard_peer_epoch(from, epoch);
        if epoch > self.image.disk().epoch {
            self.set_epoch(epoch);
            self.check_root();
            return;
        }
        if self.is_root() && epoch == self.root_role.epoch() {
            self.root_role.member_dropped(from);
            self.check_root_active();
        }
    }

    /// Forget every master we knew and stop being master of anything.
    pub(crate) fn drop_masterships(&mut self) {
        // Every mailbox needs a master again so that anti-entropy reaches it.
        for key in self.masters.drop_all() {
            self.requeue_jobs_for(&key);
        }
    }

    /// A lookup at the root: answer with the recorded master if it is reachable (and
    /// active), or make the asker master (the root itself when the asker is leaving).
    pub(crate) fn answer_lookup(&mut self, asker: Sid, key: MasterKey) {
        let me = self.cfg.sid;
        let epoch = self.root_role.epoch();
        if self.alone_unfilled() {
            // A root from before, now alone with a store not filled yet (see `filling`):
            // the only asker is itself, and it would master from what it has. It asks
            // again later (with a peer in reach, or never: its requests time out).
            self.marks.hit(crate::Mark::UnfilledAloneMastersNothing);
            return;
        }
        let candidate = if self.eligible(asker) {
            asker
        } else if self.eligible(me) {
            me
        } else {
            // No active server here may master it: the asker asks again later.
            return;
        };
        let routing = &self.routing;
        let members = &self.members;
        let before = self.root_role.generation(&key);
        let (master, generation) =
            self.root_role.assign(&key, candidate, |m| routing.is_reachable(m) && members.is_active(m));
        // A root that gives away a key it masters (it is leaving, so no longer eligible)
        // stops mastering it at once, as any master told of another does: else it goes
        // on saving at UIDs the new master gives out too (explore seed 1030620).
        let changed_for_us = generation != before && (master == me || self.masters.masters(&key));
        if asker == me || changed_for_us {
            self.on_master_is(me, epoch, key.clone(), master, generation);
        }
        if asker != me {
            self.send(asker, Msg::MasterIs { epoch, key, master, generation });
        }
    }

    pub(crate) fn on_who(&mut self, from: Sid, epoch: u64, keys: Vec<MasterKey>) {
        self.heard_peer_epoch(from, epoch);
        if epoch > self.image.disk().epoch {
            self.set_epoch(epoch);
            self.check_root();
        }
        if !self.is_root() || epoch != self.root_role.epoch() || !self.root_role.has_dropped(from) {
            if let Some(root) = self.root_role.root() {
                self.send(from, Msg::Root { epoch: self.root_role.epoch(), root });
            }
            return;
        }
        for key in keys {
            if self.root_role.active() {
                self.answer_lookup(from, key);
            } else {
                self.root_role.hold(from, key, self.cfg.pending_max);
            }
        }
    }

    /// Ask the root who masters `key` (or decide, when we are the root).
    pub(crate) fn lookup_master(&mut self, key: &MasterKey) {
        if self.masters.lookup_recent(key, self.now, self.cfg.request_timeout_us / 4) {
            return;
        }
        self.masters.lookup_sent(key.clone(), self.now);
        let Some(root) = self.root_role.root() else { return };
        if root == self.cfg.sid {
            if self.root_role.active() {
                self.answer_lookup(self.cfg.sid, key.clone());
            } else {
                self.root_role.hold(self.cfg.sid, key.clone(), self.cfg.pending_max);
            }
        } else {
            self.send(root, Msg::Who { epoch: self.root_role.epoch(), keys: vec![key.clone()] });
        }
    }

    /// After a term change each server asks who masters every mailbox it holds, so each
    /// one gets a master that checks every copy.
    pub(crate) fn check_all_masters(&mut self) {
        if !self.masters.check_due() || self.root_role.root().is_none() {
            return;
        }
        if self.is_root() && !self.root_role.active() {
            return;
        }
        self.masters.check_done();
        let keys: BTreeSet<MasterKey> =
            self.image.mailboxes().keys().map(|k| MasterKey::of(k, self.cfg.granularity)).collect();
        let unknown: Vec<MasterKey> = keys.into_iter().filter(|k| !self.masters.knows(k)).collect();
        if unknown.is_empty() {
            return;
        }
        if self.is_root() {
            for key in unknown {
                self.answer_lookup(self.cfg.sid, key);
            }
        } else if let Some(root) = self.root_role.root() {
            for key in &unknown {
                self.masters.lookup_sent(key.clone(), self.now);
            }
            let epoch = self.root_role.epoch();
            for chunk in unknown.chunks(256) {
                self.send(root, Msg::Who { epoch, keys: chunk.to_vec() });
            }
        }
    }

    /// A master for `key` is known: an answer from the root, a new master announcing
    /// itself after a MASTER-MOVE, or (to the root, from the recorded master) the report
    /// of a move.
    pub(crate) fn on_master_is(&mut self, from: Sid, epoch: u64, key: MasterKey, master: Sid, generation: u64) {
        if epoch != self.root_role.epoch() {
            return;
        }
        if from == master {
            self.masters.announced(&key, from, generation);
        }
        if self.is_root() && from != self.cfg.sid {
            let recorded = self.root_role.generation(&key);
            // The recorded master, when this report names another at no later generation:
            // its handover crossed our own assignment of the key.
            let contradicted =
                self.root_role.table().get(&key).copied().filter(|o| *o != master && generation <= recorded);
            if let Some(owner) = contradicted.filter(|_| from == master) {
                // The claimant itself (a MOVED reached it after we gave the key to
                // another; explore seeds 299220, 317758): both would master the key for
                // ever, each announcing it to us, so it is told the recorded master, at
                // the recorded generation, and stops.
                self.note(|| format!("{from} claims {key} at generation {generation}: tells it {owner} masters it"));
                self.send(from, Msg::MasterIs { epoch, key, master: owner, generation: recorded });
                return;
            }
            if generation < recorded || contradicted.is_some() {
                // A late report of an earlier move (relayed, or resent): the root knows
                // a later master, maybe itself, and must not give the key up for it.
                // Nor for another server's word on a master our table contradicts: the
                // claimant hears the recorded master from us (above), and the recorded
                // master, maybe we, masters on (explore seed 352662: the root, recorded
                // master, stopped for a third server's report and told the claimant to
                // stop too; no one mastered).
                return;
            }
            if generation > recorded {
                self.root_role.record(key.clone(), master, generation);
            }
            if master != self.cfg.sid {
                self.masters.remember(key.clone(), master);
                if self.masters.stop(&key).is_some() {
                    self.note(|| format!("stops mastering {key}: {from} says {master} does"));
                }
            }
            self.requeue_jobs_for(&key);
            return;
        }
        let from_root = Some(from) == self.root_role.root();
        if !from_root && from != master {
            return;
        }
        if generation < self.masters.generation(&key) {
            return;
        }
        self.masters.set_generation(key.clone(), generation);
        self.masters.lookup_answered(&key);
        if master == self.cfg.sid {
            // A leaving server takes no mastership (a root that has not heard yet that
            // we leave opens a new term once it does).
            if from_root && self.members.is_active(self.cfg.sid) {
                self.become_master(key.clone(), None, generation);
            }
        } else {
            self.masters.remember(key.clone(), master);
            if self.masters.stop(&key).is_some() {
                self.note(|| format!("stops mastering {key}: {from} says {master} does"));
            }
        }
        self.requeue_jobs_for(&key);
    }
}
