//! Message bodies on disk, content-addressed: one file per distinct body, named by the
//! SHA-256 of its bytes (`bodies/<64 hex>`), shared by every GUID with those
//! bytes. A thousand recipients of one message, or a message in many mailboxes, take one
//! file. Files rather than a redb table because a damaged file spoils one body and never
//! the store (the core refetches it from a peer), a body is read and written whole
//! without passing through a B-tree's pages, and a mail store is mostly bodies.
//!
//! Crash safety: a file is written (temporary name, fsync, rename, directory fsync)
//! before the transaction that references it commits, and deleted only after the
//! transaction that drops its last reference commits. A crash in between leaves an
//! unreferenced file, which the next start deletes ([`BodyFiles::collect_garbage`]).

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tandem_core::store::BodyStore;
use tandem_core::types::{Body, Guid};

pub type BodyHash = [u8; 32];

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

    /// Deletes every file no GUID references (left by a crash between a file's write
    /// and its commit, or between a commit and a delete) and every temporary file.
    /// Returns how many it deleted.
    pub fn collect_garbage(&self, referenced: &BTreeSet<BodyHash>) -> std::io::Result<usize> {
        let mut deleted = 0;
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Ok(0) };
        for entry in entries {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if !unhex(&name).is_some_and(|h| referenced.contains(&h)) {
                std::fs::remove_file(entry.path())?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

/// Which file holds each GUID's body: what the core's reads need, kept in memory (a
/// GUID and a hash per message) and updated by the store thread after each commit.
#[derive(Clone, Debug, Default)]
pub struct BodyIndex {
    by_guid: Arc<Mutex<BTreeMap<Guid, BodyHash>>>,
}

impl BodyIndex {
    fn locked(&self) -> MutexGuard<'_, BTreeMap<Guid, BodyHash>> {
        self.by_guid.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

/// The core's view of the node's bodies: index, then file. A missing or unreadable file
/// reads as no body, a damaged one as its damaged bytes; the core checks both.
#[derive(Clone, Debug)]
pub struct BodyReader {
    pub files: BodyFiles,
    pub index: BodyIndex,
}

impl BodyStore for BodyReader {
    fn read(&self, guid: Guid) -> Option<Body> {
        let hash = self.index.get(guid)?;
        self.files.read(&hash).map(Body::from)
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
        assert_eq!(files.collect_garbage(&BTreeSet::from([a])).unwrap(), 2, "b and the temporary file");
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
