//! Limits on what a client may ask for and on what a peer may say, so that replication
//! never builds a command the peer's decoder must refuse (see `wire::LINE_LEN_MAX`) and
//! no peer-supplied number can overflow the arithmetic done on it.
//!
//! The client-facing limits are exported so that the node can refuse a request earlier,
//! with an IMAP error; the core refuses it too, with a permanent failure.

use crate::msg::*;
use crate::types::*;

pub use crate::types::FLAG_LEN_MAX;

/// Longest mailbox name in bytes.
pub const MAILBOX_NAME_LEN_MAX: usize = 1024;
/// Most levels of a mailbox name (parts separated by `/`).
pub const MAILBOX_DEPTH_MAX: usize = 64;
/// Longest user name in bytes.
pub const USER_LEN_MAX: usize = 256;
/// Most flags in each of a STORE's add and remove lists, and in a SAVE.
pub const FLAGS_PER_REQUEST_MAX: usize = 256;
/// Most distinct flags a message may carry (set or cleared: cleared ones keep their
/// stamp), so that one message record always fits a command line.
pub const FLAGS_PER_MESSAGE_MAX: usize = 1024;
/// Most messages one client STORE or EXPUNGE may name.
pub const UIDS_PER_REQUEST_MAX: usize = 1_000_000;
/// Most messages in one forwarded STORE/EXPUNGE and in one replicated R-STORE or
/// R-EXPUNGE: bigger requests are forwarded in parts and bigger changes logged in parts.
/// Sized by the test `maximal_parts_fit_a_line` (a maximal R-EXPUNGE is ~60% of a line).
pub const UIDS_PER_CHANGE_MAX: usize = 8192;
/// A piece of mailbox state (R-MERGE, SYNC-PART, MOVED) is cut at this estimated size.
pub const STATE_PIECE_LEN_MAX: usize = crate::wire::LINE_LEN_MAX / 2;

/// Largest UID a peer may name (UIDNEXT one above): room is left above it for
/// renumbering, and a master refuses to assign UIDs beyond it.
pub const UID_MAX: Uid = u32::MAX - (1 << 24);
/// Largest modseq a peer may send.
pub const MODSEQ_MAX: ModSeq = 1 << 62;
/// Largest epoch a peer may send: rounds up to 2^40 (the low bits hold the root's id).
pub const EPOCH_MAX: u64 = (1 << (40 + crate::server::EPOCH_SID_BITS)) - 1;
/// Largest link-state sequence number and master generation a peer may send.
pub const COUNTER_MAX: u64 = 1 << 62;

/// Why a client's mailbox name is refused, if it is.
pub fn check_mailbox(key: &MailboxKey) -> Result<(), String> {
    // Bytes first (every peer change is checked): an ASCII name needs no decoding, and
    // only a name with other characters is looked at for C1 controls.
    let has_control = |text: &str| {
        text.bytes().any(|b| b.is_ascii_control()) || (!text.is_ascii() && text.chars().any(char::is_control))
    };
    if key.user.is_empty() || key.name.is_empty() || has_control(&key.user) || has_control(&key.name) {
        return Err(format!("bad mailbox name {key:?}"));
    }
    if key.user.len() > USER_LEN_MAX {
        return Err(format!("user name longer than {USER_LEN_MAX} bytes"));
    }
    if key.name.len() > MAILBOX_NAME_LEN_MAX {
        return Err(format!("mailbox name longer than {MAILBOX_NAME_LEN_MAX} bytes"));
    }
    if key.name.bytes().filter(|b| *b == b'/').count() + 1 > MAILBOX_DEPTH_MAX {
        return Err(format!("mailbox name deeper than {MAILBOX_DEPTH_MAX} levels"));
    }
    Ok(())
}

