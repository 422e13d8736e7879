//! A partial replica's omitted bodies (see [`crate::partial`]): the bodies above its size
//! limit that it holds the record of and not the bytes, the ones its clients asked for
//! (queued for the agent's next round), and the bodies the agent brings.
use super::Server;
use crate::io::{ClientReply, RequestId};
use crate::msg::FailKind;
use crate::store::StoreWrite;
use crate::types::*;
use std::collections::BTreeMap;

/// Omitted bodies asked for and not yet brought, at most: a client asking for more
/// waits for the next sync to bring some first.
pub const WANTED_MAX: usize = 1024;
/// A user replica's body reads a partial server holds while it fetches omitted bodies
/// from its peers, at most (more are answered with what is here).
const WAITING_MAX: usize = 64;

/// Messages a partial replica lists as lacking their text parts, at most per listing
/// (the agent brings these; the next round lists more).
pub const TEXTS_WANTED_MAX: usize = 256;
/// What a message's text parts may take beyond its own size: the driver's cut may carry
/// a description of the whole message (its MIME structure) beside the parts it keeps.
pub const TEXT_PARTS_OVERHEAD_MAX: usize = 64 * 1024;
/// Messages one `ReplicaTextParts` is answered for at most: each is a large body read
/// and cut (by the driver, on the core's turn), so a logged-in user's agent cannot make
/// one request cost more than a few of them (the agent asks 8 at a time).
pub const TEXT_PARTS_ANSWERED_MAX: usize = 16;
/// Text parts removed per maintenance pass at most, once their messages are gone.
const TEXT_PARTS_COLLECTED_MAX: usize = 1024;

/// A user replica's `ReplicaBodies` at a partial cluster server, held until the omitted
/// bodies it names arrive from peers (or are no longer wanted, or `until`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct WaitingBodies {
    id: RequestId,
    mailbox: MailboxKey,
    guids: Vec<Guid>,
    until: Instant,
    /// A `ReplicaTextParts` (answered with text parts, cut from the bodies once here).
    text_parts: bool,
}

/// The bodies clients of this replica asked for, by GUID, with the mailbox the agent
/// reads each from on the cluster (only a live message's body is answered there).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct OmittedBodies {
    wanted: BTreeMap<Guid, MailboxKey>,
    #[serde(default)]
    waiting: Vec<WaitingBodies>,
}

impl OmittedBodies {
    pub(crate) fn wanted(&self) -> Vec<(MailboxKey, Guid)> {
        self.wanted.iter().map(|(g, m)| (m.clone(), *g)).collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.wanted.is_empty() && self.waiting.is_empty()
    }

    pub(crate) fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }
}

/// Why bytes an agent brings to its replica in one request are refused, if they are: more
/// than a push may carry.
fn over_push_limits(items: &[(Guid, Body)], what: &str) -> Option<String> {
    let (count_max, bytes_max) = (crate::limits::REPLICA_PUSH_BODIES_MAX, crate::limits::REPLICA_PUSH_BYTES_MAX);
    let bytes: usize = items.iter().map(|(_, b)| b.len()).sum();
    (items.len() > count_max || bytes > bytes_max)
        .then(|| format!("at most {count_max} {what} of {bytes_max} bytes in all at once"))
}

impl Server {
    /// The size above which this server holds bodies only on demand: a partial user
    /// replica's limit, or a partial cluster server's (which holds the record of every
    /// message, and the bodies above it only while it masters their save, or once a
    /// client asked for one).
    pub(crate) fn omitted_above(&self) -> Option<u32> {
        self.cfg.partial.as_ref().and_then(|p| p.body_bytes_max)
    }

    /// Whether this server leaves any body out by design: a partial user replica with a
    /// size limit, or a partial cluster server with any rule.
    pub(crate) fn omits_some(&self) -> bool {
        self.cfg.partial.as_ref().is_some_and(|p| p.leaves_out_some(self.cfg.user_replica))
    }

    /// Whether a replicated SAVE's body is left out here: above the size limit, not held
    /// already, and not ours to order (a master keeps what it saves: it is a copy the
    /// client's answer counts on). Its acknowledgement then counts for no copy.
    pub(crate) fn drops_replicated_body(&self, mailbox: &MailboxKey, r: &MessageRecord) -> bool {
        self.omits_body(mailbox, r) && !self.image.has_body(&r.guid) && !self.masters.masters(&self.master_key(mailbox))
    }

    /// This server's partial spec, when it is a user replica that has one.
    pub(crate) fn user_replica_partial(&self) -> Option<&crate::partial::Partial> {
        self.cfg.partial.as_ref().filter(|_| self.cfg.user_replica)
    }

