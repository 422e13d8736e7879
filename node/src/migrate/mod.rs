//! Migration in and out: `tandem import` (from any IMAP server, or a Dovecot Maildir)
//! and `tandem export --maildir` (Dovecot-readable), both through a running node's
//! admin interface.
//!
//! An import keeps each message's flags, keywords and INTERNALDATE, and where the
//! target mailbox is new (or already has the source's UIDVALIDITY: a resumed import)
//! its UIDVALIDITY and UIDs too, so users' mail clients find the same UIDs and download
//! nothing again. It is idempotent: a message already in the target (the same UID with
//! the same bytes, or anywhere in the mailbox with the same size and checksum) is not
//! imported again, so an interrupted import is resumed by running it again.

pub mod imap_source;
pub mod maildir;

use crate::admin::{self, AdminAddr, AdminReply, AdminRequest};
use base64::Engine;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Encoded bytes per import batch (beside `admin::BATCH_MAX` messages).
const BATCH_BYTES_MAX: u64 = 32 * 1024 * 1024;

/// A mailbox of the source.
#[derive(Clone, Debug)]
pub struct SourceFolder {
    /// tandem's name (`/` between levels; INBOX for the inbox).
    pub name: String,
    /// 0 when the source has none (then the target's own is kept).
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub subscribed: bool,
}

/// A message of the source, before its body is read.
#[derive(Clone, Debug)]
pub struct SourceMeta {
    pub uid: u32,
    pub flags: Vec<String>,
    pub received: u64,
    pub size: Option<u32>,
    pub path: Option<PathBuf>,
}

pub enum Source {
    Maildir(maildir::MaildirSource),
    Imap(imap_source::ImapSource),
}

impl Source {
    fn folders(&mut self) -> Result<Vec<SourceFolder>, String> {
        match self {
            Source::Maildir(s) => s.folders(),
            Source::Imap(s) => s.folders(),
        }
    }
    fn list(&mut self, folder: &SourceFolder) -> Result<Vec<SourceMeta>, String> {
        match self {
            Source::Maildir(s) => s.list(folder),
            Source::Imap(s) => s.list(folder),
        }
    }
    fn bodies(&mut self, folder: &SourceFolder, uids: &[u32]) -> Result<Vec<(u32, Vec<u8>)>, String> {
        match self {
            Source::Maildir(s) => uids.iter().map(|u| Ok((*u, s.body(folder, *u)?))).collect(),
            Source::Imap(s) => s.bodies(folder, uids),
        }
    }
}

/// A blocking admin connection kept open for many requests.
pub struct AdminConn {
    reader: BufReader<std::os::unix::net::UnixStream>,
    addr: AdminAddr,
}

/// Requests on one connection: Unix socket only (a TCP admin port takes one request per
/// call through [`admin::call_blocking`]).
pub enum Admin {
    Kept(AdminConn),
    PerCall(AdminAddr),
}

impl Admin {
    pub fn connect(addr: &AdminAddr) -> Result<Admin, String> {
        match addr {
            AdminAddr::Unix(path) => {
                let stream = std::os::unix::net::UnixStream::connect(path)
                    .map_err(|e| format!("cannot reach {}: {e}", path.display()))?;
                stream.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
                Ok(Admin::Kept(AdminConn { reader: BufReader::new(stream), addr: addr.clone() }))
            }
            AdminAddr::Tcp { .. } => Ok(Admin::PerCall(addr.clone())),
        }
    }

    pub fn call(&mut self, request: &AdminRequest) -> Result<AdminReply, String> {
        match self {
            Admin::PerCall(addr) => admin::call_blocking(addr, request, Duration::from_secs(120)),
            Admin::Kept(conn) => {
                let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
                line.push('\n');
                conn.reader.get_mut().write_all(line.as_bytes()).map_err(|e| format!("{}: {e}", conn.addr))?;
                let mut answer = String::new();
                conn.reader.read_line(&mut answer).map_err(|e| format!("{}: {e}", conn.addr))?;
                if answer.is_empty() {
                    return Err(format!("{} closed the connection", conn.addr));
                }
                serde_json::from_str(&answer).map_err(|e| format!("bad answer from {}: {e}", conn.addr))
            }
        }
    }

    fn dump(&mut self, mailbox: &str) -> Result<admin::Dump, String> {
        match self.call(&AdminRequest::Dump { mailbox: mailbox.to_string() })? {
            AdminReply::Dump(d) => Ok(d),
            AdminReply::Error { reason, .. } => Err(format!("{mailbox}: {reason}")),
            other => Err(format!("{mailbox}: unexpected answer {other:?}")),
        }
    }
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Imported {
    pub folders: u64,
    pub messages: u64,
    pub bytes: u64,
    /// Already in the target (an earlier run, or the same message there).
    pub skipped: u64,
    /// Imported at a new UID (the target mailbox had history of its own).
    pub renumbered: u64,
}

/// A progress line on standard error, rewritten in place on a terminal.
struct Progress {
    quiet: bool,
    tty: bool,
    last: Instant,
}

impl Progress {
    fn show(&mut self, folder: &str, done: usize, total: usize, bytes: u64, end: bool) {
        if self.quiet || (!end && (!self.tty || self.last.elapsed() < Duration::from_millis(100))) {
            return;
        }
        self.last = Instant::now();
        let width = 30;
        let filled = (done * width).checked_div(total).unwrap_or(width);
        let bar: String = "#".repeat(filled) + &".".repeat(width - filled);
        let line = format!("{folder}: [{bar}] {done}/{total} messages, {:.1} MB", bytes as f64 / 1e6);
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            if end {
                let _ = writeln!(err);
            }
        } else if end {
            let _ = writeln!(err, "{line}");
        }
    }
}

