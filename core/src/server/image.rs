//! The server's image of its disk: what the store holds, durable or about to be, and the
//! caches derived from it (mailbox digests, body checks, messages that may lack a body).
//! Every change goes through [`Image::commit`], which applies a [`StoreWrite`] and emits
//! the same write, so the image and the disk a restart reads can never disagree; the
//! simulator checks after every input that the image equals the replay of the writes.
//! The one exception is a merge, which changes a mailbox in place (a copy per merge
//! would cost the whole mailbox) and then commits what it changed: [`Image::merge`]
//! holds both halves.

use super::outbox::Outbox;
use crate::MergeRules;
use crate::io::WriteId;
use crate::mailbox::{self, MergeOutcome};
use crate::store::{BodyStore, DiskImage, PeerLog, StoreWrite, StoredBody, StoredMailbox};
use crate::types::*;
use crate::{Change, MailboxState, Summary};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Whether a write committed to the image is in it already (a merge changes the mailbox
/// in place, then writes what it did).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    No,
    Already,
}

/// Bodies, and bytes of them, read back and checked against their checksum per scrub
/// (a maintenance pass): the disk is walked at a rate that does not compete with clients.
const SCRUB_PER_PASS_MAX: usize = 256;
const SCRUB_BYTES_PER_PASS_MAX: u64 = 4 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Image {
    disk: DiskImage,
    /// The bytes of the bodies `disk` lists, owned by the driver (not in a snapshot: a
    /// restored server is given the driver's store).
    #[serde(skip, default = "no_bodies")]
    bodies: Box<dyn BodyStore>,
    /// Bodies written but not yet reported durable: the driver may not have stored them
    /// yet, so their bytes are read from here. Dropped once durable.
    unsynced: BTreeMap<Guid, (WriteId, Body)>,
    /// For each write not yet durable, oldest first, what it replaced of what a client
    /// is shown (a mailbox's meta, lifecycle and records): the durable store is the image
    /// with these undone, so reads are answered from it at once, also while the disk is
    /// full and nothing becomes durable.
    undo: VecDeque<(WriteId, MailboxKey, Undo)>,
    /// Live records per GUID, over every mailbox (kept from each write's before-image
    /// and value), and the stored bodies that lost their last one: candidates for
    /// collection (see `Server::collect_bodies`).
    live_refs: BTreeMap<Guid, u32>,
    unreferenced: BTreeSet<Guid>,
    /// How many entries of each peer's log name each mailbox: anti-entropy leaves a
    /// mailbox alone while its changes are still on the way, and a full log picks the
    /// mailboxes it drops by these counts, both without reading the logs.
    logged: BTreeMap<(Sid, MailboxKey), u32>,
    /// Each mailbox's digest, kept up to date from the writes that change the mailbox
    /// (built from the mailbox when first needed).
    digests: BTreeMap<MailboxKey, mailbox::DigestParts>,
    /// Whether each stored body matched its checksum when last checked: a cache of
    /// `body_checksum(bytes) == checksum`, dropped whenever the stored body changes.
    body_verdicts: BTreeMap<Guid, bool>,
    /// Messages that may lack a body: written while it was not here, or holding one
    /// that was removed.
    scrub_suspects: BTreeSet<(MailboxKey, Uid)>,
    /// The server just started: the first scrub looks at every message.
    scrub_rescan: bool,
    scrub_cursor: Option<Guid>,
}

fn no_bodies() -> Box<dyn BodyStore> {
    Box::new(crate::store::MemoryBodies::default())
}

/// What a write replaced (see `Image::undo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Undo {
    /// The mailbox did not exist.
    Absent,
    Meta {
        uidvalidity: u32,
        uidnext: Uid,
        highest_modseq: ModSeq,
    },
    Lifecycle(Lifecycle),
    Record {
        uid: Uid,
        before: Option<MessageRecord>,
    },
}

impl Undo {
    /// A mailbox's meta as it is now, to be restored by undoing a later write.
    fn meta_of(m: &StoredMailbox) -> Undo {
        Undo::Meta { uidvalidity: m.uidvalidity, uidnext: m.uidnext, highest_modseq: m.highest_modseq }
    }
}

/// A mailbox's parts a merge may change, as they were before it (see `Image::merge`).
struct MergeSnapshot {
    meta: Undo,
    lifecycle: Lifecycle,
    records: BTreeMap<Uid, Option<MessageRecord>>,
}

/// What one scrub found: bodies that fail their checksum, and messages with no body
/// here that nobody is fetching yet, each as (GUID, checksum).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ScrubFindings {
    pub(crate) corrupt: Vec<(Guid, u64)>,
    pub(crate) missing: Vec<(Guid, u64)>,
}

impl Image {
    /// The driver's body store, given to an image restored from a snapshot.
    pub(crate) fn set_bodies(&mut self, bodies: Box<dyn BodyStore>) {
        self.bodies = bodies;
    }

    /// This image with its caches, reading bodies from `bodies` (which must hold what
    /// ours holds): for a model checker that explores two futures of one state.
    pub(crate) fn fork(&self, bodies: Box<dyn BodyStore>) -> Image {
        Image {
            disk: self.disk.clone(),
            bodies,
            unsynced: self.unsynced.clone(),
            undo: self.undo.clone(),
            live_refs: self.live_refs.clone(),
            unreferenced: self.unreferenced.clone(),
            logged: self.logged.clone(),
            digests: self.digests.clone(),
            body_verdicts: self.body_verdicts.clone(),
            scrub_suspects: self.scrub_suspects.clone(),
            scrub_rescan: self.scrub_rescan,
            scrub_cursor: self.scrub_cursor,
        }
    }

    /// Writes what the image holds that is not derived from the rest (the durable image
    /// and the writes not yet durable), leaving out the caches.
    pub(crate) fn describe_state(&self, into: &mut impl std::fmt::Write) -> std::fmt::Result {
        write!(into, "{:?}|{:?}|", self.disk, self.undo)?;
        for (guid, (id, body)) in &self.unsynced {
            write!(into, "{guid:?}@{id:?}:{}:{:016x};", body.len(), body.checksum())?;
        }
        Ok(())
    }

    pub(crate) fn new(disk: DiskImage, bodies: Box<dyn BodyStore>) -> Image {
        let live_refs = count_live_refs(&disk);
        // Bodies no message holds (left by an earlier run) are collected too.
        let unreferenced = disk.bodies.keys().filter(|g| !live_refs.contains_key(g)).copied().collect();
        let logged = count_logged(&disk);
        Image {
            live_refs,
            unreferenced,
            logged,
            disk,
            bodies,
            unsynced: BTreeMap::new(),
            undo: VecDeque::new(),
            digests: BTreeMap::new(),
            body_verdicts: BTreeMap::new(),
            scrub_suspects: BTreeSet::new(),
            scrub_rescan: true,
            scrub_cursor: None,
        }
    }

    pub(crate) fn disk(&self) -> &DiskImage {
        &self.disk
    }

    pub(crate) fn mailbox(&self, key: &MailboxKey) -> Option<&StoredMailbox> {
        self.disk.mailboxes.get(key)
    }

