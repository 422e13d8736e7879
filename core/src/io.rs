//! What enters and leaves a [`crate::Server`]: the sans-IO contract of DESIGN.md.

use crate::msg::*;
use crate::store::StoreWrite;
use crate::types::*;
use serde::{Deserialize, Serialize};

/// Identifies one client request at one server; chosen by the caller.
pub type RequestId = u64;
/// Position of a durable write in the server's write stream (1, 2, 3, ...).
pub type WriteId = u64;

/// A server's configuration. Every limit has a value; nothing is unbounded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub sid: Sid,
    /// Every server of the cluster, this one included.
    pub servers: Vec<Sid>,
    pub durability: Durability,
    /// Extra durable copies a SAVE/COPY waits for in sync mode.
    pub replicas: u8,
    /// Entries per peer replication log before mailboxes are marked for SYNC.
    pub log_capacity: usize,
    pub granularity: Granularity,
    /// A client request not answered by then gets a temporary failure.
    pub request_timeout_us: u64,
    /// How often work that nothing announces is polled while it waits (requests queued
    /// for a master, a root term opening, catch-ups, bodies wanted), and how soon a
    /// resend that could not go is tried again. An idle server is not woken by it.
    pub tick_us: u64,
    /// The maintenance period (anti-entropy, reminders, scrub, body collection), and how
    /// long a log entry waits for its acknowledgement before it is sent again.
    pub anti_entropy_us: u64,
    /// Requests queued at one server waiting for a master or a root.
    pub pending_max: usize,
    /// How long every other server must have shown a mailbox master the same copy of a
    /// mailbox, with nothing of it in any replication log, before the master collects
    /// its tombstones: longer than any message can stay on its way (a relay, a resend),
    /// so that no copy of an expunged message still travels when its tombstone goes.
    pub tombstone_grace_us: u64,
    /// How long a server that just started waits to hear its peers before it opens a
    /// root term alone (or with part of the cluster): its links come up and their link
    /// states arrive within a few link latencies, and a server that became root of
    /// itself in that moment would master mailboxes from its own, maybe stale or empty,
    /// disk and give out UIDs the rest of the cluster had already given. The hold ends
    /// as soon as every configured server is reachable; a term another server opens is
    /// accepted during it. Requests wait meanwhile (as for any master).
    #[serde(default = "Config::startup_hold_us_default")]
    pub startup_hold_us: u64,
    /// How long a `ClientRequest::FreshRead` may wait for its master's position and for
    /// this server's copy to reach it before it is answered from what is here (or
    /// refused, from a copy still being filled: see `server::filling`).
    #[serde(default = "Config::fresh_read_us_default")]
    pub fresh_read_us: u64,
    /// A SAVE whose bytes equal a live message's in the same mailbox, received within
    /// this many seconds of it, is answered with that message instead of stored again:
    /// an MTA or a client retrying after a timeout whose first attempt was stored after
    /// all (see `Server::master_save`). 0 turns it off.
    #[serde(default = "Config::retry_window_s_default")]
    pub retry_window_s: u64,
    /// This server is one user's personal replica (a laptop's store, kept in sync by
    /// `tandem replicate`), a cluster of its own: it takes the cluster's copy of a
    /// mailbox with `ClientRequest::ReplicaAdopt`, which a cluster server refuses.
    #[serde(default)]
    pub user_replica: bool,
    /// A user replica that holds only part of its user's mail (see [`crate::partial`]);
    /// None (or a cluster server): all of it.
    #[serde(default)]
    pub partial: Option<crate::partial::Partial>,
    /// A deliberately broken variant, for tests of the oracle only.
    #[cfg(feature = "broken")]
    #[serde(default)]
    pub bug: Option<crate::Bug>,
}

impl Config {
    /// Switches a deliberately broken variant on (tests of the oracle only). Refused in a
    /// build without the `broken` feature.
    pub fn set_bug(&mut self, bug: Option<crate::Bug>) -> Result<(), crate::Error> {
        #[cfg(feature = "broken")]
        {
            self.bug = bug;
            Ok(())
        }
        #[cfg(not(feature = "broken"))]
        match bug {
            None => Ok(()),
            Some(b) => Err(crate::Error::BadRequest(format!(
                "bug {} needs tandem-core built with the broken feature",
                b.name()
            ))),
        }
    }

