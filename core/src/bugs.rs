//! Deliberately broken protocol variants, to prove that the simulator's oracle and
//! explorer catch real bugs. A bug can only be switched on through `Config::bug`, which
//! exists only when tandem-core is built with the `broken` feature (tests do that; an
//! operator's build never has it).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Bug {
    /// After renumbering a UID conflict the master sets UIDNEXT back to the retired UID,
    /// so the next SAVE reuses it.
    ReuseUidAfterRenumber,
    /// Flag merges take one side's whole flag set instead of replaying both sides'
    /// deltas flag by flag.
    WholeFlagSets,
    /// Sync mode answers SAVE/COPY before any replica has made it durable.
    AckBeforeReplicaDurable,
    /// Tombstones are ignored when looking for UID conflicts (the seed's FIXME unsolved).
    IgnoreTombstones,
    /// A replica that meets a second GUID on a UID it holds overwrites its own.
    ReplicaOverwritesUid,
    /// A master collects a mailbox's tombstones as soon as it has any, without waiting
    /// for every server to show it the same copy.
    CollectTombstonesEarly,
    /// A fresh read is answered from this server's copy at once, without asking the
    /// master where it stands.
    FreshReadWithoutBarrier,
    /// A SAVE retried after a timeout is stored again even when its first attempt was
    /// stored (no recognition of retries).
    StoreRetriesTwice,
    /// A just-started server opens a root term at once, without waiting to hear its
    /// peers (no start-up hold).
    SkipStartupHold,
    /// A CANCEL expunges the save even when a retry was answered with it (its client
    /// was told it is stored).
    CancelClaimedSaves,
    /// A user replica's copy is treated as a server's: the master moves a message the
    /// cluster expunged and forgot while the replica was away to a new UID instead of
    /// dropping it, the replica's expunge stays at the binding it saw, and the replica
    /// leaves the bindings the cluster retired and forgot for the master to move.
    ReplicaResurrects,
    /// A cluster server pulled by a partial replica sends what is outside its date
    /// window as expunged ("the replica drops what left its window"); the replica's next
    /// push takes those expunges back, and the cluster loses mail the replica never held.
    PartialExpungesUnheld,
    /// A partial cluster server's acknowledgement of a replicated save whose body it left
    /// out counts as a copy: sync mode answers OK with fewer bodies on disk than it
    /// promises.
    PartialAckCountsAsCopy,
    /// A user replica takes the census's loss of a message it still holds the body of
    /// like any expunge, and the message is gone everywhere.
    ReplicaTakesLostExpunge,
    /// A master counts a peer's acknowledgement whatever store the peer has now: a copy
    /// acknowledged by a store since lost with its disk still counts.
    CountsAcksOfLostStores,
    /// A user replica leaves its own incarnation of a name for the cluster's whichever
    /// wins: its push does not move the cluster's master to a winning incarnation, and
    /// its adopt takes a losing one, forgetting the UIDs its clients saw (explore seed
    /// 661150).
    LaptopLeavesItsIncarnation,
    /// A master decides a log entry's record of a message a client expunged here at
    /// another binding from the entry alone (the expunge wins), though the entry cannot
    /// show whether its sender saw that expunge collected: a MOVE back made after the
    /// collection is expunged at the heal, and the message is gone.
    ExpungeWinsOverLogCopy,
    /// Tombstone collection takes a user replica's message's expunge like any other: a
    /// push whose answer was lost, sent again after the expunge's collection, brings the
    /// message back (focus leave seed 157812).
    CollectReplicaTombstones,
    /// A store not filled yet (never in a term, or a newcomer with copies no master
    /// confirmed) is trusted like any other: alone it masters mailboxes from its empty
    /// disk, and a read that cannot reach its master is answered from a copy still
    /// being filled.
    TrustsUnfilledStore,
    /// The bindings a server saw collected are forgotten at a restart (kept in memory
    /// only, as before they were kept on disk): a store put back from before an expunge
    /// after every server that saw its collection restarted has its copy of the
    /// expunged message moved to a new UID (focus late-restore).
    ForgetsCollectionsAtRestart,
}

