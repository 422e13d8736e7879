//! Requests in progress: client writes, writes forwarded by peers, MASTER-MOVE. A write
//! goes to the mailbox master (directly, through the master cache, or after asking the
//! root), and its client is answered only after the writes it depends on are durable
//! and, for SAVE/COPY in sync mode, `replicas` peers have made the change durable too.

use super::{Mastership, Server};
use crate::io::*;
use crate::mailbox;
use crate::marks::Mark;
use crate::msg::*;
use crate::store::StoreWrite;
use crate::types::*;
use std::collections::BTreeSet;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Client(RequestId),
    /// A peer forwarded this to us; answer with its tag.
    Peer {
        sid: Sid,
        tag: u64,
    },
    /// The server itself (a message file found in the store).
    Internal,
    /// A part of a request too large to forward as one command (see `split_job`).
    Part {
        parent: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobKind {
    Write(WriteRequest),
    /// Move mastership of the key to `requester`.
    MasterMove {
        requester: Sid,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Waiting for a master to be known or ready.
    Queued,
    Forwarded {
        to: Sid,
    },
    /// Executed here as master; waiting for durability.
    Replicating {
        write: WriteId,
        need: usize,
        acked: BTreeSet<Sid>,
        result: WriteResult,
    },
    /// A COPY at the master, waiting for the body.
    WaitingBody {
        guid: Guid,
    },
    /// Forwarded in parts (jobs whose origin is `Origin::Part` of this one): `left`
    /// parts have not answered; `result` joins the answers so far.
    Split {
        left: usize,
        result: Option<WriteResult>,
    },
}

#[derive(Clone, Debug)]
pub struct Job {
    pub origin: Origin,
    pub kind: JobKind,
    pub key: MasterKey,
    pub state: JobState,
    pub deadline: Instant,
}

fn fail(kind: FailKind, reason: impl Into<String>) -> WriteResult {
    WriteResult::Failed { kind, reason: reason.into() }
}

impl Server {
    pub(crate) fn on_client(&mut self, id: RequestId, request: ClientRequest) {
        let write = match request {
            ClientRequest::Read { mailbox } => {
                // A client is shown only what is durable, so a crash can never make this
                // server show a UID bound to another message later.
                let reply = self.read_view(&mailbox);
                let write = self.last_write();
                if self.is_durable(write) {
                    self.push_reply(id, reply);
                } else {
                    self.pending_reads.push((id, write, reply));
                }
                return;
            }
            ClientRequest::MasterMove { mailbox } => {
                let key = self.master_key(&mailbox);
                let job = Job {
                    origin: Origin::Client(id),
                    kind: JobKind::MasterMove { requester: self.cfg.sid },
                    key,
                    state: JobState::Queued,
                    deadline: self.now.plus_us(self.cfg.request_timeout_us),
                };
                self.start_job(job);
                return;
            }
            ClientRequest::Save { mailbox, received, flags, body } => {
                let guid = self.new_guid();
                WriteRequest::Save { mailbox, guid, received, flags, body }
            }
            ClientRequest::Copy { src, src_uid, dst } => {
                let Some(record) = self.db.mailboxes.get(&src).and_then(|m| m.messages.get(&src_uid)) else {
                    self.push_reply(
                        id,
                        ClientReply::Write(fail(FailKind::Permanent, format!("no message {src_uid} in {src}"))),
                    );
                    return;
                };
                WriteRequest::Copy {
                    src,
                    src_uid,
                    guid: record.guid,
                    dst,
                    received: record.received,
                    flags: record.present_flags(),
                }
            }
            ClientRequest::Expunge { mailbox, uids } => {
                let messages = self.resolve_uids(&mailbox, &uids);
                WriteRequest::Expunge { mailbox, messages }
            }
            ClientRequest::Store { mailbox, uids, add, remove, unchanged_since } => {
                let messages = self.resolve_uids(&mailbox, &uids);
                let known_modseq = self
                    .db
                    .mailboxes
                    .get(&mailbox)
                    .map(|m| uids.iter().filter_map(|u| m.messages.get(u)).map(|r| r.modseq).max().unwrap_or(0))
                    .unwrap_or(0);
                WriteRequest::Store { mailbox, messages, add, remove, unchanged_since, known_modseq }
            }
            ClientRequest::CreateMailbox { mailbox } => {
                WriteRequest::Mailbox { mailbox, action: MailboxAction::Create }
            }
            ClientRequest::DeleteMailbox { mailbox } => {
                WriteRequest::Mailbox { mailbox, action: MailboxAction::Delete }
            }
        };
        if let Err(reason) = validate(&write) {
            self.push_reply(id, ClientReply::Write(fail(FailKind::Permanent, reason)));
            return;
        }
        self.submit_write(Origin::Client(id), write);
    }

    pub(crate) fn submit_write(&mut self, origin: Origin, request: WriteRequest) {
        let key = self.master_key(request.target());
        let job = Job {
            origin,
            kind: JobKind::Write(request),
            key,
            state: JobState::Queued,
            deadline: self.now.plus_us(self.cfg.request_timeout_us),
        };
        self.start_job(job);
    }

    fn start_job(&mut self, job: Job) {
        if self.jobs.len() >= self.cfg.pending_max {
            self.answer(job.origin, None, fail(FailKind::Temporary, "server busy"), None);
            return;
        }
        let tag = self.new_tag();
        self.jobs.insert(tag, job);
        self.dispatch(tag);
    }

    /// The messages a client means by these UIDs here (UIDs we do not hold are dropped).
    fn resolve_uids(&self, mailbox: &MailboxKey, uids: &[Uid]) -> Vec<(Uid, Guid)> {
        let Some(m) = self.db.mailboxes.get(mailbox) else { return Vec::new() };
        uids.iter().filter_map(|u| m.messages.get(u)).map(|r| (r.uid, r.guid)).collect()
    }

    fn read_view(&self, mailbox: &MailboxKey) -> ClientReply {
        let Some(m) = self.db.mailboxes.get(mailbox).filter(|m| m.visible()) else {
            return ClientReply::Failed { kind: FailKind::Permanent, reason: format!("no mailbox {mailbox}") };
        };
        ClientReply::Read(MailboxView {
            mailbox: mailbox.clone(),
            uidvalidity: m.uidvalidity,
            uidnext: m.uidnext,
            highest_modseq: m.highest_modseq,
            messages: m
                .messages
                .values()
                .map(|r| MessageView {
                    uid: r.uid,
                    guid: r.guid,
                    flags: r.present_flags(),
                    modseq: r.modseq,
                    received: r.received,
                    size: r.size,
                })
                .collect(),
        })
    }

    /// Send the job where it must go next, or run it if we are its master.
    pub(crate) fn dispatch(&mut self, tag: u64) {
        let Some(job) = self.jobs.get(&tag) else { return };
        if job.state != JobState::Queued {
            return;
        }
        let key = job.key.clone();
        let is_move_job = matches!(job.kind, JobKind::MasterMove { .. });
        if let Some(mastership) = self.mastered.get(&key) {
            if mastership.catchup.is_none() {
                self.execute(tag);
            }
            return;
        }
        if self.moving.contains(&key) && !is_move_job {
            return;
        }
        let Some(&master) = self.master_cache.get(&key).filter(|m| self.reachable.contains(m)) else {
            self.lookup_master(&key);
            return;
        };
        if let Some(JobKind::Write(request)) = self.jobs.get(&tag).map(|j| &j.kind)
            && request_len(request) > crate::limits::UIDS_PER_CHANGE_MAX
        {
            self.split_job(tag);
            return;
        }
        let Some(job) = self.jobs.get_mut(&tag) else { return };
        match job.kind.clone() {
            JobKind::Write(request) => {
                job.state = JobState::Forwarded { to: master };
                self.send(master, Msg::Request { tag, request });
            }
            JobKind::MasterMove { requester } => {
                let origin = job.origin.clone();
                match origin {
                    Origin::Peer { tag: their_tag, .. } => {
                        // Pass it on with the requester's own tag; the master answers the
                        // requester directly.
                        self.jobs.remove(&tag);
                        self.send(master, Msg::MasterMove { tag: their_tag, key, requester });
                    }
                    _ => {
                        job.state = JobState::Forwarded { to: master };
                        self.moving.insert(key.clone());
                        self.send(master, Msg::MasterMove { tag, key, requester });
                    }
                }
            }
        }
    }

    /// Jobs waiting on `key` try again (a master became known or ready, or was lost).
    pub(crate) fn requeue_jobs_for(&mut self, key: &MasterKey) {
        let tags: Vec<u64> =
            self.jobs.iter().filter(|(_, j)| j.key == *key && j.state == JobState::Queued).map(|(t, _)| *t).collect();
        for tag in tags {
            self.dispatch(tag);
        }
    }

    /// The master we forwarded to is gone: send the same request (same GUID) to the
    /// next master. A master that already has the GUID answers with its UID, so a
    /// resent SAVE never makes a second copy.
    pub(crate) fn requeue_forwarded_to(&mut self, peer: Sid) {
        let tags: Vec<u64> =
            self.jobs.iter().filter(|(_, j)| j.state == JobState::Forwarded { to: peer }).map(|(t, _)| *t).collect();
        for tag in &tags {
            if let Some(job) = self.jobs.get_mut(tag) {
                job.state = JobState::Queued;
                if matches!(job.kind, JobKind::MasterMove { .. }) {
                    let key = job.key.clone();
                    self.moving.remove(&key);
                }
            }
        }
        for tag in tags {
            self.dispatch(tag);
        }
    }

    pub(crate) fn on_peer_request(&mut self, src: Sid, tag: u64, request: WriteRequest) {
        if let Err(reason) = validate(&request) {
            self.send(src, Msg::Reply { tag, master: None, result: fail(FailKind::Permanent, reason), record: None });
            return;
        }
        let key = self.master_key(request.target());
        if !self.mastered.contains_key(&key) && self.master_cache.get(&key) == Some(&src) {
            // The sender thinks we are master and we think it is: ask the root.
            self.master_cache.remove(&key);
        }
        let job = Job {
            origin: Origin::Peer { sid: src, tag },
            kind: JobKind::Write(request),
            key,
            state: JobState::Queued,
            deadline: self.now.plus_us(self.cfg.request_timeout_us),
        };
        self.start_job(job);
    }

    pub(crate) fn on_peer_reply(
        &mut self,
        src: Sid,
        tag: u64,
        master: Option<Sid>,
        result: WriteResult,
        record: Option<MessageRecord>,
    ) {
        let Some(job) = self.jobs.get(&tag) else { return };
        if job.state != (JobState::Forwarded { to: src }) {
            return;
        }
        let key = job.key.clone();
        if let Some(m) = master
            && !self.mastered.contains_key(&key)
        {
            self.master_cache.insert(key, m);
        }
        let Some(job) = self.jobs.remove(&tag) else { return };
        let mut result = result;
        if let (Some(record), JobKind::Write(request)) = (&record, &job.kind) {
            self.keep_acked_binding(src, request, &result, record);
            // If another message holds that UID here (a conflict the master has not
            // settled yet), the client is told the message is stored but not its UID
            // (IMAP lets APPENDUID/COPYUID be left out): never a UID this server shows
            // as another message.
            let held = self
                .db
                .mailboxes
                .get(request.target())
                .is_some_and(|m| m.messages.get(&record.uid).is_some_and(|r| r.guid == record.guid));
            if !held && let WriteResult::Saved { uid, .. } | WriteResult::Copied { uid, .. } = &mut result {
                *uid = 0;
            }
        }
        match job.origin {
            // The client sees the UID only once this server holds the binding durably, so
            // no later change here can show that UID as another message.
            Origin::Client(id) => {
                let write = self.last_write();
                if self.is_durable(write) {
                    self.push_reply(id, ClientReply::Write(result));
                } else {
                    self.pending_reads.push((id, write, ClientReply::Write(result)));
                }
            }
            origin => self.answer(origin, master, result, record),
        }
    }

    /// The master's record of a message we saved or copied, merged here like any change.
    fn keep_acked_binding(&mut self, src: Sid, request: &WriteRequest, result: &WriteResult, record: &MessageRecord) {
        let uidvalidity = match result {
            WriteResult::Saved { uidvalidity, .. } | WriteResult::Copied { uidvalidity, .. } => *uidvalidity,
            _ => return,
        };
        if let WriteRequest::Save { guid, body, .. } = request
            && !self.db.bodies.contains_key(guid)
            && crate::hash::body_checksum(body) == record.checksum
        {
            self.put_intact_body(*guid, record.checksum, body.clone());
            self.write(StoreWrite::PutBody { guid: *guid, checksum: record.checksum, bytes: body.clone() });
        }
        let fragment = MailboxState {
            mailbox: request.target().clone(),
            uidvalidity,
            uidnext: record.uid.saturating_add(1),
            highest_modseq: record.modseq,
            messages: vec![record.clone()],
            tombstones: Vec::new(),
            lifecycle: Default::default(),
        };
        self.merge_foreign(src, &fragment, false);
    }

    /// Answer a job's origin.
    pub(crate) fn answer(
        &mut self,
        origin: Origin,
        master: Option<Sid>,
        result: WriteResult,
        record: Option<MessageRecord>,
    ) {
        match origin {
            Origin::Client(id) => self.push_reply(id, ClientReply::Write(result)),
            Origin::Peer { sid, tag } => self.send(sid, Msg::Reply { tag, master, result, record }),
            Origin::Internal => {}
            Origin::Part { parent } => self.on_part_answer(parent, result),
        }
    }

    /// A STORE or EXPUNGE naming more messages than one forwarded command may carry goes
    /// to the master as several requests; the origin is answered once, when all have.
    fn split_job(&mut self, tag: u64) {
        let Some(job) = self.jobs.get_mut(&tag) else { return };
        let JobKind::Write(request) = &job.kind else { return };
        let parts = split_request(request);
        job.state = JobState::Split { left: parts.len(), result: None };
        let (key, deadline) = (job.key.clone(), job.deadline);
        for part in parts {
            let origin = Origin::Part { parent: tag };
            let child = Job { origin, kind: JobKind::Write(part), key: key.clone(), state: JobState::Queued, deadline };
            self.start_job(child);
        }
    }

    fn on_part_answer(&mut self, parent: u64, result: WriteResult) {
        let Some(job) = self.jobs.get_mut(&parent) else { return };
        let JobState::Split { left, result: joined } = &mut job.state else { return };
        *joined = Some(match joined.take() {
            None => result,
            Some(prev) => join_results(prev, result),
        });
        *left = left.saturating_sub(1);
        if *left > 0 {
            return;
        }
        let Some(job) = self.jobs.remove(&parent) else { return };
        if let JobState::Split { result: Some(result), .. } = job.state {
            self.answer(job.origin, None, result, None);
        }
    }

    pub(crate) fn expire_jobs(&mut self) {
        let now = self.now;
        let expired: Vec<u64> = self.jobs.iter().filter(|(_, j)| j.deadline <= now).map(|(t, _)| *t).collect();
        for tag in expired {
            let Some(job) = self.jobs.remove(&tag) else { continue };
            self.ack_waiters.retain(|_, t| *t != tag);
            self.parts_left.retain(|(t, _), _| *t != tag);
            let reason = match &job.state {
                JobState::Replicating { .. } => {
                    self.marks.hit(Mark::SyncModeTemporaryFailure);
                    "not enough durable copies in time"
                }
                JobState::Queued => "no master reachable in time",
                JobState::Forwarded { .. } => "the master did not answer in time",
                JobState::WaitingBody { .. } => "the message body could not be fetched in time",
                JobState::Split { .. } => "the parts of the request did not finish in time",
            };
            match job.kind {
                JobKind::MasterMove { .. } => {
                    self.moving.remove(&job.key);
                    if let Origin::Client(id) = job.origin {
                        self.push_reply(id, ClientReply::Failed { kind: FailKind::Temporary, reason: reason.into() });
                    }
                    self.requeue_jobs_for(&job.key);
                }
                JobKind::Write(_) => self.answer(job.origin, None, fail(FailKind::Temporary, reason), None),
            }
        }
    }

    /// Finish jobs whose writes are durable and whose replicas have acknowledged.
    pub(crate) fn progress_jobs(&mut self) {
        let done: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| match &j.state {
                JobState::Replicating { write, need, acked, .. } => self.is_durable(*write) && acked.len() >= *need,
                _ => false,
            })
            .map(|(t, _)| *t)
            .collect();
        for tag in done {
            let Some(job) = self.jobs.remove(&tag) else { continue };
            self.ack_waiters.retain(|_, t| *t != tag);
            self.parts_left.retain(|(t, _), _| *t != tag);
            if let JobState::Replicating { mut result, .. } = job.state {
                // The message may have been renumbered (or expunged) while the answer
                // waited for its copies: answer with where it lives now, or no UID.
                let record = match (&mut result, &job.kind) {
                    (
                        WriteResult::Saved { uid, guid, .. } | WriteResult::Copied { uid, guid, .. },
                        JobKind::Write(request),
                    ) => {
                        let now =
                            self.db.mailboxes.get(request.target()).and_then(|m| m.messages.find_guid(*guid)).cloned();
                        *uid = now.as_ref().map(|r| r.uid).unwrap_or(0);
                        now
                    }
                    _ => None,
                };
                self.answer(job.origin, Some(self.cfg.sid), result, record);
            }
        }
    }

    /// Run a job as the master of its key.
    fn execute(&mut self, tag: u64) {
        let Some(job) = self.jobs.get(&tag) else { return };
        match job.kind.clone() {
            JobKind::MasterMove { requester } => {
                let origin = job.origin.clone();
                let key = job.key.clone();
                self.jobs.remove(&tag);
                match origin {
                    Origin::Client(id) => self.push_reply(id, ClientReply::Moved { master: self.cfg.sid }),
                    Origin::Peer { tag: their_tag, .. } => self.give_up_mastership(key, requester, their_tag),
                    Origin::Internal | Origin::Part { .. } => {}
                }
            }
            JobKind::Write(request) => {
                let reachable_peers = self.reachable.len().saturating_sub(1);
                let (result, replicated) = match request {
                    // Sync mode: every acknowledged change must reach `replicas` more
                    // servers, so with fewer reachable the answer is a temporary failure,
                    // before anything changes.
                    _ if self.cfg.durability == Durability::Sync
                        && reachable_peers < usize::from(self.cfg.replicas) =>
                    {
                        self.marks.hit(Mark::SyncModeTemporaryFailure);
                        (fail(FailKind::Temporary, "not enough servers reachable for the required copies"), None)
                    }
                    WriteRequest::Save { mailbox, guid, received, flags, body } => {
                        self.master_save(&mailbox, guid, received, &flags, Some(body), tag)
                    }
                    WriteRequest::Copy { src, guid, dst, received, flags, .. } => {
                        if src == dst {
                            (fail(FailKind::Permanent, "COPY into the source mailbox is not supported"), None)
                        } else if !self.db.bodies.contains_key(&guid) && !self.has_live(&dst, guid) {
                            let from = match self.jobs.get(&tag).map(|j| j.origin.clone()) {
                                Some(Origin::Peer { sid, .. }) => Some(sid),
                                _ => None,
                            };
                            self.want_body(guid, None, from, false);
                            if let Some(job) = self.jobs.get_mut(&tag) {
                                job.state = JobState::WaitingBody { guid };
                            }
                            return;
                        } else {
                            self.master_save(&dst, guid, received, &flags, None, tag)
                        }
                    }
                    WriteRequest::Expunge { mailbox, messages } | WriteRequest::Store { mailbox, messages, .. }
                        if unknown_here(self.db.mailboxes.get(&mailbox), &messages) =>
                    {
                        // Fetch the sender's copy so the next try finds the messages here.
                        if let Some(Origin::Peer { sid, .. }) = self.jobs.get(&tag).map(|j| j.origin.clone()) {
                            let state = self.db.mailboxes.get(&mailbox).map(|m| mailbox::state(&mailbox, m));
                            if let Some(state) = state {
                                self.send_sync(sid, false, state);
                            }
                        }
                        (fail(FailKind::Temporary, "the master does not have that message yet"), None)
                    }
                    WriteRequest::Expunge { mailbox, messages } => self.master_expunge(&mailbox, &messages, tag),
                    WriteRequest::Mailbox { mailbox, action } => self.master_lifecycle(&mailbox, action, tag),
                    store @ WriteRequest::Store { .. } => self.master_store(&store, tag),
                };
                // Sync mode answers a change once `replicas` peers made it durable too:
                // SAVE and COPY (DESIGN.md), and STORE and EXPUNGE as well, so that no
                // acknowledged flag change or expunge dies with one server.
                let need = match (replicated, self.cfg.durability) {
                    (Some(_), Durability::Sync) if !self.has_bug(crate::Bug::AckBeforeReplicaDurable) => {
                        usize::from(self.cfg.replicas)
                    }
                    _ => 0,
                };
                if let WriteResult::Failed { .. } = result {
                    if let Some(job) = self.jobs.remove(&tag) {
                        self.answer(job.origin, Some(self.cfg.sid), result, None);
                    }
                    return;
                }
                let write = self.last_write();
                if let Some(job) = self.jobs.get_mut(&tag) {
                    job.state = JobState::Replicating { write, need, acked: BTreeSet::new(), result };
                }
                self.progress_jobs();
            }
        }
    }

    /// A COPY waiting for a body can go on.
    pub(crate) fn body_arrived(&mut self, guid: Guid) {
        let tags: Vec<u64> =
            self.jobs.iter().filter(|(_, j)| j.state == JobState::WaitingBody { guid }).map(|(t, _)| *t).collect();
        for tag in tags {
            if let Some(job) = self.jobs.get_mut(&tag) {
                job.state = JobState::Queued;
            }
            self.dispatch(tag);
        }
    }

    fn has_live(&self, mailbox: &MailboxKey, guid: Guid) -> bool {
        self.db.mailboxes.get(mailbox).is_some_and(|m| m.messages.has_guid(guid))
    }

    /// SAVE (body given) or COPY (body already here) at the master. Returns the result
    /// and, when a change was replicated, the log positions it went to.
    fn master_save(
        &mut self,
        mailbox: &MailboxKey,
        guid: Guid,
        received: u64,
        flags: &[Flag],
        body: Option<Vec<u8>>,
        tag: u64,
    ) -> (WriteResult, Option<()>) {
        let is_copy = body.is_none();
        let existing = self.db.mailboxes.get(mailbox).and_then(|m| m.messages.find_guid(guid)).map(|r| r.uid);
        if let Some(m) = self.db.mailboxes.get(mailbox)
            && let Some(uid) = existing
        {
            // A resent SAVE: the message is already here, maybe only as a record that a
            // SYNC brought. Sync mode promises the client `replicas` more copies, so the
            // message goes out again, body and all, and the answer waits for their acks.
            let uidvalidity = m.uidvalidity;
            let record = m.messages.get(&uid).cloned();
            let result = if is_copy {
                WriteResult::Copied { uidvalidity, uid, guid }
            } else {
                WriteResult::Saved { uidvalidity, uid, guid }
            };
            if self.cfg.durability != Durability::Sync {
                return (result, None);
            }
            let bytes = match (body, self.db.bodies.get(&guid)) {
                (_, Some(stored)) if crate::hash::body_checksum(&stored.bytes) == stored.checksum => {
                    stored.bytes.clone()
                }
                (Some(bytes), _) => bytes,
                (None, _) => {
                    self.want_body(guid, record.as_ref().map(|r| r.checksum), None, false);
                    return (fail(FailKind::Temporary, "message body not available yet"), None);
                }
            };
            let Some(record) = record else { return (result, None) };
            if crate::hash::body_checksum(&bytes) != record.checksum {
                return (fail(FailKind::Permanent, "the body does not match the stored message"), None);
            }
            self.store_body(guid, record.checksum, bytes.clone(), None);
            let change = Change::Save { mailbox: mailbox.clone(), uidvalidity, record, body: bytes };
            self.replicate(change, Some(tag));
            return (result, Some(()));
        }
        if self.db.mailboxes.get(mailbox).is_some_and(|m| m.tombstones.keys().any(|(_, g)| *g == guid)) {
            return (fail(FailKind::Permanent, "that message was expunged from the mailbox"), None);
        }
        if self.db.mailboxes.get(mailbox).is_some_and(|m| m.uidnext > crate::limits::UID_MAX) {
            return (fail(FailKind::Permanent, "the mailbox has run out of UIDs"), None);
        }
        let (checksum, size) = match (&body, self.db.bodies.get(&guid)) {
            (Some(b), _) => (crate::hash::body_checksum(b), u32::try_from(b.len()).unwrap_or(u32::MAX)),
            (None, Some(stored)) => (stored.checksum, u32::try_from(stored.bytes.len()).unwrap_or(u32::MAX)),
            (None, None) => return (fail(FailKind::Temporary, "message body not available"), None),
        };
        if let Some(bytes) = &body
            && !self.db.bodies.contains_key(&guid)
        {
            self.put_intact_body(guid, checksum, bytes.clone());
            self.write(StoreWrite::PutBody { guid, checksum, bytes: bytes.clone() });
        }
        let me = self.cfg.sid;
        let m = self.mailbox_mut(mailbox);
        let uid = m.uidnext;
        let modseq = m.highest_modseq.saturating_add(1);
        m.uidnext = m.uidnext.saturating_add(1);
        m.highest_modseq = modseq;
        let stamp = Stamp { modseq, sid: me };
        let record = MessageRecord {
            uid,
            guid,
            received,
            size,
            checksum,
            modseq,
            flags: flags.iter().map(|f| (f.clone(), FlagState { present: true, stamp })).collect(),
        };
        m.messages.insert(uid, record.clone());
        let uidvalidity = m.uidvalidity;
        debug_assert!(mailbox::unique_guids(m));
        self.persist_meta(mailbox);
        self.write(StoreWrite::PutMessage { mailbox: mailbox.clone(), record: record.clone() });
        // A replica acks a COPY once its record is durable, body or not. Sync mode counts
        // acks as copies of the message, so there the body travels with it.
        let body = match body {
            Some(body) => Some(body),
            None if self.cfg.durability == Durability::Sync => self.db.bodies.get(&guid).map(|b| b.bytes.clone()),
            None => None,
        };
        let change = match body {
            Some(body) => Change::Save { mailbox: mailbox.clone(), uidvalidity, record, body },
            None => Change::Copy { mailbox: mailbox.clone(), uidvalidity, record },
        };
        self.replicate(change, Some(tag));
        let result = if is_copy {
            WriteResult::Copied { uidvalidity, uid, guid }
        } else {
            WriteResult::Saved { uidvalidity, uid, guid }
        };
        (result, Some(()))
    }

    fn master_expunge(
        &mut self,
        mailbox: &MailboxKey,
        messages: &[(Uid, Guid)],
        tag: u64,
    ) -> (WriteResult, Option<()>) {
        let Some(m) = self.db.mailboxes.get_mut(mailbox) else {
            return (fail(FailKind::Permanent, format!("no mailbox {mailbox}")), None);
        };
        let modseq = m.highest_modseq.saturating_add(1);
        let mut tombstones = Vec::new();
        let uids = master_uids(m, messages);
        for (_, uid) in &uids {
            if let Some(r) = m.messages.remove(uid) {
                let t = Tombstone { uid: r.uid, guid: r.guid, modseq, expunged: true };
                m.tombstones.insert((t.uid, t.guid), t);
                tombstones.push(t);
            }
        }
        if tombstones.is_empty() {
            return (WriteResult::Expunged { uids: Vec::new(), modseq: m.highest_modseq }, None);
        }
        m.highest_modseq = modseq;
        let uidvalidity = m.uidvalidity;
        for t in &tombstones {
            self.write(StoreWrite::PutTombstone { mailbox: mailbox.clone(), tombstone: *t });
            self.write(StoreWrite::RemoveMessage { mailbox: mailbox.clone(), uid: t.uid });
        }
        self.persist_meta(mailbox);
        let gone: BTreeSet<Uid> = tombstones.iter().map(|t| t.uid).collect();
        let uids = uids.iter().filter(|(_, ours)| gone.contains(ours)).map(|(theirs, _)| *theirs).collect();
        self.replicate(Change::Expunge { mailbox: mailbox.clone(), uidvalidity, tombstones }, Some(tag));
        (WriteResult::Expunged { uids, modseq }, Some(()))
    }

    /// CREATE and DELETE at the master: one change at one new modseq, replicated as a
    /// piece of mailbox state (DELETE's tombstones with it).
    fn master_lifecycle(&mut self, mailbox: &MailboxKey, action: MailboxAction, tag: u64) -> (WriteResult, Option<()>) {
        let visible = self.db.mailboxes.get(mailbox).is_some_and(|m| m.visible());
        match action {
            MailboxAction::Create if visible => {
                return (fail(FailKind::Permanent, format!("mailbox {mailbox} exists")), None);
            }
            MailboxAction::Delete if !visible => {
                return (fail(FailKind::Permanent, format!("no mailbox {mailbox}")), None);
            }
            MailboxAction::Delete if mailbox.name == "INBOX" => {
                return (fail(FailKind::Permanent, "INBOX cannot be deleted"), None);
            }
            _ => {}
        }
        let m = self.mailbox_mut(mailbox);
        let modseq = m.highest_modseq.saturating_add(1);
        let mut tombstones = Vec::new();
        match action {
            MailboxAction::Create => m.lifecycle.created_at = modseq,
            MailboxAction::Delete => {
                for r in std::mem::take(&mut m.messages).into_values() {
                    let t = Tombstone { uid: r.uid, guid: r.guid, modseq, expunged: true };
                    m.tombstones.insert((t.uid, t.guid), t);
                    tombstones.push(t);
                }
                m.lifecycle.deleted_at = modseq;
            }
        }
        m.highest_modseq = modseq;
        debug_assert_eq!(m.visible(), action == MailboxAction::Create);
        let state = MailboxState {
            mailbox: mailbox.clone(),
            uidvalidity: m.uidvalidity,
            uidnext: m.uidnext,
            highest_modseq: modseq,
            messages: Vec::new(),
            tombstones,
            lifecycle: m.lifecycle,
        };
        for t in &state.tombstones {
            self.write(StoreWrite::PutTombstone { mailbox: mailbox.clone(), tombstone: *t });
            self.write(StoreWrite::RemoveMessage { mailbox: mailbox.clone(), uid: t.uid });
        }
        self.persist_meta(mailbox);
        self.write(StoreWrite::MailboxLifecycle { mailbox: mailbox.clone(), lifecycle: state.lifecycle });
        self.replicate(Change::Merge { state }, Some(tag));
        (WriteResult::MailboxDone { modseq }, Some(()))
    }

    fn master_store(&mut self, request: &WriteRequest, tag: u64) -> (WriteResult, Option<()>) {
        let WriteRequest::Store { mailbox, messages, add, remove, unchanged_since, known_modseq } = request else {
            return (fail(FailKind::Permanent, "not a STORE"), None);
        };
        let (unchanged_since, known_modseq) = (*unchanged_since, *known_modseq);
        let me = self.cfg.sid;
        let Some(m) = self.db.mailboxes.get_mut(mailbox) else {
            return (fail(FailKind::Permanent, format!("no mailbox {mailbox}")), None);
        };
        let modseq = m.highest_modseq.saturating_add(1);
        let stamp = Stamp { modseq, sid: me };
        let targets = master_uids(m, messages);
        let too_many = targets.iter().filter_map(|(_, ours)| m.messages.get(ours)).any(|r| {
            let new = add.iter().chain(remove).filter(|f| !r.flags.contains_key(*f)).collect::<BTreeSet<_>>();
            r.flags.len() + new.len() > crate::limits::FLAGS_PER_MESSAGE_MAX
        });
        if too_many {
            let limit = crate::limits::FLAGS_PER_MESSAGE_MAX;
            return (fail(FailKind::Permanent, format!("a message would carry more than {limit} flags")), None);
        }
        let mut rejected = Vec::new();
        let mut current = Vec::new();
        let mut changed = Vec::new();
        for (uid, ours) in targets {
            let Some(r) = m.messages.get_mut(&ours) else { continue };
            if unchanged_since.is_some_and(|since| r.modseq > since) {
                rejected.push(uid);
                current.push(CurrentFlags { uid, flags: r.present_flags(), modseq: r.modseq });
                continue;
            }
            if r.modseq > known_modseq {
                current.push(CurrentFlags { uid, flags: r.present_flags(), modseq: r.modseq });
            }
            for f in add {
                r.flags.insert(f.clone(), FlagState { present: true, stamp });
            }
            for f in remove {
                if !add.contains(f) {
                    r.flags.insert(f.clone(), FlagState { present: false, stamp });
                }
            }
            r.modseq = modseq;
            changed.push(r.clone());
        }
        if !rejected.is_empty() {
            self.marks.hit(Mark::CondstoreRejected);
        }
        if !current.is_empty() && rejected.is_empty() {
            self.marks.hit(Mark::StaleStoreCorrected);
        }
        if changed.is_empty() {
            let hms = m.highest_modseq;
            return (WriteResult::Stored { modseq: hms, rejected, current }, None);
        }
        m.highest_modseq = modseq;
        let uidvalidity = m.uidvalidity;
        let messages = changed.iter().map(|r| (r.uid, r.guid)).collect();
        for record in changed {
            self.write(StoreWrite::PutMessage { mailbox: mailbox.clone(), record });
        }
        self.persist_meta(mailbox);
        let remove_only: Vec<Flag> = remove.iter().filter(|f| !add.contains(f)).cloned().collect();
        self.replicate(
            Change::Store {
                mailbox: mailbox.clone(),
                uidvalidity,
                stamp,
                messages,
                add: add.to_vec(),
                remove: remove_only,
            },
            Some(tag),
        );
        (WriteResult::Stored { modseq, rejected, current }, Some(()))
    }

    pub(crate) fn persist_meta(&mut self, mailbox: &MailboxKey) {
        if let Some(m) = self.db.mailboxes.get(mailbox) {
            let write = StoreWrite::MailboxMeta {
                mailbox: mailbox.clone(),
                uidvalidity: m.uidvalidity,
                uidnext: m.uidnext,
                highest_modseq: m.highest_modseq,
            };
            self.write(write);
        }
    }

    /// MASTER-MOVE reached a server.
    pub(crate) fn on_master_move(&mut self, src: Sid, tag: u64, key: MasterKey, requester: Sid) {
        if self.mastered.get(&key).is_some_and(|m| m.catchup.is_none()) {
            self.give_up_mastership(key, requester, tag);
            return;
        }
        let _ = src;
        let job = Job {
            origin: Origin::Peer { sid: requester, tag },
            kind: JobKind::MasterMove { requester },
            key,
            state: JobState::Queued,
            deadline: self.now.plus_us(self.cfg.request_timeout_us),
        };
        self.start_job(job);
    }

    fn give_up_mastership(&mut self, key: MasterKey, requester: Sid, tag: u64) {
        if requester == self.cfg.sid {
            return;
        }
        self.marks.hit(Mark::MasterMoved);
        self.note(|| format!("gives {key} up to {requester}"));
        let in_flight = self.jobs.values().any(|j| j.key == key && matches!(j.state, JobState::Replicating { .. }));
        if in_flight {
            self.marks.hit(Mark::MasterMovedMidSave);
        }
        let generation = self.mastered.remove(&key).map(|m| m.generation).unwrap_or(0).saturating_add(1);
        self.master_cache.insert(key.clone(), requester);
        self.cache_generation.insert(key.clone(), generation);
        let states: Vec<MailboxState> =
            self.db.mailboxes.iter().filter(|(k, _)| key.covers(k)).map(|(k, m)| mailbox::state(k, m)).collect();
        let epoch = self.term.epoch;
        if self.is_root() {
            self.root_state.table.insert(key.clone(), requester);
            self.root_state.generations.insert(key.clone(), generation);
        } else if let Some(root) = self.term.root {
            self.send(root, Msg::MasterIs { epoch, key: key.clone(), master: requester, generation });
        }
        self.handoffs.insert(key.clone(), super::Handoff { requester, tag, epoch, generation, states: states.clone() });
        self.send_move_done(requester, tag, key.clone(), epoch, generation, states);
        self.requeue_jobs_for(&key);
    }

    pub(crate) fn on_move_done(
        &mut self,
        tag: u64,
        key: MasterKey,
        epoch: u64,
        generation: u64,
        states: Vec<MailboxState>,
    ) {
        // The old master has given the key up whether or not our request is still
        // waiting (it may have timed out): in this term we take it, or nobody has it.
        let job = match self.jobs.get(&tag) {
            Some(j) if j.key == key && matches!(j.kind, JobKind::MasterMove { .. }) => self.jobs.remove(&tag),
            _ => None,
        };
        self.moving.remove(&key);
        if epoch != self.term.epoch || self.mastered.contains_key(&key) {
            if let Some(Origin::Client(id)) = job.map(|j| j.origin) {
                self.push_reply(
                    id,
                    ClientReply::Failed {
                        kind: FailKind::Temporary,
                        reason: "the root changed during the move".into(),
                    },
                );
            }
            self.requeue_jobs_for(&key);
            return;
        }
        if self.cache_generation.get(&key).is_some_and(|g| *g > generation) {
            // A later move already happened elsewhere.
            self.requeue_jobs_for(&key);
            return;
        }
        self.become_master(key.clone(), Some(states), generation);
        // Everyone (the root too) learns the new master at once instead of through stale
        // forwards; the generation makes a late announcement harmless.
        let peers: Vec<Sid> = self.reachable.iter().copied().filter(|s| *s != self.cfg.sid).collect();
        for peer in peers {
            self.send(peer, Msg::MasterIs { epoch, key: key.clone(), master: self.cfg.sid, generation });
        }
        if let Some(Origin::Client(id)) = job.map(|j| j.origin) {
            self.push_reply(id, ClientReply::Moved { master: self.cfg.sid });
        }
        self.requeue_jobs_for(&key);
    }

    /// Take mastership of `key`: from a MASTER-MOVE (the old master's states, ready at
    /// once) or from the root (catch up with every reachable server first).
    pub(crate) fn become_master(&mut self, key: MasterKey, moved_states: Option<Vec<MailboxState>>, generation: u64) {
        self.master_cache.remove(&key);
        // News of an older master of this key must not unseat us.
        let known = self.cache_generation.get(&key).copied().unwrap_or(0);
        self.cache_generation.insert(key.clone(), known.max(generation));
        if self.is_root() && generation >= self.root_state.generations.get(&key).copied().unwrap_or(0) {
            self.root_state.table.insert(key.clone(), self.cfg.sid);
            self.root_state.generations.insert(key.clone(), generation);
        }
        let how = if moved_states.is_some() { "by MASTER-MOVE" } else { "from the root" };
        self.note(|| format!("becomes master of {key} {how}"));
        if let Some(states) = moved_states {
            self.mastered.insert(key.clone(), Mastership { catchup: None, generation });
            for state in states {
                self.merge_foreign(self.cfg.sid, &state, false);
            }
            return;
        }
        if self.mastered.contains_key(&key) {
            return;
        }
        let tag = self.new_tag();
        let peers: BTreeSet<Sid> = self.reachable.iter().copied().filter(|s| *s != self.cfg.sid).collect();
        for &peer in &peers {
            self.send(peer, Msg::MboxRequest { tag, key: key.clone() });
        }
        let catchup = super::Catchup {
            tag,
            waiting_mbox: peers,
            waiting_sync: BTreeSet::new(),
            deadline: self.now.plus_us(self.cfg.request_timeout_us / 2),
        };
        self.mastered.insert(key.clone(), Mastership { catchup: Some(catchup), generation });
        self.finish_catchups();
    }

    /// Catch-ups that have heard from everyone (or ran out of time) make their master ready.
    pub(crate) fn finish_catchups(&mut self) {
        let now = self.now;
        let ready: Vec<MasterKey> = self
            .mastered
            .iter()
            .filter(|(_, m)| {
                m.catchup
                    .as_ref()
                    .is_some_and(|c| (c.waiting_mbox.is_empty() && c.waiting_sync.is_empty()) || c.deadline <= now)
            })
            .map(|(k, _)| k.clone())
            .collect();
        if !ready.is_empty() {
            self.anti_entropy_kick = true;
        }
        for key in ready {
            if let Some(m) = self.mastered.get_mut(&key) {
                m.catchup = None;
            }
            self.requeue_jobs_for(&key);
        }
    }
}

/// (sender's UID, our UID) of each message the sender named, found by GUID.
/// Each message named once, however often the request repeats it.
fn master_uids(m: &crate::store::StoredMailbox, messages: &[(Uid, Guid)]) -> Vec<(Uid, Uid)> {
    let mut seen = BTreeSet::new();
    messages
        .iter()
        .filter_map(|(theirs, guid)| match m.messages.get(theirs) {
            Some(r) if r.guid == *guid => Some((*theirs, *theirs)),
            _ => m.messages.find_guid(*guid).map(|r| (*theirs, r.uid)),
        })
        .filter(|(_, ours)| seen.insert(*ours))
        .collect()
}

/// Messages named by a request that the master has neither live nor expunged: its copy
/// lags the sender's, so it cannot order a change to them yet. A binding retired by a
/// renumbering does not count: the message lives on at a UID the master has not seen.
fn unknown_here(m: Option<&crate::store::StoredMailbox>, messages: &[(Uid, Guid)]) -> bool {
    let Some(m) = m else { return !messages.is_empty() };
    messages
        .iter()
        .any(|(_, guid)| !m.messages.has_guid(*guid) && !m.tombstones.values().any(|t| t.guid == *guid && t.expunged))
}

/// Checks a write before it is routed anywhere (see [`crate::limits`]).
fn validate(request: &WriteRequest) -> Result<(), String> {
    crate::limits::check_request(request)
}

/// How many messages a request names.
fn request_len(request: &WriteRequest) -> usize {
    match request {
        WriteRequest::Expunge { messages, .. } | WriteRequest::Store { messages, .. } => messages.len(),
        _ => 1,
    }
}

/// A STORE or EXPUNGE cut into requests of at most `limits::UIDS_PER_CHANGE_MAX`
/// messages, each message named once.
fn split_request(request: &WriteRequest) -> Vec<WriteRequest> {
    let once = |messages: &[(Uid, Guid)]| {
        let mut seen = BTreeSet::new();
        messages.iter().copied().filter(|m| seen.insert(*m)).collect::<Vec<_>>()
    };
    let n = crate::limits::UIDS_PER_CHANGE_MAX;
    match request {
        WriteRequest::Expunge { mailbox, messages } => once(messages)
            .chunks(n)
            .map(|c| WriteRequest::Expunge { mailbox: mailbox.clone(), messages: c.to_vec() })
            .collect(),
        WriteRequest::Store { mailbox, messages, add, remove, unchanged_since, known_modseq } => once(messages)
            .chunks(n)
            .map(|c| WriteRequest::Store {
                mailbox: mailbox.clone(),
                messages: c.to_vec(),
                add: add.clone(),
                remove: remove.clone(),
                unchanged_since: *unchanged_since,
                known_modseq: *known_modseq,
            })
            .collect(),
        other => vec![other.clone()],
    }
}

/// The answer to a request sent in parts: a failure if any part failed (a temporary one
/// first: the client tries again, and STORE and EXPUNGE are idempotent), else the
/// parts' results joined, at the highest modseq.
fn join_results(a: WriteResult, b: WriteResult) -> WriteResult {
    use WriteResult::*;
    match (a, b) {
        (f @ Failed { kind: FailKind::Temporary, .. }, _) | (_, f @ Failed { kind: FailKind::Temporary, .. }) => f,
        (f @ Failed { .. }, _) | (_, f @ Failed { .. }) => f,
        (
            Stored { modseq: m1, rejected: mut r1, current: mut c1 },
            Stored { modseq: m2, rejected: r2, current: c2 },
        ) => {
            r1.extend(r2);
            c1.extend(c2);
            Stored { modseq: m1.max(m2), rejected: r1, current: c1 }
        }
        (Expunged { uids: mut u1, modseq: m1 }, Expunged { uids: u2, modseq: m2 }) => {
            u1.extend(u2);
            Expunged { uids: u1, modseq: m1.max(m2) }
        }
        (a, _) => a,
    }
}
