//! Peer protocol messages: what servers say to each other. The wire codec (`wire`) turns
//! each of these into one IMAP-like tagged text command and back.

use crate::types::*;
use serde::{Deserialize, Serialize};

/// Hops a message may take through relaying servers before it is dropped.
pub const HOPS_MAX: u8 = 32;

/// A peer message addressed end to end. Intermediate servers relay it unchanged except
/// for `hops`, so a command can reach its target through servers with no direct link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub src: Sid,
    pub dst: Sid,
    pub hops: u8,
    pub msg: Msg,
}

/// A client write as routed to the mailbox master (seed: SAVE/COPY/EXPUNGE/STORE without
/// UID). The master answers with a `Msg::Reply` carrying the same tag.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteRequest {
    Save {
        mailbox: MailboxKey,
        guid: Guid,
        received: u64,
        flags: Vec<Flag>,
        body: Body,
        /// See [`crate::ClientRequest::Save`]'s `delivery`.
        delivery: bool,
    },
    /// COPY keeps the message's flags (RFC 3501), as the sender's client saw them.
    Copy { src: MailboxKey, src_uid: Uid, guid: Guid, dst: MailboxKey, received: u64, flags: Vec<Flag> },
    /// Messages as (UID, GUID) the way the sender's client saw them: the master acts on
    /// the GUID, so a UID that means another message at the master (before a conflict
    /// is resolved everywhere) never expunges or flags the wrong one.
    Expunge { mailbox: MailboxKey, messages: Vec<(Uid, Guid)> },
    Store {
        mailbox: MailboxKey,
        messages: Vec<(Uid, Guid)>,
        add: Vec<Flag>,
        remove: Vec<Flag>,
        /// CONDSTORE UNCHANGEDSINCE: reject messages whose modseq is above this.
        unchanged_since: Option<ModSeq>,
        /// Highest modseq of these messages as the sender knew them; the master sends
        /// current flags back for messages above it, fixing a stale sender.
        known_modseq: ModSeq,
    },
    /// A migrated message at the UID it had elsewhere: see [`crate::ClientRequest::Import`].
    Import { mailbox: MailboxKey, guid: Guid, received: u64, flags: Vec<Flag>, body: Body, uidvalidity: u32, uid: Uid },
    /// A SAVE whose client was told it failed (it timed out where it was taken): the
    /// master expunges the message if it (or the sender, `sender_ordered`) ordered it and
    /// told nobody it is stored (see `server::cancels`).
    Cancel { mailbox: MailboxKey, guid: Guid, sender_ordered: bool },
    /// IMAP CREATE and DELETE (the seed is silent; users expect them to replicate).
    Mailbox { mailbox: MailboxKey, action: MailboxAction },
    /// IMAP RENAME, ordered by the master of `from`: `to` gets every message of `from`
    /// (with its UIDVALIDITY and UIDs when `to` has no history), `from` is deleted
    /// (INBOX is emptied instead), in one step.
    Rename { from: MailboxKey, to: MailboxKey },
    /// Where the master stands on a mailbox, for a read that must show every change
    /// the master ordered before it (`ClientRequest::FreshRead`): answered with
    /// `WriteResult::Position`, changing nothing.
    Barrier { mailbox: MailboxKey },
    /// A user replica's copy of one of its user's mailboxes (or a piece of it), pushed by
    /// `tandem replicate`: joined by the master exactly as a peer's SYNC is (its conflict
    /// rules, its renumbering), with the bodies of messages the cluster may lack. A body
    /// the master neither has nor is given is answered as missing, and nothing changes.
    ///
    /// `from_cluster`: UID ranges where the replica's binding is one the cluster has
    /// held (taken from it, or pushed to it before). Such a message at a UID the master
    /// retired since, whose GUID is not live here, is one the cluster expunged (or moved)
    /// and forgot: it is dropped, not merged back in. Any other message found at a
    /// retired UID moves instead, as a server's does (it may be mail no one else has).
    Merge { state: Box<MailboxState>, bodies: Vec<(Guid, Body)>, from_cluster: Vec<(Uid, Uid)> },
}

/// What a [`WriteRequest::Mailbox`] does. DELETE expunges every message and stamps the
/// mailbox deleted; see [`Lifecycle`] for how copies agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MailboxAction {
    Create,
    /// CREATE with a special use (RFC 6154 CREATE-SPECIAL-USE): created and given the
    /// use in one step.
    CreateWithUse(SpecialUse),
    /// A migrated mailbox (`tandem import`): created, and given this UIDVALIDITY if it
    /// has no history (no UID given out, nothing expunged).
    CreateWithValidity(u32),
    Delete,
    /// IMAP SUBSCRIBE: the mailbox joins its user's subscriptions.
    Subscribe,
    /// IMAP UNSUBSCRIBE.
    Unsubscribe,
}

