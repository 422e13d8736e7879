//! A node whose disk fills up: writes get temporary failures, reads go on, the node
//! restarts on the full disk, and takes writes again once there is room, without a
//! restart. The disk is a 6 MiB tmpfs mounted over the node's data directory, which
//! needs root: this test is ignored by `cargo test` and run by `.ci/run` (as root) with
//! `cargo test -p tandem-node --test full_disk -- --ignored`.

mod harness;

use harness::Cluster;
use std::process::Command;
use std::time::Duration;

/// A tmpfs of `mib` MiB over `dir`, unmounted (lazily) when dropped.
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(dir: &std::path::Path, mib: u32) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tandem-full-disk"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs needs root (CI runs this test as root)");
        SmallDisk { dir: dir.to_path_buf() }
    }

    fn grow(&self, mib: u32) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.dir)
            .status()
            .expect("run mount");
        assert!(status.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
#[ignore = "needs root to mount a small tmpfs; .ci/run runs it"]
fn a_full_disk_gives_temporary_failures_keeps_reads_and_survives_a_restart() {
    let mut c = Cluster::start(1, "mode = \"sync\"\nreplicas = 0");
    let mailbox = "dave@example.org/INBOX";
    c.kill9(0);
    let data = c.dir.path().join("data-1");
    let disk = SmallDisk::mount(&data, 6);
    c.spawn(0);
    c.wait_up(0);
    let body = |i: usize| format!("Subject: fill {i}\r\n\r\n{}\r\n", "y".repeat(300_000 + i));
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..60 {
        match c.deliver(0, mailbox, &body(i)) {
            Ok((_, guid)) => acked.push(guid),
            Err(why) => {
                refused = Some(why);
                break;
            }
        }
    }
    let refused = refused.expect("the 6 MiB disk never filled");
    assert!(refused.contains("temporary: true"), "a full disk is a temporary failure: {refused}");
    assert!(!acked.is_empty(), "nothing fit on the disk");
    // Reads are served while the disk is full.
    let shown: Vec<String> = c.dump(0, mailbox).messages.iter().map(|m| m.guid.clone()).collect();
    for g in &acked {
        assert!(shown.contains(g), "acknowledged {g} not shown while the disk is full");
    }
    // A restart on the full disk: the node comes up and shows every acknowledged message.
    c.kill9(0);
    c.spawn(0);
    c.wait_up(0);
    let shown: Vec<String> = c.dump(0, mailbox).messages.iter().map(|m| m.guid.clone()).collect();
    for g in &acked {
        assert!(shown.contains(g), "acknowledged {g} lost across a restart on a full disk");
    }
    let still_full = c.deliver(0, mailbox, &body(1000));
    assert!(still_full.is_err_and(|why| why.contains("temporary: true")), "a write on a full disk is refused for now");
    // Room again: writes are taken without a restart (the store retries its commit).
    disk.grow(64);
    let mut taken = false;
    for i in 0..40 {
        if c.deliver(0, mailbox, &body(2000 + i)).is_ok() {
            taken = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(taken, "no write taken after the disk got room; log:\n{}", c.log(0));
    drop(c);
}
