//! Tombstone collection: a mailbox master turns a mailbox's tombstones into retired UID
//! ranges once no copy of what they kill can still arrive anywhere.
//!
//! A tombstone keeps an expunged (or renumbered) binding from coming back. It can go
//! when every server holds it and nothing that predates it is still travelling:
//! - every other configured server has shown the master the same copy of the mailbox
//!   (the same digest, so the same tombstones and no live copy of what they kill), each
//!   for longer than `tombstone_grace_us` (a message sent before that is delivered or
//!   lost by then). A server gives that confirmation only once its copy is durable and
//!   none of its replication logs holds a change of the mailbox (an old master's change
//!   may be delivered much later);
//! - none of the master's own logs holds a change of the mailbox.
//!
//! The UIDs stay retired (see [`Retired`]): nothing is placed there again, and a message
//! that turns up there anyway (a disk restored from an old backup) moves to a new UID.
//!
//! Two kinds of tombstone stay: a census's loss (see `Tombstone::lost`), and, up to
//! [`REPLICA_TOMBSTONES_KEPT_MAX`] per mailbox (the newest), a client's expunge of a
//! message made on a user replica (its GUID's origin is no server of the cluster) or of
//! a binding a replica's push placed (`MessageRecord::pushed`: a COPY made on the
//! replica keeps the cluster's GUID). A replica's push whose answer was lost (its home
//! crashed, or the laptop) leaves the replica knowing of no binding the cluster held for
//! what it pushed; once that message is expunged, only its tombstone tells the replica's
//! next push of it from new mail (focus leave seed 157812, focus laptop seed 188146,
//! `scenarios/regression-laptop-copy-push-answer-lost-then-expunged.toml`).

use super::Server;
use crate::marks::Mark;
use crate::msg::Change;
use crate::store::StoreWrite;
use crate::types::*;

use super::anti_entropy::EXAMINED_PER_PASS_MAX;

/// Tombstones of messages made on user replicas a mailbox keeps past collection, at
/// most (the newest by modseq): some 50 bytes each.
pub(crate) const REPLICA_TOMBSTONES_KEPT_MAX: usize = 1_000;

impl Server {
    /// Collects the tombstones of the mailboxes we master whose every copy agrees (see
    /// the module comment); one bounded pass, from where the last one stopped.
    pub(crate) fn collect_tombstones(&mut self) {
        // A user replica's tombstones are how its expunges reach the cluster: it never
        // collects one itself, and drops those the cluster collected when it adopts the
        // cluster's retired UIDs (a collection of its own would push the UID as merely
        // retired, and the cluster would move the message instead of expunging it).
        if !self.masters.any_ready() || self.cfg.user_replica {
            return;
        }
        let (ready, resume_after) = self.collection_candidates();
        self.anti_entropy.collection_ended(resume_after);
        for mailbox in ready {
            self.collect_mailbox_tombstones(&mailbox);
        }
    }

    /// The mailboxes of this pass whose tombstones may go, and where the next pass starts.
    fn collection_candidates(&mut self) -> (Vec<MailboxKey>, Option<MailboxKey>) {
        // Something to collect: a tombstone neither a census's loss nor kept for user
        // replicas (one of a server's message, or one beyond the replicas' limit). A pass
        // over the mailbox's tombstones that stops at the first (most are servers').
        let (with_tombstones, resume_after) =
            self.image.mailbox_pass(self.anti_entropy.collection_start(), EXAMINED_PER_PASS_MAX, |_, m| {
                let mut made_on_replicas = 0;
                m.tombstones.values().any(|t| {
                    if lost_on(m, t.uid) {
                        return false;
                    }
                    if !self.kept_for_replicas_kind(t) {
                        return true;
                    }
                    made_on_replicas += 1;
                    made_on_replicas > REPLICA_TOMBSTONES_KEPT_MAX
                })
            });
        let ready = with_tombstones.into_iter().filter(|k| self.may_collect(k)).collect();
        (ready, resume_after)
    }