    /// Whether this server holds `r` of `mailbox` without its body by design (a partial
    /// replica's or server's size limit; a partial server's mailbox patterns and date):
    /// its absence is not a loss, nor one to repair (for the simulator's oracle too).
    pub fn omits_body(&self, mailbox: &MailboxKey, r: &MessageRecord) -> bool {
        self.cfg.partial.as_ref().is_some_and(|p| p.leaves_out_body(self.cfg.user_replica, mailbox, r))
    }

    /// Whether this server omits the body of `r` by design (and does not hold it now).
    pub(crate) fn omits(&self, mailbox: &MailboxKey, r: &MessageRecord) -> bool {
        self.omits_body(mailbox, r) && !self.image.has_body(&r.guid)
    }

    /// A partial cluster server asked by a user replica's agent for bodies it omitted:
    /// fetches them from its peers and holds the answer until they are here. Whether it
    /// holds it.
    pub(crate) fn wait_for_omitted_bodies(
        &mut self,
        id: RequestId,
        mailbox: &MailboxKey,
        guids: &[Guid],
        text_parts: bool,
    ) -> bool {
        if self.cfg.user_replica || !self.omits_some() || self.omitted.waiting.len() >= WAITING_MAX {
            return false;
        }
        let Some(m) = self.image.mailbox(mailbox) else { return false };
        let answered_max =
            if text_parts { TEXT_PARTS_ANSWERED_MAX } else { super::replica_serving::REPLICA_BODIES_MAX };
        let absent: Vec<MessageRecord> = guids
            .iter()
            .take(answered_max)
            .filter_map(|g| m.messages.find_guid(*g))
            .filter(|r| self.omits(mailbox, r))
            .filter(|r| !(text_parts && self.image.disk().text_parts.contains_key(&r.guid)))
            .cloned()
            .collect();
        if absent.is_empty() {
            return false;
        }
        for r in &absent {
            self.want_body(r.guid, Some(r.checksum), None, false);
        }
        let until = self.now.plus_us(self.cfg.request_timeout_us);
        let waiting = WaitingBodies { id, mailbox: mailbox.clone(), guids: guids.to_vec(), until, text_parts };
        self.omitted.waiting.push(waiting);
        true
    }

    /// Answers the held body reads whose bodies are here (or no longer wanted: gone,
    /// or found nowhere), and those held long enough.
    pub(crate) fn answer_waiting_bodies(&mut self) {
        if self.omitted.waiting.is_empty() {
            return;
        }
        let now = self.now;
        let (ready, waiting): (Vec<WaitingBodies>, Vec<WaitingBodies>) =
            std::mem::take(&mut self.omitted.waiting).into_iter().partition(|w| {
                w.until <= now || w.guids.iter().all(|g| self.image.has_body(g) || !self.body_fetch.is_wanted(g))
            });
        self.omitted.waiting = waiting;
        for w in ready {
            if w.text_parts {
                self.answer_text_parts(w.id, &w.mailbox, &w.guids);
            } else {
                self.answer_replica_bodies(w.id, &w.mailbox, &w.guids);
            }
        }
    }

    /// Queues an omitted body for the agent's next round. False when the queue is full.
    pub(crate) fn want_omitted(&mut self, mailbox: &MailboxKey, guid: Guid) -> bool {
        let queue = &mut self.omitted.wanted;
        if queue.len() >= WANTED_MAX && !queue.contains_key(&guid) {
            return false;
        }
        queue.insert(guid, mailbox.clone());
        true
    }

    /// Whether `guid` in `src` is a message whose body this replica omits (a COPY of it
    /// cannot be made here until the body comes): if so it is queued for the agent.
    pub(crate) fn omitted_source(&mut self, src: &MailboxKey, guid: Guid) -> bool {
        let Some(record) = self.image.mailbox(src).and_then(|m| m.messages.find_guid(guid)).cloned() else {
            return false;
        };
        if !self.omits(src, &record) {
            return false;
        }
        self.want_omitted(src, guid);
        true
    }

