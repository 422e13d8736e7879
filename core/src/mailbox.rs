//! One mailbox's state and the merges that keep copies in agreement.
//!
//! Every change a master orders is a piece of mailbox state, so the copies form a
//! join-semilattice: messages keyed by (UID, GUID), tombstones that kill exactly one
//! binding, flags as per-flag last-writer-wins registers stamped by the master, and
//! UIDNEXT/HIGHESTMODSEQ as maxima. Applying a piece twice, late or out of order gives
//! the same state. The one thing a lattice join cannot do is decide a UID conflict (two
//! GUIDs on one UID): only the mailbox master renumbers (`merge_as_master`); any other
//! server refuses the conflicting piece and asks the master for a SYNC.

use crate::bugs::MergeRules;
use crate::hash::{fnv64, mix64};
use crate::store::StoredMailbox;
use crate::types::*;
use std::collections::{BTreeMap, BTreeSet};

/// What a merge did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MergeOutcome {
    /// Records added or changed here (to persist and, at a master, to replicate).
    pub records: Vec<MessageRecord>,
    /// UIDs whose live record went away (expunged or retired).
    pub removed: Vec<Uid>,
    /// Tombstones added here.
    pub tombstones: Vec<Tombstone>,
    /// UID conflicts renumbered (master only): how many messages got new UIDs.
    pub renumbered: usize,
    /// A non-master met a conflict it may not decide: it needs a SYNC with the master.
    pub unresolved: bool,
    /// A master met, in a log entry's piece of state, a record of a message a client
    /// expunged here at another binding: left out, to be decided by the sender's state
    /// (a SYNC), which shows whether the sender saw that expunge collected.
    pub needs_senders_state: bool,
    /// Whether UIDNEXT/HIGHESTMODSEQ/UIDVALIDITY moved.
    pub meta_changed: bool,
    /// A conflict was found through a tombstone (the seed's FIXME).
    pub tombstone_conflict: bool,
    /// The mailbox's created/deleted stamps moved.
    pub lifecycle_changed: bool,
    /// Retired UIDs were joined in (and the tombstones they cover dropped).
    pub retired_changed: bool,
    /// A replica took its master's UIDVALIDITY: every earlier tombstone and retired UID
    /// of the mailbox is dropped (its messages are in `removed`).
    pub new_validity: bool,
    /// The bindings whose tombstones the retired UIDs joined in dropped (collected).
    pub collected: Vec<(Uid, Guid)>,
}

impl MergeOutcome {
    /// Takes in one master merge of several that make one outcome (a change of
    /// incarnation: the winner's copy, then each other incarnation's).
    fn absorb_master_step(&mut self, step: MergeOutcome) {
        debug_assert!(!step.unresolved && !step.new_validity, "a master decides, in one incarnation");
        self.records.extend(step.records);
        self.removed.extend(step.removed);
        self.tombstones.extend(step.tombstones);
        self.collected.extend(step.collected);
        self.renumbered += step.renumbered;
        self.tombstone_conflict |= step.tombstone_conflict;
        self.lifecycle_changed |= step.lifecycle_changed;
        self.retired_changed |= step.retired_changed;
    }

    pub fn changed(&self) -> bool {
        !self.records.is_empty()
            || !self.removed.is_empty()
            || !self.tombstones.is_empty()
            || self.meta_changed
            || self.lifecycle_changed
            || self.retired_changed
            || self.new_validity
    }
}

pub fn new_mailbox(key: &MailboxKey) -> StoredMailbox {
    StoredMailbox {
        uidvalidity: key.initial_uidvalidity(),
        uidnext: 1,
        highest_modseq: 0,
        messages: crate::store::Messages::new(),
        tombstones: BTreeMap::new(),
        lifecycle: Lifecycle::default(),
        retired: Retired::default(),
    }
}

fn record_hash(r: &MessageRecord) -> u64 {
    let mut h = fnv64(&[&r.uid.to_le_bytes(), &r.guid.0.to_le_bytes(), &r.modseq.to_le_bytes()]);
    if r.claimed {
        // Only a claimed record digests apart from before claims were recorded.
        h = mix64(h ^ 0x0063_6c61_696d_6564);
    }
    if r.pushed {
        // Likewise a pushed one.
        h = mix64(h ^ 0x0070_7573_6865_6400);
    }
    for (flag, state) in &r.flags {
        h = mix64(
            h ^ fnv64(&[
                flag.as_str().as_bytes(),
                &[u8::from(state.present)],
                &state.stamp.modseq.to_le_bytes(),
                &state.stamp.sid.0.to_le_bytes(),
            ]),
        );
    }
    mix64(h)
}

fn tombstone_hash(t: &Tombstone) -> u64 {
    mix64(fnv64(&[
        b"T",
        &t.uid.to_le_bytes(),
        &t.guid.0.to_le_bytes(),
        &t.modseq.to_le_bytes(),
        // A census's loss, a cancel, a pushed binding's expunge and a deletion's digest
        // apart from a client's expunge; the byte is as before for every other tombstone.
        &[u8::from(t.expunged)
            + 2 * u8::from(t.lost)
            + 4 * u8::from(t.cancelled)
            + 8 * u8::from(t.pushed)
            + 16 * u8::from(t.deleted)],
    ]))
}

fn retired_hash(retired: &Retired) -> u64 {
    // A mailbox that never had tombstones collected digests as it always did.
    if retired.is_default() {
        return 0;
    }
    let ranges = retired
        .ranges
        .iter()
        .fold(0u64, |acc, (first, last)| mix64(acc ^ fnv64(&[b"R", &first.to_le_bytes(), &last.to_le_bytes()])));
    mix64(ranges ^ mix64(retired.collected ^ 0x7265_7469))
}

/// Order-independent hash of the live messages and the tombstones (and of the retired
/// UIDs, which stand for the tombstones collected).
pub fn digest(m: &StoredMailbox) -> u64 {
    let live = m.messages.values().fold(0u64, |acc, r| acc ^ record_hash(r));
    let dead = m.tombstones.values().fold(0u64, |acc, t| acc ^ tombstone_hash(t));
    combine_digest(live, dead, &m.lifecycle, retired_hash(&m.retired))
}

fn combine_digest(live: u64, dead: u64, lifecycle: &Lifecycle, retired: u64) -> u64 {
    // A mailbox never created or deleted by a client digests as it always did.
    let lifecycle = if lifecycle.is_default() {
        0
    } else {
        let life = mix64(lifecycle.created_at ^ mix64(lifecycle.deleted_at ^ 0x6c69_6665));
        // A mailbox nobody ever subscribed to digests as it always did.
        let subscription = if lifecycle.subscribed_at == 0 && lifecycle.unsubscribed_at == 0 {
            0
        } else {
            mix64(lifecycle.subscribed_at ^ mix64(lifecycle.unsubscribed_at ^ 0x7375_6273))
        };
        // Nor one no client gave a special use.
        let special_use = if lifecycle.special_use_at == 0 {
            0
        } else {
            mix64(lifecycle.special_use_at ^ mix64(u64::from(lifecycle.special_use.0) ^ 0x7573_6573))
        };
        life ^ subscription ^ special_use
    };
    live ^ mix64(dead) ^ lifecycle ^ retired
}

/// A mailbox's [`digest`] kept up to date record by record: the hash of every live
/// record and tombstone, and their XORs. A server feeds it the writes it makes to the
/// mailbox (its store holds exactly what those writes say), so a digest costs nothing
/// however large the mailbox.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DigestParts {
    live: BTreeMap<Uid, u64>,
    dead: BTreeMap<(Uid, Guid), u64>,
    live_xor: u64,
    dead_xor: u64,
    /// The hash of the retired UIDs: a `RetireUids` write drops these parts, so they are
    /// built again with it.
    retired: u64,
}

impl DigestParts {
    pub fn of(m: &StoredMailbox) -> DigestParts {
        let mut parts = DigestParts::default();
        for r in m.messages.values() {
            parts.put_record(r);
        }
        for t in m.tombstones.values() {
            parts.put_tombstone(t);
        }
        parts.retired = retired_hash(&m.retired);
        parts
    }

    pub fn put_record(&mut self, r: &MessageRecord) {
        let h = record_hash(r);
        if let Some(old) = self.live.insert(r.uid, h) {
            self.live_xor ^= old;
        }
        self.live_xor ^= h;
    }

    pub fn remove_record(&mut self, uid: Uid) {
        if let Some(old) = self.live.remove(&uid) {
            self.live_xor ^= old;
        }
    }

    pub fn put_tombstone(&mut self, t: &Tombstone) {
        let h = tombstone_hash(t);
        if let Some(old) = self.dead.insert((t.uid, t.guid), h) {
            self.dead_xor ^= old;
        }
        self.dead_xor ^= h;
    }

    /// Whether these parts can describe `m` (as many records and tombstones).
    pub fn fits(&self, m: &StoredMailbox) -> bool {
        self.live.len() == m.messages.len() && self.dead.len() == m.tombstones.len()
    }

    /// `digest(m)` for the mailbox these parts describe.
    pub fn digest(&self, m: &StoredMailbox) -> u64 {
        combine_digest(self.live_xor, self.dead_xor, &m.lifecycle, self.retired)
    }
}

pub fn summary(key: &MailboxKey, m: &StoredMailbox) -> Summary {
    summary_with_digest(key, m, digest(m))
}

/// [`summary`] with the mailbox's digest already known.
pub fn summary_with_digest(key: &MailboxKey, m: &StoredMailbox, digest: u64) -> Summary {
    debug_assert_eq!(digest, self::digest(m), "stale digest of {key}");
    Summary {
        mailbox: key.clone(),
        uidvalidity: m.uidvalidity,
        uidnext: m.uidnext,
        count: u32::try_from(m.messages.len()).unwrap_or(u32::MAX),
        highest_modseq: m.highest_modseq,
        digest,
    }
}

/// The summary of a partial replica's part of the mailbox: only the live messages
/// inside `partial`'s date window count (see [`crate::partial`]); tombstones,
/// retirements and the lifecycle count whole, as both sides hold them whole. Both sides
/// of a user replica's sync compute it alike, so equal summaries mean the replica holds
/// the window as the cluster does. O(messages), unlike the cached whole summary.
pub fn summary_within(key: &MailboxKey, m: &StoredMailbox, partial: &crate::partial::Partial) -> Summary {
    if partial.since_s == 0 {
        return summary(key, m);
    }
    let mut count = 0u32;
    let mut live = 0u64;
    for r in m.messages.values().filter(|r| partial.in_window(r)) {
        count = count.saturating_add(1);
        live ^= record_hash(r);
    }
    let dead = m.tombstones.values().fold(0u64, |acc, t| acc ^ tombstone_hash(t));
    Summary {
        mailbox: key.clone(),
        uidvalidity: m.uidvalidity,
        uidnext: m.uidnext,
        count,
        highest_modseq: m.highest_modseq,
        digest: combine_digest(live, dead, &m.lifecycle, retired_hash(&m.retired)),
    }
}

pub fn state(key: &MailboxKey, m: &StoredMailbox) -> MailboxState {
    state_since(key, m, None)
}

/// The mailbox's state with only the records and tombstones changed after `since`
/// (everything when None). A partial state merges like a log fragment: what it leaves
/// out is no information, not an expunge.
pub fn state_since(key: &MailboxKey, m: &StoredMailbox, since: Option<ModSeq>) -> MailboxState {
    let after = since.unwrap_or(0);
    let changed = |modseq: ModSeq| since.is_none() || modseq > after;
    MailboxState {
        mailbox: key.clone(),
        uidvalidity: m.uidvalidity,
        uidnext: m.uidnext,
        highest_modseq: m.highest_modseq,
        messages: m.messages.values().filter(|r| changed(r.modseq)).cloned().collect(),
        tombstones: m.tombstones.values().filter(|t| changed(t.modseq)).copied().collect(),
        lifecycle: m.lifecycle,
        // A collection is a change at its own modseq, so a delta carries it when it is newer.
        retired: if changed(m.retired.collected) { m.retired.clone() } else { Retired::default() },
    }
}

/// Per-flag last-writer-wins join (or, in the broken variant, the newer whole set).
fn join_flags_by(into: &mut Flags, from: &Flags, rules: &MergeRules) -> bool {
    if rules.whole_flag_sets {
        let newest = |m: &Flags| m.values().map(|s| s.stamp).max();
        if newest(from) > newest(into) && into != from {
            *into = from.clone();
            return true;
        }
        return false;
    }
    join_flags(into, from)
}

/// Per-flag last-writer-wins join. Returns whether `into` changed; a map that does not
/// change stays shared.
pub fn join_flags(into: &mut Flags, from: &Flags) -> bool {
    let mut changed = false;
    for (flag, theirs) in from {
        match into.get(flag) {
            Some(ours) if ours.stamp > theirs.stamp => {}
            Some(ours) if ours.stamp == theirs.stamp && ours.present == theirs.present => {}
            Some(ours) if ours.stamp == theirs.stamp => {
                // Same stamp, different value: only a hand-edited store can do this.
                // Removal wins so every server decides the same way.
                if ours.present {
                    let stamp = ours.stamp;
                    into.insert(flag.clone(), FlagState { present: false, stamp });
                    changed = true;
                }
            }
            _ => {
                into.insert(flag.clone(), *theirs);
                changed = true;
            }
        }
    }
    changed
}

/// Raises UIDNEXT and HIGHESTMODSEQ to at least these (never lowers them).
pub(crate) fn bump_meta(m: &mut StoredMailbox, uidnext: Uid, hms: ModSeq, out: &mut MergeOutcome) {
    if uidnext > m.uidnext {
        m.uidnext = uidnext;
        out.meta_changed = true;
    }
    if hms > m.highest_modseq {
        m.highest_modseq = hms;
        out.meta_changed = true;
    }
}

fn add_tombstone(m: &mut StoredMailbox, t: Tombstone, out: &mut MergeOutcome) {
    // Join: the highest modseq wins, so every copy ends with the same tombstone.
    match m.tombstones.entry((t.uid, t.guid)) {
        std::collections::btree_map::Entry::Vacant(e) => {
            e.insert(t);
            out.tombstones.push(t);
        }
        std::collections::btree_map::Entry::Occupied(mut e)
            if e.get().modseq < t.modseq
                || t.fate_rank() > e.get().fate_rank()
                || (t.pushed && !e.get().pushed && e.get().by_client()) =>
        {
            // The fate joins to the more final: a client's expunge over a census's loss
            // over a cancel over a retirement; a client's expunge of a pushed binding
            // stays one.
            let fate = if t.fate_rank() >= e.get().fate_rank() { t } else { *e.get() };
            let pushed = fate.by_client() && (t.pushed || e.get().pushed);
            let joined = Tombstone { modseq: e.get().modseq.max(t.modseq), pushed, ..fate };
            e.insert(joined);
            out.tombstones.push(joined);
        }
        std::collections::btree_map::Entry::Occupied(_) => {}
    }
    if m.messages.get(&t.uid).is_some_and(|r| r.guid == t.guid) {
        m.messages.remove(&t.uid);
        out.removed.push(t.uid);
    }
    let next = t.uid.saturating_add(1);
    if next > m.uidnext {
        m.uidnext = next;
        out.meta_changed = true;
    }
}

/// Applies foreign tombstones. Returns the live records they retired (not expunged):
/// their flag changes must follow the message to its new UID.
fn retire_bindings(
    m: &mut StoredMailbox,
    tombstones: &[Tombstone],
    out: &mut MergeOutcome,
) -> BTreeMap<Guid, MessageRecord> {
    let mut carried = BTreeMap::new();
    for t in tombstones {
        // A census's loss of a message a replica brought back moves it, like a retirement.
        if !t.by_client()
            && let Some(ours) = m.messages.get(&t.uid).filter(|r| r.guid == t.guid)
        {
            carried.insert(ours.guid, ours.clone());
        }
        add_tombstone(m, *t, out);
    }
    carried
}

/// Flag changes made on a binding that was retired meanwhile follow the message to the
/// UID it lives at now (never to an expunged one).
fn follow_guid(m: &mut StoredMailbox, r: &MessageRecord, rules: &MergeRules, out: &mut MergeOutcome) {
    // A binding a census lost whose message lives again (a replica's push brought it
    // back) passes its flag changes on, as a retired one does.
    let expunged = m.tombstones.get(&(r.uid, r.guid)).is_some_and(|t| t.by_client());
    if expunged {
        return;
    }
    let lowest = m.messages.uids_of(r.guid).next();
    if let Some(mut live) = lowest.and_then(|uid| m.messages.get_mut(&uid))
        && (join_flags_by(&mut live.flags, &r.flags, rules) | live.join_claim(r))
    {
        live.modseq = live.modseq.max(r.modseq);
        out.records.push(live.clone());
    }
}

/// An EXPUNGE removes the message, not one binding of it: where a renumbering moved
/// the message meanwhile, its new binding is expunged too. A census's loss reaches only
/// the bindings below its own: a message a replica brought back with its body is placed
/// above every UID the mailbox used, and lives on there. A cancel reaches only its own
/// binding: a claim moved the message a client was told is stored (`Tombstone::cancelled`).
fn expunge_everywhere(m: &mut StoredMailbox, tombstones: &[Tombstone], out: &mut MergeOutcome) {
    for t in tombstones.iter().filter(|t| t.of_message()) {
        let moved: Vec<Uid> =
            m.messages.uids_of(t.guid).filter(|uid| *uid != t.uid && (!t.lost || *uid < t.uid)).collect();
        for uid in moved {
            add_tombstone(m, Tombstone { uid, guid: t.guid, modseq: t.modseq, ..*t }, out);
        }
    }
}