    /// Two seconds: a connection and a link-state exchange take milliseconds on a LAN
    /// and well under a second between continents; far below a request's timeout.
    pub const STARTUP_HOLD_US_DEFAULT: u64 = 2_000_000;

    fn startup_hold_us_default() -> u64 {
        Config::STARTUP_HOLD_US_DEFAULT
    }

    /// One second: a round trip to the master and a replica's apply take milliseconds;
    /// a SELECT held longer would feel broken, and after it the client sees what this
    /// server has.
    pub const FRESH_READ_US_DEFAULT: u64 = 1_000_000;

    fn fresh_read_us_default() -> u64 {
        Config::FRESH_READ_US_DEFAULT
    }

    /// A day: MTAs retry a temporary failure for days, most within hours.
    pub const RETRY_WINDOW_S_DEFAULT: u64 = 86_400;

    fn retry_window_s_default() -> u64 {
        Config::RETRY_WINDOW_S_DEFAULT
    }

    pub fn new(sid: Sid, servers: Vec<Sid>) -> Config {
        Config {
            sid,
            servers,
            durability: Durability::Sync,
            replicas: 1,
            log_capacity: 10_000,
            granularity: Granularity::Mailbox,
            request_timeout_us: 5_000_000,
            tick_us: 50_000,
            anti_entropy_us: 1_000_000,
            pending_max: 100_000,
            tombstone_grace_us: 60_000_000,
            startup_hold_us: Config::STARTUP_HOLD_US_DEFAULT,
            fresh_read_us: Config::FRESH_READ_US_DEFAULT,
            retry_window_s: Config::RETRY_WINDOW_S_DEFAULT,
            user_replica: false,
            partial: None,
            #[cfg(feature = "broken")]
            bug: None,
        }
    }
}

