//! What a server keeps on disk. The core emits [`StoreWrite`]s in order; the shell makes
//! them durable and reports back; after a crash the server is rebuilt from the
//! [`DiskImage`] those writes produced. The same `apply` is used by the simulator's disk
//! and the node's store, so both hold exactly what the core asked for.

use crate::msg::Change;
use crate::types::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, btree_map};

/// A mailbox's live messages by UID, with an index by GUID kept in step so that "where
/// is this message" is a lookup, not a scan of the mailbox (merges ask it for every
/// record they bring). Through `get_mut`/`values_mut` only flags and modseq may change,
/// never a record's UID or GUID. Serialized as the plain map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "BTreeMap<Uid, MessageRecord>", into = "BTreeMap<Uid, MessageRecord>")]
pub struct Messages {
    by_uid: BTreeMap<Uid, MessageRecord>,
    by_guid: BTreeMap<Guid, LiveAt>,
    /// GUIDs live at more than one UID (two masters renumbered one message differently).
    multi: BTreeSet<Guid>,
    /// Every record by its modseq: what changed after a modseq a session has shown is a
    /// range, not a pass over the mailbox.
    by_modseq: BTreeSet<(ModSeq, Uid)>,
    /// What STATUS counts, kept as records come, go and change (not a pass either).
    counts: FlagCounts,
    /// Every record by its body checksum: a retried SAVE finds the message its first
    /// attempt stored by a lookup (see `Server::master_save`).
    by_checksum: BTreeSet<(u64, Uid)>,
}

/// The UIDs one message is live at: almost always one, kept without a set of its own
/// (an allocation per message, on every server and every disk).
#[derive(Clone, Debug, PartialEq, Eq)]
enum LiveAt {
    One(Uid),
    /// Two or more (two masters renumbered one message differently).
    Many(BTreeSet<Uid>),
}

impl LiveAt {
    fn iter(&self) -> impl Iterator<Item = Uid> + '_ {
        let (one, many) = match self {
            LiveAt::One(uid) => (Some(*uid), None),
            LiveAt::Many(uids) => (None, Some(uids.iter().copied())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
    fn last(&self) -> Option<Uid> {
        match self {
            LiveAt::One(uid) => Some(*uid),
            LiveAt::Many(uids) => uids.last().copied(),
        }
    }
    /// Adds `uid`; true when the message is now live at more than one UID.
    fn add(&mut self, uid: Uid) -> bool {
        match self {
            LiveAt::One(first) if *first == uid => false,
            LiveAt::One(first) => {
                *self = LiveAt::Many(BTreeSet::from([*first, uid]));
                true
            }
            LiveAt::Many(uids) => {
                uids.insert(uid);
                true
            }
        }
    }
    /// Takes `uid` out; the UIDs left (0, 1 or more).
    fn take(&mut self, uid: Uid) -> usize {
        match self {
            LiveAt::One(first) => usize::from(*first != uid),
            LiveAt::Many(uids) => {
                uids.remove(&uid);
                let left = uids.len();
                if let (1, Some(&only)) = (left, uids.first()) {
                    *self = LiveAt::One(only);
                }
                left
            }
        }
    }
}

/// Records with `\Seen` and with `\Deleted` set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlagCounts {
    pub seen: usize,
    pub deleted: usize,
}

impl FlagCounts {
    fn add(&mut self, r: &MessageRecord) {
        self.seen += usize::from(r.has_flag("\\Seen"));
        self.deleted += usize::from(r.has_flag("\\Deleted"));
    }

    fn take(&mut self, r: &MessageRecord) {
        self.seen -= usize::from(r.has_flag("\\Seen"));
        self.deleted -= usize::from(r.has_flag("\\Deleted"));
    }
}

/// A record being changed in place; its modseq is indexed again when the change ends.
/// Its UID and GUID stay (a GUID moves by a remove and an insert).
pub struct RecordMut<'a> {
    record: &'a mut MessageRecord,
    by_modseq: &'a mut BTreeSet<(ModSeq, Uid)>,
    counts: &'a mut FlagCounts,
    modseq_before: ModSeq,
    guid_before: Guid,
    /// The record's part of `counts` before the change, taken out until it ends.
    counted_before: FlagCounts,
    checksum_before: u64,
}

impl std::ops::Deref for RecordMut<'_> {
    type Target = MessageRecord;
    fn deref(&self) -> &MessageRecord {
        self.record
    }
}

impl std::ops::DerefMut for RecordMut<'_> {
    fn deref_mut(&mut self) -> &mut MessageRecord {
        self.record
    }
}