/// Why a client's write request is refused, if it is.
pub fn check_request(request: &WriteRequest) -> Result<(), String> {
    const BODY_LEN_MAX: usize = crate::wire::LITERAL_LEN_MAX;
    check_mailbox(request.target())?;
    match request {
        WriteRequest::Save { body, flags, .. } | WriteRequest::Import { body, flags, .. } => {
            if body.len() > BODY_LEN_MAX {
                return Err("message too large".into());
            }
            check_flags(flags)
        }
        WriteRequest::Copy { src, flags, .. } => {
            check_mailbox(src)?;
            check_flags(flags)
        }
        WriteRequest::Rename { from, to } => {
            check_mailbox(to)?;
            if from.user != to.user {
                return Err("a mailbox is renamed within its user".into());
            }
            if from == to {
                return Err("a mailbox cannot be renamed to itself".into());
            }
            if &*to.name == "INBOX" {
                return Err("nothing can be renamed to INBOX".into());
            }
            if to.name.starts_with(&format!("{}/", from.name)) {
                return Err("a mailbox cannot be renamed under itself".into());
            }
            Ok(())
        }
        WriteRequest::Merge { state, bodies, from_cluster } => {
            check_adopted_state(state, bodies)?;
            check_uid_ranges(from_cluster)
        }
        WriteRequest::Expunge { messages, .. } if messages.len() > UIDS_PER_REQUEST_MAX => {
            Err("too many UIDs in one request".into())
        }
        WriteRequest::Store { messages, add, remove, .. } => {
            if messages.len() > UIDS_PER_REQUEST_MAX {
                return Err("too many UIDs in one request".into());
            }
            check_flags(add)?;
            check_flags(remove)
        }
        _ => Ok(()),
    }
}

/// Bodies one user replica's push or adopt carries at most, and their bytes at most
/// (its agent sends more in further requests; one body alone may be as large as any).
pub const REPLICA_PUSH_BODIES_MAX: usize = 1024;
pub const REPLICA_PUSH_BYTES_MAX: usize = 2 * crate::wire::LITERAL_LEN_MAX;

/// A mailbox state and bodies a user replica's agent sends (a push to the cluster, an
/// adopt by the replica) within the limits a peer's SYNC has, and bounded bodies.
pub fn check_adopted_state(state: &MailboxState, bodies: &[(Guid, Body)]) -> Result<(), String> {
    check_mailbox(&state.mailbox)?;
    check_state(state).map_err(|e| e.to_string())?;
    if state.messages.len().saturating_add(state.tombstones.len()) > UIDS_PER_REQUEST_MAX {
        return Err("too many messages in one state".into());
    }
    if bodies.len() > REPLICA_PUSH_BODIES_MAX {
        return Err("too many bodies in one request".into());
    }
    if bodies.iter().any(|(_, b)| b.len() > crate::wire::LITERAL_LEN_MAX) {
        return Err("message too large".into());
    }
    if bodies.iter().map(|(_, b)| b.len()).fold(0usize, usize::saturating_add) > REPLICA_PUSH_BYTES_MAX {
        return Err("too many bytes of bodies in one request".into());
    }
    Ok(())
}

/// UID ranges a user replica names (see `WriteRequest::Merge`): bounded, each running
/// upwards within the UID space.
pub fn check_uid_ranges(ranges: &[(Uid, Uid)]) -> Result<(), String> {
    if ranges.len() > UIDS_PER_REQUEST_MAX {
        return Err("too many UID ranges in one request".into());
    }
    if ranges.iter().any(|&(first, last)| first == 0 || first > last || last > UID_MAX) {
        return Err("a UID range must run upwards from 1 within the UID space".into());
    }
    Ok(())
}

fn check_flags(flags: &[Flag]) -> Result<(), String> {
    if flags.len() > FLAGS_PER_REQUEST_MAX {
        return Err(format!("more than {FLAGS_PER_REQUEST_MAX} flags in one request"));
    }
    Ok(())
}