impl Bug {
    pub const ALL: [Bug; 20] = [
        Bug::ReuseUidAfterRenumber,
        Bug::WholeFlagSets,
        Bug::AckBeforeReplicaDurable,
        Bug::IgnoreTombstones,
        Bug::ReplicaOverwritesUid,
        Bug::CollectTombstonesEarly,
        Bug::FreshReadWithoutBarrier,
        Bug::StoreRetriesTwice,
        Bug::SkipStartupHold,
        Bug::CancelClaimedSaves,
        Bug::ReplicaResurrects,
        Bug::PartialExpungesUnheld,
        Bug::PartialAckCountsAsCopy,
        Bug::ReplicaTakesLostExpunge,
        Bug::CountsAcksOfLostStores,
        Bug::LaptopLeavesItsIncarnation,
        Bug::ExpungeWinsOverLogCopy,
        Bug::CollectReplicaTombstones,
        Bug::TrustsUnfilledStore,
        Bug::ForgetsCollectionsAtRestart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Bug::ReuseUidAfterRenumber => "reuse-uid-after-renumber",
            Bug::WholeFlagSets => "whole-flag-sets",
            Bug::AckBeforeReplicaDurable => "ack-before-replica-durable",
            Bug::IgnoreTombstones => "ignore-tombstones",
            Bug::ReplicaOverwritesUid => "replica-overwrites-uid",
            Bug::CollectTombstonesEarly => "collect-tombstones-early",
            Bug::FreshReadWithoutBarrier => "fresh-read-without-barrier",
            Bug::StoreRetriesTwice => "store-retries-twice",
            Bug::SkipStartupHold => "skip-startup-hold",
            Bug::CancelClaimedSaves => "cancel-claimed-saves",
            Bug::ReplicaResurrects => "replica-resurrects",
            Bug::PartialExpungesUnheld => "partial-expunges-unheld",
            Bug::PartialAckCountsAsCopy => "partial-ack-counts-as-copy",
            Bug::ReplicaTakesLostExpunge => "replica-takes-lost-expunge",
            Bug::CountsAcksOfLostStores => "counts-acks-of-lost-stores",
            Bug::LaptopLeavesItsIncarnation => "laptop-leaves-its-incarnation",
            Bug::ExpungeWinsOverLogCopy => "expunge-wins-over-log-copy",
            Bug::CollectReplicaTombstones => "collect-replica-tombstones",
            Bug::TrustsUnfilledStore => "trusts-unfilled-store",
            Bug::ForgetsCollectionsAtRestart => "forgets-collections-at-restart",
        }
    }

    pub fn from_name(name: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// How merges behave; the default is the correct protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeRules {
    pub whole_flag_sets: bool,
    pub ignore_tombstones: bool,
    pub replica_overwrites: bool,
    /// The state merged comes from the mailbox's master: a replica may take its
    /// UIDVALIDITY (see `mailbox::merge_as_replica`).
    pub from_master: bool,
    /// The state merged is a user replica's push (master only): a message the census
    /// gave up as lost (see `Tombstone::lost`), whose body the push brought, comes back
    /// at a new UID.
    pub revive_lost: bool,
    /// A cancel removes a claimed record like any other (the broken variant
    /// `cancel-claimed-saves`; see `MessageRecord::claimed`).
    pub cancels_remove_claimed: bool,
    /// A user replica's push and adopt leave its incarnation for the cluster's whichever
    /// wins (the broken variant `laptop-leaves-its-incarnation`; see
    /// [`crate::mailbox::incarnation_wins`]).
    pub laptop_leaves_incarnation: bool,
    /// The state merged is a log entry's piece of a mailbox (a change as its master made
    /// it), not a copy's state: it carries retired UIDs only if that change retired
    /// some, so it cannot show whether its sender saw an expunge collected (see
    /// `MasterMerge::place`).
    pub from_log: bool,
    /// A master decides such a piece alone (the broken variant
    /// `expunge-wins-over-log-copy`).
    pub log_copy_loses: bool,
}
