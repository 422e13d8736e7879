//! Requests in progress here, by id: what each waits for, and the rules that move it
//! from one state to the next. `jobs` decides where a job goes; the table keeps them.

use super::jobs::{Job, JobId, JobKind, JobState, Origin};
use crate::types::*;
use crate::{WriteId, WriteResult};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct JobTable {
    /// The last number handed out (see `unique_number`).
    next_number: u64,
    jobs: BTreeMap<JobId, Job>,
    /// Every job's deadline, earliest first: the job timer and the expiry read it here.
    deadlines: BTreeSet<(Instant, JobId)>,
}

impl JobTable {
    /// `start` is drawn at random by each start of the server: a server that lost its
    /// disk counts its incarnations from 1 again, and a late answer to a job of its
    /// earlier life must not find a new job under the same number (the explorer's seed
    /// 99582: a SAVE was answered with another message's GUID). Numbers start at a
    /// random point in the lower half of the incarnation's window, so two lives with one
    /// incarnation overlap only if their ranges meet (about jobs / 2^39).
    pub(crate) fn new(incarnation: u64, start: u64) -> JobTable {
        let offset = start & ((1 << 39) - 1);
        JobTable { next_number: (incarnation << 40) | offset, jobs: BTreeMap::new(), deadlines: BTreeSet::new() }
    }

    /// A number used once on this server, across restarts too (the incarnation sits in
    /// the high bits, a random start below it): for jobs, and for catch-ups, whose
    /// answers carry it.
    pub(crate) fn unique_number(&mut self) -> u64 {
        // 0 and `MBOX_CONFIRMATION` mean something else as an MBOX's tag.
        self.next_number = self.next_number.wrapping_add(1);
        if self.next_number == 0 || self.next_number == crate::msg::MBOX_CONFIRMATION {
            self.next_number = 1;
        }
        self.next_number
    }

    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Files a job under a new id.
    pub(crate) fn insert(&mut self, job: Job) -> JobId {
        let id = JobId(self.unique_number());
        self.deadlines.insert((job.deadline, id));
        let old = self.jobs.insert(id, job);
        debug_assert!(old.is_none(), "a job id is used once");
        debug_assert_eq!(self.deadlines.len(), self.jobs.len());
        id
    }

    pub(crate) fn get(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    pub(crate) fn remove(&mut self, id: JobId) -> Option<Job> {
        let job = self.jobs.remove(&id)?;
        let indexed = self.deadlines.remove(&(job.deadline, id));
        debug_assert!(indexed, "every job's deadline is indexed");
        debug_assert_eq!(self.deadlines.len(), self.jobs.len());
        Some(job)
    }

    /// The earliest deadline of a job in progress.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    pub(crate) fn set_state(&mut self, id: JobId, state: JobState) {
        if let Some(job) = self.jobs.get_mut(&id) {
            job.state = state;
        }
    }

    /// Jobs waiting for a master of `key`.
    pub(crate) fn queued_for(&self, key: &MasterKey) -> Vec<JobId> {
        self.ids_where(|j| j.key == *key && j.state == JobState::Queued)
    }

    /// Whether a job waits for a master.
    pub(crate) fn has_queued(&self) -> bool {
        self.jobs.values().any(|j| j.state == JobState::Queued)
    }

    /// Keys that jobs wait on.
    pub(crate) fn queued_keys(&self) -> BTreeSet<MasterKey> {
        self.jobs.values().filter(|j| j.state == JobState::Queued).map(|j| j.key.clone()).collect()
    }

    /// Jobs forwarded to `peer` go back to the queue; returns them, and the keys of the
    /// MASTER-MOVEs among them (no longer moving).
    pub(crate) fn requeue_forwarded_to(&mut self, peer: Sid) -> (Vec<JobId>, Vec<MasterKey>) {
        let ids = self.ids_where(|j| j.state == JobState::Forwarded { to: peer });
        let mut moves = Vec::new();
        for id in &ids {
            if let Some(job) = self.jobs.get_mut(id) {
                job.state = JobState::Queued;
                if matches!(job.kind, JobKind::MasterMove { .. }) {
                    moves.push(job.key.clone());
                }
            }
        }
        (ids, moves)
    }

