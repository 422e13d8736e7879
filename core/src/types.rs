//! The data model of DESIGN.md: servers, mailboxes, messages, flags, tombstones.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A server id. Printed as `s<n>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Sid(pub u32);

impl fmt::Display for Sid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// A global message id: 128 bits, assigned once at delivery and kept by COPY.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Guid(pub u128);

impl Guid {
    /// Bits of a GUID that name the server that assigned it (its SID's low 16 bits; a
    /// SID fits them, see `EPOCH_SID_BITS`); the rest are random.
    pub const ORIGIN_MASK: u128 = 0xffff;

    /// In a STORE's or EXPUNGE's (UID, GUID) list: the message at this UID in the
    /// master's copy, a UID the forwarding server's copy has no trace of yet (see
    /// `Server::resolve_uids`). No message has it (an assigned GUID has random bits).
    pub const UNRESOLVED: Guid = Guid(0);

    /// The GUID of a copy of this message placed back into `mailbox`, where this one
    /// was expunged at UID `expunged_uid`: an expunge removes a GUID from a mailbox at
    /// every UID it has there, so the copy must be another message. Derived, not drawn:
    /// a retried COPY, or the same COPY made at the two masters of a partition (one may
    /// hold the tombstone, the other have collected it; both know the UID), places one
    /// message, as a COPY of a message the mailbox holds does. The origin bits stay.
    pub fn copied_back(self, mailbox: &MailboxKey, expunged_uid: Uid) -> Guid {
        let (user, name) = (mailbox.user.as_bytes(), mailbox.name.as_bytes());
        let h = crate::hash::fnv64(&[&self.0.to_le_bytes(), user, &[0], name, &expunged_uid.to_le_bytes()]);
        let hi = crate::hash::mix64(h);
        let lo = crate::hash::mix64(hi ^ h.rotate_left(32));
        let bits = (u128::from(hi) << 64) | u128::from(lo);
        Guid((bits & !Self::ORIGIN_MASK) | (self.0 & Self::ORIGIN_MASK))
    }

    /// The server that assigned this GUID, as far as its low bits say: a hint (a front
    /// end's `\Recent`), never trusted for anything that matters (a peer chooses it).
    pub fn origin(&self) -> u32 {
        (self.0 & Self::ORIGIN_MASK) as u32
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A message body's bytes. Cloning shares them (a reference count), so a body goes from
/// the front end through the core, the store and the socket without being copied.
///
/// The body's checksum is computed at most once per buffer and kept with it: the bytes
/// never change, so a master that looks for a retried delivery and then stores it, or
/// a simulated cluster whose replicas receive the very buffer the master sent, hashes
/// it once. Bytes that arrive from a socket or a disk are a new buffer, hashed anew.
#[derive(Clone, Default)]
pub struct Body(std::sync::Arc<BodyBytes>);

#[derive(Default)]
struct BodyBytes {
    bytes: bytes::Bytes,
    checksum: std::sync::OnceLock<u64>,
}

impl Body {
    pub fn new() -> Body {
        Body::default()
    }
    pub fn from_static(bytes: &'static [u8]) -> Body {
        Body::from(bytes::Bytes::from_static(bytes))
    }
    pub fn copy_from_slice(bytes: &[u8]) -> Body {
        Body::from(bytes::Bytes::copy_from_slice(bytes))
    }
    /// [`crate::hash::body_checksum`] of the bytes, computed on first use.
    pub fn checksum(&self) -> u64 {
        *self.0.checksum.get_or_init(|| crate::hash::body_checksum(&self.0.bytes))
    }
}

impl From<bytes::Bytes> for Body {
    fn from(bytes: bytes::Bytes) -> Body {
        Body(std::sync::Arc::new(BodyBytes { bytes, checksum: std::sync::OnceLock::new() }))
    }
}

impl From<Body> for bytes::Bytes {
    fn from(body: Body) -> bytes::Bytes {
        body.0.bytes.clone()
    }
}

impl From<Vec<u8>> for Body {
    fn from(bytes: Vec<u8>) -> Body {
        Body::from(bytes::Bytes::from(bytes))
    }
}

impl From<String> for Body {
    fn from(text: String) -> Body {
        Body::from(bytes::Bytes::from(text))
    }
}

impl From<&'static [u8]> for Body {
    fn from(bytes: &'static [u8]) -> Body {
        Body::from_static(bytes)
    }
}

impl From<&'static str> for Body {
    fn from(text: &'static str) -> Body {
        Body::from_static(text.as_bytes())
    }
}

impl std::ops::Deref for Body {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0.bytes
    }
}

impl AsRef<[u8]> for Body {
    fn as_ref(&self) -> &[u8] {
        &self.0.bytes
    }
}

impl std::borrow::Borrow<[u8]> for Body {
    fn borrow(&self) -> &[u8] {
        &self.0.bytes
    }
}

impl PartialEq for Body {
    fn eq(&self, other: &Body) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0.bytes == other.0.bytes
    }
}

impl Eq for Body {}

