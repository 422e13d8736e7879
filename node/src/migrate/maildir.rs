//! Dovecot's Maildir++ layout, read (`tandem import --maildir`) and written
//! (`tandem export --maildir`).
//!
//! - A user's root directory holds INBOX (`cur/`, `new/`, `tmp/`); every other mailbox
//!   is a directory `.A.B` beside them (hierarchy separator `.`; tandem's is `/`).
//! - `dovecot-uidlist`: `3 V<uidvalidity> N<uidnext> [G<guid>]`, then `<uid> [ext...]
//!   :<file name before ":2,">` per message: the UIDs a Dovecot user's clients know.
//! - A file's name ends in `:2,<letters>`: `D` \Draft, `F` \Flagged, `R` \Answered,
//!   `S` \Seen, `T` \Deleted, and `a`..`z` the keywords at those indexes of
//!   `dovecot-keywords` (`<index> <keyword>` lines); its mtime is the INTERNALDATE.
//! - `subscriptions`: `V\t2`, an empty line, then one mailbox per line (levels
//!   separated by tabs).
//!
//! Dovecot writes messages with bare LF line ends and serves them with CRLF; an import
//! stores them as IMAP clients see them (CRLF).

use super::{SourceFolder, SourceMeta};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A message file larger than this is refused (tandem's own limit is lower).
const MESSAGE_LEN_MAX: u64 = 256 * 1024 * 1024;
/// Folders of one Maildir read at most (each is a directory).
const FOLDERS_MAX: usize = 100_000;

const SYSTEM_FLAGS: [(char, &str); 5] =
    [('D', "\\Draft"), ('F', "\\Flagged"), ('R', "\\Answered"), ('S', "\\Seen"), ('T', "\\Deleted")];

/// A user's Maildir, read.
pub struct MaildirSource {
    root: PathBuf,
    /// folder name -> (directory, base file name -> (file path, flags letters)).
    files: BTreeMap<String, BTreeMap<String, PathBuf>>,
}

impl MaildirSource {
    pub fn open(root: &Path) -> Result<MaildirSource, String> {
        if !root.join("cur").is_dir() {
            return Err(format!("{}: not a Maildir (no cur/)", root.display()));
        }
        Ok(MaildirSource { root: root.to_path_buf(), files: BTreeMap::new() })
    }

    fn dir_of(&self, folder: &str) -> PathBuf {
        if folder == "INBOX" { self.root.clone() } else { self.root.join(format!(".{}", folder.replace('/', "."))) }
    }

    pub fn folders(&mut self) -> Result<Vec<SourceFolder>, String> {
        let subscribed = read_subscriptions(&self.root);
        let mut names = vec!["INBOX".to_string()];
        let entries = std::fs::read_dir(&self.root).map_err(|e| format!("{}: {e}", self.root.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(folder) = name.strip_prefix('.')
                && !folder.is_empty()
                && folder != "."
                && entry.path().join("cur").is_dir()
            {
                names.push(folder.replace('.', "/"));
            }
            if names.len() > FOLDERS_MAX {
                return Err(format!("{}: more than {FOLDERS_MAX} folders", self.root.display()));
            }
        }
        names.sort();
        let mut folders = Vec::new();
        for name in names {
            let dir = self.dir_of(&name);
            let uidlist = read_uidlist(&dir)?;
            folders.push(SourceFolder {
                subscribed: subscribed.contains(&name),
                uidvalidity: uidlist.as_ref().map_or(0, |u| u.uidvalidity),
                uidnext: uidlist.as_ref().map_or(1, |u| u.uidnext),
                name,
            });
        }
        Ok(folders)
    }

    /// The folder's messages with their Dovecot UIDs; files the uidlist does not name
    /// yet (delivered since Dovecot last looked) get UIDs above it, in name order.
    pub fn list(&mut self, folder: &SourceFolder) -> Result<Vec<SourceMeta>, String> {
        let dir = self.dir_of(&folder.name);
        let keywords = read_keywords(&dir);
        let uidlist = read_uidlist(&dir)?;
        let mut by_base: BTreeMap<String, (PathBuf, String)> = BTreeMap::new();
        for sub in ["cur", "new"] {
            let Ok(entries) = std::fs::read_dir(dir.join(sub)) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let (base, letters) = match name.split_once(":2,") {
                    Some((base, letters)) => (base.to_string(), letters.to_string()),
                    None => (name.clone(), String::new()),
                };
                by_base.insert(base, (entry.path(), letters));
            }
        }
        let mut metas = Vec::new();
        let mut next = folder.uidnext.max(1);
        let mut seen = BTreeSet::new();
        for (uid, base) in uidlist.as_ref().map(|u| u.lines.clone()).unwrap_or_default() {
            if let Some((path, letters)) = by_base.get(&base) {
                seen.insert(base.clone());
                next = next.max(uid.saturating_add(1));
                metas.push(meta(uid, path, letters, &keywords)?);
            }
        }
        for (base, (path, letters)) in &by_base {
            if !seen.contains(base) {
                metas.push(meta(next, path, letters, &keywords)?);
                next = next.saturating_add(1);
            }
        }
        let files = self.files.entry(folder.name.clone()).or_default();
        for m in &metas {
            files.insert(m.uid.to_string(), m.path.clone().unwrap_or_default());
        }
        metas.sort_by_key(|m| m.uid);
        Ok(metas)
    }

    pub fn body(&mut self, folder: &SourceFolder, uid: u32) -> Result<Vec<u8>, String> {
        let path = self
            .files
            .get(&folder.name)
            .and_then(|f| f.get(&uid.to_string()))
            .ok_or_else(|| format!("{}: UID {uid} not listed", folder.name))?;
        let len = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.len();
        if len > MESSAGE_LEN_MAX {
            return Err(format!("{}: {len} bytes, more than {MESSAGE_LEN_MAX}", path.display()));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(crlf(&bytes))
    }
}

fn meta(uid: u32, path: &Path, letters: &str, keywords: &BTreeMap<u32, String>) -> Result<SourceMeta, String> {
    let md = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let received =
        md.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
    let mut flags = Vec::new();
    for c in letters.chars() {
        if let Some((_, flag)) = SYSTEM_FLAGS.iter().find(|(l, _)| *l == c) {
            flags.push(flag.to_string());
        } else if c.is_ascii_lowercase()
            && let Some(keyword) = keywords.get(&(c as u32 - 'a' as u32))
        {
            flags.push(keyword.clone());
        }
    }
    Ok(SourceMeta { uid, flags, received, size: None, path: Some(path.to_path_buf()) })
}

/// Bare LF line ends become CRLF (a CRLF stays).
pub fn crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 32);
    let mut previous = 0u8;
    for &b in bytes {
        if b == b'\n' && previous != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        previous = b;
    }
    out
}

