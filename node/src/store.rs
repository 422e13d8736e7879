//! The durable store: redb tables mirroring the core's [`DiskImage`] (metadata: no
//! message bytes), and the body files of [`crate::bodies`]. The core's [`StoreWrite`]s
//! are applied in order, many per transaction (group commit); a transaction commits with
//! fsync, after the body files it references are durable, before the core hears that its
//! writes are durable. On start the metadata is read back whole and handed to
//! `Server::recover` with a [`BodyReader`] for the bytes.

use crate::bodies::{
    BodyFiles, BodyHash, BodyIndex, BodyReader, INLINE_BODY_LEN_MAX_DEFAULT, INLINE_CHUNKS, INLINE_TAILS, InlineTables,
    hash_of,
};
use crate::codec::{Bincode, RecordCodec};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use tandem_core::msg::Change;
use tandem_core::store::{DiskImage, StoreWrite, StoredBody};
use tandem_core::types::*;

/// "epoch", "link_seq", "incarnation", "store_id", "newcomer" (1 when set) -> u64; in a
/// backup not started yet,
/// [`BACKUP_TAKEN_KEY`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// A backup's snapshot time (seconds since the Unix epoch), until its first start.
const BACKUP_TAKEN_KEY: &str = "backup_taken_unix_s";
/// mailbox -> (uidvalidity, uidnext, highest_modseq).
const MAILBOXES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mailboxes");
/// (mailbox, uid) -> (mailbox, record).
const MESSAGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("messages");
/// (mailbox, uid, guid) -> (mailbox, tombstone).
const TOMBSTONES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tombstones");
/// Before body files: guid -> (checksum, bytes). Converted to files at open.
const LEGACY_BODIES: TableDefinition<u128, &[u8]> = TableDefinition::new("bodies");
/// guid -> checksum (8 bytes LE), length (8 bytes LE), SHA-256 of the bytes (32).
const BODY_REFS: TableDefinition<u128, &[u8]> = TableDefinition::new("body_refs");
/// SHA-256 -> how many GUIDs reference that body (a file or rows of [`INLINE_TAILS`] and [`INLINE_CHUNKS`]).
const BODY_COUNTS: TableDefinition<&[u8], u64> = TableDefinition::new("body_counts");
/// (peer, seq) -> change.
const LOG_ENTRIES: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("log_entries");
/// peer -> next seq.
const LOG_NEXT: TableDefinition<u32, u64> = TableDefinition::new("log_next");
/// "members" -> the membership as the core last stored it (servers added or retired
/// after the configuration was written).
const MEMBERSHIP: TableDefinition<&str, &[u8]> = TableDefinition::new("membership");
/// mailbox -> (created_at, deleted_at) of mailboxes a client created or deleted.
const LIFECYCLES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("lifecycles");
/// mailbox -> its retired UIDs (ranges and the modseq of the last collection), for
/// mailboxes whose tombstones were collected.
const RETIRED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("retired");
/// (peer, mailbox) -> (peer, mailbox) for mailboxes that overflowed a peer's log.
const LOG_OVERFLOWED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("log_overflowed");
/// guid -> a partial replica's text parts of a message whose body it omits (small: the
/// text of large messages only, so in a table rather than body files).
const TEXT_PARTS: TableDefinition<u128, &[u8]> = TableDefinition::new("text_parts");
/// guid -> nothing: omitted bodies fetched for a client's read, dropped once read.
const ON_LOAN: TableDefinition<u128, &[u8]> = TableDefinition::new("on_loan");
/// mailbox -> nothing: a newcomer store's copies a master confirmed (see
/// `DiskImage::confirmed`).
const CONFIRMED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("confirmed");
/// (mailbox, UIDVALIDITY, UID, GUID) -> nothing: bindings whose tombstones this server
/// saw collected (see `DiskImage::collected`), at most 65,536 of them.
const COLLECTED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("collected");

#[derive(Debug)]
pub struct StoreError(pub String);

/// How often a start retries a store another process holds.
const STORE_HELD_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

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

fn io_error(what: &str, e: std::io::Error) -> StoreError {
    StoreError(format!("{what}: {e}"))
}

/// Copies one table of a snapshot (none if the snapshot lacks it); returns its rows.
fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    src: &redb::ReadTransaction,
    dst: &redb::WriteTransaction,
    definition: TableDefinition<K, V>,
) -> Result<u64, StoreError> {
    let table = match src.open_table(definition) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut out = dst.open_table(definition)?;
    let mut rows = 0;
    for row in table.iter()? {
        let (key, value) = row?;
        out.insert(key.value(), value.value())?;
        rows += 1;
    }
    Ok(rows)
}

/// A body reference as stored: checksum, length, hash.
fn encode_ref(checksum: u64, len: u64, hash: &BodyHash) -> [u8; 48] {
    let mut out = [0u8; 48];
    out[..8].copy_from_slice(&checksum.to_le_bytes());
    out[8..16].copy_from_slice(&len.to_le_bytes());
    out[16..].copy_from_slice(hash);
    out
}

