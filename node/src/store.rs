//! The durable store: redb tables mirroring the core's [`DiskImage`]. The core's
//! [`StoreWrite`]s are applied in order, many per transaction (group commit); a
//! transaction commits with fsync before the core hears that its writes are durable.
//! On start the image is read back whole and handed to `Server::recover`.

use crate::codec::{Bincode, RecordCodec};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use tandem_core::msg::Change;
use tandem_core::store::{DiskImage, StoreWrite, StoredBody};
use tandem_core::types::*;

/// "epoch", "link_seq", "incarnation" -> u64.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// mailbox -> (uidvalidity, uidnext, highest_modseq).
const MAILBOXES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mailboxes");
/// (mailbox, uid) -> (mailbox, record).
const MESSAGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("messages");
/// (mailbox, uid, guid) -> (mailbox, tombstone).
const TOMBSTONES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tombstones");
/// guid -> (checksum, bytes).
const BODIES: TableDefinition<u128, &[u8]> = TableDefinition::new("bodies");
/// (peer, seq) -> change.
const LOG_ENTRIES: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("log_entries");
/// peer -> next seq.
const LOG_NEXT: TableDefinition<u32, u64> = TableDefinition::new("log_next");
/// mailbox -> (created_at, deleted_at) of mailboxes a client created or deleted.
const LIFECYCLES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("lifecycles");
/// (peer, mailbox) -> (peer, mailbox) for mailboxes that overflowed a peer's log.
const LOG_OVERFLOWED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("log_overflowed");

#[derive(Debug)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError(e.into().to_string())
    }
}

fn enc<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    Bincode::encode(value).map_err(StoreError)
}

fn dec<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    Bincode::decode(bytes).map_err(|e| StoreError(format!("corrupt {what} record: {e}")))
}

pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        let db = Database::create(dir.join("tandem.redb"))?;
        let txn = db.begin_write()?;
        {
            txn.open_table(META)?;
            txn.open_table(MAILBOXES)?;
            txn.open_table(MESSAGES)?;
            txn.open_table(TOMBSTONES)?;
            txn.open_table(BODIES)?;
            txn.open_table(LOG_ENTRIES)?;
            txn.open_table(LOG_NEXT)?;
            txn.open_table(LOG_OVERFLOWED)?;
            txn.open_table(LIFECYCLES)?;
        }
        txn.commit()?;
        Ok(Store { db })
    }

    /// Everything the core wrote, as one image.
    pub fn load(&self) -> Result<DiskImage, StoreError> {
        let txn = self.db.begin_read()?;
        let mut image = DiskImage::default();
        let meta = txn.open_table(META)?;
        image.epoch = meta.get("epoch")?.map(|v| v.value()).unwrap_or(0);
        image.link_seq = meta.get("link_seq")?.map(|v| v.value()).unwrap_or(0);
        image.incarnation = meta.get("incarnation")?.map(|v| v.value()).unwrap_or(0);
        for row in txn.open_table(MAILBOXES)?.iter()? {
            let (k, v) = row?;
            let mailbox: MailboxKey = dec(k.value(), "mailbox key")?;
            let (uidvalidity, uidnext, highest_modseq): (u32, Uid, ModSeq) = dec(v.value(), "mailbox")?;
            let m = image.mailboxes.entry(mailbox).or_default();
            m.uidvalidity = uidvalidity;
            m.uidnext = uidnext;
            m.highest_modseq = highest_modseq;
        }
        for row in txn.open_table(MESSAGES)?.iter()? {
            let (_, v) = row?;
            let (mailbox, record): (MailboxKey, MessageRecord) = dec(v.value(), "message")?;
            image.mailboxes.entry(mailbox).or_default().messages.insert(record.uid, record);
        }
        for row in txn.open_table(TOMBSTONES)?.iter()? {
            let (_, v) = row?;
            let (mailbox, t): (MailboxKey, Tombstone) = dec(v.value(), "tombstone")?;
            image.mailboxes.entry(mailbox).or_default().tombstones.insert((t.uid, t.guid), t);
        }
        for row in txn.open_table(BODIES)?.iter()? {
            let (k, v) = row?;
            let (checksum, bytes): (u64, Vec<u8>) = dec(v.value(), "body")?;
            image.bodies.insert(Guid(k.value()), StoredBody { checksum, bytes });
        }
        for row in txn.open_table(LOG_ENTRIES)?.iter()? {
            let (k, v) = row?;
            let (peer, seq) = k.value();
            let change: Change = dec(v.value(), "log entry")?;
            let log = image.logs.entry(Sid(peer)).or_default();
            log.entries.insert(seq, change);
            log.next_seq = log.next_seq.max(seq + 1);
        }
        for row in txn.open_table(LOG_NEXT)?.iter()? {
            let (k, v) = row?;
            let log = image.logs.entry(Sid(k.value())).or_default();
            log.next_seq = log.next_seq.max(v.value());
        }
        for row in txn.open_table(LIFECYCLES)?.iter()? {
            let (k, v) = row?;
            let mailbox: MailboxKey = dec(k.value(), "mailbox key")?;
            let (created_at, deleted_at): (ModSeq, ModSeq) = dec(v.value(), "lifecycle")?;
            image.mailboxes.entry(mailbox).or_default().lifecycle.join(&Lifecycle { created_at, deleted_at });
        }
        for row in txn.open_table(LOG_OVERFLOWED)?.iter()? {
            let (_, v) = row?;
            let (peer, mailbox): (u32, MailboxKey) = dec(v.value(), "overflow mark")?;
            image.logs.entry(Sid(peer)).or_default().overflowed.insert(mailbox);
        }
        Ok(image)
    }

    /// Applies writes in order in one transaction and commits it durably. Writes that
    /// read (a lifecycle join, a log's next seq) read the transaction, so they see what
    /// the earlier writes of the batch did.
    pub fn apply(&self, writes: &[StoreWrite]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let mut mailboxes = txn.open_table(MAILBOXES)?;
            let mut messages = txn.open_table(MESSAGES)?;
            let mut tombstones = txn.open_table(TOMBSTONES)?;
            let mut bodies = txn.open_table(BODIES)?;
            let mut log_entries = txn.open_table(LOG_ENTRIES)?;
            let mut log_next = txn.open_table(LOG_NEXT)?;
            let mut log_overflowed = txn.open_table(LOG_OVERFLOWED)?;
            let mut lifecycles = txn.open_table(LIFECYCLES)?;
            for write in writes {
                match write {
                    StoreWrite::MailboxMeta { mailbox, uidvalidity, uidnext, highest_modseq } => {
                        mailboxes.insert(
                            enc(mailbox)?.as_slice(),
                            enc(&(*uidvalidity, *uidnext, *highest_modseq))?.as_slice(),
                        )?;
                    }
                    StoreWrite::PutMessage { mailbox, record } => {
                        ensure_mailbox(&mut mailboxes, mailbox)?;
                        messages
                            .insert(enc(&(mailbox, record.uid))?.as_slice(), enc(&(mailbox, record))?.as_slice())?;
                    }
                    StoreWrite::RemoveMessage { mailbox, uid } => {
                        messages.remove(enc(&(mailbox, *uid))?.as_slice())?;
                    }
                    StoreWrite::PutTombstone { mailbox, tombstone } => {
                        ensure_mailbox(&mut mailboxes, mailbox)?;
                        let key = enc(&(mailbox, tombstone.uid, tombstone.guid))?;
                        tombstones.insert(key.as_slice(), enc(&(mailbox, tombstone))?.as_slice())?;
                    }
                    StoreWrite::PutBody { guid, checksum, bytes } => {
                        bodies.insert(guid.0, enc(&(*checksum, bytes))?.as_slice())?;
                    }
                    StoreWrite::RemoveBody { guid } => {
                        bodies.remove(guid.0)?;
                    }
                    StoreWrite::LogAppend { peer, seq, change } => {
                        log_entries.insert((peer.0, *seq), enc(change)?.as_slice())?;
                        let next = log_next.get(peer.0)?.map(|v| v.value()).unwrap_or(0);
                        log_next.insert(peer.0, next.max(seq + 1))?;
                    }
                    StoreWrite::LogRemove { peer, seqs } => {
                        for seq in seqs {
                            log_entries.remove((peer.0, *seq))?;
                        }
                    }
                    StoreWrite::LogOverflow { peer, mailbox, overflowed } => {
                        let key = enc(&(peer.0, mailbox))?;
                        if *overflowed {
                            log_overflowed.insert(key.as_slice(), key.as_slice())?;
                        } else {
                            log_overflowed.remove(key.as_slice())?;
                        }
                    }
                    StoreWrite::MailboxLifecycle { mailbox, lifecycle } => {
                        ensure_mailbox(&mut mailboxes, mailbox)?;
                        let key = enc(mailbox)?;
                        let mut joined = *lifecycle;
                        if let Some(old) = lifecycles.get(key.as_slice())? {
                            let (created_at, deleted_at): (ModSeq, ModSeq) = dec(old.value(), "lifecycle")?;
                            joined.join(&Lifecycle { created_at, deleted_at });
                        }
                        lifecycles.insert(key.as_slice(), enc(&(joined.created_at, joined.deleted_at))?.as_slice())?;
                    }
                    StoreWrite::Epoch { epoch } => raise(&mut meta, "epoch", *epoch)?,
                    StoreWrite::LinkSeq { seq } => raise(&mut meta, "link_seq", *seq)?,
                    StoreWrite::Incarnation { incarnation } => raise(&mut meta, "incarnation", *incarnation)?,
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// `DiskImage::apply` creates a mailbox on its first message: so does the store.
fn ensure_mailbox(table: &mut redb::Table<&[u8], &[u8]>, mailbox: &MailboxKey) -> Result<(), StoreError> {
    let key = enc(mailbox)?;
    if table.get(key.as_slice())?.is_none() {
        table.insert(key.as_slice(), enc(&(0u32, 0 as Uid, 0 as ModSeq))?.as_slice())?;
    }
    Ok(())
}

fn raise(meta: &mut redb::Table<&str, u64>, key: &str, value: u64) -> Result<(), StoreError> {
    let current = meta.get(key)?.map(|v| v.value()).unwrap_or(0);
    if value > current {
        meta.insert(key, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_read_back_as_the_same_image() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mailbox = MailboxKey::new("u@d", "INBOX");
        let record = MessageRecord {
            uid: 1,
            guid: Guid(7),
            received: 5,
            size: 3,
            checksum: 9,
            modseq: 1,
            flags: Default::default(),
        };
        let writes = vec![
            StoreWrite::Incarnation { incarnation: 1 },
            StoreWrite::MailboxMeta { mailbox: mailbox.clone(), uidvalidity: 42, uidnext: 2, highest_modseq: 1 },
            StoreWrite::PutMessage { mailbox: mailbox.clone(), record: record.clone() },
            StoreWrite::PutBody { guid: Guid(7), checksum: 9, bytes: b"abc".to_vec() },
            StoreWrite::PutTombstone {
                mailbox: mailbox.clone(),
                tombstone: Tombstone { uid: 3, guid: Guid(8), modseq: 2, expunged: true },
            },
            StoreWrite::PutMessage { mailbox: MailboxKey::new("v@d", "Box"), record: record.clone() },
            StoreWrite::RemoveMessage { mailbox: MailboxKey::new("v@d", "Box"), uid: 1 },
            StoreWrite::LogAppend {
                peer: Sid(2),
                seq: 4,
                change: Change::Copy { mailbox: mailbox.clone(), uidvalidity: 42, record },
            },
            StoreWrite::LogOverflow { peer: Sid(2), mailbox: mailbox.clone(), overflowed: true },
            StoreWrite::Epoch { epoch: 65537 },
            StoreWrite::Epoch { epoch: 3 },
            StoreWrite::MailboxLifecycle {
                mailbox: mailbox.clone(),
                lifecycle: Lifecycle { created_at: 2, deleted_at: 5 },
            },
            StoreWrite::MailboxLifecycle {
                mailbox: mailbox.clone(),
                lifecycle: Lifecycle { created_at: 6, deleted_at: 0 },
            },
            StoreWrite::LinkSeq { seq: 6 },
        ];
        let mut expected = DiskImage::default();
        for w in &writes {
            expected.apply(w);
        }
        store.apply(&writes[..5]).unwrap();
        store.apply(&writes[5..]).unwrap();
        drop(store);
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(again.load().unwrap(), expected);
    }
}