impl PartialEq<[u8]> for Body {
    fn eq(&self, other: &[u8]) -> bool {
        self.0.bytes == other
    }
}

impl PartialEq<&[u8]> for Body {
    fn eq(&self, other: &&[u8]) -> bool {
        self.0.bytes == *other
    }
}

impl PartialEq<Vec<u8>> for Body {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.0.bytes == other
    }
}

impl PartialOrd for Body {
    fn partial_cmp(&self, other: &Body) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Body {
    fn cmp(&self, other: &Body) -> std::cmp::Ordering {
        self.0.bytes.cmp(&other.0.bytes)
    }
}

impl std::hash::Hash for Body {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.bytes.hash(state);
    }
}

// Printed as the bytes are (what traces and state descriptions have always shown).
impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0.bytes, f)
    }
}

impl Serialize for Body {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.bytes.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Body, D::Error> {
        bytes::Bytes::deserialize(deserializer).map(Body::from)
    }
}

pub type Uid = u32;
pub type ModSeq = u64;

/// Virtual or real monotonic time in microseconds. The core never reads a clock: the
/// caller passes `now` with every input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Instant(pub u64);

impl Instant {
    pub fn from_millis(ms: u64) -> Self {
        Instant(ms.saturating_mul(1000))
    }
    pub fn micros(self) -> u64 {
        self.0
    }
    pub fn plus_us(self, us: u64) -> Self {
        Instant(self.0.saturating_add(us))
    }
}

/// (user, mailbox name). Both are non-empty and contain no control characters.
/// Ordered as the text is, user first, then name (what a derive would give).
#[derive(Clone, Serialize, Deserialize)]
#[serde(from = "MailboxKeyText", into = "MailboxKeyText")]
pub struct MailboxKey {
    /// Shared, not owned: a key is cloned into every write, change and job, and a
    /// reference count costs less than a copy of the text (serialized as a string).
    pub user: std::sync::Arc<str>,
    pub name: std::sync::Arc<str>,
    /// The prefix words of user and of name (see `prefix_word`): keys are compared in
    /// every map of mailboxes, and most pairs are decided by one integer comparison.
    /// Set once, by [`MailboxKey::from_shared`].
    prefixes: [u64; 2],
}

/// A key as it is stored and sent: its text only.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename = "MailboxKey")]
struct MailboxKeyText {
    user: std::sync::Arc<str>,
    name: std::sync::Arc<str>,
}

impl From<MailboxKeyText> for MailboxKey {
    fn from(text: MailboxKeyText) -> Self {
        MailboxKey::from_shared(text.user, text.name)
    }
}

impl From<MailboxKey> for MailboxKeyText {
    fn from(key: MailboxKey) -> Self {
        MailboxKeyText { user: key.user, name: key.name }
    }
}

impl MailboxKey {
    pub fn new(user: &str, name: &str) -> Self {
        MailboxKey::from_shared(user.into(), name.into())
    }
    /// A key of text already shared (another key's user, a decoder's strings).
    pub fn from_shared(user: std::sync::Arc<str>, name: std::sync::Arc<str>) -> Self {
        let prefixes = [prefix_word(&user), prefix_word(&name)];
        MailboxKey { user, name, prefixes }
    }
    pub fn domain(&self) -> &str {
        self.user.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
    }
    /// The UIDVALIDITY every server derives for a new mailbox, so that two servers that
    /// create the same mailbox while partitioned agree without talking.
    pub fn initial_uidvalidity(&self) -> u32 {
        let h = crate::hash::fnv64(&[self.user.as_bytes(), b"\0", self.name.as_bytes()]);
        ((h as u32) & 0x7fff_ffff).max(1)
    }

    /// The UIDVALIDITY a RENAME of `from` (UIDVALIDITY `from_validity`) gives this name
    /// where the name has no history: drawn from the rename's path (the source's
    /// UIDVALIDITY and both names), never the source's own. Each birth of a name by a
    /// RENAME is thus an incarnation of its own: two servers apart that bring the same
    /// messages under one name by different paths (crossed RENAMEs, INBOX to Box1 to Box3
    /// on one side and INBOX to Box3 to Box1 on the other) hold two incarnations, and the
    /// tombstones one side's RENAME away leaves do not take the other side's live copies
    /// (focus incarnation seed 13005: they did, and the message was in no mailbox). The
    /// same RENAME on both sides gives one value, so that those copies are one
    /// incarnation as they should be; and a client can tell a rename from the values
    /// (NOTIFY does).
    pub fn renamed_uidvalidity(&self, from: &MailboxKey, from_validity: u32) -> u32 {
        let h = crate::hash::fnv64(&[
            &from_validity.to_be_bytes(),
            from.user.as_bytes(),
            b"\0",
            from.name.as_bytes(),
            b"\0",
            self.user.as_bytes(),
            b"\0",
            self.name.as_bytes(),
        ]);
        let mut v = (crate::hash::mix64(h) as u32) & 0x7fff_ffff;
        // Neither the source's value nor the one a CREATE of this name gives (which would
        // make the birth one with a CREATE's on another server), nor 0.
        let created = self.initial_uidvalidity();
        while v == 0 || v == from_validity || v == created {
            v = v.wrapping_add(1) & 0x7fff_ffff;
        }
        v
    }
}