fn decode_ref(bytes: &[u8]) -> Result<(u64, u64, BodyHash), StoreError> {
    let bad = || StoreError("corrupt body reference".into());
    let checksum = u64::from_le_bytes(bytes.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
    let len = u64::from_le_bytes(bytes.get(8..16).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
    let hash: BodyHash = bytes.get(16..48).ok_or_else(bad)?.try_into().map_err(|_| bad())?;
    Ok((checksum, len, hash))
}

pub struct Store {
    db: Arc<Database>,
    files: BodyFiles,
    /// GUID -> body, shared with the core's [`BodyReader`] and across reopens.
    index: BodyIndex,
    /// Bodies up to this size are stored in the database, larger ones in files.
    inline_len_max: u64,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.index.detach(&self.db);
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with_index(dir, BodyIndex::default(), INLINE_BODY_LEN_MAX_DEFAULT)
    }

    /// Opens the store, or opens it again after a failure keeping the index the core
    /// reads through; new bodies up to `inline_len_max` bytes go into the database.
    pub fn open_with_index(dir: &Path, index: BodyIndex, inline_len_max: u64) -> Result<Store, StoreError> {
        Store::open_waiting(dir, index, inline_len_max, std::time::Duration::ZERO)
    }

    /// Opens the store as [`Store::open_with_index`] does, but while another process
    /// holds the database (an earlier run of this node still stopping, as after a
    /// restart that did not wait for the stop) retries for up to `wait` before failing.
    pub fn open_waiting(
        dir: &Path,
        index: BodyIndex,
        inline_len_max: u64,
        wait: std::time::Duration,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        let started = std::time::Instant::now();
        let mut warned = false;
        let db = loop {
            match Database::create(dir.join("tandem.redb")) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if started.elapsed() < wait => {
                    if !warned {
                        tracing::warn!(
                            wait_s = wait.as_secs(),
                            "the store is held by another process (an earlier run still stopping?); waiting for it"
                        );
                        warned = true;
                    }
                    std::thread::sleep(STORE_HELD_RETRY);
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(StoreError(format!(
                        "{}: held by another process (is this node already running?)",
                        dir.join("tandem.redb").display()
                    )));
                }
                other => break Arc::new(other?),
            }
        };
        let txn = begin_write(&db)?;
        {
            txn.open_table(META)?;
            txn.open_table(MAILBOXES)?;
            txn.open_table(MESSAGES)?;
            txn.open_table(TOMBSTONES)?;
            txn.open_table(BODY_REFS)?;
            txn.open_table(BODY_COUNTS)?;
            txn.open_table(INLINE_CHUNKS)?;
            txn.open_table(INLINE_TAILS)?;
            txn.open_table(LOG_ENTRIES)?;
            txn.open_table(LOG_NEXT)?;
            txn.open_table(LOG_OVERFLOWED)?;
            txn.open_table(LIFECYCLES)?;
            txn.open_table(RETIRED)?;
            txn.open_table(TEXT_PARTS)?;
            txn.open_table(ON_LOAN)?;
            txn.open_table(CONFIRMED)?;
            txn.open_table(COLLECTED)?;
        }
        txn.commit()?;
        index.attach(db.clone());
        let store = Store { db, files: BodyFiles::new(dir), index, inline_len_max };
        store.convert_legacy_bodies()?;
        Ok(store)
    }

    /// What the core reads bodies through.
    pub fn body_reader(&self) -> BodyReader {
        BodyReader { files: self.files.clone(), index: self.index.clone() }
    }

    pub fn index(&self) -> &BodyIndex {
        &self.index
    }

    /// Deletes the files a backup kept (see [`BodyIndex::hold_removals`]) once it is done,
    /// those still without a reference: run between commits, so none that a commit
    /// referenced again is deleted.
    fn remove_released_files(&self) -> Result<(), StoreError> {
        let released = self.index.released_removals();
        if released.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_read()?;
        let counts = txn.open_table(BODY_COUNTS)?;
        for hash in released {
            if counts.get(hash.as_slice())?.is_none() {
                self.files.remove(&hash);
            }
        }
        Ok(())
    }

    /// Copies every table of the snapshot `src` into `dst` (a new store's first
    /// transaction): a backup. Returns (mailboxes, messages) copied and the hashes of
    /// the bodies that live in files.
    /// `taken_unix_s` is the snapshot's time, kept in the copy until its first start (see
    /// [`Store::restored_backup_taken`]).
    pub fn copy_snapshot(
        src: &redb::ReadTransaction,
        dst: &redb::WriteTransaction,
        taken_unix_s: u64,
    ) -> Result<(u64, u64, BTreeSet<BodyHash>), StoreError> {
        let mailboxes = copy_table(src, dst, MAILBOXES)?;
        let messages = copy_table(src, dst, MESSAGES)?;
        copy_table(src, dst, META)?;
        // A restored copy is not the store that acknowledged what came after the
        // snapshot: without an identity, it draws a new one at its first start, and no
        // master counts those acknowledgements as its copies (see `DiskImage::store_id`).
        // And its copies may be days behind when it is put back: it starts as a newcomer
        // whose copies no master has confirmed (`DiskImage::backup_copy`).
        let mut meta = dst.open_table(META)?;
        meta.remove("store_id")?;
        meta.insert("newcomer", 1)?;
        meta.insert(BACKUP_TAKEN_KEY, taken_unix_s)?;
        drop(meta);
        copy_table(src, dst, TOMBSTONES)?;
        copy_table(src, dst, LEGACY_BODIES)?;
        copy_table(src, dst, BODY_REFS)?;
        copy_table(src, dst, BODY_COUNTS)?;
        copy_table(src, dst, LOG_ENTRIES)?;
        copy_table(src, dst, LOG_NEXT)?;
        copy_table(src, dst, MEMBERSHIP)?;
        copy_table(src, dst, LIFECYCLES)?;
        copy_table(src, dst, RETIRED)?;
        copy_table(src, dst, LOG_OVERFLOWED)?;
        copy_table(src, dst, TEXT_PARTS)?;
        copy_table(src, dst, ON_LOAN)?;
        dst.open_table(CONFIRMED)?;
        copy_table(src, dst, COLLECTED)?;
        copy_table(src, dst, crate::bodies::INLINE_CHUNKS)?;
        copy_table(src, dst, crate::bodies::INLINE_TAILS)?;
        let mut in_files = BTreeSet::new();
        if let Ok(refs) = src.open_table(BODY_REFS) {
            let tails = src.open_table(crate::bodies::INLINE_TAILS)?;
            for row in refs.iter()? {
                let (_, value) = row?;
                let (_, _, hash) = decode_ref(value.value())?;
                if tails.get(hash)?.is_none() {
                    in_files.insert(hash);
                }
            }
        }
        Ok((mailboxes, messages, in_files))
    }

    /// The hashes of the bodies held in the database rather than in files.
    pub fn inline_hashes(&self) -> Result<BTreeSet<BodyHash>, StoreError> {
        let txn = self.db.begin_read()?;
        let mut out = BTreeSet::new();
        for row in txn.open_table(INLINE_TAILS)?.iter()? {
            let (k, _) = row?;
            out.insert(k.value());
        }
        Ok(out)
    }

    /// A store written before body files kept bodies in a redb table: each becomes a
    /// file, and the table is dropped in the transaction that references the files.
    fn convert_legacy_bodies(&self) -> Result<(), StoreError> {
        let read = self.db.begin_read()?;
        let legacy = read.list_tables()?.any(|t| t.name() == LEGACY_BODIES.name());
        drop(read);
        if !legacy {
            return Ok(());
        }
        let txn = begin_write(&self.db)?;
        let mut converted = 0u64;
        let mut bodies = BodyBatch::new(self.inline_len_max);
        {
            let legacy = txn.open_table(LEGACY_BODIES)?;
            let mut tables = BodyTables::open(&txn)?;
            for row in legacy.iter()? {
                let (k, v) = row?;
                let (checksum, bytes): (u64, Vec<u8>) = dec(v.value(), "body")?;
                bodies.put(&self.files, &mut tables, Guid(k.value()), checksum, &bytes)?;
                converted += 1;
            }
            if bodies.wrote {
                self.files.sync_dir(bodies.created).map_err(|e| io_error("syncing the body directory", e))?;
            }
        }
        txn.delete_table(LEGACY_BODIES)?;
        txn.commit()?;
        tracing::info!(bodies = converted, "converted the store's bodies to body files and rows");
        Ok(())
    }

    /// When the backup this store is was taken (seconds since the Unix epoch), while it
    /// has not started as a node yet; None for any other store.
    pub fn restored_backup_taken(&self) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        if meta.get("store_id")?.is_some() {
            return Ok(None);
        }
        Ok(meta.get(BACKUP_TAKEN_KEY)?.map(|v| v.value()))
    }

    /// Everything the core wrote, as one image.
    pub fn load(&self) -> Result<DiskImage, StoreError> {
        let txn = self.db.begin_read()?;
        let mut image = DiskImage::default();
        let meta = txn.open_table(META)?;
        image.epoch = meta.get("epoch")?.map(|v| v.value()).unwrap_or(0);
        image.link_seq = meta.get("link_seq")?.map(|v| v.value()).unwrap_or(0);
        image.incarnation = meta.get("incarnation")?.map(|v| v.value()).unwrap_or(0);
        image.store_id = meta.get("store_id")?.map(|v| v.value()).unwrap_or(0);
        image.newcomer = meta.get("newcomer")?.is_some_and(|v| v.value() != 0);
        match txn.open_table(MEMBERSHIP) {
            Ok(table) => {
                if let Some(v) = table.get("members")? {
                    image.members = dec(v.value(), "membership")?;
                }
            }
            // A store written before membership changes existed.
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
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
        // A million references load in one pass, in key order, into maps built whole.
        // Only the body files present are looked up, not every reference's hash kept.
        let mut unreferenced_files = self.files.present().map_err(|e| io_error("listing body files", e))?;
        let mut bodies = Vec::new();
        let mut index = Vec::new();
        for row in txn.open_table(BODY_REFS)?.iter()? {
            let (k, v) = row?;
            let (checksum, len, hash) = decode_ref(v.value())?;
            bodies.push((Guid(k.value()), StoredBody { checksum, len }));
            index.push((Guid(k.value()), hash));
            unreferenced_files.remove(&Some(hash));
        }
        image.bodies = bodies.into_iter().collect();
        self.index.replace(index.into_iter().collect());
        let deleted =
            self.files.remove_unreferenced(&unreferenced_files).map_err(|e| io_error("collecting body files", e))?;
        if deleted > 0 {
            tracing::info!(files = deleted, "deleted body files no message references (left by a crash)");
        }
        for row in txn.open_table(LOG_ENTRIES)?.iter()? {
            let (k, v) = row?;
            let (peer, seq) = k.value();
            let mut change: Change = dec(v.value(), "log entry")?;
            if let Change::Save { body, .. } = &mut change {
                // A log written before logs referenced bodies held the bytes: the core
                // reads them from the body files when it sends the entry.
                *body = Body::new();
            }
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
            image.mailboxes.entry(mailbox).or_default().lifecycle.join(&decode_lifecycle(v.value())?);
        }
        for row in txn.open_table(RETIRED)?.iter()? {
            let (k, v) = row?;
            let mailbox: MailboxKey = dec(k.value(), "mailbox key")?;
            let retired: Retired = dec(v.value(), "retired UIDs")?;
            if !retired.well_formed() {
                return Err(StoreError(format!("corrupt retired UIDs record of {mailbox}: ranges overlap")));
            }
            image.mailboxes.entry(mailbox).or_default().retired = retired;
        }
        for row in txn.open_table(LOG_OVERFLOWED)?.iter()? {
            let (_, v) = row?;
            let (peer, mailbox): (u32, MailboxKey) = dec(v.value(), "overflow mark")?;
            image.logs.entry(Sid(peer)).or_default().overflowed.insert(mailbox);
        }
        for row in txn.open_table(TEXT_PARTS)?.iter()? {
            let (k, v) = row?;
            image.text_parts.insert(Guid(k.value()), Body::copy_from_slice(v.value()));
        }
        for row in txn.open_table(ON_LOAN)?.iter()? {
            let (k, _) = row?;
            image.on_loan.insert(Guid(k.value()));
        }
        for row in txn.open_table(CONFIRMED)?.iter()? {
            let (k, _) = row?;
            image.confirmed.insert(dec(k.value(), "mailbox key")?);
        }
        // Only advice (what the core drops late copies by): a damaged row is skipped,
        // not a reason to refuse the store.
        let mut damaged = 0u64;
        for row in txn.open_table(COLLECTED)?.iter()? {
            let (k, _) = row?;
            match dec::<(MailboxKey, u32, Uid, Guid)>(k.value(), "collected binding") {
                Ok((mailbox, uidvalidity, uid, guid)) => {
                    image.collected.entry(mailbox).or_default().insert((uidvalidity, uid, guid));
                }
                Err(_) => damaged += 1,
            }
        }
        if damaged > 0 {
            tracing::warn!(rows = damaged, "skipped damaged rows of the table of collected bindings");
        }
        Ok(image)
    }

    /// Applies writes in order in one transaction and commits it durably. Writes that
    /// read (a lifecycle join, a log's next seq) read the transaction, so they see what
    /// the earlier writes of the batch did.
    pub fn apply(&self, writes: &[StoreWrite]) -> Result<(), StoreError> {
        let txn = begin_write(&self.db)?;
        let mut bodies = BodyBatch::new(self.inline_len_max);
        {
            let mut meta = txn.open_table(META)?;
            let mut mailboxes = txn.open_table(MAILBOXES)?;
            let mut messages = txn.open_table(MESSAGES)?;
            let mut tombstones = txn.open_table(TOMBSTONES)?;
            let mut body_tables = BodyTables::open(&txn)?;
            let mut log_entries = txn.open_table(LOG_ENTRIES)?;
            let mut log_next = txn.open_table(LOG_NEXT)?;
            let mut log_overflowed = txn.open_table(LOG_OVERFLOWED)?;
            let mut lifecycles = txn.open_table(LIFECYCLES)?;
            let mut retired_uids = txn.open_table(RETIRED)?;
            let mut membership = txn.open_table(MEMBERSHIP)?;
            let mut text_parts = txn.open_table(TEXT_PARTS)?;
            let mut on_loan = txn.open_table(ON_LOAN)?;
            let mut confirmed = txn.open_table(CONFIRMED)?;
            let mut collected = txn.open_table(COLLECTED)?;
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
                        bodies.put(&self.files, &mut body_tables, *guid, *checksum, bytes)?;
                    }
                    StoreWrite::RemoveBody { guid } => {
                        bodies.remove(&mut body_tables, *guid)?;
                    }
                    StoreWrite::PutTextParts { guid, bytes } => {
                        text_parts.insert(guid.0, bytes.as_ref())?;
                    }
                    StoreWrite::RemoveTextParts { guid } => {
                        text_parts.remove(guid.0)?;
                    }
                    StoreWrite::OnLoan { guid, on_loan: true } => {
                        on_loan.insert(guid.0, &[][..])?;
                    }
                    StoreWrite::OnLoan { guid, on_loan: false } => {
                        on_loan.remove(guid.0)?;
                    }
                    StoreWrite::LogAppend { peer, seq, change } => {
                        log_entries.insert((peer.0, *seq), enc(change)?.as_slice())?;
                        let next = log_next.get(peer.0)?.map(|v| v.value()).unwrap_or(0);
                        log_next.insert(peer.0, next.max(seq + 1))?;
                    }
                    StoreWrite::LogRemove { peer, seqs } | StoreWrite::LogAcked { peer, seqs } => {
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
                            joined.join(&decode_lifecycle(old.value())?);
                        }
                        lifecycles.insert(key.as_slice(), encode_lifecycle(&joined)?.as_slice())?;
                    }
                    StoreWrite::RetireUids { mailbox, retired } => {
                        ensure_mailbox(&mut mailboxes, mailbox)?;
                        retire_uids(&mut retired_uids, &mut tombstones, mailbox, retired)?;
                    }
                    StoreWrite::NewValidity { mailbox } => {
                        let key = enc(mailbox)?;
                        retired_uids.remove(key.as_slice())?;
                        let mut old = Vec::new();
                        for row in tombstones.range(key.as_slice()..)? {
                            let (k, _) = row?;
                            if !k.value().starts_with(&key) {
                                break;
                            }
                            old.push(k.value().to_vec());
                        }
                        for k in old {
                            tombstones.remove(k.as_slice())?;
                        }
                    }
                    StoreWrite::Epoch { epoch } => raise(&mut meta, "epoch", *epoch)?,
                    StoreWrite::LinkSeq { seq } => raise(&mut meta, "link_seq", *seq)?,
                    StoreWrite::Newcomer => {
                        raise(&mut meta, "newcomer", 1)?;
                        // A newcomer trusts nothing it confirmed before (`DiskImage::newcomer`).
                        let old: Vec<Vec<u8>> = confirmed
                            .iter()?
                            .map(|row| row.map(|(k, _)| k.value().to_vec()))
                            .collect::<Result<_, _>>()?;
                        for k in old {
                            confirmed.remove(k.as_slice())?;
                        }
                    }
                    StoreWrite::Confirmed { mailbox } => {
                        confirmed.insert(enc(mailbox)?.as_slice(), &[][..])?;
                    }
                    StoreWrite::Collected { mailbox, uidvalidity, bindings } => {
                        for &(uid, guid) in bindings {
                            collected.insert(enc(&(mailbox, *uidvalidity, uid, guid))?.as_slice(), &[][..])?;
                        }
                    }
                    StoreWrite::ForgetCollected { mailbox, bindings } => {
                        for &(uidvalidity, uid, guid) in bindings {
                            collected.remove(enc(&(mailbox, uidvalidity, uid, guid))?.as_slice())?;
                        }
                    }
                    StoreWrite::Incarnation { incarnation, store_id } => {
                        raise(&mut meta, "incarnation", *incarnation)?;
                        // Set once, like the core's image: a store keeps its identity.
                        // A restored backup's first start gives it one: from then on it is
                        // this node's store, no longer a backup waiting to be restored.
                        if meta.get("store_id")?.is_none() {
                            meta.insert("store_id", *store_id)?;
                            meta.remove(BACKUP_TAKEN_KEY)?;
                        }
                    }
                    StoreWrite::Members { members } => {
                        let mut joined = members.clone();
                        if let Some(old) = membership.get("members")? {
                            joined.join(&dec(old.value(), "membership")?);
                        }
                        membership.insert("members", enc(&joined)?.as_slice())?;
                    }
                }
            }
        }
        if bodies.wrote {
            self.files.sync_dir(bodies.created).map_err(|e| io_error("syncing the body directory", e))?;
        }
        txn.commit()?;
        for hash in &bodies.unreferenced {
            if !self.index.defer_removal(hash) {
                self.files.remove(hash);
            }
        }
        self.remove_released_files()?;
        for (guid, hash) in bodies.index_changes {
            match hash {
                Some(hash) => self.index.set(guid, hash),
                None => self.index.unset(guid),
            }
        }
        Ok(())
    }
}