/// Whether `m` may bind `uid` to `guid`: nothing else of its own on that UID, live,
/// tombstoned or retired.
fn can_bind(m: &StoredMailbox, uid: Uid, guid: Guid) -> bool {
    !m.retired.contains(uid)
        && m.messages.get(&uid).is_none_or(|ours| ours.guid == guid)
        && m.tombstones_at(uid).all(|t| t.guid == guid)
}

/// The messages a census gave up (see [`Tombstone::lost`]) that no client expunged and
/// that are not `live`: those a replica's push may bring back.
pub fn lost_messages<'a>(
    tombstones: impl Iterator<Item = &'a Tombstone>,
    live: impl Fn(Guid) -> bool,
) -> BTreeSet<Guid> {
    let (mut lost, mut by_client) = (BTreeSet::new(), BTreeSet::new());
    for t in tombstones {
        if t.lost {
            lost.insert(t.guid);
        } else if t.by_client() {
            by_client.insert(t.guid);
        }
    }
    lost.retain(|g| !by_client.contains(g) && !live(*g));
    lost
}

/// A message placed at a new UID keeps the flag changes its retired binding had here.
fn carry_flags(carried: &BTreeMap<Guid, MessageRecord>, r: &mut MessageRecord, rules: &MergeRules) {
    if let Some(old) = carried.get(&r.guid) {
        join_flags_by(&mut r.flags, &old.flags, rules);
        r.join_claim(old);
        r.modseq = r.modseq.max(old.modseq);
    }
}

/// The foreign tombstones a replica applies now. A retirement whose replacement binding
/// cannot be placed here is not applied yet: our binding stays live (with its flag
/// changes) until the master settles it, and `unresolved` is set.
fn replica_tombstones(
    m: &StoredMailbox,
    foreign: &MailboxState,
    rules: &MergeRules,
    out: &mut MergeOutcome,
) -> Vec<Tombstone> {
    let placeable = |r: &MessageRecord| !m.tombstones.contains_key(&(r.uid, r.guid)) && can_bind(m, r.uid, r.guid);
    let mut tombstones = Vec::new();
    for t in &foreign.tombstones {
        let ours = m.messages.get(&t.uid).filter(|r| r.guid == t.guid);
        // A cancel of a message claimed here is taken as a retirement: the master moves
        // the message (`keep_claimed`), and until its new binding is here ours stays.
        let retires = !t.expunged || (t.cancelled && ours.is_some_and(|r| r.claimed) && !rules.cancels_remove_claimed);
        let replacement = foreign.messages.iter().find(|r| r.guid == t.guid && r.uid != t.uid);
        if retires && ours.is_some() && !replacement.is_some_and(placeable) {
            out.unresolved = true;
            continue;
        }
        tombstones.push(*t);
    }
    tombstones
}

/// Joins their retired UIDs into ours: the tombstones they cover go, UIDNEXT rises above
/// them. Returns our live messages that now sit on a retired UID (none, normally: a copy
/// brought back from an old disk or placed by hand).
fn join_retired(m: &mut StoredMailbox, foreign: &MailboxState, out: &mut MergeOutcome) -> Vec<Uid> {
    if foreign.retired.is_default() {
        return Vec::new();
    }
    let (added, changed) = m.retire_collecting(&foreign.retired, &mut out.collected);
    if !changed {
        return Vec::new();
    }
    out.retired_changed = true;
    if let Some(last) = m.retired.last_uid()
        && last >= m.uidnext
    {
        m.uidnext = last.saturating_add(1);
        out.meta_changed = true;
    }
    added.iter().flat_map(|(first, last)| m.messages.uids_in(*first, *last)).collect()
}

/// Our live copies of bindings another server collected, which it names by a tombstone
/// our retired UIDs cover (`Server::tell_collected`; a store restored from a backup older
/// than the expunge): they go, and no tombstone stays (the retired UID stands for it).
/// Whoever tells it: a collection is every server's agreement that the binding is dead
/// (its message expunged, or live at the other binding, which the teller's check that
/// the message is live nowhere else in its copy rules out), so only a store that went
/// back before it can hold the binding live. New mail a forgetful store placed on a
/// retired UID is another binding (another GUID), and still moves to a new UID.
fn drop_collected_copies(m: &mut StoredMailbox, foreign: &MailboxState, out: &mut MergeOutcome) {
    if m.retired.is_default() {
        return;
    }
    for t in foreign.tombstones.iter().filter(|t| m.retired.covers(t)) {
        if m.messages.get(&t.uid).is_some_and(|ours| ours.guid == t.guid) {
            m.messages.remove(&t.uid);
            out.removed.push(t.uid);
        }
    }
}

/// Their state without the tombstones their own retired UIDs cover, when it is of
/// another incarnation than ours. Those name bindings the sender saw collected (a
/// collection's change, `Server::name_collected`), for a copy of the same incarnation to
/// drop its stale copies of them (`drop_collected_copies`); their UIDs mean nothing in
/// ours, and taken as a client's expunges they would expunge our live messages of those
/// GUIDs (or burn a UID each), where a collected expunge never reached another
/// incarnation before such names were sent.
fn without_names_of_another_incarnation<'a>(
    m: &StoredMailbox,
    foreign: &'a MailboxState,
) -> std::borrow::Cow<'a, MailboxState> {
    let named = |t: &Tombstone| foreign.retired.covers(t);
    if foreign.uidvalidity == m.uidvalidity || foreign.retired.is_default() || !foreign.tombstones.iter().any(named) {
        return std::borrow::Cow::Borrowed(foreign);
    }
    let mut kept = foreign.clone();
    kept.tombstones.retain(|t| !named(t));
    std::borrow::Cow::Owned(kept)
}

/// Their state without the tombstones our retired UIDs cover (already collected here).
fn without_collected<'a>(m: &StoredMailbox, foreign: &'a MailboxState) -> std::borrow::Cow<'a, MailboxState> {
    if m.retired.is_default() || !foreign.tombstones.iter().any(|t| m.retired.covers(t)) {
        return std::borrow::Cow::Borrowed(foreign);
    }
    let mut kept = foreign.clone();
    kept.tombstones.retain(|t| !m.retired.covers(t));
    std::borrow::Cow::Owned(kept)
}

/// Whether merging `state` into `m` can change nothing, as master or as replica: it is
/// `m` exactly (what a master hands over at a MASTER-MOVE to a peer in step with it,
/// or what an up-to-date peer sends), and `m` holds none of what a merge settles
/// whatever it is given: a message live twice or on a retired UID, a live message at a
/// tombstoned UID, a live GUID that a tombstone expunged. The merge of such a state
/// joins every part with itself.
pub fn holds_exactly(m: &StoredMailbox, state: &MailboxState) -> bool {
    state.uidvalidity == m.uidvalidity
        && state.uidnext == m.uidnext
        && state.highest_modseq == m.highest_modseq
        && state.lifecycle == m.lifecycle
        && state.messages.len() == m.messages.len()
        && state.tombstones.len() == m.tombstones.len()
        && state.retired == m.retired
        && state.messages.iter().eq(m.messages.values())
        && state.tombstones.iter().eq(m.tombstones.values())
        && m.messages.duplicated().is_empty()
        && !m
            .tombstones
            .values()
            .any(|t| m.messages.contains_key(&t.uid) || (t.of_message() && m.messages.has_guid(t.guid)))
        && live_on_retired(m).is_empty()
}

/// Our live messages on retired UIDs, by walking the retired ranges.
pub fn live_on_retired(m: &StoredMailbox) -> Vec<Uid> {
    m.retired.ranges.iter().flat_map(|(first, last)| m.messages.uids_in(*first, *last)).collect()
}

/// Whether a replica may drop its copy for its master's, which has another UIDVALIDITY
/// (two incarnations of one name, made by a RENAME onto a name whose history one side
/// lacked): only when every message live here is in the master's, live (with every
/// change we made to it) or expunged, and every expunge made here is there, so nothing
/// is lost by it.
fn adoptable(m: &StoredMailbox, master: &MailboxState, rules: &MergeRules) -> bool {
    let theirs = guids_named(master);
    let their_live: BTreeMap<Guid, &MessageRecord> = master.messages.iter().map(|r| (r.guid, r)).collect();
    m.messages
        .values()
        .all(|r| theirs.contains(&r.guid) && their_live.get(&r.guid).is_none_or(|t| !lacks_changes_of(t, r, rules)))
        && !expunges_the_master_lacks(m, master)
}

/// Whether the master's record `theirs` of a message lacks a change our record `ours`
/// holds: a flag change (a STORE made on our incarnation's copy, focus minority seed
/// 192920: dropped with our copy when it took the master's) or a claim. The master's
/// merge of our copy joins them into its record (`MasterMerge::place`), and then its
/// record holds them.
fn lacks_changes_of(theirs: &MessageRecord, ours: &MessageRecord, rules: &MergeRules) -> bool {
    let mut joined = theirs.clone();
    join_flags_by(&mut joined.flags, &ours.flags, rules) | joined.join_claim(ours)
}

/// Whether our copy expunged a message (a client's expunge, or a census's loss) that the
/// master's copy does not show expunged: dropping our copy would drop that expunge, and
/// the message would come back with the master's copy (focus minority seed 26431: a
/// server cut off alone expunged a message renamed in on its side, which the other side
/// had merged into its own incarnation of the name meanwhile; at the heal the lone
/// server's copy, holding no live message, took the other incarnation and its tombstone
/// went with its own). Absent is not enough: a log piece of the master names only what
/// it changed. The master takes our copy's expunges into its incarnation
/// (`take_other_incarnation_expunges`), and then its copy names them expunged; what it
/// leaves out there, this leaves out here: expunges its collected UIDs cover, and those
/// the deletion of a copy deleted and empty made (`Tombstone::deleted`).
fn expunges_the_master_lacks(m: &StoredMailbox, master: &MailboxState) -> bool {
    let gone = m.lifecycle.deleted() && m.messages.is_empty();
    let expunged_there: BTreeSet<Guid> = master.tombstones.iter().filter(|t| t.of_message()).map(|t| t.guid).collect();
    // Already expunged there, or what the master leaves out of its incarnation.
    let left_out = |t: &Tombstone| (gone && t.deleted) || expunged_there.contains(&t.guid) || master.retired.covers(t);
    m.tombstones.values().any(|t| t.of_message() && !left_out(t))
}

/// Every GUID a state names, live or expunged.
fn guids_named(state: &MailboxState) -> BTreeSet<Guid> {
    state.messages.iter().map(|r| r.guid).chain(state.tombstones.iter().map(|t| t.guid)).collect()
}

/// The replica's copy empties and takes the master's UIDVALIDITY, UIDNEXT and
/// HIGHESTMODSEQ; the merge then brings the master's messages in.
fn adopt_validity(m: &mut StoredMailbox, master: &MailboxState, out: &mut MergeOutcome) {
    out.removed.extend(m.messages.keys().copied());
    m.messages = crate::store::Messages::new();
    m.tombstones.clear();
    m.retired = Default::default();
    m.uidvalidity = master.uidvalidity;
    m.uidnext = 1;
    m.highest_modseq = 0;
    out.new_validity = true;
    out.meta_changed = true;
}

/// Joins `foreign` into `m` at a server that is not the master. A record that would put
/// a second GUID on a UID this server holds (live or as a tombstone) is refused and
/// `unresolved` set: binding that UID would show a client two messages under one UID.
pub fn merge_as_replica(m: &mut StoredMailbox, foreign: &MailboxState, rules: &MergeRules) -> MergeOutcome {
    let foreign = &*without_names_of_another_incarnation(m, foreign);
    let mut out = MergeOutcome::default();
    if foreign.uidvalidity != m.uidvalidity {
        let wins = incarnation_wins((foreign.uidvalidity, foreign.uidnext), (m.uidvalidity, m.uidnext))
            || rules.laptop_leaves_incarnation;
        if !(rules.from_master && wins && adoptable(m, foreign, rules)) {
            // Ours goes to the master (by SYNC, or a user replica's next push, sent
            // whole): a master of a lesser incarnation takes ours and gives its messages
            // new UIDs in it, one of a greater gives ours new UIDs in its own; then this
            // copy can take that one.
            out.unresolved = true;
            return out;
        }
        adopt_validity(m, foreign, &mut out);
    }
    out.lifecycle_changed = m.lifecycle.join(&foreign.lifecycle);
    if !rules.ignore_tombstones {
        let on_retired = join_retired(m, foreign, &mut out);
        drop_collected_copies(m, foreign, &mut out);
        if on_retired.iter().any(|uid| m.messages.get(uid).is_some()) {
            // A message of ours on a UID whose tombstones were collected elsewhere: only
            // the master may move it (it is kept, never dropped).
            out.unresolved = true;
        }
    }
    let foreign = &*without_collected(m, foreign);
    let tombstones = replica_tombstones(m, foreign, rules, &mut out);
    let carried = retire_bindings(m, &tombstones, &mut out);
    expunge_everywhere(m, &tombstones, &mut out);
    if !rules.ignore_tombstones
        && foreign.tombstones.iter().any(|t| m.messages.get(&t.uid).is_some_and(|ours| ours.guid != t.guid))
    {
        // A live message of ours sits on a UID another message was retired from or
        // expunged from elsewhere: only the master may move ours.
        out.unresolved = true;
    }
    for r in &foreign.messages {
        if let Some(t) = m.tombstones.get(&(r.uid, r.guid)) {
            if r.claimed && t.cancelled && !m.messages.has_guid(r.guid) && !rules.cancels_remove_claimed {
                // Their claimed message, cancelled here: our cancel goes to the master,
                // which keeps the message at a new UID.
                out.unresolved = true;
                continue;
            }
            follow_guid(m, r, rules, &mut out);
            continue;
        }
        if !rules.ignore_tombstones && m.retired.contains(r.uid) {
            // A copy of a binding collected here (or of a message placed on a retired
            // UID by a disk that forgot it): the master moves it.
            out.unresolved = true;
            continue;
        }
        match m.messages.get(&r.uid).map(|ours| ours.guid) {
            Some(guid) if guid == r.guid => {
                if let Some(mut ours) = m.messages.get_mut(&r.uid) {
                    let mut changed = join_flags_by(&mut ours.flags, &r.flags, rules) | ours.join_claim(r);
                    if r.modseq > ours.modseq {
                        ours.modseq = r.modseq;
                        changed = true;
                    }
                    if changed {
                        out.records.push(ours.clone());
                    }
                }
            }
            Some(_) if rules.replica_overwrites => {
                m.messages.insert(r.uid, r.clone());
                out.records.push(r.clone());
            }
            Some(_) => out.unresolved = true,
            None => {
                let retired = !rules.ignore_tombstones && m.tombstones_at(r.uid).next().is_some();
                let elsewhere = m.messages.has_guid(r.guid);
                if retired || elsewhere {
                    // A second UID for one message, or a UID used by another: the master
                    // decides which binding lives.
                    out.unresolved = true;
                } else {
                    let mut r = r.clone();
                    carry_flags(&carried, &mut r, rules);
                    m.messages.insert(r.uid, r.clone());
                    out.records.push(r.clone());
                    let next = r.uid.saturating_add(1);
                    if next > m.uidnext {
                        m.uidnext = next;
                        out.meta_changed = true;
                    }
                }
            }
        }
        if r.modseq > m.highest_modseq {
            m.highest_modseq = r.modseq;
            out.meta_changed = true;
        }
    }
    bump_meta(m, foreign.uidnext, foreign.highest_modseq, &mut out);
    out
}

/// Joins `foreign` into `m` at the mailbox master, deciding every conflict: both sides
/// of a UID conflict (two GUIDs on one UID, or a live GUID on a UID another GUID was
/// expunged from) get new UIDs above every UID either side used, in (old UID, GUID)
/// order, and the old UID is retired with a tombstone per GUID. The merge is one change
/// at one new modseq.
pub fn merge_as_master(m: &mut StoredMailbox, foreign: &MailboxState, rules: &MergeRules) -> MergeOutcome {
    let foreign = &*without_names_of_another_incarnation(m, foreign);
    if !rules.laptop_leaves_incarnation
        && let Some(validity) = new_incarnation_for(m, foreign)
    {
        return merge_into_a_new_incarnation(m, foreign, validity, rules);
    }
    if incarnation_wins((foreign.uidvalidity, foreign.uidnext), (m.uidvalidity, m.uidnext))
        && !rules.laptop_leaves_incarnation
    {
        return merge_into_their_incarnation(m, foreign, rules);
    }
    let same_validity = foreign.uidvalidity == m.uidvalidity;
    let mut merge = MasterMerge {
        modseq: m.highest_modseq.max(foreign.highest_modseq).saturating_add(1),
        ours_dead: dead_here(m, rules),
        ours_lost: lost_here(m, rules),
        ours_live: BTreeMap::new(),
        m,
        foreign,
        rules,
        same_validity,
        movers: BTreeMap::new(),
        carried: BTreeMap::new(),
        claimed_cancelled: Vec::new(),
        out: MergeOutcome::default(),
    };
    if same_validity {
        merge.out.lifecycle_changed = merge.m.lifecycle.join(&foreign.lifecycle);
        join_retired(merge.m, foreign, &mut merge.out);
        // A copy of ours that their collection names is no message to move to a new UID
        // (a master's store restored from a backup older than the expunge).
        drop_collected_copies(merge.m, foreign, &mut merge.out);
        if merge.out.retired_changed {
            // Tombstones their copy collected are collected here now: the messages they
            // expunged are dead no more. Once every server has seen an expunge, a COPY
            // may bring the message back into the mailbox at a new UID (`master_save`
            // refuses it only while the tombstone is there), and that copy is not the
            // expunged message (explore seed 144021: a server cut off before the
            // collection, master on its side, merged the copy's mailbox at the heal and
            // retired the copy's binding while every other server kept it).
            merge.ours_dead = dead_here(merge.m, rules);
            merge.ours_lost = lost_here(merge.m, rules);
        }
        let uncollected = without_collected(merge.m, foreign);
        merge.take_tombstones(&uncollected.tombstones);
        expunge_everywhere(merge.m, &uncollected.tombstones, &mut merge.out);
        merge.keep_claimed();
    } else {
        merge.take_other_incarnation_expunges();
    }
    // Where each of their messages is live here (its latest binding) once their
    // tombstones are in, as before any record is placed: an index lookup per record, not
    // a mailbox scan.
    merge.ours_live =
        foreign.messages.iter().filter_map(|r| merge.m.messages.last_uid_of(r.guid).map(|uid| (r.guid, uid))).collect();
    for r in &foreign.messages {
        merge.place(r);
    }
    bump_meta(merge.m, foreign.uidnext, foreign.highest_modseq, &mut merge.out);
    merge.retire_duplicates();
    merge.move_off_retired_uids();
    merge.renumber_movers();
    merge.finish()
}

