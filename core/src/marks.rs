//! Coverage marks: counters on the protocol paths that matter, so a simulation sweep can
//! prove it reached the hard paths (and a scenario can expect one by name).

use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub enum Mark {
    UidConflictRenumbered,
    TombstoneConflict,
    RootElected,
    MasterMoved,
    MasterMovedMidSave,
    RelayUsed,
    LogOverflow,
    FullSync,
    DigestMismatch,
    BodyRepaired,
    CondstoreRejected,
    SyncModeTemporaryFailure,
    ReplicaConflictRefused,
    StaleStoreCorrected,
    /// A peer message with a number out of range (or a mailbox beyond the limits) was
    /// dropped at receipt.
    PeerInputRefused,
    /// A logged change could not be encoded within the wire limits: dropped, and the
    /// mailbox marked for full SYNC with that peer.
    UnsendableChange,
    /// A restart found a message live at a binding its own tombstone retires (a crash
    /// between a merge's or expunge's writes) and removed it.
    InterruptedMergeFinished,
    /// A master collected a mailbox's tombstones.
    TombstonesCollected,
    /// A just-started server's hold ended by its time, with part of the cluster out of
    /// reach, and it went on without them.
    StartupHoldExpired,
    /// A replica took its master's UIDVALIDITY for a mailbox (two incarnations of one
    /// name, made by RENAMEs on both sides of a partition).
    ValidityAdopted,
    /// A user replica's push brought an incarnation of a name that wins over the
    /// cluster's (`mailbox::incarnation_wins`): the master took it.
    PushMovedIncarnation,
    /// A user replica kept its own incarnation of a name, which wins over the cluster's,
    /// rather than adopt the cluster's: its next push takes it to the cluster.
    ReplicaKeptOwnIncarnation,
    /// A master left out a logged copy of a message a client expunged here at another
    /// binding, and asked its sender's state to decide (see `MergeRules::from_log`).
    LogCopySettledBySync,
    /// A further logged copy of that kind from the same peer waited for the state
    /// already asked for, instead of asking again (see `Server::ask_state_once`).
    StateAskedAlready,
    /// A server that does not master a mailbox sent its copy to the master because its
    /// log to the master had dropped the mailbox's changes (see `Server::sync_overflowed`).
    OverflowedCopySent,
    /// A migrated mailbox took the UIDVALIDITY it had elsewhere.
    ImportedValidity,
    /// A migrated message was placed at the UID it had elsewhere.
    ImportedAtUid,
    /// A COPY (or MOVE) went back into a mailbox where its message was expunged: it took
    /// a GUID derived from the expunged one.
    CopiedBack,
    /// A client's SAVE timed out where it was taken: a CANCEL went to the master.
    SaveCancelSent,
    /// A master expunged a save it ordered whose client was told it failed.
    SaveCancelled,
    /// A master kept a cancelled save: a retry was answered with it.
    SaveCancelRefused,
    /// A root answered a request for its term sent before the asker heard it (a slow
    /// link) with the term, instead of opening another.
    StaleTermAskAnswered,
    /// A fresh read was answered once this server's copy reached its master's position.
    FreshReadCaughtUp,
    /// A fresh read was answered from this server's copy without its master's position
    /// (no master in time, or a copy that did not catch up in time).
    FreshReadStale,
    /// A SAVE was recognised as a retry of one already stored, and answered with it.
    RetryRecognised,
    /// A master carried out an IMAP CREATE (with or without a special use).
    MailboxCreated,
    /// A master carried out an IMAP DELETE.
    MailboxDeleted,
    /// A master carried out an IMAP RENAME.
    MailboxRenamed,
    /// A client write arrived while its server still held back after a start (see
    /// `Config::startup_hold_us`).
    WriteAtStart,
    /// A server learned of a member added to the cluster.
    MemberAdded,
    /// A server learned that a member is leaving.
    MemberLeaving,
    /// A server learned that a member retired (it left, or was lost for good).
    MemberRetired,
    /// A user replica's copy of a message the cluster expunged and forgot (its tombstone
    /// collected while the replica was away) was dropped, not merged back in.
    ReplicaCopyOfForgottenExpunge,
    /// A user replica kept a message the cluster's census gave up as lost (it holds the
    /// body), to push it back.
    LostMessageKept,
    /// A master took back a message a census had given up, its body brought by a push.
    LostMessageRevived,
    /// A master that got its key from the root took the copy a late MOVED carried (the
    /// old master's, which may hold changes no other server has).
    LateHandoffMerged,
    /// A copy of a binding whose tombstone was collected here lately (one in flight
    /// since before the collection) was dropped, not merged back in.
    CollectedCopyDropped,
    /// A master stopped counting a copy that a peer acknowledged with a store it no
    /// longer has (its disk was lost or replaced since).
    ReplacedStoreAckDropped,
    /// A master sent a waiting SAVE or COPY again to a peer's new store.
    CopySentAgain,
    /// A RENAME waited to master the greater of its two names' keys (another server's,
    /// or nobody's yet) before it ran.
    RenameTakesTarget,
    /// A replicated flag change named a message not held here: acknowledged as not
    /// taken, so that its master counts no copy here until a SYNC brings the message.
    UnheldChangeRefused,
    /// A store that was never in a root term first heard a peer that had been: it was
    /// made after its cluster had run, and is filled by its peers (see `filling`).
    NewcomerStore,
    /// A newcomer's copy of a mailbox was the same as its master's.
    NewcomerCopyConfirmed,
    /// A read that could not reach its master's position was refused (a temporary
    /// failure), not answered from a copy no master has confirmed yet.
    UnfilledReadRefused,
    /// A server whose store is not filled yet, with no other server in reach, opened
    /// no root term of its own, or (a root from before) gave out no mastership.
    UnfilledAloneMastersNothing,
    /// A store put back from a backup (in a root term before, with no identity now)
    /// started as a newcomer: its copies are refilled and confirmed by their masters.
    RestoredStoreRefills,
    /// A state that names collected bindings went in pieces, each name with the retired
    /// range covering it.
    NamedStateSplit,
}