/// Seven bytes of `text` (zero-padded) and its length up to eight, as one big-endian
/// word. Two texts whose words differ order as their words do: they differ in the first
/// seven bytes (padding is below any byte the longer text has there, or the texts
/// agree up to it), or one is a shorter prefix of the other. Equal words under eight in
/// length are equal texts; at eight the rest decides.
fn prefix_word(text: &str) -> u64 {
    let mut word = [0u8; 8];
    let n = text.len().min(7);
    word[..n].copy_from_slice(&text.as_bytes()[..n]);
    word[7] = text.len().min(PREFIX_LONG) as u8;
    u64::from_be_bytes(word)
}

/// A prefix word's length byte for a text longer than its seven bytes.
const PREFIX_LONG: usize = 8;

/// `a.cmp(b)` for text, with its prefix words: most pairs are decided by the words or
/// share one allocation (clones of one key).
#[inline]
fn shared_text_cmp(a: &std::sync::Arc<str>, b: &std::sync::Arc<str>, wa: u64, wb: u64) -> std::cmp::Ordering {
    if wa != wb {
        return wa.cmp(&wb);
    }
    if (wa & 0xff) < PREFIX_LONG as u64 || std::sync::Arc::ptr_eq(a, b) {
        return std::cmp::Ordering::Equal;
    }
    a.cmp(b)
}

impl PartialEq for MailboxKey {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for MailboxKey {}

impl PartialOrd for MailboxKey {
    #[inline]
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for MailboxKey {
    #[inline]
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let [su, sn] = self.prefixes;
        let [ou, on] = other.prefixes;
        shared_text_cmp(&self.user, &other.user, su, ou).then_with(|| shared_text_cmp(&self.name, &other.name, sn, on))
    }
}

impl std::hash::Hash for MailboxKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.user.hash(state);
        self.name.hash(state);
    }
}

// As a derive would print it: the text only.
impl fmt::Debug for MailboxKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MailboxKey").field("user", &self.user).field("name", &self.name).finish()
    }
}

impl fmt::Display for MailboxKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.user, self.name)
    }
}

/// How coarse mastership is: one master per mailbox (default), per user, per domain,
/// or one for everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub enum Granularity {
    #[default]
    Mailbox,
    User,
    Domain,
    Global,
}

/// The unit that has one master.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MasterKey {
    Mailbox(MailboxKey),
    User(String),
    Domain(String),
    Global,
}

impl MasterKey {
    pub fn of(mailbox: &MailboxKey, granularity: Granularity) -> MasterKey {
        match granularity {
            Granularity::Mailbox => MasterKey::Mailbox(mailbox.clone()),
            Granularity::User => MasterKey::User(mailbox.user.to_string()),
            Granularity::Domain => MasterKey::Domain(mailbox.domain().to_string()),
            Granularity::Global => MasterKey::Global,
        }
    }
    pub fn covers(&self, mailbox: &MailboxKey) -> bool {
        match self {
            MasterKey::Mailbox(k) => k == mailbox,
            MasterKey::User(u) => **u == *mailbox.user,
            MasterKey::Domain(d) => d == mailbox.domain(),
            MasterKey::Global => true,
        }
    }
}

impl fmt::Display for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MasterKey::Mailbox(k) => write!(f, "mailbox {k}"),
            MasterKey::User(u) => write!(f, "user {u}"),
            MasterKey::Domain(d) => write!(f, "domain {d}"),
            MasterKey::Global => write!(f, "global"),
        }
    }
}

/// An IMAP system flag (`\Seen`) or keyword (`$Junk`, `work`). Atom characters only.
/// Shared text: a message's record, flags included, is cloned into every write, change
/// and reply, and a reference count costs less than an allocation (serialized as a
/// string).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Flag(std::sync::Arc<str>);

pub const FLAG_LEN_MAX: usize = 64;

impl Flag {
    pub fn new(text: &str) -> Result<Flag, crate::Error> {
        let body = text.strip_prefix('\\').unwrap_or(text);
        let ok = !body.is_empty()
            && text.len() <= FLAG_LEN_MAX
            && body.bytes().all(|b| b.is_ascii_graphic() && !b"(){%*\"\\]".contains(&b));
        if ok { Ok(Flag(text.into())) } else { Err(crate::Error::BadFlag(text.to_string())) }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who changed a flag last: the master's modseq for that change and the master's id.
/// Flag merges after a partition keep, per flag, the change with the highest stamp: both
/// sides' deltas are replayed, and every server computes the same result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub modseq: ModSeq,
    pub sid: Sid,
}

/// One flag's last change: set or cleared, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlagState {
    pub present: bool,
    pub stamp: Stamp,
}