/// Messages a client expunged here (or on a copy merged here before), and those a census
/// gave up, unless a replica's push brings them back: a master's merge keeps them dead at
/// whatever binding their copy shows them.
fn dead_here(m: &StoredMailbox, rules: &MergeRules) -> BTreeSet<Guid> {
    m.tombstones.values().filter(|t| t.by_client() || (t.lost && !rules.revive_lost)).map(|t| t.guid).collect()
}

/// Messages a census gave up here that a replica's push may bring back (whether one is
/// live is asked as each record is placed: `MasterMerge::revived`).
fn lost_here(m: &StoredMailbox, rules: &MergeRules) -> BTreeSet<Guid> {
    if rules.revive_lost { lost_messages(m.tombstones.values(), |_| false) } else { BTreeSet::new() }
}

/// Which of two incarnations of one name, each as (UIDVALIDITY, UIDNEXT), wins where
/// they meet: one that gave out a UID over one that never did (nothing was shown under
/// it: an IMPORT gives a mailbox created a moment before its source's UIDVALIDITY),
/// else the greater UIDVALIDITY. Every server applies the same rule, as master and as
/// replica, so a server only ever leaves an incarnation for one that wins over it, and
/// no branch of an incarnation that a server left with UIDs shown is taken up again:
/// those bindings, which its clients saw, are known to no copy that might bind the UIDs
/// to other messages later (explore seed 1322614: a replica left its branch of an
/// IMPORT's UIDVALIDITY for the name's own, and at the heal the other branch's master
/// kept its own, binding a UID the replica had shown as another message). A user
/// replica is no exception: its push moves the cluster's master to its incarnation if
/// that wins, and its adopt never leaves one for a losing one (explore seed 661150: a
/// laptop's own INBOX and one made on the far side of a cut shared the name's
/// UIDVALIDITY and each gave out UID 1; the laptop left its INBOX for an IMPORT's lesser
/// one, forgetting its UID 1, and took the name's back at the heal with the other
/// message on it).
pub fn incarnation_wins((theirs, their_next): (u32, Uid), (ours, our_next): (u32, Uid)) -> bool {
    if theirs == ours || theirs == 0 || ours == 0 {
        return false;
    }
    (their_next > 1, theirs) > (our_next > 1, ours)
}

/// A UIDVALIDITY greater than `old`, drawn from `modseq`, in 1..2^31: the one a RENAME
/// gives a name with history (`old` its UIDVALIDITY before), and the one a master's
/// merge makes when two incarnations meet that neither can take whole
/// ([`merge_into_a_new_incarnation`]).
pub fn greater_validity(old: u32, modseq: ModSeq) -> u32 {
    let mixed = crate::hash::mix64(u64::from(old) ^ modseq.rotate_left(32)) as u32;
    // Above the old one, so that the new incarnation wins wherever a copy of the old one
    // is met (`mailbox::incarnation_wins`), as RFC 3501 asks of a new UIDVALIDITY; a
    // step drawn from the name's history so that two such RENAMEs rarely pick one value.
    // At the top of the range (no UIDVALIDITY the hash of a name gives comes near) a
    // value is drawn as before.
    const TOP: u32 = 0x7fff_ffff;
    let v = match old.checked_add(1 + (mixed & 0xffff)) {
        Some(v) if v <= TOP => v,
        _ => {
            let mut v = mixed & TOP;
            while v == 0 || v == old {
                v = v.wrapping_add(1) & TOP;
            }
            v
        }
    };
    debug_assert!(v != old && v != 0);
    v
}

/// The UIDVALIDITY of a new incarnation for a master's merge of another incarnation
/// that the winning one cannot take whole: the winner deleted and empty, and a message
/// live in the other that the winner's deletion tombstoned (a RENAME away, or a DELETE,
/// of the winner's copy of the name). Taken into the winner, the message would be
/// dropped for that tombstone (a message is one GUID in a mailbox, and an expunge there
/// is final); the winner left for the other, a server would go back to a lesser
/// incarnation, whose UIDs it may have shown bound to other messages. A third, greater
/// than both, takes each as another incarnation: the deleted one gives its clients'
/// expunges and not its deletion's, the live one its messages (focus incarnation seed
/// 534855: crossed RENAMEs moved one message into both names on the two sides of a
/// partition; at the heal each name's deleted incarnation won over the live one, and the
/// message was in no mailbox). Either side may be the deleted winner: ours (focus
/// incarnation seed 534855), or theirs (seed 6343: decided here up front, where it had
/// been found only inside the merge into their incarnation, one merge nested in
/// another). None where no value greater than both is left.
fn new_incarnation_for(m: &StoredMailbox, foreign: &MailboxState) -> Option<u32> {
    if foreign.uidvalidity == m.uidvalidity {
        return None;
    }
    // Whether a deleted, empty copy's deletion tombstoned a message live in the other.
    fn deletion_took<'a>(
        deleted_and_empty: bool,
        tombstones: impl Iterator<Item = &'a Tombstone>,
        mut live: impl Iterator<Item = &'a MessageRecord>,
    ) -> bool {
        if !deleted_and_empty {
            return false;
        }
        let deleted: BTreeSet<Guid> = tombstones.filter(|t| t.deleted).map(|t| t.guid).collect();
        live.any(|r| deleted.contains(&r.guid))
    }
    let needed = if incarnation_wins((foreign.uidvalidity, foreign.uidnext), (m.uidvalidity, m.uidnext)) {
        let gone = foreign.lifecycle.deleted() && foreign.messages.is_empty();
        deletion_took(gone, foreign.tombstones.iter(), m.messages.values())
    } else {
        let gone = m.lifecycle.deleted() && m.messages.is_empty();
        deletion_took(gone, m.tombstones.values(), foreign.messages.iter())
    };
    if !needed {
        return None;
    }
    let modseq = m.highest_modseq.max(foreign.highest_modseq).saturating_add(1);
    let validity = greater_validity(m.uidvalidity.max(foreign.uidvalidity), modseq);
    (validity > m.uidvalidity && validity > foreign.uidvalidity).then_some(validity)
}

/// A master's merge into a new incarnation ([`new_incarnation_for`]): its copy empties
/// and takes `validity`, with UIDs above every UID either incarnation used, and then its
/// own copy and theirs are merged in as other incarnations, each of which it wins over.
/// One outcome, written as a replica's change of UIDVALIDITY is (`new_validity`).
fn merge_into_a_new_incarnation(
    m: &mut StoredMailbox,
    foreign: &MailboxState,
    validity: u32,
    rules: &MergeRules,
) -> MergeOutcome {
    let ours = state(&foreign.mailbox, m);
    let fresh = MailboxState {
        mailbox: foreign.mailbox.clone(),
        uidvalidity: validity,
        uidnext: m.uidnext.max(foreign.uidnext),
        highest_modseq: m.highest_modseq.max(foreign.highest_modseq),
        messages: Vec::new(),
        tombstones: Vec::new(),
        lifecycle: foreign.lifecycle,
        retired: Default::default(),
    };
    let mut out = MergeOutcome::default();
    adopt_validity(m, &fresh, &mut out);
    for step in
        [merge_as_master(m, &fresh, rules), merge_as_master(m, &ours, rules), merge_as_master(m, foreign, rules)]
    {
        out.absorb_master_step(step);
    }
    debug_assert_eq!(m.uidvalidity, validity);
    debug_assert!(
        foreign.messages.iter().all(|r| m.messages.has_guid(r.guid) || m.tombstones.values().any(|t| t.guid == r.guid)),
        "every message of theirs is placed or expunged"
    );
    out
}

/// A master's merge of a copy of a greater incarnation ([`incarnation_wins`]): its copy
/// empties and takes theirs, and then its own copy is merged in as another
/// incarnation's (its messages at new UIDs, its expunges taken). One outcome, written
/// as a replica's change of UIDVALIDITY is (`new_validity`).
fn merge_into_their_incarnation(m: &mut StoredMailbox, foreign: &MailboxState, rules: &MergeRules) -> MergeOutcome {
    debug_assert!(incarnation_wins((foreign.uidvalidity, foreign.uidnext), (m.uidvalidity, m.uidnext)));
    let ours = state(&foreign.mailbox, m);
    let mut out = MergeOutcome::default();
    adopt_validity(m, foreign, &mut out);
    for step in [merge_as_master(m, foreign, rules), merge_as_master(m, &ours, rules)] {
        out.absorb_master_step(step);
    }
    debug_assert_eq!(m.uidvalidity, foreign.uidvalidity);
    debug_assert!(
        ours.messages.iter().all(|r| m.messages.has_guid(r.guid) || m.tombstones.values().any(|t| t.guid == r.guid)),
        "every message of ours is placed or expunged"
    );
    out
}

/// One master merge in progress (see [`merge_as_master`]).
struct MasterMerge<'a> {
    m: &'a mut StoredMailbox,
    foreign: &'a MailboxState,
    rules: &'a MergeRules,
    same_validity: bool,
    /// The merge's one new modseq.
    modseq: ModSeq,
    ours_dead: BTreeSet<Guid>,
    /// Messages a census gave up here that no client expunged ([`lost_messages`]; filled
    /// only for a replica's push).
    ours_lost: BTreeSet<Guid>,
    ours_live: BTreeMap<Guid, Uid>,
    /// Messages that must move to a new UID, by (old uid, guid).
    movers: BTreeMap<(Uid, Guid), MessageRecord>,
    /// Our records of bindings their tombstones retire: the flag changes follow.
    carried: BTreeMap<Guid, MessageRecord>,
    /// Our claimed records their cancels removed: they move (`keep_claimed`).
    claimed_cancelled: Vec<MessageRecord>,
    out: MergeOutcome,
}