/// Why a peer's message is refused at receipt, if it is: a number beyond what the
/// protocol can reach (so arithmetic on it could overflow), or a mailbox no client
/// could have created. Lists are bounded by the decoder already.
pub fn check_peer_msg(msg: &Msg) -> Result<(), &'static str> {
    let epoch = |e: u64| if e > EPOCH_MAX { Err("epoch out of range") } else { Ok(()) };
    let counter = |c: u64| if c > COUNTER_MAX { Err("counter out of range") } else { Ok(()) };
    match msg {
        Msg::LinkState { seq, epoch: e, .. } => {
            counter(*seq)?;
            epoch(*e)
        }
        // Bounded as it is read (`Membership::join_member` drops entries past the limits).
        Msg::Members { members, .. } => {
            if members.len() > crate::membership::MEMBERS_MAX {
                Err("too many members")
            } else {
                Ok(())
            }
        }
        Msg::Root { epoch: e, .. } | Msg::Dropped { epoch: e } => epoch(*e),
        Msg::Who { epoch: e, keys } => {
            epoch(*e)?;
            keys.iter().try_for_each(check_key)
        }
        Msg::MasterIs { epoch: e, key, generation, .. } => {
            epoch(*e)?;
            counter(*generation)?;
            check_key(key)
        }
        Msg::MasterMove { key, .. } | Msg::MboxRequest { key, .. } => check_key(key),
        Msg::MoveDone { key, epoch: e, generation, states, .. } => {
            epoch(*e)?;
            counter(*generation)?;
            check_key(key)?;
            states.iter().try_for_each(check_state)
        }
        Msg::Request { request, .. } => check_request(request).map_err(|_| "request beyond the limits"),
        Msg::Reply { result, record, .. } => {
            if let Some(r) = record {
                check_record(r)?;
            }
            match result {
                WriteResult::Saved { uid, .. } | WriteResult::Copied { uid, .. } => check_uid(*uid),
                WriteResult::Expunged { modseq, .. }
                | WriteResult::MailboxDone { modseq }
                | WriteResult::Position { highest_modseq: modseq, .. }
                | WriteResult::Merged { modseq, .. } => check_modseq(*modseq),
                WriteResult::Stored { modseq, current, .. } => {
                    check_modseq(*modseq)?;
                    current.iter().try_for_each(|c| check_modseq(c.modseq))
                }
                WriteResult::Failed { .. } => Ok(()),
            }
        }
        Msg::Change { change, .. } => check_change(change),
        Msg::Mbox { summary, .. } => {
            check_peer_mailbox(&summary.mailbox)?;
            check_uidnext(summary.uidnext)?;
            check_modseq(summary.highest_modseq)
        }
        Msg::Sync { state, .. } | Msg::SyncPart { state } => check_state(state),
        Msg::Ack { .. }
        | Msg::MboxDone { .. }
        | Msg::Fetch { .. }
        | Msg::Body { .. }
        | Msg::NoBody { .. }
        | Msg::Error { .. } => Ok(()),
    }
}

/// A replicated change within the limits (see [`check_peer_msg`]).
pub fn check_change(change: &Change) -> Result<(), &'static str> {
    check_peer_mailbox(change.mailbox())?;
    match change {
        Change::Save { record, .. } | Change::Copy { record, .. } => check_record(record),
        Change::Expunge { tombstones, .. } => tombstones.iter().try_for_each(check_tombstone),
        Change::Store { stamp, messages, .. } => {
            check_modseq(stamp.modseq)?;
            messages.iter().try_for_each(|(uid, _)| check_uid(*uid))
        }
        Change::Merge { state } => check_state(state),
    }
}

fn check_peer_mailbox(key: &MailboxKey) -> Result<(), &'static str> {
    check_mailbox(key).map_err(|_| "mailbox name beyond the limits")
}

fn check_key(key: &MasterKey) -> Result<(), &'static str> {
    match key {
        MasterKey::Mailbox(k) => check_peer_mailbox(k),
        MasterKey::User(u) | MasterKey::Domain(u) if u.len() > USER_LEN_MAX => Err("user name beyond the limits"),
        _ => Ok(()),
    }
}

fn check_uid(uid: Uid) -> Result<(), &'static str> {
    if uid > UID_MAX { Err("UID out of range") } else { Ok(()) }
}

fn check_uidnext(uidnext: Uid) -> Result<(), &'static str> {
    if uidnext > UID_MAX + 1 { Err("UIDNEXT out of range") } else { Ok(()) }
}