/// A message as every server stores it.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "StoredRecord", from = "StoredRecord")]
pub struct MessageRecord {
    pub uid: Uid,
    pub guid: Guid,
    /// Received date, seconds since the Unix epoch.
    pub received: u64,
    pub size: u32,
    /// Checksum of the body, fixed at delivery.
    pub checksum: u64,
    pub modseq: ModSeq,
    /// Every flag ever touched, with its last change. Cleared flags stay as entries so a
    /// removal is never lost in a merge.
    pub flags: Flags,
    /// A retry of its delivery was answered with it (a claim, `server::cancels`): a client
    /// was told it is stored, so no cancel of its save removes it, wherever the cancel
    /// was decided. Joined as "either copy says so"; never cleared.
    pub claimed: bool,
    /// A user replica's push placed this binding, the replica not knowing that the
    /// cluster held it: mail made there (a new message, a COPY) or a push whose answer
    /// was lost. A client's expunge of it leaves a tombstone the cluster keeps past
    /// collection (`server::tombstones`): the replica may push the binding again, as
    /// new, and only the tombstone tells it from new mail. Joined as "either copy says
    /// so"; never cleared.
    pub pushed: bool,
}

/// `claimed` shows only when set, so a record reads (and the simulator's trace hash,
/// which formats replies, comes out) as before claims were recorded.
impl fmt::Debug for MessageRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("MessageRecord");
        d.field("uid", &self.uid)
            .field("guid", &self.guid)
            .field("received", &self.received)
            .field("size", &self.size)
            .field("checksum", &self.checksum)
            .field("modseq", &self.modseq)
            .field("flags", &self.flags);
        if self.claimed {
            d.field("claimed", &true);
        }
        if self.pushed {
            d.field("pushed", &true);
        }
        d.finish()
    }
}

/// The top bit of a stored or sent size: the record is claimed. No size uses it (a body
/// is at most `wire::LITERAL_LEN_MAX`, far below 2^30), so a store written, or a peer
/// built, before claims were recorded reads the same bytes as unclaimed records.
const CLAIMED_SIZE_BIT: u32 = 1 << 31;
/// The next bit: the binding was pushed by a user replica (`MessageRecord::pushed`).
const PUSHED_SIZE_BIT: u32 = 1 << 30;
/// The bits of a stored or sent size that are the size.
pub const SIZE_BITS: u32 = PUSHED_SIZE_BIT - 1;

/// A size field's parts (`MessageRecord::unpack_size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedSize {
    pub size: u32,
    pub claimed: bool,
    pub pushed: bool,
}

impl MessageRecord {
    /// The size field as stored and sent, with the claim and the push in its top bits.
    pub fn packed_size(&self) -> u32 {
        (self.size & SIZE_BITS)
            | if self.claimed { CLAIMED_SIZE_BIT } else { 0 }
            | if self.pushed { PUSHED_SIZE_BIT } else { 0 }
    }

    /// The size, the claim and the push from a stored or sent size field.
    pub fn unpack_size(packed: u32) -> PackedSize {
        PackedSize {
            size: packed & SIZE_BITS,
            claimed: packed & CLAIMED_SIZE_BIT != 0,
            pushed: packed & PUSHED_SIZE_BIT != 0,
        }
    }

    /// A record with nothing but a binding and a modseq (tests).
    #[cfg(test)]
    pub(crate) fn bare(uid: Uid, guid: u128, modseq: ModSeq) -> MessageRecord {
        let (received, size, checksum, flags) = (0, 1, 0, Flags::default());
        MessageRecord { uid, guid: Guid(guid), received, size, checksum, modseq, flags, claimed: false, pushed: false }
    }

    /// Joins another copy's claim and push into this one; whether either changed.
    pub fn join_claim(&mut self, other: &MessageRecord) -> bool {
        let changed = (other.claimed && !self.claimed) || (other.pushed && !self.pushed);
        self.claimed |= other.claimed;
        self.pushed |= other.pushed;
        changed
    }
}

/// A record as stored and recorded: the claim rides in the size (`CLAIMED_SIZE_BIT`).
#[derive(Clone, Serialize, Deserialize)]
struct StoredRecord {
    uid: Uid,
    guid: Guid,
    received: u64,
    size: u32,
    checksum: u64,
    modseq: ModSeq,
    flags: Flags,
}

impl From<MessageRecord> for StoredRecord {
    fn from(r: MessageRecord) -> Self {
        let size = r.packed_size();
        let MessageRecord { uid, guid, received, checksum, modseq, flags, .. } = r;
        StoredRecord { uid, guid, received, size, checksum, modseq, flags }
    }
}

impl From<StoredRecord> for MessageRecord {
    fn from(s: StoredRecord) -> Self {
        let PackedSize { size, claimed, pushed } = MessageRecord::unpack_size(s.size);
        let StoredRecord { uid, guid, received, checksum, modseq, flags, .. } = s;
        MessageRecord { uid, guid, received, size, checksum, modseq, flags, claimed, pushed }
    }
}

/// A record's flags by name, each with its last change: shared between the clones of a
/// record (a write, a log entry, a change to each peer) until one of them changes
/// (copy on write). Read as the map it holds; stored, sent and printed as that map.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Flags(std::sync::Arc<BTreeMap<Flag, FlagState>>);

