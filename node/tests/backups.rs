//! A backup restored in place of a node's store (README, "Backups"): one older than the
//! tombstone grace is refused at its first start, as it could bring back mail expunged
//! since, unless the operator accepts that (`tandem node --accept-old-backup`, for a
//! backup that is all that is left of the mail).

mod harness;

use harness::Cluster;
use std::process::Command;
use std::time::Duration;

const MAILBOX: &str = "u@example.org/INBOX";

/// `tandem backup` of node `i`'s store, into the cluster's directory.
fn take_backup(c: &Cluster, i: usize) -> std::path::PathBuf {
    let backup = c.dir.path().join(format!("backup-{}", i + 1));
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["backup", "--admin", &c.admin[i].to_string(), backup.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "backup: {}", String::from_utf8_lossy(&out.stderr));
    backup
}

#[test]
fn a_backup_older_than_the_grace_is_refused_at_its_first_start_unless_accepted() {
    let mut c = Cluster::start(3, "mode = \"sync\"\nreplicas = 1\ntombstone_grace_secs = 10");
    c.deliver(0, MAILBOX, "Subject: before\r\n\r\nin the backup\r\n").unwrap();
    let backup = take_backup(&c, 2);
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

/// A backup put back after an expunge it lacks was collected, once every other node
/// restarted (a rolling upgrade): the others remember the collection on disk, so the
/// restored store's copy of the expunged message is dropped, not moved to a new UID as
/// mail only it holds (README, "Backups"; the simulator's `late-restore` focus).
#[test]
fn a_backup_put_back_after_a_collection_and_a_rolling_restart_brings_no_expunged_mail_back() {
    let metrics: Vec<std::net::SocketAddr> = (0..3).map(|_| harness::free_port()).collect();
    let mut c = Cluster::start_with(3, "mode = \"sync\"\nreplicas = 1\ntombstone_grace_secs = 10", |i| {
        format!("metrics = \"{}\"", metrics[i])
    });
    let (gone, _) = c.deliver(0, MAILBOX, "Subject: expunged\r\n\r\nexpunged after the backup\r\n").unwrap();
    let (kept, _) = c.deliver(1, MAILBOX, "Subject: kept\r\n\r\nin the backup and kept\r\n").unwrap();
    c.converged(MAILBOX, Duration::from_secs(60));
    let backup = take_backup(&c, 2);
    let expunge = tandem_node::admin::AdminRequest::Expunge { mailbox: MAILBOX.into(), uids: vec![gone] };
    let reply = harness::call(&c.admin[1], &expunge).expect("expunge");
    assert!(matches!(reply, tandem_node::admin::AdminReply::Expunged { ref uids } if uids == &[gone]), "{reply:?}");
    let collected = || (0..3).map(|i| harness::event_count(metrics[i], i + 1, "tombstones_collected")).sum::<u64>();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while collected() == 0 {
        assert!(std::time::Instant::now() < deadline, "no collection within 90 s\n{}", c.log(0));
        std::thread::sleep(Duration::from_millis(500));
    }
    c.converged(MAILBOX, Duration::from_secs(60));
    // Every node but the one to be restored restarts, one after the other.
    for i in 0..2 {
        c.kill9(i);
        c.spawn(i);
        c.wait_up(i);
        c.wait_linked();
    }
    c.kill9(2);
    let data = c.dir.path().join("data-3");
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::rename(&backup, &data).unwrap();
    c.spawn_with(2, &["--accept-old-backup"]);
    c.wait_up(2);
    c.wait_linked();
    let view = c.converged(MAILBOX, Duration::from_secs(60));
    let shown: Vec<u32> = view.messages.iter().map(|m| m.uid).collect();
    assert_eq!(shown, vec![kept], "the expunged message is not back: {view:?}");
    // It started as a newcomer (cut off alone it would have mastered from the backup's
    // copies), and is filled once the masters confirmed its copies.
    assert_eq!(harness::event_count(metrics[2], 3, "restored_store_refills"), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while c.status(2).filled != Some(true) {
        assert!(std::time::Instant::now() < deadline, "not filled within 60 s: {:?}", c.status(2));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every server lost but one backup: put back on one node, the others started on empty
/// disks. The restored store starts as a newcomer (alone it would wait for a peer), and
/// with the others it is the one copy: the mail comes back everywhere and every store
/// ends filled (README, "Backups").
#[test]
fn a_backup_that_is_all_that_is_left_fills_the_cluster_again() {
    let mut c = Cluster::start(3, "mode = \"sync\"\nreplicas = 1");
    let (first, _) = c.deliver(0, MAILBOX, "Subject: one\r\n\r\nin the backup\r\n").unwrap();
    let (second, _) = c.deliver(1, MAILBOX, "Subject: two\r\n\r\nin the backup too\r\n").unwrap();
    c.converged(MAILBOX, Duration::from_secs(60));
    let backup = take_backup(&c, 2);
    for i in 0..3 {
        c.kill9(i);
        std::fs::remove_dir_all(c.dir.path().join(format!("data-{}", i + 1))).unwrap();
    }
    std::fs::rename(&backup, c.dir.path().join("data-3")).unwrap();
    for i in 0..3 {
        c.spawn(i);
    }
    for i in 0..3 {
        c.wait_up(i);
    }
    c.wait_linked();
    let view = c.converged(MAILBOX, Duration::from_secs(60));
    assert_eq!(view.messages.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![first, second], "{view:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for i in 0..3 {
        while c.status(i).filled != Some(true) {
            assert!(std::time::Instant::now() < deadline, "node {} not filled: {:?}", i + 1, c.status(i));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // And new mail goes on at the next UID.
    let (third, _) = c.deliver(0, MAILBOX, "Subject: three\r\n\r\nafter the restore\r\n").unwrap();
    assert!(third > second, "{third} after {second}");
}