    /// RENAMEs that waited to master `key` go back to the queue; returns them.
    pub(crate) fn master_known(&mut self, key: &MasterKey) -> Vec<JobId> {
        let waiting = JobState::WaitingMaster { key: key.clone() };
        let ids = self.ids_where(|j| j.state == waiting);
        for id in &ids {
            self.set_state(*id, JobState::Queued);
        }
        ids
    }

    /// Whether a move of `key` to this server is asked for already (a job of ours).
    pub(crate) fn moving_here(&self, key: &MasterKey) -> bool {
        self.jobs
            .values()
            .any(|j| j.key == *key && matches!(j.kind, JobKind::MasterMove { .. }) && j.origin == Origin::Internal)
    }

    /// COPYs that waited for `guid` go back to the queue; returns them.
    pub(crate) fn body_arrived(&mut self, guid: Guid) -> Vec<JobId> {
        let ids = self.ids_where(|j| j.state == JobState::WaitingBody { guid });
        for id in &ids {
            self.set_state(*id, JobState::Queued);
        }
        ids
    }

    /// Bodies that COPYs wait for.
    /// Bodies a job still needs: awaited from a peer, or copied by a COPY not done yet.
    pub(crate) fn bodies_in_use(&self) -> BTreeSet<Guid> {
        let copied = self.jobs.values().filter_map(|j| match &j.kind {
            super::jobs::JobKind::Write(crate::msg::WriteRequest::Copy { guid, .. }) => Some(*guid),
            _ => None,
        });
        self.awaited_bodies().into_iter().chain(copied).collect()
    }

    pub(crate) fn awaited_bodies(&self) -> BTreeSet<Guid> {
        self.jobs
            .values()
            .filter_map(|j| match j.state {
                JobState::WaitingBody { guid } => Some(guid),
                _ => None,
            })
            .collect()
    }

    /// Jobs whose deadline has passed, earliest first.
    pub(crate) fn expired(&self, now: Instant) -> Vec<JobId> {
        self.deadlines.iter().take_while(|(at, _)| *at <= now).map(|(_, id)| *id).collect()
    }

    pub(crate) fn any_for(&self, key: &MasterKey) -> bool {
        self.jobs.values().any(|j| j.key == *key)
    }

    /// Whether a change of `key` ordered here still waits for its copies.
    pub(crate) fn replicating_for(&self, key: &MasterKey) -> bool {
        self.jobs.values().any(|j| j.key == *key && matches!(j.state, JobState::Replicating { .. }))
    }

    /// `peer`, with the store `store`, made the whole change of job `id` durable: one
    /// more copy, while `peer` keeps that store.
    pub(crate) fn peer_acked(&mut self, id: JobId, peer: Sid, store: u64) {
        if let Some(Job { state: JobState::Replicating { acked, .. }, .. }) = self.jobs.get_mut(&id) {
            acked.insert(peer, store);
        }
    }

    /// Jobs executed here whose writes are durable and whose copies are all
    /// acknowledged by stores their peers still have: `store_of` gives a peer's store
    /// as last heard (`RouteTable::store_of`; None: not heard yet, and the
    /// acknowledgement's word is taken).
    pub(crate) fn replicated(
        &self,
        is_durable: impl Fn(WriteId) -> bool,
        store_of: impl Fn(Sid) -> Option<u64>,
    ) -> Vec<JobId> {
        self.ids_where(|j| match &j.state {
            JobState::Replicating { write, need, acked, .. } => {
                is_durable(*write) && counted_copies(acked, &store_of) >= *need
            }
            _ => false,
        })
    }

    /// `peer` has the store `store` now: the copies it acknowledged with any other store
    /// are gone, and waiting jobs forget them for good (so that hearing an older
    /// identity again, late, cannot bring them back). The jobs that forgot one.
    pub(crate) fn forget_copies_of_other_stores(&mut self, peer: Sid, store: u64) -> Vec<JobId> {
        let mut forgotten = Vec::new();
        for (id, job) in &mut self.jobs {
            if let JobState::Replicating { acked, .. } = &mut job.state
                && acked.get(&peer).is_some_and(|s| *s != store)
            {
                acked.remove(&peer);
                forgotten.push(*id);
            }
        }
        forgotten
    }