impl WriteRequest {
    /// The mailbox whose master must order this write.
    pub fn target(&self) -> &MailboxKey {
        match self {
            WriteRequest::Save { mailbox, .. }
            | WriteRequest::Import { mailbox, .. }
            | WriteRequest::Cancel { mailbox, .. } => mailbox,
            WriteRequest::Copy { dst, .. } => dst,
            WriteRequest::Expunge { mailbox, .. } => mailbox,
            WriteRequest::Store { mailbox, .. } => mailbox,
            WriteRequest::Mailbox { mailbox, .. } => mailbox,
            WriteRequest::Rename { from, .. } => from,
            WriteRequest::Barrier { mailbox } => mailbox,
            WriteRequest::Merge { state, .. } => &state.mailbox,
        }
    }
}

/// Why a write failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailKind {
    /// Try again later (IMAP `NO [UNAVAILABLE]`, LMTP 451). Never hides a false OK.
    Temporary,
    /// The request itself is wrong (no such message, bad mailbox).
    Permanent,
}

/// The current flags of one message, sent back to a stale STORE sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentFlags {
    pub uid: Uid,
    pub flags: Vec<Flag>,
    pub modseq: ModSeq,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteResult {
    /// `uid` 0: stored, but this server cannot show its UID yet.
    Saved {
        uidvalidity: u32,
        uid: Uid,
        guid: Guid,
    },
    Copied {
        uidvalidity: u32,
        uid: Uid,
        guid: Guid,
    },
    Expunged {
        uids: Vec<Uid>,
        modseq: ModSeq,
    },
    Stored {
        modseq: ModSeq,
        rejected: Vec<Uid>,
        current: Vec<CurrentFlags>,
    },
    Failed {
        kind: FailKind,
        reason: String,
    },
    /// CREATE or DELETE done, at this modseq.
    MailboxDone {
        modseq: ModSeq,
    },
    /// A BARRIER's answer: the mailbox's HIGHESTMODSEQ and digest at its master (both
    /// 0: no such mailbox there).
    Position {
        highest_modseq: ModSeq,
        digest: u64,
    },
    /// A `Merge` done (`modseq`: the mailbox's HIGHESTMODSEQ at the master after it), or,
    /// when `missing` is not empty, not done for want of these bodies.
    Merged {
        modseq: ModSeq,
        missing: Vec<Guid>,
    },
}

/// A change ordered by a mailbox master, replicated through the per-peer logs. Every
/// change is a piece of mailbox state, so applying it twice or late is harmless.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// A new message with its body.
    Save {
        mailbox: MailboxKey,
        uidvalidity: u32,
        record: MessageRecord,
        body: Body,
    },
    /// A new message whose body the receiver already has (or FETCHes): no body resent.
    Copy {
        mailbox: MailboxKey,
        uidvalidity: u32,
        record: MessageRecord,
    },
    Expunge {
        mailbox: MailboxKey,
        uidvalidity: u32,
        tombstones: Vec<Tombstone>,
    },
    /// Flag deltas, stamped by the master; never whole flag sets.
    Store {
        mailbox: MailboxKey,
        uidvalidity: u32,
        stamp: Stamp,
        messages: Vec<(Uid, Guid)>,
        add: Vec<Flag>,
        remove: Vec<Flag>,
    },
    /// The outcome of a merge (UID-conflict renumbering, adopted messages) as one
    /// atomic piece, so no delivery interleaves with a renumbering anywhere.
    Merge {
        state: Box<MailboxState>,
    },
}

impl Change {
    pub fn mailbox(&self) -> &MailboxKey {
        match self {
            Change::Save { mailbox, .. }
            | Change::Copy { mailbox, .. }
            | Change::Expunge { mailbox, .. }
            | Change::Store { mailbox, .. } => mailbox,
            Change::Merge { state } => &state.mailbox,
        }
    }
}