    /// Of the kind a mailbox keeps for user replicas (see the module comment): a client's
    /// expunge of a message whose GUID no server of the cluster made (its origin is no
    /// member, now or before), or of a binding a user replica pushed (a COPY made there
    /// of the cluster's mail keeps the cluster's GUID).
    fn kept_for_replicas_kind(&self, t: &Tombstone) -> bool {
        !self.has_bug(crate::Bug::CollectReplicaTombstones)
            && t.by_client()
            && (t.pushed || self.members.get(Sid(t.guid.origin())).is_none())
    }

    /// The UIDs whose tombstones `m` keeps for user replicas: those of that kind, the
    /// newest [`REPLICA_TOMBSTONES_KEPT_MAX`].
    fn kept_for_replicas(&self, m: &crate::store::StoredMailbox) -> std::collections::BTreeSet<Uid> {
        let mut kept: Vec<(ModSeq, Uid)> =
            m.tombstones.values().filter(|t| self.kept_for_replicas_kind(t)).map(|t| (t.modseq, t.uid)).collect();
        kept.sort_unstable();
        kept.iter().rev().take(REPLICA_TOMBSTONES_KEPT_MAX).map(|(_, uid)| *uid).collect()
    }

    /// Whether `mailbox`'s tombstones may go now (see the module comment).
    fn may_collect(&mut self, mailbox: &MailboxKey) -> bool {
        if !self.masters.masters_ready(&self.master_key(mailbox)) {
            return false;
        }
        if self.has_bug(crate::Bug::CollectTombstonesEarly) {
            // A deliberately broken variant: no confirmations, no grace, logs ignored.
            return true;
        }
        let peers: Vec<Sid> = self.peers();
        if peers.iter().any(|p| self.image.is_logged(*p, mailbox)) {
            return false;
        }
        let Some(summary) = self.image.summary(mailbox) else { return false };
        let grace = self.cfg.tombstone_grace_us;
        peers.iter().all(|p| {
            self.anti_entropy
                .agreed_since(*p, mailbox, summary.digest)
                .is_some_and(|at| self.now.0.saturating_sub(at.0) >= grace)
        })
    }

    /// Turns every tombstone of `mailbox` into a retired UID, at one new modseq, and
    /// replicates that like any change.
    fn collect_mailbox_tombstones(&mut self, mailbox: &MailboxKey) {
        let Some(m) = self.image.mailbox(mailbox) else { return };
        debug_assert!(
            m.tombstones.keys().all(|(uid, _)| !m.messages.contains_key(uid)),
            "a master never holds a live message on a tombstoned UID when it collects"
        );
        let collected = m.highest_modseq.saturating_add(1);
        let mut fresh = Retired { ranges: Default::default(), collected };
        // A census's loss stays (see `Tombstone::lost`), and so does a user replica's
        // message's expunge (see the module comment): their UIDs are not retired, as a
        // retired UID covers every tombstone on it.
        let kept = self.kept_for_replicas(m);
        for (uid, _) in m.tombstones.keys().filter(|(uid, _)| !lost_on(m, *uid) && !kept.contains(uid)) {
            fresh.insert_range(*uid, *uid);
        }
        if fresh.ranges.is_empty() {
            return;
        }
        let (uidvalidity, uidnext) = (m.uidvalidity, m.uidnext);
        debug_assert!(fresh.last_uid().is_none_or(|last| last < uidnext), "a tombstone's UID is below UIDNEXT");
        let bindings: Vec<(Uid, Guid)> =
            m.tombstones.values().filter(|t| fresh.covers(t)).map(|t| (t.uid, t.guid)).collect();
        // The change names the bindings whose message is live nowhere else in the mailbox,
        // by tombstones the new ranges cover: a copy that a store restored from before the
        // expunge still holds goes wherever the change is merged, master or replica
        // (`mailbox::drop_collected_copies`), instead of moving to a new UID as new mail on
        // a retired UID would (focus restore seed 323990: such a store, cut off until
        // after the collection, came back as master). Every other copy drops them with
        // the tombstones the ranges cover. Split into pieces, each name travels with the
        // range that covers it (`limits::state_pieces`); past `NAMES_PER_STATE_MAX`,
        // the rest only the memory of collections names, in later states and within
        // the same bound (those collected last first).
        let named: Vec<Tombstone> = bindings
            .iter()
            .filter(|(_, guid)| !m.messages.has_guid(*guid))
            .filter_map(|&(uid, guid)| fresh.name(uid, guid))
            .take(super::recently_collected::NAMES_PER_STATE_MAX)
            .collect();
        self.remember_collected(mailbox, uidvalidity, &bindings);
        // The modseq first (it is never given out twice), then the retirement.
        self.commit(StoreWrite::MailboxMeta {
            mailbox: mailbox.clone(),
            uidvalidity,
            uidnext,
            highest_modseq: collected,
        });
        self.commit(StoreWrite::RetireUids { mailbox: mailbox.clone(), retired: fresh.clone() });
        debug_assert!(
            self.image.mailbox(mailbox).is_some_and(|m| m
                .tombstones
                .keys()
                .all(|(uid, _)| lost_on(m, *uid) || kept.contains(uid))
                && m.retired.collected == collected),
            "a collection leaves only the tombstones on a census's lost UIDs and those kept for user replicas"
        );
        self.marks.hit(Mark::TombstonesCollected);
        // Only the new ranges travel: retired UIDs are joined, never replaced.
        let state = MailboxState {
            mailbox: mailbox.clone(),
            uidvalidity,
            uidnext,
            highest_modseq: collected,
            messages: Vec::new(),
            tombstones: named,
            lifecycle: self.image.mailbox(mailbox).map(|m| m.lifecycle).unwrap_or_default(),
            retired: fresh,
        };
        self.replicate(Change::Merge { state: Box::new(state) }, None);
    }
}