/// Imports every folder of `source` into `user`'s mailboxes through the node at `admin`.
/// `batch` messages go to the node per request (1 to `admin::BATCH_MAX`).
pub fn import(
    source: &mut Source,
    admin: &AdminAddr,
    user: &str,
    batch: usize,
    quiet: bool,
) -> Result<Imported, String> {
    let batch_max = batch.clamp(1, admin::BATCH_MAX);
    let mut admin = Admin::connect(admin)?;
    let mut progress = Progress { quiet, tty: std::io::stderr().is_terminal(), last: Instant::now() };
    let mut done = Imported::default();
    for folder in source.folders()? {
        let target = format!("{user}/{}", folder.name);
        let create = AdminRequest::ImportMailbox { mailbox: target.clone(), uidvalidity: folder.uidvalidity };
        match admin.call(&create)? {
            // Without a UIDVALIDITY to take, an existing mailbox is simply used.
            AdminReply::Error { reason, .. } if !(folder.uidvalidity == 0 && reason.ends_with("exists")) => {
                return Err(format!("{target}: {reason}"));
            }
            _ => done.folders += 1,
        }
        if folder.subscribed {
            let subscribe = AdminRequest::Subscribe { mailbox: target.clone(), subscribe: true };
            if let AdminReply::Error { reason, .. } = admin.call(&subscribe)? {
                return Err(format!("subscribing to {target}: {reason}"));
            }
        }
        let dump = admin.dump(&target)?;
        let keep_uids = folder.uidvalidity != 0 && dump.uidvalidity == folder.uidvalidity;
        let by_uid: BTreeMap<u32, (u32, String)> =
            dump.messages.iter().map(|m| (m.uid, (m.size, m.checksum.clone()))).collect();
        // How many copies of each content the target holds: each stands for one source
        // message (a mailbox may hold the same bytes twice, and both are imported).
        let mut contents: BTreeMap<(u32, String), usize> = BTreeMap::new();
        for identity in by_uid.values() {
            *contents.entry(identity.clone()).or_default() += 1;
        }
        let mut uidnext = dump.uidnext;
        let metas = source.list(&folder)?;
        let total = metas.len();
        let mut handled = 0usize;
        for batch in metas.chunks(admin::FETCH_UIDS_MAX) {
            let uids: Vec<u32> = batch.iter().map(|m| m.uid).collect();
            let bodies: BTreeMap<u32, Vec<u8>> = source.bodies(&folder, &uids)?.into_iter().collect();
            // What this chunk brings, sent in batches: the round trips overlap, and the
            // master places them in the order sent.
            let mut todo: Vec<(AdminRequest, Option<u32>, u64)> = Vec::new();
            for meta in batch {
                let Some(body) = bodies.get(&meta.uid) else {
                    // Expunged at the source meanwhile: nothing to bring.
                    continue;
                };
                let identity = (
                    u32::try_from(body.len()).unwrap_or(u32::MAX),
                    format!("{:016x}", tandem_core::hash::body_checksum(body)),
                );
                if let Some(left) = contents.get_mut(&identity).filter(|n| **n > 0) {
                    *left -= 1;
                    done.skipped += 1;
                    continue;
                }
                let at = (keep_uids && meta.uid >= uidnext).then_some(meta.uid);
                let request = AdminRequest::Import {
                    mailbox: target.clone(),
                    uidvalidity: folder.uidvalidity,
                    uid: at,
                    received: meta.received,
                    flags: meta.flags.clone(),
                    body_base64: base64::engine::general_purpose::STANDARD.encode(body),
                };
                todo.push((request, at, body.len() as u64));
            }
            handled += batch.len() - todo.len();
            while !todo.is_empty() {
                let mut take = 0;
                let mut encoded = 0u64;
                while take < todo.len() && take < batch_max && (take == 0 || encoded < BATCH_BYTES_MAX) {
                    encoded += todo[take].2 * 4 / 3;
                    take += 1;
                }
                let part: Vec<(AdminRequest, Option<u32>, u64)> = todo.drain(..take).collect();
                let requests = part.iter().map(|(r, _, _)| r.clone()).collect();
                let results = match admin.call(&AdminRequest::ImportBatch { requests })? {
                    AdminReply::Batch { results } if results.len() == part.len() => results,
                    AdminReply::Error { reason, .. } => return Err(format!("{target}: {reason}")),
                    other => return Err(format!("{target}: unexpected answer {other:?}")),
                };
                for ((mut request, at, len), mut answer) in part.into_iter().zip(results) {
                    if at.is_some() && matches!(answer, AdminReply::Error { temporary: false, .. }) {
                        // The UID was taken meanwhile (mail delivered into the target
                        // during the import): the message goes in at a new UID instead.
                        if let AdminRequest::Import { uid, .. } = &mut request {
                            *uid = None;
                        }
                        answer = admin.call(&request)?;
                    }
                    match answer {
                        AdminReply::Saved { uid, .. } => {
                            if Some(uid) != at {
                                done.renumbered += 1;
                            }
                            uidnext = uidnext.max(uid.saturating_add(1));
                            done.messages += 1;
                            done.bytes += len;
                        }
                        AdminReply::Error { reason, .. } => {
                            let uid = at.map_or_else(|| "a message".to_string(), |u| format!("UID {u}"));
                            return Err(format!("{target} {uid}: {reason} (run the import again to go on)"));
                        }
                        other => return Err(format!("{target}: unexpected answer {other:?}")),
                    }
                    handled += 1;
                }
                progress.show(&target, handled, total, done.bytes, false);
            }
        }
        progress.show(&target, handled, total, done.bytes, true);
    }
    Ok(done)
}