impl Drop for RecordMut<'_> {
    fn drop(&mut self) {
        debug_assert_eq!(self.record.guid, self.guid_before, "a record changed in place keeps its GUID");
        if self.record.modseq != self.modseq_before {
            self.by_modseq.remove(&(self.modseq_before, self.record.uid));
            self.by_modseq.insert((self.record.modseq, self.record.uid));
        }
        debug_assert_eq!(self.record.checksum, self.checksum_before, "a record changed in place keeps its body");
        self.counts.seen -= self.counted_before.seen;
        self.counts.deleted -= self.counted_before.deleted;
        self.counts.add(self.record);
    }
}

impl Messages {
    pub fn new() -> Messages {
        Messages::default()
    }
    pub fn get(&self, uid: &Uid) -> Option<&MessageRecord> {
        self.by_uid.get(uid)
    }
    pub fn get_mut(&mut self, uid: &Uid) -> Option<RecordMut<'_>> {
        let record = self.by_uid.get_mut(uid)?;
        let (modseq_before, guid_before, record_checksum) = (record.modseq, record.guid, record.checksum);
        let mut counted_before = FlagCounts::default();
        counted_before.add(record);
        Some(RecordMut {
            record,
            by_modseq: &mut self.by_modseq,
            counts: &mut self.counts,
            modseq_before,
            guid_before,
            counted_before,
            checksum_before: record_checksum,
        })
    }
    /// The live records whose body has this checksum, lowest UID first.
    pub fn with_checksum(&self, checksum: u64) -> impl Iterator<Item = &MessageRecord> + '_ {
        self.by_checksum.range((checksum, 0)..=(checksum, Uid::MAX)).filter_map(|(_, uid)| self.by_uid.get(uid))
    }
    /// Records with `\Seen`, with `\Deleted` (for STATUS UNSEEN and DELETED).
    pub fn flag_counts(&self) -> FlagCounts {
        self.counts
    }
    /// The records whose modseq is above `since`, lowest modseq first.
    pub fn changed_since(&self, since: ModSeq) -> impl Iterator<Item = &MessageRecord> + '_ {
        self.by_modseq.range((since.saturating_add(1), 0)..).filter_map(|(_, uid)| self.by_uid.get(uid))
    }
    pub fn contains_key(&self, uid: &Uid) -> bool {
        self.by_uid.contains_key(uid)
    }
    pub fn insert(&mut self, uid: Uid, record: MessageRecord) -> Option<MessageRecord> {
        debug_assert_eq!(uid, record.uid, "a record is kept under its own UID");
        let guid = record.guid;
        self.by_modseq.insert((record.modseq, uid));
        self.counts.add(&record);
        let checksum = record.checksum;
        let old = self.by_uid.insert(uid, record);
        if let Some(old) = &old {
            self.counts.take(old);
            self.by_checksum.remove(&(old.checksum, uid));
            self.unindex(old.guid, uid);
            if let Some(now) = self.by_uid.get(&uid).map(|r| r.modseq)
                && now != old.modseq
            {
                self.by_modseq.remove(&(old.modseq, uid));
            }
        }
        self.by_checksum.insert((checksum, uid));
        let many = match self.by_guid.entry(guid) {
            btree_map::Entry::Vacant(e) => {
                e.insert(LiveAt::One(uid));
                false
            }
            btree_map::Entry::Occupied(mut e) => e.get_mut().add(uid),
        };
        if many {
            self.multi.insert(guid);
        }
        old
    }
    pub fn remove(&mut self, uid: &Uid) -> Option<MessageRecord> {
        let old = self.by_uid.remove(uid)?;
        self.unindex(old.guid, *uid);
        self.by_modseq.remove(&(old.modseq, *uid));
        self.counts.take(&old);
        self.by_checksum.remove(&(old.checksum, *uid));
        Some(old)
    }
    fn unindex(&mut self, guid: Guid, uid: Uid) {
        if let Some(uids) = self.by_guid.get_mut(&guid) {
            match uids.take(uid) {
                0 => {
                    self.by_guid.remove(&guid);
                    self.multi.remove(&guid);
                }
                1 => {
                    self.multi.remove(&guid);
                }
                _ => {}
            }
        }
    }
    pub fn len(&self) -> usize {
        self.by_uid.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }
    pub fn iter(&self) -> btree_map::Iter<'_, Uid, MessageRecord> {
        self.by_uid.iter()
    }
    pub fn keys(&self) -> btree_map::Keys<'_, Uid, MessageRecord> {
        self.by_uid.keys()
    }
    pub fn values(&self) -> btree_map::Values<'_, Uid, MessageRecord> {
        self.by_uid.values()
    }
    pub fn into_values(self) -> btree_map::IntoValues<Uid, MessageRecord> {
        self.by_uid.into_values()
    }
    /// The UIDs a message is live at, lowest first.
    pub fn uids_of(&self, guid: Guid) -> impl Iterator<Item = Uid> + '_ {
        self.by_guid.get(&guid).into_iter().flat_map(LiveAt::iter)
    }
    pub fn has_guid(&self, guid: Guid) -> bool {
        self.by_guid.contains_key(&guid)
    }
    /// The message's record at its lowest UID.
    pub fn find_guid(&self, guid: Guid) -> Option<&MessageRecord> {
        self.uids_of(guid).next().and_then(|uid| self.by_uid.get(&uid))
    }
    /// The message's highest UID (its latest binding).
    pub fn last_uid_of(&self, guid: Guid) -> Option<Uid> {
        self.by_guid.get(&guid).and_then(LiveAt::last)
    }
    /// The live UIDs in `first..=last`.
    pub fn uids_in(&self, first: Uid, last: Uid) -> impl Iterator<Item = Uid> + '_ {
        self.by_uid.range(first..=last.max(first)).map(|(uid, _)| *uid)
    }
    /// GUIDs live at more than one UID.
    pub fn duplicated(&self) -> &BTreeSet<Guid> {
        &self.multi
    }
    /// Whether the GUID index says exactly what the records say (for debug checks).
    pub fn index_consistent(&self) -> bool {
        let mut expected: BTreeMap<Guid, BTreeSet<Uid>> = BTreeMap::new();
        for (uid, r) in &self.by_uid {
            if *uid != r.uid {
                return false;
            }
            expected.entry(r.guid).or_default().insert(*uid);
        }
        let multi: BTreeSet<Guid> = expected.iter().filter(|(_, u)| u.len() > 1).map(|(g, _)| *g).collect();
        let by_modseq: BTreeSet<(ModSeq, Uid)> = self.by_uid.values().map(|r| (r.modseq, r.uid)).collect();
        let mut counts = FlagCounts::default();
        self.by_uid.values().for_each(|r| counts.add(r));
        let by_checksum: BTreeSet<(u64, Uid)> = self.by_uid.values().map(|r| (r.checksum, r.uid)).collect();
        let indexed: BTreeMap<Guid, BTreeSet<Uid>> =
            self.by_guid.iter().map(|(guid, uids)| (*guid, uids.iter().collect())).collect();
        expected == indexed
            && multi == self.multi
            && by_modseq == self.by_modseq
            && counts == self.counts
            && by_checksum == self.by_checksum
    }
}

