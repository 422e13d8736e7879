//! Migration in and out, and backups (issue 16), against a real Dovecot 2.3:
//! - `tandem import --from imap://` of 1,000 messages in 5 folders (flags, keywords,
//!   INTERNALDATEs, UID gaps), killed part way and run again: every message once, UIDs
//!   and UIDVALIDITY kept, and mbsync, pointed at tandem after syncing from Dovecot,
//!   downloads nothing new;
//! - `tandem export --maildir` read back by Dovecot: the same messages, UIDs, flags;
//! - `tandem import --maildir` of Dovecot's own Maildir: the same again;
//! - `tandem backup` under load, restored on a fresh node directory: converges with
//!   nothing lost or duplicated.
//!
//! Dovecot switches to its mail user, so these tests need root (as CI has, and as
//! installing Dovecot does: `scripts/test-tools`).

mod harness;

use harness::Cluster;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const USER: &str = "alice@example.org";
const PASSWORD: &str = "migrate-me-now";
/// The nobody user and group, which own Dovecot's Maildirs.
const MAIL_UID: u32 = 65534;

/// A private Dovecot 2.3 serving IMAP (plain, password `PASSWORD` for any user) from
/// Maildirs under `mail/`.
struct Dovecot {
    child: Child,
    port: SocketAddr,
    mail: PathBuf,
}

impl Dovecot {
    fn start(dir: &Path, mail: &Path) -> Dovecot {
        harness::require_tools();
        assert!(is_root(), "the Dovecot tests need root: Dovecot switches to its mail user");
        for sub in ["run", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::create_dir_all(mail).unwrap();
        chown_mail(mail);
        let port = harness::free_port();
        let (d, m) = (dir.display(), mail.display());
        let config = format!(
            "base_dir = {d}/run\nstate_dir = {d}/run/state\ninstance_name = tandem-test-{p}\n\
             log_path = {d}/log/dovecot.log\nprotocols = imap\nssl = no\nlisten = 127.0.0.1\n\
             first_valid_uid = 1\ndisable_plaintext_auth = no\nmail_location = maildir:{m}/%u/Maildir\n\
             passdb {{\n  driver = static\n  args = password={PASSWORD}\n}}\n\
             userdb {{\n  driver = static\n  args = uid={MAIL_UID} gid={MAIL_UID} home={m}/%u\n}}\n\
             service imap-login {{\n  inet_listener imap {{\n    address = 127.0.0.1\n    port = {p}\n  }}\n\
             inet_listener imaps {{\n    port = 0\n  }}\n}}\n",
            p = port.port()
        );
        let path = dir.join("dovecot.conf");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("dovecot")
            .arg("-F")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log/dovecot.out")).unwrap())
            .spawn()
            .expect("dovecot (apt-get install dovecot-core dovecot-imapd)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(port).is_err() {
            assert!(Instant::now() < deadline, "Dovecot did not come up; see {}", dir.join("log").display());
            std::thread::sleep(Duration::from_millis(50));
        }
        Dovecot { child, port, mail: mail.to_path_buf() }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn chown_mail(path: &Path) {
    let ok = Command::new("chown").arg("-R").arg(format!("{MAIL_UID}:{MAIL_UID}")).arg(path).status();
    assert!(ok.is_ok_and(|s| s.success()), "chown of {}", path.display());
}

fn client(args: &[&str]) -> Value {
    harness::require_tools();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/migration.py");
    let out = Command::new("python3").arg(script).args(args).output().expect("python3");
    assert!(
        out.status.success(),
        "migration.py {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(out.stdout.trim_ascii()).expect("one JSON line")
}

fn listing(port: SocketAddr) -> Value {
    client(&["listing", &port.port().to_string(), USER, PASSWORD])
}

/// A 3-node cluster serving IMAP, with `USER` in its users file.
fn cluster() -> (Cluster, Vec<SocketAddr>) {
    let users = tempfile::NamedTempFile::new().unwrap().into_temp_path().keep().unwrap();
    tandem_node::users::add_user(&users, USER, PASSWORD.as_bytes()).unwrap();
    let imap: Vec<SocketAddr> = (0..3).map(|_| harness::free_port()).collect();
    let i2 = imap.clone();
    let cluster = Cluster::start_with(3, "mode = \"sync\"\nreplicas = 1", move |i| {
        format!("imap = \"{}\"\nusers_file = \"{}\"", i2[i], users.display())
    });
    (cluster, imap)
}

fn tandem<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tandem")).args(args).output().expect("tandem")
}

fn admin_path(c: &Cluster, i: usize) -> String {
    c.admin[i].to_string()
}

/// mbsync pulling every folder of the account at `port` into `maildir` (its state kept
/// there); returns the number of message files in the Maildir.
fn mbsync(port: SocketAddr, maildir: &Path) -> usize {
    let config = maildir.with_extension("mbsyncrc");
    std::fs::create_dir_all(maildir).unwrap();
    std::fs::write(
        &config,
        format!(
            "IMAPAccount account\nHost 127.0.0.1\nPort {}\nUser {USER}\nPass \"{PASSWORD}\"\nSSLType None\nAuthMechs LOGIN\n\n\
             IMAPStore remote\nAccount account\n\n\
             MaildirStore local\nPath {dir}/\nInbox {dir}/INBOX\nSubFolders Verbatim\n\n\
             Channel mail\nFar :remote:\nNear :local:\nPatterns *\nCreate Near\nSync Pull\nSyncState *\n",
            port.port(),
            dir = maildir.display()
        ),
    )
    .unwrap();
    let out = Command::new("mbsync").arg("-c").arg(&config).arg("-a").output().expect("mbsync (package isync)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mbsync failed:\n{text}");
    assert!(!text.to_lowercase().contains("error"), "mbsync reported errors:\n{text}");
    count_files(maildir)
}

fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(path.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()), Some("cur" | "new"))
            {
                n += 1;
            }
        }
    }
    n
}