/// What one transaction does to the bodies: files written before it commits, deleted and
/// shown to the core's reads after; table rows written and deleted within it.
struct BodyBatch {
    inline_len_max: u64,
    /// A body file was written (the directory is synced once), and `bodies/` created.
    wrote: bool,
    created: bool,
    unreferenced: BTreeSet<BodyHash>,
    index_changes: Vec<(Guid, Option<BodyHash>)>,
}

/// The tables a body's references and small bytes live in.
struct BodyTables<'t> {
    refs: redb::Table<'t, u128, &'static [u8]>,
    counts: redb::Table<'t, &'static [u8], u64>,
    inline: InlineTables<'t>,
}

impl<'t> BodyTables<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<BodyTables<'t>, StoreError> {
        Ok(BodyTables {
            refs: txn.open_table(BODY_REFS)?,
            counts: txn.open_table(BODY_COUNTS)?,
            inline: InlineTables::open(txn)?,
        })
    }
}

impl BodyBatch {
    fn new(inline_len_max: u64) -> BodyBatch {
        BodyBatch {
            inline_len_max,
            wrote: false,
            created: false,
            unreferenced: BTreeSet::new(),
            index_changes: Vec::new(),
        }
    }

    /// Points `guid` at the body `bytes`, storing them unless another GUID's reference
    /// already holds them. A GUID stored again with the same bytes is a repair (its copy
    /// may be damaged): the bytes are written again where they are.
    fn put(
        &mut self,
        files: &BodyFiles,
        tables: &mut BodyTables<'_>,
        guid: Guid,
        checksum: u64,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let hash = hash_of(bytes);
        let old = match tables.refs.get(guid.0)? {
            Some(v) => Some(decode_ref(v.value())?.2),
            None => None,
        };
        let count = tables.counts.get(hash.as_slice())?.map(|c| c.value()).unwrap_or(0);
        let same = old == Some(hash);
        if count == 0 || same {
            let inline =
                if count == 0 { bytes.len() as u64 <= self.inline_len_max } else { tables.inline.contains(&hash)? };
            if inline {
                tables.inline.write(&hash, bytes)?;
            } else {
                self.created |= files.write(&hash, bytes).map_err(|e| io_error("writing a body file", e))?;
                self.wrote = true;
            }
            self.unreferenced.remove(&hash);
        }
        if !same {
            if let Some(old) = old {
                self.release(tables, old)?;
            }
            tables.counts.insert(hash.as_slice(), count + 1)?;
        }
        tables.refs.insert(guid.0, encode_ref(checksum, bytes.len() as u64, &hash).as_slice())?;
        self.index_changes.push((guid, Some(hash)));
        Ok(())
    }