impl MasterMerge<'_> {
    /// Their tombstones join ours; a live message of ours on a UID they retired for
    /// another message must move.
    fn take_tombstones(&mut self, tombstones: &[Tombstone]) {
        for t in tombstones {
            if self.retires_to_nowhere(t, tombstones) {
                continue;
            }
            if !t.by_client()
                && let Some(ours) = self.m.messages.get(&t.uid).filter(|r| r.guid == t.guid)
            {
                self.carried.insert(ours.guid, ours.clone());
                if t.cancelled && ours.claimed && !self.rules.cancels_remove_claimed {
                    self.claimed_cancelled.push(ours.clone());
                }
            }
            if self.m.tombstones.contains_key(&(t.uid, t.guid)) {
                add_tombstone(self.m, *t, &mut self.out);
                continue;
            }
            if let Some(ours) = self.m.messages.get(&t.uid)
                && ours.guid != t.guid
                && !self.rules.ignore_tombstones
            {
                // The seed's FIXME: the other side expunged another message from this
                // UID. Ours must move too.
                self.out.tombstone_conflict = true;
                self.movers.insert((ours.uid, ours.guid), ours.clone());
            }
            add_tombstone(self.m, *t, &mut self.out);
        }
    }

    /// Whether their retirement `t` would take our live binding of a message that neither
    /// copy holds live at a later binding, and that no tombstone here or theirs expunges:
    /// the later binding has not reached their copy yet (a replica took the retirement
    /// from its log before the renumbered record), and taken here the retirement would
    /// leave the message in no place this merge knows, its flag changes carried to no
    /// record (general seed 2152499: a master dropped its binding with an acknowledged
    /// STORE's flag on a replica's SYNC request, and the message came back later without
    /// it). Such a retirement is left out: our binding stays live, and when the later
    /// binding arrives, `join_live` retires ours into it with its flags.
    fn retires_to_nowhere(&self, t: &Tombstone, theirs: &[Tombstone]) -> bool {
        if t.expunged || self.rules.ignore_tombstones {
            return false;
        }
        if self.m.messages.get(&t.uid).is_none_or(|r| r.guid != t.guid) {
            return false;
        }
        let expunged = |x: &Tombstone| x.guid == t.guid && x.expunged;
        // A renumbering only ever moves a message up: a binding of theirs below the
        // retired one is an older one (retired here), not where the message went.
        let later = |r: &MessageRecord| r.guid == t.guid && r.uid > t.uid;
        !self.foreign.messages.iter().any(later)
            && !self.m.messages.uids_of(t.guid).any(|uid| uid > t.uid)
            && !theirs.iter().any(expunged)
            && !self.m.tombstones.values().any(expunged)
    }

    /// A claimed message of ours that a cancel of theirs removed from its binding lives on
    /// above every UID used: a client was told it is stored (`MessageRecord::claimed`;
    /// explore seeds 778520, 770826). Unless a client expunged it meanwhile.
    fn keep_claimed(&mut self) {
        for r in std::mem::take(&mut self.claimed_cancelled) {
            if !self.m.messages.has_guid(r.guid) && !self.expunged_here(r.guid) {
                self.movers.insert((r.uid, r.guid), r);
            }
        }
    }

    /// Whether a tombstone here removes `guid` wherever it lives (a client's expunge, a
    /// census's loss): a scan, asked only for a claimed message a cancel met.
    fn expunged_here(&self, guid: Guid) -> bool {
        self.m.tombstones.values().any(|t| t.guid == guid && t.of_message())
    }

    /// Their copy is another incarnation of this mailbox (another UIDVALIDITY): its UIDs
    /// mean nothing here, but its expunges do. A message is one GUID in a mailbox, so an
    /// expunge there kills the message here, at whatever UID it came in under (a record
    /// of theirs merged earlier moved in at a new UID). One we have not seen yet gets an
    /// expunged tombstone at a fresh UID, so that no later copy of their incarnation (a
    /// replica's full state, a log entry) brings it in: the tombstone is what makes a
    /// replica of theirs adoptable without the message.
    fn take_other_incarnation_expunges(&mut self) {
        debug_assert!(!self.same_validity);
        let (modseq, foreign) = (self.modseq, self.foreign);
        // Their incarnation is deleted: the expunges its deletion made were of a mailbox
        // its user then deleted or renamed away (a RENAME deletes its source, the
        // messages going on to the target), not of the messages this incarnation holds
        // (focus rename seed 46772: both sides of a partition renamed a mailbox onto the
        // other's name, and each side's deleted source took the message the other
        // renamed in). An expunge a client made stands, before the deletion or joined
        // into its tombstone (focus incarnation seeds 142539, 108924: a message expunged
        // from a name renamed away on one side came back from another copy of the same
        // incarnation).
        let gone = foreign.lifecycle.deleted() && foreign.messages.is_empty();
        for t in foreign.tombstones.iter().filter(|t| t.of_message() && !(gone && t.deleted)) {
            // An expunge our retired UIDs cover is one every server had seen when it was
            // collected here, from the name's shared history: this incarnation began
            // knowing it (a RENAME into a name with history starts above its UIDs), so a
            // message live here now came back after it, by a RENAME or a COPY, and stays
            // (focus rename seed 109115: a server down during the collection brought the
            // old incarnation's tombstone back, and it took the message renamed in since).
            if self.ours_dead.contains(&t.guid) || self.m.retired.covers(t) {
                continue;
            }
            let live: Vec<Uid> = self.m.messages.uids_of(t.guid).collect();
            if live.is_empty() {
                let uid = self.m.uidnext;
                add_tombstone(self.m, Tombstone { uid, guid: t.guid, modseq, ..*t }, &mut self.out);
                debug_assert!(self.m.uidnext > uid, "a tombstone at UIDNEXT raises UIDNEXT");
            }
            for uid in live {
                add_tombstone(self.m, Tombstone { uid, guid: t.guid, modseq, ..*t }, &mut self.out);
            }
            debug_assert!(!self.m.messages.has_guid(t.guid), "a message expunged in the other incarnation is live");
            self.ours_dead.insert(t.guid);
        }
    }

    /// One of their records: joined with ours, placed at its UID, or marked to move.
    fn place(&mut self, r: &MessageRecord) {
        if !self.same_validity {
            // Their UIDs mean nothing here: every message of theirs we lack is new. One we
            // have is the same message (one GUID in a mailbox): its flag changes join
            // ours, wherever it lives here (explore seed 112832: a STORE made on the other
            // incarnation's copy was dropped at the heal).
            if let Some(&our_uid) = self.ours_live.get(&r.guid) {
                self.join_flag_changes(our_uid, r);
            } else if !self.ours_dead.contains(&r.guid) {
                self.movers.insert((r.uid, r.guid), r.clone());
            }
            return;
        }
        if self.m.tombstones.contains_key(&(r.uid, r.guid)) {
            if self.revived(r.guid) {
                // A census gave it up while this replica held it: it comes back, above
                // every UID used (the lost binding stays dead).
                self.movers.insert((r.uid, r.guid), r.clone());
                return;
            }
            if r.claimed
                && !self.rules.cancels_remove_claimed
                && self.m.tombstones.get(&(r.uid, r.guid)).is_some_and(|t| t.cancelled)
                && !self.m.messages.has_guid(r.guid)
                && !self.expunged_here(r.guid)
            {
                // A cancel decided here before a claim elsewhere: the message a client
                // was told is stored comes back above every UID used.
                self.movers.insert((r.uid, r.guid), r.clone());
                return;
            }
            if self.cancelled_here(r.guid) {
                // Their binding was retired here and the message then cancelled at its
                // later binding: theirs is dead too, and says so. A retirement would
                // tell their copy the message lives on elsewhere, and it would keep
                // its binding while this master kept the retirement, each SYNC changing
                // nothing (explore seed 770826, once a cancel removed only its binding).
                let t = Tombstone::cancel(r.uid, r.guid, self.modseq);
                add_tombstone(self.m, t, &mut self.out);
            }
            follow_guid(self.m, r, self.rules, &mut self.out);
            return;
        }
        let mut r = r.clone();
        carry_flags(&self.carried, &mut r, self.rules);
        if let Some(&our_uid) = self.ours_live.get(&r.guid)
            && self.join_live(&mut r, our_uid)
        {
            return;
        }
        if self.ours_dead.contains(&r.guid) {
            let by_client = self.m.tombstones.values().any(|t| t.guid == r.guid && t.by_client());
            if by_client && self.rules.from_log && !self.rules.log_copy_loses {
                // A log entry cannot tell a stale binding of the expunged message from
                // the message brought back by a COPY or MOVE made once its sender had
                // seen the expunge collected and forgotten when (a restart, or past the
                // ten minutes in which `recently_collected` derives a COPY back's GUID):
                // the sender's state can, by its
                // retired UIDs (`join_retired` above). Taking the expunge here lost a
                // moved message at a heal.
                self.out.needs_senders_state = true;
                return;
            }
            // Expunged here under another UID: the expunge wins, and a client's expunge
            // takes their binding as it took ours (an EXPUNGE removes the message, not
            // one binding: `expunge_everywhere`). A retirement would say the message
            // lives on at another UID, and a replica holding that binding live kept it
            // while this master held the retirement, each SYNC changing nothing (explore
            // seed 772280: a COPY made after the expunge's tombstone was collected on
            // one side of a partition, the tombstone still there on the other).
            let fate = if by_client { Tombstone::expunge } else { Tombstone::retirement };
            let t = fate(r.uid, r.guid, self.modseq);
            add_tombstone(self.m, t, &mut self.out);
            return;
        }
        self.place_at_uid(r);
    }

    /// Whether `guid` lives nowhere here and was cancelled at one of its bindings (a
    /// scan of the tombstones: asked only for a binding retired here).
    fn cancelled_here(&self, guid: Guid) -> bool {
        !self.m.messages.has_guid(guid) && self.m.tombstones.values().any(|t| t.guid == guid && t.cancelled)
    }

    /// Whether their record of `guid` brings back a message a census gave up here (see
    /// [`MergeRules::revive_lost`]), not placed again by this merge yet.
    fn revived(&self, guid: Guid) -> bool {
        self.ours_lost.contains(&guid) && !self.m.messages.has_guid(guid)
    }

    /// Their record of a message live here at `our_uid`. True when that settles it;
    /// false when theirs is the later binding (ours retired) and must still be placed.
    fn join_live(&mut self, r: &mut MessageRecord, our_uid: Uid) -> bool {
        let (rules, modseq) = (self.rules, self.modseq);
        if r.uid > our_uid {
            // Same message under a higher UID there: renumbering only ever moves a
            // message up, so theirs is the later binding. Ours retires, and theirs is
            // placed like any record (it may meet a conflict on its UID).
            if let Some(ours) = self.m.messages.remove(&our_uid) {
                add_tombstone(self.m, Tombstone::retirement(our_uid, r.guid, modseq), &mut self.out);
                self.out.removed.push(our_uid);
                join_flags_by(&mut r.flags, &ours.flags, rules);
                r.join_claim(&ours);
                r.modseq = r.modseq.max(ours.modseq);
            }
            return false;
        }
        if our_uid != r.uid {
            // Same message here under a higher UID: retire their binding, keep ours,
            // take their flag changes.
            add_tombstone(self.m, Tombstone::retirement(r.uid, r.guid, modseq), &mut self.out);
        }
        if !self.join_flag_changes(our_uid, r)
            && let Some(mut ours) = self.m.messages.get_mut(&our_uid)
            && r.modseq > ours.modseq
        {
            // A copy saw a later change of this message (from an earlier master):
            // adopt its modseq rather than make a new one, so two servers that both
            // think they master the mailbox do not outbid each other forever.
            ours.modseq = r.modseq;
            self.out.records.push(ours.clone());
        }
        true
    }

    /// Their flag changes of the message live here at `our_uid`, joined into ours at the
    /// merge's modseq. Whether any changed.
    fn join_flag_changes(&mut self, our_uid: Uid, r: &MessageRecord) -> bool {
        let (rules, modseq) = (self.rules, self.modseq);
        let Some(mut ours) = self.m.messages.get_mut(&our_uid) else { return false };
        if !(join_flags_by(&mut ours.flags, &r.flags, rules) | ours.join_claim(r)) {
            return false;
        }
        ours.modseq = modseq;
        self.out.records.push(ours.clone());
        true
    }

    /// A message new here at its own UID, unless that UID is taken or was retired.
    fn place_at_uid(&mut self, r: MessageRecord) {
        match self.m.messages.get(&r.uid) {
            Some(ours) => {
                // Two GUIDs on one UID: both move.
                self.movers.insert((ours.uid, ours.guid), ours.clone());
                self.movers.insert((r.uid, r.guid), r);
            }
            None => {
                let retired = !self.rules.ignore_tombstones
                    && (self.m.retired.contains(r.uid) || self.m.tombstones_at(r.uid).next().is_some());
                if retired {
                    self.out.tombstone_conflict = true;
                    self.movers.insert((r.uid, r.guid), r);
                    return;
                }
                let next = r.uid.saturating_add(1);
                let rec = MessageRecord { modseq: self.modseq, ..r };
                self.m.messages.insert(rec.uid, rec.clone());
                self.out.records.push(rec);
                if next > self.m.uidnext {
                    self.m.uidnext = next;
                    self.out.meta_changed = true;
                }
            }
        }
    }

    /// One message live at two UIDs (two masters renumbered it differently): the highest
    /// UID keeps it (the latest binding), with both copies' flag changes; the others
    /// retire, in UID order of the binding that retires.
    fn retire_duplicates(&mut self) {
        let mut duplicates: Vec<(Uid, Uid)> = Vec::new();
        for guid in self.m.messages.duplicated() {
            let uids: Vec<Uid> = self.m.messages.uids_of(*guid).collect();
            if let Some((keep, lower)) = uids.split_last() {
                duplicates.extend(lower.iter().map(|drop| (*keep, *drop)));
            }
        }
        duplicates.sort_by_key(|(_, drop)| *drop);
        for (keep, drop) in duplicates {
            let Some(dropped) = self.m.messages.get(&drop).cloned() else { continue };
            let t = Tombstone::retirement(drop, dropped.guid, self.modseq);
            add_tombstone(self.m, t, &mut self.out);
            if let Some(mut kept) = self.m.messages.get_mut(&keep) {
                join_flags_by(&mut kept.flags, &dropped.flags, self.rules);
                kept.join_claim(&dropped);
                kept.modseq = self.modseq;
                self.out.records.push(kept.clone());
            }
        }
    }

    /// A live message on a UID that another message was expunged from or retired from
    /// (however the two met here) moves too: the UID was shown as that other message.
    fn move_off_retired_uids(&mut self) {
        if self.rules.ignore_tombstones {
            return;
        }
        for (uid, guid) in self.m.tombstones.keys() {
            if let Some(ours) = self.m.messages.get(uid)
                && ours.guid != *guid
            {
                self.out.tombstone_conflict = true;
                self.movers.insert((ours.uid, ours.guid), ours.clone());
            }
        }
        // Whatever message sits on a UID whose tombstones were collected moves: the UID
        // was shown as a message that is gone, and which one is no longer known.
        for uid in live_on_retired(self.m) {
            if let Some(ours) = self.m.messages.get(&uid) {
                self.out.tombstone_conflict = true;
                self.movers.insert((ours.uid, ours.guid), ours.clone());
            }
        }
    }

    /// Movers get new UIDs above every UID either side used, in (old UID, GUID) order.
    fn renumber_movers(&mut self) {
        if self.movers.is_empty() {
            return;
        }
        let mut next_uid = self.m.uidnext.max(self.foreign.uidnext);
        let mut moved_guids = BTreeSet::new();
        // A mover a client expunged (their expunge of it at another binding, taken after
        // it was marked to move) is not placed again: `expunge_everywhere` removed it
        // where it lived, and its record here is the one from before (explore seed
        // 1151560: their tombstone of another message on its UID marked it, their
        // expunge of it at that UID removed it, and it came back above every UID).
        let mover_guids: BTreeSet<Guid> = self.movers.keys().map(|(_, guid)| *guid).collect();
        let expunged: BTreeSet<Guid> = self
            .m
            .tombstones
            .values()
            .filter(|t| t.by_client() && mover_guids.contains(&t.guid))
            .map(|t| t.guid)
            .collect();
        for ((old_uid, guid), rec) in std::mem::take(&mut self.movers) {
            if self.same_validity || self.m.messages.get(&old_uid).is_some_and(|r| r.guid == guid) {
                let t = Tombstone::retirement(old_uid, guid, self.modseq);
                add_tombstone(self.m, t, &mut self.out);
            }
            if !moved_guids.insert(guid) || self.m.messages.has_guid(guid) || expunged.contains(&guid) {
                // Already moved, still live at another UID, or expunged: nothing to place.
                continue;
            }
            let moved = MessageRecord { uid: next_uid, modseq: self.modseq, ..rec };
            next_uid = next_uid.saturating_add(1);
            self.m.messages.insert(moved.uid, moved.clone());
            self.out.records.push(moved);
            self.out.renumbered += 1;
        }
        self.m.uidnext = next_uid;
        self.out.meta_changed = true;
    }

    fn finish(self) -> MergeOutcome {
        let MasterMerge { m, rules, modseq, mut out, .. } = self;
        if !out.records.is_empty() || !out.tombstones.is_empty() || !out.removed.is_empty() {
            // The merge is one change at one new modseq. (A merge that only learned a
            // higher UIDNEXT/HIGHESTMODSEQ takes theirs and makes no new modseq, so two
            // servers that both think they master the mailbox cannot bump each other
            // forever.)
            m.highest_modseq = m.highest_modseq.max(modseq);
            out.meta_changed = true;
        }
        // A retired binding travels with the binding that replaces it: a copy that learns
        // (uid, guid) is dead must also learn where the message lives now, or it would
        // lose the message (and later take the tombstone for an expunge).
        for t in out.tombstones.clone() {
            if let Some(uid) = m.messages.last_uid_of(t.guid)
                && !out.records.iter().any(|r| r.uid == uid)
                && let Some(r) = m.messages.get(&uid)
            {
                out.records.push(r.clone());
            }
        }
        debug_assert!(unique_guids(m), "a GUID is live at two UIDs after a master merge");
        debug_assert!(m.messages.index_consistent(), "the GUID index disagrees with the records");
        debug_assert!(
            rules.ignore_tombstones || no_retired_uid_live(m),
            "a live UID is also retired for another message"
        );
        debug_assert!(m.messages.keys().all(|&u| u < m.uidnext), "a live UID is not below UIDNEXT");
        out
    }
}

/// How a user replica takes the cluster's copy of a mailbox (an adopt, see
/// `crate::user_replica`): a replica merge (`merge_as_replica`) of the cluster's state as
/// this rule leaves it, after the messages in `gone` are removed here. A replica merge
/// leaves every conflict to a master; a user replica is never one, and the cluster's copy
/// is its master's word, so the rule takes the cluster's decisions a replica merge would
/// refuse, and keeps back what the replica's own changes not yet pushed still need:
///
/// 1. Bindings the cluster retired and forgot (their tombstones collected while the
///    replica was away): a message here at such a UID that the cluster held
///    (`from_cluster`), or whose GUID the cluster holds at another UID, goes (`gone`);
///    flags changed here since the last push (`pushed_upto`) follow it to the cluster's
///    binding. One changed here whose cluster binding this copy cannot take yet stays,
///    for the next push to carry its changes there (explore seed 2637). So does one a
///    windowed copy (`since_s`) is not shown, from before its window and changed here
///    since the last push: the cluster may have moved it, not expunged it (explore
///    seed 90542).
/// 2. Messages a client of this replica expunged since the pull this adopt answers (a
///    tombstone here, at whatever UID the cluster has them now) are left out: a GUID
///    expunged from a mailbox never comes back to it, and the next push takes the
///    expunge up.
/// 3. The retirement of a UID where a client here expunged a message since the last
///    push is held back: taking it would drop that tombstone before the push that takes
///    the expunge to the cluster, and the message would come back (explore seed 1991).
///    The retirement comes again with a later pull.
/// 4. Whatever was carried or held back makes the next push whole (`push_whole`): the
///    records it rides on carry the cluster's modseqs, which a delta by this copy's
///    modseqs may pass over.
/// 5. Under another UIDVALIDITY (the cluster's incarnation of the name differs), the
///    replica merge takes the cluster's copy only if every message here is in it. A
///    windowed replica (`since_s`) is not shown the cluster's messages from before its
///    window, so its own from before the window, already pushed (and so placed in the
///    cluster's incarnation), go here (`left_window`) rather than block the adopt
///    forever (explore seed 15950).
/// 6. A census's loss (`Tombstone::lost`) of a message the cluster has live nowhere,
///    and that this copy holds with its body (`holds_body`), is not taken: the message
///    stays here (`kept_lost`), and the next push is whole, so that it goes back to the
///    cluster with its body and lives again at a new UID. This copy's message may be the
///    only one left: a master that took it lost its disk before any peer held the body
///    (explore seed 82928).
/// 7. The same loss of a message this copy does not hold here but holds live, with its
///    body, in another mailbox ([`keep_lost_held_elsewhere`], after this rule): the
///    message is put back here at the lost binding and kept as in step 6. A RENAME moved
///    it out of the mailbox this copy holds it in before the census lost it at the
///    target (explore seed 1159717).
///
/// `take_collected` false is the broken variant `replica-resurrects` (step 1 skipped).
pub fn adopt_rule(
    here: Option<&StoredMailbox>,
    cluster: &MailboxState,
    from_cluster: &Retired,
    pushed_upto: ModSeq,
    take_collected: bool,
    since_s: u64,
    holds_body: impl Fn(Guid) -> bool,
) -> Adopt {
    let mut adopt = Adopt {
        state: cluster.clone(),
        gone: Vec::new(),
        left_window: Vec::new(),
        push_whole: false,
        kept_lost: Vec::new(),
    };
    let Some(m) = here else { return adopt };
    if m.uidvalidity != cluster.uidvalidity {
        if since_s > 0 {
            let theirs = guids_named(cluster);
            adopt.left_window = m
                .messages
                .values()
                .filter(|r| r.received < since_s && r.modseq <= pushed_upto && !theirs.contains(&r.guid))
                .map(|r| r.uid)
                .collect();
        }
        return adopt;
    }
    if take_collected && !cluster.retired.ranges.is_empty() {
        let (gone, unpushed, unshown_kept) = collected_bindings(m, cluster, from_cluster, pushed_upto, since_s);
        adopt.gone = gone;
        adopt.push_whole |= unshown_kept;
        for r in adopt.state.messages.iter_mut() {
            if let Some(flags) = unpushed.get(&r.guid) {
                adopt.push_whole |= join_flags(&mut r.flags, flags);
            }
        }
    }
    // A census's loss taken here earlier does not hide the message once a replica's push
    // brought it back.
    let dead: BTreeSet<Guid> = m.tombstones.values().filter(|t| t.by_client()).map(|t| t.guid).collect();
    adopt.state.messages.retain(|r| !dead.contains(&r.guid));
    adopt.push_whole |= hold_back_unpushed_retirements(m, &mut adopt.state.retired, pushed_upto);
    adopt.push_whole |= hold_back_retirements_of_unpushed_changes(m, &mut adopt.state, pushed_upto);
    keep_lost_messages(m, &mut adopt, holds_body);
    adopt
}