/// Whether a census's loss sits on `uid` (its UID is never retired: see
/// `collect_mailbox_tombstones`).
fn lost_on(m: &crate::store::StoredMailbox, uid: Uid) -> bool {
    m.tombstones_at(uid).any(|t| t.lost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Config;
    use crate::store::{DiskImage, MemoryBodies, StoredMailbox};

    /// A GUID made by server (or replica) `origin`.
    fn guid(n: u128, origin: u32) -> Guid {
        Guid((n << 16) | u128::from(origin))
    }

    #[test]
    fn only_the_newest_expunges_of_messages_made_on_user_replicas_are_kept() {
        let mut m = StoredMailbox { uidvalidity: 7, ..Default::default() };
        let laptop = 13;
        let made_on_laptop = REPLICA_TOMBSTONES_KEPT_MAX as u32 + 5;
        for uid in 1..=made_on_laptop {
            let t = Tombstone::expunge(uid, guid(u128::from(uid), laptop), u64::from(uid));
            m.tombstones.insert((t.uid, t.guid), t);
        }
        let server_made = made_on_laptop + 1;
        let t = Tombstone::expunge(server_made, guid(1, 2), 9_999);
        m.tombstones.insert((t.uid, t.guid), t);
        // A retirement (a renumbering's), not a client's expunge: never kept.
        let retired_uid = made_on_laptop + 2;
        let t = Tombstone { expunged: false, ..Tombstone::expunge(retired_uid, guid(2, laptop), 10_000) };
        m.tombstones.insert((t.uid, t.guid), t);
        // A laptop's COPY of the cluster's mail, pushed: the cluster's GUID, kept.
        let pushed_copy = retired_uid + 1;
        let t = Tombstone { pushed: true, ..Tombstone::expunge(pushed_copy, guid(3, 2), 10_001) };
        m.tombstones.insert((t.uid, t.guid), t);
        m.uidnext = pushed_copy + 1;
        let server = Server::recover(
            Config::new(Sid(1), vec![Sid(1), Sid(2)]),
            DiskImage::default(),
            1,
            Box::new(MemoryBodies::default()),
        );
        let kept = server.kept_for_replicas(&m);
        assert_eq!(kept.len(), REPLICA_TOMBSTONES_KEPT_MAX);
        assert!(kept.contains(&pushed_copy), "a pushed binding's expunge is kept, whoever made the GUID");
        assert!(kept.contains(&made_on_laptop) && kept.contains(&7), "the newest are kept");
        assert!(!kept.contains(&6) && !kept.contains(&1), "the oldest beyond the limit go");
        assert!(!kept.contains(&server_made), "a message a server of the cluster made is collected");
        assert!(!kept.contains(&retired_uid), "a retirement is collected");
    }
}
