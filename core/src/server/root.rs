//! The root and its failover. The root is the lowest server id of the connected
//! component. A new root opens a term with an epoch above every epoch it has seen; every
//! server that accepts the term flushes its master cache, drops its masterships and says
//! so; the root answers no master lookup from a server until that server has dropped.
//! Terms order by (epoch, lowest root id), so two roots that meet after a partition agree
//! which one wins, and the winner opens a fresh term so both sides' masters are dropped.

use super::Server;
use crate::msg::*;
use crate::store::StoreWrite;
use crate::types::*;
use std::collections::BTreeSet;

/// Bits of an epoch that hold the id of the root that opened it.
pub const EPOCH_SID_BITS: u32 = 16;
const EPOCH_SID_MASK: u64 = (1 << EPOCH_SID_BITS) - 1;
/// The last round an epoch can hold (peers' epochs are bounded far below it, see
/// `limits::EPOCH_MAX`): the round never wraps.
const EPOCH_ROUND_LAST: u64 = u64::MAX >> EPOCH_SID_BITS;

/// Root term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

/// What the root keeps about its own term.
#[derive(Clone, Debug, Default)]
pub struct RootState {
    /// Servers that have dropped their masterships in this term.
    pub dropped: BTreeSet<Sid>,
    /// Servers reachable when the term opened: the root stays silent until all of them
    /// (those still reachable) have dropped.
    pub members: BTreeSet<Sid>,
    pub active: bool,
    /// The authoritative table: who masters what in this term.
    pub table: std::collections::BTreeMap<MasterKey, Sid>,
    /// The generation of each key's master in this term (kept when a master is lost).
    pub generations: std::collections::BTreeMap<MasterKey, u64>,
    /// Lookups held while the root is not yet active: (asker, key).
    pub held: Vec<(Sid, MasterKey)>,
}

impl Server {
    pub fn is_root(&self) -> bool {
        self.term.root == Some(self.cfg.sid)
    }

    pub fn root_active(&self) -> bool {
        self.is_root() && self.root_state.active
    }

    fn designated_root(&self) -> Sid {
        self.reachable.iter().next().copied().unwrap_or(self.cfg.sid)
    }

    /// Called whenever reachability or the term changes: the lowest reachable server
    /// opens a new term when it is not root yet, when the component grew beyond the
    /// term's members, or when it has heard of a higher epoch.
    pub(crate) fn check_root(&mut self) {
        let designated = self.designated_root();
        if designated != self.cfg.sid {
            if self.is_root() {
                // A lower server is reachable again: tell it our term, so that it opens
                // one above our epoch and both sides drop their masters.
                self.send(designated, Msg::Root { epoch: self.term.epoch, root: self.cfg.sid });
            }
            return;
        }
        let grew = self.reachable.iter().any(|s| !self.root_state.members.contains(s));
        let behind = self.db.epoch > self.term.epoch;
        if !self.is_root() || grew || behind {
            self.open_term();
        }
        // A member lost before it answered DROPPED is no longer waited for: without this
        // a link cut in the middle of opening a term left the term inactive, and every
        // write on this side queued until the partition healed.
        self.check_root_active();
    }

    fn open_term(&mut self) {
        // Two roots on the two sides of a partition must never open terms with the same
        // epoch (messages name a term by its epoch): the low bits are the root's id.
        let round = (self.db.epoch.max(self.term.epoch) >> EPOCH_SID_BITS).saturating_add(1).min(EPOCH_ROUND_LAST);
        let epoch = (round << EPOCH_SID_BITS) | (u64::from(self.cfg.sid.0) & EPOCH_SID_MASK);
        self.set_epoch(epoch);
        self.marks.hit(crate::Mark::RootElected);
        self.term = Term { epoch, root: Some(self.cfg.sid) };
        self.note(|| format!("opens root term {epoch}"));
        // The new term's (silent) root state first: dropping masterships requeues jobs,
        // and their lookups must wait for this term, not be answered from the old one.
        self.root_state = RootState {
            dropped: BTreeSet::from([self.cfg.sid]),
            members: self.reachable.clone(),
            active: false,
            table: Default::default(),
            generations: Default::default(),
            held: Vec::new(),
        };
        self.drop_masterships();
        self.broadcast_term();
        self.check_root_active();
    }