    /// The mailbox as stored, or as a new one would start (not stored by this): what a
    /// master orders its first write against.
    pub(crate) fn mailbox_or_new(&self, key: &MailboxKey) -> std::borrow::Cow<'_, StoredMailbox> {
        match self.disk.mailboxes.get(key) {
            Some(m) => std::borrow::Cow::Borrowed(m),
            None => std::borrow::Cow::Owned(mailbox::new_mailbox(key)),
        }
    }

    pub(crate) fn mailboxes(&self) -> &BTreeMap<MailboxKey, StoredMailbox> {
        &self.disk.mailboxes
    }

    pub(crate) fn body(&self, guid: &Guid) -> Option<&StoredBody> {
        self.disk.bodies.get(guid)
    }

    pub(crate) fn has_body(&self, guid: &Guid) -> bool {
        self.disk.bodies.contains_key(guid)
    }

    /// The stored bytes of a body, as they are now (not checked).
    pub(crate) fn stored_bytes(&self, guid: Guid) -> Option<Body> {
        if !self.disk.bodies.contains_key(&guid) {
            return None;
        }
        match self.unsynced.get(&guid) {
            Some((_, bytes)) => Some(bytes.clone()),
            None => self.bodies.read(guid),
        }
    }

    /// The body's bytes if they are here and match their checksum.
    pub(crate) fn intact_body(&mut self, guid: Guid) -> Option<Body> {
        let stored = *self.disk.bodies.get(&guid)?;
        let bytes = self.stored_bytes(guid)?;
        let intact = *self.body_verdicts.entry(guid).or_insert_with(|| bytes.checksum() == stored.checksum);
        intact.then_some(bytes)
    }

    /// The text parts the driver cuts from a whole body (see `BodyStore::text_parts`).
    pub(crate) fn cut_text_parts(&self, guid: Guid, body: &[u8]) -> Option<Body> {
        self.bodies.text_parts(guid, body)
    }

    /// Writes up to `upto` are on disk: the driver's store holds their bodies now.
    pub(crate) fn durable(&mut self, upto: WriteId) {
        self.unsynced.retain(|_, (id, _)| *id > upto);
        while self.undo.front().is_some_and(|(id, _, _)| *id <= upto) {
            self.undo.pop_front();
        }
    }

    /// The mailbox as the durable store holds it (None: not there), for a client's read.
    /// Costs nothing extra unless writes to it are pending.
    pub(crate) fn durable_mailbox(&self, key: &MailboxKey) -> Option<std::borrow::Cow<'_, StoredMailbox>> {
        self.durable_mailbox_as(key, false)
    }

    /// [`Image::durable_mailbox`] for a user replica's pull, which its sync agent takes
    /// as "pushed up to HIGHESTMODSEQ": UIDNEXT and HIGHESTMODSEQ below every pending
    /// change. Writes become durable in order, not in groups, so the store may hold an
    /// operation's meta before its record; a pull that showed HIGHESTMODSEQ 2 without
    /// the record at modseq 2 had that record never pushed (explore seed 36846).
    /// Clients' reads keep the durable values, which never go down (`monotonic`).
    pub(crate) fn durable_mailbox_to_push(&self, key: &MailboxKey) -> Option<std::borrow::Cow<'_, StoredMailbox>> {
        self.durable_mailbox_as(key, true)
    }

    fn durable_mailbox_as(&self, key: &MailboxKey, below_pending: bool) -> Option<std::borrow::Cow<'_, StoredMailbox>> {
        let now = self.disk.mailboxes.get(key);
        let mut pending = self.undo.iter().filter(|(_, k, _)| k == key).map(|(_, _, u)| u).peekable();
        let Some(first) = pending.peek() else { return now.map(std::borrow::Cow::Borrowed) };
        if **first == Undo::Absent {
            return None;
        }
        let now = now?;
        let mut m = now.clone();
        // The lowest UID a pending write adds and the lowest modseq a pending write
        // shows a change at (the record's modseq now, or its removal's tombstone's).
        let (mut pending_uid_min, mut pending_modseq_min) = (Uid::MAX, ModSeq::MAX);
        let (mut meta_done, mut lifecycle_done, mut records_done) = (false, false, BTreeSet::new());
        // The oldest pending write's before-image of each part is its durable value.
        for undo in pending {
            match undo {
                Undo::Absent => debug_assert!(false, "a mailbox is absent only before its oldest pending write"),
                Undo::Meta { uidvalidity, uidnext, highest_modseq } if !meta_done => {
                    meta_done = true;
                    (m.uidvalidity, m.uidnext, m.highest_modseq) = (*uidvalidity, *uidnext, *highest_modseq);
                }
                Undo::Lifecycle(lifecycle) if !lifecycle_done => {
                    lifecycle_done = true;
                    m.lifecycle = *lifecycle;
                }
                Undo::Record { uid, before } if records_done.insert(*uid) => {
                    let changed_at = match (now.messages.get(uid), before) {
                        (Some(record), _) => Some(record.modseq),
                        (None, Some(gone)) => now.tombstones.get(&(*uid, gone.guid)).map(|t| t.modseq),
                        (None, None) => None,
                    };
                    if let Some(modseq) = changed_at {
                        pending_modseq_min = pending_modseq_min.min(modseq);
                    }
                    match before {
                        Some(record) => {
                            m.messages.insert(*uid, record.clone());
                        }
                        None => {
                            pending_uid_min = pending_uid_min.min(*uid);
                            m.messages.remove(uid);
                        }
                    }
                }
                _ => {}
            }
        }
        if below_pending && (pending_uid_min < m.uidnext || pending_modseq_min <= m.highest_modseq) {
            // Never below what the view itself shows.
            let (uid_shown_max, modseq_shown_max) =
                m.messages.iter().fold((0, 0), |(u, s), (uid, r)| (u.max(*uid), s.max(r.modseq)));
            m.uidnext = m.uidnext.min(pending_uid_min).max(uid_shown_max.saturating_add(1));
            m.highest_modseq = m.highest_modseq.min(pending_modseq_min.saturating_sub(1)).max(modseq_shown_max);
        }
        Some(std::borrow::Cow::Owned(m))
    }

    /// Keeps `live_refs` in step with a record write: its before-image loses a reference,
    /// its value gains one.
    fn count_refs(&mut self, write: &StoreWrite, undo: Option<&Undo>) {
        let added = match write {
            StoreWrite::PutMessage { record, .. } => Some(record.guid),
            StoreWrite::RemoveMessage { .. } => None,
            _ => return,
        };
        if let Some(Undo::Record { before: Some(before), .. }) = undo {
            match self.live_refs.get_mut(&before.guid) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    self.live_refs.remove(&before.guid);
                    if self.disk.bodies.contains_key(&before.guid) {
                        self.unreferenced.insert(before.guid);
                    }
                }
                None => debug_assert!(false, "a replaced record was counted: {before:?}"),
            }
        }
        if let Some(guid) = added {
            *self.live_refs.entry(guid).or_default() += 1;
            self.unreferenced.remove(&guid);
        }
    }

    /// Stored bodies that no live record holds any more (some may be wanted still).
    pub(crate) fn unreferenced_bodies(&self) -> impl Iterator<Item = Guid> + '_ {
        self.unreferenced.iter().copied()
    }

    /// Whether any live record holds this GUID.
    pub(crate) fn is_referenced(&self, guid: Guid) -> bool {
        self.live_refs.contains_key(&guid)
    }

    /// Removes a body no record holds (see `Server::collect_bodies`).
    pub(crate) fn remove_unreferenced_body(&mut self, out: &mut Outbox, guid: Guid) {
        debug_assert!(!self.live_refs.contains_key(&guid), "a live message's body is kept");
        self.unreferenced.remove(&guid);
        if self.disk.bodies.contains_key(&guid) {
            self.commit(out, StoreWrite::RemoveBody { guid });
        }
    }

    /// Debug check: the reference counts equal a count over every mailbox, and the log
    /// counts a count over every log.
    pub(crate) fn refs_consistent(&self) -> bool {
        count_live_refs(&self.disk) == self.live_refs && count_logged(&self.disk) == self.logged
    }

    /// Whether `peer`'s log holds a change of `mailbox`.
    pub(crate) fn is_logged(&self, peer: Sid, mailbox: &MailboxKey) -> bool {
        self.logged.contains_key(&(peer, mailbox.clone()))
    }

    /// How many entries of `peer`'s log name each mailbox.
    pub(crate) fn logged_counts(&self, peer: Sid) -> impl Iterator<Item = (&MailboxKey, u32)> {
        let from = (peer, MailboxKey::new("", ""));
        self.logged.range(from..).take_while(move |((p, _), _)| *p == peer).map(|((_, k), n)| (k, *n))
    }

    /// Keeps the log counts in step with a log write about to be applied.
    fn count_logged_write(&mut self, write: &StoreWrite) {
        let (peer, seqs, added) = match write {
            StoreWrite::LogAppend { peer, seq, change } => (*peer, std::slice::from_ref(seq), Some(change.mailbox())),
            StoreWrite::LogRemove { peer, seqs } | StoreWrite::LogAcked { peer, seqs } => {
                (*peer, seqs.as_slice(), None)
            }
            _ => return,
        };
        let log = self.disk.logs.get(&peer);
        for seq in seqs {
            let Some(gone) = log.and_then(|l| l.entries.get(seq)) else { continue };
            let key = (peer, gone.mailbox().clone());
            if let Some(n) = self.logged.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.logged.remove(&key);
                }
            }
        }
        if let Some(mailbox) = added {
            *self.logged.entry((peer, mailbox.clone())).or_default() += 1;
        }
    }

    /// What a write is about to replace of what a client is shown.
    fn before_image(&self, write: &StoreWrite) -> Option<(MailboxKey, Undo)> {
        let (key, uid) = match write {
            StoreWrite::MailboxMeta { mailbox, .. } | StoreWrite::MailboxLifecycle { mailbox, .. } => (mailbox, None),
            StoreWrite::PutMessage { mailbox, record } => (mailbox, Some(record.uid)),
            StoreWrite::RemoveMessage { mailbox, uid } => (mailbox, Some(*uid)),
            // A tombstone is not shown, but its write creates a missing mailbox.
            StoreWrite::PutTombstone { mailbox, .. } => (mailbox, None),
            _ => return None,
        };
        let Some(m) = self.disk.mailboxes.get(key) else { return Some((key.clone(), Undo::Absent)) };
        let undo = match (write, uid) {
            (_, Some(uid)) => Undo::Record { uid, before: m.messages.get(&uid).cloned() },
            (StoreWrite::MailboxMeta { .. }, _) => Undo::meta_of(m),
            (StoreWrite::MailboxLifecycle { .. }, _) => Undo::Lifecycle(m.lifecycle),
            _ => return None,
        };
        Some((key.clone(), undo))
    }

    /// The driver found the stored body changed: it is checked again before use.
    pub(crate) fn body_changed(&mut self, guid: Guid) {
        self.body_verdicts.remove(&guid);
    }

    pub(crate) fn log(&self, peer: Sid) -> Option<&PeerLog> {
        self.disk.logs.get(&peer)
    }

    pub(crate) fn logs(&self) -> &BTreeMap<Sid, PeerLog> {
        &self.disk.logs
    }

    /// Applies a write to the image, keeps the caches in step and emits it.
    pub(crate) fn commit(&mut self, out: &mut Outbox, write: StoreWrite) -> WriteId {
        let undo = self.before_image(&write);
        debug_assert!(!matches!(write, StoreWrite::NewValidity { .. }), "a new UIDVALIDITY is written by a merge");
        self.commit_with(out, write, undo, Applied::No)
    }

    /// A write of a merge: the merge changed the mailbox first, in place (the
    /// before-image is given), so the write is not applied to the image again.
    fn commit_undo(&mut self, out: &mut Outbox, write: StoreWrite, undo: Option<(MailboxKey, Undo)>) -> WriteId {
        debug_assert!(self.merge_applied(&write), "a merge's write says what the merge did: {write:?}");
        self.commit_with(out, write, undo, Applied::Already)
    }

    /// Whether the image already holds what a merge's `write` says.
    fn merge_applied(&self, write: &StoreWrite) -> bool {
        let mailbox = |k: &MailboxKey| self.disk.mailboxes.get(k);
        match write {
            StoreWrite::MailboxMeta { mailbox: k, uidvalidity, uidnext, highest_modseq } => {
                mailbox(k).is_some_and(|m| {
                    (m.uidvalidity, m.uidnext, m.highest_modseq) == (*uidvalidity, *uidnext, *highest_modseq)
                })
            }
            StoreWrite::PutMessage { mailbox: k, record } => {
                mailbox(k).is_some_and(|m| m.messages.get(&record.uid) == Some(record))
            }
            StoreWrite::RemoveMessage { mailbox: k, uid } => mailbox(k).is_none_or(|m| m.messages.get(uid).is_none()),
            StoreWrite::PutTombstone { mailbox: k, tombstone: t } => {
                mailbox(k).is_some_and(|m| m.tombstones.get(&(t.uid, t.guid)) == Some(t))
            }
            StoreWrite::MailboxLifecycle { mailbox: k, lifecycle } => {
                mailbox(k).is_some_and(|m| m.lifecycle == *lifecycle)
            }
            StoreWrite::RetireUids { mailbox: k, retired } => {
                mailbox(k).is_some_and(|m| m.retired == *retired && m.tombstones.values().all(|t| !retired.covers(t)))
            }
            // Never applied: the merge emptied the image's copy and filled it anew.
            StoreWrite::NewValidity { .. } => true,
            _ => false,
        }
    }

    fn commit_with(
        &mut self,
        out: &mut Outbox,
        write: StoreWrite,
        undo: Option<(MailboxKey, Undo)>,
        applied: Applied,
    ) -> WriteId {
        self.count_refs(&write, undo.as_ref().map(|(_, u)| u));
        self.count_logged_write(&write);
        if applied == Applied::No {
            self.disk.apply(&write);
        }
        self.follow(&write);
        let unsynced = match &write {
            StoreWrite::PutBody { guid, bytes, .. } => Some((*guid, bytes.clone())),
            _ => None,
        };
        let id = out.write(write);
        if let Some((guid, bytes)) = unsynced {
            self.unsynced.insert(guid, (id, bytes));
        }
        if let Some((key, undo)) = undo {
            self.undo.push_back((id, key, undo));
        }
        id
    }

    /// Keeps the caches derived from the image in step with a write just applied.
    fn follow(&mut self, write: &StoreWrite) {
        match write {
            StoreWrite::PutMessage { mailbox, record } => {
                if let Some(parts) = self.digests.get_mut(mailbox) {
                    parts.put_record(record);
                }
                if !self.disk.bodies.contains_key(&record.guid) {
                    self.scrub_suspects.insert((mailbox.clone(), record.uid));
                }
            }
            StoreWrite::RemoveMessage { mailbox, uid } => {
                if let Some(parts) = self.digests.get_mut(mailbox) {
                    parts.remove_record(*uid);
                }
            }
            StoreWrite::PutTombstone { mailbox, tombstone } => {
                if let Some(parts) = self.digests.get_mut(mailbox) {
                    parts.put_tombstone(tombstone);
                }
            }
            StoreWrite::RetireUids { mailbox, .. } | StoreWrite::NewValidity { mailbox } => {
                // Rare (a collection, a new UIDVALIDITY): the digest is built again when
                // next asked.
                self.digests.remove(mailbox);
            }
            StoreWrite::PutBody { guid, .. } => {
                self.body_verdicts.remove(guid);
            }
            StoreWrite::RemoveBody { guid } => {
                self.body_verdicts.remove(guid);
                self.unsynced.remove(guid);
                self.unreferenced.remove(guid);
                // Only the messages of this GUID can have lost their body (a look per
                // mailbox, not a scan of every message).
                for (key, m) in &self.disk.mailboxes {
                    self.scrub_suspects.extend(m.messages.uids_of(*guid).map(|uid| (key.clone(), uid)));
                }
            }
            _ => {}
        }
    }

    /// Makes sure the mailbox exists here, new ones with `uidvalidity` (or the one its
    /// name gives) and written at once. True when it was created.
    pub(crate) fn create_mailbox(&mut self, out: &mut Outbox, key: &MailboxKey, uidvalidity: Option<u32>) -> bool {
        if self.disk.mailboxes.contains_key(key) {
            return false;
        }
        let fresh = mailbox::new_mailbox(key);
        let write = StoreWrite::MailboxMeta {
            mailbox: key.clone(),
            uidvalidity: uidvalidity.unwrap_or(fresh.uidvalidity),
            uidnext: fresh.uidnext,
            highest_modseq: fresh.highest_modseq,
        };
        self.commit(out, write);
        debug_assert!(self.disk.mailboxes.contains_key(key));
        true
    }

    /// Stores a body whose bytes were checked against `checksum`.
    pub(crate) fn put_checked_body(&mut self, out: &mut Outbox, guid: Guid, checksum: u64, bytes: Body) {
        debug_assert_eq!(bytes.checksum(), checksum, "a checked body matches its checksum");
        debug_assert!(u32::try_from(bytes.len()).is_ok(), "a body's size fits a record");
        self.commit(out, StoreWrite::PutBody { guid, checksum, bytes });
        self.body_verdicts.insert(guid, true);
        if !self.live_refs.contains_key(&guid) {
            // Stored for a record placed right after, or fetched for one expunged since:
            // the latter is collected.
            self.unreferenced.insert(guid);
        }
    }

    /// Whether a body of `guid` is stored and not known to be damaged: what a replica
    /// can say of a copy without reading the bytes (the scrub reads them in its time).
    pub(crate) fn body_not_known_bad(&self, guid: Guid) -> bool {
        self.disk.bodies.contains_key(&guid) && self.body_verdicts.get(&guid) != Some(&false)
    }

    /// Whether the stored body of `guid` matches its checksum (None: no body stored).
    pub(crate) fn body_intact(&mut self, guid: Guid) -> Option<bool> {
        let stored = *self.disk.bodies.get(&guid)?;
        if let Some(verdict) = self.body_verdicts.get(&guid) {
            return Some(*verdict);
        }
        // A body the store cannot produce is as bad as a damaged one: fetched again.
        let now = match self.unsynced.get(&guid) {
            Some((_, bytes)) => Some(bytes.checksum()),
            None => self.bodies.checksum(guid),
        };
        let intact = now == Some(stored.checksum);
        self.body_verdicts.insert(guid, intact);
        Some(intact)
    }

    /// A mailbox's summary, its digest kept up to date.
    pub(crate) fn summary(&mut self, key: &MailboxKey) -> Option<Summary> {
        let m = self.disk.mailboxes.get(key)?;
        Some(cached_summary(&mut self.digests, key, m))
    }

    /// Summaries of the mailboxes `filter` accepts, in mailbox order.
    pub(crate) fn summaries_where(&mut self, filter: impl Fn(&MailboxKey) -> bool) -> Vec<Summary> {
        let digests = &mut self.digests;
        self.disk.mailboxes.iter().filter(|(k, _)| filter(k)).map(|(k, m)| cached_summary(digests, k, m)).collect()
    }

    /// Summaries of one user's mailboxes, in mailbox order: a range of the image (keys
    /// order by user first), not a pass over every user's.
    pub(crate) fn summaries_of_user(&mut self, user: &str) -> Vec<Summary> {
        let digests = &mut self.digests;
        let first = MailboxKey::new(user, "");
        self.disk
            .mailboxes
            .range(first..)
            .take_while(|(k, _)| &*k.user == user)
            .map(|(k, m)| cached_summary(digests, k, m))
            .collect()
    }

    /// Every mailbox's summary, with the digests known so far (no cache is filled).
    pub(crate) fn summaries(&self) -> Vec<Summary> {
        self.disk
            .mailboxes
            .iter()
            .map(|(k, m)| match self.digests.get(k).filter(|parts| parts.fits(m)) {
                Some(parts) => mailbox::summary_with_digest(k, m, parts.digest(m)),
                None => mailbox::summary(k, m),
            })
            .collect()
    }

    /// One bounded pass over the mailboxes in key order, from after `resume_after` (the
    /// last mailbox the previous pass examined) round to it: at most `examined_max`
    /// examined. Returns those `wanted` accepts, and where the next pass starts (None:
    /// this one went all the way round).
    pub(crate) fn mailbox_pass(
        &self,
        resume_after: Option<&MailboxKey>,
        examined_max: usize,
        mut wanted: impl FnMut(&MailboxKey, &StoredMailbox) -> bool,
    ) -> (Vec<MailboxKey>, Option<MailboxKey>) {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let mailboxes = &self.disk.mailboxes;
        let start = resume_after.filter(|k| mailboxes.contains_key(*k));
        let after = match start {
            Some(k) => mailboxes.range::<MailboxKey, _>((Excluded(k), Unbounded)),
            None => mailboxes.range::<MailboxKey, _>(..),
        };
        let before = start.map(|k| mailboxes.range::<MailboxKey, _>((Unbounded, Included(k))));
        let mut accepted = Vec::new();
        let mut last = None;
        for (examined, (key, m)) in after.chain(before.into_iter().flatten()).enumerate() {
            if examined == examined_max {
                return (accepted, last);
            }
            last = Some(key.clone());
            if wanted(key, m) {
                accepted.push(key.clone());
            }
        }
        (accepted, None)
    }

    /// Joins a piece of a peer's state into our copy of its mailbox (as master: deciding
    /// conflicts; as replica: refusing them) and commits what changed.
    pub(crate) fn merge(
        &mut self,
        out: &mut Outbox,
        state: &MailboxState,
        as_master: bool,
        rules: &MergeRules,
        reuse_retired_uid: bool,
    ) -> MergeOutcome {
        if self.disk.mailboxes.get(&state.mailbox).is_some_and(|m| mailbox::holds_exactly(m, state)) {
            return MergeOutcome::default();
        }
        if !as_master && let Some(outcome) = self.merge_new_record(out, state) {
            return outcome;
        }
        let key = &state.mailbox;
        let is_new = !self.disk.mailboxes.contains_key(key);
        let snapshot = self.merge_snapshot(state, as_master);
        let m = self.disk.mailboxes.entry(key.clone()).or_insert_with(|| mailbox::new_mailbox(key));
        if is_new {
            m.uidvalidity = state.uidvalidity;
        }
        let outcome = if as_master {
            mailbox::merge_as_master(m, state, rules)
        } else {
            mailbox::merge_as_replica(m, state, rules)
        };
        if reuse_retired_uid
            && as_master
            && outcome.renumbered > 0
            && let Some(retired) = outcome.tombstones.iter().filter(|t| !t.expunged).map(|t| t.uid).min()
        {
            // A deliberately broken variant (see `Bug::ReuseUidAfterRenumber`).
            m.uidnext = retired;
        }
        let snapshot = match snapshot {
            Some(snapshot) => snapshot,
            None => {
                // The mailbox's first write creates it with this meta and nothing else:
                // that is what the merge's other writes replace.
                let write = self.meta_write(key);
                self.commit_undo(out, write, Some((key.clone(), Undo::Absent)));
                let meta = self.disk.mailboxes.get(key).map(Undo::meta_of).unwrap_or(Undo::Absent);
                MergeSnapshot { meta, lifecycle: Lifecycle::default(), records: BTreeMap::new() }
            }
        };
        self.commit_outcome(out, key, &outcome, &snapshot);
        outcome
    }

    /// A replica's merge of one record at a UID and a GUID its mailbox has never held
    /// (what most R-SAVEs and R-COPYs bring): the merge's result and writes, as
    /// `mailbox::merge_as_replica` and `commit_outcome` would make them (the UIDNEXT
    /// and HIGHESTMODSEQ, then the record, with the same before-images), without their
    /// general bookkeeping. None for anything else: a new mailbox, another
    /// UIDVALIDITY, tombstones, retired UIDs or a lifecycle change either side, a UID
    /// in use or retired here, a message live here already.
    fn merge_new_record(&mut self, out: &mut Outbox, state: &MailboxState) -> Option<MergeOutcome> {
        let [r] = state.messages.as_slice() else { return None };
        let key = &state.mailbox;
        let m = self.disk.mailboxes.get_mut(key)?;
        let mut lifecycle = m.lifecycle;
        let plain = state.uidvalidity == m.uidvalidity
            && state.tombstones.is_empty()
            && state.retired.is_default()
            && !lifecycle.join(&state.lifecycle)
            && !m.messages.contains_key(&r.uid)
            && !m.retired.contains(r.uid)
            && m.tombstones_at(r.uid).next().is_none()
            && !m.messages.has_guid(r.guid);
        if !plain {
            return None;
        }
        let before = Undo::meta_of(m);
        let mut outcome = MergeOutcome::default();
        m.messages.insert(r.uid, r.clone());
        outcome.records.push(r.clone());
        // As the general merge raises them: by the record, then by the state.
        mailbox::bump_meta(m, r.uid.saturating_add(1), r.modseq, &mut outcome);
        mailbox::bump_meta(m, state.uidnext, state.highest_modseq, &mut outcome);
        let record = r.clone();
        let meta = self.meta_write(key);
        self.commit_undo(out, meta, Some((key.clone(), before)));
        let uid = record.uid;
        self.commit_undo(
            out,
            StoreWrite::PutMessage { mailbox: key.clone(), record },
            Some((key.clone(), Undo::Record { uid, before: None })),
        );
        Some(outcome)
    }

    /// Before a merge of `state`: the mailbox's meta, lifecycle and every record the
    /// merge may replace (None if the mailbox is new): those at the UIDs and GUIDs it
    /// brings, and, as master, those the master's merge moves whatever it brings (a
    /// message on a UID a tombstone retired, a message live at two UIDs).
    fn merge_snapshot(&self, state: &MailboxState, as_master: bool) -> Option<MergeSnapshot> {
        let m = self.disk.mailboxes.get(&state.mailbox)?;
        let mut records = BTreeMap::new();
        let brought =
            state.messages.iter().map(|r| (r.uid, r.guid)).chain(state.tombstones.iter().map(|t| (t.uid, t.guid)));
        let mut uids: BTreeSet<Uid> = BTreeSet::new();
        for (uid, guid) in brought {
            uids.insert(uid);
            uids.extend(m.messages.uids_of(guid));
        }
        if state.uidvalidity != m.uidvalidity {
            // A replica may take the master's UIDVALIDITY, dropping every record.
            uids.extend(m.messages.keys().copied());
        }
        // Ours on UIDs the piece retires: the merge moves or drops them (focus replace
        // seed 22902: a new server's message at a UID the cluster had retired was moved
        // with no before-image, and its durable copy vanished from reads while the
        // merge's writes were pending).
        for (first, last) in &state.retired.ranges {
            uids.extend(m.messages.uids_in(*first, *last));
        }
        if as_master {
            let retired =
                m.tombstones.keys().filter(|(uid, guid)| m.messages.get(uid).is_some_and(|r| r.guid != *guid));
            uids.extend(retired.map(|(uid, _)| *uid));
            uids.extend(mailbox::live_on_retired(m));
            for guid in m.messages.duplicated() {
                uids.extend(m.messages.uids_of(*guid));
            }
        }
        for uid in uids {
            records.insert(uid, m.messages.get(&uid).cloned());
        }
        Some(MergeSnapshot { meta: Undo::meta_of(m), lifecycle: m.lifecycle, records })
    }

    fn meta_write(&self, key: &MailboxKey) -> StoreWrite {
        let m = self.disk.mailboxes.get(key);
        debug_assert!(m.is_some(), "a mailbox's meta is written once it is in the image");
        StoreWrite::MailboxMeta {
            mailbox: key.clone(),
            uidvalidity: m.map(|m| m.uidvalidity).unwrap_or(0),
            uidnext: m.map(|m| m.uidnext).unwrap_or(1),
            highest_modseq: m.map(|m| m.highest_modseq).unwrap_or(0),
        }
    }

    /// The writes a merge's changes make, in the order a restart must replay them. Each
    /// write carries the mailbox's final value for what it touches: a merge can place a
    /// record and retire it again (or change it twice), and a replay of its first value
    /// would bring back on disk a binding the image no longer has.
    /// The before-images are those of `snapshot`, the mailbox before the merge.
    /// Writes a merge's result in an order that a crash after any prefix leaves safe: the
    /// raised UIDNEXT/HIGHESTMODSEQ first (so no UID or modseq is given out twice), then
    /// the live records (a message's new binding before the tombstone that retires its
    /// old one, so it is never only retired), then the tombstones (an expunge is
    /// recorded before its message goes), then the removals. The prefixes that leave a
    /// message both live and tombstoned are finished at start (see
    /// `finish_interrupted_merges`).
    fn commit_outcome(&mut self, out: &mut Outbox, key: &MailboxKey, outcome: &MergeOutcome, snapshot: &MergeSnapshot) {
        let undo = |u: Undo| Some((key.clone(), u));
        // The old UIDVALIDITY's records, removed (and uncounted) up front.
        let removed_first: BTreeSet<Uid> =
            if outcome.new_validity { outcome.removed.iter().copied().collect() } else { BTreeSet::new() };
        if outcome.new_validity {
            // First the old UIDVALIDITY's messages go, then its tombstones and retired
            // UIDs, before anything of the new one is written: a crash between these
            // writes never leaves an old message under the new UIDVALIDITY. The merge
            // already did all of this to the image.
            // Each UID once: a merge into another incarnation can remove one twice (the
            // old incarnation's record, then a record of the new one placed there and
            // taken out again by a later step of the merge, never written nor counted),
            // and a second removal with the old record as its before-image uncounted it
            // twice (focus incarnation seed 276: the debug assertion in `count_refs`; in
            // a release build the body of a message still live elsewhere could count as
            // unreferenced and be collected).
            let mut uncounted = BTreeSet::new();
            for &uid in &outcome.removed {
                if !uncounted.insert(uid) {
                    continue;
                }
                let before = snapshot.records.get(&uid).cloned().flatten();
                // The old record's removal: the image may already hold the new
                // incarnation's message at this UID, written below.
                self.commit_with(
                    out,
                    StoreWrite::RemoveMessage { mailbox: key.clone(), uid },
                    undo(Undo::Record { uid, before }),
                    Applied::Already,
                );
            }
            self.commit_undo(out, StoreWrite::NewValidity { mailbox: key.clone() }, None);
        }
        if outcome.changed() {
            let write = self.meta_write(key);
            self.commit_undo(out, write, undo(snapshot.meta.clone()));
        }
        if outcome.lifecycle_changed
            && let Some(lifecycle) = self.disk.mailboxes.get(key).map(|m| m.lifecycle)
        {
            let before = snapshot.lifecycle;
            self.commit_undo(
                out,
                StoreWrite::MailboxLifecycle { mailbox: key.clone(), lifecycle },
                undo(Undo::Lifecycle(before)),
            );
        }
        if outcome.retired_changed
            && let Some(retired) = self.disk.mailboxes.get(key).map(|m| m.retired.clone())
        {
            // Not shown to clients: no before-image. The tombstones it covers are
            // already gone from the image; the write drops them on disk.
            self.commit_undo(out, StoreWrite::RetireUids { mailbox: key.clone(), retired }, None);
        }
        // Each touched UID once, with its final value (a merge may touch one twice).
        let mut seen = BTreeSet::new();
        let touched: Vec<Uid> = outcome
            .removed
            .iter()
            .copied()
            .chain(outcome.records.iter().map(|r| r.uid))
            .filter(|uid| seen.insert(*uid))
            .collect();
        let live = |image: &Image, uid: &Uid| image.disk.mailboxes.get(key).and_then(|m| m.messages.get(uid)).cloned();
        let (kept, gone): (Vec<Uid>, Vec<Uid>) = match self.disk.mailboxes.get(key) {
            Some(m) => touched.into_iter().partition(|uid| m.messages.contains_key(uid)),
            None => (Vec::new(), touched),
        };
        for uid in kept {
            let Some(record) = live(self, &uid) else { continue };
            // A UID the merge brought that the mailbox did not hold before (or whose old
            // record went with the old UIDVALIDITY).
            let before =
                if removed_first.contains(&uid) { None } else { snapshot.records.get(&uid).cloned().flatten() };
            let write = StoreWrite::PutMessage { mailbox: key.clone(), record };
            self.commit_undo(out, write, undo(Undo::Record { uid, before }));
        }
        for t in &outcome.tombstones {
            let tombstone = self.tombstone_now(key, t);
            self.commit_undo(out, StoreWrite::PutTombstone { mailbox: key.clone(), tombstone }, None);
        }
        for uid in gone.into_iter().filter(|u| !removed_first.contains(u)) {
            let before = snapshot.records.get(&uid).cloned().flatten();
            self.commit_undo(
                out,
                StoreWrite::RemoveMessage { mailbox: key.clone(), uid },
                undo(Undo::Record { uid, before }),
            );
        }
    }

    /// Finishes what a crash interrupted: a message still live at a binding its own
    /// tombstone retires lost the race between the tombstone's write and its removal
    /// (see `commit_outcome`, `master_expunge`), so it is removed now, by a write.
    pub(crate) fn finish_interrupted_merges(&mut self, out: &mut Outbox) -> usize {
        let stale: Vec<(MailboxKey, Uid)> = self
            .disk
            .mailboxes
            .iter()
            .flat_map(|(k, m)| {
                m.messages.values().filter(|r| m.tombstones.contains_key(&(r.uid, r.guid))).map(|r| (k.clone(), r.uid))
            })
            .collect();
        for (mailbox, uid) in &stale {
            self.commit(out, StoreWrite::RemoveMessage { mailbox: mailbox.clone(), uid: *uid });
        }
        debug_assert!(
            self.disk
                .mailboxes
                .values()
                .all(|m| m.messages.values().all(|r| !m.tombstones.contains_key(&(r.uid, r.guid)))),
            "no live message is tombstoned at its own binding"
        );
        stale.len()
    }

    /// A tombstone as the mailbox holds it now (a later step of a merge may have joined
    /// it with another).
    fn tombstone_now(&self, key: &MailboxKey, t: &Tombstone) -> Tombstone {
        let now = self.disk.mailboxes.get(key).and_then(|m| m.tombstones.get(&(t.uid, t.guid)));
        debug_assert!(now.is_some(), "a merge's tombstone is in the mailbox");
        now.copied().unwrap_or(*t)
    }

    /// Appends a change to a peer's log; None if the mailbox overflowed that log (the
    /// peer gets it by SYNC).
    pub(crate) fn log_append(&mut self, out: &mut Outbox, peer: Sid, change: Change) -> Option<u64> {
        let log = self.disk.logs.get(&peer);
        if log.is_some_and(|l| l.overflowed.contains(change.mailbox())) {
            return None;
        }
        let seq = log.map(|l| l.next_seq).unwrap_or(0);
        // The log references the body, which is stored once (see `with_logged_body`).
        let change = match change {
            Change::Save { mailbox, uidvalidity, record, .. } => {
                Change::Save { mailbox, uidvalidity, record, body: Body::new() }
            }
            other => other,
        };
        self.commit(out, StoreWrite::LogAppend { peer, seq, change });
        debug_assert_eq!(self.disk.logs.get(&peer).map(|l| l.next_seq), Some(seq + 1));
        Some(seq)
    }

    /// Removes the entries of a peer's log that are there (the peer acknowledged them:
    /// a lazy write, see `StoreWrite::LogAcked`); returns those removed.
    pub(crate) fn log_remove(&mut self, out: &mut Outbox, peer: Sid, seqs: Vec<u64>) -> Vec<u64> {
        let Some(log) = self.disk.logs.get(&peer) else { return Vec::new() };
        // Each entry once, in the order listed: a short list is scanned, a long one
        // (a peer's list is bounded by the line, not by us) is looked up in a set.
        let mut seen = BTreeSet::new();
        let mut removed: Vec<u64> = Vec::with_capacity(seqs.len());
        let short = seqs.len() <= super::replication::ACK_LIST_SCAN_MAX;
        for s in seqs {
            let first = if short { !removed.contains(&s) } else { seen.insert(s) };
            if first && log.entries.contains_key(&s) {
                removed.push(s);
            }
        }
        if !removed.is_empty() {
            self.commit(out, StoreWrite::LogAcked { peer, seqs: removed.clone() });
        }
        removed
    }

    /// Drops a peer's log entries for `victims` and marks those mailboxes for a full
    /// SYNC with it. Returns the entries dropped.
    pub(crate) fn log_overflow(&mut self, out: &mut Outbox, peer: Sid, victims: &BTreeSet<MailboxKey>) -> Vec<u64> {
        let Some(log) = self.disk.logs.get(&peer) else { return Vec::new() };
        let seqs: Vec<u64> =
            log.entries.iter().filter(|(_, c)| victims.contains(c.mailbox())).map(|(s, _)| *s).collect();
        self.commit(out, StoreWrite::LogRemove { peer, seqs: seqs.clone() });
        for v in victims {
            self.commit(out, StoreWrite::LogOverflow { peer, mailbox: v.clone(), overflowed: true });
        }
        seqs
    }

    /// Drops everything logged for a retired peer; returns the entries dropped.
    pub(crate) fn drop_log(&mut self, out: &mut Outbox, peer: Sid) -> Vec<u64> {
        let Some(log) = self.disk.logs.get(&peer) else { return Vec::new() };
        let seqs: Vec<u64> = log.entries.keys().copied().collect();
        let overflowed: Vec<MailboxKey> = log.overflowed.iter().cloned().collect();
        if !seqs.is_empty() {
            self.commit(out, StoreWrite::LogRemove { peer, seqs: seqs.clone() });
        }
        for mailbox in overflowed {
            self.commit(out, StoreWrite::LogOverflow { peer, mailbox, overflowed: false });
        }
        seqs
    }

    /// Whether every log is empty and marks no mailbox for SYNC.
    pub(crate) fn logs_drained(&self) -> bool {
        self.disk.logs.values().all(|l| l.entries.is_empty() && l.overflowed.is_empty())
    }

    /// Whether changes of `mailbox` were dropped from `peer`'s log (only a SYNC brings
    /// them).
    pub(crate) fn is_overflowed(&self, peer: Sid, mailbox: &MailboxKey) -> bool {
        self.disk.logs.get(&peer).is_some_and(|l| l.overflowed.contains(mailbox))
    }

    /// The peer's copy of `mailbox` was confirmed: it no longer needs a full SYNC.
    pub(crate) fn clear_overflow(&mut self, out: &mut Outbox, peer: Sid, mailbox: &MailboxKey) {
        if self.is_overflowed(peer, mailbox) {
            self.commit(out, StoreWrite::LogOverflow { peer, mailbox: mailbox.clone(), overflowed: false });
        }
    }

    /// Raises the highest epoch seen; true when it rose.
    pub(crate) fn raise_epoch(&mut self, out: &mut Outbox, epoch: u64) -> bool {
        if epoch <= self.disk.epoch {
            return false;
        }
        self.commit(out, StoreWrite::Epoch { epoch });
        debug_assert_eq!(self.disk.epoch, epoch);
        true
    }

    /// The next sequence number of our link-state announcements, past `seen` too.
    pub(crate) fn next_link_seq(&mut self, out: &mut Outbox, seen: u64) -> u64 {
        let seq = self.disk.link_seq.max(seen).saturating_add(1);
        self.commit(out, StoreWrite::LinkSeq { seq });
        seq
    }

    /// Records a start: the next incarnation, and the store's identity, `drawn` when the
    /// store is new (a store made earlier keeps its own).
    pub(crate) fn start_incarnation(&mut self, out: &mut Outbox, drawn: u64) -> u64 {
        debug_assert_ne!(drawn, 0, "0 means no identity yet");
        let incarnation = self.disk.incarnation.saturating_add(1);
        let store_id = if self.disk.store_id == 0 { drawn } else { self.disk.store_id };
        self.commit(out, StoreWrite::Incarnation { incarnation, store_id });
        debug_assert_eq!(self.disk.store_id, store_id, "a running server's store has an identity");
        incarnation
    }

    /// Reads the next bodies back from the store and checks them against their checksums
    /// (a verdict from an earlier check is not trusted: the disk may have changed under
    /// us), and finds messages that have no body here and are not `excused` (a body
    /// already wanted, or one a partial replica omits on purpose).
    pub(crate) fn scrub(&mut self, excused: impl Fn(&MailboxKey, &MessageRecord) -> bool) -> ScrubFindings {
        let mut found = ScrubFindings::default();
        let start = self.scrub_cursor.map(|g| Guid(g.0.wrapping_add(1))).unwrap_or(Guid(0));
        let mut bytes = 0u64;
        let mut guids: Vec<(Guid, u64)> = Vec::new();
        for (g, b) in self.disk.bodies.range(start..) {
            if guids.len() >= SCRUB_PER_PASS_MAX
                || (!guids.is_empty() && bytes.saturating_add(b.len) > SCRUB_BYTES_PER_PASS_MAX)
            {
                break;
            }
            bytes = bytes.saturating_add(b.len);
            guids.push((*g, b.checksum));
        }
        let last = guids.last().map(|(g, _)| *g);
        let more = last.is_some_and(|g| self.disk.bodies.range(Guid(g.0.saturating_add(1))..).next().is_some());
        // A body not yet durable keeps its verdict (the bytes in hand were checked); any
        // other is asked of the store again, whatever was known of it.
        let mut durable: Vec<(Guid, u64)> = Vec::with_capacity(guids.len());
        for (g, checksum) in guids {
            if !self.unsynced.contains_key(&g) {
                durable.push((g, checksum));
            } else if !self.body_intact(g).unwrap_or(false) {
                found.corrupt.push((g, checksum));
            }
        }
        let asked: Vec<Guid> = durable.iter().map(|(g, _)| *g).collect();
        let stored = self.bodies.checksums(&asked);
        debug_assert_eq!(stored.len(), asked.len(), "a store answers each checksum asked");
        // The verdicts are rewritten in one walk beside the GUIDs (both in order), not
        // looked up one by one.
        let mut fresh: Vec<(Guid, bool)> = Vec::new();
        if let (Some(first), Some(last)) = (asked.first(), asked.last()) {
            let mut cached = self.body_verdicts.range_mut(*first..=*last).peekable();
            for ((g, checksum), stored) in durable.iter().zip(stored) {
                let intact = stored == Some(*checksum);
                if !intact {
                    found.corrupt.push((*g, *checksum));
                }
                while cached.next_if(|(k, _)| **k < *g).is_some() {}
                match cached.peek_mut() {
                    Some((k, verdict)) if **k == *g => **verdict = intact,
                    _ => fresh.push((*g, intact)),
                }
            }
        }
        self.body_verdicts.extend(fresh);
        // In GUID order, as the bodies were walked.
        found.corrupt.sort_unstable_by_key(|(g, _)| *g);
        debug_assert!(
            durable.iter().all(|(g, c)| self.body_verdicts.get(g) == Some(&(self.bodies.checksum(*g) == Some(*c)))),
            "the scrub left each durable body's verdict as its store answered"
        );
        self.scrub_cursor = if more { last } else { None };
        // Only a message written while its body was not here, or one whose body was
        // removed, can lack one (and, after a start, any): those are the ones looked at,
        // in mailbox and UID order.
        if std::mem::take(&mut self.scrub_rescan) {
            self.scrub_suspects = self
                .disk
                .mailboxes
                .iter()
                .flat_map(|(k, m)| m.messages.values().map(move |r| (k, r)))
                .filter(|(_, r)| !self.disk.bodies.contains_key(&r.guid))
                .map(|(k, r)| (k.clone(), r.uid))
                .collect();
        }
        let disk = &self.disk;
        let missing = &mut found.missing;
        self.scrub_suspects.retain(|(k, uid)| {
            let Some(r) = disk.mailboxes.get(k).and_then(|m| m.messages.get(uid)) else { return false };
            if disk.bodies.contains_key(&r.guid) {
                return false;
            }
            if !excused(k, r) {
                missing.push((r.guid, r.checksum));
            }
            true
        });
        debug_assert_eq!(
            found.missing,
            self.disk
                .mailboxes
                .iter()
                .flat_map(|(k, m)| m.messages.values().map(move |r| (k, r)))
                .filter(|(k, r)| !self.disk.bodies.contains_key(&r.guid) && !excused(k, r))
                .map(|(_, r)| (r.guid, r.checksum))
                .collect::<Vec<_>>(),
            "scrub suspects missed a message without a body"
        );
        found
    }
}