impl Flags {
    /// Sets one flag's state; the map is this record's own copy from here on.
    pub fn insert(&mut self, flag: Flag, state: FlagState) -> Option<FlagState> {
        std::sync::Arc::make_mut(&mut self.0).insert(flag, state)
    }
}

impl std::ops::Deref for Flags {
    type Target = BTreeMap<Flag, FlagState>;
    fn deref(&self) -> &BTreeMap<Flag, FlagState> {
        &self.0
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<BTreeMap<Flag, FlagState>> for Flags {
    fn from(map: BTreeMap<Flag, FlagState>) -> Flags {
        Flags(std::sync::Arc::new(map))
    }
}

impl FromIterator<(Flag, FlagState)> for Flags {
    fn from_iter<I: IntoIterator<Item = (Flag, FlagState)>>(iter: I) -> Flags {
        Flags::from(iter.into_iter().collect::<BTreeMap<_, _>>())
    }
}

impl<'a> IntoIterator for &'a Flags {
    type Item = (&'a Flag, &'a FlagState);
    type IntoIter = std::collections::btree_map::Iter<'a, Flag, FlagState>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl MessageRecord {
    pub fn present_flags(&self) -> Vec<Flag> {
        self.flags.iter().filter(|(_, s)| s.present).map(|(f, _)| f.clone()).collect()
    }

    /// Whether the flag (a system flag's name in any case, as IMAP compares them) is set.
    pub fn has_flag(&self, name: &str) -> bool {
        self.flags.iter().any(|(f, s)| s.present && f.as_str().eq_ignore_ascii_case(name))
    }
}

/// An expunged or retired (UID, GUID) binding. Kept so that a later merge knows the UID
/// was used and by which message (the seed's FIXME).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "StoredTombstone", try_from = "StoredTombstone")]
pub struct Tombstone {
    pub uid: Uid,
    pub guid: Guid,
    pub modseq: ModSeq,
    /// A client expunged the message. False when only the binding was retired by a
    /// UID-conflict renumbering and the message lives on at another UID: a retirement
    /// must never be taken for a deletion.
    pub expunged: bool,
    /// No client expunged it: the mailbox master found its body on no server (a census)
    /// and took the message out so that every copy agrees. Implies `expunged`. A user
    /// replica that still holds the body does not take such an expunge: it pushes the
    /// message again, and the master places it at a new UID (its body back in the
    /// cluster). Never collected, so that a replica away for long still sees it.
    pub lost: bool,
    /// No client expunged it: the client that saved it was told it is not stored, and its
    /// master took it out (a CANCEL, `server::cancels`). Implies `expunged`. It removes
    /// this binding only, never the message at another: a retry answered with the message
    /// (a claim) moves it to a new binding first, so a cancel that reaches a master after
    /// another master's claim cannot remove what a client was told is stored.
    pub cancelled: bool,
    /// A client's expunge (only) of a binding a user replica pushed
    /// (`MessageRecord::pushed`): kept past collection (`server::tombstones`).
    pub pushed: bool,
    /// The expunge a DELETE of the mailbox (or a RENAME of it away) made of each message
    /// it held, no client's of the message: another incarnation of the name, merged with
    /// this deleted one, keeps the messages it holds (`mailbox::take_other_incarnation_expunges`).
    /// Implies `expunged`; joined with a client's expunge of the binding, the client's
    /// stands (focus incarnation seed 108924).
    #[serde(default)]
    pub deleted: bool,
}

/// `lost` and `cancelled` show only when set, so a tombstone reads (and the simulator's
/// trace hash, which formats replies, comes out) as before those fates were told apart.
impl fmt::Debug for Tombstone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Tombstone");
        d.field("uid", &self.uid)
            .field("guid", &self.guid)
            .field("modseq", &self.modseq)
            .field("expunged", &self.expunged);
        if self.lost {
            d.field("lost", &true);
        }
        if self.cancelled {
            d.field("cancelled", &true);
        }
        if self.pushed {
            d.field("pushed", &true);
        }
        if self.deleted {
            d.field("deleted", &true);
        }
        d.finish()
    }
}

impl Tombstone {
    /// How final the tombstone is: a retirement, a cancel, a census's loss, a deletion's
    /// expunge, a client's expunge. Two tombstones of one binding join to the higher.
    pub fn fate_rank(&self) -> u8 {
        match (self.expunged, self.lost, self.cancelled) {
            (false, _, _) => 0,
            (true, false, true) => 1,
            (true, true, _) => 2,
            (true, false, false) if self.deleted => 3,
            (true, false, false) => 4,
        }
    }

    /// A renumbering's tombstone: the binding (`uid`, `guid`) is retired, the message
    /// lives on at another UID.
    pub fn retirement(uid: Uid, guid: Guid, modseq: ModSeq) -> Tombstone {
        Tombstone { uid, guid, modseq, expunged: false, lost: false, cancelled: false, pushed: false, deleted: false }
    }