    fn remove(&mut self, tables: &mut BodyTables<'_>, guid: Guid) -> Result<(), StoreError> {
        let old = match tables.refs.remove(guid.0)? {
            Some(v) => Some(decode_ref(v.value())?.2),
            None => None,
        };
        if let Some(old) = old {
            self.release(tables, old)?;
            self.index_changes.push((guid, None));
        }
        Ok(())
    }

    /// One reference fewer to `hash`; if none is left its row goes now and its file (if
    /// it has one) after the commit.
    fn release(&mut self, tables: &mut BodyTables<'_>, hash: BodyHash) -> Result<(), StoreError> {
        let count = tables.counts.get(hash.as_slice())?.map(|c| c.value()).unwrap_or(0);
        if count <= 1 {
            tables.counts.remove(hash.as_slice())?;
            if !tables.inline.remove(&hash)? {
                self.unreferenced.insert(hash);
            }
        } else {
            tables.counts.insert(hash.as_slice(), count - 1)?;
        }
        Ok(())
    }
}

/// Every write transaction saves redb's allocator state and commits in two phases
/// ("quick repair"): a node killed in the middle reopens at once. Without it redb
/// rebuilds its allocator state after a crash by reading the whole file (its checksums
/// too), and with small bodies in the file that took 15 s for a million 4 KB messages
/// on tmpfs, minutes for a large store on a disk. The price is one more fsync per
/// commit, which a batch of deliveries shares.
fn begin_write(db: &Database) -> Result<redb::WriteTransaction, StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_quick_repair(true);
    Ok(txn)
}