fn check_modseq(modseq: ModSeq) -> Result<(), &'static str> {
    if modseq > MODSEQ_MAX { Err("modseq out of range") } else { Ok(()) }
}

fn check_record(r: &MessageRecord) -> Result<(), &'static str> {
    check_uid(r.uid)?;
    check_modseq(r.modseq)?;
    if r.flags.len() > FLAGS_PER_MESSAGE_MAX {
        return Err("too many flags on a message");
    }
    r.flags.values().try_for_each(|s| check_modseq(s.stamp.modseq))
}

fn check_tombstone(t: &Tombstone) -> Result<(), &'static str> {
    check_uid(t.uid)?;
    check_modseq(t.modseq)
}

fn check_state(s: &MailboxState) -> Result<(), &'static str> {
    check_peer_mailbox(&s.mailbox)?;
    check_uidnext(s.uidnext)?;
    check_modseq(s.highest_modseq)?;
    check_modseq(s.lifecycle.created_at)?;
    check_modseq(s.lifecycle.deleted_at)?;
    check_modseq(s.lifecycle.special_use_at)?;
    s.messages.iter().try_for_each(check_record)?;
    s.tombstones.iter().try_for_each(check_tombstone)?;
    check_modseq(s.retired.collected)?;
    s.retired.ranges.iter().try_for_each(|(first, last)| {
        check_uid(*first)?;
        check_uid(*last)
    })
}

/// A generous estimate of a message record's command text (numbers, GUID, flags with
/// their stamps).
pub fn record_len(r: &MessageRecord) -> usize {
    160 + r.flags.keys().map(|f| f.as_str().len() + 64).sum::<usize>()
}

/// A generous estimate of a tombstone's command text.
pub const TOMBSTONE_LEN: usize = 96;

/// A generous estimate of a retired UID range's command text.
pub const RETIRED_RANGE_LEN: usize = 32;

/// A generous estimate of a mailbox state's command text, without its meta.
pub fn state_len(state: &MailboxState) -> usize {
    state.messages.iter().map(record_len).sum::<usize>()
        + state.tombstones.len() * TOMBSTONE_LEN
        + state.retired.ranges.len() * RETIRED_RANGE_LEN
}

/// Cuts a mailbox state into pieces whose estimated text is at most `budget` (each
/// with at least one item, each carrying the state's meta). A tombstone travels in the
/// piece of the record with its GUID (a retired binding with the binding that replaces
/// it, so a replica can apply each piece on its own); a tombstone the state's retired
/// UIDs cover (a collected binding it names, `Server::name_collected`) in the piece of
/// the range that covers it, so that it is never taken for a client's expunge ahead of
/// its range; the other tombstones follow the records. A state within the budget stays
/// one piece.
pub fn state_pieces(mut state: MailboxState, budget: usize) -> Vec<MailboxState> {
    if state_len(&state) <= budget {
        return vec![state];
    }
    // Retired ranges go in pieces of their own after the rest (they are joined, so any
    // share of them is right to apply alone), with the names they cover.
    let retired = std::mem::take(&mut state.retired);
    let live: std::collections::BTreeSet<Guid> = state.messages.iter().map(|r| r.guid).collect();
    let (mut named, rest): (Vec<Tombstone>, Vec<Tombstone>) =
        std::mem::take(&mut state.tombstones).into_iter().partition(|t| retired.covers(t) && !live.contains(&t.guid));
    state.tombstones = rest;
    named.sort_by_key(|t| (t.uid, t.guid));
    // The meta without a copy of the records (a large state's).
    let meta = MailboxState {
        mailbox: state.mailbox.clone(),
        uidvalidity: state.uidvalidity,
        uidnext: state.uidnext,
        highest_modseq: state.highest_modseq,
        messages: Vec::new(),
        tombstones: Vec::new(),
        lifecycle: state.lifecycle,
        retired: Retired::default(),
    };
    let mut range_pieces = ranges_pieces(&retired, named, &meta, budget);
    if state.messages.is_empty() && state.tombstones.is_empty() {
        return range_pieces;
    }
    let mut pieces = records_pieces(state, budget);
    pieces.append(&mut range_pieces);
    debug_assert!(
        pieces
            .iter()
            .flat_map(|p| p.tombstones.iter().map(move |t| (p, t)))
            .all(|(p, t)| !retired.covers(t) || p.retired.covers(t) || live.contains(&t.guid)),
        "a name travels in the piece of the range that covers it"
    );
    pieces
}

