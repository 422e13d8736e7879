//! Serving a user replica's sync (`tandem replicate`, see [`crate::user_replica`]): the
//! requests its agent makes of a cluster server (list, pull, bodies, push) and of the
//! user replica itself (the same, and adopt).
//!
//! A push is a mailbox state merged by the mailbox's master exactly as a peer's SYNC is,
//! so a laptop's offline changes meet the cluster's under the conflict rules servers
//! use; an adopt is the cluster's answer taken as a replica takes its master's. Neither
//! side keeps a log for the other: each pull is a delta from a modseq the agent keeps.
use super::Server;
use crate::io::{ClientReply, RequestId};
use crate::msg::{FailKind, WriteResult};
use crate::partial::Partial;
use crate::types::*;
use std::collections::BTreeSet;

/// Bodies one `ReplicaBodies` answer carries at most, and their bytes at most (the
/// agent asks again for the rest).
pub const REPLICA_BODIES_MAX: usize = 1024;
pub const REPLICA_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How many messages kept against a census's loss a user replica remembers to push with
/// their bodies; more wait for a later adopt.
const KEPT_LOST_MAX: usize = 65_536;
/// How many records a user replica's adopts dropped while it held their bodies it
/// remembers, and for how long: a census may give the message up in the mailbox a RENAME
/// moved it to, and this copy's adopt of that mailbox may come after the adopt that took
/// the RENAME's expunge from the old one (explore seed 1159717 again, the adopts in the
/// other order); step 7 of `mailbox::adopt_rule` then finds the message here. In memory
/// only: both adopts belong to one sync round, and a replica that restarts between them
/// forgets the record (the census's loss of it is then final on the replica too: a
/// narrow window, a census's loss, a RENAME and a crash inside one round).
const DROPPED_LATELY_MAX: usize = 1024;
const DROPPED_LATELY_KEPT_US: u64 = 600_000_000;

