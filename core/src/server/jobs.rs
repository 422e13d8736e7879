//! Requests in progress: client writes, writes forwarded by peers, MASTER-MOVE. A write
//! goes to the mailbox master (directly, through the master cache, or after asking the
//! root), and its client is answered only after the writes it depends on are durable
//! and, for SAVE/COPY in sync mode, `replicas` peers have made the change durable too.

use super::fresh_reads::Wanted;
use super::{Mastership, Server};
use crate::io::*;
use crate::mailbox;
use crate::marks::Mark;
use crate::msg::*;
use crate::store::StoreWrite;
use crate::types::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A job's number: unique on this server across restarts. Messages about a job carry
/// it as their wire tag, so an answer names the job it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub u64);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    Client(RequestId),
    /// A peer forwarded this to us; the answer names the peer's job.
    Peer {
        sid: Sid,
        job: JobId,
    },
    /// The server itself: a message file found in the store (a SAVE), or a census that
    /// found a body on no server (an EXPUNGE, which is therefore a loss: see
    /// `Tombstone::lost`).
    Internal,
    /// A part of a request too large to forward as one command (see `split_job`).
    Part {
        parent: JobId,
    },
    /// A client's fresh read of `mailbox`, whose BARRIER this is, to be answered by
    /// `deadline` (see `fresh_reads`).
    Read {
        id: RequestId,
        mailbox: MailboxKey,
        wanted: Wanted,
        deadline: Instant,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    Write(WriteRequest),
    /// Move mastership of the key to `requester`.
    MasterMove {
        requester: Sid,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
        /// The peers that made the change durable, each with the store identity its
        /// acknowledgement carried: a copy counts only while the peer has that store.
        acked: BTreeMap<Sid, u64>,
        result: WriteResult,
    },
    /// A COPY at the master, waiting for the body.
    WaitingBody {
        guid: Guid,
    },
    /// A RENAME at the master of the lesser of its two names' keys, waiting to master
    /// the greater too (see `Server::rename_waits_for_target`).
    WaitingMaster {
        key: MasterKey,
    },
    /// Forwarded in parts (jobs whose origin is `Origin::Part` of this one): `left`
    /// parts have not answered; `result` joins the answers so far.
    Split {
        left: usize,
        result: Option<WriteResult>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub origin: Origin,
    pub kind: JobKind,
    pub key: MasterKey,
    pub state: JobState,
    pub deadline: Instant,
}

/// A write the master ordered: its result, and whether it replicated a change (whose
/// copies the answer may wait for).
struct Ordered {
    result: WriteResult,
    replicated: bool,
}

impl Ordered {
    fn replicated(result: WriteResult) -> Ordered {
        Ordered { result, replicated: true }
    }
    fn unreplicated(result: WriteResult) -> Ordered {
        Ordered { result, replicated: false }
    }
}

/// The answer to a SAVE (or a COPY) that put `guid` at `uid`.
fn saved(is_copy: bool, uidvalidity: u32, uid: Uid, guid: Guid) -> WriteResult {
    if is_copy { WriteResult::Copied { uidvalidity, uid, guid } } else { WriteResult::Saved { uidvalidity, uid, guid } }
}

/// Rounds of `answer_fresh_reads` in one input (reads asked again of a master here).
const FRESH_READ_ROUNDS_MAX: usize = 4;

/// Live messages with one body a retried SAVE compares its bytes with at most: more
/// are the same message saved on purpose again and again, and the retry is one more.
const RETRY_CANDIDATES_MAX: usize = 8;

/// Times one message can be copied back into a mailbox where it was expunged while the
/// expunges are remembered there (each time a new GUID, found by walking the chain).
const COPY_BACK_GENERATIONS_MAX: usize = 16;

fn fail(kind: FailKind, reason: impl Into<String>) -> WriteResult {
    WriteResult::Failed { kind, reason: reason.into() }
}

impl Server {
    pub(crate) fn on_client(&mut self, id: RequestId, request: ClientRequest) {
        let wanted = if matches!(request, ClientRequest::FreshStatus { .. }) { Wanted::Status } else { Wanted::View };
        let is_read = matches!(
            request,
            ClientRequest::Read { .. }
                | ClientRequest::FreshRead { .. }
                | ClientRequest::FreshStatus { .. }
                | ClientRequest::ReplicaList { .. }
                | ClientRequest::ReplicaPull { .. }
                | ClientRequest::ReplicaBodies { .. }
                | ClientRequest::ReplicaTextParts { .. }
                | ClientRequest::ReadTextParts { .. }
                | ClientRequest::FetchBody { .. }
        );
        if !is_read && matches!(self.startup, super::StartupHold::Until(_)) {
            self.marks.hit(Mark::WriteAtStart);
        }
        if self.retired() && !is_read {
            let reason = "this server is retired from the cluster: connect to another".to_string();
            self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason });
            return;
        }
        let write = match request {
            ClientRequest::Membership { change } => {
                self.on_member_change(id, change);
                return;
            }
            ClientRequest::Read { mailbox } => {
                // A client is shown only what is durable, so a crash can never make this
                // server show a UID bound to another message later; the durable view is
                // answered at once, so reads go on while the disk cannot take writes.
                let reply = self.read_view(&mailbox);
                self.out.reply(id, reply);
                return;
            }
            ClientRequest::FreshRead { mailbox } | ClientRequest::FreshStatus { mailbox } => {
                if let Err(reason) = crate::limits::check_mailbox(&mailbox) {
                    self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason });
                    return;
                }
                let key = self.master_key(&mailbox);
                let deadline = self.now.plus_us(self.cfg.fresh_read_us);
                if self.has_bug(crate::Bug::FreshReadWithoutBarrier) {
                    self.marks.hit(Mark::FreshReadCaughtUp);
                    let reply = self.fresh_view(&mailbox, wanted, true);
                    self.out.reply(id, reply);
                    return;
                }
                if self.retired() {
                    // Out of the cluster: what is here, with no promise.
                    let reply = self.fresh_view(&mailbox, wanted, false);
                    self.out.reply(id, reply);
                    return;
                }
                if self.masters.masters_ready(&key) || self.member_servers.len() <= 1 {
                    // Every change the master ordered is in its own copy, but maybe not
                    // yet durable (a mastership just taken over merges states): the read
                    // waits for that, and is answered at the end of this input if it is.
                    let position = self.position_of(&mailbox);
                    self.fresh_reads.wait(id, mailbox, wanted, position, deadline);
                    return;
                }
                let job = Job {
                    origin: Origin::Read { id, mailbox: mailbox.clone(), wanted, deadline },
                    kind: JobKind::Write(WriteRequest::Barrier { mailbox }),
                    key,
                    state: JobState::Queued,
                    deadline,
                };
                self.start_job(job);
                return;
            }
            ClientRequest::MasterMove { mailbox } => {
                if !self.members.is_active(self.cfg.sid) {
                    let reason = "a server leaving the cluster masters nothing".to_string();
                    self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason });
                    return;
                }
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
            ClientRequest::Save { mailbox, received, flags, body, delivery } => {
                let guid = self.new_guid();
                WriteRequest::Save { mailbox, guid, received, flags, body, delivery }
            }
            ClientRequest::Import { mailbox, uidvalidity, uid, received, flags, body } => {
                let guid = self.new_guid();
                WriteRequest::Import { mailbox, guid, received, flags, body, uidvalidity, uid }
            }
            ClientRequest::ImportMailbox { mailbox, uidvalidity } => {
                WriteRequest::Mailbox { mailbox, action: MailboxAction::CreateWithValidity(uidvalidity) }
            }
            ClientRequest::Copy { src, src_uid, dst } => {
                let Some(record) = self.image.mailbox(&src).and_then(|m| m.messages.get(&src_uid)) else {
                    self.out.reply(
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
                    .image
                    .mailbox(&mailbox)
                    .map(|m| uids.iter().filter_map(|u| m.messages.get(u)).map(|r| r.modseq).max().unwrap_or(0))
                    .unwrap_or(0);
                WriteRequest::Store { mailbox, messages, add, remove, unchanged_since, known_modseq }
            }
            ClientRequest::CreateMailbox { mailbox, special_use } if special_use.is_empty() => {
                WriteRequest::Mailbox { mailbox, action: MailboxAction::Create }
            }
            ClientRequest::CreateMailbox { mailbox, special_use } => {
                WriteRequest::Mailbox { mailbox, action: MailboxAction::CreateWithUse(special_use) }
            }
            ClientRequest::DeleteMailbox { mailbox } => {
                WriteRequest::Mailbox { mailbox, action: MailboxAction::Delete }
            }
            ClientRequest::Subscription { mailbox, subscribe } => {
                let action = if subscribe { MailboxAction::Subscribe } else { MailboxAction::Unsubscribe };
                WriteRequest::Mailbox { mailbox, action }
            }
            ClientRequest::RenameMailbox { from, to } => WriteRequest::Rename { from, to },
            ClientRequest::ReplicaList { user, partial } => {
                self.on_replica_list(id, &user, partial.as_ref());
                return;
            }
            ClientRequest::ReplicaPull { mailbox, since, partial } => {
                self.on_replica_pull(id, &mailbox, since, partial.as_ref());
                return;
            }
            ClientRequest::ReplicaKeepBodies { mailbox, bodies } => {
                self.on_replica_keep_bodies(id, &mailbox, bodies);
                return;
            }
            ClientRequest::FetchBody { mailbox, uid } => {
                self.on_fetch_body(id, &mailbox, uid);
                return;
            }
            ClientRequest::ReplicaBodies { mailbox, guids } => {
                self.on_replica_bodies(id, &mailbox, &guids);
                return;
            }
            ClientRequest::ReplicaTextParts { mailbox, guids } => {
                // A partial cluster server fetches the bodies it has neither whole nor cut.
                if !self.wait_for_omitted_bodies(id, &mailbox, &guids, true) {
                    self.answer_text_parts(id, &mailbox, &guids);
                }
                return;
            }
            ClientRequest::ReplicaKeepTextParts { mailbox, parts } => {
                self.on_replica_keep_text_parts(id, &mailbox, parts);
                return;
            }
            ClientRequest::ReadTextParts { guids } => {
                let parts = self.text_parts_held(&guids);
                self.out.reply(id, ClientReply::TextParts { parts });
                return;
            }
            ClientRequest::ReplicaAdopt { state, bodies, pushed_upto, from_cluster } => {
                self.on_replica_adopt(id, &state, bodies, (pushed_upto, &from_cluster));
                return;
            }
            ClientRequest::ReplicaPush { state, bodies, from_cluster } => {
                WriteRequest::Merge { state: Box::new(state), bodies, from_cluster }
            }
        };
        if let Err(reason) = validate(&write) {
            self.out.reply(id, ClientReply::Write(fail(FailKind::Permanent, reason)));
            return;
        }
        self.submit_write(Origin::Client(id), write);
    }

    pub(crate) fn submit_write(&mut self, origin: Origin, request: WriteRequest) {
        self.submit_write_within(origin, request, self.cfg.request_timeout_us);
    }

    /// `submit_write` with a deadline `within_us` from now.
    pub(crate) fn submit_write_within(&mut self, origin: Origin, request: WriteRequest, within_us: u64) {
        let key = self.job_key(&request);
        let job = Job {
            origin,
            kind: JobKind::Write(request),
            key,
            state: JobState::Queued,
            deadline: self.now.plus_us(within_us),
        };
        self.start_job(job);
    }

    fn start_job(&mut self, job: Job) {
        if self.jobs.len() >= self.cfg.pending_max {
            self.answer(job.origin, None, fail(FailKind::Temporary, "server busy"), None);
            return;
        }
        let id = self.jobs.insert(job);
        self.dispatch(id);
    }

    /// The messages a client means by these UIDs here (UIDs we do not hold are dropped).
    /// The messages a STORE or EXPUNGE of `uids` names, by (UID, GUID) as our copy
    /// binds them. A UID our copy has no trace of (no message, no tombstone, not
    /// retired, or at or above its UIDNEXT) is one the cluster gave out that this copy
    /// has not heard of yet (a restarted or cut-off server that has not caught up, or one
    /// filling a lost disk, asked by a client that learnt the UID from another server):
    /// it goes as [`Guid::UNRESOLVED`], for the master to find in its copy. Left out, the
    /// request was answered OK having done nothing (a soak of real nodes: STOREs through
    /// a just-restarted node and through one that had lost its disk, acknowledged and
    /// lost). A UID gone here (expunged, renumbered, collected) leaves a trace and is
    /// left out; a client's session names only UIDs it was shown here.
    fn resolve_uids(&self, mailbox: &MailboxKey, uids: &[Uid]) -> Vec<(Uid, Guid)> {
        let Some(m) = self.image.mailbox(mailbox) else {
            return uids.iter().map(|u| (*u, Guid::UNRESOLVED)).collect();
        };
        let no_trace =
            |uid: Uid| uid >= m.uidnext || (!m.retired.contains(uid) && m.tombstones_at(uid).next().is_none());
        uids.iter()
            .filter_map(|&uid| match m.messages.get(&uid) {
                Some(r) => Some((uid, r.guid)),
                None if no_trace(uid) => Some((uid, Guid::UNRESOLVED)),
                None => None,
            })
            .collect()
    }

    /// What a client is shown of a mailbox: what is durable.
    pub(crate) fn read_view(&self, mailbox: &MailboxKey) -> ClientReply {
        match self.image.durable_mailbox(mailbox).filter(|m| m.visible()) {
            Some(m) => ClientReply::Read(mailbox_view(mailbox, &m)),
            None => ClientReply::Failed { kind: FailKind::Permanent, reason: format!("no mailbox {mailbox}") },
        }
    }

    /// Send the job where it must go next, or run it if we are its master.
    pub(crate) fn dispatch(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(id) else { return };
        if job.state != JobState::Queued {
            return;
        }
        let key = job.key.clone();
        let is_move_job = matches!(job.kind, JobKind::MasterMove { .. });
        if self.masters.masters(&key) {
            if self.masters.masters_ready(&key) {
                self.execute(id);
            }
            return;
        }
        if self.masters.is_moving(&key) && !is_move_job {
            return;
        }
        // Every writer of the cache leaves us out of it (we know whether we master a
        // key): a cache naming us would forward to ourselves (explore seed 50572).
        debug_assert_ne!(self.masters.cached(&key), Some(self.cfg.sid), "the master cache names us for {key}");
        let Some(master) = self.masters.cached(&key).filter(|m| self.routing.is_reachable(*m)) else {
            self.lookup_master(&key);
            return;
        };
        if let Some(JobKind::Write(request)) = self.jobs.get(id).map(|j| &j.kind)
            && request_len(request) > crate::limits::UIDS_PER_CHANGE_MAX
        {
            self.split_job(id);
            return;
        }
        let Some(job) = self.jobs.get(id) else { return };
        match job.kind.clone() {
            JobKind::Write(request) => {
                self.jobs.set_state(id, JobState::Forwarded { to: master });
                self.send(master, Msg::Request { tag: id.0, request });
            }
            JobKind::MasterMove { requester } => {
                let origin = job.origin.clone();
                match origin {
                    Origin::Peer { job: their_job, .. } => {
                        // Pass it on with the requester's job; the master answers the
                        // requester directly.
                        self.jobs.remove(id);
                        self.send(master, Msg::MasterMove { tag: their_job.0, key, requester });
                    }
                    _ => {
                        self.jobs.set_state(id, JobState::Forwarded { to: master });
                        self.masters.set_moving(key.clone());
                        self.send(master, Msg::MasterMove { tag: id.0, key, requester });
                    }
                }
            }
        }
    }

    /// Jobs waiting on `key` try again (a master became known or ready, or was lost).
    pub(crate) fn requeue_jobs_for(&mut self, key: &MasterKey) {
        for id in self.jobs.master_known(key) {
            self.dispatch(id);
        }
        for id in self.jobs.queued_for(key) {
            self.dispatch(id);
        }
    }

    /// The master we forwarded to is gone: send the same request (same GUID) to the
    /// next master. A master that already has the GUID answers with its UID, so a
    /// resent SAVE never makes a second copy.
    pub(crate) fn requeue_forwarded_to(&mut self, peer: Sid) {
        let (ids, moves) = self.jobs.requeue_forwarded_to(peer);
        for key in moves {
            self.masters.done_moving(&key);
        }
        for id in ids {
            self.dispatch(id);
        }
    }

    pub(crate) fn on_peer_request(&mut self, src: Sid, id: JobId, request: WriteRequest) {
        if let Err(reason) = validate(&request) {
            self.send(
                src,
                Msg::Reply { tag: id.0, master: None, result: fail(FailKind::Permanent, reason), record: None },
            );
            return;
        }
        let key = self.job_key(&request);
        if !self.masters.masters(&key) && self.masters.cached(&key) == Some(src) {
            // The sender thinks we are master and we think it is: ask the root.
            self.masters.forget(&key);
        }
        let job = Job {
            origin: Origin::Peer { sid: src, job: id },
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
        id: JobId,
        master: Option<Sid>,
        result: WriteResult,
        record: Option<MessageRecord>,
    ) {
        let Some(job) = self.jobs.get(id) else { return };
        if job.state != (JobState::Forwarded { to: src }) {
            return;
        }
        let key = job.key.clone();
        // A reply names the master that ordered the write, which may since have given the
        // key up: never take it for ourselves (we know whether we master the key), or
        // we would forward to ourselves, and no one would answer (explore seed 50572).
        if let Some(m) = master
            && !self.masters.masters(&key)
            && m != self.cfg.sid
        {
            self.masters.remember(key, m);
        }
        let Some(job) = self.jobs.remove(id) else { return };
        let mut result = result;
        if let (Some(record), JobKind::Write(request)) = (&record, &job.kind) {
            self.keep_acked_binding(src, request, &result, record);
            // If another message holds that UID here (a conflict the master has not
            // settled yet), the client is told the message is stored but not its UID
            // (IMAP lets APPENDUID/COPYUID be left out): never a UID this server shows
            // as another message.
            let held = self
                .image
                .mailbox(request.target())
                .is_some_and(|m| m.messages.get(&record.uid).is_some_and(|r| r.guid == record.guid));
            if !held && let WriteResult::Saved { uid, .. } | WriteResult::Copied { uid, .. } = &mut result {
                *uid = 0;
            }
        }
        match job.origin {
            // The client sees the UID only once this server holds the binding durably, so
            // no later change here can show that UID as another message.
            Origin::Client(id) => self.out.reply_when_durable(id, ClientReply::Write(result)),
            origin => self.answer(origin, master, result, record),
        }
    }

    /// The master's record of a message we saved or copied, merged here like any change.
    fn keep_acked_binding(&mut self, src: Sid, request: &WriteRequest, result: &WriteResult, record: &MessageRecord) {
        let uidvalidity = match result {
            WriteResult::Saved { uidvalidity, .. } | WriteResult::Copied { uidvalidity, .. } => *uidvalidity,
            _ => return,
        };
        // The record's GUID, not the request's: a retry recognised at the master is
        // answered with the message its first attempt stored.
        if let WriteRequest::Save { body, .. } = request
            && !self.image.has_body(&record.guid)
            && body.checksum() == record.checksum
        {
            self.image.put_checked_body(&mut self.out, record.guid, record.checksum, body.clone());
        }
        let fragment = MailboxState {
            mailbox: request.target().clone(),
            uidvalidity,
            uidnext: record.uid.saturating_add(1),
            highest_modseq: record.modseq,
            messages: vec![record.clone()],
            tombstones: Vec::new(),
            lifecycle: Default::default(),
            retired: Default::default(),
        };
        self.merge_foreign(src, &fragment);
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
            Origin::Client(id) => self.out.reply(id, ClientReply::Write(result)),
            Origin::Peer { sid, job } => self.send(sid, Msg::Reply { tag: job.0, master, result, record }),
            Origin::Internal => {}
            Origin::Part { parent } => self.on_part_answer(parent, result),
            Origin::Read { id, mailbox, wanted, deadline } => self.on_position(id, mailbox, wanted, deadline, result),
        }
    }

    /// A fresh read's BARRIER answered (or failed, or timed out): the read waits until
    /// this server's durable copy reaches the master's position, within what is left
    /// of its time; without a position it is answered from what is here now.
    fn on_position(
        &mut self,
        id: RequestId,
        mailbox: MailboxKey,
        wanted: Wanted,
        deadline: Instant,
        result: WriteResult,
    ) {
        match result {
            // Compared with our copy at the end of this input (`answer_fresh_reads`).
            WriteResult::Position { highest_modseq, digest } => {
                let position = super::fresh_reads::Position { highest_modseq, digest };
                self.fresh_reads.wait(id, mailbox, wanted, position, deadline);
            }
            _ => {
                let reply = self.stale_view(&mailbox, wanted);
                self.out.reply(id, reply);
            }
        }
    }

    /// A fresh read that could not reach its master's position: answered from what is
    /// here (stale), unless this server's copy cannot be trusted to be a state the
    /// mailbox had (see `filling`), when it is refused for now.
    fn stale_view(&mut self, mailbox: &MailboxKey, wanted: Wanted) -> ClientReply {
        if !self.copy_trusted(mailbox) {
            self.marks.hit(Mark::UnfilledReadRefused);
            let reason = format!("this server's copy of {mailbox} is still being filled from its peers");
            return ClientReply::Failed { kind: FailKind::Temporary, reason };
        }
        self.marks.hit(Mark::FreshReadStale);
        self.fresh_view(mailbox, wanted, false)
    }

    /// Where this server's copy of a mailbox stands, as a fresh read compares it: its
    /// HIGHESTMODSEQ, and its digest joined with UIDVALIDITY and UIDNEXT (two
    /// incarnations of a name can hold the same records); (0, 0) for no copy.
    fn position_of(&mut self, mailbox: &MailboxKey) -> super::fresh_reads::Position {
        match self.image.summary(mailbox) {
            Some(s) => super::fresh_reads::Position {
                highest_modseq: s.highest_modseq,
                digest: crate::hash::mix64(
                    s.digest ^ crate::hash::mix64(u64::from(s.uidvalidity) | (u64::from(s.uidnext) << 32)),
                ),
            },
            None => super::fresh_reads::Position { highest_modseq: 0, digest: 0 },
        }
    }

    fn fresh_view(&self, mailbox: &MailboxKey, wanted: Wanted, caught_up: bool) -> ClientReply {
        if wanted == Wanted::Status {
            return match self.image.durable_mailbox(mailbox).filter(|m| m.visible()) {
                Some(m) => ClientReply::FreshStatus { status: mailbox_status(mailbox, &m), caught_up },
                None => ClientReply::Failed { kind: FailKind::Permanent, reason: format!("no mailbox {mailbox}") },
            };
        }
        match self.read_view(mailbox) {
            ClientReply::Read(view) => ClientReply::FreshRead { view, caught_up },
            other => other,
        }
    }

    /// Moves each fresh read on (see `fresh_reads::Step`): answers those whose copy
    /// here durably equals their master's position, and those out of time (from what
    /// is here: stale, refused only from a copy not filled yet, see `filling`); asks
    /// again for those whose copy went past it.
    pub(crate) fn answer_fresh_reads(&mut self) {
        // A master answers a BARRIER at once, so a read asked again may be ready in
        // the same input: a few rounds, each with fewer reads left.
        for _ in 0..FRESH_READ_ROUNDS_MAX {
            if self.fresh_reads.is_empty() {
                return;
            }
            let mailboxes: BTreeSet<MailboxKey> = self.fresh_reads.mailboxes().cloned().collect();
            let summaries: BTreeMap<MailboxKey, super::fresh_reads::Position> =
                mailboxes.into_iter().map(|m| (m.clone(), self.position_of(&m))).collect();
            let none = super::fresh_reads::Position { highest_modseq: 0, digest: 0 };
            let summary = |m: &MailboxKey| summaries.get(m).copied().unwrap_or(none);
            let out = &self.out;
            let is_durable = |w| out.is_durable(w);
            let copies =
                super::fresh_reads::Copies { summary: &summary, last_write: out.last_write(), is_durable: &is_durable };
            let steps = self.fresh_reads.steps(self.now, &copies);
            let mut asked_again = false;
            for step in steps {
                match step {
                    super::fresh_reads::Step::Answer { id, mailbox, wanted, caught_up: true } => {
                        self.marks.hit(Mark::FreshReadCaughtUp);
                        if !self.masters.masters_ready(&self.master_key(&mailbox)) {
                            // The position was another server's (ours proves nothing).
                            self.copy_confirmed(&mailbox);
                        }
                        let reply = self.fresh_view(&mailbox, wanted, true);
                        self.out.reply(id, reply);
                    }
                    super::fresh_reads::Step::Answer { id, mailbox, wanted, caught_up: false } => {
                        let reply = self.stale_view(&mailbox, wanted);
                        self.out.reply(id, reply);
                    }
                    super::fresh_reads::Step::AskAgain { id, mailbox, wanted, deadline } => {
                        asked_again = true;
                        let key = self.master_key(&mailbox);
                        let origin = Origin::Read { id, mailbox: mailbox.clone(), wanted, deadline };
                        let kind = JobKind::Write(WriteRequest::Barrier { mailbox });
                        self.start_job(Job { origin, kind, key, state: JobState::Queued, deadline });
                    }
                    super::fresh_reads::Step::Compare { mailbox } => {
                        let key = self.master_key(&mailbox);
                        if let Some(master) = self.masters.cached(&key)
                            && master != self.cfg.sid
                            && let Some(summary) = self.image.summary(&mailbox)
                        {
                            self.send(master, Msg::Mbox { tag: 0, summary });
                        }
                    }
                }
            }
            if !asked_again {
                return;
            }
        }
    }

    /// A STORE or EXPUNGE naming more messages than one forwarded command may carry goes
    /// to the master as several requests; the origin is answered once, when all have.
    fn split_job(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(id) else { return };
        let JobKind::Write(request) = &job.kind else { return };
        let parts = split_request(request);
        let (key, deadline) = (job.key.clone(), job.deadline);
        self.jobs.set_state(id, JobState::Split { left: parts.len(), result: None });
        for part in parts {
            let origin = Origin::Part { parent: id };
            let child = Job { origin, kind: JobKind::Write(part), key: key.clone(), state: JobState::Queued, deadline };
            self.start_job(child);
        }
    }

    fn on_part_answer(&mut self, parent: JobId, result: WriteResult) {
        if let Some((job, result)) = self.jobs.part_answered(parent, result, join_results) {
            self.answer(job.origin, None, result, None);
        }
    }

    pub(crate) fn expire_jobs(&mut self) {
        let now = self.now;
        for id in self.jobs.expired(now) {
            let Some(job) = self.jobs.remove(id) else { continue };
            self.log_progress.job_over(id);
            let reason = match &job.state {
                JobState::Replicating { .. } => {
                    self.marks.hit(Mark::SyncModeTemporaryFailure);
                    "not enough durable copies in time"
                }
                JobState::Queued => "no master reachable in time",
                JobState::Forwarded { .. } => "the master did not answer in time",
                JobState::WaitingBody { .. } => "the message body could not be fetched in time",
                JobState::WaitingMaster { .. } => "the new name's master did not hand it over in time",
                JobState::Split { .. } => "the parts of the request did not finish in time",
            };
            match job.kind {
                JobKind::MasterMove { .. } => {
                    self.masters.done_moving(&job.key);
                    if let Origin::Client(id) = job.origin {
                        self.out.reply(id, ClientReply::Failed { kind: FailKind::Temporary, reason: reason.into() });
                    }
                    self.requeue_jobs_for(&job.key);
                }
                JobKind::Write(request) => {
                    let cancelled =
                        matches!(job.origin, Origin::Client(_)) && matches!(request, WriteRequest::Save { .. });
                    let reason = if cancelled {
                        self.cancel_save(&request);
                        format!(
                            "{reason}; cancelled at the master, unless it cannot be reached or a retry of it was stored"
                        )
                    } else {
                        reason.to_string()
                    };
                    self.answer(job.origin, None, fail(FailKind::Temporary, reason), None)
                }
            }
        }
        debug_assert!(self.jobs.next_deadline().is_none_or(|at| at > now), "every expired job was answered");
    }

    /// Finish jobs whose writes are durable and whose replicas have acknowledged.
    pub(crate) fn progress_jobs(&mut self) {
        let (out, routing) = (&self.out, &self.routing);
        let any_store = self.has_bug(crate::Bug::CountsAcksOfLostStores);
        let store_of = |peer| if any_store { None } else { routing.store_of(peer) };
        let done = self.jobs.replicated(|write| out.is_durable(write), store_of);
        for id in done {
            let Some(job) = self.jobs.remove(id) else { continue };
            self.log_progress.job_over(id);
            if let JobState::Replicating { mut result, .. } = job.state {
                // The message may have been renumbered (or expunged) while the answer
                // waited for its copies: answer with where it lives now, or no UID.
                let record = match (&mut result, &job.kind) {
                    (
                        WriteResult::Saved { uid, guid, .. } | WriteResult::Copied { uid, guid, .. },
                        JobKind::Write(request),
                    ) => {
                        let now =
                            self.image.mailbox(request.target()).and_then(|m| m.messages.find_guid(*guid)).cloned();
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
    fn execute(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(id) else { return };
        match job.kind.clone() {
            JobKind::MasterMove { requester } => {
                let origin = job.origin.clone();
                let key = job.key.clone();
                self.jobs.remove(id);
                match origin {
                    Origin::Client(id) => self.out.reply(id, ClientReply::Moved { master: self.cfg.sid }),
                    Origin::Peer { job: their_job, .. } => self.give_up_mastership(key, requester, their_job),
                    // A fresh read's job is a BARRIER, never a move.
                    Origin::Internal | Origin::Part { .. } | Origin::Read { .. } => {}
                }
            }
            JobKind::Write(request) => {
                let Some(ordered) = self.order_write(id, request) else { return };
                self.await_copies(id, ordered);
            }
        }
    }

    /// Orders a write as master: the result, and whether a change was replicated. None
    /// when the job waits (for a body).
    fn order_write(&mut self, id: JobId, request: WriteRequest) -> Option<Ordered> {
        let reachable_peers = self.routing.reachable().len().saturating_sub(1);
        let ordered = match request {
            // Changes nothing, so it needs no copies: where this master stands, after
            // every change it ordered before (a fresh read elsewhere waits for that).
            WriteRequest::Barrier { mailbox } => {
                let super::fresh_reads::Position { highest_modseq, digest } = self.position_of(&mailbox);
                Ordered::unreplicated(WriteResult::Position { highest_modseq, digest })
            }
            // Sync mode: every acknowledged change must reach `replicas` more servers, so
            // with fewer reachable the answer is a temporary failure, before anything
            // changes.
            _ if self.cfg.durability == Durability::Sync && reachable_peers < usize::from(self.cfg.replicas) => {
                self.marks.hit(Mark::SyncModeTemporaryFailure);
                Ordered::unreplicated(fail(FailKind::Temporary, "not enough servers reachable for the required copies"))
            }
            WriteRequest::Save { mailbox, guid, received, flags, body, delivery } => {
                if delivery && let Some((first, checksum)) = self.omitted_retry_candidate(&mailbox, received, &body) {
                    // A partial master cannot compare a retry's bytes with a body it left
                    // out: it fetches that body first (explore seed 5965).
                    self.want_body(first, Some(checksum), None, false);
                    self.jobs.set_state(id, JobState::WaitingBody { guid: first });
                    return None;
                }
                let delivered = delivery.then_some(&body).and_then(|b| self.stored_before(&mailbox, received, b));
                match delivered {
                    Some((first_guid, first_uid)) => {
                        self.marks.hit(Mark::RetryRecognised);
                        self.ordered_saves.claimed(first_guid, self.now);
                        self.claim_saved(&mailbox, first_guid, first_uid, body, id)
                    }
                    None => {
                        let ordered = self.master_save(&mailbox, guid, received, &flags, Some(body), id, None);
                        if matches!(ordered.result, WriteResult::Saved { guid: placed, .. } if placed == guid) {
                            self.ordered_saves.ordered(guid, self.now);
                        }
                        ordered
                    }
                }
            }
            WriteRequest::Import { mailbox, guid, received, flags, body, uidvalidity, uid } => {
                self.master_import(&mailbox, (uidvalidity, uid), guid, received, &flags, body, id)
            }
            WriteRequest::Copy { src, guid, dst, received, flags, .. } => {
                if src == dst {
                    Ordered::unreplicated(fail(FailKind::Permanent, "COPY into the source mailbox is not supported"))
                } else if !self.image.has_body(&guid) && !self.has_live(&dst, guid) && self.omitted_source(&src, guid) {
                    // No peer has it to fetch: the agent's next sync brings it.
                    let reason = "the body of this message is on the server: the next sync brings it, then copy again";
                    Ordered::unreplicated(fail(FailKind::Temporary, reason))
                } else if !self.image.has_body(&guid) && !self.has_live(&dst, guid) {
                    let from = self.origin_peer(id);
                    self.want_body(guid, None, from, false);
                    self.jobs.set_state(id, JobState::WaitingBody { guid });
                    return None;
                } else {
                    self.master_save(&dst, guid, received, &flags, None, id, None)
                }
            }
            WriteRequest::Expunge { mailbox, messages } | WriteRequest::Store { mailbox, messages, .. }
                if unknown_here(self.image.mailbox(&mailbox), &messages) =>
            {
                // Fetch the sender's copy so the next try finds the messages here.
                if let Some(sid) = self.origin_peer(id)
                    && let Some(state) = self.image.mailbox(&mailbox).map(|m| mailbox::state(&mailbox, m))
                {
                    self.send_sync(sid, false, state);
                }
                Ordered::unreplicated(fail(FailKind::Temporary, "the master does not have that message yet"))
            }
            WriteRequest::Expunge { mailbox, messages } => {
                // The server's own expunge is a census's (see `Origin::Internal`).
                let internal = matches!(self.jobs.get(id).map(|j| &j.origin), Some(Origin::Internal));
                let why = if internal { Removal::Lost } else { Removal::ByClient };
                self.master_expunge(&mailbox, &messages, why, id)
            }
            WriteRequest::Cancel { mailbox, guid, sender_ordered } => {
                self.master_cancel(&mailbox, guid, sender_ordered, id)
            }
            WriteRequest::Mailbox { mailbox, action } => self.master_lifecycle(&mailbox, action, id),
            WriteRequest::Rename { from, to } => {
                if self.rename_waits_for_target(&from, &to, id) {
                    return None;
                }
                self.master_rename(&from, &to, id)
            }
            store @ WriteRequest::Store { .. } => self.master_store(&store, id),
            WriteRequest::Merge { state, bodies, from_cluster } => {
                Ordered::unreplicated(self.master_merge(*state, bodies, &from_cluster))
            }
        };
        Some(ordered)
    }

    /// The peer that forwarded job `id`, if a peer did.
    fn origin_peer(&self, id: JobId) -> Option<Sid> {
        match self.jobs.get(id).map(|j| &j.origin) {
            Some(Origin::Peer { sid, .. }) => Some(*sid),
            _ => None,
        }
    }

    /// A write ordered here waits until it is durable and, in sync mode, until
    /// `replicas` peers made it durable too: SAVE and COPY (DESIGN.md), and STORE and
    /// EXPUNGE as well, so that no acknowledged flag change or expunge dies with one
    /// server. A failure is answered at once.
    fn await_copies(&mut self, id: JobId, ordered: Ordered) {
        let Ordered { result, replicated } = ordered;
        let sync = self.cfg.durability == Durability::Sync;
        let need = if replicated && sync && !self.has_bug(crate::Bug::AckBeforeReplicaDurable) {
            usize::from(self.cfg.replicas)
        } else {
            0
        };
        if let WriteResult::Failed { .. } = result {
            if let Some(job) = self.jobs.remove(id) {
                self.answer(job.origin, Some(self.cfg.sid), result, None);
            }
            return;
        }
        let write = self.out.last_write();
        self.jobs.set_state(id, JobState::Replicating { write, need, acked: BTreeMap::new(), result });
        self.progress_jobs();
    }

    /// A COPY waiting for a body can go on.
    pub(crate) fn body_arrived(&mut self, guid: Guid) {
        for id in self.jobs.body_arrived(guid) {
            self.dispatch(id);
        }
        self.answer_waiting_bodies();
    }

    fn has_live(&self, mailbox: &MailboxKey, guid: Guid) -> bool {
        self.image.mailbox(mailbox).is_some_and(|m| m.messages.has_guid(guid))
    }

    /// CANCEL at the master: the message goes if this master ordered it, or the sender
    /// did, and no retry was answered with it (see `super::cancels`).
    fn master_cancel(&mut self, mailbox: &MailboxKey, guid: Guid, sender_ordered: bool, id: JobId) -> Ordered {
        let live = self.image.mailbox(mailbox).and_then(|m| m.messages.find_guid(guid)).map(|r| r.uid);
        let highest_modseq = self.image.mailbox(mailbox).map_or(0, |m| m.highest_modseq);
        let kept = Ordered::unreplicated(WriteResult::Expunged { uids: Vec::new(), modseq: highest_modseq });
        // Forgotten either way: a save is cancelled at most once.
        let horizon_us = self.cancel_horizon_us();
        let cancellable = self.ordered_saves.take_cancellable(guid, sender_ordered, self.now, horizon_us);
        let Some(uid) = live else { return kept };
        // A claim made at another master is on the record (`MessageRecord::claimed`).
        let claimed = self.image.mailbox(mailbox).and_then(|m| m.messages.get(&uid)).is_some_and(|r| r.claimed);
        if (!cancellable || claimed) && !self.has_bug(crate::Bug::CancelClaimedSaves) {
            self.marks.hit(Mark::SaveCancelRefused);
            return kept;
        }
        self.marks.hit(Mark::SaveCancelled);
        self.master_expunge(mailbox, &[(uid, guid)], Removal::Cancelled, id)
    }

    /// A migrated message at the UID it had elsewhere (see `ClientRequest::Import`).
    #[allow(clippy::too_many_arguments)]
    fn master_import(
        &mut self,
        mailbox: &MailboxKey,
        (uidvalidity, uid): (u32, Uid),
        guid: Guid,
        received: u64,
        flags: &[Flag],
        body: Body,
        id: JobId,
    ) -> Ordered {
        self.take_import_validity(mailbox, uidvalidity);
        let Some(m) = self.image.mailbox(mailbox) else {
            return Ordered::unreplicated(fail(FailKind::Temporary, "the mailbox changed meanwhile"));
        };
        if m.uidvalidity != uidvalidity {
            let reason = format!("{mailbox} has UIDVALIDITY {}, the import {uidvalidity}", m.uidvalidity);
            return Ordered::unreplicated(fail(FailKind::Permanent, reason));
        }
        if let Some(r) = m.messages.get(&uid) {
            if u64::from(r.size) == body.len() as u64 && r.checksum == body.checksum() {
                // A resumed import: this message was placed by an earlier attempt.
                let first = r.guid;
                return self.resend_saved(mailbox, first, uid, Some(body), id);
            }
            return Ordered::unreplicated(fail(
                FailKind::Permanent,
                format!("UID {uid} of {mailbox} is another message"),
            ));
        }
        if uid < m.uidnext || uid == 0 || uid > crate::limits::UID_MAX {
            return Ordered::unreplicated(fail(FailKind::Permanent, format!("UID {uid} of {mailbox} is not free")));
        }
        self.marks.hit(Mark::ImportedAtUid);
        self.master_save(mailbox, guid, received, flags, Some(body), id, Some(uid))
    }

    /// A migrated mailbox takes the UIDVALIDITY it had elsewhere, when it has no history
    /// here: it is created with it, or an empty copy that never gave out a UID changes to
    /// it (the replicas' copies adopt it with the next change, as after a RENAME).
    fn take_import_validity(&mut self, mailbox: &MailboxKey, uidvalidity: u32) {
        let Some(m) = self.image.mailbox(mailbox) else {
            self.image.create_mailbox(&mut self.out, mailbox, Some(uidvalidity));
            self.marks.hit(Mark::ImportedValidity);
            return;
        };
        let fresh =
            m.uidnext == 1 && m.messages.is_empty() && m.tombstones.is_empty() && m.retired.last_uid().is_none();
        if fresh && m.uidvalidity != uidvalidity {
            let highest_modseq = m.highest_modseq;
            self.commit(StoreWrite::MailboxMeta { mailbox: mailbox.clone(), uidvalidity, uidnext: 1, highest_modseq });
            self.marks.hit(Mark::ImportedValidity);
        }
    }

    /// SAVE (body given) or COPY (body already here) at the master: the message gets the
    /// mailbox's next UID (or `at`, a migrated message's, checked free by the caller),
    /// unless it is there already.
    #[allow(clippy::too_many_arguments)]
    fn master_save(
        &mut self,
        mailbox: &MailboxKey,
        guid: Guid,
        received: u64,
        flags: &[Flag],
        body: Option<Body>,
        id: JobId,
        at: Option<Uid>,
    ) -> Ordered {
        let is_copy = body.is_none();
        let (guid, mut body) = if is_copy {
            let Some(placed) = self.copy_guid(mailbox, guid) else {
                let reason = "that message was expunged from the mailbox and copied back too often";
                return Ordered::unreplicated(fail(FailKind::Permanent, reason));
            };
            if placed == guid || self.image.has_body(&placed) {
                (placed, None)
            } else {
                // The copy's own body: the same bytes, stored once more under its GUID.
                let Some(bytes) = self.image.intact_body(guid) else {
                    return Ordered::unreplicated(fail(FailKind::Temporary, "message body not available"));
                };
                (placed, Some(bytes))
            }
        } else {
            (guid, body)
        };
        if let Some(uid) = self.image.mailbox(mailbox).and_then(|m| m.messages.find_guid(guid)).map(|r| r.uid) {
            return self.resend_saved(mailbox, guid, uid, body, id);
        }
        if self.image.mailbox(mailbox).is_some_and(|m| m.expunged_at(guid).is_some()) {
            debug_assert!(!is_copy, "a copy takes a GUID the mailbox never expunged");
            return Ordered::unreplicated(fail(FailKind::Permanent, "that message was expunged from the mailbox"));
        }
        if self.image.mailbox(mailbox).is_some_and(|m| m.uidnext > crate::limits::UID_MAX) {
            return Ordered::unreplicated(fail(FailKind::Permanent, "the mailbox has run out of UIDs"));
        }
        let (checksum, size) = match (&body, self.image.body(&guid)) {
            (Some(b), _) => (b.checksum(), u32::try_from(b.len()).unwrap_or(u32::MAX)),
            (None, Some(stored)) => (stored.checksum, u32::try_from(stored.len).unwrap_or(u32::MAX)),
            (None, None) => return Ordered::unreplicated(fail(FailKind::Temporary, "message body not available")),
        };
        if let Some(bytes) = &body
            && !self.image.has_body(&guid)
        {
            self.image.put_checked_body(&mut self.out, guid, checksum, bytes.clone());
        }
        let (record, uidvalidity) =
            self.place_new_message(mailbox, guid, received, (flags, is_copy), (checksum, size), at);
        let uid = record.uid;
        // A replica acks a COPY once its record is durable, body or not. Sync mode counts
        // acks as copies of the message, so there the body travels with it.
        body = match body {
            Some(body) => Some(body),
            None if self.cfg.durability == Durability::Sync => self.image.stored_bytes(guid),
            None => None,
        };
        let change = match body {
            Some(body) => Change::Save { mailbox: mailbox.clone(), uidvalidity, record, body },
            None => Change::Copy { mailbox: mailbox.clone(), uidvalidity, record },
        };
        self.replicate(change, Some(id));
        Ordered::replicated(saved(is_copy, uidvalidity, uid, guid))
    }

    /// The GUID a COPY of `guid` takes in `mailbox`: its own, unless it was expunged
    /// there (moved to Trash and now moved back, say): a tombstone of it, or a binding
    /// of it collected lately (`recently_collected`: a server cut off before the
    /// collection still holds the tombstone, and would expunge the same GUID at its new
    /// UID when the partition heals, explore seed 772280). Then one derived from it and
    /// that UID (`Guid::copied_back`), and so on while the derived one was expunged there
    /// too; a derived one the mailbox holds live is the copy, placed before. None past
    /// `COPY_BACK_GENERATIONS_MAX` generations.
    fn copy_guid(&mut self, mailbox: &MailboxKey, guid: Guid) -> Option<Guid> {
        let Some(m) = self.image.mailbox(mailbox) else { return Some(guid) };
        let mut placed = guid;
        for _ in 0..COPY_BACK_GENERATIONS_MAX {
            if m.messages.has_guid(placed) {
                return Some(placed);
            }
            let tombstone = m.expunged_at(placed);
            let collected = self.recently_collected.collected_at(mailbox, m.uidvalidity, placed, self.now);
            let Some(expunged_uid) = tombstone.max(collected) else {
                if placed != guid {
                    self.marks.hit(Mark::CopiedBack);
                }
                return Some(placed);
            };
            placed = placed.copied_back(mailbox, expunged_uid);
        }
        None
    }

    /// A live message of `mailbox` with exactly these bytes, received within
    /// `Config::retry_window_s` of `received`: the first attempt of a SAVE that is being
    /// retried (an MTA after a 451, a client after NO [UNAVAILABLE], when that attempt
    /// was stored after all, say because its answer was lost or came too late). Found by
    /// the body's checksum, confirmed on the stored bytes, so a different message that
    /// shares a checksum or a Message-ID is never taken for it.
    fn stored_before(&self, mailbox: &MailboxKey, received: u64, bytes: &Body) -> Option<(Guid, Uid)> {
        self.retry_candidates(mailbox, received, bytes)
            .find(|r| self.image.stored_bytes(r.guid).is_some_and(|stored| stored.as_ref() == bytes.as_ref()))
            .map(|r| (r.guid, r.uid))
    }

    /// The live messages of `mailbox` a delivery of `bytes` received at `received` could
    /// be a retry of: the same checksum and size, within the retry window; at most
    /// `RETRY_CANDIDATES_MAX`; none when retries are not looked for (a window of 0).
    fn retry_candidates<'a>(
        &'a self,
        mailbox: &MailboxKey,
        received: u64,
        bytes: &Body,
    ) -> impl Iterator<Item = &'a MessageRecord> + 'a {
        let window = self.cfg.retry_window_s;
        let looked_for = window != 0 && !self.has_bug(crate::Bug::StoreRetriesTwice);
        let checksum = bytes.checksum();
        let size = u32::try_from(bytes.len()).ok();
        self.image
            .mailbox(mailbox)
            .filter(|_| looked_for)
            .into_iter()
            .flat_map(move |m| m.messages.with_checksum(checksum))
            .filter(move |r| Some(r.size) == size && r.received.abs_diff(received) <= window)
            .take(RETRY_CANDIDATES_MAX)
    }

    /// A live message a delivery could be a retry of (same checksum, size and mailbox,
    /// within the retry window) whose body this partial server left out, with its
    /// checksum: its bytes must be here before the delivery is compared with it.
    fn omitted_retry_candidate(&self, mailbox: &MailboxKey, received: u64, bytes: &Body) -> Option<(Guid, u64)> {
        // Only a partial server leaves bodies out.
        if !self.omits_some() {
            return None;
        }
        self.retry_candidates(mailbox, received, bytes).find(|r| self.omits(mailbox, r)).map(|r| (r.guid, r.checksum))
    }

    /// Writes a new message at the mailbox's next UID (or `at`, at or above it) and next
    /// modseq (creating the mailbox if needed). Returns its record and the mailbox's
    /// UIDVALIDITY.
    ///
    /// The flags a COPY carries are stamped older than any STORE (modseq 0): a mailbox
    /// holds a message once, so a COPY of one it holds already changes nothing, and two
    /// COPYs of one message into one mailbox on the two sides of a partition become one
    /// message whose STOREs must win over what either COPY brought (explore seed 432314:
    /// the later side's COPY outstamped a STORE that removed \Flagged on the other).
    fn place_new_message(
        &mut self,
        mailbox: &MailboxKey,
        guid: Guid,
        received: u64,
        (flags, is_copy): (&[Flag], bool),
        (checksum, size): (u64, u32),
        at: Option<Uid>,
    ) -> (MessageRecord, u32) {
        let m = self.image.mailbox_or_new(mailbox);
        debug_assert!(at.is_none_or(|uid| uid >= m.uidnext), "a migrated message's UID is free");
        let (uid, uidvalidity) = (at.unwrap_or(m.uidnext).max(m.uidnext), m.uidvalidity);
        let modseq = m.highest_modseq.saturating_add(1);
        debug_assert!(!m.messages.contains_key(&uid), "UIDNEXT is above every live UID");
        let stamp = Stamp { modseq: if is_copy { 0 } else { modseq }, sid: self.cfg.sid };
        let flags = flags.iter().map(|f| (f.clone(), FlagState { present: true, stamp })).collect();
        let record =
            MessageRecord { uid, guid, received, size, checksum, modseq, flags, claimed: false, pushed: false };
        let meta = StoreWrite::MailboxMeta {
            mailbox: mailbox.clone(),
            uidvalidity,
            uidnext: uid.saturating_add(1),
            highest_modseq: modseq,
        };
        self.commit(meta);
        self.commit(StoreWrite::PutMessage { mailbox: mailbox.clone(), record: record.clone() });
        // The promise the protocol rests on: a UID is given out once, above every UID
        // and modseq this mailbox has shown (checked in release too; it is cheap).
        let placed = self.image.mailbox(mailbox);
        assert!(
            placed.is_some_and(|m| m.uidnext > uid && m.highest_modseq >= modseq),
            "UIDNEXT and modseq moved past the new message"
        );
        debug_assert!(
            placed.is_some_and(|m| m.tombstones.keys().all(|(u, _)| *u != uid)),
            "a new UID was never expunged"
        );
        debug_assert!(placed.is_some_and(mailbox::unique_guids));
        (record, uidvalidity)
    }

    /// A resent SAVE (or COPY): the message is already here at `uid`, maybe only as a
    /// record that a SYNC brought. Sync mode promises the client `replicas` more copies,
    /// so the message goes out again, body and all, and the answer waits for their acks.
    fn resend_saved(&mut self, mailbox: &MailboxKey, guid: Guid, uid: Uid, body: Option<Body>, id: JobId) -> Ordered {
        let Some(m) = self.image.mailbox(mailbox) else {
            return Ordered::unreplicated(fail(FailKind::Temporary, "the mailbox changed meanwhile"));
        };
        let uidvalidity = m.uidvalidity;
        let record = m.messages.get(&uid).cloned();
        let result = saved(body.is_none(), uidvalidity, uid, guid);
        if self.cfg.durability != Durability::Sync {
            return Ordered::unreplicated(result);
        }
        let bytes = match (body, self.image.intact_body(guid)) {
            (_, Some(stored)) => stored,
            (Some(bytes), None) => bytes,
            (None, _) => {
                self.want_body(guid, record.as_ref().map(|r| r.checksum), None, false);
                return Ordered::unreplicated(fail(FailKind::Temporary, "message body not available yet"));
            }
        };
        let Some(record) = record else { return Ordered::unreplicated(result) };
        if bytes.checksum() != record.checksum {
            return Ordered::unreplicated(fail(FailKind::Permanent, "the body does not match the stored message"));
        }
        self.store_body(guid, record.checksum, bytes.clone(), None);
        let change = Change::Save { mailbox: mailbox.clone(), uidvalidity, record, body: bytes };
        self.replicate(change, Some(id));
        Ordered::replicated(result)
    }

    /// A retry answered with the message it retries (a claim): its client is told the
    /// message is stored, and the record says so for good (`MessageRecord::claimed`), at
    /// a new modseq so that every copy learns it. A cancel of the save decided at a
    /// master that had not seen this claim (mastership moved, or its log waited for a
    /// SYNC) then cannot remove it anywhere (explore seeds 778520, 770826). The message
    /// goes out as `resend_saved` sends it.
    fn claim_saved(&mut self, mailbox: &MailboxKey, guid: Guid, uid: Uid, body: Body, id: JobId) -> Ordered {
        let Some(m) = self.image.mailbox(mailbox) else {
            return Ordered::unreplicated(fail(FailKind::Temporary, "the mailbox changed meanwhile"));
        };
        let Some(record) = m.messages.get(&uid).filter(|r| r.guid == guid).cloned() else {
            return Ordered::unreplicated(fail(FailKind::Temporary, "the mailbox changed meanwhile"));
        };
        if record.claimed {
            return self.resend_saved(mailbox, guid, uid, Some(body), id);
        }
        let (uidvalidity, uidnext, modseq) = (m.uidvalidity, m.uidnext, m.highest_modseq.saturating_add(1));
        let claimed = MessageRecord { claimed: true, modseq, ..record };
        self.commit(StoreWrite::MailboxMeta { mailbox: mailbox.clone(), uidvalidity, uidnext, highest_modseq: modseq });
        self.commit(StoreWrite::PutMessage { mailbox: mailbox.clone(), record: claimed.clone() });
        if self.cfg.durability == Durability::Sync {
            // The record goes out with the body, claimed.
            return self.resend_saved(mailbox, guid, uid, Some(body), id);
        }
        let mut piece = MailboxState::empty(mailbox.clone(), uidvalidity);
        (piece.uidnext, piece.highest_modseq, piece.messages) = (uidnext, modseq, vec![claimed]);
        piece.lifecycle = self.image.mailbox(mailbox).map(|m| m.lifecycle).unwrap_or_default();
        self.replicate(Change::Merge { state: Box::new(piece) }, Some(id));
        Ordered::replicated(saved(false, uidvalidity, uid, guid))
    }

    fn master_expunge(&mut self, mailbox: &MailboxKey, messages: &[(Uid, Guid)], why: Removal, id: JobId) -> Ordered {
        let Some(m) = self.image.mailbox(mailbox) else {
            return Ordered::unreplicated(fail(FailKind::Permanent, format!("no mailbox {mailbox}")));
        };
        let modseq = m.highest_modseq.saturating_add(1);
        let uids = master_uids(m, messages);
        let tombstones: Vec<Tombstone> = uids
            .iter()
            .filter_map(|(_, uid)| m.messages.get(uid))
            .map(|r| Tombstone {
                uid: r.uid,
                guid: r.guid,
                modseq,
                expunged: true,
                lost: why == Removal::Lost,
                cancelled: why == Removal::Cancelled,
                // A client's expunge of a binding a user replica pushed is kept past
                // collection (`server::tombstones`).
                pushed: r.pushed && why == Removal::ByClient,
                deleted: false,
            })
            .collect();
        if tombstones.is_empty() {
            return Ordered::unreplicated(WriteResult::Expunged { uids: Vec::new(), modseq: m.highest_modseq });
        }
        let (uidvalidity, uidnext) = (m.uidvalidity, m.uidnext);
        // The modseq first, then each tombstone before its removal: a crash after any
        // prefix never reuses the modseq nor forgets an expunge (see `commit_outcome`).
        self.commit(StoreWrite::MailboxMeta { mailbox: mailbox.clone(), uidvalidity, uidnext, highest_modseq: modseq });
        for t in &tombstones {
            self.commit(StoreWrite::PutTombstone { mailbox: mailbox.clone(), tombstone: *t });
            self.commit(StoreWrite::RemoveMessage { mailbox: mailbox.clone(), uid: t.uid });
        }
        let gone: BTreeSet<Uid> = tombstones.iter().map(|t| t.uid).collect();
        let uids = uids.iter().filter(|(_, ours)| gone.contains(ours)).map(|(theirs, _)| *theirs).collect();
        self.replicate(Change::Expunge { mailbox: mailbox.clone(), uidvalidity, tombstones }, Some(id));
        Ordered::replicated(WriteResult::Expunged { uids, modseq })
    }

    /// CREATE, DELETE, SUBSCRIBE and UNSUBSCRIBE at the master: one change at one new
    /// modseq, replicated as a piece of mailbox state (DELETE's tombstones with it).
    fn master_lifecycle(&mut self, mailbox: &MailboxKey, action: MailboxAction, id: JobId) -> Ordered {
        let visible = self.image.mailbox(mailbox).is_some_and(|m| m.visible());
        match action {
            // RFC 3501 lets a server refuse to subscribe to a mailbox that does not exist;
            // keeping one would make it exist (a mailbox never created is shown).
            MailboxAction::Subscribe if !visible => {
                return Ordered::unreplicated(fail(FailKind::Permanent, format!("no mailbox {mailbox}")));
            }
            // A subscription outlives its mailbox, so a deleted one can be unsubscribed.
            MailboxAction::Unsubscribe if self.image.mailbox(mailbox).is_none() => {
                return Ordered::unreplicated(fail(FailKind::Permanent, format!("not subscribed to {mailbox}")));
            }
            MailboxAction::Create | MailboxAction::CreateWithUse(_) if visible => {
                return Ordered::unreplicated(fail(FailKind::Permanent, format!("mailbox {mailbox} exists")));
            }
            MailboxAction::CreateWithValidity(uidvalidity) => {
                let before = self.image.mailbox(mailbox).map(|m| m.uidvalidity);
                self.take_import_validity(mailbox, uidvalidity);
                let now = self.image.mailbox(mailbox).map(|m| (m.uidvalidity, m.highest_modseq));
                if let (true, Some((validity, modseq))) = (visible, now)
                    && before == Some(validity)
                {
                    // Nothing to do (a resumed import), or a mailbox with history, which
                    // keeps its UIDVALIDITY: the importer sees that and saves without UIDs.
                    return Ordered::unreplicated(WriteResult::MailboxDone { modseq });
                }
            }
            MailboxAction::Delete if !visible => {
                return Ordered::unreplicated(fail(FailKind::Permanent, format!("no mailbox {mailbox}")));
            }
            MailboxAction::Delete if &*mailbox.name == "INBOX" => {
                return Ordered::unreplicated(fail(FailKind::Permanent, "INBOX cannot be deleted"));
            }
            _ => {}
        }
        let m = self.image.mailbox_or_new(mailbox);
        let modseq = m.next_lifecycle_modseq();
        let mut lifecycle = m.lifecycle;
        let mut tombstones = Vec::new();
        match action {
            MailboxAction::Create | MailboxAction::CreateWithUse(_) | MailboxAction::CreateWithValidity(_) => {
                self.marks.hit(Mark::MailboxCreated)
            }
            MailboxAction::Delete => self.marks.hit(Mark::MailboxDeleted),
            MailboxAction::Subscribe | MailboxAction::Unsubscribe => {}
        }
        match action {
            MailboxAction::Create => lifecycle.created_at = modseq,
            // A migrated mailbox is created once: a resumed import changes nothing.
            MailboxAction::CreateWithValidity(_) if visible => {}
            MailboxAction::CreateWithValidity(_) => lifecycle.created_at = modseq,
            MailboxAction::CreateWithUse(special_use) => {
                lifecycle.created_at = modseq;
                (lifecycle.special_use, lifecycle.special_use_at) = (special_use, modseq);
            }
            MailboxAction::Delete => {
                tombstones = m.messages.values().map(|r| Tombstone::deletion(r.uid, r.guid, modseq)).collect();
                lifecycle.deleted_at = modseq;
            }
            MailboxAction::Subscribe => lifecycle.subscribed_at = modseq,
            MailboxAction::Unsubscribe => lifecycle.unsubscribed_at = modseq,
        }
        let state = MailboxState {
            mailbox: mailbox.clone(),
            uidvalidity: m.uidvalidity,
            uidnext: m.uidnext,
            highest_modseq: modseq,
            messages: Vec::new(),
            tombstones,
            lifecycle,
            retired: Default::default(),
        };
        for t in &state.tombstones {
            self.commit(StoreWrite::PutTombstone { mailbox: mailbox.clone(), tombstone: *t });
            self.commit(StoreWrite::RemoveMessage { mailbox: mailbox.clone(), uid: t.uid });
        }
        let meta = StoreWrite::MailboxMeta {
            mailbox: mailbox.clone(),
            uidvalidity: state.uidvalidity,
            uidnext: state.uidnext,
            highest_modseq: modseq,
        };
        self.commit(meta);
        self.commit(StoreWrite::MailboxLifecycle { mailbox: mailbox.clone(), lifecycle });
        debug_assert_eq!(self.image.mailbox(mailbox).map(|m| m.lifecycle), Some(lifecycle));
        debug_assert!(match action {
            MailboxAction::Create | MailboxAction::CreateWithValidity(_) => visible_now(self.image.mailbox(mailbox)),
            MailboxAction::CreateWithUse(special_use) => {
                visible_now(self.image.mailbox(mailbox)) && lifecycle.special_use() == Some(special_use)
            }
            MailboxAction::Delete => !visible_now(self.image.mailbox(mailbox)),
            MailboxAction::Subscribe => lifecycle.subscribed(),
            MailboxAction::Unsubscribe => !lifecycle.subscribed(),
        });
        self.replicate(Change::Merge { state: Box::new(state) }, Some(id));
        Ordered::replicated(WriteResult::MailboxDone { modseq })
    }

    /// The key whose master takes a write's job: its mailbox's, and for a RENAME the
    /// lesser of its two names' keys (see `rename_waits_for_target`).
    fn job_key(&self, request: &WriteRequest) -> MasterKey {
        match request {
            WriteRequest::Rename { from, to } => self.master_key(from).min(self.master_key(to)),
            _ => self.master_key(request.target()),
        }
    }

    /// Whether RENAME job `id` must first master the other of its two names' keys (and
    /// now waits for it, having asked for it). Only a name's master may hand out its
    /// UIDs: a new name this server has never seen may be one another server masters
    /// and is writing into right now (a resumed import, an APPEND), and the old name's
    /// UIDs taken along would then meet that server's at the same UIDs, renumbered in a
    /// cluster without a fault (focus import seed 153756); and only the old name's
    /// master knows all it holds. The job goes to the master of the lesser key, which
    /// takes the greater: two RENAMEs that need the same two keys (crossed ones, A to B
    /// and B to A) meet at one server instead of taking each other's keys in turn for
    /// ever (focus import seed 21557). Where one key covers both names (user or global
    /// granularity) there is nothing to wait for.
    fn rename_waits_for_target(&mut self, from: &MailboxKey, to: &MailboxKey, id: JobId) -> bool {
        let key = self.master_key(from).max(self.master_key(to));
        // A leaving server takes no mastership (its RENAME keeps the old way).
        if self.masters.masters_ready(&key) || !self.members.is_active(self.cfg.sid) {
            return false;
        }
        debug_assert_eq!(
            self.jobs.get(id).map(|j| &j.key),
            Some(&self.master_key(from).min(self.master_key(to))),
            "a RENAME's job waits at the master of its lesser key"
        );
        self.jobs.set_state(id, JobState::WaitingMaster { key: key.clone() });
        let deadline = self.jobs.get(id).map(|j| j.deadline).unwrap_or(self.now);
        // A RENAME sent on again while expired jobs are being answered (a MASTER-MOVE of
        // the same key expired first and requeued it) is out of time too: a move started
        // now would outlive the pass that answers expired jobs (explore seed 33850, debug).
        if deadline > self.now && !self.masters.masters(&key) && !self.jobs.moving_here(&key) {
            self.marks.hit(Mark::RenameTakesTarget);
            self.start_job(Job {
                origin: Origin::Internal,
                kind: JobKind::MasterMove { requester: self.cfg.sid },
                key,
                state: JobState::Queued,
                deadline,
            });
        }
        true
    }

    /// RENAME at the master of both names' keys (see `rename_waits_for_target`), in one
    /// step: `to` gets every message of `from`, then `from` is deleted (INBOX is emptied
    /// instead). A `to` this server has never
    /// seen takes `from`'s UIDNEXT, UIDs and modseqs under a UIDVALIDITY of the rename's
    /// path (`MailboxKey::renamed_uidvalidity`); a `to` with history
    /// here (a deleted mailbox of that name) keeps its own UIDVALIDITY and gives the
    /// messages new UIDs above every UID it used, as COPY would, so no UID of it is ever
    /// shown again for another message. `to`'s state travels as a merge: its master (if
    /// another server) joins it like any other, so a concurrent CREATE or RENAME onto
    /// the same name there keeps both sides' messages (the later ones renumbered).
    fn master_rename(&mut self, from: &MailboxKey, to: &MailboxKey, id: JobId) -> Ordered {
        let Some(src) = self.image.mailbox(from).filter(|m| m.visible()) else {
            return Ordered::unreplicated(fail(FailKind::Permanent, format!("no mailbox {from}")));
        };
        if self.image.mailbox(to).is_some_and(|m| m.visible()) {
            return Ordered::unreplicated(fail(FailKind::Permanent, format!("mailbox {to} exists")));
        }
        let moved: Vec<(Uid, Guid)> = src.messages.values().map(|r| (r.uid, r.guid)).collect();
        let special_use = src.lifecycle.special_use();
        let to_master = self.masters.masters(&self.master_key(to));
        // What the target starts from: nothing (a new name keeps the source's UIDs and
        // modseqs under a UIDVALIDITY of the rename's path, `renamed_uidvalidity`), or a
        // name with history, which becomes a new incarnation (a new UIDVALIDITY, UIDs
        // still above every one it used, so its tombstones keep their meaning; replicas
        // take it from here as their master's).
        let (uidvalidity, renumber_from, modseq, lifecycle, incarnation) = match self.image.mailbox(to) {
            None => (
                to.renamed_uidvalidity(from, src.uidvalidity),
                None,
                src.highest_modseq.saturating_add(1),
                Lifecycle::default(),
                None,
            ),
            Some(old) => {
                // Only the name's master may hand out its UIDs: another server's view of
                // them may be behind (a UID it gives could already be shown for another
                // message).
                if !self.masters.masters_ready(&self.master_key(to)) {
                    return Ordered::unreplicated(fail(
                        FailKind::Temporary,
                        format!("{to} was used before and another server masters it: try again later"),
                    ));
                }
                // A message expunged (or retired) from that name before would be dropped
                // by the rule that an expunge wins: refused rather than lost.
                if let Some((_, guid)) =
                    moved.iter().find(|(_, g)| old.expunged_at(*g).is_some() || old.messages.has_guid(*g))
                {
                    return Ordered::unreplicated(fail(
                        FailKind::Permanent,
                        format!("{to} held message {guid} before: COPY it instead"),
                    ));
                }
                let modseq = old.next_lifecycle_modseq().max(src.highest_modseq.saturating_add(1));
                let uidvalidity = mailbox::greater_validity(old.uidvalidity, modseq);
                let meta = StoreWrite::MailboxMeta {
                    mailbox: to.clone(),
                    uidvalidity,
                    uidnext: old.uidnext,
                    highest_modseq: old.highest_modseq,
                };
                (uidvalidity, Some(old.uidnext), modseq, old.lifecycle, Some(meta))
            }
        };
        let mut messages: Vec<MessageRecord> = src.messages.values().cloned().collect();
        let mut uidnext = src.uidnext;
        if let Some(first) = renumber_from {
            uidnext = first;
            for r in &mut messages {
                (r.uid, r.modseq) = (uidnext, modseq);
                uidnext = uidnext.saturating_add(1);
            }
        }
        if uidnext == Uid::MAX {
            return Ordered::unreplicated(fail(FailKind::Permanent, format!("no UIDs left in {to}")));
        }
        self.marks.hit(Mark::MailboxRenamed);
        let mut target = MailboxState {
            mailbox: to.clone(),
            uidvalidity,
            uidnext,
            highest_modseq: modseq,
            messages,
            tombstones: Vec::new(),
            lifecycle: Lifecycle { created_at: modseq, ..lifecycle },
            retired: Default::default(),
        };
        // A special use a client gave the mailbox goes with it to its new name.
        if let Some(special_use) = special_use {
            (target.lifecycle.special_use, target.lifecycle.special_use_at) = (special_use, modseq);
        }
        if let Some(meta) = incarnation {
            self.commit(meta);
        }
        let rules = self.merge_rules();
        let outcome = self.image.merge(&mut self.out, &target, to_master, &rules, false);
        debug_assert!(!outcome.unresolved, "a rename's target merges without conflict here");
        debug_assert!(visible_now(self.image.mailbox(to)), "a renamed mailbox is shown under its new name");
        for r in &outcome.records {
            if !self.image.has_body(&r.guid) && !self.omits_body(to, r) {
                self.want_body(r.guid, Some(r.checksum), None, false);
            }
        }
        let Some(state) = self.image.mailbox(to).map(|m| mailbox::state(to, m)) else {
            return Ordered::unreplicated(fail(FailKind::Temporary, "the renamed mailbox vanished"));
        };
        // The target first: a peer that applies the source's deletion has its messages.
        // A full log drops other mailboxes' entries rather than the target's (explore
        // seed 932889: the target went by SYNC, the source's expunge by the log, and the
        // master, a partial server holding none of the moved bodies, crashed between:
        // the peers collected the bodies). A peer that gets the target by SYNC all the
        // same (it was behind already) gets the source's removal that way too.
        self.replicate_first(Change::Merge { state: Box::new(state) }, Some(id));
        let behind: Vec<Sid> = self.peers().into_iter().filter(|p| self.image.is_overflowed(*p, to)).collect();
        for peer in behind {
            self.overflow(peer, BTreeSet::from([from.clone()]));
        }
        let done = if &*from.name == "INBOX" {
            if moved.is_empty() { None } else { Some(self.master_expunge(from, &moved, Removal::ByClient, id)) }
        } else {
            Some(self.master_lifecycle(from, MailboxAction::Delete, id))
        };
        if let Some(Ordered { result: result @ WriteResult::Failed { .. }, .. }) = done {
            // The target holds every message already: nothing is lost, the source stays.
            return Ordered::replicated(result);
        }
        let modseq = self.image.mailbox(to).map(|m| m.highest_modseq).unwrap_or(0);
        Ordered::replicated(WriteResult::MailboxDone { modseq })
    }

    fn master_store(&mut self, request: &WriteRequest, id: JobId) -> Ordered {
        let WriteRequest::Store { mailbox, messages, add, remove, unchanged_since, known_modseq } = request else {
            return Ordered::unreplicated(fail(FailKind::Permanent, "not a STORE"));
        };
        let (unchanged_since, known_modseq) = (*unchanged_since, *known_modseq);
        let me = self.cfg.sid;
        let Some(m) = self.image.mailbox(mailbox) else {
            return Ordered::unreplicated(fail(FailKind::Permanent, format!("no mailbox {mailbox}")));
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
            return Ordered::unreplicated(fail(
                FailKind::Permanent,
                format!("a message would carry more than {limit} flags"),
            ));
        }
        let StorePlan { rejected, current, changed } =
            plan_store(m, &targets, add, remove, stamp, unchanged_since, known_modseq);
        if !rejected.is_empty() {
            self.marks.hit(Mark::CondstoreRejected);
        }
        if !current.is_empty() && rejected.is_empty() {
            self.marks.hit(Mark::StaleStoreCorrected);
        }
        if changed.is_empty() {
            let hms = m.highest_modseq;
            return Ordered::unreplicated(WriteResult::Stored { modseq: hms, rejected, current });
        }
        let (uidvalidity, uidnext) = (m.uidvalidity, m.uidnext);
        let messages = changed.iter().map(|r| (r.uid, r.guid)).collect();
        for record in changed {
            self.commit(StoreWrite::PutMessage { mailbox: mailbox.clone(), record });
        }
        self.commit(StoreWrite::MailboxMeta { mailbox: mailbox.clone(), uidvalidity, uidnext, highest_modseq: modseq });
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
            Some(id),
        );
        Ordered::replicated(WriteResult::Stored { modseq, rejected, current })
    }

    /// MASTER-MOVE reached a server.
    pub(crate) fn on_master_move(&mut self, src: Sid, id: JobId, key: MasterKey, requester: Sid) {
        if !self.members.is_active(requester) {
            // A leaving server takes no mastership; its request times out there.
            return;
        }
        if self.masters.masters_ready(&key) {
            self.give_up_mastership(key, requester, id);
            return;
        }
        let _ = src;
        let job = Job {
            origin: Origin::Peer { sid: requester, job: id },
            kind: JobKind::MasterMove { requester },
            key,
            state: JobState::Queued,
            deadline: self.now.plus_us(self.cfg.request_timeout_us),
        };
        self.start_job(job);
    }

    fn give_up_mastership(&mut self, key: MasterKey, requester: Sid, id: JobId) {
        if requester == self.cfg.sid {
            return;
        }
        self.marks.hit(Mark::MasterMoved);
        self.note(|| format!("gives {key} up to {requester}"));
        let in_flight = self.jobs.replicating_for(&key);
        if in_flight {
            self.marks.hit(Mark::MasterMovedMidSave);
        }
        let generation = self.masters.stop(&key).map(|m| m.generation).unwrap_or(0).saturating_add(1);
        let states = self.states_covered_by(&key);
        let epoch = self.root_role.epoch();
        if self.is_root() {
            self.root_role.record(key.clone(), requester, generation);
        } else if let Some(root) = self.root_role.root() {
            self.send(root, Msg::MasterIs { epoch, key: key.clone(), master: requester, generation });
        }
        self.masters.hand_off(key.clone(), super::Handoff { requester, requester_job: id, epoch, generation });
        self.send_move_done(requester, id, key.clone(), epoch, generation, states);
        self.requeue_jobs_for(&key);
    }

    pub(crate) fn on_move_done(
        &mut self,
        from: Sid,
        id: JobId,
        key: MasterKey,
        epoch: u64,
        generation: u64,
        states: Vec<MailboxState>,
    ) {
        // The old master has given the key up whether or not our request is still
        // waiting (it may have timed out): in this term we take it, or nobody has it.
        let job = match self.jobs.get(id) {
            Some(j) if j.key == key && matches!(j.kind, JobKind::MasterMove { .. }) => self.jobs.remove(id),
            _ => None,
        };
        self.masters.done_moving(&key);
        if epoch != self.root_role.epoch() || self.masters.masters(&key) {
            if epoch == self.root_role.epoch() {
                self.take_late_handoff(from, &key, generation, &states);
            }
            if let Some(Origin::Client(id)) = job.map(|j| j.origin) {
                self.out.reply(
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
        if self.masters.generation(&key) > generation {
            // A later move already happened elsewhere.
            self.requeue_jobs_for(&key);
            return;
        }
        self.become_master(key.clone(), Some((from, states)), generation);
        // Everyone (the root too) learns the new master at once instead of through stale
        // forwards; the generation makes a late announcement harmless.
        let peers: Vec<Sid> = self.routing.reachable_peers().into_iter().collect();
        for peer in peers {
            self.send(peer, Msg::MasterIs { epoch, key: key.clone(), master: self.cfg.sid, generation });
        }
        if let Some(Origin::Client(id)) = job.map(|j| j.origin) {
            self.out.reply(id, ClientReply::Moved { master: self.cfg.sid });
        }
        self.requeue_jobs_for(&key);
    }

    /// A MOVED for a key we master already: the root gave it to us after the old
    /// master's MOVED went astray (explore seed 101347), or this is a resend of one we
    /// took. The old master's copy may hold changes no other server has (its logs to
    /// them overflowed, and as master no more it sends no summaries): it is joined like
    /// any peer's SYNC. The old master is told who masters the key, at a generation no
    /// lower than its handover's (which it requires), which ends its resends.
    fn take_late_handoff(&mut self, from: Sid, key: &MasterKey, generation: u64, states: &[MailboxState]) {
        if self.merge_handed_over(from, key, states) {
            self.marks.hit(Mark::LateHandoffMerged);
        }
        let generation = self.masters.raise_generation(key, generation);
        let epoch = self.root_role.epoch();
        self.send(from, Msg::MasterIs { epoch, key: key.clone(), master: self.cfg.sid, generation });
    }

    /// Joins the states `from` handed over with `key` (those of mailboxes the key
    /// covers) like a peer's SYNC. Whether any changed something here.
    fn merge_handed_over(&mut self, from: Sid, key: &MasterKey, states: &[MailboxState]) -> bool {
        let mut changed = false;
        for state in states.iter().filter(|s| key.covers(&s.mailbox)) {
            changed |= self.merge_foreign(from, state).changed();
        }
        changed
    }

    /// Our copies of the mailboxes `key` covers.
    pub(crate) fn states_covered_by(&self, key: &MasterKey) -> Vec<MailboxState> {
        self.image.mailboxes().iter().filter(|(k, _)| key.covers(k)).map(|(k, m)| mailbox::state(k, m)).collect()
    }

    /// Take mastership of `key`: from a MASTER-MOVE (the old master's states, ready at
    /// once) or from the root (catch up with every reachable server first).
    /// `moved`: the states a MASTER-MOVE handed over, and who handed them (the bodies
    /// they lack are asked of it first: it had them all).
    pub(crate) fn become_master(&mut self, key: MasterKey, moved: Option<(Sid, Vec<MailboxState>)>, generation: u64) {
        self.masters.forget(&key);
        // News of an older master of this key must not unseat us.
        let known = self.masters.generation(&key);
        self.masters.set_generation(key.clone(), known.max(generation));
        if self.is_root() && generation >= self.root_role.generation(&key) {
            self.root_role.record(key.clone(), self.cfg.sid, generation);
        }
        if !self.masters.masters(&key) {
            // A new mastership: what was confirmed to an earlier one says nothing of the
            // changes another master made meanwhile.
            let peers = self.member_servers.clone();
            self.anti_entropy.recheck_mailboxes(&key, &peers);
        }
        let how = if moved.is_some() { "by MASTER-MOVE" } else { "from the root" };
        self.note(|| format!("becomes master of {key} {how}"));
        if let Some((old_master, states)) = moved {
            self.masters.start(key.clone(), Mastership { catchup: None, generation });
            self.merge_handed_over(old_master, &key, &states);
            return;
        }
        if self.masters.masters(&key) {
            return;
        }
        let id = super::CatchupId(self.jobs.unique_number());
        let peers: BTreeSet<Sid> = self.routing.reachable_peers().into_iter().collect();
        for &peer in &peers {
            self.send(peer, Msg::MboxRequest { tag: id.0, key: key.clone() });
        }
        let catchup = super::Catchup {
            id,
            waiting_mbox: peers,
            waiting_sync: BTreeSet::new(),
            deadline: self.now.plus_us(self.cfg.request_timeout_us / 2),
        };
        self.masters.start(key.clone(), Mastership { catchup: Some(catchup), generation });
        self.finish_catchups();
    }

    /// Catch-ups that have heard from everyone (or ran out of time) make their master ready.
    pub(crate) fn finish_catchups(&mut self) {
        let ready = self.masters.finished_catchups(self.now);
        if !ready.is_empty() && self.alone_unfilled() {
            // Cut off before the peers' states came, with a store not filled yet (see
            // `filling`): ordering writes now would give out UIDs from what little is
            // here. The catch-up stays open; a peer back in reach opens a new term.
            self.marks.hit(Mark::UnfilledAloneMastersNothing);
            return;
        }
        if !ready.is_empty() {
            self.anti_entropy.kick();
        }
        for key in ready {
            if self.masters.catchup_heard_all(&key) {
                // Our copies of the key's mailboxes now hold every reachable peer's.
                self.copies_caught_up(&key);
            }
            self.masters.caught_up(&key);
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
            Some(r) if r.guid == *guid || *guid == Guid::UNRESOLVED => Some((*theirs, *theirs)),
            _ if *guid == Guid::UNRESOLVED => None,
            _ => m.messages.find_guid(*guid).map(|r| (*theirs, r.uid)),
        })
        .filter(|(_, ours)| seen.insert(*ours))
        .collect()
}

/// What a STORE does at the master (see [`plan_store`]).
struct StorePlan {
    /// UIDs whose UNCHANGEDSINCE test failed (RFC 7162 MODIFIED).
    rejected: Vec<Uid>,
    /// Flags of messages changed since the client last saw them, for its answer.
    current: Vec<CurrentFlags>,
    /// The changed records, at the new modseq.
    changed: Vec<MessageRecord>,
}

/// The records a STORE changes, each flag stamped with the new modseq, and those whose
/// UNCHANGEDSINCE test fails. `targets` are (client's UID, our UID) pairs.
fn plan_store(
    m: &crate::store::StoredMailbox,
    targets: &[(Uid, Uid)],
    add: &[Flag],
    remove: &[Flag],
    stamp: Stamp,
    unchanged_since: Option<ModSeq>,
    known_modseq: ModSeq,
) -> StorePlan {
    let mut plan = StorePlan { rejected: Vec::new(), current: Vec::new(), changed: Vec::new() };
    for &(uid, ours) in targets {
        let Some(r) = m.messages.get(&ours) else { continue };
        if unchanged_since.is_some_and(|since| r.modseq > since) {
            plan.rejected.push(uid);
            plan.current.push(CurrentFlags { uid, flags: r.present_flags(), modseq: r.modseq });
            continue;
        }
        if r.modseq > known_modseq {
            plan.current.push(CurrentFlags { uid, flags: r.present_flags(), modseq: r.modseq });
        }
        let mut r = r.clone();
        for f in add {
            r.flags.insert(f.clone(), FlagState { present: true, stamp });
        }
        for f in remove.iter().filter(|f| !add.contains(f)) {
            r.flags.insert(f.clone(), FlagState { present: false, stamp });
        }
        r.modseq = stamp.modseq;
        plan.changed.push(r);
    }
    plan
}

/// Messages named by a request that the master has neither live nor expunged: its copy
/// lags the sender's, so it cannot order a change to them yet. A binding retired by a
/// renumbering does not count: the message lives on at a UID the master has not seen.
fn unknown_here(m: Option<&crate::store::StoredMailbox>, messages: &[(Uid, Guid)]) -> bool {
    let Some(m) = m else { return messages.iter().any(|(_, guid)| *guid != Guid::UNRESOLVED) };
    messages
        .iter()
        .filter(|(_, guid)| *guid != Guid::UNRESOLVED)
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

/// A stored mailbox as a client sees it.
pub fn mailbox_view(key: &MailboxKey, m: &crate::store::StoredMailbox) -> MailboxView {
    MailboxView {
        mailbox: key.clone(),
        uidvalidity: m.uidvalidity,
        uidnext: m.uidnext,
        highest_modseq: m.highest_modseq,
        messages: m.messages.values().map(message_view).collect(),
    }
}

/// A stored mailbox's STATUS counts, from the counts its records keep (no pass).
pub fn mailbox_status(key: &MailboxKey, m: &crate::store::StoredMailbox) -> MailboxStatus {
    let counts = m.messages.flag_counts();
    debug_assert!(counts.seen <= m.messages.len() && counts.deleted <= m.messages.len());
    MailboxStatus {
        mailbox: key.clone(),
        uidvalidity: m.uidvalidity,
        uidnext: m.uidnext,
        highest_modseq: m.highest_modseq,
        messages: m.messages.len(),
        seen: counts.seen,
        deleted: counts.deleted,
    }
}

pub(crate) fn message_view(r: &crate::types::MessageRecord) -> MessageView {
    MessageView {
        uid: r.uid,
        guid: r.guid,
        flags: r.present_flags(),
        modseq: r.modseq,
        received: r.received,
        size: r.size,
    }
}

fn visible_now(m: Option<&crate::store::StoredMailbox>) -> bool {
    m.is_some_and(|m| m.visible())
}

/// Why a master removes messages: the tombstone's fate (`Tombstone`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Removal {
    /// A client's EXPUNGE (or a MOVE's): the message goes wherever it lives.
    ByClient,
    /// This server's census found no body anywhere.
    Lost,
    /// A CANCEL of a save whose client was told it is not stored: this binding only.
    Cancelled,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Config;
    use crate::store::{DiskImage, MemoryBodies, StoredMailbox};

    #[test]
    fn a_uid_our_copy_has_no_trace_of_is_left_for_the_master_to_resolve() {
        let inbox = MailboxKey::new("u@d", "INBOX");
        let mut m = StoredMailbox { uidvalidity: 7, uidnext: 6, highest_modseq: 4, ..StoredMailbox::default() };
        m.messages.insert(1, MessageRecord::bare(1, 10, 1));
        m.tombstones.insert((2, Guid(20)), Tombstone::expunge(2, Guid(20), 2));
        m.retired = Retired { ranges: [(3, 3)].into_iter().collect(), collected: 3 };
        let mut disk = DiskImage::default();
        disk.mailboxes.insert(inbox.clone(), m.clone());
        let cfg = Config::new(Sid(1), vec![Sid(1), Sid(2), Sid(3)]);
        let s = Server::recover(cfg, disk, 1, Box::new(MemoryBodies::default()));
        let resolved = s.resolve_uids(&inbox, &[1, 2, 3, 4, 6]);
        assert_eq!(resolved, vec![(1, Guid(10)), (4, Guid::UNRESOLVED), (6, Guid::UNRESOLVED)], "2 and 3 are gone");
        let other = MailboxKey::new("u@d", "Other");
        assert_eq!(s.resolve_uids(&other, &[9]), vec![(9, Guid::UNRESOLVED)], "no copy here at all");
        // The master finds what it has at those UIDs, and nothing where it has none.
        m.messages.insert(4, MessageRecord::bare(4, 40, 4));
        assert_eq!(master_uids(&m, &resolved), vec![(1, 1), (4, 4)]);
        assert!(!unknown_here(Some(&m), &resolved), "an unresolved UID is not a message the master lacks");
    }
}