    /// One part of a split job answered. When it was the last, the parent job leaves the
    /// table with the parts' results joined by `join`.
    pub(crate) fn part_answered(
        &mut self,
        parent: JobId,
        result: WriteResult,
        join: impl FnOnce(WriteResult, WriteResult) -> WriteResult,
    ) -> Option<(Job, WriteResult)> {
        let job = self.jobs.get_mut(&parent)?;
        let JobState::Split { left, result: joined } = &mut job.state else { return None };
        *joined = Some(match joined.take() {
            None => result,
            Some(prev) => join(prev, result),
        });
        *left = left.saturating_sub(1);
        if *left > 0 {
            return None;
        }
        let job = self.remove(parent)?;
        match job.state {
            JobState::Split { result: Some(ref result), .. } => {
                let result = result.clone();
                Some((job, result))
            }
            _ => None,
        }
    }

    fn ids_where(&self, keep: impl Fn(&Job) -> bool) -> Vec<JobId> {
        self.jobs.iter().filter(|(_, j)| keep(j)).map(|(t, _)| *t).collect()
    }
}

/// The acknowledged copies whose peers still have the store that made them.
fn counted_copies(acked: &BTreeMap<Sid, u64>, store_of: &impl Fn(Sid) -> Option<u64>) -> usize {
    acked.iter().filter(|(peer, store)| store_of(**peer).is_none_or(|now| now == **store)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::of(&MailboxKey::from_shared("alice".into(), "INBOX".into()), Granularity::Mailbox)
    }

    fn job(state: JobState, deadline: u64) -> Job {
        Job {
            origin: Origin::Internal,
            kind: JobKind::MasterMove { requester: Sid(1) },
            key: key(),
            state,
            deadline: Instant(deadline),
        }
    }

    #[test]
    fn ids_are_unique_across_incarnations() {
        let mut first = JobTable::new(1, u64::MAX);
        let mut second = JobTable::new(2, 0);
        let a = first.insert(job(JobState::Queued, 0));
        let b = second.insert(job(JobState::Queued, 0));
        assert_ne!(a, b);
        assert!(first.unique_number() > a.0);
        assert!(a.0 < b.0, "the random start stays within the incarnation's window");
        // A life after a disk loss has the same incarnation but another start.
        let mut again = JobTable::new(1, 12_345_678);
        assert_ne!(again.insert(job(JobState::Queued, 0)), a);
    }

    #[test]
    fn a_job_is_done_when_durable_and_acked_enough() {
        let mut t = JobTable::new(1, 0);
        let result = WriteResult::MailboxDone { modseq: 1 };
        let state = JobState::Replicating { write: 5, need: 2, acked: BTreeMap::new(), result };
        let id = t.insert(job(state, 0));
        let unknown = |_: Sid| None;
        assert!(t.replicated(|_| true, unknown).is_empty(), "no copies yet");
        t.peer_acked(id, Sid(2), 20);
        t.peer_acked(id, Sid(2), 20);
        assert!(t.replicated(|_| true, unknown).is_empty(), "one peer counts once");
        t.peer_acked(id, Sid(3), 30);
        assert!(t.replicated(|w| w < 5, unknown).is_empty(), "the write is not durable yet");
        assert_eq!(t.replicated(|w| w <= 5, unknown), vec![id]);
    }

    #[test]
    fn a_copy_counts_only_while_its_peer_keeps_the_store_that_made_it() {
        let mut t = JobTable::new(1, 0);
        let result = WriteResult::MailboxDone { modseq: 1 };
        let state = JobState::Replicating { write: 5, need: 2, acked: BTreeMap::new(), result };
        let id = t.insert(job(state, 0));
        t.peer_acked(id, Sid(2), 20);
        t.peer_acked(id, Sid(3), 30);
        let before = |s: Sid| Some(u64::from(s.0) * 10);
        assert_eq!(t.replicated(|_| true, before), vec![id], "both stores are the ones announced");
        assert!(t.forget_copies_of_other_stores(Sid(2), 20).is_empty());
        // Server 2 lost its disk: its new store announces itself.
        let replaced = |s: Sid| Some(if s == Sid(2) { 21 } else { u64::from(s.0) * 10 });
        assert!(t.replicated(|_| true, replaced).is_empty(), "the old store's copy is gone");
        assert_eq!(t.forget_copies_of_other_stores(Sid(2), 21), vec![id]);
        assert!(t.replicated(|_| true, before).is_empty(), "forgotten, even if the old identity is heard again");
        assert!(t.forget_copies_of_other_stores(Sid(2), 21).is_empty());
        // The new store acknowledges the change again (a resend): it counts.
        t.peer_acked(id, Sid(2), 21);
        assert_eq!(t.replicated(|_| true, replaced), vec![id]);
        // An acknowledgement from the old store, late, counts for nothing.
        t.peer_acked(id, Sid(2), 20);
        assert!(t.replicated(|_| true, replaced).is_empty());
    }

    #[test]
    fn forwarded_jobs_requeue_when_their_master_is_lost() {
        let mut t = JobTable::new(1, 0);
        let a = t.insert(job(JobState::Forwarded { to: Sid(2) }, 0));
        let b = t.insert(job(JobState::Forwarded { to: Sid(3) }, 0));
        let (ids, moves) = t.requeue_forwarded_to(Sid(2));
        assert_eq!(ids, vec![a]);
        assert_eq!(moves, vec![key()], "a MASTER-MOVE stops moving");
        assert_eq!(t.queued_for(&key()), vec![a]);
        assert_eq!(t.get(b).map(|j| j.state.clone()), Some(JobState::Forwarded { to: Sid(3) }));
    }

    #[test]
    fn a_split_job_answers_once_all_parts_have() {
        let mut t = JobTable::new(1, 0);
        let parent = t.insert(job(JobState::Split { left: 2, result: None }, 0));
        let part = |n| WriteResult::Expunged { uids: vec![n], modseq: n.into() };
        let join = |a: WriteResult, b: WriteResult| match (a, b) {
            (WriteResult::Expunged { mut uids, .. }, WriteResult::Expunged { uids: more, modseq }) => {
                uids.extend(more);
                WriteResult::Expunged { uids, modseq }
            }
            (a, _) => a,
        };
        assert!(t.part_answered(parent, part(1), join).is_none());
        let (_, joined) = t.part_answered(parent, part(2), join).expect("all parts answered");
        assert_eq!(joined, WriteResult::Expunged { uids: vec![1, 2], modseq: 2 });
        assert!(t.get(parent).is_none());
    }

    #[test]
    fn deadlines_and_bodies_are_found() {
        let mut t = JobTable::new(1, 0);
        let late = t.insert(job(JobState::WaitingBody { guid: Guid(7) }, 10));
        t.insert(job(JobState::Queued, 50));
        assert_eq!(t.expired(Instant(10)), vec![late]);
        assert_eq!(t.awaited_bodies(), BTreeSet::from([Guid(7)]));
        assert_eq!(t.body_arrived(Guid(7)), vec![late]);
        assert_eq!(t.queued_for(&key()).len(), 2);
    }

    #[test]
    fn the_next_deadline_is_the_earliest_job_left() {
        let mut t = JobTable::new(1, 0);
        assert_eq!(t.next_deadline(), None);
        let late = t.insert(job(JobState::Queued, 50));
        let early = t.insert(job(JobState::Queued, 10));
        assert_eq!(t.next_deadline(), Some(Instant(10)));
        assert_eq!(t.expired(Instant(60)), vec![early, late], "earliest first");
        t.remove(early);
        assert_eq!(t.next_deadline(), Some(Instant(50)));
        t.remove(late);
        assert_eq!(t.next_deadline(), None);
        assert!(t.expired(Instant(100)).is_empty());
    }
}