/// `DiskImage::apply` creates a mailbox on its first message: so does the store.
fn ensure_mailbox(table: &mut redb::Table<&[u8], &[u8]>, mailbox: &MailboxKey) -> Result<(), StoreError> {
    let key = enc(mailbox)?;
    if table.get(key.as_slice())?.is_none() {
        table.insert(key.as_slice(), enc(&(0u32, 0 as Uid, 0 as ModSeq))?.as_slice())?;
    }
    Ok(())
}

/// A lifecycle row: (created, deleted, subscribed, unsubscribed), with (special use
/// stamp, special use) after them when a client gave the mailbox one. A row without
/// those reads as it did before special uses were kept.
fn encode_lifecycle(l: &Lifecycle) -> Result<Vec<u8>, StoreError> {
    let row = (l.created_at, l.deleted_at, l.subscribed_at, l.unsubscribed_at);
    if l.special_use_at == 0 {
        return enc(&row);
    }
    enc(&(row.0, row.1, row.2, row.3, l.special_use_at, l.special_use.0))
}

/// A lifecycle row as [`encode_lifecycle`] writes it, or (created, deleted) as a store
/// written before subscriptions holds it.
fn decode_lifecycle(bytes: &[u8]) -> Result<Lifecycle, StoreError> {
    if let Ok((created_at, deleted_at, subscribed_at, unsubscribed_at, special_use_at, bits)) =
        dec::<(u64, u64, u64, u64, u64, u8)>(bytes, "lifecycle")
    {
        let special_use = SpecialUse(bits);
        if !special_use.is_valid() || special_use_at == 0 {
            return Err(StoreError("corrupt lifecycle record: a special use out of range".into()));
        }
        return Ok(Lifecycle { created_at, deleted_at, subscribed_at, unsubscribed_at, special_use, special_use_at });
    }
    if let Ok((created_at, deleted_at, subscribed_at, unsubscribed_at)) =
        dec::<(u64, u64, u64, u64)>(bytes, "lifecycle")
    {
        return Ok(Lifecycle { created_at, deleted_at, subscribed_at, unsubscribed_at, ..Lifecycle::default() });
    }
    let (created_at, deleted_at): (ModSeq, ModSeq) = dec(bytes, "lifecycle")?;
    Ok(Lifecycle { created_at, deleted_at, ..Lifecycle::default() })
}