    /// A client's expunge of the message at (`uid`, `guid`).
    pub fn expunge(uid: Uid, guid: Guid, modseq: ModSeq) -> Tombstone {
        Tombstone { uid, guid, modseq, expunged: true, lost: false, cancelled: false, pushed: false, deleted: false }
    }

    /// The expunge a mailbox's deletion makes of the message at (`uid`, `guid`).
    pub fn deletion(uid: Uid, guid: Guid, modseq: ModSeq) -> Tombstone {
        Tombstone { deleted: true, ..Tombstone::expunge(uid, guid, modseq) }
    }

    /// A cancel's tombstone of the binding (`uid`, `guid`).
    pub fn cancel(uid: Uid, guid: Guid, modseq: ModSeq) -> Tombstone {
        Tombstone { uid, guid, modseq, expunged: true, lost: false, cancelled: true, pushed: false, deleted: false }
    }

    /// A client's expunge (not a retirement, a cancel nor a census's loss); a deletion's
    /// is one too, but where a deleted incarnation meets another (`deleted`).
    pub fn by_client(&self) -> bool {
        self.expunged && !self.lost && !self.cancelled
    }

    /// An expunge that removes the message wherever it lives (a client's or a census's),
    /// not only this binding (a retirement, a cancel).
    pub fn of_message(&self) -> bool {
        self.expunged && !self.cancelled
    }

    /// The fate's names on the wire, by [`Tombstone::fate_code`].
    pub const FATE_NAMES: [&'static str; 6] =
        ["RETIRED", "EXPUNGED", "LOST", "CANCELLED", "EXPUNGED-PUSHED", "EXPUNGED-DELETED"];

    /// The fate as stored and sent: 0 retired, 1 expunged, 2 lost, 3 cancelled, 4 a
    /// client's expunge of a pushed binding, 5 a deletion's expunge (a store written when
    /// the fate was a `bool`, one byte 0 or 1 under bincode, reads unchanged).
    pub fn fate_code(&self) -> u8 {
        match (self.expunged, self.lost, self.cancelled) {
            (false, _, _) => 0,
            (true, false, false) if self.pushed => 4,
            (true, false, false) if self.deleted => 5,
            (true, false, false) => 1,
            (true, true, _) => 2,
            (true, false, true) => 3,
        }
    }

    /// A tombstone of the fate [`Tombstone::fate_code`] gives `code`; None for no fate.
    pub fn with_fate(uid: Uid, guid: Guid, modseq: ModSeq, code: u8) -> Option<Tombstone> {
        let (expunged, lost, cancelled, pushed, deleted) = match code {
            0 => (false, false, false, false, false),
            1 => (true, false, false, false, false),
            2 => (true, true, false, false, false),
            3 => (true, false, true, false, false),
            4 => (true, false, false, true, false),
            5 => (true, false, false, false, true),
            _ => return None,
        };
        Some(Tombstone { uid, guid, modseq, expunged, lost, cancelled, pushed, deleted })
    }
}

/// A tombstone as stored and recorded: the fate is one byte ([`Tombstone::fate_code`]).
#[derive(Clone, Copy, Serialize, Deserialize)]
struct StoredTombstone {
    uid: Uid,
    guid: Guid,
    modseq: ModSeq,
    fate: u8,
}

impl From<Tombstone> for StoredTombstone {
    fn from(t: Tombstone) -> Self {
        StoredTombstone { uid: t.uid, guid: t.guid, modseq: t.modseq, fate: t.fate_code() }
    }
}

impl TryFrom<StoredTombstone> for Tombstone {
    type Error = String;
    fn try_from(s: StoredTombstone) -> Result<Self, String> {
        Tombstone::with_fate(s.uid, s.guid, s.modseq, s.fate)
            .ok_or_else(|| format!("a tombstone's fate is 0 to 5, not {}", s.fate))
    }
}

/// The summary carried by MBOX: enough to tell in O(1) whether two copies differ.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Summary {
    pub mailbox: MailboxKey,
    pub uidvalidity: u32,
    pub uidnext: Uid,
    pub count: u32,
    pub highest_modseq: ModSeq,
    pub digest: u64,
}

/// A whole mailbox or a part of one, as sent by SYNC and by merged changes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MailboxState {
    pub mailbox: MailboxKey,
    pub uidvalidity: u32,
    pub uidnext: Uid,
    pub highest_modseq: ModSeq,
    pub messages: Vec<MessageRecord>,
    pub tombstones: Vec<Tombstone>,
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// UIDs whose tombstones were collected (all of them, or, in a piece of a state, some).
    #[serde(default)]
    pub retired: Retired,
}

impl MailboxState {
    /// A mailbox's state with nothing in it but its name and UIDVALIDITY: the frame a
    /// change's records are merged in, or "no such mailbox here" (UIDVALIDITY 0).
    pub fn empty(mailbox: MailboxKey, uidvalidity: u32) -> MailboxState {
        MailboxState {
            mailbox,
            uidvalidity,
            uidnext: 1,
            highest_modseq: 0,
            messages: Vec::new(),
            tombstones: Vec::new(),
            lifecycle: Lifecycle::default(),
            retired: Retired::default(),
        }
    }
}