struct Uidlist {
    uidvalidity: u32,
    uidnext: u32,
    lines: Vec<(u32, String)>,
}

fn read_uidlist(dir: &Path) -> Result<Option<Uidlist>, String> {
    let path = dir.join("dovecot-uidlist");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let mut fields = header.split(' ');
    if fields.next() != Some("3") {
        return Err(format!("{}: not a version 3 uidlist", path.display()));
    }
    let (mut uidvalidity, mut uidnext) = (0, 1);
    for field in fields {
        if let Some(v) = field.strip_prefix('V') {
            uidvalidity = v.parse().unwrap_or(0);
        } else if let Some(n) = field.strip_prefix('N') {
            uidnext = n.parse().unwrap_or(1);
        }
    }
    let mut out = Vec::new();
    for line in lines {
        let Some((head, base)) = line.split_once(" :").or_else(|| line.split_once(':')) else { continue };
        let Some(Ok(uid)) = head.split(' ').next().map(str::parse::<u32>) else { continue };
        if uid > 0 {
            out.push((uid, base.to_string()));
        }
    }
    Ok(Some(Uidlist { uidvalidity, uidnext, lines: out }))
}

fn read_keywords(dir: &Path) -> BTreeMap<u32, String> {
    let Ok(text) = std::fs::read_to_string(dir.join("dovecot-keywords")) else { return BTreeMap::new() };
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(i, k)| Some((i.parse().ok()?, k.to_string())))
        .filter(|(i, _)| *i < 26)
        .collect()
}

fn read_subscriptions(root: &Path) -> BTreeSet<String> {
    let Ok(text) = std::fs::read_to_string(root.join("subscriptions")) else { return BTreeSet::new() };
    let mut lines = text.lines();
    let versioned = text.starts_with("V\t");
    if versioned {
        lines.next();
    }
    lines
        .filter(|l| !l.is_empty())
        .map(|l| if versioned { l.replace('\t', "/") } else { l.replace('.', "/") })
        .collect()
}

/// One message to write into an exported Maildir.
pub struct ExportedMessage<'a> {
    pub uid: u32,
    pub received: u64,
    pub flags: &'a [String],
    pub body: &'a [u8],
}

/// A mailbox being written into a Maildir: files first, then its uidlist and keywords.
pub struct MaildirWriter {
    dir: PathBuf,
    uidvalidity: u32,
    uidnext: u32,
    keywords: Vec<String>,
    lines: BTreeMap<u32, String>,
    pub keywords_dropped: u64,
}

impl MaildirWriter {
    /// `root` is the user's Maildir; `name` a tandem mailbox name.
    pub fn create(root: &Path, name: &str, uidvalidity: u32, uidnext: u32) -> Result<MaildirWriter, String> {
        let dir = if name == "INBOX" { root.to_path_buf() } else { root.join(format!(".{}", name.replace('/', "."))) };
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        if name != "INBOX" {
            std::fs::write(dir.join("maildirfolder"), b"").map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let mut writer = MaildirWriter {
            dir,
            uidvalidity,
            uidnext,
            keywords: Vec::new(),
            lines: BTreeMap::new(),
            keywords_dropped: 0,
        };
        // An export run again keeps what an earlier run wrote (files named by UID).
        if let Ok(entries) = std::fs::read_dir(writer.dir.join("cur")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let base = name.split_once(":2,").map_or(name.as_str(), |(b, _)| b).to_string();
                if let Some(uid) = uid_of_exported(&base) {
                    writer.lines.insert(uid, base);
                }
            }
        }
        writer.keywords = read_keywords(&writer.dir).into_values().collect();
        Ok(writer)
    }

