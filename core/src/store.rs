//! What a server keeps on disk. The core emits [`StoreWrite`]s in order; the shell makes
//! them durable and reports back; after a crash the server is rebuilt from the
//! [`DiskImage`] those writes produced. The same `apply` is used by the simulator's disk
//! and the node's store, so both hold exactly what the core asked for.

use crate::msg::Change;
use crate::types::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One mailbox as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMailbox {
    pub uidvalidity: u32,
    pub uidnext: Uid,
    pub highest_modseq: ModSeq,
    pub messages: BTreeMap<Uid, MessageRecord>,
    /// Keyed by (uid, guid): a retired UID keeps one tombstone per message it held.
    pub tombstones: BTreeMap<(Uid, Guid), Tombstone>,
    #[serde(default)]
    pub lifecycle: Lifecycle,
}

impl StoredMailbox {
    /// Whether clients see the mailbox (see [`Lifecycle`]).
    pub fn visible(&self) -> bool {
        !self.messages.is_empty() || self.lifecycle.created_at >= self.lifecycle.deleted_at
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBody {
    pub checksum: u64,
    pub bytes: Vec<u8>,
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreWrite {
    MailboxMeta { mailbox: MailboxKey, uidvalidity: u32, uidnext: Uid, highest_modseq: ModSeq },
    PutMessage { mailbox: MailboxKey, record: MessageRecord },
    RemoveMessage { mailbox: MailboxKey, uid: Uid },
    PutTombstone { mailbox: MailboxKey, tombstone: Tombstone },
    PutBody { guid: Guid, checksum: u64, bytes: Vec<u8> },
    RemoveBody { guid: Guid },
    LogAppend { peer: Sid, seq: u64, change: Change },
    LogRemove { peer: Sid, seqs: Vec<u64> },
    LogOverflow { peer: Sid, mailbox: MailboxKey, overflowed: bool },
    Epoch { epoch: u64 },
    LinkSeq { seq: u64 },
    Incarnation { incarnation: u64 },
    MailboxLifecycle { mailbox: MailboxKey, lifecycle: Lifecycle },
}

impl DiskImage {
    /// [`DiskImage::apply`] taking the write: what it carries is moved in, not copied.
    pub fn apply_owned(&mut self, write: StoreWrite) {
        match write {
            StoreWrite::PutMessage { mailbox, record } => {
                let m = self.mailboxes.entry(mailbox).or_default();
                m.messages.insert(record.uid, record);
            }
            StoreWrite::PutBody { guid, checksum, bytes } => {
                self.bodies.insert(guid, StoredBody { checksum, bytes });
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
            StoreWrite::PutBody { guid, checksum, bytes } => {
                self.bodies.insert(*guid, StoredBody { checksum: *checksum, bytes: bytes.clone() });
            }
            StoreWrite::RemoveBody { guid } => {
                self.bodies.remove(guid);
            }
            StoreWrite::LogAppend { peer, seq, change } => {
                let log = self.logs.entry(*peer).or_default();
                log.entries.insert(*seq, change.clone());
                log.next_seq = log.next_seq.max(seq + 1);
            }
            StoreWrite::LogRemove { peer, seqs } => {
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
            StoreWrite::Incarnation { incarnation } => self.incarnation = self.incarnation.max(*incarnation),
            StoreWrite::MailboxLifecycle { mailbox, lifecycle } => {
                self.mailboxes.entry(mailbox.clone()).or_default().lifecycle.join(lifecycle);
            }
        }
    }
}