/// The UIDs of a mailbox whose tombstones were collected, as ranges, and the modseq of
/// the latest collection. A retired UID was shown to clients as a message that is gone:
/// no message may be placed there again, and a message found live there (a copy from a
/// disk restored or replaced since, or edited by hand) moves to a new UID rather than
/// being dropped. Copies join by union and maximum. A tombstone at a retired UID with a
/// modseq at or below `collected` was collected: it is dropped wherever it is met.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Retired {
    /// First UID -> last UID of each range; ranges neither overlap nor touch.
    pub ranges: BTreeMap<Uid, Uid>,
    pub collected: ModSeq,
}

impl Retired {
    pub fn is_default(&self) -> bool {
        self.ranges.is_empty() && self.collected == 0
    }

    pub fn contains(&self, uid: Uid) -> bool {
        self.ranges.range(..=uid).next_back().is_some_and(|(_, last)| *last >= uid)
    }

    /// Whether a tombstone was collected (see the type's comment).
    pub fn covers(&self, t: &Tombstone) -> bool {
        t.modseq <= self.collected && self.contains(t.uid)
    }

    /// A collected binding named by a tombstone these ranges cover (none if they do not
    /// retire its UID): how a server says which binding it collected, and what
    /// `mailbox::drop_collected_copies` takes.
    pub fn name(&self, uid: Uid, guid: Guid) -> Option<Tombstone> {
        self.contains(uid).then(|| Tombstone::expunge(uid, guid, self.collected))
    }

    /// The highest retired UID.
    pub fn last_uid(&self) -> Option<Uid> {
        self.ranges.values().next_back().copied()
    }

    /// Adds `first..=last`, merging with the ranges it overlaps or touches.
    pub fn insert_range(&mut self, first: Uid, last: Uid) {
        debug_assert!(first <= last, "a range runs upwards");
        let (mut first, mut last) = (first, last);
        // The range that starts at or before `first` may reach it (or touch it).
        if let Some((&start, &end)) = self.ranges.range(..=first).next_back()
            && end.saturating_add(1) >= first
        {
            first = start;
            last = last.max(end);
        }
        // Ranges that start inside (or right after) the new one are swallowed.
        let swallowed: Vec<(Uid, Uid)> =
            self.ranges.range(first..=last.saturating_add(1)).map(|(s, e)| (*s, *e)).collect();
        for (start, end) in swallowed {
            self.ranges.remove(&start);
            last = last.max(end);
        }
        self.ranges.insert(first, last);
        debug_assert!(self.well_formed(), "retired ranges overlap or touch");
    }

    /// Joins `other` in. Returns the ranges of `other` that held a UID not retired here
    /// before (where a live message may now sit on a retired UID), and whether anything
    /// changed.
    pub fn join(&mut self, other: &Retired) -> (Vec<(Uid, Uid)>, bool) {
        let mut added = Vec::new();
        for (&first, &last) in &other.ranges {
            let covered = self.ranges.range(..=first).next_back().is_some_and(|(_, end)| *end >= last);
            if !covered {
                added.push((first, last));
                self.insert_range(first, last);
            }
        }
        let raised = other.collected > self.collected;
        self.collected = self.collected.max(other.collected);
        let changed = raised || !added.is_empty();
        (added, changed)
    }

    /// Ranges in order, none overlapping or touching, none empty.
    pub fn well_formed(&self) -> bool {
        let mut previous_end: Option<Uid> = None;
        for (&first, &last) in &self.ranges {
            if first > last || first == 0 || previous_end.is_some_and(|end| end.saturating_add(1) >= first) {
                return false;
            }
            previous_end = Some(last);
        }
        true
    }
}

/// When a client last created and last deleted the mailbox (master modseqs; 0 never).
/// Both only grow, so copies join by maximum. A mailbox is shown when it holds a live
/// message or was created at or after its last deletion: a DELETE on one side of a
/// partition never hides mail that the other side saved meanwhile. UIDVALIDITY and
/// UIDNEXT survive a delete, so a re-created mailbox never reuses a UID.
///
/// A user's subscription to the mailbox (IMAP SUBSCRIBE/UNSUBSCRIBE) is kept the same
/// way: when a client last subscribed and last unsubscribed it, ordered by the master;
/// it is subscribed when the subscription is the later one (across a partition, the
/// later modseq wins, and unsubscribing wins a tie). A subscription outlives a DELETE,
/// as RFC 3501 wants.
///
/// The mailbox's special use (RFC 6154, set by CREATE-SPECIAL-USE) is the value stamped
/// by the latest modseq that set one; at a tie (two masters across a partition) the
/// larger set wins, so copies join to one answer in any order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lifecycle {
    pub created_at: ModSeq,
    pub deleted_at: ModSeq,
    #[serde(default)]
    pub subscribed_at: ModSeq,
    #[serde(default)]
    pub unsubscribed_at: ModSeq,
    #[serde(default)]
    pub special_use: SpecialUse,
    /// The modseq that set `special_use`; 0 when no client ever did.
    #[serde(default)]
    pub special_use_at: ModSeq,
}