    pub fn has(&self, uid: u32) -> bool {
        self.lines.contains_key(&uid)
    }

    pub fn write(&mut self, m: &ExportedMessage<'_>) -> Result<(), String> {
        let mut letters: Vec<char> = Vec::new();
        for flag in m.flags {
            if let Some((c, _)) = SYSTEM_FLAGS.iter().find(|(_, f)| f.eq_ignore_ascii_case(flag)) {
                letters.push(*c);
            } else if !flag.starts_with('\\') {
                let index = match self.keywords.iter().position(|k| k == flag) {
                    Some(i) => i,
                    None if self.keywords.len() < 26 => {
                        self.keywords.push(flag.clone());
                        self.keywords.len() - 1
                    }
                    None => {
                        self.keywords_dropped += 1;
                        continue;
                    }
                };
                letters.push((b'a' + index as u8) as char);
            }
        }
        letters.sort_unstable();
        letters.dedup();
        let base = format!("{}.T{}.tandem,S={}", m.received, m.uid, m.body.len());
        let file = format!("{base}:2,{}", letters.iter().collect::<String>());
        let tmp = self.dir.join("tmp").join(&base);
        let err = |e: std::io::Error| format!("{}: {e}", tmp.display());
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(m.body).map_err(err)?;
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(m.received);
        f.set_modified(mtime).map_err(err)?;
        f.sync_data().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, self.dir.join("cur").join(&file)).map_err(err)?;
        self.lines.insert(m.uid, base);
        Ok(())
    }

    /// Writes `dovecot-uidlist` and `dovecot-keywords` (replacing them whole).
    pub fn finish(self) -> Result<(), String> {
        let uidnext = self.uidnext.max(self.lines.keys().next_back().map_or(1, |u| u.saturating_add(1)));
        let mut uidlist = format!("3 V{} N{}\n", self.uidvalidity, uidnext);
        for (uid, base) in &self.lines {
            uidlist.push_str(&format!("{uid} :{base}\n"));
        }
        let mut keywords = String::new();
        for (i, k) in self.keywords.iter().enumerate() {
            keywords.push_str(&format!("{i} {k}\n"));
        }
        for (name, text) in [("dovecot-uidlist", uidlist), ("dovecot-keywords", keywords)] {
            let tmp = self.dir.join(format!("{name}.tmp"));
            std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, self.dir.join(name)).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        }
        Ok(())
    }
}

fn uid_of_exported(base: &str) -> Option<u32> {
    let rest = base.split_once(".T")?.1;
    rest.split_once(".tandem")?.0.parse().ok()
}

/// Writes the user's `subscriptions` file.
pub fn write_subscriptions(root: &Path, names: &[String]) -> Result<(), String> {
    let mut text = String::from("V\t2\n\n");
    for name in names {
        text.push_str(&name.replace('/', "\t"));
        text.push('\n');
    }
    std::fs::write(root.join("subscriptions"), text).map_err(|e| format!("{}: {e}", root.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_maildir_reads_back_with_uids_flags_keywords_and_dates() {
        let dir = std::env::temp_dir().join(format!("tandem-maildir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let flags = ["\\Seen".to_string(), "$Work".to_string(), "\\Answered".to_string()];
        let mut w = MaildirWriter::create(&dir, "INBOX", 777, 10).unwrap();
        w.write(&ExportedMessage { uid: 5, received: 1_600_000_000, flags: &flags, body: b"Subject: a\r\n\r\nx\r\n" })
            .unwrap();
        w.finish().unwrap();
        let mut w = MaildirWriter::create(&dir, "Work/Sub", 9, 1).unwrap();
        w.write(&ExportedMessage { uid: 1, received: 1_600_000_100, flags: &[], body: b"Subject: b\n\ny\n" }).unwrap();
        w.finish().unwrap();
        write_subscriptions(&dir, &["Work/Sub".to_string()]).unwrap();
        let mut source = MaildirSource::open(&dir).unwrap();
        let folders = source.folders().unwrap();
        assert_eq!(folders.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["INBOX", "Work/Sub"]);
        assert_eq!((folders[0].uidvalidity, folders[0].uidnext, folders[0].subscribed), (777, 10, false));
        assert!(folders[1].subscribed);
        let metas = source.list(&folders[0]).unwrap();
        assert_eq!(metas.len(), 1);
        assert_eq!((metas[0].uid, metas[0].received), (5, 1_600_000_000));
        let mut got = metas[0].flags.clone();
        got.sort();
        assert_eq!(got, ["$Work", "\\Answered", "\\Seen"]);
        assert_eq!(source.body(&folders[0], 5).unwrap(), b"Subject: a\r\n\r\nx\r\n");
        let metas = source.list(&folders[1]).unwrap();
        assert_eq!(source.body(&folders[1], metas[0].uid).unwrap(), b"Subject: b\r\n\r\ny\r\n", "LF becomes CRLF");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