    /// A client's read of one message's body.
    pub(crate) fn on_fetch_body(&mut self, id: RequestId, mailbox: &MailboxKey, uid: Uid) {
        let record = self.image.mailbox(mailbox).and_then(|m| m.messages.get(&uid)).cloned();
        let Some(record) = record else {
            let reason = format!("{mailbox} has no message at UID {uid}");
            self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason });
            return;
        };
        if let Some(body) = self.image.intact_body(record.guid) {
            let on_loan = self.image.disk().on_loan.contains(&record.guid);
            if on_loan {
                // Read once for a client and going again: its text parts stay.
                self.keep_text_parts(&record, &body);
            }
            self.out.reply(id, ClientReply::Body { guid: record.guid, body });
            if on_loan {
                // Fetched for this read, not to keep (a laptop short of disk).
                self.commit(StoreWrite::OnLoan { guid: record.guid, on_loan: false });
                self.commit(StoreWrite::RemoveBody { guid: record.guid });
            }
            return;
        }
        if self.omits(mailbox, &record) {
            let keep = self.cfg.partial.as_ref().is_none_or(|p| p.keep_fetched);
            // Never one of this server's own messages (whose body is here, so never asked
            // for), which may be the only copy.
            let on_loan = &self.image.disk().on_loan;
            if !keep && on_loan.len() < WANTED_MAX && !on_loan.contains(&record.guid) {
                self.commit(StoreWrite::OnLoan { guid: record.guid, on_loan: true });
            }
            if !self.cfg.user_replica {
                // A partial cluster server: a peer has it.
                self.want_body(record.guid, Some(record.checksum), None, false);
                let reason = "the body of this message is on another server: try again shortly".to_string();
                self.out.reply(id, ClientReply::Failed { kind: FailKind::Temporary, reason });
                return;
            }
            let reason = if self.want_omitted(mailbox, record.guid) {
                "the body of this message is on the server: the next sync brings it".to_string()
            } else {
                format!("{WANTED_MAX} bodies wait for the next sync already: try again after it")
            };
            self.out.reply(id, ClientReply::Failed { kind: FailKind::Temporary, reason });
            return;
        }
        // Missing or damaged: the scrub's repair brings it back from a peer.
        self.want_body(record.guid, Some(record.checksum), None, true);
        let reason = "the body of this message is being repaired: try again shortly".to_string();
        self.out.reply(id, ClientReply::Failed { kind: FailKind::Temporary, reason });
    }

    /// Messages of the mailboxes this partial user replica holds whose bodies it omits and
    /// whose text parts it lacks, for the agent to bring (up to [`TEXTS_WANTED_MAX`]).
    pub(crate) fn texts_wanted(&self) -> Vec<(MailboxKey, Guid)> {
        let Some(partial) = self.user_replica_partial().filter(|p| p.body_bytes_max.is_some()) else {
            return Vec::new();
        };
        let mut wanted = Vec::new();
        for key in self.image.mailboxes().keys().filter(|k| partial.holds_mailbox(&k.name)) {
            let room = TEXTS_WANTED_MAX - wanted.len();
            wanted.extend(self.lacking_text_parts(key).take(room).map(|g| (key.clone(), g)));
            if wanted.len() >= TEXTS_WANTED_MAX {
                break;
            }
        }
        wanted
    }

    /// [`Server::texts_wanted`] of one mailbox (after an adopt into it).
    pub(crate) fn texts_wanted_of(&self, mailbox: &MailboxKey) -> Vec<Guid> {
        if self.user_replica_partial().is_none_or(|p| p.body_bytes_max.is_none()) {
            return Vec::new();
        }
        self.lacking_text_parts(mailbox).take(TEXTS_WANTED_MAX).collect()
    }

    fn lacking_text_parts<'a>(&'a self, mailbox: &'a MailboxKey) -> impl Iterator<Item = Guid> + 'a {
        let text_parts = &self.image.disk().text_parts;
        let messages = self.image.mailbox(mailbox).into_iter().flat_map(|m| m.messages.values());
        messages.filter(move |r| self.omits(mailbox, r) && !text_parts.contains_key(&r.guid)).map(|r| r.guid)
    }

    /// Text parts the agent brought: each kept when a live record of `mailbox` names it,
    /// its body is omitted here, and it is no larger than the message allows.
    pub(crate) fn on_replica_keep_text_parts(&mut self, id: RequestId, mailbox: &MailboxKey, parts: Vec<(Guid, Body)>) {
        if !self.cfg.user_replica || self.omitted_above().is_none() {
            let reason = "only a partial user replica keeps text parts".to_string();
            self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason });
            return;
        }
        if let Some(reason) = over_push_limits(&parts, "text parts") {
            self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason });
            return;
        }
        let mut kept = 0u32;
        for (guid, bytes) in parts {
            let Some(record) = self.image.mailbox(mailbox).and_then(|m| m.messages.find_guid(guid)).cloned() else {
                continue;
            };
            let fits = bytes.len() <= (record.size as usize).saturating_add(TEXT_PARTS_OVERHEAD_MAX);
            if !fits || !self.omits(mailbox, &record) || self.image.disk().text_parts.contains_key(&guid) {
                continue;
            }
            self.commit(StoreWrite::PutTextParts { guid, bytes });
            kept += 1;
        }
        self.out.reply_when_durable(id, ClientReply::BodiesKept { kept });
    }

    /// `ReplicaTextParts` answered with what is here now: the text parts held, and those
    /// the driver cuts from the intact bodies held (within `ReplicaBodies`' limits).
    pub(crate) fn answer_text_parts(&mut self, id: RequestId, mailbox: &MailboxKey, guids: &[Guid]) {
        let live: Vec<Guid> = match self.image.mailbox(mailbox) {
            Some(m) => {
                guids.iter().take(TEXT_PARTS_ANSWERED_MAX).copied().filter(|g| m.messages.has_guid(*g)).collect()
            }
            None => Vec::new(),
        };
        let (held, to_cut): (Vec<Guid>, Vec<Guid>) =
            live.into_iter().partition(|g| self.image.disk().text_parts.contains_key(g));
        let mut parts = self.text_parts_held(&held);
        for (guid, body) in self.intact_bodies_of(mailbox, &to_cut) {
            if let Some(cut) = self.image.cut_text_parts(guid, &body) {
                parts.push((guid, cut));
            }
        }
        self.out.reply(id, ClientReply::ReplicaTextParts { parts });
    }

    /// Keeps the text parts of a message whose body this server omits, cut from its
    /// whole body (which must be the record's) while that is here.
    pub(crate) fn keep_text_parts(&mut self, record: &MessageRecord, body: &[u8]) {
        // Text parts stand in for a body too large to hold, not for mail a partial
        // server's patterns or date leave out (of which it holds the records only).
        if self.omitted_above().is_none_or(|max| record.size <= max)
            || self.image.disk().text_parts.contains_key(&record.guid)
            || crate::hash::body_checksum(body) != record.checksum
        {
            return;
        }
        if let Some(bytes) = self.image.cut_text_parts(record.guid, body) {
            self.commit(StoreWrite::PutTextParts { guid: record.guid, bytes });
        }
    }

    /// The text parts held of these messages (at most `ReplicaBodies`' count).
    pub(crate) fn text_parts_held(&self, guids: &[Guid]) -> Vec<(Guid, Body)> {
        let text_parts = &self.image.disk().text_parts;
        guids
            .iter()
            .take(super::replica_serving::REPLICA_BODIES_MAX)
            .filter_map(|g| text_parts.get(g).map(|b| (*g, b.clone())))
            .collect()
    }

    /// Removes the text parts (and the loan marks) of messages no live record holds any
    /// more.
    pub(crate) fn collect_text_parts(&mut self) {
        let disk = self.image.disk();
        let unreferenced = |g: &&Guid| !self.image.is_referenced(**g);
        let gone: Vec<Guid> =
            disk.text_parts.keys().filter(unreferenced).take(TEXT_PARTS_COLLECTED_MAX).copied().collect();
        let returned: Vec<Guid> =
            disk.on_loan.iter().filter(unreferenced).take(TEXT_PARTS_COLLECTED_MAX).copied().collect();
        for guid in gone {
            self.commit(StoreWrite::RemoveTextParts { guid });
        }
        for guid in returned {
            self.commit(StoreWrite::OnLoan { guid, on_loan: false });
        }
    }

    /// Bodies the agent brought for this replica's clients: each kept when a live
    /// record of `mailbox` names it and its bytes match that record's checksum.
    pub(crate) fn on_replica_keep_bodies(&mut self, id: RequestId, mailbox: &MailboxKey, bodies: Vec<(Guid, Body)>) {
        if !self.cfg.user_replica {
            let reason = "only a user replica is brought bodies by its agent".to_string();
            self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason });
            return;
        }
        if let Some(reason) = over_push_limits(&bodies, "bodies") {
            self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason });
            return;
        }
        let mut kept = 0u32;
        for (guid, bytes) in bodies {
            let checksum = self.image.mailbox(mailbox).and_then(|m| m.messages.find_guid(guid)).map(|r| r.checksum);
            self.omitted.wanted.remove(&guid);
            let Some(checksum) = checksum else { continue };
            if self.image.has_body(&guid) || bytes.checksum() != checksum {
                continue;
            }
            self.image.put_checked_body(&mut self.out, guid, checksum, bytes);
            kept += 1;
        }
        self.out.reply_when_durable(id, ClientReply::BodiesKept { kept });
    }
}
