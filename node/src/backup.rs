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
    let taken_unix_s = crate::record::unix_ms() / 1000;
    let (mailboxes, messages, in_files) = Store::copy_snapshot(&snapshot, &txn, taken_unix_s).map_err(store_error)?;
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
         with the other servers by SYNC. Older than tombstone_grace_secs, it is refused: with\n\
         other servers running, start the node on an empty data_dir instead; if this copy is\n\
         all that is left of the mail, add --accept-old-backup to its first start.\n",
        copied.mailboxes, copied.messages, copied.body_files
    );
    std::fs::write(dir.join("BACKUP.txt"), readme).map_err(err)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    Ok(copied)
}

/// Whether a node may start on a restored backup taken at `taken_unix_s`. A backup
/// older than the tombstone grace may hold messages expunged since whose tombstones the
/// other servers have collected: started as this node, it would bring them back as new
/// mail. Refused then, unless the operator says (`--accept-old-backup`) that the backup
/// is all that is left of the mail.
pub fn check_restore_age(taken_unix_s: u64, now_unix_s: u64, grace_secs: u64, accept_old: bool) -> Result<(), String> {
    let age_s = now_unix_s.saturating_sub(taken_unix_s);
    if age_s <= grace_secs || accept_old {
        return Ok(());
    }
    Err(format!(
        "this data_dir is a backup taken {age_s} s ago, older than tombstone_grace_secs ({grace_secs} s): \
         messages expunged since then may be forgotten by the other servers, and this copy would \
         bring them back as new mail. If other servers are running, start this node on an empty \
         data_dir instead: it fills from them (README, \"Backups\"). If this backup is all that is \
         left of the mail, start it once with `tandem node --config FILE --accept-old-backup`."
    ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::StoreWrite;

    #[test]
    fn a_backup_knows_when_it_was_taken_until_its_first_start() {
        let (live_dir, backup_root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let live = Store::open(live_dir.path()).unwrap();
        let inbox = tandem_core::MailboxKey::new("u@d", "INBOX");
        live.apply(&[
            StoreWrite::Incarnation { incarnation: 1, store_id: 7 },
            StoreWrite::Epoch { epoch: 3 },
            StoreWrite::Newcomer,
            StoreWrite::Confirmed { mailbox: inbox },
        ])
        .unwrap();
        assert_eq!(live.restored_backup_taken().unwrap(), None, "a node's own store is no backup");
        let before_s = crate::record::unix_ms() / 1000;
        let dir = backup_root.path().join("copy");
        take(&live.body_reader(), 1, &dir).unwrap();
        let restored = Store::open(&dir).unwrap();
        let taken_s = restored.restored_backup_taken().unwrap().expect("the snapshot's time");
        assert!(taken_s >= before_s && taken_s <= crate::record::unix_ms() / 1000 + 1);
        let image = restored.load().unwrap();
        assert_eq!(image.store_id, 0, "a copy carries no store identity");
        assert!(image.newcomer && image.confirmed.is_empty(), "and is a newcomer with nothing confirmed");
        assert_eq!(image, live.load().unwrap().backup_copy(), "as the core's backup copy is");
        // Its first start gives it an identity: from then on it is the node's store.
        restored.apply(&[StoreWrite::Incarnation { incarnation: 2, store_id: 9 }]).unwrap();
        assert_eq!(restored.restored_backup_taken().unwrap(), None);
        assert_eq!(restored.load().unwrap().store_id, 9);
    }

    #[test]
    fn a_backup_older_than_the_grace_starts_only_when_the_operator_says_so() {
        let hour = 3600;
        assert!(check_restore_age(1_000_000, 1_000_000 + hour, hour, false).is_ok(), "within the grace");
        let refused = check_restore_age(1_000_000, 1_000_000 + hour + 1, hour, false).unwrap_err();
        assert!(refused.contains("3601 s ago") && refused.contains("--accept-old-backup"), "{refused}");
        assert!(check_restore_age(1_000_000, 1_000_000 + 30 * hour, hour, true).is_ok(), "accepted");
        assert!(check_restore_age(1_000_000, 999_000, hour, false).is_ok(), "a clock behind the backup's");
    }
}