/// Pieces of retired ranges, each with the tombstones its ranges cover (`named`, sorted
/// by UID). A range whose names pass the budget is cut between two UIDs: a share of a
/// range is as right to apply alone as the whole.
fn ranges_pieces(retired: &Retired, named: Vec<Tombstone>, meta: &MailboxState, budget: usize) -> Vec<MailboxState> {
    // Units: a share of a range with the names it covers, each within the budget (but
    // for the names of one UID, which are never parted).
    let mut units: Vec<(Uid, Uid, Vec<Tombstone>)> = Vec::new();
    let mut names = named.into_iter().peekable();
    for (&first, &last) in &retired.ranges {
        let mut unit: (Uid, Uid, Vec<Tombstone>) = (first, last, Vec::new());
        while let Some(t) = names.next_if(|t| t.uid <= last) {
            debug_assert!(t.uid >= first, "a name is covered by the range it travels with");
            let mut at_uid = vec![t];
            while let Some(same) = names.next_if(|n| n.uid == t.uid) {
                at_uid.push(same);
            }
            let len = RETIRED_RANGE_LEN + (unit.2.len() + at_uid.len()) * TOMBSTONE_LEN;
            if !unit.2.is_empty() && len > budget {
                let rest = (t.uid, last, Vec::new());
                unit.1 = t.uid - 1;
                units.push(std::mem::replace(&mut unit, rest));
            }
            unit.2.extend(at_uid);
        }
        units.push(unit);
    }
    debug_assert!(names.next().is_none(), "every name is covered by a range");
    let empty_piece = || MailboxState {
        retired: Retired { ranges: Default::default(), collected: retired.collected },
        ..meta.clone()
    };
    let mut pieces = Vec::new();
    let mut piece = empty_piece();
    let mut used = 0;
    for (first, last, names) in units {
        let len = RETIRED_RANGE_LEN + names.len() * TOMBSTONE_LEN;
        // At least one unit per piece, so that every piece makes progress.
        if used > 0 && used + len > budget {
            pieces.push(std::mem::replace(&mut piece, empty_piece()));
            used = 0;
        }
        used += len;
        piece.retired.insert_range(first, last);
        piece.tombstones.extend(names);
    }
    if used > 0 {
        pieces.push(piece);
    }
    pieces
}

fn records_pieces(mut state: MailboxState, budget: usize) -> Vec<MailboxState> {
    let tombstones = std::mem::take(&mut state.tombstones);
    let mut by_guid: std::collections::BTreeMap<Guid, Vec<usize>> = std::collections::BTreeMap::new();
    for (i, t) in tombstones.iter().enumerate() {
        by_guid.entry(t.guid).or_default().push(i);
    }
    // Units: a record with the tombstones of its GUID, then each other tombstone.
    let mut taken = vec![false; tombstones.len()];
    let mut units: Vec<(Option<MessageRecord>, Vec<Tombstone>)> = Vec::new();
    for r in std::mem::take(&mut state.messages) {
        let ts: Vec<Tombstone> = by_guid
            .remove(&r.guid)
            .unwrap_or_default()
            .into_iter()
            .map(|i| {
                taken[i] = true;
                tombstones[i]
            })
            .collect();
        units.push((Some(r), ts));
    }
    units.extend(tombstones.iter().zip(&taken).filter(|(_, t)| !**t).map(|(t, _)| (None, vec![*t])));
    let unit_len = |u: &(Option<MessageRecord>, Vec<Tombstone>)| {
        u.0.as_ref().map(record_len).unwrap_or(0) + u.1.len() * TOMBSTONE_LEN
    };
    let mut pieces = Vec::new();
    let mut piece = MailboxState { messages: Vec::new(), tombstones: Vec::new(), ..state.clone() };
    let mut used = 0;
    for unit in units {
        let len = unit_len(&unit);
        // At least one unit per piece, so that every piece makes progress.
        if used > 0 && used + len > budget {
            pieces.push(std::mem::replace(
                &mut piece,
                MailboxState { messages: Vec::new(), tombstones: Vec::new(), ..state.clone() },
            ));
            used = 0;
        }
        used += len;
        piece.messages.extend(unit.0);
        piece.tombstones.extend(unit.1);
    }
    pieces.push(piece);
    pieces
}

