//! `tandem backup DIR`: a consistent copy of a running node's store.
//!
//! The copy is one redb read transaction (a snapshot: what the node had committed at
//! one instant) written into a new store in `DIR`, plus the body files that snapshot
//! references, each checked against its content address as it is copied. While the
//! copy runs no body file is deleted (see [`BodyIndex::hold_removals`]), so every file
//! the snapshot references is still there to copy; writes go on meanwhile.
//!
//! Restoring is starting a node on the copy (`data_dir` pointing at it, or its contents
//! copied there): the node comes back as it was at the snapshot and catches up by SYNC
//! with the others like a node that was away since then. The copy is a node's own state
//! (its id, its replication logs): restore it as the same server id, or as the only
//! copy of a cluster that is rebuilt from it.

use crate::bodies::{BodyHash, BodyReader, hash_of};
use crate::store::{Store, StoreError};
use redb::{Database, ReadableDatabase};
use std::io::Write;
use std::path::Path;

/// What a backup copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Copied {
    pub bytes: u64,
    pub body_files: u64,
    pub mailboxes: u64,
    pub messages: u64,
    /// Files the snapshot references that were missing or damaged here: the restored
    /// node fetches them from a peer.
    pub bodies_unreadable: u64,
}

/// Copies the store `reader` reads from into `dir` (new, or an empty directory).
pub fn take(reader: &BodyReader, node_id: u32, dir: &Path) -> Result<Copied, String> {
    let err = |e: std::io::Error| format!("{}: {e}", dir.display());
    if dir.exists() && std::fs::read_dir(dir).map_err(err)?.next().is_some() {
        return Err(format!("{} is not empty: a backup goes into a new or empty directory", dir.display()));
    }
    std::fs::create_dir_all(dir.join("bodies")).map_err(err)?;
    let _hold = reader.index.hold_removals();
    let database = reader.index.database().ok_or("the store is being reopened after a failure: try again")?;
    let store_error = |e: StoreError| format!("backup of the store: {e}");
    let snapshot = database.begin_read().map_err(|e| store_error(e.into()))?;
    let copy = Database::create(dir.join("tandem.redb")).map_err(|e| store_error(e.into()))?;
    let txn = copy.begin_write().map_err(|e| store_error(e.into()))?;
    let (mailboxes, messages, in_files) = Store::copy_snapshot(&snapshot, &txn).map_err(store_error)?;
    txn.commit().map_err(|e| store_error(e.into()))?;
    drop(copy);
    let mut copied = Copied { mailboxes, messages, ..Copied::default() };
    for hash in &in_files {
        match copy_body_file(reader, hash, dir) {
            Ok(Some(len)) => {
                copied.body_files += 1;
                copied.bytes += len;
            }
            Ok(None) => copied.bodies_unreadable += 1,
            Err(e) => return Err(err(e)),
        }
    }
    std::fs::File::open(dir.join("bodies")).and_then(|d| d.sync_all()).map_err(err)?;
    copied.bytes += std::fs::metadata(dir.join("tandem.redb")).map_err(err)?.len();
    let readme = format!(
        "A backup of tandem node {node_id}: {} mailboxes, {} messages, {} body files.\n\
         Restore: stop the node (or use a new machine), put these files in an empty data_dir\n\
         (or point data_dir here) and start it with its config (the same id); it catches up\n\
         with the other servers by SYNC.\n",
        copied.mailboxes, copied.messages, copied.body_files
    );
    std::fs::write(dir.join("BACKUP.txt"), readme).map_err(err)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    Ok(copied)
}

/// Copies one body file, checked against its hash; None if it is missing or damaged.
fn copy_body_file(reader: &BodyReader, hash: &BodyHash, dir: &Path) -> std::io::Result<Option<u64>> {
    let Some(bytes) = reader.files.read(hash) else { return Ok(None) };
    if hash_of(&bytes) != *hash {
        return Ok(None);
    }
    let target = crate::bodies::BodyFiles::new(dir).path_of(hash);
    let mut file = std::fs::File::create(target)?;
    file.write_all(&bytes)?;
    file.sync_data()?;
    Ok(Some(bytes.len() as u64))
}