/// A request from a mail client (IMAP/LMTP front end, admin CLI, or the simulator).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    Save {
        mailbox: MailboxKey,
        received: u64,
        flags: Vec<Flag>,
        body: Body,
        /// A delivery (LMTP), which an MTA retries after a temporary failure: the master
        /// answers one with the message its first attempt stored, if it was stored after
        /// all (see `Config::retry_window_s`). An IMAP APPEND is not one: RFC 3501 makes
        /// each APPEND a new message, even of the same bytes.
        delivery: bool,
    },
    Copy {
        src: MailboxKey,
        src_uid: Uid,
        dst: MailboxKey,
    },
    Expunge {
        mailbox: MailboxKey,
        uids: Vec<Uid>,
    },
    Store {
        mailbox: MailboxKey,
        uids: Vec<Uid>,
        add: Vec<Flag>,
        remove: Vec<Flag>,
        unchanged_since: Option<ModSeq>,
    },
    /// Show the mailbox as this server has it (exposes UIDs to the user).
    Read {
        mailbox: MailboxKey,
    },
    /// `Read`, once this server has every change the mailbox's master had ordered
    /// when asked: a client that wrote through another server (and was told OK) finds
    /// its write. Answered from what this server has when the master cannot be asked
    /// or the copy does not catch up within `Config::fresh_read_us` (see
    /// `server::fresh_reads`).
    FreshRead {
        mailbox: MailboxKey,
    },
    /// `FreshRead` for IMAP STATUS: the same wait, answered with the mailbox's counts
    /// rather than its messages (constant work, not a pass over the mailbox).
    FreshStatus {
        mailbox: MailboxKey,
    },
    /// Seed MASTER-MOVE: make this server the master of the mailbox's master key.
    MasterMove {
        mailbox: MailboxKey,
    },
    /// IMAP CREATE: an empty mailbox, shown on every server, with the special use given
    /// by CREATE-SPECIAL-USE (empty for a plain CREATE).
    CreateMailbox {
        mailbox: MailboxKey,
        special_use: SpecialUse,
    },
    /// IMAP DELETE: every message expunged and the mailbox hidden everywhere.
    DeleteMailbox {
        mailbox: MailboxKey,
    },
    /// IMAP SUBSCRIBE (`subscribe`) and UNSUBSCRIBE: the user's subscription to the
    /// mailbox, kept on every server.
    Subscription {
        mailbox: MailboxKey,
        subscribe: bool,
    },
    /// IMAP RENAME: see [`crate::msg::WriteRequest::Rename`].
    RenameMailbox {
        from: MailboxKey,
        to: MailboxKey,
    },
    /// A message migrated from another server (`tandem import`), kept at the UID it had
    /// there: the master places it at `uid` when the mailbox has `uidvalidity` (a mailbox
    /// with no history yet takes it) and `uid` is at or above its UIDNEXT. A message
    /// with the same bytes already at `uid` is answered as saved (a resumed import adds
    /// nothing); anything else is a permanent failure, after which the importer saves
    /// the message without a UID.
    Import {
        mailbox: MailboxKey,
        uidvalidity: u32,
        uid: Uid,
        received: u64,
        flags: Vec<Flag>,
        body: Body,
    },
    /// A mailbox migrated with no message (`tandem import`): created, with `uidvalidity`
    /// when it has no history yet.
    ImportMailbox {
        mailbox: MailboxKey,
        uidvalidity: u32,
    },
    /// An operator's membership change (`tandem member add|remove`): made here and
    /// flooded to every server; answered with the membership once it is stored.
    Membership {
        change: crate::membership::MemberChange,
    },
    /// A user replica's sync (`tandem replicate`, see `user_replica`): the summary of
    /// every mailbox of `user` here, deleted ones included.
    ReplicaList {
        user: std::sync::Arc<str>,
        /// A partial replica's spec, from its own `ReplicaList` answer: a cluster server
        /// lists only the mailboxes it holds, with summaries of the part it holds (see
        /// [`crate::mailbox::summary_within`]). A user replica goes by its own config.
        partial: Option<crate::partial::Partial>,
    },
    /// The durable state of a mailbox changed after `since` (all of it when None); from a
    /// cluster server to a partial replica, only the part it holds
    /// ([`crate::partial::Partial::window_state`]).
    ReplicaPull {
        mailbox: MailboxKey,
        since: Option<ModSeq>,
        partial: Option<crate::partial::Partial>,
    },
    /// The bodies of these messages of `mailbox` that this server holds, intact. Only
    /// a message live in the mailbox is answered: the agent of one user's replica never
    /// reads another's mail by naming its GUID.
    ReplicaBodies {
        mailbox: MailboxKey,
        guids: Vec<Guid>,
    },
    /// A user replica's copy (or piece of one) joined by the mailbox's master: see
    /// [`crate::msg::WriteRequest::Merge`].
    ReplicaPush {
        state: MailboxState,
        bodies: Vec<(Guid, Body)>,
        from_cluster: Vec<(Uid, Uid)>,
    },
    /// The cluster's copy (or piece of one), taken by this user replica as a replica
    /// takes its master's (the cluster decided every conflict). `pushed_upto`: this
    /// server's HIGHESTMODSEQ of the mailbox when it was last pulled for a push;
    /// `from_cluster` as for [`crate::msg::WriteRequest::Merge`] (a message here in it,
    /// at a UID the cluster retired, is one the cluster expunged or moved: it goes).
    /// Answered with `ClientReply::ReplicaAdopted` once durable; refused by a cluster
    /// server.
    ReplicaAdopt {
        state: MailboxState,
        bodies: Vec<(Guid, Body)>,
        pushed_upto: ModSeq,
        from_cluster: Vec<(Uid, Uid)>,
    },
    /// Bodies a client of this partial replica asked for (`ReplicaList`'s `wanted`),
    /// brought from the cluster by the agent: each is kept if a live record of `mailbox`
    /// names it and the bytes match the record's checksum. Answered with
    /// `ClientReply::BodiesKept` once durable.
    ReplicaKeepBodies {
        mailbox: MailboxKey,
        bodies: Vec<(Guid, Body)>,
    },
    /// The text parts of these messages of `mailbox`, for a partial replica (see
    /// [`crate::partial`]): cut from their whole bodies by the driver's store
    /// (`BodyStore::text_parts`: the driver knows the mail format, the core never parses
    /// mail), or as a partial server holds them. Only a live message of the mailbox is
    /// answered, as for `ReplicaBodies`.
    ReplicaTextParts {
        mailbox: MailboxKey,
        guids: Vec<Guid>,
    },
    /// The text parts of messages whose bodies this partial replica omits
    /// (`ReplicaList`'s `texts_wanted`), brought by the agent: each is kept if a live
    /// record of `mailbox` names it and its body is omitted here. Answered with
    /// `ClientReply::BodiesKept` once durable.
    ReplicaKeepTextParts {
        mailbox: MailboxKey,
        parts: Vec<(Guid, Body)>,
    },
    /// The text parts held for these messages whose bodies are omitted here (a client's
    /// FETCH answers what it can from them): answered with `ClientReply::TextParts`.
    ReadTextParts {
        guids: Vec<Guid>,
    },
    /// The body of one message, for a client (IMAP FETCH BODY[]): answered with
    /// `ClientReply::Body`. On a partial replica a body it omitted is queued for the
    /// agent to bring (`ReplicaList`'s `wanted`) and the client is told to try again.
    FetchBody {
        mailbox: MailboxKey,
        uid: Uid,
    },
}