impl Server {
    /// A user replica answers with its own partial spec (the request's is the agent's
    /// copy of it, for a cluster server) and the omitted bodies its clients want.
    pub(crate) fn on_replica_list(&mut self, id: RequestId, user: &str, partial: Option<&Partial>) {
        if let Some(reason) = partial.and_then(|p| p.check().err()) {
            self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason });
            return;
        }
        let own = self.user_replica_partial().cloned();
        let partial = if self.cfg.user_replica { own.clone() } else { partial.cloned() };
        let mut summaries = self.image.summaries_of_user(user);
        if let Some(p) = partial.as_ref().filter(|p| !p.is_whole()) {
            summaries.retain(|s| p.holds_mailbox(&s.mailbox.name));
            if p.since_s > 0 {
                for s in &mut summaries {
                    if let Some(within) = self.replica_summary(&s.mailbox.clone(), Some(p)) {
                        *s = within;
                    }
                }
            }
        }
        let (wanted, texts_wanted) =
            if self.cfg.user_replica { (self.omitted.wanted(), self.texts_wanted()) } else { Default::default() };
        self.out.reply(id, ClientReply::ReplicaList { summaries, partial: own, wanted, texts_wanted });
    }

    /// The summary a user replica's sync compares: of the part a partial replica holds.
    fn replica_summary(&mut self, key: &MailboxKey, partial: Option<&Partial>) -> Option<Summary> {
        match partial.filter(|p| p.since_s > 0) {
            Some(p) => self.image.mailbox(key).map(|m| crate::mailbox::summary_within(key, m, p)),
            None => self.image.summary(key),
        }
    }

    /// What is durable only: a crash here never takes back what a replica was given. To
    /// a partial replica (`partial`, from a cluster server) only the part it holds.
    pub(crate) fn on_replica_pull(
        &mut self,
        id: RequestId,
        mailbox: &MailboxKey,
        since: Option<ModSeq>,
        partial: Option<&Partial>,
    ) {
        let checked = crate::limits::check_mailbox(mailbox).and_then(|()| partial.map_or(Ok(()), Partial::check));
        if let Err(reason) = checked {
            self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason });
            return;
        }
        let mut state = match self.image.durable_mailbox_to_push(mailbox) {
            Some(m) => crate::mailbox::state_since(mailbox, &m, since),
            None => MailboxState::empty(mailbox.clone(), 0),
        };
        let own = self.user_replica_partial().cloned();
        // A user replica's pull is what it pushes: all it has, whatever it holds.
        let window = if self.cfg.user_replica { None } else { partial };
        if let Some(p) = window {
            if self.has_bug(crate::Bug::PartialExpungesUnheld) {
                p.window_state_broken(&mut state);
            } else {
                p.window_state(&mut state);
            }
        }
        let summary = self.replica_summary(mailbox, if self.cfg.user_replica { own.as_ref() } else { partial });
        let own_bodies = if self.cfg.user_replica { self.own_bodies(&state) } else { Vec::new() };
        self.out.reply(id, ClientReply::ReplicaState { state: Box::new(state), summary, own_bodies });
    }

    /// The intact bodies of the messages of `state` this server wrote itself, within one
    /// `ReplicaBodies` answer's limits: a user replica's new mail, which the cluster
    /// cannot have (a copy of the cluster's mail keeps the cluster's GUID).
    fn own_bodies(&mut self, state: &MailboxState) -> Vec<(Guid, Body)> {
        let origin = self.cfg.sid.0 & (Guid::ORIGIN_MASK as u32);
        let mut bodies = Vec::new();
        let mut bytes = 0usize;
        // Those it keeps against a census's loss first (the cluster asks for no lost
        // message's body), then its own new messages.
        let kept = self.kept_lost.get(&state.mailbox);
        let is_kept = |r: &&MessageRecord| kept.is_some_and(|k| k.contains(&r.guid));
        let own = |r: &&MessageRecord| r.guid.origin() == origin && !is_kept(r);
        for r in state.messages.iter().filter(is_kept).chain(state.messages.iter().filter(own)) {
            if bodies.len() >= REPLICA_BODIES_MAX || bytes.saturating_add(r.size as usize) > REPLICA_BODY_BYTES_MAX {
                break;
            }
            if let Some(body) = self.image.intact_body(r.guid) {
                bytes = bytes.saturating_add(body.len());
                bodies.push((r.guid, body));
            }
        }
        bodies
    }

    pub(crate) fn on_replica_bodies(&mut self, id: RequestId, mailbox: &MailboxKey, guids: &[Guid]) {
        if self.wait_for_omitted_bodies(id, mailbox, guids, false) {
            return;
        }
        self.answer_replica_bodies(id, mailbox, guids);
    }

    /// `ReplicaBodies` answered with what is here now.
    pub(crate) fn answer_replica_bodies(&mut self, id: RequestId, mailbox: &MailboxKey, guids: &[Guid]) {
        let bodies = self.intact_bodies_of(mailbox, guids);
        self.out.reply(id, ClientReply::ReplicaBodies { bodies });
    }

    /// The intact bodies held here of live messages of `mailbox` among `guids`, within
    /// `ReplicaBodies`' limits.
    pub(crate) fn intact_bodies_of(&mut self, mailbox: &MailboxKey, guids: &[Guid]) -> Vec<(Guid, Body)> {
        let Some(m) = self.image.mailbox(mailbox) else { return Vec::new() };
        // A live message of the mailbox, by the GUID index; no more asked than answered.
        let held: BTreeSet<Guid> =
            guids.iter().take(REPLICA_BODIES_MAX).copied().filter(|g| m.messages.has_guid(*g)).collect();
        let mut bodies = Vec::new();
        let mut bytes = 0usize;
        for guid in held {
            if bodies.len() >= REPLICA_BODIES_MAX || bytes >= REPLICA_BODY_BYTES_MAX {
                break;
            }
            // Only an intact body leaves: a damaged one is this server's to repair.
            if let Some(body) = self.image.intact_body(guid) {
                bytes = bytes.saturating_add(body.len());
                bodies.push((guid, body));
            }
        }
        bodies
    }

    /// Stores the given bodies that belong to records of `state` (checked against their
    /// checksums) and returns the GUIDs of records whose bodies are still missing here.
    /// A message this mailbox expunged needs no body: the merge drops it.
    pub(crate) fn take_replica_bodies(&mut self, state: &MailboxState, bodies: Vec<(Guid, Body)>) -> Vec<Guid> {
        for (guid, bytes) in bodies {
            let Some(record) = state.messages.iter().find(|r| r.guid == guid) else { continue };
            // Bytes that match the record replace ours unless ours are intact, as a body
            // fetched from a peer does (`store_body`): the replica's copy may be the one
            // intact body left (explore seed 881284: a census gave the message up after
            // its body was damaged on every server, and the pushed body was dropped for
            // the damaged one still stored here).
            let keep_ours = self.image.body_intact(guid) == Some(true);
            if keep_ours || bytes.checksum() != record.checksum || u32::try_from(bytes.len()).is_err() {
                continue;
            }
            self.image.put_checked_body(&mut self.out, guid, record.checksum, bytes);
        }
        // A user replica taking the cluster's copy needs the body of a message a census
        // lost here and a push brought back; a master does not ask for a lost message's
        // body (a partial replica may not hold it): without it, it stays lost.
        let user_replica = self.cfg.user_replica;
        let expunged: BTreeSet<Guid> = self
            .image
            .mailbox(&state.mailbox)
            .map(|m| {
                m.tombstones
                    .values()
                    .filter(|t| if user_replica { t.by_client() } else { t.expunged })
                    .map(|t| t.guid)
                    .collect()
            })
            .unwrap_or_default();
        // A body this partial replica omits by design is not missing (`crate::partial`).
        // A partial cluster server taking a push as master is excused only while a live
        // record of the message is here (so every full server holds its body): the
        // replica's copy of a message the cluster has since expunged and collected
        // everywhere may be the only one (explore seed 26372), and a partial replica's
        // copy of one whose body it omits too is the cluster's own (seed 44301).
        let excused = |r: &MessageRecord| {
            self.omits_body(&state.mailbox, r) && (self.cfg.user_replica || self.image.is_referenced(r.guid))
        };
        let mut missing: Vec<Guid> = state
            .messages
            .iter()
            .filter(|r| !excused(r))
            .map(|r| r.guid)
            .filter(|g| !self.image.has_body(g) && !expunged.contains(g))
            .collect();
        missing.sort();
        missing.dedup();
        missing
    }

    /// A user replica's copy, joined here as its mailbox's master (the job that runs
    /// this is on the master). Answered once durable here: the replica keeps its own
    /// copy, and its agent pushes again whatever a lost master took with it.
    pub(crate) fn master_merge(
        &mut self,
        mut state: MailboxState,
        bodies: Vec<(Guid, Body)>,
        from_cluster: &[(Uid, Uid)],
    ) -> WriteResult {
        let known = uid_set(from_cluster);
        // A binding the replica does not know the cluster held is marked pushed: its
        // expunge's tombstone is kept past collection, as a later push of it as new
        // mail would otherwise bring the message back (`server::tombstones`).
        for r in state.messages.iter_mut().filter(|r| !known.contains(r.uid)) {
            r.pushed = true;
        }
        if !self.has_bug(crate::Bug::ReplicaResurrects) {
            let forgotten = self.forgotten_here(&state, &known);
            if !forgotten.is_empty() {
                self.marks.hit(crate::marks::Mark::ReplicaCopyOfForgottenExpunge);
                state.messages.retain(|r| !forgotten.contains(&r.uid));
            }
            self.expunge_where_live(&mut state);
        }
        let missing = self.take_replica_bodies(&state, bodies);
        let highest = |s: &Server| s.image.mailbox(&state.mailbox).map_or(0, |m| m.highest_modseq);
        if !missing.is_empty() {
            return WriteResult::Merged { modseq: highest(self), missing };
        }
        // A message a census gave up comes back only with its body (the replica sends
        // the bodies of those it keeps, `mailbox::adopt_rule` step 6): without, it
        // stays lost.
        let lost = self.lost_here(&state.mailbox);
        if !lost.is_empty() {
            state.messages.retain(|r| !lost.contains(&r.guid) || self.image.body_intact(r.guid) == Some(true));
        }
        let laptop_leaves_incarnation = self.has_bug(crate::Bug::LaptopLeavesItsIncarnation);
        let rules = crate::MergeRules { revive_lost: true, laptop_leaves_incarnation, ..self.merge_rules() };
        let outcome = self.merge_state_by(&state, true, rules, None);
        debug_assert!(!outcome.unresolved, "a master decides every conflict");
        if outcome.new_validity {
            self.marks.hit(crate::marks::Mark::PushMovedIncarnation);
        }
        if outcome.records.iter().any(|r| lost.contains(&r.guid)) {
            self.marks.hit(crate::marks::Mark::LostMessageRevived);
        }
        WriteResult::Merged { modseq: highest(self), missing: Vec::new() }
    }

    /// The messages of `mailbox` a census gave up here that a push may bring back
    /// (`mailbox::lost_messages`).
    fn lost_here(&self, mailbox: &MailboxKey) -> BTreeSet<Guid> {
        let Some(m) = self.image.mailbox(mailbox) else { return BTreeSet::new() };
        crate::mailbox::lost_messages(m.tombstones.values(), |g| m.messages.has_guid(g))
    }

    /// The replica's client expunged each message of an expunged tombstone, at the
    /// binding it had there; the cluster may have moved it since (a renumbering whose
    /// tombstone it may even have collected). The expunge is of the message: it is
    /// added at the binding the message has here, so no retired or collected UID hides
    /// it. (A replica's own modseqs do not order against this copy's collections.)
    fn expunge_where_live(&self, state: &mut MailboxState) {
        let Some(m) = self.image.mailbox(&state.mailbox) else { return };
        if m.uidvalidity != state.uidvalidity {
            return;
        }
        let moved: Vec<Tombstone> = state
            .tombstones
            .iter()
            // A census's loss the replica took from the cluster kills only its binding.
            .filter(|t| t.by_client())
            .filter_map(|t| {
                let here = m.messages.last_uid_of(t.guid)?;
                (here != t.uid).then_some(Tombstone::expunge(here, t.guid, t.modseq.max(1)))
            })
            .collect();
        state.tombstones.extend(moved);
    }

    /// The UIDs of a replica's records at bindings the cluster held (`from_cluster`)
    /// that this copy retired since, with no live message of that GUID here: the
    /// cluster expunged the message and collected its tombstone while the replica was
    /// away. A server's copy found at a retired UID moves instead (it may be mail no one
    /// else has); these are known to be the cluster's own, gone.
    fn forgotten_here(&self, state: &MailboxState, from_cluster: &Retired) -> BTreeSet<Uid> {
        let Some(m) = self.image.mailbox(&state.mailbox) else { return BTreeSet::new() };
        if m.uidvalidity != state.uidvalidity {
            return BTreeSet::new();
        }
        let lost = self.lost_here(&state.mailbox);
        state
            .messages
            .iter()
            .filter(|r| from_cluster.contains(r.uid) && m.retired.contains(r.uid))
            .filter(|r| m.messages.get(&r.uid).is_none_or(|ours| ours.guid != r.guid))
            // A message live here at another UID was moved, not expunged: the merge takes
            // the replica's flag changes to where it lives (explore seed 2637).
            .filter(|r| !m.messages.has_guid(r.guid))
            // One a census gave up may come back (see `master_merge`).
            .filter(|r| !lost.contains(&r.guid))
            .map(|r| r.uid)
            .collect()
    }

    /// The cluster's copy taken by this user replica. The push mark moves past the
    /// adopted changes only if nothing was written here since the pull it answers; a
    /// conflict this copy could not take (a write here since) sends the next push whole.
    pub(crate) fn on_replica_adopt(
        &mut self,
        id: RequestId,
        state: &MailboxState,
        bodies: Vec<(Guid, Body)>,
        (pushed_upto, from_cluster): (ModSeq, &[(Uid, Uid)]),
    ) {
        if !self.cfg.user_replica {
            let reason = "only a user replica takes another copy's decisions".to_string();
            self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason });
            return;
        }
        let checked = crate::limits::check_adopted_state(state, &bodies)
            .and_then(|()| crate::limits::check_uid_ranges(from_cluster));
        if let Err(reason) = checked {
            self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason });
            return;
        }
        let missing = self.take_replica_bodies(state, bodies);
        if !missing.is_empty() {
            self.out.reply_when_durable(
                id,
                ClientReply::ReplicaAdopted {
                    pushed_upto,
                    missing,
                    held: Vec::new(),
                    summary: None,
                    texts_wanted: Vec::new(),
                },
            );
            return;
        }
        let before = self.image.mailbox(&state.mailbox).map_or(0, |m| m.highest_modseq);
        let take_collected = !self.has_bug(crate::Bug::ReplicaResurrects);
        let takes_lost = self.has_bug(crate::Bug::ReplicaTakesLostExpunge);
        let lost_held: BTreeSet<Guid> = state
            .tombstones
            .iter()
            .filter(|t| t.lost && !takes_lost)
            .map(|t| t.guid)
            .filter(|g| self.image.body_intact(*g) == Some(true))
            .collect();
        let here = self.image.mailbox(&state.mailbox);
        let since_s = self.user_replica_partial().map_or(0, |p| p.since_s);
        let from_cluster = uid_set(from_cluster);
        let holds_body = |g: Guid| lost_held.contains(&g);
        let mut adopt =
            crate::mailbox::adopt_rule(here, state, &from_cluster, pushed_upto, take_collected, since_s, holds_body);
        // Step 7 (none under the broken variant: `lost_held` is empty there).
        let elsewhere = |g: Guid| self.live_copy_elsewhere(&state.mailbox, g, &lost_held);
        crate::mailbox::keep_lost_held_elsewhere(here, &mut adopt, elsewhere);
        let crate::mailbox::Adopt { state, gone, left_window, push_whole, kept_lost } = adopt;
        // What this adopt keeps is what the next push brings back (those the cluster
        // has live again are done).
        self.kept_lost.remove(&state.mailbox);
        if !kept_lost.is_empty() {
            self.marks.hit(crate::marks::Mark::LostMessageKept);
            let room = KEPT_LOST_MAX.saturating_sub(self.kept_lost.values().map(BTreeSet::len).sum());
            self.kept_lost.insert(state.mailbox.clone(), kept_lost.into_iter().take(room).collect());
        }
        if !gone.is_empty() {
            self.marks.hit(crate::marks::Mark::ReplicaCopyOfForgottenExpunge);
        }
        for uid in gone.into_iter().chain(left_window) {
            self.commit(crate::store::StoreWrite::RemoveMessage { mailbox: state.mailbox.clone(), uid });
        }
        let keeps_own = self.image.mailbox(&state.mailbox).is_some_and(|m| {
            crate::mailbox::incarnation_wins((m.uidvalidity, m.uidnext), (state.uidvalidity, state.uidnext))
        });
        if keeps_own {
            self.marks.hit(crate::marks::Mark::ReplicaKeptOwnIncarnation);
        }
        let laptop_leaves_incarnation = self.has_bug(crate::Bug::LaptopLeavesItsIncarnation);
        let rules = crate::MergeRules { from_master: true, laptop_leaves_incarnation, ..self.merge_rules() };
        let at_risk = self.records_under_tombstones(&state);
        let outcome = self.merge_state_by(&state, false, rules, None);
        self.remember_dropped(at_risk);
        let after = self.image.mailbox(&state.mailbox).map_or(0, |m| m.highest_modseq);
        debug_assert!(after >= before, "HIGHESTMODSEQ never goes down");
        let untouched = before == pushed_upto;
        let pushed_upto = match (outcome.unresolved || push_whole, untouched) {
            (true, _) => 0,
            (false, true) => after,
            (false, false) => pushed_upto,
        };
        let held = self.held_as_cluster_has(&state);
        let own = self.user_replica_partial().cloned();
        let summary = self.replica_summary(&state.mailbox, own.as_ref());
        let texts_wanted = self.texts_wanted_of(&state.mailbox);
        let reply = ClientReply::ReplicaAdopted { pushed_upto, missing: Vec::new(), held, summary, texts_wanted };
        self.out.reply_when_durable(id, reply);
    }

    /// A live record of `guid` in another mailbox of `mailbox`'s user, or one an adopt
    /// dropped lately (`dropped_lately`), if its body is among `intact`
    /// (`mailbox::keep_lost_held_elsewhere`).
    fn live_copy_elsewhere(&self, mailbox: &MailboxKey, guid: Guid, intact: &BTreeSet<Guid>) -> Option<MessageRecord> {
        if !intact.contains(&guid) {
            return None;
        }
        self.image
            .mailboxes()
            .iter()
            .filter(|(key, _)| key.user == mailbox.user && *key != mailbox)
            .find_map(|(_, m)| m.messages.uids_of(guid).next().and_then(|uid| m.messages.get(&uid)).cloned())
            .or_else(|| self.dropped_lately.get(&guid).map(|(record, _)| record.clone()))
    }

    /// This copy's live records of the mailbox `state` is of whose messages `state` has
    /// tombstones of: those the adopt may drop.
    fn records_under_tombstones(&self, state: &MailboxState) -> Vec<MessageRecord> {
        let Some(m) = self.image.mailbox(&state.mailbox) else { return Vec::new() };
        let mut records: Vec<MessageRecord> = state
            .tombstones
            .iter()
            .filter_map(|t| m.messages.last_uid_of(t.guid).and_then(|uid| m.messages.get(&uid)))
            .cloned()
            .collect();
        records.sort_by_key(|r| r.guid);
        records.dedup_by_key(|r| r.guid);
        records
    }

    /// Remembers those of `at_risk` now live in no mailbox here whose bodies this copy
    /// holds intact (see `DROPPED_LATELY_MAX`); forgets the oldest past the bounds.
    fn remember_dropped(&mut self, at_risk: Vec<MessageRecord>) {
        let now = self.now;
        self.dropped_lately.retain(|_, (_, at)| now.0.saturating_sub(at.0) < DROPPED_LATELY_KEPT_US);
        for record in at_risk {
            if self.image.is_referenced(record.guid) || self.image.body_intact(record.guid) != Some(true) {
                continue;
            }
            if self.dropped_lately.len() >= DROPPED_LATELY_MAX
                && let Some(oldest) = self.dropped_lately.iter().min_by_key(|(g, (_, at))| (*at, **g)).map(|(g, _)| *g)
            {
                self.dropped_lately.remove(&oldest);
            }
            self.dropped_lately.insert(record.guid, (record, now));
        }
        debug_assert!(self.dropped_lately.len() <= DROPPED_LATELY_MAX);
    }

    /// The UID ranges where this copy now binds a message as the cluster's `state` does.
    fn held_as_cluster_has(&self, state: &MailboxState) -> Vec<(Uid, Uid)> {
        // A copy that kept its own incarnation (it wins) holds none of the cluster's
        // bindings, whatever UIDs the two share.
        let Some(m) = self.image.mailbox(&state.mailbox).filter(|m| m.uidvalidity == state.uidvalidity) else {
            return Vec::new();
        };
        let mut held = Retired::default();
        for r in &state.messages {
            if m.messages.get(&r.uid).is_some_and(|ours| ours.guid == r.guid) {
                held.insert_range(r.uid, r.uid);
            }
        }
        held.ranges.into_iter().collect()
    }
}

/// UID ranges as a set (a `Retired` with nothing collected: the same range arithmetic).
fn uid_set(ranges: &[(Uid, Uid)]) -> Retired {
    let mut set = Retired::default();
    for &(first, last) in ranges {
        if first <= last {
            set.insert_range(first, last);
        }
    }
    set
}