impl Mark {
    pub const ALL: [Mark; 57] = [
        Mark::UidConflictRenumbered,
        Mark::TombstoneConflict,
        Mark::RootElected,
        Mark::MasterMoved,
        Mark::MasterMovedMidSave,
        Mark::RelayUsed,
        Mark::LogOverflow,
        Mark::FullSync,
        Mark::DigestMismatch,
        Mark::BodyRepaired,
        Mark::CondstoreRejected,
        Mark::SyncModeTemporaryFailure,
        Mark::ReplicaConflictRefused,
        Mark::StaleStoreCorrected,
        Mark::PeerInputRefused,
        Mark::UnsendableChange,
        Mark::InterruptedMergeFinished,
        Mark::TombstonesCollected,
        Mark::StartupHoldExpired,
        Mark::ValidityAdopted,
        Mark::PushMovedIncarnation,
        Mark::ReplicaKeptOwnIncarnation,
        Mark::LogCopySettledBySync,
        Mark::StateAskedAlready,
        Mark::OverflowedCopySent,
        Mark::ImportedValidity,
        Mark::ImportedAtUid,
        Mark::CopiedBack,
        Mark::SaveCancelSent,
        Mark::SaveCancelled,
        Mark::SaveCancelRefused,
        Mark::StaleTermAskAnswered,
        Mark::FreshReadCaughtUp,
        Mark::FreshReadStale,
        Mark::RetryRecognised,
        Mark::MailboxCreated,
        Mark::MailboxDeleted,
        Mark::MailboxRenamed,
        Mark::WriteAtStart,
        Mark::MemberAdded,
        Mark::MemberLeaving,
        Mark::MemberRetired,
        Mark::ReplicaCopyOfForgottenExpunge,
        Mark::LostMessageKept,
        Mark::LostMessageRevived,
        Mark::LateHandoffMerged,
        Mark::CollectedCopyDropped,
        Mark::ReplacedStoreAckDropped,
        Mark::CopySentAgain,
        Mark::RenameTakesTarget,
        Mark::UnheldChangeRefused,
        Mark::NewcomerStore,
        Mark::NewcomerCopyConfirmed,
        Mark::UnfilledReadRefused,
        Mark::UnfilledAloneMastersNothing,
        Mark::RestoredStoreRefills,
        Mark::NamedStateSplit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mark::UidConflictRenumbered => "uid_conflict_renumbered",
            Mark::TombstoneConflict => "tombstone_conflict",
            Mark::RootElected => "root_elected",
            Mark::MasterMoved => "master_moved",
            Mark::MasterMovedMidSave => "master_moved_mid_save",
            Mark::RelayUsed => "relay_used",
            Mark::LogOverflow => "log_overflow",
            Mark::FullSync => "full_sync",
            Mark::DigestMismatch => "digest_mismatch",
            Mark::BodyRepaired => "body_repaired",
            Mark::CondstoreRejected => "condstore_rejected",
            Mark::SyncModeTemporaryFailure => "sync_mode_temporary_failure",
            Mark::ReplicaConflictRefused => "replica_conflict_refused",
            Mark::StaleStoreCorrected => "stale_store_corrected",
            Mark::PeerInputRefused => "peer_input_refused",
            Mark::UnsendableChange => "unsendable_change",
            Mark::InterruptedMergeFinished => "interrupted_merge_finished",
            Mark::TombstonesCollected => "tombstones_collected",
            Mark::StartupHoldExpired => "startup_hold_expired",
            Mark::ValidityAdopted => "validity_adopted",
            Mark::PushMovedIncarnation => "push_moved_incarnation",
            Mark::ReplicaKeptOwnIncarnation => "replica_kept_own_incarnation",
            Mark::LogCopySettledBySync => "log_copy_settled_by_sync",
            Mark::StateAskedAlready => "state_asked_already",
            Mark::OverflowedCopySent => "overflowed_copy_sent",
            Mark::ImportedValidity => "imported_validity",
            Mark::ImportedAtUid => "imported_at_uid",
            Mark::CopiedBack => "copied_back",
            Mark::SaveCancelSent => "save_cancel_sent",
            Mark::SaveCancelled => "save_cancelled",
            Mark::SaveCancelRefused => "save_cancel_refused",
            Mark::StaleTermAskAnswered => "stale_term_ask_answered",
            Mark::FreshReadCaughtUp => "fresh_read_caught_up",
            Mark::FreshReadStale => "fresh_read_stale",
            Mark::RetryRecognised => "retry_recognised",
            Mark::MailboxCreated => "mailbox_created",
            Mark::MailboxDeleted => "mailbox_deleted",
            Mark::MailboxRenamed => "mailbox_renamed",
            Mark::WriteAtStart => "write_at_start",
            Mark::MemberAdded => "member_added",
            Mark::MemberLeaving => "member_leaving",
            Mark::MemberRetired => "member_retired",
            Mark::ReplicaCopyOfForgottenExpunge => "replica_copy_of_forgotten_expunge",
            Mark::LostMessageKept => "lost_message_kept",
            Mark::LostMessageRevived => "lost_message_revived",
            Mark::LateHandoffMerged => "late_handoff_merged",
            Mark::CollectedCopyDropped => "collected_copy_dropped",
            Mark::ReplacedStoreAckDropped => "replaced_store_ack_dropped",
            Mark::CopySentAgain => "copy_sent_again",
            Mark::RenameTakesTarget => "rename_takes_target",
            Mark::UnheldChangeRefused => "unheld_change_refused",
            Mark::NewcomerStore => "newcomer_store",
            Mark::NewcomerCopyConfirmed => "newcomer_copy_confirmed",
            Mark::UnfilledReadRefused => "unfilled_read_refused",
            Mark::UnfilledAloneMastersNothing => "unfilled_alone_masters_nothing",
            Mark::RestoredStoreRefills => "restored_store_refills",
            Mark::NamedStateSplit => "named_state_split",
        }
    }

    pub fn from_name(name: &str) -> Option<Mark> {
        Mark::ALL.into_iter().find(|m| m.name() == name)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Marks {
    counts: BTreeMap<Mark, u64>,
}

impl Marks {
    pub fn hit(&mut self, mark: Mark) {
        *self.counts.entry(mark).or_insert(0) += 1;
    }
    pub fn count(&self, mark: Mark) -> u64 {
        self.counts.get(&mark).copied().unwrap_or(0)
    }
    pub fn iter(&self) -> impl Iterator<Item = (Mark, u64)> + '_ {
        self.counts.iter().map(|(m, c)| (*m, *c))
    }
}