    /// Raises the highest epoch seen; true when it rose.
    pub(crate) fn set_epoch(&mut self, epoch: u64) -> bool {
        if epoch <= self.db.epoch {
            return false;
        }
        self.db.epoch = epoch;
        self.write(StoreWrite::Epoch { epoch });
        self.schedule_announcement();
        true
    }

    /// Sends the term to every member that has not dropped yet (also used for resends).
    pub(crate) fn broadcast_term(&mut self) {
        let Some(root) = self.term.root else { return };
        let targets: Vec<Sid> =
            self.reachable.iter().copied().filter(|s| !self.root_state.dropped.contains(s)).collect();
        for s in targets {
            self.send(s, Msg::Root { epoch: self.term.epoch, root });
        }
    }

    fn check_root_active(&mut self) {
        if !self.is_root() || self.root_state.active {
            return;
        }
        let waiting =
            self.root_state.members.iter().any(|s| self.reachable.contains(s) && !self.root_state.dropped.contains(s));
        if !waiting {
            self.root_state.active = true;
            let members = self.root_state.members.clone();
            self.note(|| format!("root term active, members {members:?}"));
            let held = std::mem::take(&mut self.root_state.held);
            for (asker, key) in held {
                self.answer_lookup(asker, key);
            }
        }
    }

    pub(crate) fn on_root(&mut self, from: Sid, epoch: u64, root: Sid) {
        let offered = Term { epoch, root: Some(root) };
        if offered == self.term {
            if !self.is_root() {
                self.send(root, Msg::Dropped { epoch });
            }
            return;
        }
        if !offered.beats(&self.term) {
            // Tell the sender about the better term we know.
            if let Some(ours) = self.term.root {
                self.send(from, Msg::Root { epoch: self.term.epoch, root: ours });
            }
            return;
        }
        self.set_epoch(epoch);
        self.term = offered;
        self.note(|| format!("accepts root {root} term {epoch}"));
        self.root_state = RootState::default();
        self.drop_masterships();
        self.send(root, Msg::Dropped { epoch });
        // A designated root that heard of a higher epoch opens a term above it.
        self.check_root();
    }

    pub(crate) fn on_dropped(&mut self, from: Sid, epoch: u64) {
        if epoch > self.db.epoch {
            self.set_epoch(epoch);
            self.check_root();
            return;
        }
        if self.is_root() && epoch == self.term.epoch {
            self.root_state.dropped.insert(from);
            self.check_root_active();
        }
    }

    /// Forget every master we knew and stop being master of anything.
    pub(crate) fn drop_masterships(&mut self) {
        self.handoffs.clear();
        self.master_cache.clear();
        self.cache_generation.clear();
        let dropped: Vec<MasterKey> = self.mastered.keys().cloned().collect();
        self.mastered.clear();
        self.lookups.clear();
        // Every mailbox needs a master again so that anti-entropy reaches it.
        self.need_master_check = true;
        for key in dropped {
            self.requeue_jobs_for(&key);
        }
    }

    /// A lookup at the root: answer with the recorded master if it is reachable, or make
    /// the asker master.
    pub(crate) fn answer_lookup(&mut self, asker: Sid, key: MasterKey) {
        let epoch = self.term.epoch;
        let recorded = self.root_state.table.get(&key).copied().filter(|m| self.reachable.contains(m));
        let master = match recorded {
            Some(m) => m,
            None => {
                self.root_state.table.insert(key.clone(), asker);
                let g = self.root_state.generations.entry(key.clone()).or_insert(0);
                *g = g.saturating_add(1);
                asker
            }
        };
        let generation = self.root_state.generations.get(&key).copied().unwrap_or(0);
        if asker == self.cfg.sid {
            self.on_master_is(self.cfg.sid, epoch, key, master, generation);
        } else {
            self.send(asker, Msg::MasterIs { epoch, key, master, generation });
        }
    }