/// One message as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    pub uid: Uid,
    pub guid: Guid,
    pub flags: Vec<Flag>,
    pub modseq: ModSeq,
    /// When the message arrived (seconds since the Unix epoch): IMAP's INTERNALDATE.
    pub received: u64,
    pub size: u32,
}

/// What IMAP STATUS shows of a mailbox, as a client would count it in a [`MailboxView`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxStatus {
    pub mailbox: MailboxKey,
    pub uidvalidity: u32,
    pub uidnext: Uid,
    pub highest_modseq: ModSeq,
    pub messages: usize,
    /// Messages with `\Seen` set, and with `\Deleted`.
    pub seen: usize,
    pub deleted: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxView {
    pub mailbox: MailboxKey,
    pub uidvalidity: u32,
    pub uidnext: Uid,
    pub highest_modseq: ModSeq,
    pub messages: Vec<MessageView>,
}

/// What changed in a mailbox after a modseq a session has shown (see
/// `Server::changes_since`): the messages whose modseq is above it, the UIDs whose
/// binding ended above it, and the message count, which lets the session check that
/// it missed nothing (a collected tombstone is not listed; the count then disagrees and
/// the session reads the mailbox whole).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailboxChanges {
    pub highest_modseq: ModSeq,
    pub count: usize,
    /// In UID order.
    pub changed: Vec<MessageView>,
    /// In UID order; a UID may be listed that the session never saw.
    pub gone: Vec<Uid>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientReply {
    Write(WriteResult),
    Read(MailboxView),
    /// A `FreshRead`'s view; `caught_up` when it holds every change the master had
    /// ordered when asked, false when it is this server's copy without that promise.
    FreshRead {
        view: MailboxView,
        caught_up: bool,
    },
    /// A `FreshStatus`'s counts, `caught_up` as for `FreshRead`.
    FreshStatus {
        status: MailboxStatus,
        caught_up: bool,
    },
    /// MASTER-MOVE done: this server is now master.
    Moved {
        master: Sid,
    },
    /// A membership change was taken: the membership as this server now has it.
    Members {
        members: crate::membership::Membership,
    },
    /// `ReplicaList`'s summaries, in mailbox order. From a user replica also its partial
    /// spec (None: it holds everything) and the omitted bodies its clients asked for, by
    /// mailbox, for the agent to bring.
    ReplicaList {
        summaries: Vec<Summary>,
        partial: Option<crate::partial::Partial>,
        wanted: Vec<(MailboxKey, Guid)>,
        /// From a partial user replica: messages whose bodies it omits and whose text
        /// parts it does not hold yet, for the agent to bring.
        texts_wanted: Vec<(MailboxKey, Guid)>,
    },
    /// `ReplicaPull`'s state, with the summary of the whole mailbox it is part of (None:
    /// no such mailbox here).
    ReplicaState {
        state: Box<MailboxState>,
        summary: Option<Summary>,
        /// From a user replica: the bodies of the messages of `state` it wrote itself
        /// (their GUIDs name it), within `ReplicaBodies`' limits, so that its push carries
        /// them at once rather than after the cluster says it lacks them. Empty from a
        /// cluster server.
        own_bodies: Vec<(Guid, Body)>,
    },
    /// `ReplicaBodies`: the bodies found; the others are not here.
    ReplicaBodies {
        bodies: Vec<(Guid, Body)>,
    },
    /// `ReplicaTextParts`: the text parts found; the others are not here.
    ReplicaTextParts {
        parts: Vec<(Guid, Body)>,
    },
    /// `ReadTextParts`: the text parts held, of those asked for.
    TextParts {
        parts: Vec<(Guid, Body)>,
    },
    /// `ReplicaKeepBodies` (or `ReplicaKeepTextParts`) done: how many were kept.
    BodiesKept {
        kept: u32,
    },
    /// `FetchBody`: the message's body, intact.
    Body {
        guid: Guid,
        body: Body,
    },
    /// `ReplicaAdopt` done, or (when `missing` is not empty) not done for want of these
    /// bodies. `pushed_upto`: the modseq up to which every change of this replica's own
    /// is in the cluster (its next push starts there; 0: push whole). `held`: the UID
    /// ranges of the cluster's messages this copy now holds at the cluster's binding.
    /// `summary`: this copy's summary once the adopt is done (None when it was not): equal
    /// to the cluster's at the pull, the two copies agree without another look.
    /// `texts_wanted`: on a partial replica, messages of the copy whose bodies it omits
    /// and whose text parts it lacks (for the agent to bring in the same round).
    ReplicaAdopted {
        pushed_upto: ModSeq,
        missing: Vec<Guid>,
        held: Vec<(Uid, Uid)>,
        summary: Option<Summary>,
        texts_wanted: Vec<Guid>,
    },
    Failed {
        kind: FailKind,
        reason: String,
    },
}