impl From<BTreeMap<Uid, MessageRecord>> for Messages {
    fn from(map: BTreeMap<Uid, MessageRecord>) -> Messages {
        map.into_values().map(|r| (r.uid, r)).collect()
    }
}

impl From<Messages> for BTreeMap<Uid, MessageRecord> {
    fn from(m: Messages) -> BTreeMap<Uid, MessageRecord> {
        m.by_uid
    }
}

impl FromIterator<(Uid, MessageRecord)> for Messages {
    fn from_iter<I: IntoIterator<Item = (Uid, MessageRecord)>>(iter: I) -> Messages {
        let mut m = Messages::new();
        for (uid, r) in iter {
            m.insert(uid, r);
        }
        m
    }
}

impl std::ops::Index<&Uid> for Messages {
    type Output = MessageRecord;
    /// Like a map's index: for tests and for UIDs known to be live.
    fn index(&self, uid: &Uid) -> &MessageRecord {
        &self.by_uid[uid]
    }
}

impl<'a> IntoIterator for &'a Messages {
    type Item = (&'a Uid, &'a MessageRecord);
    type IntoIter = btree_map::Iter<'a, Uid, MessageRecord>;
    fn into_iter(self) -> Self::IntoIter {
        self.by_uid.iter()
    }
}

/// One mailbox as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMailbox {
    pub uidvalidity: u32,
    pub uidnext: Uid,
    pub highest_modseq: ModSeq,
    pub messages: Messages,
    /// Keyed by (uid, guid): a retired UID keeps one tombstone per message it held.
    pub tombstones: BTreeMap<(Uid, Guid), Tombstone>,
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// UIDs whose tombstones were collected (see [`Retired`]).
    #[serde(default)]
    pub retired: Retired,
}

impl StoredMailbox {
    /// The modseq a master stamps a lifecycle change with: above HIGHESTMODSEQ and above
    /// every lifecycle stamp, which a copy joined from another master's copy of the same
    /// incarnation can hold above its own HIGHESTMODSEQ (a CREATE stamped below such a
    /// deletion would leave the mailbox hidden; focus import seed 77913 stamped a
    /// RENAME's deletion 2 beside a joined one at 4, a debug assertion).
    pub fn next_lifecycle_modseq(&self) -> ModSeq {
        self.highest_modseq.max(self.lifecycle.latest()).saturating_add(1)
    }

    /// The tombstones kept at `uid` (one per GUID a merge met there).
    pub fn tombstones_at(&self, uid: Uid) -> impl Iterator<Item = &Tombstone> {
        self.tombstones.range((uid, Guid(0))..=(uid, Guid(u128::MAX))).map(|(_, t)| t)
    }