/// Live records per GUID over every mailbox of `disk`.
fn count_live_refs(disk: &DiskImage) -> BTreeMap<Guid, u32> {
    let mut counted = BTreeMap::new();
    for r in disk.mailboxes.values().flat_map(|m| m.messages.values()) {
        *counted.entry(r.guid).or_default() += 1;
    }
    counted
}

fn count_logged(disk: &DiskImage) -> BTreeMap<(Sid, MailboxKey), u32> {
    let mut counted = BTreeMap::new();
    for (peer, log) in &disk.logs {
        for change in log.entries.values() {
            *counted.entry((*peer, change.mailbox().clone())).or_default() += 1;
        }
    }
    counted
}

/// `mailbox::summary` with the digest kept in `digests`.
fn cached_summary(
    digests: &mut BTreeMap<MailboxKey, mailbox::DigestParts>,
    key: &MailboxKey,
    m: &StoredMailbox,
) -> Summary {
    let digest = match digests.get(key) {
        Some(parts) if parts.fits(m) => parts.digest(m),
        _ => {
            let parts = mailbox::DigestParts::of(m);
            let d = parts.digest(m);
            digests.insert(key.clone(), parts);
            d
        }
    };
    mailbox::summary_with_digest(key, m, digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Output;
    use crate::store::MemoryBodies;

    fn key(name: &str) -> MailboxKey {
        MailboxKey::from_shared("alice".into(), name.into())
    }

    fn record(uid: Uid, guid: u128) -> MessageRecord {
        MessageRecord::bare(uid, guid, 1)
    }

    /// A copy of `mailbox` with UIDs 1 and 2 (GUIDs 1 and 2), UIDVALIDITY 5.
    fn two_messages(mailbox: MailboxKey) -> MailboxState {
        MailboxState {
            mailbox,
            uidvalidity: 5,
            uidnext: 3,
            highest_modseq: 2,
            messages: vec![record(1, 1), record(2, 2)],
            tombstones: Vec::new(),
            lifecycle: Default::default(),
            retired: Default::default(),
        }
    }

    /// The image a restart reads: an empty disk plus every write emitted.
    fn replay(out: &mut Outbox) -> DiskImage {
        let mut disk = DiskImage::default();
        while let Some(output) = out.pop() {
            if let Output::Write { write, .. } = output {
                disk.apply(&write);
            }
        }
        disk
    }

    /// An image with nothing in it, and its outbox.
    fn empty_image() -> (Image, Outbox) {
        (Image::new(DiskImage::default(), Box::new(MemoryBodies::default())), Outbox::default())
    }

    #[test]
    fn a_commit_is_applied_and_emitted() {
        let (mut image, mut out) = empty_image();
        image.create_mailbox(&mut out, &key("INBOX"), Some(7));
        image.commit(&mut out, StoreWrite::PutMessage { mailbox: key("INBOX"), record: record(1, 9) });
        assert_eq!(image.mailbox(&key("INBOX")).map(|m| m.uidvalidity), Some(7));
        assert_eq!(&replay(&mut out), image.disk());
    }

    #[test]
    fn a_merge_commits_everything_it_changed() {
        let (mut image, mut out) = empty_image();
        let state = two_messages(key("Sent"));
        let outcome = image.merge(&mut out, &state, false, &MergeRules::default(), false);
        assert!(outcome.changed());
        assert_eq!(image.mailbox(&key("Sent")).map(|m| m.messages.len()), Some(2));
        assert_eq!(&replay(&mut out), image.disk());
    }

    /// A replica takes its master's copy under another UIDVALIDITY (two incarnations of
    /// one name) whose message sits at a UID the old incarnation used too: the old
    /// record's removal must not take the new one with it (it did, until the image
    /// stopped applying a merge's writes a second time: the new message was missing
    /// here until anti-entropy brought it back).
    #[test]
    fn a_new_uidvalidity_keeps_the_new_message_at_a_reused_uid() {
        let (mut image, mut out) = empty_image();
        let old = MailboxState { messages: vec![record(1, 1)], uidnext: 2, ..two_messages(key("INBOX")) };
        image.merge(&mut out, &old, false, &MergeRules::default(), false);
        let new = MailboxState {
            uidvalidity: 6,
            uidnext: 3,
            messages: vec![record(1, 7), record(2, 1)],
            ..two_messages(key("INBOX"))
        };
        let rules = MergeRules { from_master: true, ..MergeRules::default() };
        let outcome = image.merge(&mut out, &new, false, &rules, false);
        assert!(outcome.new_validity && !outcome.unresolved, "{outcome:?}");
        let m = image.mailbox(&key("INBOX")).expect("the mailbox");
        let live: Vec<(Uid, Guid)> = m.messages.values().map(|r| (r.uid, r.guid)).collect();
        assert_eq!((m.uidvalidity, live), (6, vec![(1, Guid(7)), (2, Guid(1))]));
        assert_eq!(&replay(&mut out), image.disk(), "the disk holds what the image does");
    }

    /// A renumbering merge and an expunge, cut after every one of their writes (a crash
    /// before the rest was durable): a restart that finishes interrupted merges holds
    /// every message somewhere, never a message both live and tombstoned at one binding,
    /// and UIDNEXT above every live UID.
    #[test]
    fn a_crash_after_any_prefix_of_a_merge_loses_nothing() {
        let mailbox = key("INBOX");
        let ours = two_messages(mailbox.clone());
        let (mut image, mut out) = empty_image();
        image.merge(&mut out, &ours, false, &MergeRules::default(), false);
        let start = replay(&mut out);
        // Theirs bound UID 2 to another message: both move above UID 2.
        let theirs = MailboxState { messages: vec![record(1, 1), record(2, 3)], ..ours.clone() };
        let mut image = Image::new(start.clone(), Box::new(MemoryBodies::default()));
        let outcome = image.merge(&mut out, &theirs, true, &MergeRules::default(), false);
        assert_eq!(outcome.renumbered, 2);
        let expunge_uid = image.mailbox(&mailbox).and_then(|m| m.messages.find_guid(Guid(3))).map(|r| r.uid);
        let mut writes = Vec::new();
        while let Some(output) = out.pop() {
            if let Output::Write { write, .. } = output {
                writes.push(write);
            }
        }
        // Then an expunge of one moved message, as the master writes it.
        let uid = expunge_uid.expect("the moved message");
        let modseq = image.mailbox(&mailbox).map(|m| m.highest_modseq + 1).unwrap_or(1);
        let m = image.mailbox(&mailbox).cloned().expect("the mailbox");
        writes.push(StoreWrite::MailboxMeta {
            mailbox: mailbox.clone(),
            uidvalidity: 5,
            uidnext: m.uidnext,
            highest_modseq: modseq,
        });
        writes.push(StoreWrite::PutTombstone {
            mailbox: mailbox.clone(),
            tombstone: Tombstone::expunge(uid, Guid(3), modseq),
        });
        writes.push(StoreWrite::RemoveMessage { mailbox: mailbox.clone(), uid });
        // Theirs is here from the moment its new binding is written.
        let mut arrived = false;
        for cut in 0..=writes.len() {
            let mut disk = start.clone();
            for write in &writes[..cut] {
                disk.apply(write);
            }
            let mut restarted = Image::new(disk, Box::new(MemoryBodies::default()));
            restarted.finish_interrupted_merges(&mut Outbox::default());
            let m = restarted.mailbox(&mailbox).expect("the mailbox");
            let expunged = cut == writes.len();
            arrived |= m.messages.find_guid(Guid(3)).is_some();
            for guid in [1, 2, 3].map(Guid).into_iter().filter(|g| *g != Guid(3) || arrived) {
                let live = m.messages.find_guid(guid).is_some();
                let dead = m.tombstones.values().any(|t| t.guid == guid && t.expunged);
                assert!(live || dead, "after {cut} writes, message {guid:?} is nowhere");
                assert!(!(expunged && guid == Guid(3) && live), "the expunge holds");
            }
            assert!(m.messages.values().all(|r| !m.tombstones.contains_key(&(r.uid, r.guid))), "after {cut} writes");
            assert!(m.messages.keys().all(|u| *u < m.uidnext), "after {cut} writes: UIDNEXT above every live UID");
        }
    }

    #[test]
    fn the_log_skips_an_overflowed_mailbox() {
        let (mut image, mut out) = empty_image();
        let change = |n: &str| Change::Copy { mailbox: key(n), uidvalidity: 1, record: record(1, 1) };
        assert_eq!(image.log_append(&mut out, Sid(2), change("A")), Some(0));
        assert_eq!(image.log_append(&mut out, Sid(2), change("B")), Some(1));
        let dropped = image.log_overflow(&mut out, Sid(2), &BTreeSet::from([key("A")]));
        assert_eq!(dropped, vec![0]);
        assert_eq!(image.log_append(&mut out, Sid(2), change("A")), None);
        assert_eq!(image.log_remove(&mut out, Sid(2), vec![1, 5]), vec![1]);
        image.clear_overflow(&mut out, Sid(2), &key("A"));
        assert_eq!(image.log_append(&mut out, Sid(2), change("A")), Some(2));
        assert_eq!(&replay(&mut out), image.disk());
    }

    #[test]
    fn epochs_only_rise() {
        let (mut image, mut out) = empty_image();
        assert!(image.raise_epoch(&mut out, 5));
        assert!(!image.raise_epoch(&mut out, 5));
        assert!(!image.raise_epoch(&mut out, 3));
        assert_eq!(image.disk().epoch, 5);
    }

    #[test]
    fn scrub_finds_a_corrupt_body_and_a_message_without_one() {
        let store = MemoryBodies::default();
        let (mut image, mut out) = (Image::new(DiskImage::default(), Box::new(store.clone())), Outbox::default());
        let bytes = Body::from_static(b"hello");
        let checksum = crate::hash::body_checksum(&bytes);
        image.put_checked_body(&mut out, Guid(1), checksum, bytes);
        assert_eq!(image.body_intact(Guid(1)), Some(true));
        // The driver stores the body and reports it durable; then the disk changes it.
        while let Some(output) = out.pop() {
            if let Output::Write { write, .. } = output {
                store.apply(&write);
            }
        }
        image.durable(out.last_write());
        store.overwrite(Guid(1), Body::from_static(b"hellO"));
        assert_eq!(image.body_intact(Guid(1)), Some(true), "a verdict is kept until the body is said to change");
        image.body_changed(Guid(1));
        assert_eq!(image.body_intact(Guid(1)), Some(false), "a changed body is checked again");
        assert_eq!(image.intact_body(Guid(1)), None, "a damaged body is never handed out");
        image.commit(&mut out, StoreWrite::PutMessage { mailbox: key("INBOX"), record: record(1, 2) });
        let found = image.scrub(|_, _| false);
        assert_eq!(found.corrupt, vec![(Guid(1), checksum)]);
        assert_eq!(found.missing, vec![(Guid(2), 0)]);
        assert!(image.scrub(|_, r| r.guid == Guid(2)).missing.is_empty(), "a wanted body is not reported");
    }

    #[test]
    fn a_body_is_read_from_the_image_until_durable_then_from_the_store() {
        let store = MemoryBodies::default();
        let (mut image, mut out) = (Image::new(DiskImage::default(), Box::new(store.clone())), Outbox::default());
        let bytes = Body::from_static(b"body");
        image.put_checked_body(&mut out, Guid(3), crate::hash::body_checksum(&bytes), bytes.clone());
        assert_eq!(image.intact_body(Guid(3)), Some(bytes.clone()), "not yet in the store: read from the image");
        assert!(store.is_empty());
        image.durable(out.last_write());
        assert_eq!(image.intact_body(Guid(3)), None, "durable but the driver did not store it: nothing to read");
        store.overwrite(Guid(3), bytes.clone());
        image.body_changed(Guid(3));
        assert_eq!(image.intact_body(Guid(3)), Some(bytes));
        assert_eq!(image.disk().bodies[&Guid(3)], StoredBody { checksum: crate::hash::body_checksum(b"body"), len: 4 });
    }

    #[test]
    fn a_logged_save_references_its_body() {
        let (mut image, mut out) = empty_image();
        let change =
            Change::Save { mailbox: key("A"), uidvalidity: 1, record: record(1, 1), body: Body::from_static(b"x") };
        assert_eq!(image.log_append(&mut out, Sid(2), change), Some(0));
        let logged = &image.log(Sid(2)).map(|l| l.entries[&0].clone());
        assert!(matches!(logged, Some(Change::Save { body, .. }) if body.is_empty()), "{logged:?}");
    }

    #[test]
    fn a_read_sees_the_durable_mailbox_while_writes_are_pending() {
        let (mut image, mut out) = empty_image();
        assert!(image.durable_mailbox(&key("INBOX")).is_none());
        image.create_mailbox(&mut out, &key("INBOX"), Some(7));
        image.commit(&mut out, StoreWrite::PutMessage { mailbox: key("INBOX"), record: record(1, 9) });
        assert!(image.durable_mailbox(&key("INBOX")).is_none(), "not created on disk yet");
        image.durable(out.last_write());
        let durable = image.durable_mailbox(&key("INBOX")).map(|m| m.into_owned());
        assert_eq!(durable.as_ref(), image.mailbox(&key("INBOX")));
        // A merge that renumbers and a meta change, all pending: the read sees before.
        let before = image.mailbox(&key("INBOX")).cloned();
        let conflict = MailboxState {
            mailbox: key("INBOX"),
            uidvalidity: 7,
            uidnext: 2,
            highest_modseq: 4,
            messages: vec![record(1, 10)],
            tombstones: Vec::new(),
            lifecycle: Default::default(),
            retired: Default::default(),
        };
        let outcome = image.merge(&mut out, &conflict, true, &MergeRules::default(), false);
        assert!(outcome.renumbered > 0);
        assert_ne!(image.mailbox(&key("INBOX")), before.as_ref());
        // What a client is shown (tombstones are not, and are not undone).
        let view = |m: Option<&StoredMailbox>| m.map(|m| super::super::mailbox_view(&key("INBOX"), m));
        assert_eq!(view(image.durable_mailbox(&key("INBOX")).as_deref()), view(before.as_ref()));
        image.durable(out.last_write());
        assert_eq!(image.durable_mailbox(&key("INBOX")).map(|m| m.into_owned()).as_ref(), image.mailbox(&key("INBOX")));
    }

    /// Focus replace seed 22902: a peer's piece retires a UID our message is live at (a
    /// new server gave out a UID the cluster had retired); the merge moves our message
    /// to a new UID, and until its writes are durable a read sees it where it was.
    #[test]
    fn a_read_keeps_a_message_a_pending_merge_moves_off_a_retired_uid() {
        let (mut image, mut out) = empty_image();
        image.create_mailbox(&mut out, &key("INBOX"), Some(7));
        image.commit(&mut out, StoreWrite::PutMessage { mailbox: key("INBOX"), record: record(1, 9) });
        image.durable(out.last_write());
        let before = image.mailbox(&key("INBOX")).cloned();
        let mut retired = Retired::default();
        retired.insert_range(1, 1);
        let collected = MailboxState { uidnext: 2, highest_modseq: 3, retired, ..MailboxState::empty(key("INBOX"), 7) };
        let outcome = image.merge(&mut out, &collected, true, &MergeRules::default(), false);
        assert!(outcome.renumbered > 0, "{outcome:?}");
        assert!(image.mailbox(&key("INBOX")).is_some_and(|m| !m.messages.contains_key(&1)));
        let view = |m: Option<&StoredMailbox>| m.map(|m| super::super::mailbox_view(&key("INBOX"), m).messages);
        assert_eq!(view(image.durable_mailbox(&key("INBOX")).as_deref()), view(before.as_ref()));
        image.durable(out.last_write());
        assert_eq!(image.durable_mailbox(&key("INBOX")).map(|m| m.into_owned()).as_ref(), image.mailbox(&key("INBOX")));
    }

    /// Explore seed 36846: a laptop's pull saw HIGHESTMODSEQ 2 with the record at modseq
    /// 2 not yet durable, pushed "up to 2" without it, and never pushed it.
    #[test]
    fn a_pull_between_an_operations_meta_and_its_record_shows_neither() {
        let (mut image, mut out) = empty_image();
        image.create_mailbox(&mut out, &key("INBOX"), Some(7));
        image.commit(&mut out, StoreWrite::PutMessage { mailbox: key("INBOX"), record: record(1, 9) });
        let meta = StoreWrite::MailboxMeta { mailbox: key("INBOX"), uidvalidity: 7, uidnext: 2, highest_modseq: 1 };
        image.commit(&mut out, meta);
        image.durable(out.last_write());
        // A copy: its meta, then its record, durable only as far as the meta.
        let meta = StoreWrite::MailboxMeta { mailbox: key("INBOX"), uidvalidity: 7, uidnext: 3, highest_modseq: 2 };
        let meta_write = image.commit(&mut out, meta);
        let copied = MessageRecord::bare(2, 10, 2);
        image.commit(&mut out, StoreWrite::PutMessage { mailbox: key("INBOX"), record: copied });
        image.durable(meta_write);
        // (messages, UIDNEXT, HIGHESTMODSEQ) as a pull and as a client's read show them.
        let shown = |image: &Image, to_push: bool| {
            let m = if to_push {
                image.durable_mailbox_to_push(&key("INBOX"))
            } else {
                image.durable_mailbox(&key("INBOX"))
            };
            m.map(|m| (m.messages.len(), m.uidnext, m.highest_modseq))
        };
        assert_eq!(
            shown(&image, true),
            Some((1, 2, 1)),
            "neither UID 2 nor modseq 2 is shown before the record is durable"
        );
        assert_eq!(shown(&image, false), Some((1, 3, 2)), "a client's read shows the durable meta");
        image.durable(out.last_write());
        assert_eq!(shown(&image, true), Some((2, 3, 2)));
    }

    #[test]
    fn a_body_becomes_collectable_when_its_last_record_goes() {
        let (mut image, mut out) = empty_image();
        let bytes = Body::from_static(b"shared");
        image.put_checked_body(&mut out, Guid(9), crate::hash::body_checksum(&bytes), bytes);
        image.commit(&mut out, StoreWrite::PutMessage { mailbox: key("A"), record: record(1, 9) });
        image.commit(&mut out, StoreWrite::PutMessage { mailbox: key("B"), record: record(4, 9) });
        assert_eq!(image.unreferenced_bodies().count(), 0);
        image.commit(&mut out, StoreWrite::RemoveMessage { mailbox: key("A"), uid: 1 });
        assert_eq!(image.unreferenced_bodies().count(), 0, "a copy in another mailbox holds it");
        image.commit(&mut out, StoreWrite::RemoveMessage { mailbox: key("B"), uid: 4 });
        assert_eq!(image.unreferenced_bodies().collect::<Vec<_>>(), vec![Guid(9)]);
        image.remove_unreferenced_body(&mut out, Guid(9));
        assert!(!image.has_body(&Guid(9)));
        assert!(image.refs_consistent());
        assert_eq!(&replay(&mut out), image.disk());
    }

    #[test]
    fn the_scrub_reads_the_disk_again_and_finds_damage_it_was_not_told_of() {
        let store = MemoryBodies::default();
        let (mut image, mut out) = (Image::new(DiskImage::default(), Box::new(store.clone())), Outbox::default());
        let bytes = Body::from_static(b"kept safe");
        let checksum = crate::hash::body_checksum(&bytes);
        image.put_checked_body(&mut out, Guid(5), checksum, bytes.clone());
        image.commit(&mut out, StoreWrite::PutMessage { mailbox: key("INBOX"), record: record(1, 5) });
        store.overwrite(Guid(5), bytes);
        image.durable(out.last_write());
        assert!(image.scrub(|_, _| false).corrupt.is_empty());
        store.overwrite(Guid(5), Body::from_static(b"kept safE"));
        assert_eq!(image.scrub(|_, _| false).corrupt, vec![(Guid(5), checksum)]);
    }
}