/// The tag of an MBOX that confirms a check: a replica's copy has the summary it was
/// sent. Never a catch-up's number (`JobTable::unique_number` skips it).
pub const MBOX_CONFIRMATION: u64 = u64::MAX;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Link-state flooding: `origin`'s direct neighbours, newest `seq` wins. `epoch` is
    /// the highest root epoch `origin` knows, so that a server that lost its disk never
    /// opens a term with an epoch already in use. `store` is `origin`'s store identity
    /// (see `DiskImage::store_id`): a new one tells every master that the copies
    /// `origin` acknowledged before are gone.
    LinkState {
        origin: Sid,
        seq: u64,
        epoch: u64,
        store: u64,
        neighbors: Vec<Sid>,
    },
    /// The sender's membership (see `membership`), flooded hop by hop like link state:
    /// to every neighbour when a link comes up and whenever it changes.
    /// `store` is the sender's store identity (see `DiskImage::store_id`): the first
    /// thing a neighbour hears on a new link, so that a master learns of a lost disk
    /// before anything else the new store says.
    Members {
        members: crate::membership::Membership,
        store: u64,
    },
    /// A new root term. The receiver flushes its master cache, drops its masterships
    /// and answers `Dropped`.
    Root {
        epoch: u64,
        root: Sid,
    },
    Dropped {
        epoch: u64,
    },
    /// Ask the root who masters these keys; the root answers one `MasterIs` per key.
    Who {
        epoch: u64,
        keys: Vec<MasterKey>,
    },
    /// `generation` counts the key's masters in this term; a higher one wins, so a
    /// late or repeated announcement never undoes a later move.
    MasterIs {
        epoch: u64,
        key: MasterKey,
        master: Sid,
        generation: u64,
    },
    /// Seed MASTER-MOVE: move mastership of `key` to `requester`, forwarded until it
    /// reaches the current master.
    MasterMove {
        tag: u64,
        key: MasterKey,
        requester: Sid,
    },
    /// The old master gave up `key`; `state` holds its mailboxes under that key.
    MoveDone {
        tag: u64,
        key: MasterKey,
        epoch: u64,
        generation: u64,
        states: Vec<MailboxState>,
    },
    Request {
        tag: u64,
        request: WriteRequest,
    },
    /// `record` is the message as the master stored it, for SAVE and COPY: the server
    /// that answers the client keeps the binding it shows before it shows it.
    Reply {
        tag: u64,
        master: Option<Sid>,
        result: WriteResult,
        record: Option<MessageRecord>,
    },
    /// A replicated change at position `seq` of the sender's log for the receiver.
    Change {
        seq: u64,
        change: Change,
    },
    /// The receiver is done with these changes; the sender may drop them from its log.
    /// `seqs` it made durable; `refused` it could not apply (a UID conflict it may not
    /// decide, or a flag change of a message it does not hold, settled by a SYNC with the
    /// master instead), so they count for no copy.
    /// `store` is the sender's store identity: the store that holds the copies.
    Ack {
        seqs: Vec<u64>,
        refused: Vec<u64>,
        store: u64,
    },
    /// Ask for the summaries of every mailbox under `key` (a new master catching up).
    MboxRequest {
        tag: u64,
        key: MasterKey,
    },
    /// Seed MBOX: one mailbox's summary. `tag` is 0 for a check (a master's, or a
    /// replica's before a fresh read), [`MBOX_CONFIRMATION`] for a replica's answer
    /// that its copy is the same (never answered in turn), and a catch-up's number
    /// otherwise.
    Mbox {
        tag: u64,
        summary: Summary,
    },
    /// The answer to `MboxRequest` once every `Mbox` has been sent.
    MboxDone {
        tag: u64,
        count: u32,
    },
    /// Seed SYNC: a whole mailbox. `reply` is false for the first half of an exchange.
    Sync {
        reply: bool,
        state: MailboxState,
    },
    /// A piece of a mailbox state too large for one SYNC line: merged like a log
    /// fragment and answered by nothing; the SYNC that follows carries the rest.
    SyncPart {
        state: MailboxState,
    },
    /// Seed FETCH: ask for a body.
    Fetch {
        guid: Guid,
    },
    /// FETCH's answer.
    Body {
        guid: Guid,
        checksum: u64,
        body: Body,
    },
    /// FETCH's answer when the server holds no intact copy.
    NoBody {
        guid: Guid,
    },
    /// A peer's input was refused. Sent back instead of acting on it.
    Error {
        text: String,
    },
}

impl Msg {
    /// The command name on the wire and in traces.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::LinkState { .. } => "LINKSTATE",
            Msg::Members { .. } => "MEMBERS",
            Msg::Root { .. } => "ROOT",
            Msg::Dropped { .. } => "DROPPED",
            Msg::Who { .. } => "WHO",
            Msg::MasterIs { .. } => "MASTER",
            Msg::MasterMove { .. } => "MASTER-MOVE",
            Msg::MoveDone { .. } => "MOVED",
            Msg::Request { request, .. } => match request {
                WriteRequest::Save { .. } => "SAVE",
                WriteRequest::Import { .. } => "IMPORT",
                WriteRequest::Cancel { .. } => "CANCEL",
                WriteRequest::Copy { .. } => "COPY",
                WriteRequest::Expunge { .. } => "EXPUNGE",
                WriteRequest::Store { .. } => "STORE",
                WriteRequest::Mailbox { .. } => "MAILBOX",
                WriteRequest::Rename { .. } => "RENAME",
                WriteRequest::Barrier { .. } => "BARRIER",
                WriteRequest::Merge { .. } => "MERGE",
            },
            Msg::Reply { .. } => "REPLY",
            Msg::Change { change, .. } => match change {
                Change::Save { .. } => "R-SAVE",
                Change::Copy { .. } => "R-COPY",
                Change::Expunge { .. } => "R-EXPUNGE",
                Change::Store { .. } => "R-STORE",
                Change::Merge { .. } => "R-MERGE",
            },
            Msg::Ack { .. } => "ACK",
            Msg::MboxRequest { .. } => "MBOX-REQ",
            Msg::Mbox { .. } => "MBOX",
            Msg::MboxDone { .. } => "MBOX-DONE",
            Msg::Sync { .. } => "SYNC",
            Msg::SyncPart { .. } => "SYNC-PART",
            Msg::Fetch { .. } => "FETCH",
            Msg::Body { .. } => "BODY",
            Msg::NoBody { .. } => "NOBODY",
            Msg::Error { .. } => "ERROR",
        }
    }
}
