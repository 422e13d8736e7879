//! Message bodies on disk, content-addressed by the SHA-256 of their bytes and shared by
//! every GUID with those bytes: a thousand recipients of one message, or a message in
//! many mailboxes, take one copy. Where a body lives depends on its size when it is
//! first stored:
//!
//! - **Small bodies** (up to `body_inline_max_bytes`, 64 KiB by default: most mail) live
//!   in the store's redb file, tables [`INLINE_CHUNKS`] and [`INLINE_TAILS`], written by the same transaction
//!   as the metadata that references them. A batch of deliveries then costs one commit,
//!   where a file per body cost an fsync each plus a directory fsync: on a real disk
//!   that is most of a delivery's time (BENCHMARKS.md, "Where a real disk's time goes").
//! - **Large bodies** live in files, `bodies/<64 hex>`: read and written whole without
//!   passing through a B-tree's pages, and a damaged file spoils one body and never the
//!   store (the core refetches it from a peer).
//!
//! A body stays where it was first put; a reader looks in the table, then for a file
//! (a store written before small bodies moved into redb has them all in files).
//!
//! Crash safety: a file is written (temporary name, fsync, rename, directory fsync)
//! before the transaction that references it commits, and deleted only after the
//! transaction that drops its last reference commits. A crash in between leaves an
//! unreferenced file, which the next start deletes ([`BodyFiles::remove_unreferenced`]). A
//! table row comes and goes with its references, in one transaction.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use tandem_core::store::BodyStore;
use tandem_core::types::{Body, Guid};

pub type BodyHash = [u8; 32];

/// (SHA-256, chunk number) -> a full chunk ([`INLINE_CHUNK_LEN`] bytes) of a small body.
pub const INLINE_CHUNKS: TableDefinition<(BodyHash, u32), &[u8]> = TableDefinition::new("inline_chunks");
/// SHA-256 -> the rest of a small body after its full chunks (maybe empty). Every small
/// body has a tail: it says the body is here.
pub const INLINE_TAILS: TableDefinition<BodyHash, &[u8]> = TableDefinition::new("inline_tails");

/// Bytes per full chunk: one chunk, its key and a leaf page's header fit one 4 KiB redb
/// page. A whole body as one value took the next power of two of pages (a body of
/// 4.1 KB took 8 KiB), and a body's last, short chunk next to its full ones took a page
/// to itself; tails in their own table share pages with other tails. Measured by
/// `cargo run --release -p tandem-node --example inline_layout` (100,000 bodies, bytes
/// of pages per body): 4,080-byte bodies 8,348 as one value against 5,028 as chunks,
/// 10,000-byte bodies 16,541 against 13,511; a file on a 4 KiB-block filesystem takes
/// 4,096 and 12,288 plus its inode.
pub const INLINE_CHUNK_LEN: usize = 3968;

/// The tables small bodies live in, open in a write transaction.
pub struct InlineTables<'t> {
    chunks: redb::Table<'t, (BodyHash, u32), &'static [u8]>,
    tails: redb::Table<'t, BodyHash, &'static [u8]>,
}