/// Step 3 of [`adopt_rule`], for retirements the cluster still holds as tombstones: one
/// of a binding here whose record changed since the last push (`pushed_upto`), of a
/// message whose latest binding the cluster's state does not show live (a window's
/// piece; a copy that holds the retirement of a later binding and the record of an
/// earlier one, the record at the new binding not there yet), is held back. Taking it
/// would drop the record, and with it the change (a STORE a client here was told is
/// done), as nothing here could carry it to the message's new binding (general seed
/// 2063596: a partial laptop's \Seen on a message it saved, whose push the cluster
/// renumbered, was lost when an adopt of a piece that showed the message live only below
/// a retirement of it dropped the record). The record stays; the next push is whole and
/// carries the change to the master, whose merge follows the GUID to its binding; the
/// retirement comes again with a later pull.
fn hold_back_retirements_of_unpushed_changes(m: &StoredMailbox, state: &mut MailboxState, pushed_upto: ModSeq) -> bool {
    let mut retired_above: BTreeMap<Guid, Uid> = BTreeMap::new();
    for t in state.tombstones.iter().filter(|t| !t.expunged) {
        let top = retired_above.entry(t.guid).or_insert(t.uid);
        *top = (*top).max(t.uid);
    }
    let live_latest: BTreeSet<Guid> = state
        .messages
        .iter()
        .filter(|r| retired_above.get(&r.guid).is_none_or(|top| r.uid > *top))
        .map(|r| r.guid)
        .collect();
    let before = state.tombstones.len();
    state.tombstones.retain(|t| {
        let unpushed_here = m.messages.get(&t.uid).is_some_and(|r| r.guid == t.guid && r.modseq > pushed_upto);
        t.expunged || live_latest.contains(&t.guid) || !unpushed_here
    });
    state.tombstones.len() != before
}

/// Step 6 of [`adopt_rule`].
fn keep_lost_messages(m: &StoredMailbox, adopt: &mut Adopt, holds_body: impl Fn(Guid) -> bool) {
    if !adopt.state.tombstones.iter().any(|t| t.lost) {
        return;
    }
    let live_there: BTreeSet<Guid> = adopt.state.messages.iter().map(|r| r.guid).collect();
    let mut kept = lost_messages(adopt.state.tombstones.iter(), |g| live_there.contains(&g));
    kept.retain(|g| m.messages.has_guid(*g) && holds_body(*g));
    if kept.is_empty() {
        return;
    }
    adopt.state.tombstones.retain(|t| !kept.contains(&t.guid));
    // Step 1 may have it go from a binding the cluster retired and forgot (renumbered,
    // then lost at its new UID): it stays, for the push to bring back.
    adopt.gone.retain(|uid| m.messages.get(uid).is_none_or(|r| !kept.contains(&r.guid)));
    adopt.kept_lost = kept.into_iter().collect();
    adopt.push_whole = true;
}

/// Step 7 of [`adopt_rule`]: `elsewhere` is this copy's live record of a GUID in another
/// mailbox whose body it holds intact. The binding must be free here (no message, no
/// retirement, no tombstone of another message at its UID), and no client of this copy
/// expunged the message from this mailbox.
pub fn keep_lost_held_elsewhere(
    here: Option<&StoredMailbox>,
    adopt: &mut Adopt,
    elsewhere: impl Fn(Guid) -> Option<MessageRecord>,
) {
    if !adopt.state.tombstones.iter().any(|t| t.lost) || here.is_some_and(|m| m.uidvalidity != adopt.state.uidvalidity)
    {
        return;
    }
    let live_there: BTreeSet<Guid> = adopt.state.messages.iter().map(|r| r.guid).collect();
    let lost = lost_messages(adopt.state.tombstones.iter(), |g| live_there.contains(&g));
    for guid in lost {
        if adopt.kept_lost.contains(&guid) {
            continue;
        }
        let Some(binding) = adopt.state.tombstones.iter().filter(|t| t.lost && t.guid == guid).max_by_key(|t| t.uid)
        else {
            continue;
        };
        let (uid, modseq) = (binding.uid, binding.modseq);
        let free_here = here.is_none_or(|m| {
            !m.messages.has_guid(guid)
                && can_bind(m, uid, guid)
                && !m.tombstones.values().any(|t| t.guid == guid && t.by_client())
        });
        // Nothing else the cluster binds there either (a piece of its state may not show
        // all, and the replica merge would refuse a clash).
        let clash = adopt.state.messages.iter().any(|r| r.uid == uid)
            || adopt.state.tombstones.iter().any(|t| t.uid == uid && t.guid != guid);
        if !free_here || clash {
            continue;
        }
        let Some(copy) = elsewhere(guid) else { continue };
        debug_assert_eq!(copy.guid, guid, "a copy elsewhere is of the same message");
        adopt.state.tombstones.retain(|t| t.guid != guid);
        let at = adopt.state.messages.partition_point(|r| r.uid < uid);
        adopt.state.messages.insert(at, MessageRecord { uid, modseq, ..copy });
        adopt.kept_lost.push(guid);
        adopt.push_whole = true;
    }
}

/// What [`adopt_rule`] makes of the cluster's copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopt {
    /// The cluster's state as this copy merges it.
    pub state: MailboxState,
    /// This copy's messages at bindings the cluster retired and forgot, by UID: removed
    /// before the merge.
    pub gone: Vec<Uid>,
    /// This copy's own messages from before its window, pushed, under a UIDVALIDITY the
    /// cluster no longer has: removed before the merge (step 5).
    pub left_window: Vec<Uid>,
    /// The next push must send everything, not a delta.
    pub push_whole: bool,
    /// Messages kept here against a census's loss (step 6): their bodies go with the
    /// next push.
    pub kept_lost: Vec<Guid>,
}

/// Step 1 of [`adopt_rule`]: the UIDs of the messages that go, and the flags of those
/// changed here since the last push, by GUID (empty flags: kept, its changes to follow).
fn collected_bindings(
    m: &StoredMailbox,
    cluster: &MailboxState,
    from_cluster: &Retired,
    pushed_upto: ModSeq,
    since_s: u64,
) -> (Vec<Uid>, BTreeMap<Guid, Flags>, bool) {
    let mut unshown_kept = false;
    let mut unpushed = BTreeMap::new();
    let cluster_uid: BTreeMap<Guid, Uid> = cluster.messages.iter().map(|r| (r.guid, r.uid)).collect();
    // Whether this copy can bind `guid` where the cluster has it.
    let placeable = |guid: Guid| cluster_uid.get(&guid).is_some_and(|&uid| can_bind(m, uid, guid));
    let mut gone = Vec::new();
    for r in m.messages.values() {
        let moved = cluster_uid.contains_key(&r.guid);
        if !cluster.retired.contains(r.uid) || !(from_cluster.contains(r.uid) || moved) {
            continue;
        }
        if moved && r.modseq > pushed_upto {
            if !placeable(r.guid) {
                unpushed.insert(r.guid, Flags::default());
                continue;
            }
            unpushed.insert(r.guid, r.flags.clone());
        }
        if !moved && r.received < since_s && r.modseq > pushed_upto {
            // A windowed copy is not shown the cluster's messages from before its window:
            // this one may have moved there rather than gone. Its changes not pushed yet
            // go up first (the master takes them to where it lives, or drops them with
            // it if the cluster expunged it); it goes at a later adopt (explore seed
            // 90542).
            unshown_kept = true;
            continue;
        }
        gone.push(r.uid);
    }
    (gone, unpushed, unshown_kept)
}

/// Step 3 of [`adopt_rule`]: takes out of `retired` the UIDs where this copy holds an
/// expunge newer than the last push; whether any was.
fn hold_back_unpushed_retirements(m: &StoredMailbox, retired: &mut Retired, pushed_upto: ModSeq) -> bool {
    if retired.ranges.is_empty() {
        return false;
    }
    let unpushed: BTreeSet<Uid> = m
        .tombstones
        .values()
        .filter(|t| t.expunged && t.modseq > pushed_upto && retired.contains(t.uid))
        .map(|t| t.uid)
        .collect();
    if unpushed.is_empty() {
        return false;
    }
    let mut kept = Retired { ranges: Default::default(), collected: retired.collected };
    for (&first, &last) in &retired.ranges {
        // The next UID of the range not yet kept or held back (None: past the end).
        let mut start = Some(first);
        for &uid in unpushed.range(first..=last) {
            if let Some(from) = start
                && uid > from
            {
                kept.insert_range(from, uid - 1);
            }
            start = uid.checked_add(1);
        }
        if let Some(from) = start.filter(|from| *from <= last) {
            kept.insert_range(from, last);
        }
    }
    debug_assert!(unpushed.iter().all(|uid| !kept.contains(*uid)), "a held-back UID stays unretired");
    *retired = kept;
    true
}

/// No live message sits on a UID that is tombstoned for another message, or retired.
pub fn no_retired_uid_live(m: &StoredMailbox) -> bool {
    m.tombstones.keys().all(|(uid, guid)| m.messages.get(uid).is_none_or(|r| r.guid == *guid))
        && live_on_retired(m).is_empty()
}

