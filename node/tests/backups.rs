//! A backup restored in place of a node's store (README, "Backups"): one older than the
//! tombstone grace is refused at its first start, as it could bring back mail expunged
//! since, unless the operator accepts that (`tandem node --accept-old-backup`, for a
//! backup that is all that is left of the mail).

mod harness;

use harness::Cluster;
use std::process::Command;
use std::time::Duration;

const MAILBOX: &str = "u@example.org/INBOX";

#[test]
fn a_backup_older_than_the_grace_is_refused_at_its_first_start_unless_accepted() {
    let mut c = Cluster::start(3, "mode = \"sync\"\nreplicas = 1\ntombstone_grace_secs = 10");
    c.deliver(0, MAILBOX, "Subject: before\r\n\r\nin the backup\r\n").unwrap();
    let backup = c.dir.path().join("backup-3");
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["backup", "--admin", &c.admin[2].to_string(), backup.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "backup: {}", String::from_utf8_lossy(&out.stderr));
    // Older than the grace (10 s) by the time it is restored.
    std::thread::sleep(Duration::from_secs(11));
    c.deliver(0, MAILBOX, "Subject: after\r\n\r\nnot in the backup\r\n").unwrap();
    c.kill9(2);
    let data = c.dir.path().join("data-3");
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::rename(&backup, &data).unwrap();
    c.spawn(2);
    let refused = c.wait_exit(2, Duration::from_secs(20)).expect("a refused start ends");
    assert!(!refused.success());
    let log = c.log(2);
    assert!(log.contains("older than tombstone_grace_secs") && log.contains("--accept-old-backup"), "{log}");
    // The refusal changed nothing: the copy is still a backup, and starts when accepted.
    c.spawn_with(2, &["--accept-old-backup"]);
    c.wait_up(2);
    c.wait_linked();
    assert!(c.log(2).contains("starting on a restored backup"));
    let view = c.converged(MAILBOX, Duration::from_secs(60));
    assert_eq!(view.messages.len(), 2, "{view:?}");
    // Started once, it is the node's store: a restart needs no word from the operator.
    c.kill9(2);
    c.spawn(2);
    c.wait_up(2);
}