impl<'t> InlineTables<'t> {
    pub fn open(txn: &'t redb::WriteTransaction) -> Result<InlineTables<'t>, redb::TableError> {
        Ok(InlineTables { chunks: txn.open_table(INLINE_CHUNKS)?, tails: txn.open_table(INLINE_TAILS)? })
    }

    pub fn write(&mut self, hash: &BodyHash, bytes: &[u8]) -> Result<(), redb::StorageError> {
        let full = bytes.len() / INLINE_CHUNK_LEN;
        for (index, chunk) in bytes.chunks_exact(INLINE_CHUNK_LEN).enumerate() {
            let index = u32::try_from(index).map_err(|_| redb::StorageError::ValueTooLarge(bytes.len()))?;
            self.chunks.insert((*hash, index), chunk)?;
        }
        self.tails.insert(*hash, &bytes[full * INLINE_CHUNK_LEN..])?;
        Ok(())
    }

    /// Deletes a body; whether it was here.
    pub fn remove(&mut self, hash: &BodyHash) -> Result<bool, redb::StorageError> {
        self.chunks.retain_in((*hash, 0)..=(*hash, u32::MAX), |_, _| false)?;
        Ok(self.tails.remove(*hash)?.is_some())
    }

    pub fn contains(&self, hash: &BodyHash) -> Result<bool, redb::StorageError> {
        Ok(self.tails.get(*hash)?.is_some())
    }
}

/// A small body's bytes, or `None` when it is not in the tables.
fn read_inline_body(txn: &redb::ReadTransaction, hash: &BodyHash) -> Result<Option<Vec<u8>>, redb::Error> {
    let tails = txn.open_table(INLINE_TAILS)?;
    let Some(tail) = tails.get(*hash)? else { return Ok(None) };
    let mut bytes = Vec::new();
    let mut expected = 0u32;
    for row in txn.open_table(INLINE_CHUNKS)?.range((*hash, 0)..=(*hash, u32::MAX))? {
        let (key, value) = row?;
        if key.value().1 != expected {
            // A chunk missing: damaged, and read as such (the core's checksum sees it
            // and refetches the body from a peer).
            tracing::warn!(chunk = expected, "a stored body misses a chunk");
        }
        bytes.extend_from_slice(value.value());
        expected = key.value().1.saturating_add(1);
    }
    bytes.extend_from_slice(tail.value());
    Ok(Some(bytes))
}

/// Bodies up to this many bytes go into the database unless the config says
/// otherwise: above most mail's size, and small enough that a body is a few B-tree pages.
pub const INLINE_BODY_LEN_MAX_DEFAULT: u64 = 64 * 1024;
/// The most `body_inline_max_bytes` may say: beyond it a body belongs in a file.
pub const INLINE_BODY_LEN_MAX_LIMIT: u64 = 1024 * 1024;

pub fn hash_of(bytes: &[u8]) -> BodyHash {
    Sha256::digest(bytes).into()
}

fn hex(hash: &BodyHash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(name: &str) -> Option<BodyHash> {
    if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The body files of one node's store.
#[derive(Clone, Debug)]
pub struct BodyFiles {
    dir: PathBuf,
}

impl BodyFiles {
    pub fn new(data_dir: &Path) -> BodyFiles {
        BodyFiles { dir: data_dir.join("bodies") }
    }

    pub fn path_of(&self, hash: &BodyHash) -> PathBuf {
        self.dir.join(hex(hash))
    }

    /// Writes the file of a body and makes its bytes durable; the caller then syncs the
    /// directory once per batch ([`BodyFiles::sync_dir`]). A new file is written in
    /// place: nobody reads it before the commit that references it, and a crash before
    /// that commit leaves a file the next start deletes. A file that exists (a repair of
    /// a damaged one, which readers may have open) is replaced by a rename. Returns
    /// whether `bodies/` itself was created (then its parent is synced too).
    pub fn write(&self, hash: &BodyHash, bytes: &[u8]) -> std::io::Result<bool> {
        let new_dir = !self.dir.is_dir();
        if new_dir {
            std::fs::create_dir_all(&self.dir)?;
        }
        let path = self.path_of(hash);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut file) => {
                file.write_all(bytes)?;
                file.sync_data()?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let tmp = path.with_extension("tmp");
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(bytes)?;
                file.sync_data()?;
                drop(file);
                std::fs::rename(&tmp, &path)?;
            }
            Err(e) => return Err(e),
        }
        Ok(new_dir)
    }

    /// Makes the batch's new files' names durable (one directory fsync for them all:
    /// one directory, not a fan-out, because each directory synced costs a journal
    /// commit), and with `created` the directory itself.
    pub fn sync_dir(&self, created: bool) -> std::io::Result<()> {
        if created && let Some(parent) = self.dir.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        std::fs::File::open(&self.dir)?.sync_all()
    }

    pub fn read(&self, hash: &BodyHash) -> Option<Vec<u8>> {
        std::fs::read(self.path_of(hash)).ok()
    }

    /// Deletes a body's file (its last reference is gone and that is committed).
    pub fn remove(&self, hash: &BodyHash) {
        let _ = std::fs::remove_file(self.path_of(hash));
    }

    /// The bodies that have a file, and every file that is not one (a temporary file,
    /// a stray name) as `None`.
    pub fn present(&self) -> std::io::Result<BTreeSet<Option<BodyHash>>> {
        let mut present = BTreeSet::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Ok(present) };
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                present.insert(unhex(&entry.file_name().to_string_lossy()));
            }
        }
        Ok(present)
    }

    /// Deletes the files of bodies no GUID references (left by a crash between a file's
    /// write and its commit, or between a commit and a delete) and every temporary
    /// file: what [`BodyFiles::present`] listed, less what is referenced. Returns how
    /// many it deleted.
    pub fn remove_unreferenced(&self, unreferenced: &BTreeSet<Option<BodyHash>>) -> std::io::Result<usize> {
        if unreferenced.is_empty() {
            return Ok(0);
        }
        let mut deleted = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() && unreferenced.contains(&unhex(&entry.file_name().to_string_lossy())) {
                std::fs::remove_file(entry.path())?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

/// Which body each GUID has: what the core's reads need, kept in memory (a GUID and a
/// hash per message) and updated by the store thread after each commit; and the open
/// database small bodies are read from, which the store thread swaps when it reopens
/// the store after a failure (redb opens a file once per process).
#[derive(Clone, Debug, Default)]
pub struct BodyIndex {
    by_guid: Arc<Mutex<BTreeMap<Guid, BodyHash>>>,
    database: Arc<RwLock<Option<Arc<Database>>>>,
    removals: Arc<Mutex<Removals>>,
}

/// Body files whose last reference went while a backup was reading the store: they
/// stay until the backup is done, then the store thread deletes those still
/// unreferenced (between its commits, so never one a new reference brought back).
#[derive(Debug, Default)]
struct Removals {
    holds: usize,
    deferred: BTreeSet<BodyHash>,
}

/// Keeps body files from being deleted while it lives (see [`BodyIndex::hold_removals`]).
pub struct RemovalHold {
    removals: Arc<Mutex<Removals>>,
}

impl Drop for RemovalHold {
    fn drop(&mut self) {
        let mut removals = self.removals.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        removals.holds = removals.holds.saturating_sub(1);
    }
}

/// Where a read found a body's hash.
enum InlineLookup {
    Found(Vec<u8>),
    /// Not in the table: in a file, if anywhere.
    NotInline,
    /// The store is closed (being reopened after a failure) or the read failed.
    Unavailable,
}

impl BodyIndex {
    fn locked(&self) -> MutexGuard<'_, BTreeMap<Guid, BodyHash>> {
        self.by_guid.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
    pub fn attach(&self, database: Arc<Database>) {
        *self.database.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(database);
    }
    /// Lets go of `database` if it is the one attached (the store that opened it is gone).
    pub fn detach(&self, database: &Arc<Database>) {
        let mut slot = self.database.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.as_ref().is_some_and(|d| Arc::ptr_eq(d, database)) {
            *slot = None;
        }
    }
    fn read_inline(&self, hash: &BodyHash) -> InlineLookup {
        let database = self.database.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let Some(database) = database else { return InlineLookup::Unavailable };
        let lookup = || -> Result<Option<Vec<u8>>, redb::Error> { read_inline_body(&database.begin_read()?, hash) };
        match lookup() {
            Ok(Some(bytes)) => InlineLookup::Found(bytes),
            Ok(None) => InlineLookup::NotInline,
            Err(e) => {
                tracing::warn!(error = %e, "reading a body from the store failed");
                InlineLookup::Unavailable
            }
        }
    }
    /// The open database, if the store is open (a backup reads a snapshot of it).
    pub fn database(&self) -> Option<Arc<Database>> {
        self.database.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
    fn removals(&self) -> MutexGuard<'_, Removals> {
        self.removals.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
    /// No body file is deleted until the hold is dropped: a backup copies the files its
    /// snapshot references after taking the snapshot.
    pub fn hold_removals(&self) -> RemovalHold {
        self.removals().holds += 1;
        RemovalHold { removals: self.removals.clone() }
    }
    /// True when the file of `hash` must stay for now (a hold is on): it is remembered.
    pub fn defer_removal(&self, hash: &BodyHash) -> bool {
        let mut removals = self.removals();
        if removals.holds == 0 {
            return false;
        }
        removals.deferred.insert(*hash);
        true
    }
    /// The deferred removals, once no hold is left (for the store thread to check).
    pub fn released_removals(&self) -> BTreeSet<BodyHash> {
        let mut removals = self.removals();
        if removals.holds > 0 {
            return BTreeSet::new();
        }
        std::mem::take(&mut removals.deferred)
    }
    /// Replaces the whole index (at load).
    pub fn replace(&self, by_guid: BTreeMap<Guid, BodyHash>) {
        *self.locked() = by_guid;
    }
    pub fn set(&self, guid: Guid, hash: BodyHash) {
        self.locked().insert(guid, hash);
    }
    pub fn unset(&self, guid: Guid) {
        self.locked().remove(&guid);
    }
    pub fn get(&self, guid: Guid) -> Option<BodyHash> {
        self.locked().get(&guid).copied()
    }
    /// The distinct body files referenced.
    pub fn hashes(&self) -> BTreeSet<BodyHash> {
        self.locked().values().copied().collect()
    }
}

/// The core's view of the node's bodies: index, then table or file. A missing or
/// unreadable body reads as no body, a damaged one as its damaged bytes; the core checks
/// both.
#[derive(Clone, Debug)]
pub struct BodyReader {
    pub files: BodyFiles,
    pub index: BodyIndex,
}

impl BodyReader {
    /// A body's bytes when they hash to the address the index gives them: for a
    /// client's read off the event loop. None for anything else (no such body here,
    /// not yet durable, unreadable or damaged), which the caller asks the core about:
    /// the core knows the bodies still in memory and reports damaged ones for repair.
    pub fn read_verified(&self, guid: Guid) -> Option<Body> {
        let hash = self.index.get(guid)?;
        let bytes = self.read(guid)?;
        (hash_of(&bytes) == hash).then_some(bytes)
    }
}

impl BodyStore for BodyReader {
    fn read(&self, guid: Guid) -> Option<Body> {
        let hash = self.index.get(guid)?;
        match self.index.read_inline(&hash) {
            InlineLookup::Found(bytes) => Some(Body::from(bytes)),
            InlineLookup::NotInline => self.files.read(&hash).map(Body::from),
            InlineLookup::Unavailable => None,
        }
    }

    fn text_parts(&self, _guid: Guid, body: &[u8]) -> Option<Body> {
        Some(crate::imap::text_parts::cut(body).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_written_read_and_collected() {
        let dir = tempfile::tempdir().unwrap();
        let files = BodyFiles::new(dir.path());
        let (a, b) = (hash_of(b"one"), hash_of(b"two"));
        assert!(files.write(&a, b"one").unwrap(), "bodies/ is created");
        assert!(!files.write(&b, b"two").unwrap());
        assert!(files.write(&a, b"one").is_ok(), "an existing file is replaced");
        files.sync_dir(true).unwrap();
        assert_eq!(files.read(&a).as_deref(), Some(&b"one"[..]));
        std::fs::write(files.path_of(&b).with_extension("tmp"), b"half").unwrap();
        let mut unreferenced = files.present().unwrap();
        assert_eq!(unreferenced.len(), 3, "a, b and the temporary file");
        unreferenced.remove(&Some(a));
        assert_eq!(files.remove_unreferenced(&unreferenced).unwrap(), 2, "b and the temporary file");
        assert!(files.read(&b).is_none());
        assert_eq!(files.read(&a).as_deref(), Some(&b"one"[..]));
    }

    #[test]
    fn hex_names_round_trip() {
        let h = hash_of(b"x");
        assert_eq!(unhex(&hex(&h)), Some(h));
        assert_eq!(unhex("zz"), None);
    }
}