/// At most one live UID per GUID.
pub fn unique_guids(m: &StoredMailbox) -> bool {
    m.messages.duplicated().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(uid: Uid, guid: u128, flags: &[(&str, bool, u64)]) -> MessageRecord {
        MessageRecord {
            uid,
            guid: Guid(guid),
            received: 0,
            size: 1,
            checksum: 0,
            modseq: flags.iter().map(|f| f.2).max().unwrap_or(1),
            flags: flags
                .iter()
                .map(|(f, p, m)| {
                    (Flag::new(f).unwrap(), FlagState { present: *p, stamp: Stamp { modseq: *m, sid: Sid(1) } })
                })
                .collect(),
            claimed: false,
            pushed: false,
        }
    }

    fn mbox(msgs: Vec<MessageRecord>) -> StoredMailbox {
        let key = MailboxKey::new("u", "INBOX");
        let mut m = new_mailbox(&key);
        for r in msgs {
            m.uidnext = m.uidnext.max(r.uid + 1);
            m.highest_modseq = m.highest_modseq.max(r.modseq);
            m.messages.insert(r.uid, r);
        }
        m
    }

    fn st(m: &StoredMailbox) -> MailboxState {
        state(&MailboxKey::new("u", "INBOX"), m)
    }

    /// A mailbox `holds_exactly` its own state only when a merge of that state, as master
    /// or as replica, changes nothing; each thing a merge settles whatever it is given
    /// makes it false.
    #[test]
    fn a_copy_of_itself_changes_nothing_unless_something_is_left_to_settle() {
        let tomb = |uid, guid, expunged| {
            if expunged { Tombstone::expunge(uid, Guid(guid), 9) } else { Tombstone::retirement(uid, Guid(guid), 9) }
        };
        let mut settled = mbox(vec![rec(1, 10, &[("\\Seen", true, 3)]), rec(4, 40, &[]), rec(6, 20, &[])]);
        // 2 expunged, 3 retired from 20 (which lives at 6), 5 collected.
        settled.tombstones.insert((2, Guid(30)), tomb(2, 30, true));
        settled.tombstones.insert((3, Guid(20)), tomb(3, 20, false));
        settled.retired.insert_range(5, 5);
        settled.highest_modseq = 9;
        let unsettled = |edit: &dyn Fn(&mut StoredMailbox)| {
            let mut m = settled.clone();
            edit(&mut m);
            m
        };
        let cases = [
            (settled.clone(), true),
            // A message live twice.
            (unsettled(&|m| _ = m.messages.insert(7, rec(7, 40, &[]))), false),
            // A message on a retired UID.
            (unsettled(&|m| _ = m.messages.insert(5, rec(5, 50, &[]))), false),
            // A live message at a tombstoned UID.
            (unsettled(&|m| _ = m.messages.insert(2, rec(2, 60, &[]))), false),
            // A live GUID a tombstone expunged.
            (unsettled(&|m| _ = m.tombstones.insert((8, Guid(40)), tomb(8, 40, true))), false),
        ];
        for (i, (m, settles)) in cases.into_iter().enumerate() {
            let copy = st(&m);
            assert_eq!(holds_exactly(&m, &copy), settles, "case {i}");
            if !settles {
                continue;
            }
            let rules = MergeRules::default();
            let (mut as_master, mut as_replica) = (m.clone(), m.clone());
            let master_out = merge_as_master(&mut as_master, &copy, &rules);
            let replica_out = merge_as_replica(&mut as_replica, &copy, &rules);
            assert!(!master_out.changed() && !master_out.unresolved, "case {i}: {master_out:?}");
            assert!(!replica_out.changed() && !replica_out.unresolved, "case {i}: {replica_out:?}");
            assert_eq!((as_master, as_replica), (m.clone(), m), "case {i}");
        }
        // Any difference from the copy: not exactly held.
        let mut newer = st(&settled);
        newer.messages[0].modseq = 8;
        assert!(!holds_exactly(&settled, &newer));
    }

    /// Explore seed 432314: one message (GUID 9) COPYed into the mailbox on both sides of
    /// a partition, at UID 2 here and UID 1 there, where UID 1 here is another message;
    /// there a STORE removed \Flagged. Their binding retires onto the message live here
    /// and its removal joins, since a COPY stamps the flags it carries at modseq 0.
    #[test]
    fn a_binding_that_meets_its_message_live_elsewhere_brings_its_flag_changes() {
        let mut here = mbox(vec![rec(1, 7, &[]), rec(2, 9, &[("\\Flagged", true, 0)])]);
        let there = st(&mbox(vec![rec(1, 9, &[("\\Flagged", false, 2)])]));
        let out = merge_as_master(&mut here, &there, &MergeRules::default());
        assert!(!out.unresolved);
        let live: Vec<Uid> = here.messages.uids_of(Guid(9)).collect();
        assert_eq!(live.len(), 1, "one message, one UID");
        assert!(here.messages[&live[0]].present_flags().is_empty(), "the removal joined: {here:?}");
        assert!(here.messages.has_guid(Guid(7)), "the other message moved, not dropped");
    }

    #[test]
    fn an_adopt_takes_the_clusters_forgotten_decisions_and_keeps_back_what_is_not_pushed() {
        // Here: 1 (the cluster's, expunged and forgotten there), 2 (the replica's own,
        // which the cluster moved to 7, flagged here since the last push at modseq 5),
        // 3 expunged here since the last push (the cluster retired 3 meanwhile), 4 live.
        let mut here = mbox(vec![rec(1, 10, &[]), rec(2, 20, &[("\\Seen", true, 6)]), rec(4, 40, &[])]);
        here.tombstones.insert((3, Guid(30)), Tombstone::expunge(3, Guid(30), 6));
        let mut cluster = st(&mbox(vec![rec(4, 40, &[]), rec(5, 30, &[]), rec(7, 20, &[])]));
        cluster.retired.insert_range(1, 3);
        let from_cluster = {
            let mut r = Retired::default();
            r.insert_range(1, 1);
            r
        };
        let adopt = adopt_rule(Some(&here), &cluster, &from_cluster, 5, true, 0, |_| false);
        assert_eq!(adopt.gone, vec![1, 2], "the forgotten binding and the moved one go");
        let moved = adopt.state.messages.iter().find(|r| r.guid == Guid(20)).expect("the moved message");
        assert!(moved.flags.get(&Flag::new("\\Seen").unwrap()).is_some_and(|f| f.present), "its flag follows it");
        assert!(adopt.state.messages.iter().all(|r| r.guid != Guid(30)), "expunged here: not taken back");
        assert!(adopt.state.retired.contains(1) && adopt.state.retired.contains(2));
        assert!(!adopt.state.retired.contains(3), "the retirement of an unpushed expunge waits");
        assert!(adopt.push_whole);
        // The broken variant takes none of the forgotten decisions.
        assert!(adopt_rule(Some(&here), &cluster, &from_cluster, 5, false, 0, |_| false).gone.is_empty());
        // After the push (pushed_upto 6), nothing is held back or carried.
        let after_push = adopt_rule(Some(&here), &cluster, &from_cluster, 6, true, 0, |_| false);
        assert!(after_push.state.retired.contains(3) && !after_push.push_whole);
        // Another UIDVALIDITY: the state as it is, for the replica merge to decide.
        cluster.uidvalidity += 1;
        let other = adopt_rule(Some(&here), &cluster, &from_cluster, 5, true, 0, |_| false);
        assert_eq!((other.state, other.gone, other.push_whole), (cluster, Vec::new(), false));
    }

    fn lost(uid: Uid, guid: u128, modseq: ModSeq) -> Tombstone {
        Tombstone {
            uid,
            guid: Guid(guid),
            modseq,
            expunged: true,
            lost: true,
            cancelled: false,
            pushed: false,
            deleted: false,
        }
    }

    #[test]
    fn an_adopt_keeps_a_message_a_census_lost_while_it_holds_the_body() {
        // Here: 2 (held with its body) and 3 (no body here). The cluster's census lost
        // both; 4 was lost too but a client expunged it at another binding.
        let here = mbox(vec![rec(2, 20, &[]), rec(3, 30, &[]), rec(4, 40, &[])]);
        let mut cluster = st(&mbox(vec![]));
        cluster.uidnext = 9;
        cluster.tombstones = vec![lost(2, 20, 5), lost(3, 30, 5), lost(4, 40, 5), Tombstone::expunge(8, Guid(40), 6)];
        let holds = |g: Guid| g == Guid(20) || g == Guid(40);
        let adopt = adopt_rule(Some(&here), &cluster, &Retired::default(), 5, true, 0, holds);
        assert_eq!(adopt.kept_lost, vec![Guid(20)]);
        assert!(adopt.push_whole, "it goes back with the next push");
        let guids: Vec<u128> = adopt.state.tombstones.iter().map(|t| t.guid.0).collect();
        assert_eq!(guids, vec![30, 40, 40], "the others' losses and the client's expunge are taken");
        // Once the cluster has it live again, its lost binding is taken like a retirement.
        cluster.messages.push(rec(9, 20, &[]));
        let again = adopt_rule(Some(&here), &cluster, &Retired::default(), 5, true, 0, holds);
        assert!(again.kept_lost.is_empty() && again.state.tombstones.iter().any(|t| t.guid == Guid(20)));
        // A copy that took the loss earlier (its tombstone here) takes the message back.
        let mut took = mbox(vec![]);
        took.tombstones.insert((2, Guid(20)), lost(2, 20, 5));
        let back = adopt_rule(Some(&took), &cluster, &Retired::default(), 5, true, 0, |_| false);
        assert!(back.state.messages.iter().any(|r| r.guid == Guid(20)), "a loss is no client's expunge");
        // Renumbered from 1 to 2 (1 collected since), then lost at 2: held here at 1, it
        // stays for the push rather than go as a binding the cluster forgot.
        let mut renumbered = st(&mbox(vec![]));
        renumbered.uidnext = 3;
        renumbered.tombstones = vec![lost(2, 20, 5)];
        renumbered.retired.insert_range(1, 1);
        let at_one = mbox(vec![rec(1, 20, &[])]);
        let mut from_cluster = Retired::default();
        from_cluster.insert_range(1, 1);
        let kept = adopt_rule(Some(&at_one), &renumbered, &from_cluster, 5, true, 0, holds);
        assert_eq!((kept.kept_lost, kept.gone), (vec![Guid(20)], Vec::new()));
    }

    #[test]
    fn an_adopt_puts_back_a_lost_message_held_in_another_mailbox() {
        // The cluster renamed the mailbox this copy holds 20 in, then lost 20 at the
        // target (UID 2). This copy has no target yet, or one with 3 expunged by a client.
        let mut cluster = st(&mbox(vec![rec(1, 10, &[])]));
        cluster.uidnext = 5;
        cluster.tombstones = vec![lost(2, 20, 6), lost(3, 30, 6), lost(4, 40, 6)];
        let elsewhere = |g: Guid| (g != Guid(40)).then(|| rec(7, g.0, &[("\\Seen", true, 3)]));
        let mut fresh = adopt_rule(None, &cluster, &Retired::default(), 0, true, 0, |_| false);
        keep_lost_held_elsewhere(None, &mut fresh, elsewhere);
        assert_eq!(fresh.kept_lost, vec![Guid(20), Guid(30)]);
        assert!(fresh.push_whole, "they go back with the next push");
        let bound: Vec<(Uid, u128, ModSeq)> =
            fresh.state.messages.iter().map(|r| (r.uid, r.guid.0, r.modseq)).collect();
        assert_eq!(bound, vec![(1, 10, 1), (2, 20, 6), (3, 30, 6)], "at the lost binding, in UID order");
        assert!(fresh.state.messages[1].has_flag("\\Seen"), "with the flags of the copy held");
        let guids: Vec<u128> = fresh.state.tombstones.iter().map(|t| t.guid.0).collect();
        assert_eq!(guids, vec![40], "a loss with no body held is taken");
        // A client of this copy expunged 30 from the target: it stays out.
        let mut here = mbox(vec![rec(1, 10, &[])]);
        here.tombstones.insert((3, Guid(30)), Tombstone::expunge(3, Guid(30), 2));
        let mut target = adopt_rule(Some(&here), &cluster, &Retired::default(), 0, true, 0, |_| false);
        keep_lost_held_elsewhere(Some(&here), &mut target, elsewhere);
        assert_eq!(target.kept_lost, vec![Guid(20)]);
        // Another message bound at the UID here, or another incarnation: nothing put back.
        let taken = mbox(vec![rec(2, 99, &[])]);
        let mut clash = adopt_rule(Some(&taken), &cluster, &Retired::default(), 0, true, 0, |_| false);
        keep_lost_held_elsewhere(Some(&taken), &mut clash, elsewhere);
        assert_eq!(clash.kept_lost, vec![Guid(30)]);
        let mut other = cluster.clone();
        other.uidvalidity += 1;
        let mut reborn = adopt_rule(Some(&here), &other, &Retired::default(), 0, true, 0, |_| false);
        keep_lost_held_elsewhere(Some(&here), &mut reborn, elsewhere);
        assert!(reborn.kept_lost.is_empty() && !reborn.push_whole);
    }

    #[test]
    fn a_push_brings_back_a_lost_message_at_a_new_uid_and_a_sync_does_not() {
        let mut master = mbox(vec![rec(1, 10, &[])]);
        master.uidnext = 3;
        master.highest_modseq = 5;
        master.tombstones.insert((2, Guid(20)), lost(2, 20, 5));
        let replica = st(&mbox(vec![rec(2, 20, &[("\\Seen", true, 4)])]));
        // A server's copy (a SYNC, a log entry) of the lost binding: it stays lost.
        let mut synced = master.clone();
        let out = merge_as_master(&mut synced, &replica, &MergeRules::default());
        assert!(!synced.messages.has_guid(Guid(20)) && out.renumbered == 0);
        // A user replica's push of it (its body with it): back, above every UID used.
        let push = MergeRules { revive_lost: true, ..MergeRules::default() };
        let out = merge_as_master(&mut master, &replica, &push);
        assert_eq!(master.messages.last_uid_of(Guid(20)), Some(3));
        assert_eq!(out.renumbered, 1);
        assert!(master.tombstones.get(&(2, Guid(20))).is_some_and(|t| t.lost), "the lost binding stays dead");
        // A replica that merges the master's copy keeps it: the loss reaches only the
        // bindings below its own.
        let mut other = mbox(vec![rec(1, 10, &[])]);
        let out =
            merge_as_replica(&mut other, &st(&master), &MergeRules { from_master: true, ..MergeRules::default() });
        assert!(!out.unresolved && other.messages.last_uid_of(Guid(20)) == Some(3));
        // Another replica's flag on the lost binding follows the message to its new UID.
        let flagged = st(&mbox(vec![rec(2, 20, &[("\\Flagged", true, 6)])]));
        merge_as_master(&mut master, &flagged, &push);
        let revived = master.messages.get(&3).expect("revived");
        assert!(revived.flags.get(&Flag::new("\\Flagged").unwrap()).is_some_and(|f| f.present));
        // A client's expunge is final even for a push.
        let mut expunged = master.clone();
        expunged.messages.remove(&3);
        expunged.tombstones.insert((3, Guid(20)), Tombstone::expunge(3, Guid(20), 7));
        merge_as_master(&mut expunged, &replica, &push);
        assert!(!expunged.messages.has_guid(Guid(20)));
    }

    #[test]
    fn a_message_marked_to_move_and_expunged_by_the_same_copy_stays_expunged() {
        // Here (a master that renumbered 70 from 1 to 2): 70 at 2, 1 retired. There (a
        // master of the other side of a partition): 70 expunged at 1, then at 2 when it
        // took our renumbering, and 36 (ordered before 70), saved at 2 there, moved to 4.
        let mut here = mbox(vec![rec(2, 70, &[])]);
        here.tombstones.insert((1, Guid(70)), Tombstone::retirement(1, Guid(70), 2));
        let mut there = st(&mbox(vec![rec(4, 36, &[])]));
        there.tombstones = vec![
            Tombstone::expunge(1, Guid(70), 3),
            Tombstone::retirement(2, Guid(36), 4),
            Tombstone::expunge(2, Guid(70), 4),
        ];
        let out = merge_as_master(&mut here, &there, &MergeRules::default());
        assert!(!here.messages.has_guid(Guid(70)), "a client's expunge is final: {:?}", here.messages);
        assert!(out.records.iter().all(|r| r.guid != Guid(70)));
        assert_eq!(here.messages.last_uid_of(Guid(36)), Some(4));
        assert!(here.tombstones.get(&(2, Guid(70))).is_some_and(|t| t.by_client()));
    }

    #[test]
    fn a_cancel_removes_its_binding_but_never_a_claimed_message() {
        let claimed = |uid, guid| MessageRecord { claimed: true, ..rec(uid, guid, &[]) };
        // The canceller's copy: the save's binding 2 cancelled.
        let mut theirs = mbox(vec![rec(1, 10, &[])]);
        theirs.tombstones.insert((2, Guid(20)), Tombstone::cancel(2, Guid(20), 6));
        theirs.uidnext = 3;
        let rules = MergeRules::default();
        // Unclaimed here: the cancel removes it.
        let mut master = mbox(vec![rec(1, 10, &[]), rec(2, 20, &[])]);
        merge_as_master(&mut master, &st(&theirs), &rules);
        assert!(!master.messages.has_guid(Guid(20)));
        // Claimed here (a retry was answered with it): it moves above every UID used.
        let mut master = mbox(vec![rec(1, 10, &[]), claimed(2, 20)]);
        merge_as_master(&mut master, &st(&theirs), &rules);
        assert_eq!(master.messages.last_uid_of(Guid(20)), Some(3));
        assert!(master.messages.get(&3).is_some_and(|r| r.claimed));
        assert!(master.tombstones.get(&(2, Guid(20))).is_some_and(|t| t.cancelled), "the binding stays cancelled");
        // A replica holding the claimed binding keeps it until the master's move is there.
        let from_master = MergeRules { from_master: true, ..MergeRules::default() };
        let mut replica = mbox(vec![rec(1, 10, &[]), claimed(2, 20)]);
        assert!(merge_as_replica(&mut replica, &st(&theirs), &from_master).unresolved);
        assert!(replica.messages.get(&2).is_some_and(|r| r.guid == Guid(20)));
        let out = merge_as_replica(&mut replica, &st(&master), &from_master);
        assert!(!out.unresolved && replica.messages.last_uid_of(Guid(20)) == Some(3));
        // The canceller, as master, meets a claimed copy: it comes back too.
        let mut canceller = theirs.clone();
        merge_as_master(&mut canceller, &st(&mbox(vec![claimed(2, 20)])), &rules);
        assert_eq!(canceller.messages.last_uid_of(Guid(20)), Some(3));
        // A client's expunge removes a claimed message all the same.
        let mut expunged = theirs.clone();
        let by_client = Tombstone::expunge(9, Guid(20), 7);
        expunged.tombstones.insert((9, Guid(20)), by_client);
        merge_as_master(&mut expunged, &st(&mbox(vec![claimed(2, 20)])), &rules);
        assert!(!expunged.messages.has_guid(Guid(20)));
    }

    #[test]
    fn a_binding_retired_before_a_cancel_is_cancelled_too() {
        // Renumbered from 3 to 6, then cancelled at 6: a replica still holds 3.
        let retired = Tombstone::retirement(3, Guid(20), 5);
        let mut master = mbox(vec![rec(1, 10, &[])]);
        master.tombstones.insert((3, Guid(20)), retired);
        master.tombstones.insert((6, Guid(20)), Tombstone::cancel(6, Guid(20), 7));
        master.uidnext = 7;
        let mut replica = mbox(vec![rec(1, 10, &[]), rec(3, 20, &[])]);
        let from_master = MergeRules { from_master: true, ..MergeRules::default() };
        assert!(merge_as_replica(&mut replica, &st(&master), &from_master).unresolved, "a retirement keeps it");
        merge_as_master(&mut master, &st(&replica), &MergeRules::default());
        assert!(master.tombstones.get(&(3, Guid(20))).is_some_and(|t| t.cancelled), "the older binding is cancelled");
        let out = merge_as_replica(&mut replica, &st(&master), &from_master);
        assert!(!out.unresolved && !replica.messages.has_guid(Guid(20)), "and the replica lets it go");
    }

    #[test]
    fn a_tombstones_fate_joins_to_the_more_final() {
        let retired = Tombstone::retirement(2, Guid(20), 9);
        let by_client = Tombstone { modseq: 3, expunged: true, ..retired };
        let cancel = Tombstone::cancel(2, Guid(20), 4);
        let deletion = Tombstone::deletion(2, Guid(20), 6);
        for (a, b, want) in [
            (retired, cancel, 1),
            (cancel, lost(2, 20, 5), 2),
            (retired, lost(2, 20, 5), 2),
            (lost(2, 20, 5), deletion, 3),
            (deletion, by_client, 4),
            (lost(2, 20, 5), by_client, 4),
            (by_client, cancel, 4),
        ] {
            for (x, y) in [(a, b), (b, a)] {
                let mut m = mbox(vec![]);
                add_tombstone(&mut m, x, &mut MergeOutcome::default());
                add_tombstone(&mut m, y, &mut MergeOutcome::default());
                let t = m.tombstones[&(2, Guid(20))];
                assert_eq!((t.fate_rank(), t.modseq), (want, x.modseq.max(y.modseq)));
            }
        }
    }

    #[test]
    fn a_pushed_bindings_expunge_stays_marked_whatever_it_joins() {
        let pushed = Tombstone { pushed: true, ..Tombstone::expunge(2, Guid(20), 3) };
        for other in [
            Tombstone::expunge(2, Guid(20), 3),
            Tombstone::expunge(2, Guid(20), 8),
            Tombstone::retirement(2, Guid(20), 8),
            lost(2, 20, 8),
            Tombstone::cancel(2, Guid(20), 8),
        ] {
            for (x, y) in [(pushed, other), (other, pushed)] {
                let mut m = mbox(vec![]);
                add_tombstone(&mut m, x, &mut MergeOutcome::default());
                add_tombstone(&mut m, y, &mut MergeOutcome::default());
                let t = m.tombstones[&(2, Guid(20))];
                assert!(t.pushed, "{x:?} then {y:?}");
                assert!(t.by_client(), "a client's expunge is the most final fate");
            }
        }
    }

    #[test]
    fn seed_uid_conflict_renumbers_both_above_everything() {
        let mut s1 = mbox(vec![rec(1, 10, &[]), rec(2, 20, &[])]);
        let s2 = mbox(vec![rec(1, 10, &[]), rec(2, 30, &[])]);
        let out = merge_as_master(&mut s1, &st(&s2), &MergeRules::default());
        assert_eq!(out.renumbered, 2);
        let by_uid: Vec<(Uid, u128)> = s1.messages.values().map(|r| (r.uid, r.guid.0)).collect();
        assert_eq!(by_uid, vec![(1, 10), (3, 20), (4, 30)]);
        assert!(s1.tombstones.contains_key(&(2, Guid(20))) && s1.tombstones.contains_key(&(2, Guid(30))));
        // The other side applies the outcome and agrees.
        let mut s2 = s2;
        let applied = merge_as_replica(&mut s2, &st(&s1), &MergeRules::default());
        assert!(!applied.unresolved);
        assert_eq!(digest(&s2), digest(&s1));
    }

    #[test]
    fn expunged_conflict_found_by_tombstone() {
        let mut master = mbox(vec![rec(1, 10, &[])]);
        let mut other = mbox(vec![]);
        other.tombstones.insert((1, Guid(99)), Tombstone::expunge(1, Guid(99), 2));
        other.uidnext = 2;
        let out = merge_as_master(&mut master, &st(&other), &MergeRules::default());
        assert!(out.tombstone_conflict);
        assert_eq!(master.messages.keys().copied().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn a_binding_of_a_message_a_client_expunged_here_is_expunged_not_retired() {
        // Explore seed 772280: a COPY placed the message again at UID 2 on a side where
        // the expunge's tombstone at UID 1 was collected. A retirement of their binding
        // would say the message lives on elsewhere, and the replica holding it live
        // would keep it for good.
        let mut master = mbox(vec![]);
        master.uidnext = 2;
        master.tombstones.insert((1, Guid(20)), Tombstone::expunge(1, Guid(20), 3));
        let copied = mbox(vec![rec(2, 20, &[])]);
        merge_as_master(&mut master, &st(&copied), &MergeRules::default());
        assert!(!master.messages.has_guid(Guid(20)), "the expunge wins");
        let theirs = master.tombstones.get(&(2, Guid(20))).copied();
        assert!(theirs.is_some_and(|t| t.by_client()), "their binding goes as the message went: {theirs:?}");
        // A replica holding that binding takes the master's state and drops it.
        let mut replica = mbox(vec![rec(2, 20, &[])]);
        merge_as_replica(&mut replica, &st(&master), &MergeRules { from_master: true, ..MergeRules::default() });
        assert!(!replica.messages.has_guid(Guid(20)), "the replica's copy goes too");
    }

    #[test]
    fn a_copy_made_after_the_expunge_was_collected_lives_where_the_merge_collects_it() {
        // Explore seed 144021: the copy's side collected the expunge's tombstone (UID 1),
        // then a COPY placed the message again at UID 2. This master, cut off before the
        // collection reached it, still holds the tombstone; merging their copy collects
        // it, and the message it expunged is not dead any more.
        let mut master = mbox(vec![]);
        master.uidnext = 2;
        master.highest_modseq = 3;
        master.tombstones.insert((1, Guid(20)), Tombstone::expunge(1, Guid(20), 3));
        let mut copied = mbox(vec![rec(2, 20, &[])]);
        copied.retired.insert_range(1, 1);
        copied.retired.collected = 3;
        merge_as_master(&mut master, &st(&copied), &MergeRules::default());
        assert!(master.messages.get(&2).is_some_and(|r| r.guid == Guid(20)), "the copy lives: {master:?}");
        assert!(master.tombstones.is_empty(), "nothing retires or expunges the copy: {:?}", master.tombstones);
        // Without the collection in their state the expunge still wins (seed 772280).
        let mut uncollected = mbox(vec![]);
        uncollected.uidnext = 2;
        uncollected.tombstones.insert((1, Guid(20)), Tombstone::expunge(1, Guid(20), 3));
        merge_as_master(&mut uncollected, &st(&mbox(vec![rec(2, 20, &[])])), &MergeRules::default());
        assert!(!uncollected.messages.has_guid(Guid(20)));
    }

    #[test]
    fn an_expunge_in_another_incarnation_kills_the_message_that_moved_in() {
        // Explore seed 67714: theirs saved 20 at UID 1 and later expunged it, under
        // another UIDVALIDITY; their R-SAVE moved 20 in here first.
        let mut master = mbox(vec![rec(39, 10, &[])]);
        // An incarnation above theirs: the master keeps its own (`incarnation_wins`).
        master.uidvalidity = 0x7fff_fff0;
        let saved = mbox(vec![rec(1, 20, &[])]);
        let out = merge_as_master(&mut master, &st(&saved), &MergeRules::default());
        assert_eq!(out.renumbered, 1);
        assert!(master.messages.has_guid(Guid(20)));
        let mut expunged = mbox(vec![]);
        expunged.uidnext = 2;
        expunged.tombstones.insert((1, Guid(20)), Tombstone::expunge(1, Guid(20), 3));
        merge_as_master(&mut master, &st(&expunged), &MergeRules::default());
        assert!(!master.messages.has_guid(Guid(20)), "the expunge in the other incarnation is ignored");
        assert!(master.messages.has_guid(Guid(10)));
        // Their earlier state (20 live) arriving again does not bring it back.
        merge_as_master(&mut master, &st(&saved), &MergeRules::default());
        assert!(!master.messages.has_guid(Guid(20)));
    }

    #[test]
    fn a_deleted_incarnation_gives_its_clients_expunges_not_its_deletions() {
        // The master: 10 and 20 live, an incarnation above theirs. Theirs: deleted (a
        // RENAME away at modseq 6), empty; a client expunged 10 at modseq 4 before, and
        // the deletion tombstoned 20 at 6.
        let mut master = mbox(vec![rec(1, 10, &[]), rec(2, 20, &[]), rec(3, 30, &[])]);
        master.uidvalidity = 0x7fff_fff0;
        let mut deleted = mbox(vec![]);
        deleted.uidnext = 4;
        deleted.highest_modseq = 6;
        deleted.lifecycle.created_at = 2;
        deleted.lifecycle.deleted_at = 6;
        deleted.tombstones.insert((1, Guid(10)), Tombstone::expunge(1, Guid(10), 4));
        deleted.tombstones.insert((2, Guid(20)), Tombstone::deletion(2, Guid(20), 6));
        // 30: a client's expunge at 4 joined with the deletion's at 6 (from another copy
        // of the incarnation): the client's fate, the deletion's modseq.
        let mut joined = mbox(vec![]);
        let mut out = MergeOutcome::default();
        add_tombstone(&mut joined, Tombstone::expunge(3, Guid(30), 4), &mut out);
        add_tombstone(&mut joined, Tombstone::deletion(3, Guid(30), 6), &mut out);
        let t30 = joined.tombstones[&(3, Guid(30))];
        assert!(!t30.deleted && t30.modseq == 6);
        deleted.tombstones.insert((3, Guid(30)), t30);
        merge_as_master(&mut master, &st(&deleted), &MergeRules::default());
        assert!(!master.messages.has_guid(Guid(10)), "the client's expunge is taken");
        assert!(master.messages.has_guid(Guid(20)), "the deletion's is not");
        assert!(!master.messages.has_guid(Guid(30)), "nor is a client's joined with it");
    }

    #[test]
    fn an_unseen_expunge_in_another_incarnation_is_remembered_at_a_fresh_uid() {
        let mut master = mbox(vec![rec(39, 10, &[])]);
        // An incarnation above theirs: the master keeps its own (`incarnation_wins`).
        master.uidvalidity = 0x7fff_fff0;
        let mut expunged = mbox(vec![]);
        expunged.uidnext = 2;
        expunged.tombstones.insert((1, Guid(20)), Tombstone::expunge(1, Guid(20), 3));
        merge_as_master(&mut master, &st(&expunged), &MergeRules::default());
        assert!(master.tombstones.get(&(40, Guid(20))).is_some_and(|t| t.expunged));
        assert_eq!(master.uidnext, 41);
        // A replica of theirs that still holds 20 live can now take the master's copy.
        let mut replica = mbox(vec![rec(1, 20, &[])]);
        let out = merge_as_replica(&mut replica, &st(&master), &MergeRules { from_master: true, ..Default::default() });
        assert!(!out.unresolved && out.new_validity);
        assert!(!replica.messages.has_guid(Guid(20)));
        // And the master, given that replica's old state, still does not take 20.
        merge_as_master(&mut master, &st(&mbox(vec![rec(1, 20, &[])])), &MergeRules::default());
        assert!(!master.messages.has_guid(Guid(20)));
    }

    #[test]
    fn a_replica_keeps_its_incarnation_while_the_master_lacks_its_expunge() {
        // Here, a replica: 20 was expunged at 1, nothing is live. The master's copy, of a
        // winning incarnation, holds 20 live at 2 (merged in from another branch).
        let mut replica = mbox(vec![]);
        replica.uidnext = 2;
        replica.tombstones.insert((1, Guid(20)), Tombstone::expunge(1, Guid(20), 3));
        let mut master = mbox(vec![rec(1, 10, &[]), rec(2, 20, &[])]);
        master.uidvalidity = replica.uidvalidity + 5;
        let from_master = MergeRules { from_master: true, ..Default::default() };
        // Neither its whole copy nor a log piece naming only 10 makes the replica drop
        // its expunge with its incarnation.
        let piece = MailboxState { messages: vec![rec(1, 10, &[])], ..st(&master) };
        for theirs in [st(&master), piece] {
            let mut here = replica.clone();
            let out = merge_as_replica(&mut here, &theirs, &from_master);
            assert!(out.unresolved && !out.new_validity);
            assert_eq!(here, replica);
        }
        // The replica's copy goes to the master, which takes the expunge into its own
        // incarnation; then the replica takes the master's copy, without 20.
        merge_as_master(&mut master, &st(&replica), &MergeRules::default());
        assert!(!master.messages.has_guid(Guid(20)));
        let out = merge_as_replica(&mut replica, &st(&master), &from_master);
        assert!(!out.unresolved && out.new_validity);
        assert!(!replica.messages.has_guid(Guid(20)) && replica.messages.has_guid(Guid(10)));
    }

    #[test]
    fn a_deleted_incarnation_and_a_live_one_holding_its_message_meet_in_a_third() {
        // Ours, the master's: deleted (a RENAME away took 20 from 1, and a client expunged
        // 30 at 2), empty, of the greater UIDVALIDITY. Theirs: live, 20 and 30 at 1 and 2.
        let mut ours = mbox(vec![]);
        ours.uidnext = 3;
        ours.highest_modseq = 4;
        ours.uidvalidity = 900;
        ours.lifecycle.deleted_at = 4;
        ours.tombstones.insert((1, Guid(20)), Tombstone::deletion(1, Guid(20), 4));
        ours.tombstones.insert((2, Guid(30)), Tombstone::expunge(2, Guid(30), 3));
        let mut theirs = mbox(vec![rec(1, 20, &[("\\Seen", true, 2)]), rec(2, 30, &[])]);
        theirs.uidvalidity = 700;
        assert!(!incarnation_wins((theirs.uidvalidity, theirs.uidnext), (ours.uidvalidity, ours.uidnext)));
        let before = ours.clone();
        let out = merge_as_master(&mut ours, &st(&theirs), &MergeRules::default());
        // A third incarnation, greater than both, with UIDs above both's.
        assert!(out.new_validity && ours.uidvalidity > 900, "{}", ours.uidvalidity);
        // 20 is theirs, live (the deletion took it from ours only), its flag along; 30 a
        // client expunged on ours: gone, and so stays.
        let live: Vec<(Guid, bool)> = ours.messages.values().map(|r| (r.guid, r.has_flag("\\Seen"))).collect();
        assert_eq!(live, vec![(Guid(20), true)]);
        assert!(ours.messages.values().all(|r| r.uid >= 3));
        assert!(ours.tombstones.values().any(|t| t.guid == Guid(30) && t.by_client()));
        assert!(ours.visible());
        // Each old incarnation's copy, met again, changes nothing: the third wins over both.
        let settled = ours.clone();
        for old in [st(&before), st(&theirs)] {
            let out = merge_as_master(&mut ours, &old, &MergeRules::default());
            assert!(!out.new_validity && !out.unresolved);
        }
        assert_eq!(ours.messages.values().map(|r| r.guid).collect::<Vec<_>>(), vec![Guid(20)]);
        assert_eq!(ours.uidvalidity, settled.uidvalidity);
        // A replica of either takes the master's.
        let from_master = MergeRules { from_master: true, ..Default::default() };
        for mut replica in [before, theirs] {
            let out = merge_as_replica(&mut replica, &st(&settled), &from_master);
            assert!(!out.unresolved && out.new_validity);
            assert_eq!(replica.messages.values().map(|r| r.guid).collect::<Vec<_>>(), vec![Guid(20)]);
        }
    }

    #[test]
    fn a_copy_of_a_collected_binding_goes_where_another_server_names_it() {
        // A store restored from a backup older than the expunge: 10 live at 1 and 20 at
        // 2, where the others collected both bindings (UIDs 1 to 2 retired up to modseq
        // 7); 30 at 3 is new mail on a UID they did not retire.
        let restored = || mbox(vec![rec(1, 10, &[]), rec(2, 20, &[]), rec(3, 30, &[])]);
        let mut told = st(&mbox(vec![]));
        told.retired.insert_range(1, 2);
        told.retired.collected = 7;
        told.uidnext = 3;
        // The teller names 10 at 1 (`Server::tell_collected`), not 20 at 2.
        told.tombstones = vec![Tombstone::expunge(1, Guid(10), 7)];
        for as_master in [false, true] {
            let mut m = restored();
            let out = if as_master {
                merge_as_master(&mut m, &told, &MergeRules::default())
            } else {
                merge_as_replica(&mut m, &told, &MergeRules::default())
            };
            assert!(m.messages.get(&1).is_none(), "the named copy goes (master {as_master})");
            assert!(!m.tombstones.contains_key(&(1, Guid(10))), "the retired UID stands for it (master {as_master})");
            assert!(out.removed.contains(&1));
            if as_master {
                // The unnamed one on a retired UID is mail to keep: a new UID.
                assert!(m.messages.get(&2).is_none() && m.messages.has_guid(Guid(20)));
            } else {
                assert!(out.unresolved, "the unnamed one waits for the master");
                assert!(m.messages.get(&2).is_some_and(|r| r.guid == Guid(20)));
            }
            assert!(m.messages.get(&3).is_some_and(|r| r.guid == Guid(30)));
        }
        // A tombstone of another GUID on the UID names another binding: ours stays.
        let mut other = told.clone();
        other.tombstones = vec![Tombstone::expunge(1, Guid(99), 7)];
        let mut m = restored();
        merge_as_replica(&mut m, &other, &MergeRules::default());
        assert!(m.messages.get(&1).is_some_and(|r| r.guid == Guid(10)));
    }

    #[test]
    fn a_master_keeps_a_binding_retired_towards_no_binding_it_knows() {
        // Ours, the master's: 20 at 25 with \\Answered from a STORE (modseq 33), its
        // binding 22 retired here.
        let mut ours = mbox(vec![rec(25, 20, &[("\\Answered", true, 33)])]);
        ours.tombstones.insert((22, Guid(20)), Tombstone::retirement(22, Guid(20), 29));
        ours.uidnext = 26;
        ours.highest_modseq = 33;
        // Theirs, a replica's: 20 live at its old binding 22 only, and the retirements of
        // 25 and 28 (the later binding, 33, not there yet).
        let mut theirs = mbox(vec![rec(22, 20, &[])]);
        theirs.tombstones.insert((25, Guid(20)), Tombstone::retirement(25, Guid(20), 34));
        theirs.tombstones.insert((28, Guid(20)), Tombstone::retirement(28, Guid(20), 35));
        theirs.uidnext = 34;
        theirs.highest_modseq = 35;
        let rules = MergeRules::default();
        merge_as_master(&mut ours, &st(&theirs), &rules);
        let live: Vec<(Uid, bool)> = ours.messages.values().map(|r| (r.uid, r.has_flag("\\Answered"))).collect();
        assert_eq!(live, vec![(25, true)], "the binding stays, with its flag");
        assert!(!ours.tombstones.contains_key(&(25, Guid(20))));
        // The later binding arrives: ours retires into it, the flag along.
        let mut later = theirs.clone();
        later.messages = crate::store::Messages::new();
        later.messages.insert(33, rec(33, 20, &[]));
        merge_as_master(&mut ours, &st(&later), &rules);
        let live: Vec<(Uid, bool)> = ours.messages.values().map(|r| (r.uid, r.has_flag("\\Answered"))).collect();
        assert_eq!(live, vec![(33, true)]);
        assert!(ours.tombstones.get(&(25, Guid(20))).is_some_and(|t| !t.expunged));
        // A retirement whose message a client expunged at another binding is taken.
        let mut expunged = mbox(vec![rec(25, 30, &[])]);
        let mut theirs = mbox(vec![]);
        theirs.tombstones.insert((25, Guid(30)), Tombstone::retirement(25, Guid(30), 34));
        theirs.tombstones.insert((28, Guid(30)), Tombstone::expunge(28, Guid(30), 35));
        merge_as_master(&mut expunged, &st(&theirs), &rules);
        assert!(expunged.messages.is_empty());
    }

    #[test]
    fn an_adopt_holds_back_the_retirement_of_a_record_changed_since_the_push() {
        // Here, a user replica: 20 at 2, \\Seen added at modseq 3, after the push (up to 2).
        let here = mbox(vec![rec(2, 20, &[("\\Seen", true, 3)])]);
        // The cluster's piece: 20 live at 25 below a retirement of it at 30 (its record at
        // the binding after that not in the piece yet), and the retirement of 2.
        let mut cluster = mbox(vec![rec(25, 20, &[])]);
        cluster.tombstones.insert((2, Guid(20)), Tombstone::retirement(2, Guid(20), 35));
        cluster.tombstones.insert((30, Guid(20)), Tombstone::retirement(30, Guid(20), 41));
        let adopt = adopt_rule(Some(&here), &st(&cluster), &Retired::default(), 2, true, 0, |_| false);
        assert!(adopt.push_whole);
        assert!(!adopt.state.tombstones.iter().any(|t| t.uid == 2), "{:?}", adopt.state.tombstones);
        // Once pushed (up to 3), the retirement is taken.
        let after_push = adopt_rule(Some(&here), &st(&cluster), &Retired::default(), 3, true, 0, |_| false);
        assert!(after_push.state.tombstones.iter().any(|t| t.uid == 2));
        // Where the piece shows the message live at its latest binding, the merge carries
        // the change there, and the retirement is taken.
        let mut whole = cluster.clone();
        whole.tombstones.insert((25, Guid(20)), Tombstone::retirement(25, Guid(20), 40));
        whole.messages = crate::store::Messages::new();
        whole.messages.insert(32, rec(32, 20, &[]));
        let adopt = adopt_rule(Some(&here), &st(&whole), &Retired::default(), 2, true, 0, |_| false);
        assert!(adopt.state.tombstones.iter().any(|t| t.uid == 2));
    }

    #[test]
    fn a_replica_keeps_its_incarnation_while_the_master_lacks_its_flag_change() {
        // Here, a replica: 20 at 1 with $Work added by a STORE on this incarnation. The
        // master's copy, of a winning incarnation, holds 20 at 3 without it.
        let mut replica = mbox(vec![rec(1, 20, &[("$Work", true, 5)])]);
        let mut master = mbox(vec![rec(3, 20, &[])]);
        master.uidvalidity = replica.uidvalidity + 5;
        let from_master = MergeRules { from_master: true, ..Default::default() };
        let before = replica.clone();
        let out = merge_as_replica(&mut replica, &st(&master), &from_master);
        assert!(out.unresolved && !out.new_validity);
        assert_eq!(replica, before);
        // The master takes the flag change from the replica's copy; then the replica
        // takes the master's copy, the flag with it.
        merge_as_master(&mut master, &st(&replica), &MergeRules::default());
        let out = merge_as_replica(&mut replica, &st(&master), &from_master);
        assert!(!out.unresolved && out.new_validity);
        let r = replica.messages.find_guid(Guid(20)).expect("20 is live");
        assert_eq!(r.uid, 3);
        assert!(r.flags.get(&Flag::new("$Work").expect("a keyword")).is_some_and(|f| f.present));
    }

    #[test]
    fn a_user_replicas_push_of_a_winning_incarnation_moves_the_master() {
        // The cluster: an IMPORT's lesser UIDVALIDITY, 20 at 30. The laptop's push: its
        // own copy under a greater one, 10 at 1, which its client saw.
        let mut cluster = mbox(vec![rec(30, 20, &[])]);
        cluster.uidnext = 31;
        let mut laptop = st(&mbox(vec![rec(1, 10, &[])]));
        laptop.uidvalidity = cluster.uidvalidity + 5;
        let push = MergeRules { revive_lost: true, ..MergeRules::default() };
        let out = merge_as_master(&mut cluster, &laptop, &push);
        assert!(out.new_validity && !out.unresolved);
        assert_eq!(cluster.uidvalidity, laptop.uidvalidity);
        let live: Vec<(Uid, u128)> = cluster.messages.values().map(|r| (r.uid, r.guid.0)).collect();
        assert_eq!(live, vec![(1, 10), (31, 20)], "the laptop's binding kept, the cluster's moved above");
        // A push of a losing incarnation is placed in the cluster's, at new UIDs.
        let mut lesser = st(&mbox(vec![rec(1, 40, &[])]));
        lesser.uidvalidity = laptop.uidvalidity - 1;
        let out = merge_as_master(&mut cluster, &lesser, &push);
        assert!(!out.new_validity && cluster.uidvalidity == laptop.uidvalidity);
        assert!(cluster.messages.last_uid_of(Guid(40)).is_some_and(|uid| uid > 31));
    }

    #[test]
    fn the_greater_incarnation_wins_at_a_master_and_at_a_replica() {
        // Here: 10 at 1 and 30 expunged at 2, under the name's own UIDVALIDITY. Theirs: a
        // greater one (an IMPORT's), 20 at 1 and 30 at 2.
        let mut here = mbox(vec![rec(1, 10, &[])]);
        here.uidnext = 3;
        here.tombstones.insert((2, Guid(30)), Tombstone::expunge(2, Guid(30), 2));
        let lesser = here.uidvalidity;
        let mut greater = st(&mbox(vec![rec(1, 20, &[]), rec(2, 30, &[])]));
        greater.uidvalidity = lesser + 5;
        // A replica never leaves its incarnation for a lesser one, even its master's: its
        // copy goes to the master instead.
        let mut as_replica = mbox(vec![rec(1, 10, &[])]);
        as_replica.uidvalidity = lesser + 5;
        let from_master = MergeRules { from_master: true, ..MergeRules::default() };
        assert!(merge_as_replica(&mut as_replica, &st(&here), &from_master).unresolved);
        assert_eq!(as_replica.uidvalidity, lesser + 5);
        // A master takes the greater incarnation: theirs at their UIDs, ours at new UIDs
        // above, our expunge of 30 taken (it is one message whatever the UIDVALIDITY).
        let out = merge_as_master(&mut here, &greater, &MergeRules::default());
        assert!(out.new_validity && !out.unresolved);
        assert_eq!(here.uidvalidity, lesser + 5);
        let live: Vec<(Uid, u128)> = here.messages.values().map(|r| (r.uid, r.guid.0)).collect();
        assert_eq!(live, vec![(1, 20), (3, 10)]);
        assert!(here.tombstones.get(&(2, Guid(30))).is_some_and(|t| t.by_client()));
        assert!(out.removed.contains(&1) && out.records.iter().any(|r| r.uid == 3 && r.guid == Guid(10)));
        // Their lesser copy met again changes nothing of the incarnation.
        let mut old = st(&mbox(vec![rec(1, 10, &[])]));
        old.uidvalidity = lesser;
        let again = merge_as_master(&mut here, &old, &MergeRules::default());
        assert!(!again.new_validity && here.uidvalidity == lesser + 5);
        assert_eq!(here.messages.last_uid_of(Guid(10)), Some(3));
    }

    #[test]
    fn flag_example_from_the_seed_ends_answered_seen() {
        // Base (\Flagged) at modseq 1; s1 +\Answered at 2; s2 +\Seen -\Flagged at 2.
        let mut s1 = mbox(vec![rec(1, 10, &[("\\Flagged", true, 1), ("\\Answered", true, 2)])]);
        let mut s2 = mbox(vec![rec(1, 10, &[("\\Flagged", false, 2), ("\\Seen", true, 2)])]);
        merge_as_master(&mut s1, &st(&s2), &MergeRules::default());
        merge_as_replica(&mut s2, &st(&s1), &MergeRules::default());
        for m in [&s1, &s2] {
            let flags: Vec<String> = m.messages[&1].present_flags().iter().map(|f| f.to_string()).collect();
            assert_eq!(flags, vec!["\\Answered", "\\Seen"]);
        }
        assert_eq!(digest(&s1), digest(&s2));
    }

    #[test]
    fn replica_refuses_a_second_guid_on_a_uid() {
        let mut r = mbox(vec![rec(1, 10, &[])]);
        let out = merge_as_replica(&mut r, &st(&mbox(vec![rec(1, 11, &[])])), &MergeRules::default());
        assert!(out.unresolved);
        assert_eq!(r.messages[&1].guid, Guid(10));
    }

    #[test]
    fn merges_are_idempotent() {
        let mut a = mbox(vec![rec(1, 10, &[("\\Seen", true, 3)])]);
        let b = mbox(vec![rec(1, 10, &[("\\Seen", false, 4)]), rec(2, 20, &[])]);
        merge_as_replica(&mut a, &st(&b), &MergeRules::default());
        let d = digest(&a);
        let again = merge_as_replica(&mut a, &st(&b), &MergeRules::default());
        assert!(!again.changed());
        assert_eq!(digest(&a), d);
    }
}

#[cfg(test)]
mod carry_tests {
    use super::*;

    #[test]
    fn a_retired_binding_carries_its_flags_to_the_new_uid() {
        let key = MailboxKey::new("u", "INBOX");
        let mut m = new_mailbox(&key);
        let stamp = Stamp { modseq: 26, sid: Sid(4) };
        let mut rec = MessageRecord {
            uid: 17,
            guid: Guid(9),
            received: 0,
            size: 1,
            checksum: 0,
            modseq: 26,
            flags: Flags::default(),
            claimed: false,
            pushed: false,
        };
        rec.flags.insert(Flag::new("$Work").unwrap(), FlagState { present: true, stamp });
        m.messages.insert(17, rec.clone());
        m.uidnext = 18;
        let moved = MessageRecord { uid: 34, modseq: 36, flags: Flags::default(), ..rec.clone() };
        let t = |uid, modseq| Tombstone::retirement(uid, Guid(9), modseq);
        let fragment = MailboxState {
            mailbox: key.clone(),
            uidvalidity: m.uidvalidity,
            uidnext: 35,
            highest_modseq: 36,
            messages: vec![moved],
            tombstones: vec![t(17, 30), t(23, 36)],
            lifecycle: Default::default(),
            retired: Default::default(),
        };
        let out = merge_as_replica(&mut m, &fragment, &MergeRules::default());
        assert!(!out.unresolved);
        assert_eq!(m.messages[&34].present_flags(), vec![Flag::new("$Work").unwrap()]);
    }
}

#[cfg(test)]
mod retired_tests {
    use super::*;

    fn key() -> MailboxKey {
        MailboxKey::new("u", "INBOX")
    }

    fn rec(uid: Uid, guid: u128, modseq: ModSeq) -> MessageRecord {
        MessageRecord::bare(uid, guid, modseq)
    }

    fn retired(ranges: &[(Uid, Uid)], collected: ModSeq) -> Retired {
        Retired { ranges: ranges.iter().copied().collect(), collected }
    }

    /// UIDs 1..=5 used, 2..=4 collected at modseq 8, 1 and 5 live.
    fn collected_mailbox() -> StoredMailbox {
        let mut m = new_mailbox(&key());
        m.messages.insert(1, rec(1, 10, 1));
        m.messages.insert(5, rec(5, 50, 5));
        m.uidnext = 6;
        m.highest_modseq = 8;
        m.retired = retired(&[(2, 4)], 8);
        m
    }

    fn fragment(m: &StoredMailbox, messages: Vec<MessageRecord>) -> MailboxState {
        MailboxState { messages, retired: Retired::default(), ..state(&key(), m) }
    }

    #[test]
    fn ranges_join_and_coalesce() {
        let mut r = retired(&[(2, 3)], 4);
        r.insert_range(7, 7);
        r.insert_range(4, 5);
        assert_eq!(r.ranges.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(), vec![(2, 5), (7, 7)]);
        let (added, changed) = r.join(&retired(&[(3, 4), (6, 6), (9, 12)], 6));
        assert!(changed);
        assert_eq!(added, vec![(6, 6), (9, 12)], "only ranges with new UIDs count as added");
        assert_eq!(r.ranges.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(), vec![(2, 7), (9, 12)]);
        assert_eq!(r.collected, 6);
        assert!(r.contains(7) && !r.contains(8) && r.contains(12) && !r.contains(1));
        assert!(r.well_formed());
        assert_eq!(r.join(&retired(&[(10, 11)], 5)), (Vec::new(), false), "a join with less changes nothing");
    }

    #[test]
    fn a_replica_refuses_a_copy_on_a_retired_uid() {
        let mut replica = collected_mailbox();
        let stale = fragment(&replica, vec![rec(3, 30, 3)]);
        let out = merge_as_replica(&mut replica, &stale, &MergeRules::default());
        assert!(out.unresolved, "only the master decides");
        assert!(!replica.messages.contains_key(&3));
    }

    #[test]
    fn a_master_moves_a_message_found_on_a_retired_uid_and_keeps_it() {
        let mut master = collected_mailbox();
        let restored = fragment(&master, vec![rec(3, 30, 3)]);
        let out = merge_as_master(&mut master, &restored, &MergeRules::default());
        assert_eq!(out.renumbered, 1);
        assert!(out.tombstone_conflict);
        let moved = master.messages.find_guid(Guid(30)).map(|r| r.uid);
        assert_eq!(moved, Some(6), "above every UID used");
        let t = master.tombstones[&(3, Guid(30))];
        assert!(t.modseq > master.retired.collected, "the new tombstone is not taken for a collected one");
        assert!(no_retired_uid_live(&master));
        // A replica that held the same copy follows the master's decision.
        let mut replica = collected_mailbox();
        replica.messages.insert(3, rec(3, 30, 3));
        let applied = merge_as_replica(&mut replica, &state(&key(), &master), &MergeRules::default());
        assert!(!applied.unresolved);
        assert_eq!(digest(&replica), digest(&master));
    }

    #[test]
    fn retired_uids_drop_the_tombstones_they_cover_and_no_later_one() {
        let mut replica = new_mailbox(&key());
        replica.messages.insert(1, rec(1, 10, 1));
        let t = |uid: Uid, guid: u128, modseq| Tombstone::expunge(uid, Guid(guid), modseq);
        for tomb in [t(2, 20, 3), t(3, 30, 3), t(4, 40, 9)] {
            replica.tombstones.insert((tomb.uid, tomb.guid), tomb);
        }
        replica.uidnext = 5;
        replica.highest_modseq = 9;
        let mut collection = fragment(&replica, Vec::new());
        collection.tombstones.clear();
        collection.retired = retired(&[(2, 4)], 8);
        let out = merge_as_replica(&mut replica, &collection, &MergeRules::default());
        assert!(out.retired_changed && !out.unresolved);
        assert_eq!(replica.tombstones.keys().copied().collect::<Vec<_>>(), vec![(4, Guid(40))]);
        // A stale copy of a collected tombstone is not taken back in.
        let stale = MailboxState { tombstones: vec![t(2, 20, 3)], ..fragment(&replica, Vec::new()) };
        let again = merge_as_replica(&mut replica, &stale, &MergeRules::default());
        assert!(!again.changed());
        assert_eq!(replica.tombstones.len(), 1);
    }

    #[test]
    fn a_replica_keeps_its_own_message_on_a_newly_retired_uid_for_the_master() {
        let mut replica = new_mailbox(&key());
        replica.messages.insert(3, rec(3, 33, 2));
        replica.uidnext = 4;
        let mut collection = fragment(&replica, Vec::new());
        collection.retired = retired(&[(2, 4)], 8);
        collection.uidnext = 6;
        let out = merge_as_replica(&mut replica, &collection, &MergeRules::default());
        assert!(out.unresolved, "the master moves it");
        assert!(replica.messages.contains_key(&3), "never dropped");
        assert_eq!(replica.uidnext, 6);
    }

    #[test]
    fn a_state_too_large_for_one_piece_carries_its_ranges_in_pieces_of_their_own() {
        let mut m = collected_mailbox();
        m.retired = Retired { ranges: (0..100u32).map(|i| (i * 3 + 1, i * 3 + 2)).collect(), collected: 8 };
        let whole = state(&key(), &m);
        let pieces = crate::limits::state_pieces(whole.clone(), 40 * crate::limits::RETIRED_RANGE_LEN);
        assert!(pieces.len() > 2);
        let mut joined = Retired::default();
        for p in &pieces {
            joined.join(&p.retired);
            assert!(p.retired.ranges.len() <= 40);
        }
        assert_eq!(joined, whole.retired);
        assert_eq!(pieces.iter().map(|p| p.messages.len()).sum::<usize>(), 2);
    }

    /// A store put back from before a collection holds copies of the collected messages;
    /// the state that names them is too large for one piece. Each name travels with the
    /// range that covers it, so every stale copy goes, as replica or as master, and none
    /// moves to a new UID.
    #[test]
    fn names_in_a_state_of_many_pieces_travel_with_their_ranges_and_drop_every_stale_copy() {
        let (live, collected_from, collected_to) = (300u32, 301u32, 700u32);
        let guid_at = |uid: Uid| 100_000 + u128::from(uid);
        let mut ours = new_mailbox(&key());
        for uid in 1..=live {
            ours.messages.insert(uid, rec(uid, guid_at(uid), 2));
        }
        ours.uidnext = collected_to + 1;
        ours.highest_modseq = 9;
        ours.retired = retired(&[(collected_from, collected_to)], 9);
        let mut restored = ours.clone();
        restored.retired = Retired::default();
        restored.highest_modseq = 5;
        for uid in collected_from..=collected_to {
            restored.messages.insert(uid, rec(uid, guid_at(uid), 3));
        }
        let mut whole = state(&key(), &ours);
        whole.tombstones =
            (collected_from..=collected_to).filter_map(|uid| whole.retired.name(uid, Guid(guid_at(uid)))).collect();
        let budget = 100 * crate::limits::TOMBSTONE_LEN;
        let pieces = crate::limits::state_pieces(whole.clone(), budget);
        assert!(pieces.iter().filter(|p| !p.retired.ranges.is_empty()).count() > 3, "the range itself is cut");
        let mut joined = Retired::default();
        for p in &pieces {
            assert!(crate::limits::state_len(p) <= budget);
            assert!(p.tombstones.iter().all(|t| p.retired.covers(t)), "a name travels with its range");
            joined.join(&p.retired);
        }
        assert_eq!(joined, whole.retired);
        assert_eq!(pieces.iter().map(|p| p.tombstones.len()).sum::<usize>(), whole.tombstones.len());
        let from_master = MergeRules { from_master: true, ..MergeRules::default() };
        let mut as_replica = restored.clone();
        let mut as_master = restored;
        // Another incarnation of the name holds those messages live (under UIDs that
        // mean nothing in ours): the names are no expunges there.
        let mut other = new_mailbox(&key());
        other.uidvalidity = ours.uidvalidity.wrapping_add(1);
        for uid in collected_from..=collected_to {
            other.messages.insert(uid - live, rec(uid - live, guid_at(uid), 1));
        }
        other.uidnext = collected_to - live + 1;
        other.highest_modseq = 1;
        for p in &pieces {
            assert!(!merge_as_replica(&mut as_replica, p, &from_master).unresolved);
            merge_as_master(&mut as_master, p, &MergeRules::default());
            merge_as_master(&mut other, p, &MergeRules::default());
        }
        let named_guids = (collected_from..=collected_to).map(|uid| Guid(guid_at(uid)));
        assert!(named_guids.clone().all(|g| other.messages.has_guid(g)), "another incarnation keeps them");
        for copy in [&as_replica, &as_master] {
            assert_eq!(copy.messages.len(), live as usize, "every stale copy dropped");
            assert_eq!(copy.messages.keys().next_back(), Some(&live), "none moved to a new UID");
            assert_eq!(copy.uidnext, collected_to + 1);
            assert!(copy.tombstones.is_empty(), "the retired UIDs stand for them");
            assert_eq!(copy.retired, whole.retired);
        }
    }
}

#[cfg(test)]
mod subscription_tests {
    use super::*;

    #[test]
    fn subscriptions_join_by_the_later_change_and_an_unsubscribe_wins_a_tie() {
        let subscribed_at = |s, u| Lifecycle { subscribed_at: s, unsubscribed_at: u, ..Lifecycle::default() };
        // Across a partition: subscribed on one side at 5, unsubscribed on the other at 7.
        let mut a = subscribed_at(5, 0);
        assert!(a.subscribed());
        assert!(a.join(&subscribed_at(0, 7)));
        assert!(!a.subscribed());
        // The same modseq on both sides: unsubscribed, whichever joins which.
        let (mut x, mut y) = (subscribed_at(6, 0), subscribed_at(0, 6));
        x.join(&subscribed_at(0, 6));
        y.join(&subscribed_at(6, 0));
        assert_eq!(x, y);
        assert!(!x.subscribed());
        // A subscription is part of the digest, so copies that differ in it resync.
        let key = MailboxKey::new("u", "INBOX");
        let mut m = new_mailbox(&key);
        let plain = digest(&m);
        m.lifecycle = subscribed_at(3, 0);
        assert_ne!(digest(&m), plain);
    }

    #[test]
    fn special_uses_join_by_the_later_stamp_and_the_larger_set_wins_a_tie() {
        let used = |bits, at| Lifecycle { special_use: SpecialUse(bits), special_use_at: at, ..Lifecycle::default() };
        assert_eq!(Lifecycle::default().special_use(), None);
        let mut a = used(32, 4);
        assert!(!a.join(&used(64, 3)), "an older use changes nothing");
        assert_eq!(a.special_use(), Some(SpecialUse(32)));
        assert!(a.join(&used(4, 9)));
        assert_eq!(a.special_use(), Some(SpecialUse(4)));
        let (mut x, mut y) = (used(2, 5), used(64, 5));
        x.join(&used(64, 5));
        y.join(&used(2, 5));
        assert_eq!(x, y);
        assert_eq!(x.special_use(), Some(SpecialUse(64)));
        assert_eq!(SpecialUse(32 | 2).names().collect::<Vec<_>>(), ["\\Archive", "\\Sent"]);
        assert_eq!(SpecialUse::named("\\sent"), Some(SpecialUse(32)));
        assert_eq!(SpecialUse::named("\\Spam"), None);
        assert!(!SpecialUse(128).is_valid());
        let key = MailboxKey::new("u", "Sent");
        let mut m = new_mailbox(&key);
        let plain = digest(&m);
        m.lifecycle = used(32, 2);
        assert_ne!(digest(&m), plain, "a special use is part of the digest");
    }
}