/// A set of RFC 6154 special uses, one bit each (see [`SpecialUse::NAMES`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SpecialUse(pub u8);

impl SpecialUse {
    pub const NONE: SpecialUse = SpecialUse(0);
    /// Each use's IMAP attribute and bit, in the order LIST shows them.
    pub const NAMES: [(&'static str, u8); 7] = [
        ("\\All", 1),
        ("\\Archive", 2),
        ("\\Drafts", 4),
        ("\\Flagged", 8),
        ("\\Junk", 16),
        ("\\Sent", 32),
        ("\\Trash", 64),
    ];
    const KNOWN: u8 = 127;

    /// The use an attribute names (case-insensitive), or None for an unknown one.
    pub fn named(attribute: &str) -> Option<SpecialUse> {
        Self::NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(attribute)).map(|(_, bit)| SpecialUse(*bit))
    }

    /// The attributes of the uses in this set, in [`SpecialUse::NAMES`] order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES.iter().filter(move |(_, bit)| self.0 & bit != 0).map(|(n, _)| *n)
    }

    pub fn union(self, other: SpecialUse) -> SpecialUse {
        SpecialUse(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Only bits that name a use (a peer or a file could send others).
    pub fn is_valid(self) -> bool {
        self.0 & !Self::KNOWN == 0
    }
}

impl Lifecycle {
    /// A DELETE came after the last CREATE (a mailbox so deleted is still shown while it
    /// holds messages: see `StoredMailbox::visible`).
    pub fn deleted(&self) -> bool {
        self.deleted_at > self.created_at
    }

    pub fn join(&mut self, other: &Lifecycle) -> bool {
        let before = *self;
        self.created_at = self.created_at.max(other.created_at);
        self.deleted_at = self.deleted_at.max(other.deleted_at);
        self.subscribed_at = self.subscribed_at.max(other.subscribed_at);
        self.unsubscribed_at = self.unsubscribed_at.max(other.unsubscribed_at);
        if (other.special_use_at, other.special_use) > (self.special_use_at, self.special_use) {
            (self.special_use_at, self.special_use) = (other.special_use_at, other.special_use);
        }
        before != *self
    }

    pub fn subscribed(&self) -> bool {
        self.subscribed_at > self.unsubscribed_at
    }

    /// The newest of the stamps (see `StoredMailbox::next_lifecycle_modseq`).
    pub fn latest(&self) -> ModSeq {
        self.created_at.max(self.deleted_at).max(self.subscribed_at).max(self.unsubscribed_at).max(self.special_use_at)
    }

    /// The special use a client gave the mailbox, or None when none ever did (the
    /// server's own default by name then applies).
    pub fn special_use(&self) -> Option<SpecialUse> {
        (self.special_use_at > 0).then_some(self.special_use)
    }

    pub fn is_default(&self) -> bool {
        *self == Lifecycle::default()
    }
}

/// How SAVE/COPY is acknowledged (DESIGN.md, Durability modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Durability {
    /// Acked when durable on `replicas + 1` servers, else a temporary failure.
    #[default]
    Sync,
    /// Acked when durable on the master in the local component.
    Async,
}

#[cfg(test)]
mod mailbox_key_order {
    use super::MailboxKey;
    use proptest::prelude::*;

    proptest! {
        /// The key's order and equality are its text's: (user, name), byte-wise.
        #[test]
        fn orders_as_the_text_does(
            a in "[a-c@.\\x00é]{0,12}", b in "[a-c@.\\x00é]{0,12}",
            c in "[A-C/\\x00]{0,10}", d in "[A-C/\\x00]{0,10}",
        ) {
            let (x, y) = (MailboxKey::new(&a, &c), MailboxKey::new(&b, &d));
            prop_assert_eq!(x.cmp(&y), (a.as_str(), c.as_str()).cmp(&(b.as_str(), d.as_str())));
            prop_assert_eq!(x == y, a == b && c == d);
            prop_assert_eq!(x.cmp(&x.clone()), std::cmp::Ordering::Equal);
        }
    }

    #[test]
    fn prefixes_and_long_names_order_as_text() {
        let names = [
            "",
            "a",
            "ab",
            "ab\0",
            "ab\0c",
            "abcdef",
            "abcdefg",
            "abcdefg\0",
            "abcdefgh",
            "abcdefgh\0",
            "abcdefgh1",
            "abcdefgi",
            "abcdefghabcdefgh",
            "abcdefghabcdefgg",
            "b",
        ];
        for x in names {
            for y in names {
                let (kx, ky) = (MailboxKey::new("u", x), MailboxKey::new("u", y));
                assert_eq!(kx.cmp(&ky), x.cmp(y), "{x:?} against {y:?}");
                assert_eq!(kx == ky, x == y, "{x:?} against {y:?}");
            }
        }
    }

    #[test]
    fn debug_shows_the_text_only() {
        assert_eq!(
            format!("{:?}", MailboxKey::new("alice", "INBOX")),
            r#"MailboxKey { user: "alice", name: "INBOX" }"#
        );
    }
}