/// Messages tandem node `i` holds for `USER`, over every mailbox.
fn stored(c: &Cluster, i: usize) -> usize {
    c.status(i).mailboxes.iter().filter(|m| m.mailbox.starts_with(USER)).map(|m| m.messages as usize).sum()
}

#[test]
fn import_from_dovecot_keeps_uids_and_flags_resumes_without_duplicates_and_exports_back() {
    let dir = tempfile::tempdir().unwrap();
    let dovecot = Dovecot::start(&dir.path().join("dovecot"), &dir.path().join("dovecot-mail"));
    client(&["fill", &dovecot.port.port().to_string(), USER, PASSWORD, "1000"]);
    let original = listing(dovecot.port);
    let total: usize = original
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "subscribed")
        .map(|(_, f)| f["messages"].as_array().unwrap().len())
        .sum();
    assert!(total > 900, "Dovecot holds {total} messages after the fill");
    // A mail client that synced from Dovecot before the move.
    let near = dir.path().join("near");
    let before = mbsync(dovecot.port, &near);
    assert_eq!(before, total, "mbsync pulled every message from Dovecot");

    let (c, imap) = cluster();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, PASSWORD).unwrap();
    let from = format!("imap://{}@{}", USER.replace('@', "%40"), dovecot.port);
    let import_args = |admin: &str| -> Vec<String> {
        ["import", "--admin", admin, "--user", USER, "--from", &from, "--password-file"]
            .iter()
            .map(|s| s.to_string())
            .chain([password_file.display().to_string(), "--quiet".into()])
            .collect()
    };
    // Interrupted: killed once a third is in (one message per request, so that is
    // seconds in, not a fraction of one).
    let mut first = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(import_args(&admin_path(&c, 0)))
        .args(["--batch", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while stored(&c, 0) < total / 3 {
        assert!(Instant::now() < deadline, "the import made no progress");
        assert!(first.try_wait().unwrap().is_none(), "the import ended before it was interrupted");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let interrupted_at = stored(&c, 0);
    assert!(interrupted_at < total, "interrupted part way: {interrupted_at} of {total}");
    // Resumed through another node.
    let out = tandem(&import_args(&admin_path(&c, 1)));
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the resumed import failed: {said}");
    assert!(said.contains("0 at new UIDs"), "{said}");
    // And once more: nothing to do.
    let out = tandem(&import_args(&admin_path(&c, 2)));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.starts_with("imported 0 messages"), "a third run imported again: {said}");

    for folder in ["INBOX", "Work", "Work/Projects", "Lists", "Archive"] {
        c.converged(&format!("{USER}/{folder}"), Duration::from_secs(30));
    }
    // Every message, flag, keyword, INTERNALDATE, UID and UIDVALIDITY, and the
    // subscriptions, as Dovecot showed them, on every node.
    for port in &imap {
        assert_eq!(listing(*port), original, "tandem after the import differs from Dovecot");
    }
    // The mail client, pointed at tandem with its old state, finds nothing new.
    let after = mbsync(imap[2], &near);
    assert_eq!(after, before, "mbsync downloaded messages again after the move");

    // Out again: a Maildir per user that Dovecot reads with the same UIDs.
    let exported = dir.path().join("exported");
    let out = tandem(&["export", "--admin", &admin_path(&c, 2), "--maildir", exported.to_str().unwrap(), "--quiet"]);
    assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
    let reader = Dovecot::start(&dir.path().join("dovecot-reader"), &exported);
    assert_eq!(listing(reader.port), original, "Dovecot reading the export differs from the original");
    drop(reader);

    // Dovecot's own Maildir, imported as files, gives the same (for another user, whose
    // mailboxes are all new).
    let maildir = dovecot.mail.join(USER).join("Maildir");
    let other = "bob@example.org";
    let out = tandem(&[
        "import",
        "--admin",
        &admin_path(&c, 0),
        "--user",
        other,
        "--maildir",
        maildir.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(out.status.success(), "maildir import: {}", String::from_utf8_lossy(&out.stderr));
    let exported_bob = dir.path().join("exported-bob");
    let out = tandem(&[
        "export",
        "--admin",
        &admin_path(&c, 1),
        "--user",
        other,
        "--maildir",
        exported_bob.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(out.status.success());
    std::fs::rename(exported_bob.join(other), exported_bob.join(USER)).unwrap();
    let reader = Dovecot::start(&dir.path().join("dovecot-reader-bob"), &exported_bob);
    assert_eq!(listing(reader.port), original, "a Maildir import differs from the IMAP one");
}

#[test]
fn a_backup_under_load_restored_on_a_fresh_node_directory_converges_with_nothing_lost() {
    let (mut c, _imap) = cluster();
    let mailbox = format!("{USER}/INBOX");
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = {
        let (admin, acked, stop, mailbox) = (c.admin[0].clone(), acked.clone(), stop.clone(), mailbox.clone());
        let failed = failed.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                i += 1;
                // Every seventh body is large enough to live in a file of its own.
                let filler = if i.is_multiple_of(7) { 100_000 } else { (i % 50) as usize * 40 };
                let body =
                    format!("Subject: load {i}\r\nMessage-ID: <load{i}@example.net>\r\n\r\n{}\r\n", "x".repeat(filler));
                let request = tandem_node::admin::AdminRequest::Deliver {
                    mailbox: mailbox.clone(),
                    body: body.clone(),
                    flags: vec![],
                };
                match harness::call(&admin, &request) {
                    Ok(tandem_node::admin::AdminReply::Saved { .. }) => acked.lock().unwrap().push(body),
                    _ => {
                        failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            }
        })
    };
    let wait_for = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.lock().unwrap().len() < n {
            assert!(Instant::now() < deadline, "the load stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(150);
    let backup = c.dir.path().join("backup-3");
    let out = tandem(&["backup", "--admin", &admin_path(&c, 2), backup.to_str().unwrap()]);
    assert!(out.status.success(), "backup: {}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.starts_with("backup in") && !said.contains(" 0 body files"), "{said}");
    let at_backup = acked.lock().unwrap().len();
    wait_for(at_backup + 150);
    // Node 3 is lost with its disk; a new machine gets the backup.
    let lost_store = c.status(2).store;
    c.kill9(2);
    let data = c.dir.path().join("data-3");
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::rename(&backup, &data).unwrap();
    let killed = acked.lock().unwrap().len();
    wait_for(killed + 100);
    c.spawn(2);
    c.wait_up(2);
    let restored_store = c.status(2).store;
    assert_eq!(restored_store.len(), 16, "{restored_store:?}");
    assert_ne!(
        restored_store, lost_store,
        "a restored backup is a new store: it did not acknowledge what came after it"
    );
    let restarted = acked.lock().unwrap().len();
    wait_for(restarted + 100);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    load.join().unwrap();
    c.wait_linked();
    let view = c.converged(&mailbox, Duration::from_secs(60));
    let acked = acked.lock().unwrap().clone();
    assert!(view.messages.len() >= acked.len(), "{} stored, {} acknowledged", view.messages.len(), acked.len());
    // Every acknowledged message is on every node, once.
    let mut checksums = std::collections::BTreeMap::<String, usize>::new();
    for m in &view.messages {
        *checksums.entry(m.checksum.clone()).or_default() += 1;
    }
    for body in &acked {
        let sum = format!("{:016x}", tandem_core::hash::body_checksum(body.as_bytes()));
        assert_eq!(checksums.get(&sum), Some(&1), "an acknowledged message is missing or stored twice");
    }
    // A delivery answered with a temporary failure may be stored all the same (its
    // answer came too late); nothing else may be.
    let failed = failed.load(std::sync::atomic::Ordering::SeqCst);
    assert!(view.messages.len() <= acked.len() + failed, "messages stored that no one asked for");
}