/// What an export wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Exported {
    pub users: u64,
    pub mailboxes: u64,
    pub messages: u64,
    pub bytes: u64,
    pub keywords_dropped: u64,
}

/// Writes `user`'s mailboxes (or everyone's) as Dovecot Maildirs: `DIR/<user>/Maildir`.
/// Run again into the same directory, it writes only what is new.
pub fn export(admin: &AdminAddr, user: Option<&str>, dir: &Path, quiet: bool) -> Result<Exported, String> {
    let mut admin = Admin::connect(admin)?;
    let mut progress = Progress { quiet, tty: std::io::stderr().is_terminal(), last: Instant::now() };
    let mailboxes = match admin.call(&AdminRequest::Mailboxes { user: user.map(str::to_string) })? {
        AdminReply::Mailboxes { mailboxes } => mailboxes,
        AdminReply::Error { reason, .. } => return Err(reason),
        other => return Err(format!("unexpected answer {other:?}")),
    };
    let mut done = Exported::default();
    let mut subscriptions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in &mailboxes {
        let key = admin::parse_mailbox(&line.mailbox)?;
        let root = dir.join(&*key.user).join("Maildir");
        let subs = subscriptions.entry(key.user.to_string()).or_default();
        if line.subscribed {
            subs.push(key.name.to_string());
        }
        let dump = admin.dump(&line.mailbox)?;
        let mut writer = maildir::MaildirWriter::create(&root, &key.name, dump.uidvalidity, dump.uidnext)?;
        let todo: Vec<&admin::MessageLine> = dump.messages.iter().filter(|m| !writer.has(m.uid)).collect();
        let total = dump.messages.len();
        let mut written = total - todo.len();
        let sized: Vec<(u32, u64)> = todo.iter().map(|m| (m.uid, u64::from(m.size))).collect();
        let by_uid: BTreeMap<u32, &admin::MessageLine> = todo.iter().map(|m| (m.uid, *m)).collect();
        for uids in admin::fetch_batches(&sized) {
            let batch: Vec<&admin::MessageLine> = uids.iter().filter_map(|uid| by_uid.get(uid).copied()).collect();
            let bodies = match admin.call(&AdminRequest::Fetch { mailbox: line.mailbox.clone(), uids })? {
                AdminReply::Bodies { bodies } => bodies,
                AdminReply::Error { reason, .. } => return Err(format!("{}: {reason}", line.mailbox)),
                other => return Err(format!("unexpected answer {other:?}")),
            };
            let bodies: BTreeMap<u32, String> = bodies.into_iter().map(|b| (b.uid, b.body_base64)).collect();
            for m in batch {
                let Some(encoded) = bodies.get(&m.uid) else { continue };
                let body = base64::engine::general_purpose::STANDARD
                    .decode(encoded.as_bytes())
                    .map_err(|e| format!("{} UID {}: {e}", line.mailbox, m.uid))?;
                writer.write(&maildir::ExportedMessage {
                    uid: m.uid,
                    received: m.received,
                    flags: &m.flags,
                    body: &body,
                })?;
                written += 1;
                done.messages += 1;
                done.bytes += body.len() as u64;
                progress.show(&line.mailbox, written, total, done.bytes, false);
            }
        }
        done.keywords_dropped += writer.keywords_dropped;
        writer.finish()?;
        done.mailboxes += 1;
        progress.show(&line.mailbox, written, total, done.bytes, true);
    }
    for (user, subs) in &subscriptions {
        maildir::write_subscriptions(&dir.join(user).join("Maildir"), subs)?;
        done.users += 1;
    }
    Ok(done)
}