    /// The highest UID `guid` was expunged at here, while its tombstone is kept.
    pub fn expunged_at(&self, guid: Guid) -> Option<Uid> {
        self.tombstones.keys().filter(|(_, g)| *g == guid).map(|(uid, _)| *uid).max()
    }

    /// Joins retired UIDs in and drops the tombstones they cover. Returns the joined
    /// ranges that added UIDs and whether anything changed. (UIDNEXT is the caller's: it
    /// is meta, written by its own write.)
    pub fn retire(&mut self, retired: &Retired) -> (Vec<(Uid, Uid)>, bool) {
        let mut dropped = Vec::new();
        self.retire_collecting(retired, &mut dropped)
    }

    /// [`StoredMailbox::retire`], adding to `dropped` the bindings whose tombstones it
    /// dropped.
    pub fn retire_collecting(&mut self, retired: &Retired, dropped: &mut Vec<(Uid, Guid)>) -> (Vec<(Uid, Uid)>, bool) {
        let (added, changed) = self.retired.join(retired);
        if changed {
            let covered = &self.retired;
            self.tombstones.retain(|key, t| {
                let keep = !covered.covers(t);
                if !keep {
                    dropped.push(*key);
                }
                keep
            });
        }
        (added, changed)
    }

    /// Whether clients see the mailbox (see [`Lifecycle`]).
    pub fn visible(&self) -> bool {
        self.visible_by(|_| true)
    }

    /// [`StoredMailbox::visible`] counting only the messages `counted` keeps (a windowed
    /// replica's view: a box only messages outside the window keep shown is not shown).
    pub fn visible_by(&self, counted: impl Fn(&MessageRecord) -> bool) -> bool {
        !self.lifecycle.deleted() || self.messages.values().any(counted)
    }
}

/// What the image knows of a stored body: the bytes themselves are in the driver's
/// [`BodyStore`], never in the core's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBody {
    pub checksum: u64,
    pub len: u64,
}

/// Where a server's message bodies live: owned by the driver (files on the node's disk,
/// memory in the simulator), written by it from [`StoreWrite::PutBody`] and
/// [`StoreWrite::RemoveBody`] in order, read by the core when it must send or check a
/// body. A read returns what is stored *now*, damaged or not: the core checks it against
/// the checksum. Reads must be deterministic for a given store content.
pub trait BodyStore: Send + std::fmt::Debug {
    fn read(&self, guid: Guid) -> Option<Body>;

    /// The checksum of what is stored for `guid` now (the scrub's question). A store
    /// that knows it without reading (one in memory, which hashed the bytes when they
    /// were written and knows when they change) answers from there.
    fn checksum(&self, guid: Guid) -> Option<u64> {
        self.read(guid).map(|bytes| bytes.checksum())
    }

    /// [`BodyStore::checksum`] of each of `guids`, in their order: the scrub asks for a
    /// batch, which a store may answer at once.
    fn checksums(&self, guids: &[Guid]) -> Vec<Option<u64>> {
        guids.iter().map(|guid| self.checksum(*guid)).collect()
    }

    /// The text parts of the message `guid` whose whole body is `body`, for a partial
    /// replica that omits large bodies (see [`crate::partial`]): what it holds of such a
    /// message. The driver knows the mail format (the node cuts by MIME parts); the core
    /// never parses mail. None from a store that does not cut. Deterministic for given
    /// bytes.
    fn text_parts(&self, guid: Guid, body: &[u8]) -> Option<Body> {
        let _ = (guid, body);
        None
    }
}

/// How a driver cuts a message to its text parts (see [`BodyStore::text_parts`]).
pub type TextPartsCut = fn(&[u8]) -> Body;

/// A body store in memory, shared between the driver that writes it and the core that
/// reads it (the simulator, tests, the fuzzer).
#[derive(Clone, Default)]
pub struct MemoryBodies {
    /// Each body with the checksum of its bytes, taken when they were put. Asked by
    /// GUID only, never walked: a hash map (no order to keep deterministic).
    bodies: std::sync::Arc<std::sync::Mutex<BodyMap>>,
    /// How this driver cuts text parts, if it does.
    cut: Option<TextPartsCut>,
}

type BodyMap = std::collections::HashMap<Guid, (Body, u64), std::hash::BuildHasherDefault<crate::hash::GuidHasher>>;

// The bodies themselves are not printed: a count says what the store holds.
impl std::fmt::Debug for MemoryBodies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBodies").field("bodies", &self.locked().len()).finish()
    }
}