/// Joins retired UIDs into a mailbox's and deletes the tombstones they cover (see
/// `StoredMailbox::retire`): a scan of that mailbox's tombstones, whose keys all start
/// with the mailbox's encoding (length-prefixed strings, so no other mailbox's do).
fn retire_uids(
    retired_uids: &mut redb::Table<&[u8], &[u8]>,
    tombstones: &mut redb::Table<&[u8], &[u8]>,
    mailbox: &MailboxKey,
    retired: &Retired,
) -> Result<(), StoreError> {
    let key = enc(mailbox)?;
    let mut joined = match retired_uids.get(key.as_slice())? {
        Some(old) => dec::<Retired>(old.value(), "retired UIDs")?,
        None => Retired::default(),
    };
    joined.join(retired);
    retired_uids.insert(key.as_slice(), enc(&joined)?.as_slice())?;
    let mut covered = Vec::new();
    for row in tombstones.range(key.as_slice()..)? {
        let (k, v) = row?;
        if !k.value().starts_with(&key) {
            break;
        }
        let (_, t): (MailboxKey, Tombstone) = dec(v.value(), "tombstone")?;
        if joined.covers(&t) {
            covered.push(k.value().to_vec());
        }
    }
    for k in covered {
        tombstones.remove(k.as_slice())?;
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
    use tandem_core::store::BodyStore;

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
            claimed: false,
            pushed: false,
        };
        let writes = vec![
            StoreWrite::Incarnation { incarnation: 1, store_id: 7 },
            StoreWrite::MailboxMeta { mailbox: mailbox.clone(), uidvalidity: 42, uidnext: 2, highest_modseq: 1 },
            StoreWrite::PutMessage { mailbox: mailbox.clone(), record: record.clone() },
            StoreWrite::PutBody { guid: Guid(7), checksum: 9, bytes: Body::from_static(b"abc") },
            StoreWrite::PutTombstone { mailbox: mailbox.clone(), tombstone: Tombstone::expunge(3, Guid(8), 2) },
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
                lifecycle: Lifecycle {
                    created_at: 2,
                    deleted_at: 5,
                    subscribed_at: 3,
                    special_use: SpecialUse(32),
                    special_use_at: 2,
                    ..Lifecycle::default()
                },
            },
            StoreWrite::MailboxLifecycle {
                mailbox: mailbox.clone(),
                lifecycle: Lifecycle { created_at: 6, unsubscribed_at: 4, ..Lifecycle::default() },
            },
            StoreWrite::LinkSeq { seq: 6 },
            // Tombstones in two mailboxes whose names share a prefix: a collection in one
            // drops only its own covered tombstones (UID 3 at modseq 2), not the other's,
            // nor one above the collection's modseq.
            StoreWrite::PutTombstone {
                mailbox: MailboxKey::new("u@d", "INBOX2"),
                tombstone: Tombstone::expunge(3, Guid(8), 2),
            },
            StoreWrite::PutTombstone { mailbox: mailbox.clone(), tombstone: Tombstone::retirement(4, Guid(9), 9) },
            StoreWrite::RetireUids {
                mailbox: mailbox.clone(),
                retired: Retired { ranges: [(2, 4)].into_iter().collect(), collected: 6 },
            },
            StoreWrite::RetireUids {
                mailbox: mailbox.clone(),
                retired: Retired { ranges: [(8, 8)].into_iter().collect(), collected: 5 },
            },
            StoreWrite::PutTextParts { guid: Guid(7), bytes: Body::from_static(b"the text") },
            StoreWrite::PutTextParts { guid: Guid(8), bytes: Body::from_static(b"gone") },
            StoreWrite::RemoveTextParts { guid: Guid(8) },
            StoreWrite::OnLoan { guid: Guid(7), on_loan: true },
            StoreWrite::OnLoan { guid: Guid(8), on_loan: true },
            StoreWrite::OnLoan { guid: Guid(8), on_loan: false },
            StoreWrite::Confirmed { mailbox: MailboxKey::new("v@d", "Box") },
            // A newcomer forgets what it had confirmed.
            StoreWrite::Newcomer,
            StoreWrite::Confirmed { mailbox: mailbox.clone() },
            StoreWrite::Confirmed { mailbox: mailbox.clone() },
            StoreWrite::Collected {
                mailbox: mailbox.clone(),
                uidvalidity: 42,
                bindings: vec![(2, Guid(20)), (3, Guid(30))],
            },
            StoreWrite::Collected {
                mailbox: MailboxKey::new("v@d", "Box"),
                uidvalidity: 1,
                bindings: vec![(5, Guid(50))],
            },
            StoreWrite::ForgetCollected {
                mailbox: mailbox.clone(),
                bindings: vec![(42, 2, Guid(20)), (41, 3, Guid(30))],
            },
            StoreWrite::ForgetCollected { mailbox: MailboxKey::new("v@d", "Box"), bindings: vec![(1, 5, Guid(50))] },
            // A later start keeps the store's identity whatever it is told.
            StoreWrite::Incarnation { incarnation: 2, store_id: 8 },
        ];
        let mut expected = DiskImage::default();
        for w in &writes {
            expected.apply(w);
        }
        store.apply(&writes[..5]).unwrap();
        store.apply(&writes[5..]).unwrap();
        drop(store);
        let again = Store::open(dir.path()).unwrap();
        let loaded = again.load().unwrap();
        assert_eq!(loaded, expected);
        assert!(loaded.newcomer && loaded.confirmed.iter().eq([&mailbox]));
        let inbox = &loaded.mailboxes[&mailbox];
        assert_eq!(inbox.tombstones.keys().map(|(uid, _)| *uid).collect::<Vec<_>>(), vec![4]);
        assert_eq!(inbox.retired.ranges.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(), vec![(2, 4), (8, 8)]);
        assert_eq!(inbox.retired.collected, 6);
        assert_eq!(loaded.mailboxes[&MailboxKey::new("u@d", "INBOX2")].tombstones.len(), 1);
        assert_eq!(loaded.text_parts.keys().copied().collect::<Vec<_>>(), vec![Guid(7)], "text parts are kept");
        assert_eq!(loaded.on_loan.iter().copied().collect::<Vec<_>>(), vec![Guid(7)], "and loan marks");
        assert_eq!((loaded.incarnation, loaded.store_id), (2, 7), "the identity it was made with");
        let collected: Vec<_> =
            loaded.collected.iter().flat_map(|(m, b)| b.iter().map(move |b| (m.clone(), *b))).collect();
        assert_eq!(
            collected,
            vec![(mailbox.clone(), (42, 3, Guid(30)))],
            "the memory of collections, forgotten ones gone"
        );
    }

    fn store_inline_count(dir: &Path) -> usize {
        Store::open(dir).unwrap().inline_hashes().unwrap().len()
    }

    fn body_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("bodies")).map(|d| d.count()).unwrap_or(0)
    }

    fn put(guid: u128, bytes: &'static [u8]) -> StoreWrite {
        StoreWrite::PutBody {
            guid: Guid(guid),
            checksum: tandem_core::hash::body_checksum(bytes),
            bytes: Body::from_static(bytes),
        }
    }

    /// A store that keeps every body in a file.
    fn open_with_files(dir: &Path) -> Store {
        Store::open_with_index(dir, BodyIndex::default(), 0).unwrap()
    }

    #[test]
    fn a_body_is_stored_once_whatever_the_number_of_guids() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_with_files(dir.path());
        let writes: Vec<StoreWrite> = (0..1000).map(|g| put(g, b"one body for a thousand recipients")).collect();
        store.apply(&writes).unwrap();
        assert_eq!(body_files(dir.path()), 1);
        let reader = store.body_reader();
        assert_eq!(reader.read(Guid(999)).as_deref(), Some(&b"one body for a thousand recipients"[..]));
        // The file goes with its last reference, not before.
        store.apply(&(0..999).map(|g| StoreWrite::RemoveBody { guid: Guid(g) }).collect::<Vec<_>>()).unwrap();
        assert_eq!(body_files(dir.path()), 1);
        assert!(reader.read(Guid(3)).is_none());
        store.apply(&[StoreWrite::RemoveBody { guid: Guid(999) }]).unwrap();
        assert_eq!(body_files(dir.path()), 0);
        // Removed and stored again in one batch: the file stays.
        store.apply(&[put(1, b"x"), StoreWrite::RemoveBody { guid: Guid(1) }, put(2, b"x")]).unwrap();
        assert_eq!(reader.read(Guid(2)).as_deref(), Some(&b"x"[..]));
    }

    #[test]
    fn a_damaged_body_file_spoils_one_body_and_is_rewritten_by_a_repair() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_with_files(dir.path());
        store.apply(&[put(1, b"first"), put(2, b"second")]).unwrap();
        let path = BodyFiles::new(dir.path()).path_of(&hash_of(b"first"));
        std::fs::write(&path, b"firsT").unwrap();
        std::fs::remove_file(BodyFiles::new(dir.path()).path_of(&hash_of(b"second"))).unwrap();
        drop(store);
        // Reopened with small bodies in the database: the damaged ones stay in files.
        let store = Store::open(dir.path()).unwrap();
        let image = store.load().unwrap();
        assert_eq!(image.bodies.len(), 2, "the store opens with both references");
        let reader = store.body_reader();
        assert_eq!(reader.read(Guid(1)).as_deref(), Some(&b"firsT"[..]), "the core sees the damage and repairs");
        assert!(reader.read(Guid(2)).is_none());
        assert!(reader.read_verified(Guid(1)).is_none(), "a client's read off the loop never gets damaged bytes");
        assert!(reader.read_verified(Guid(2)).is_none());
        store.apply(&[put(1, b"first"), put(2, b"second")]).unwrap();
        assert_eq!(reader.read(Guid(1)).as_deref(), Some(&b"first"[..]));
        assert_eq!(reader.read_verified(Guid(1)).as_deref(), Some(&b"first"[..]));
        assert_eq!(reader.read(Guid(2)).as_deref(), Some(&b"second"[..]));
    }

    #[test]
    fn files_left_by_a_crash_are_deleted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_with_files(dir.path());
        store.apply(&[put(1, b"kept")]).unwrap();
        // A body written whose transaction never committed, and a half-written one.
        let files = BodyFiles::new(dir.path());
        files.write(&hash_of(b"orphan"), b"orphan").unwrap();
        std::fs::write(files.path_of(&hash_of(b"half")).with_extension("tmp"), b"ha").unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        store.load().unwrap();
        assert_eq!(body_files(dir.path()), 1);
        assert_eq!(store.body_reader().read(Guid(1)).as_deref(), Some(&b"kept"[..]));
    }

    #[test]
    fn small_bodies_live_in_the_database_and_large_ones_in_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with_index(dir.path(), BodyIndex::default(), 8).unwrap();
        store.apply(&[put(1, b"small"), put(2, b"small"), put(3, b"larger than 8"), put(4, b"tiny")]).unwrap();
        assert_eq!(body_files(dir.path()), 1);
        assert_eq!(store.inline_hashes().unwrap(), BTreeSet::from([hash_of(b"small"), hash_of(b"tiny")]));
        let reader = store.body_reader();
        assert_eq!(reader.read(Guid(2)).as_deref(), Some(&b"small"[..]));
        assert_eq!(reader.read(Guid(3)).as_deref(), Some(&b"larger than 8"[..]));
        // A row goes with its last reference, in the same transaction; a repair rewrites it.
        store.apply(&[StoreWrite::RemoveBody { guid: Guid(1) }, put(2, b"small")]).unwrap();
        assert_eq!(store.inline_hashes().unwrap().len(), 2);
        store.apply(&[StoreWrite::RemoveBody { guid: Guid(2) }, StoreWrite::RemoveBody { guid: Guid(4) }]).unwrap();
        assert!(store.inline_hashes().unwrap().is_empty());
        assert!(reader.read(Guid(2)).is_none());
        // Removed and stored again in one batch: the row stays.
        store.apply(&[put(5, b"again"), StoreWrite::RemoveBody { guid: Guid(5) }, put(6, b"again")]).unwrap();
        assert_eq!(reader.read(Guid(6)).as_deref(), Some(&b"again"[..]));
        // The reader follows the store across a reopen (after a failed commit).
        drop(store);
        assert!(reader.read(Guid(6)).is_none(), "a closed store reads as no body");
        let store = Store::open_with_index(dir.path(), reader.index.clone(), 8).unwrap();
        assert_eq!(reader.read(Guid(6)).as_deref(), Some(&b"again"[..]));
        let image = store.load().unwrap();
        assert_eq!(image.bodies.len(), 2);
        assert_eq!(body_files(dir.path()), 1);
    }

    #[test]
    fn a_small_body_is_stored_in_chunks_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let lens = [0, 1, crate::bodies::INLINE_CHUNK_LEN, crate::bodies::INLINE_CHUNK_LEN + 1, 10_000, 65_536];
        let bodies: Vec<Vec<u8>> = lens.iter().map(|&n| (0..n).map(|i| (i % 251) as u8).collect()).collect();
        let writes: Vec<StoreWrite> = bodies
            .iter()
            .enumerate()
            .map(|(g, b)| StoreWrite::PutBody {
                guid: Guid(g as u128),
                checksum: tandem_core::hash::body_checksum(b),
                bytes: Body::from(b.clone()),
            })
            .collect();
        store.apply(&writes).unwrap();
        assert_eq!(body_files(dir.path()), 0);
        assert_eq!(store.inline_hashes().unwrap().len(), lens.len());
        let reader = store.body_reader();
        for (g, b) in bodies.iter().enumerate() {
            assert_eq!(reader.read(Guid(g as u128)).as_deref(), Some(&b[..]), "body of {} bytes", b.len());
            assert_eq!(reader.read_verified(Guid(g as u128)).as_deref(), Some(&b[..]), "verified, {} bytes", b.len());
        }
        // Removing one body removes all of its chunks and none of its neighbours'.
        store.apply(&[StoreWrite::RemoveBody { guid: Guid(4) }]).unwrap();
        assert!(reader.read(Guid(4)).is_none());
        assert_eq!(reader.read(Guid(5)).as_deref(), Some(&bodies[5][..]));
        assert_eq!(store.inline_hashes().unwrap().len(), lens.len() - 1);
    }

    #[test]
    fn a_store_with_bodies_in_redb_is_converted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join("tandem.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut legacy = txn.open_table(LEGACY_BODIES).unwrap();
                for (guid, bytes) in [(1u128, &b"same"[..]), (2, b"same"), (3, b"other")] {
                    let row = enc(&(tandem_core::hash::body_checksum(bytes), bytes.to_vec())).unwrap();
                    legacy.insert(guid, row.as_slice()).unwrap();
                }
                // A lifecycle row from before subscriptions: (created, deleted).
                let mut lifecycles = txn.open_table(LIFECYCLES).unwrap();
                let inbox = enc(&MailboxKey::new("u@d", "INBOX")).unwrap();
                lifecycles.insert(inbox.as_slice(), enc(&(2u64, 5u64)).unwrap().as_slice()).unwrap();
                let mut log = txn.open_table(LOG_ENTRIES).unwrap();
                let change = Change::Save {
                    mailbox: MailboxKey::new("u@d", "INBOX"),
                    uidvalidity: 1,
                    record: MessageRecord {
                        uid: 1,
                        guid: Guid(1),
                        received: 0,
                        size: 4,
                        checksum: 0,
                        modseq: 1,
                        flags: Default::default(),
                        claimed: false,
                        pushed: false,
                    },
                    body: Body::from_static(b"same"),
                };
                log.insert((2, 0), enc(&change).unwrap().as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let image = store.load().unwrap();
        assert_eq!(image.bodies.len(), 3);
        assert_eq!(
            image.mailboxes[&MailboxKey::new("u@d", "INBOX")].lifecycle,
            Lifecycle { created_at: 2, deleted_at: 5, ..Lifecycle::default() }
        );
        assert_eq!(image.bodies[&Guid(3)].len, 5);
        assert_eq!(body_files(dir.path()), 0, "small bodies go into the database");
        assert_eq!(store.inline_hashes().unwrap().len(), 2);
        assert_eq!(store.body_reader().read(Guid(2)).as_deref(), Some(&b"same"[..]));
        let logged = &image.logs[&Sid(2)].entries[&0];
        assert!(matches!(logged, Change::Save { body, .. } if body.is_empty()), "a log references its body");
        drop(store);
        Store::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(store_inline_count(dir.path()), 2, "converted once");
    }
}