/// Cuts a change into parts that each fit a command line: R-STORE and R-EXPUNGE by
/// [`UIDS_PER_CHANGE_MAX`] messages, R-MERGE by [`STATE_PIECE_LEN_MAX`]. Every part
/// keeps the change's stamp and meta, so applying the parts is applying the change.
pub fn change_parts(change: Change) -> Vec<Change> {
    match change {
        Change::Store { mailbox, uidvalidity, stamp, messages, add, remove }
            if messages.len() > UIDS_PER_CHANGE_MAX =>
        {
            messages
                .chunks(UIDS_PER_CHANGE_MAX)
                .map(|chunk| Change::Store {
                    mailbox: mailbox.clone(),
                    uidvalidity,
                    stamp,
                    messages: chunk.to_vec(),
                    add: add.clone(),
                    remove: remove.clone(),
                })
                .collect()
        }
        Change::Expunge { mailbox, uidvalidity, tombstones } if tombstones.len() > UIDS_PER_CHANGE_MAX => tombstones
            .chunks(UIDS_PER_CHANGE_MAX)
            .map(|chunk| Change::Expunge { mailbox: mailbox.clone(), uidvalidity, tombstones: chunk.to_vec() })
            .collect(),
        Change::Merge { state } => state_pieces(*state, STATE_PIECE_LEN_MAX)
            .into_iter()
            .map(|state| Change::Merge { state: Box::new(state) })
            .collect(),
        change => vec![change],
    }
}

/// An upper bound of a change's command text (binding line included), cheap to compute:
/// when it is within half a line the change surely fits and needs no trial encoding.
pub fn change_len_bound(change: &Change) -> usize {
    let key = change.mailbox();
    let head = 256 + 2 * (key.user.len() + key.name.len());
    let flags = |fs: &[Flag]| fs.iter().map(|f| f.as_str().len() + 1).sum::<usize>();
    head + match change {
        Change::Save { record, .. } | Change::Copy { record, .. } => record_len(record),
        Change::Expunge { tombstones, .. } => tombstones.len() * TOMBSTONE_LEN,
        Change::Store { messages, add, remove, .. } => messages.len() * 64 + flags(add) + flags(remove),
        Change::Merge { state } => {
            state.messages.iter().map(record_len).sum::<usize>() + state.tombstones.len() * TOMBSTONE_LEN
        }
    }
}