impl MemoryBodies {
    /// A store holding the same bodies that shares nothing with this one (a clone
    /// shares the store).
    pub fn deep_copy(&self) -> MemoryBodies {
        let bodies = self.locked().clone();
        MemoryBodies { bodies: std::sync::Arc::new(std::sync::Mutex::new(bodies)), cut: self.cut }
    }
    /// This store, cutting text parts with `cut`.
    pub fn cutting(mut self, cut: TextPartsCut) -> MemoryBodies {
        self.cut = Some(cut);
        self
    }
    fn locked(&self) -> std::sync::MutexGuard<'_, BodyMap> {
        // A panic elsewhere while holding the lock leaves the map itself whole.
        self.bodies.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
    /// Does what a body write asks; other writes are not about bodies.
    pub fn apply(&self, write: &StoreWrite) {
        match write {
            StoreWrite::PutBody { guid, bytes, checksum } => {
                // The core writes only bodies it checked against their checksum: no
                // second pass over the bytes.
                debug_assert_eq!(bytes.checksum(), *checksum);
                self.locked().insert(*guid, (bytes.clone(), *checksum));
            }
            StoreWrite::RemoveBody { guid } => {
                self.locked().remove(guid);
            }
            _ => {}
        }
    }
    /// Replaces what is stored for `guid` (a hand edit, a damaged disk).
    pub fn overwrite(&self, guid: Guid, bytes: Body) {
        let checksum = bytes.checksum();
        self.locked().insert(guid, (bytes, checksum));
    }
    pub fn is_empty(&self) -> bool {
        self.locked().is_empty()
    }
}

impl BodyStore for MemoryBodies {
    fn read(&self, guid: Guid) -> Option<Body> {
        self.locked().get(&guid).map(|(bytes, _)| bytes.clone())
    }

    fn checksum(&self, guid: Guid) -> Option<u64> {
        let checksum = self.locked().get(&guid).map(|(_, checksum)| *checksum);
        debug_assert_eq!(checksum, self.read(guid).map(|b| b.checksum()));
        checksum
    }

    fn checksums(&self, guids: &[Guid]) -> Vec<Option<u64>> {
        let bodies = self.locked();
        let checksums: Vec<Option<u64>> = guids.iter().map(|g| bodies.get(g).map(|(_, checksum)| *checksum)).collect();
        debug_assert!(
            guids.iter().zip(&checksums).all(|(g, c)| *c == bodies.get(g).map(|(b, _)| b.checksum())),
            "a stored checksum is its bytes'"
        );
        checksums
    }

    fn text_parts(&self, _guid: Guid, body: &[u8]) -> Option<Body> {
        self.cut.map(|cut| cut(body))
    }
}