    pub(crate) fn on_who(&mut self, from: Sid, epoch: u64, keys: Vec<MasterKey>) {
        if epoch > self.db.epoch {
            self.set_epoch(epoch);
            self.check_root();
        }
        if !self.is_root() || epoch != self.term.epoch || !self.root_state.dropped.contains(&from) {
            if let Some(root) = self.term.root {
                self.send(from, Msg::Root { epoch: self.term.epoch, root });
            }
            return;
        }
        for key in keys {
            if self.root_state.active {
                self.answer_lookup(from, key);
            } else if self.root_state.held.len() < self.cfg.pending_max {
                self.root_state.held.push((from, key));
            }
        }
    }

    /// Ask the root who masters `key` (or decide, when we are the root).
    pub(crate) fn lookup_master(&mut self, key: &MasterKey) {
        if let Some(sent) = self.lookups.get(key)
            && self.now.0.saturating_sub(sent.0) < self.cfg.request_timeout_us / 4
        {
            return;
        }
        self.lookups.insert(key.clone(), self.now);
        let Some(root) = self.term.root else { return };
        if root == self.cfg.sid {
            if self.root_state.active {
                self.answer_lookup(self.cfg.sid, key.clone());
            } else if self.root_state.held.len() < self.cfg.pending_max {
                self.root_state.held.push((self.cfg.sid, key.clone()));
            }
        } else {
            self.send(root, Msg::Who { epoch: self.term.epoch, keys: vec![key.clone()] });
        }
    }

    /// After a term change each server asks who masters every mailbox it holds, so each
    /// one gets a master that checks every copy.
    pub(crate) fn check_all_masters(&mut self) {
        if !self.need_master_check || self.term.root.is_none() {
            return;
        }
        if self.is_root() && !self.root_state.active {
            return;
        }
        self.need_master_check = false;
        let keys: BTreeSet<MasterKey> =
            self.db.mailboxes.keys().map(|k| MasterKey::of(k, self.cfg.granularity)).collect();
        let unknown: Vec<MasterKey> =
            keys.into_iter().filter(|k| !self.master_cache.contains_key(k) && !self.mastered.contains_key(k)).collect();
        if unknown.is_empty() {
            return;
        }
        if self.is_root() {
            for key in unknown {
                self.answer_lookup(self.cfg.sid, key);
            }
        } else if let Some(root) = self.term.root {
            for key in &unknown {
                self.lookups.insert(key.clone(), self.now);
            }
            for chunk in unknown.chunks(256) {
                self.send(root, Msg::Who { epoch: self.term.epoch, keys: chunk.to_vec() });
            }
        }
    }

    /// A master for `key` is known: an answer from the root, a new master announcing
    /// itself after a MASTER-MOVE, or (to the root, from the recorded master) the report
    /// of a move.
    pub(crate) fn on_master_is(&mut self, from: Sid, epoch: u64, key: MasterKey, master: Sid, generation: u64) {
        if epoch != self.term.epoch {
            return;
        }
        if from == master && self.handoffs.get(&key).is_some_and(|h| h.requester == from && generation >= h.generation)
        {
            self.handoffs.remove(&key);
        }
        if self.is_root() && from != self.cfg.sid {
            if generation > self.root_state.generations.get(&key).copied().unwrap_or(0) {
                self.root_state.table.insert(key.clone(), master);
                self.root_state.generations.insert(key.clone(), generation);
            }
            if master != self.cfg.sid {
                self.master_cache.insert(key.clone(), master);
                if self.mastered.remove(&key).is_some() {
                    self.note(|| format!("stops mastering {key}: {from} says {master} does"));
                }
            }
            self.requeue_jobs_for(&key);
            return;
        }
        let from_root = Some(from) == self.term.root;
        if !from_root && from != master {
            return;
        }
        if generation < self.cache_generation.get(&key).copied().unwrap_or(0) {
            return;
        }
        self.cache_generation.insert(key.clone(), generation);
        self.lookups.remove(&key);
        if master == self.cfg.sid {
            if from_root {
                self.become_master(key.clone(), None, generation);
            }
        } else {
            self.master_cache.insert(key.clone(), master);
            if self.mastered.remove(&key).is_some() {
                self.note(|| format!("stops mastering {key}: {from} says {master} does"));
            }
        }
        self.requeue_jobs_for(&key);
    }
}