/// Whether a change can go to a peer as one command (see `wire::fits`).
pub fn change_fits(change: &Change) -> bool {
    change_len_bound(change) <= crate::wire::LINE_LEN_MAX / 2
        || crate::wire::fits(&Envelope {
            src: Sid(u32::MAX),
            dst: Sid(u32::MAX),
            hops: HOPS_MAX,
            msg: Msg::Change { seq: u64::MAX, change: change.clone() },
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A state of `records` (UIDs 1.., GUIDs 1..), tombstones of some of their GUIDs and
    /// of others past them, and retired `ranges` (past every record and tombstone, at
    /// `collected` 50) whose `named` UIDs carry names (one or two GUIDs each).
    fn a_state(records: u32, expunged: &[(u32, bool)], ranges: &[(u32, u32)], named: &[(u32, bool)]) -> MailboxState {
        let mut state = MailboxState::empty(MailboxKey::new("u@d", "INBOX"), 7);
        state.messages = (1..=records).map(|uid| MessageRecord::bare(uid, u128::from(uid), 3)).collect();
        let first_free = records + 1;
        for (i, &(n, of_a_record)) in expunged.iter().enumerate() {
            // A retirement of a record's GUID (a renumbering), or a plain expunge.
            let uid = first_free + i as u32;
            let t = if of_a_record && records > 0 {
                Tombstone::retirement(uid, Guid(u128::from(1 + n % records)), 4)
            } else {
                Tombstone::expunge(uid, Guid(10_000 + u128::from(uid)), 4)
            };
            state.tombstones.push(t);
        }
        let base = first_free + expunged.len() as u32 + 1;
        let mut at = base;
        for &(gap, len) in ranges {
            let first = at + gap + 1;
            state.retired.insert_range(first, first + len);
            at = first + len + 1;
        }
        state.retired.collected = 50;
        let retired: Vec<Uid> = state.retired.ranges.iter().flat_map(|(first, last)| *first..=*last).collect();
        for &(pick, twice) in named {
            if retired.is_empty() {
                break;
            }
            let uid = retired[pick as usize % retired.len()];
            for guid in [u128::from(uid) * 10, u128::from(uid) * 10 + 1].into_iter().take(1 + usize::from(twice)) {
                if let Some(t) = state.retired.name(uid, Guid(guid))
                    && !state.tombstones.contains(&t)
                {
                    state.tombstones.push(t);
                }
            }
        }
        state.uidnext = at + 1;
        state.highest_modseq = 60;
        state.lifecycle.created_at = 2;
        state
    }

    fn sorted<T: Ord + Clone>(items: impl IntoIterator<Item = T>) -> Vec<T> {
        let mut v: Vec<T> = items.into_iter().collect();
        v.sort();
        v
    }

    proptest! {
        /// Cut into pieces, a state loses and repeats nothing, each piece fits (the
        /// budget holds every unit), carries the meta, and each name travels with the
        /// range that covers it.
        #[test]
        fn pieces_hold_the_whole_state_and_names_travel_with_their_ranges(
            records in 0u32..40,
            expunged in prop::collection::vec((0u32..100, any::<bool>()), 0..12),
            ranges in prop::collection::vec((0u32..4, 0u32..30), 0..8),
            named in prop::collection::vec((0u32..1000, any::<bool>()), 0..60),
            budget_units in 14usize..40,
        ) {
            let whole = a_state(records, &expunged, &ranges, &named);
            let budget = budget_units * TOMBSTONE_LEN;
            let pieces = state_pieces(whole.clone(), budget);
            if state_len(&whole) <= budget {
                prop_assert_eq!(&pieces, &vec![whole.clone()]);
            }
            prop_assert!(!pieces.is_empty());
            let mut joined = Retired::default();
            for p in &pieces {
                prop_assert!(state_len(p) <= budget, "a piece over budget: {}", state_len(p));
                let items = p.messages.len() + p.tombstones.len() + p.retired.ranges.len();
                prop_assert!(items > 0 || pieces.len() == 1, "an empty piece");
                prop_assert_eq!(
                    (&p.mailbox, p.uidvalidity, p.uidnext, p.highest_modseq, p.lifecycle),
                    (&whole.mailbox, whole.uidvalidity, whole.uidnext, whole.highest_modseq, whole.lifecycle)
                );
                prop_assert!(p.retired.well_formed());
                for t in p.tombstones.iter().filter(|t| whole.retired.covers(t)) {
                    prop_assert!(p.retired.covers(t), "name {:?} ahead of its range", t);
                }
                joined.join(&p.retired);
            }
            if !whole.retired.ranges.is_empty() {
                prop_assert_eq!(&joined, &whole.retired);
            }
            prop_assert_eq!(
                sorted(pieces.iter().flat_map(|p| p.messages.iter().map(|r| r.uid))),
                sorted(whole.messages.iter().map(|r| r.uid))
            );
            prop_assert_eq!(
                sorted(pieces.iter().flat_map(|p| p.tombstones.iter().map(|t| (t.uid, t.guid)))),
                sorted(whole.tombstones.iter().map(|t| (t.uid, t.guid)))
            );
        }
    }
}