/// One peer's replication log: changes it has not acknowledged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLog {
    pub next_seq: u64,
    pub entries: BTreeMap<u64, Change>,
    /// Mailboxes whose changes overflowed the log: they need a full SYNC with the peer.
    pub overflowed: std::collections::BTreeSet<MailboxKey>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskImage {
    pub mailboxes: BTreeMap<MailboxKey, StoredMailbox>,
    pub bodies: BTreeMap<Guid, StoredBody>,
    pub logs: BTreeMap<Sid, PeerLog>,
    /// Highest root epoch this server has seen; terms only grow, across restarts too.
    pub epoch: u64,
    /// Sequence of this server's own link-state announcements, so a restarted server's
    /// announcements are not mistaken for stale ones.
    pub link_seq: u64,
    /// Restarts so far; mixed into GUIDs and tags so nothing repeats after a crash.
    pub incarnation: u64,
    /// Who this store is: drawn when the store is made (0 until then) and never changed,
    /// so that peers can tell a restart from a lost disk. A master counts a peer's
    /// acknowledgement as a copy only while that peer still has the store that made it.
    #[serde(default)]
    pub store_id: u64,
    /// Servers added or retired after the configuration was written (joined with the
    /// configured servers at start; see `membership`).
    #[serde(default)]
    pub members: crate::membership::Membership,
    /// A partial replica's text parts of messages whose bodies it omits (see
    /// [`crate::partial`]), by GUID: opaque bytes the driver cut from the whole body.
    #[serde(default)]
    pub text_parts: BTreeMap<Guid, Body>,
    /// Omitted bodies fetched for a client's read and not to be kept
    /// (`Partial::keep_fetched` false): each is dropped once read, across a restart too.
    #[serde(default)]
    pub on_loan: BTreeSet<Guid>,
    /// This store was made after its cluster had run (a new server, or one started on
    /// an empty disk after losing its own): it first heard a peer that had been in a root
    /// term while it never had been. Its copies are then filled by its peers, and one
    /// filled part of the way is a state the mailbox never had (fewer messages under the
    /// cluster's UIDVALIDITY): until a master has confirmed a copy (`confirmed`), a read
    /// that cannot reach the master's position is refused rather than answered from it.
    /// A backup is written as a newcomer too (`DiskImage::backup_copy`).
    #[serde(default)]
    pub newcomer: bool,
    /// A newcomer's mailboxes whose copy here was once the same as its master's (see
    /// `newcomer`); at most one entry per mailbox the store holds. Empty otherwise.
    #[serde(default)]
    pub confirmed: BTreeSet<MailboxKey>,
    /// Bindings (UIDVALIDITY, UID, GUID) whose tombstones this server saw collected, by
    /// mailbox (see `server::recently_collected`): kept here so that a restart does not
    /// forget them, and a store put back from before the expunge is still told. At most
    /// `RECENTLY_COLLECTED_MAX` once the server has started. A mailbox with none is not
    /// listed.
    #[serde(default)]
    pub collected: BTreeMap<MailboxKey, BTreeSet<(u32, Uid, Guid)>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreWrite {
    MailboxMeta {
        mailbox: MailboxKey,
        uidvalidity: u32,
        uidnext: Uid,
        highest_modseq: ModSeq,
    },
    PutMessage {
        mailbox: MailboxKey,
        record: MessageRecord,
    },
    RemoveMessage {
        mailbox: MailboxKey,
        uid: Uid,
    },
    PutTombstone {
        mailbox: MailboxKey,
        tombstone: Tombstone,
    },
    PutBody {
        guid: Guid,
        checksum: u64,
        bytes: Body,
    },
    RemoveBody {
        guid: Guid,
    },
    LogAppend {
        peer: Sid,
        seq: u64,
        change: Change,
    },
    LogRemove {
        peer: Sid,
        seqs: Vec<u64>,
    },
    LogOverflow {
        peer: Sid,
        mailbox: MailboxKey,
        overflowed: bool,
    },
    Epoch {
        epoch: u64,
    },
    LinkSeq {
        seq: u64,
    },
    /// A start of the server, with the store's identity (see [`DiskImage::store_id`]):
    /// drawn at the first start, the stored one at every later start.
    Incarnation {
        incarnation: u64,
        store_id: u64,
    },
    /// The membership as this server now knows it (joined with what is stored).
    Members {
        members: crate::membership::Membership,
    },
    MailboxLifecycle {
        mailbox: MailboxKey,
        lifecycle: Lifecycle,
    },
    /// Joins retired UIDs into the mailbox and drops the tombstones they cover (see
    /// [`StoredMailbox::retire`]).
    RetireUids {
        mailbox: MailboxKey,
        retired: Retired,
    },
    /// A partial replica's text parts of a message whose body it omits.
    PutTextParts {
        guid: Guid,
        bytes: Body,
    },
    RemoveTextParts {
        guid: Guid,
    },
    /// An omitted body fetched for a client's read is (or is no longer) to be dropped
    /// once read.
    OnLoan {
        guid: Guid,
        on_loan: bool,
    },
    /// A replica takes its master's UIDVALIDITY for the mailbox (see
    /// `mailbox::merge_as_replica`): the old one's tombstones and retired UIDs go (its
    /// messages go by their own writes, before); the meta write sets the new value.
    NewValidity {
        mailbox: MailboxKey,
    },
    /// Entries a peer acknowledged, dropped from its log: a write nothing waits for
    /// ([`StoreWrite::is_lazy`]). A crash that loses it leaves entries the peer
    /// already holds; they go out again and merge there as no-ops.
    LogAcked {
        peer: Sid,
        seqs: Vec<u64>,
    },
    /// The store was made after its cluster had run (see [`DiskImage::newcomer`]):
    /// nothing it had confirmed counts any more.
    Newcomer,
    /// A newcomer's copy of the mailbox was the same as its master's (see
    /// [`DiskImage::confirmed`]).
    Confirmed {
        mailbox: MailboxKey,
    },
    /// The tombstones of these bindings of `mailbox` (at `uidvalidity`) were collected
    /// (see [`DiskImage::collected`]). Not lazy, though nothing waits for it: it comes
    /// with the retirement's writes, and is as durable as they are.
    Collected {
        mailbox: MailboxKey,
        uidvalidity: u32,
        bindings: Vec<(Uid, Guid)>,
    },
    /// Collected bindings of `mailbox` no longer remembered (past the horizon, or beyond
    /// the bound). Lazy: a crash that loses it remembers them longer, which is safe.
    ForgetCollected {
        mailbox: MailboxKey,
        bindings: Vec<(u32, Uid, Guid)>,
    },
}

impl StoreWrite {
    /// A write whose durability nothing waits for: a driver need not start a flush for
    /// it, and may hold it (in order) until the next write that is not lazy, for at
    /// most [`crate::io::LAZY_WRITE_HOLD_US_MAX`]. The core never holds a reply or a
    /// message for it (`Outbox::last_write`).
    pub fn is_lazy(&self) -> bool {
        matches!(self, StoreWrite::LogAcked { .. } | StoreWrite::ForgetCollected { .. })
    }

    /// The mailbox whose state this write changes, if it changes one: what a driver
    /// needs to wake the sessions watching that mailbox once the write is durable.
    pub fn mailbox(&self) -> Option<&MailboxKey> {
        match self {
            StoreWrite::MailboxMeta { mailbox, .. }
            | StoreWrite::PutMessage { mailbox, .. }
            | StoreWrite::RemoveMessage { mailbox, .. }
            | StoreWrite::PutTombstone { mailbox, .. }
            | StoreWrite::MailboxLifecycle { mailbox, .. }
            | StoreWrite::RetireUids { mailbox, .. }
            | StoreWrite::NewValidity { mailbox } => Some(mailbox),
            StoreWrite::LogOverflow { .. }
            | StoreWrite::PutBody { .. }
            | StoreWrite::RemoveBody { .. }
            | StoreWrite::PutTextParts { .. }
            | StoreWrite::RemoveTextParts { .. }
            | StoreWrite::OnLoan { .. }
            | StoreWrite::LogAppend { .. }
            | StoreWrite::LogRemove { .. }
            | StoreWrite::LogAcked { .. }
            | StoreWrite::Epoch { .. }
            | StoreWrite::LinkSeq { .. }
            | StoreWrite::Incarnation { .. }
            | StoreWrite::Members { .. }
            | StoreWrite::Newcomer
            | StoreWrite::Confirmed { .. }
            | StoreWrite::Collected { .. }
            | StoreWrite::ForgetCollected { .. } => None,
        }
    }
}

impl DiskImage {
    /// What a backup of this store holds when it is put back (`tandem backup`, the
    /// simulator's backup): no store identity (a restored copy is not the store that
    /// acknowledged what came after the snapshot: it draws a new one at its first
    /// start, and no master counts those acknowledgements as its copies), and a
    /// newcomer with nothing confirmed (its copies may be days behind: until their
    /// masters confirm them it answers no read its master's position cannot check and,
    /// alone, masters nothing; see `server::filling`).
    pub fn backup_copy(&self) -> DiskImage {
        DiskImage { store_id: 0, newcomer: true, confirmed: BTreeSet::new(), ..self.clone() }
    }

    /// [`DiskImage::apply`] taking the write: what it carries is moved in, not copied.
    pub fn apply_owned(&mut self, write: StoreWrite) {
        match write {
            StoreWrite::PutMessage { mailbox, record } => {
                let m = self.mailboxes.entry(mailbox).or_default();
                m.messages.insert(record.uid, record);
            }
            StoreWrite::LogAppend { peer, seq, change } => {
                let log = self.logs.entry(peer).or_default();
                log.entries.insert(seq, change);
                log.next_seq = log.next_seq.max(seq + 1);
            }
            other => self.apply(&other),
        }
    }

    pub fn apply(&mut self, write: &StoreWrite) {
        match write {
            StoreWrite::MailboxMeta { mailbox, uidvalidity, uidnext, highest_modseq } => {
                let m = self.mailboxes.entry(mailbox.clone()).or_default();
                m.uidvalidity = *uidvalidity;
                m.uidnext = *uidnext;
                m.highest_modseq = *highest_modseq;
            }
            StoreWrite::PutMessage { mailbox, record } => {
                let m = self.mailboxes.entry(mailbox.clone()).or_default();
                m.messages.insert(record.uid, record.clone());
            }
            StoreWrite::RemoveMessage { mailbox, uid } => {
                if let Some(m) = self.mailboxes.get_mut(mailbox) {
                    m.messages.remove(uid);
                }
            }
            StoreWrite::PutTombstone { mailbox, tombstone } => {
                let m = self.mailboxes.entry(mailbox.clone()).or_default();
                m.tombstones.insert((tombstone.uid, tombstone.guid), *tombstone);
            }
            StoreWrite::NewValidity { mailbox } => {
                if let Some(m) = self.mailboxes.get_mut(mailbox) {
                    m.tombstones.clear();
                    m.retired = Retired::default();
                }
            }
            StoreWrite::PutBody { guid, checksum, bytes } => {
                self.bodies.insert(*guid, StoredBody { checksum: *checksum, len: bytes.len() as u64 });
            }
            StoreWrite::RemoveBody { guid } => {
                self.bodies.remove(guid);
            }
            StoreWrite::PutTextParts { guid, bytes } => {
                self.text_parts.insert(*guid, bytes.clone());
            }
            StoreWrite::RemoveTextParts { guid } => {
                self.text_parts.remove(guid);
            }
            StoreWrite::OnLoan { guid, on_loan: true } => {
                self.on_loan.insert(*guid);
            }
            StoreWrite::OnLoan { guid, on_loan: false } => {
                self.on_loan.remove(guid);
            }
            StoreWrite::LogAppend { peer, seq, change } => {
                let log = self.logs.entry(*peer).or_default();
                log.entries.insert(*seq, change.clone());
                log.next_seq = log.next_seq.max(seq + 1);
            }
            StoreWrite::LogRemove { peer, seqs } | StoreWrite::LogAcked { peer, seqs } => {
                if let Some(log) = self.logs.get_mut(peer) {
                    for s in seqs {
                        log.entries.remove(s);
                    }
                }
            }
            StoreWrite::LogOverflow { peer, mailbox, overflowed } => {
                let log = self.logs.entry(*peer).or_default();
                if *overflowed {
                    log.overflowed.insert(mailbox.clone());
                } else {
                    log.overflowed.remove(mailbox);
                }
            }
            StoreWrite::Epoch { epoch } => self.epoch = self.epoch.max(*epoch),
            StoreWrite::LinkSeq { seq } => self.link_seq = self.link_seq.max(*seq),
            StoreWrite::Incarnation { incarnation, store_id } => {
                self.incarnation = self.incarnation.max(*incarnation);
                // Set once: a store keeps the identity it was made with.
                if self.store_id == 0 {
                    self.store_id = *store_id;
                }
            }
            StoreWrite::Members { members } => {
                self.members.join(members);
            }
            StoreWrite::Newcomer => {
                self.newcomer = true;
                self.confirmed.clear();
            }
            StoreWrite::Confirmed { mailbox } => {
                self.confirmed.insert(mailbox.clone());
            }
            StoreWrite::MailboxLifecycle { mailbox, lifecycle } => {
                self.mailboxes.entry(mailbox.clone()).or_default().lifecycle.join(lifecycle);
            }
            StoreWrite::RetireUids { mailbox, retired } => {
                self.mailboxes.entry(mailbox.clone()).or_default().retire(retired);
            }
            StoreWrite::Collected { mailbox, uidvalidity, bindings } => {
                let kept = self.collected.entry(mailbox.clone()).or_default();
                kept.extend(bindings.iter().map(|&(uid, guid)| (*uidvalidity, uid, guid)));
            }
            StoreWrite::ForgetCollected { mailbox, bindings } => {
                if let Some(kept) = self.collected.get_mut(mailbox) {
                    for binding in bindings {
                        kept.remove(binding);
                    }
                    if kept.is_empty() {
                        self.collected.remove(mailbox);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uid: Uid, guid: u128, modseq: ModSeq) -> MessageRecord {
        MessageRecord::bare(uid, guid, modseq)
    }

    #[test]
    fn the_modseq_index_follows_inserts_changes_and_removals() {
        let mut m: Messages =
            [(1, record(1, 10, 5)), (2, record(2, 20, 7)), (3, record(3, 30, 9))].into_iter().collect();
        let after = |m: &Messages, since| m.changed_since(since).map(|r| r.uid).collect::<Vec<_>>();
        assert_eq!(after(&m, 6), [2, 3]);
        assert_eq!(after(&m, 9), Vec::<Uid>::new());
        if let Some(mut r) = m.get_mut(&1) {
            r.modseq = 11;
        }
        assert_eq!(after(&m, 9), [1]);
        m.insert(2, record(2, 20, 12));
        assert_eq!(after(&m, 9), [1, 2]);
        m.remove(&1);
        assert_eq!(after(&m, 0), [3, 2]);
        if let Some(mut r) = m.get_mut(&3) {
            r.size = 2; // no modseq change: nothing to index again
        }
        assert!(m.index_consistent());
        let restored: Messages = BTreeMap::from(m.clone()).into();
        assert_eq!(restored, m);
    }

    #[test]
    fn flag_counts_follow_inserts_changes_and_removals() {
        let stamp = Stamp { modseq: 1, sid: Sid(1) };
        let with = |uid, flags: &[(&str, bool)]| {
            let mut r = record(uid, u128::from(uid), 1);
            for (f, present) in flags {
                r.flags.insert(Flag::new(f).unwrap(), FlagState { present: *present, stamp });
            }
            r
        };
        let mut m = Messages::new();
        m.insert(1, with(1, &[("\\Seen", true)]));
        m.insert(2, with(2, &[("\\seen", true), ("\\Deleted", true)]));
        m.insert(3, with(3, &[("\\Seen", false), ("$Work", true)]));
        assert_eq!(m.flag_counts(), FlagCounts { seen: 2, deleted: 1 });
        if let Some(mut r) = m.get_mut(&3) {
            r.flags.insert(Flag::new("\\Seen").unwrap(), FlagState { present: true, stamp });
        }
        if let Some(mut r) = m.get_mut(&2) {
            r.flags.insert(Flag::new("\\Deleted").unwrap(), FlagState { present: false, stamp });
        }
        assert_eq!(m.flag_counts(), FlagCounts { seen: 3, deleted: 0 });
        m.insert(1, with(1, &[]));
        m.remove(&2);
        assert_eq!(m.flag_counts(), FlagCounts { seen: 1, deleted: 0 });
        assert!(m.index_consistent());
    }
}