/// A change to the store that did not come through the protocol, as the shell found it
/// (a mail file dropped in or deleted by hand, a body that fails its checksum). In the
/// simulator the fault injector makes these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExternalEdit {
    /// A message file appeared with no UID; the shell gave it a GUID when it indexed it.
    Added { mailbox: MailboxKey, guid: Guid, received: u64, body: Body },
    /// The file of a message disappeared.
    Removed { mailbox: MailboxKey, uid: Uid },
    /// The stored body of a message changed under us (the driver's body store now
    /// holds other bytes for it).
    Corrupted { guid: Guid },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// A peer message arriving from the neighbour `from` over a direct link.
    Peer {
        from: Sid,
        envelope: Envelope,
    },
    Client {
        id: RequestId,
        request: ClientRequest,
    },
    /// The deadline from `poll_timeout` passed.
    Timer,
    LinkUp {
        peer: Sid,
    },
    LinkDown {
        peer: Sid,
    },
    /// Every write up to and including `upto` is on disk.
    Durable {
        upto: WriteId,
    },
    External(ExternalEdit),
}

/// How long a driver may hold a lazy write (`StoreWrite::is_lazy`) waiting for a write
/// that needs a flush anyway. Nothing waits for it; the bound keeps a quiet server's
/// disk from lagging its image for long (a crash then repeats less work).
pub const LAZY_WRITE_HOLD_US_MAX: u64 = 1_000_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// Send to the direct neighbour `to`.
    Send {
        to: Sid,
        envelope: Envelope,
    },
    Reply {
        id: RequestId,
        reply: ClientReply,
    },
    /// Make this write durable, in order, then report `Input::Durable`. A lazy write
    /// (`StoreWrite::is_lazy`) need not start a flush of its own: it may wait for the
    /// next write that is not lazy, for at most [`LAZY_WRITE_HOLD_US_MAX`].
    Write {
        id: WriteId,
        write: StoreWrite,
    },
}
