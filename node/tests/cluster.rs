//! Three real `tandem` processes on loopback, checked through the admin interface.

mod harness;

use harness::{Cluster, raw_exchange};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(60);

#[test]
fn saves_on_any_node_converge_everywhere() {
    // With DEFLATE on every link, and a metrics endpoint on node 1.
    let metrics = harness::free_port();
    let c = Cluster::start_with(3, "mode = \"sync\"\nreplicas = 1\ncompression = true", |i| {
        if i == 0 { format!("metrics = \"{metrics}\"") } else { String::new() }
    });
    let mut saved = BTreeSet::new();
    for round in 0..4 {
        for node in 0..3 {
            let (_, guid) = c
                .deliver(node, "alice@example.org/INBOX", &format!("Subject: {round} via {node}\r\n\r\nhello\r\n"))
                .unwrap_or_else(|e| panic!("save via node {}: {e}\n{}", node + 1, c.log(node)));
            saved.insert(guid);
        }
    }
    let view = c.converged("alice@example.org/INBOX", CONVERGE);
    let guids: BTreeSet<String> = view.messages.iter().map(|m| m.guid.clone()).collect();
    assert_eq!(guids, saved);
    let uids: Vec<u32> = view.messages.iter().map(|m| m.uid).collect();
    assert_eq!(uids, (1..=12).collect::<Vec<u32>>(), "connected saves get consecutive UIDs");
    let s = c.status(0);
    assert!(s.root.is_some(), "{s:?}");
    assert!(s.links.iter().all(|l| l.connected), "{s:?}");
    assert!(c.log(0).contains("deflate=true"), "links negotiated DEFLATE");
    let text = harness::http_get(metrics);
    assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
    for needle in [
        "tandem_replication_backlog{server=\"1\",peer=\"2\"} 0",
        "tandem_link_up{server=\"1\",peer=\"3\"} 1",
        "tandem_ack_latency_ms_count{server=\"1\"} 4",
        "tandem_protocol_events_total{server=\"1\",event=\"root_elected\"}",
        "tandem_store_commits_total",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    assert!(!text.contains("tandem_unconfirmed_mailboxes"), "a store from the cluster's start is no newcomer");
}

/// `tandem cluster` prints until "Ctrl-C stops the cluster."; its output so far.
fn start_local_cluster(dir: &std::path::Path) -> (std::process::Child, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["cluster", "--nodes", "3", "--dir"])
        .arg(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap_or(0) > 0 {
        printed.push_str(&line);
        if line.starts_with("Ctrl-C stops") {
            break;
        }
        line.clear();
    }
    // The nodes log to stderr; nothing more is read from stdout.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    (child, printed)
}

/// The value after `key` in a printed line, up to `end`.
fn printed_after<'a>(printed: &'a str, key: &str, end: char) -> Vec<&'a str> {
    printed
        .lines()
        .filter_map(|l| l.split(key).nth(1))
        .map(|rest| rest.split(end).next().unwrap_or("").trim())
        .collect()
}

/// `tandem cluster` starts nodes a mail client can use as printed: the admin commands,
/// LMTP delivery, and the printed mbsync settings (IMAPS, the generated CA, the demo
/// user) fetch the mail; run again on the same directory, it is the same cluster with
/// its mail.
#[test]
fn tandem_cluster_starts_a_usable_local_cluster() {
    harness::require_tools();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, printed) = start_local_cluster(dir.path());
    let admins: Vec<std::path::PathBuf> =
        printed_after(&printed, "admin on ", ',').into_iter().map(Into::into).collect();
    assert_eq!(admins.len(), 3, "printed how to reach each server:\n{printed}");
    let password = printed_after(&printed, " password ", '\n').first().map(|p| p.to_string()).expect("a password");
    let lmtp: std::net::SocketAddr = printed_after(&printed, "lmtp ", ',')[0].parse().unwrap();
    let tandem = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem")).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let a1 = admins[0].display().to_string();
    let a3 = admins[2].display().to_string();
    let mut saved = None;
    for _ in 0..100 {
        let body = dir.path().join("mail.eml");
        std::fs::write(&body, "Subject: hello\n\nhi\n").unwrap();
        let (ok, text) = tandem(&[
            "deliver",
            "--admin",
            &a1,
            "--mailbox",
            "zoe@example.org/INBOX",
            "--file",
            body.to_str().unwrap(),
        ]);
        if ok {
            saved = Some(text);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let saved = saved.expect("deliver through node 1");
    assert!(saved.starts_with("saved UID 1"), "{saved}");
    let dump_shows = |admin: &str, mailbox: &str, lines: usize| {
        (0..300).any(|_| {
            let (ok, text) = tandem(&["dump", "--admin", admin, "--mailbox", mailbox]);
            let shown = ok && text.lines().count() == lines + 1;
            if !shown {
                std::thread::sleep(Duration::from_millis(100));
            }
            shown
        })
    };
    assert!(dump_shows(&a3, "zoe@example.org/INBOX", 1), "node 3 shows the message");
    let (ok, status) = tandem(&["status", "--admin", &a3]);
    assert!(ok && status.contains("root Some(1)"), "{status}");

    // LMTP to node 1, then the printed mbsync settings fetch it over IMAPS.
    let lmtp_answer = harness::raw_exchange(
        lmtp,
        b"LHLO me\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<demo@example.org>\r\nDATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n",
    );
    assert!(lmtp_answer.contains("250 2.0.0"), "{lmtp_answer}");
    let block = printed.split("--- mbsync, ~/.mbsyncrc ---\n").nth(1).and_then(|b| b.split("--- end ---").next());
    let maildir = dir.path().join("maildir");
    let config = block.expect("mbsync settings").replace("~/Mail/tandem", maildir.to_str().unwrap());
    std::fs::create_dir_all(&maildir).unwrap();
    std::fs::write(dir.path().join("mbsyncrc"), config).unwrap();
    let out =
        std::process::Command::new("mbsync").arg("-c").arg(dir.path().join("mbsyncrc")).arg("-a").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mbsync with the printed settings: {text}");
    let fetched =
        ["new", "cur"].iter().filter_map(|d| std::fs::read_dir(maildir.join("INBOX").join(d)).ok()).flatten().count();
    assert_eq!(fetched, 1, "the LMTP delivery reached the Maildir: {text}");
    // Killed without a word: its nodes see their stdin close and stop by themselves,
    // maybe still closing their stores when the next run starts (which waits for them).
    let _ = child.kill();
    let _ = child.wait();

    // The same directory again at once: the same user, password and mail.
    let (mut child, again) = start_local_cluster(dir.path());
    assert!(again.contains("the cluster recorded in"), "{again}");
    assert!(again.contains(&format!("password {password}")), "{again}");
    let a3 = printed_after(&again, "admin on ", ',')[2].to_string();
    assert!(dump_shows(&a3, "demo@example.org/INBOX", 1), "the mail is kept across runs");

    // Ctrl-C stops every node before the command returns: each store is free at once.
    let interrupted =
        std::process::Command::new("sh").arg("-c").arg(format!("kill -INT {}", child.id())).status().unwrap();
    assert!(interrupted.success());
    let stopped = (0..200).find_map(|_| match child.try_wait() {
        Ok(Some(status)) => Some(status),
        _ => {
            std::thread::sleep(Duration::from_millis(100));
            None
        }
    });
    let Some(stopped) = stopped else {
        let _ = child.kill();
        panic!("tandem cluster did not stop on Ctrl-C");
    };
    assert!(stopped.success(), "{stopped:?}");
    for node in 1..=3 {
        let data = dir.path().join(format!("data-{node}"));
        let opened = tandem_node::store::Store::open(&data);
        assert!(opened.is_ok(), "node {node}'s store is free after Ctrl-C: {:?}", opened.err());
    }
}

/// `tandem check-config` accepts a node's file and says what it sets up, refuses a bad
/// one naming the line; SIGTERM (systemd's stop) ends a node cleanly.
#[test]
fn check_config_and_sigterm_for_an_operator() {
    let mut c = Cluster::start(2, "");
    let check = |path: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["check-config", "--config"])
            .arg(path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = check(c.config(0));
    assert!(ok && text.contains(": ok") && text.contains("peers: 2 at "), "{text}");
    let broken = c.dir.path().join("broken.toml");
    let good = std::fs::read_to_string(c.config(0)).unwrap();
    std::fs::write(&broken, good + "\nreplicas = \"two\"\n").unwrap();
    let (ok, text) = check(&broken);
    assert!(!ok && text.contains("replicas"), "{text}");
    let pid = c.pid(1).expect("node 2 runs");
    let status = std::process::Command::new("sh").arg("-c").arg(format!("kill -TERM {pid}")).status().unwrap();
    assert!(status.success());
    let exit = c.wait_exit(1, Duration::from_secs(10)).expect("node 2 stops on SIGTERM");
    assert!(exit.success(), "a clean stop: {exit:?}\n{}", c.log(1));
}

#[test]
fn kill_9_of_the_master_under_saves_loses_no_acknowledged_message() {
    let mut c = Cluster::start(3, "mode = \"sync\"\nreplicas = 1");
    let mailbox = "bob@example.org/INBOX";
    // The first save makes node 1 the mailbox's master (it asks the root, node 1).
    let mut acked = vec![c.deliver(0, mailbox, "Subject: first\r\n\r\n").expect("first save").1];
    let s = c.status(0);
    assert!(s.mastered_here.iter().any(|k| k.contains("bob@example.org")), "{s:?}");
    for i in 0..60 {
        if i == 20 {
            c.kill9(0);
        }
        // Saves go through node 2 and 3, forwarded to the master while it lives.
        let via = 1 + i % 2;
        if let Ok((_, guid)) = c.deliver(via, mailbox, &format!("Subject: stream {i}\r\n\r\n")) {
            acked.push(guid);
        }
    }
    assert!(acked.len() > 40, "the cluster went on after the kill: {} acked", acked.len());
    c.spawn(0);
    c.wait_up(0);
    let view = c.converged(mailbox, CONVERGE);
    let present: BTreeSet<&String> = view.messages.iter().map(|m| &m.guid).collect();
    for g in &acked {
        assert!(present.contains(g), "acknowledged {g} lost; view {view:#?}");
    }
}

/// A restart is a normal condition (issue 15): a node killed while the others took
/// saves, restarted, and written through at once must not master the mailbox from its
/// stale disk and hand out UIDs the cluster already gave. Every message keeps the UID
/// its client was told, in async mode where a master acknowledges alone.
#[test]
fn a_restarted_node_takes_saves_at_once_and_nothing_is_renumbered() {
    let mut c = Cluster::start(3, "mode = \"async\"\nreplicas = 1");
    let mailbox = "dave@example.org/INBOX";
    let mut told: std::collections::BTreeMap<String, u32> = Default::default();
    for i in 0..4 {
        let (uid, guid) = c.deliver(i % 3, mailbox, &format!("Subject: before {i}\r\n\r\n")).expect("save");
        told.insert(guid, uid);
    }
    c.converged(mailbox, CONVERGE);
    c.kill9(2);
    // Long enough for the others' redials to back off to their slowest.
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..4 {
        let (uid, guid) = c.deliver(i % 2, mailbox, &format!("Subject: while away {i}\r\n\r\n")).expect("save");
        told.insert(guid, uid);
    }
    c.spawn(2);
    c.wait_up(2);
    let (uid, guid) = c.deliver(2, mailbox, "Subject: right after the restart\r\n\r\n").expect("save at once");
    told.insert(guid, uid);
    assert_eq!(uid, 9, "the restarted node's save gets the cluster's next UID");
    let view = c.converged(mailbox, CONVERGE);
    let now: std::collections::BTreeMap<String, u32> = view.messages.iter().map(|m| (m.guid.clone(), m.uid)).collect();
    assert_eq!(now, told, "every message keeps the UID its client was told");
}

/// Files under a data directory's `bodies/`.
fn body_files(data: &std::path::Path) -> usize {
    std::fs::read_dir(data.join("bodies")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn kill_9_during_body_writes_loses_no_message_and_leaves_no_stray_body() {
    use tandem_core::store::BodyStore;
    use tandem_node::admin::{AdminReply, AdminRequest};
    let mut c = Cluster::start(3, "mode = \"sync\"\nreplicas = 1");
    let mailbox = "bob@example.org/INBOX";
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Large bodies (files) and small ones (database rows) through nodes 2 and 3, so that
    // a kill of node 1 (a replica or the master) lands while bodies are being written.
    let writer = {
        let (admin, stop) = (c.admin.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut acked, mut expunged) = (Vec::new(), Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let len = if i % 4 < 2 { 200_000 + i * 97 } else { 2_000 + i };
                let body = format!("Subject: body {i}\r\n\r\n{}\r\n", "x".repeat(len));
                let via = &admin[1 + i % 2];
                let request = AdminRequest::Deliver { mailbox: mailbox.into(), body, flags: vec![] };
                if let Ok(AdminReply::Saved { guid, uid, .. }) = harness::call(via, &request) {
                    // Every third message is expunged again: its body file is deleted.
                    let expunge = AdminRequest::Expunge { mailbox: mailbox.into(), uids: vec![uid] };
                    if i % 3 == 0 && matches!(harness::call(via, &expunge), Ok(AdminReply::Expunged { .. })) {
                        expunged.push(guid);
                    } else {
                        acked.push(guid);
                    }
                }
                i += 1;
            }
            (acked, expunged)
        })
    };
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        c.kill9(0);
        std::thread::sleep(Duration::from_millis(100));
        c.spawn(0);
        c.wait_up(0);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (acked, expunged) = writer.join().expect("writer");
    assert!(acked.len() > 10 && !expunged.is_empty(), "only {} saves and {} expunges", acked.len(), expunged.len());
    let view = c.converged(mailbox, CONVERGE);
    let present: BTreeSet<&String> = view.messages.iter().map(|m| &m.guid).collect();
    for g in &acked {
        assert!(present.contains(g), "acknowledged {g} lost");
    }
    for g in &expunged {
        assert!(!present.contains(g), "expunged {g} is back");
    }
    // Bodies of expunged messages are collected on a slow tick, two maintenance passes
    // after they lost their last message; then a quiet cluster has no write in flight,
    // and a kill leaves exactly what it wrote.
    std::thread::sleep(Duration::from_secs(5));
    for i in 0..3 {
        c.kill9(i);
    }
    for i in 0..3 {
        let data = c.dir.path().join(format!("data-{}", i + 1));
        let files = body_files(&data);
        let store = tandem_node::store::Store::open(&data).expect("store opens");
        let image = store.load().expect("store loads");
        let referenced = store.index().hashes();
        let inline = store.inline_hashes().expect("inline bodies");
        assert!(inline.is_subset(&referenced), "node {}: body rows that no message references", i + 1);
        assert!(!inline.is_empty() && files > 0, "node {}: {files} files, {} rows", i + 1, inline.len());
        assert_eq!(files + inline.len(), referenced.len(), "node {}: body files that no message references", i + 1);
        let reader = store.body_reader();
        for (guid, stored) in &image.bodies {
            let bytes = reader.read(*guid).unwrap_or_else(|| panic!("node {}: body {guid} dangling", i + 1));
            assert_eq!(tandem_core::hash::body_checksum(&bytes), stored.checksum, "node {}: body {guid}", i + 1);
        }
        let live: BTreeSet<tandem_core::Guid> =
            image.mailboxes.values().flat_map(|m| m.messages.values().map(|r| r.guid)).collect();
        assert!(live.iter().all(|g| image.bodies.contains_key(g)), "node {}: a message without a body", i + 1);
        let kept: BTreeSet<tandem_core::Guid> = image.bodies.keys().copied().collect();
        assert_eq!(kept, live, "node {}: bodies of expunged messages are collected", i + 1);
    }
}

/// Whether every body file under `data` holds the bytes its name (their SHA-256) says,
/// and there are `count` of them.
fn body_files_intact(data: &std::path::Path, count: usize) -> bool {
    use sha2::Digest;
    let Ok(files) = std::fs::read_dir(data.join("bodies")) else { return false };
    let mut seen = 0;
    for file in files.flatten() {
        let name = file.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(file.path()).unwrap_or_default();
        let hash: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        if hash != name {
            return false;
        }
        seen += 1;
    }
    seen == count
}

#[test]
fn a_damaged_or_missing_body_file_is_refetched_from_a_peer_and_the_rest_is_served() {
    // Every body in a file, where a hand can damage one.
    let mut c = Cluster::start(3, "mode = \"sync\"\nreplicas = 1\nbody_inline_max_bytes = 0");
    let mailbox = "carol@example.org/INBOX";
    for i in 0..6 {
        c.deliver(0, mailbox, &format!("Subject: keep {i}\r\n\r\nbody {i}\r\n")).expect("save");
    }
    let before = c.converged(mailbox, CONVERGE);
    c.kill9(2);
    let data = c.dir.path().join("data-3");
    assert!(body_files_intact(&data, 6));
    let files: Vec<std::path::PathBuf> =
        std::fs::read_dir(data.join("bodies")).unwrap().flatten().map(|f| f.path()).collect();
    // One body damaged on disk, one lost; the store itself is untouched.
    let mut damaged = std::fs::read(&files[0]).unwrap();
    damaged[0] ^= 0x20;
    std::fs::write(&files[0], damaged).unwrap();
    std::fs::remove_file(&files[1]).unwrap();
    assert!(!body_files_intact(&data, 6));
    c.spawn(2);
    c.wait_up(2);
    assert_eq!(c.dump(2, mailbox).messages, before.messages, "the node opens and shows every message");
    assert!(harness::eventually(|| body_files_intact(&data, 6)), "the damaged bodies were not repaired");
    assert_eq!(c.converged(mailbox, CONVERGE).messages, before.messages);
}

#[test]
fn partition_by_proxy_then_heal_renumbers_the_conflict() {
    let c = Cluster::start(3, "mode = \"async\"\nreplicas = 1");
    let mailbox = "carol@example.org/INBOX";
    let (uid1, m1) = c.deliver(0, mailbox, "Subject: m1\r\n\r\n").expect("m1");
    assert_eq!(uid1, 1);
    c.converged(mailbox, CONVERGE);
    c.isolate(2);
    // Both sides go on alone: node 3 becomes its own root and master.
    let mut a = None;
    let mut b = None;
    for _ in 0..100 {
        a = a.or_else(|| c.deliver(0, mailbox, "Subject: m2 majority side\r\n\r\n").ok());
        b = b.or_else(|| c.deliver(2, mailbox, "Subject: m3 isolated side\r\n\r\n").ok());
        if a.is_some() && b.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (uid2, m2) = a.expect("save on the majority side");
    let (uid3, m3) = b.expect("save on the isolated side");
    assert_eq!((uid2, uid3), (2, 2), "both sides assigned UID 2");
    c.heal();
    let view = c.converged(mailbox, CONVERGE);
    let uid_of = |g: &str| view.messages.iter().find(|m| m.guid == g).map(|m| m.uid);
    assert_eq!(uid_of(&m1), Some(1), "m1 keeps UID 1");
    let (n2, n3) = (uid_of(&m2).expect("m2 kept"), uid_of(&m3).expect("m3 kept"));
    // As in the simulator's seed-uid-conflict scenario: both conflicting messages get
    // new UIDs above every UID either side used.
    assert!(n2 > 2 && n3 > 2 && n2 != n3, "{view:#?}");
    assert_eq!(view.uidnext, n2.max(n3) + 1);
}

#[test]
fn a_peer_with_a_wrong_secret_is_refused() {
    let c = Cluster::start(3, "");
    let mut s = TcpStream::connect(c.listen[1]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.write_all(b"TANDEM/4 HELLO 1 000102030405060708090a0b0c0d0e0f 0\r\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("TANDEM/4 CHALLENGE 2 "), "{line:?}");
    s.write_all(format!("PROOF {}\r\n", "00".repeat(32)).as_bytes()).unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("ERROR authentication failed"), "{line:?}");
    line.clear();
    assert_eq!(r.read_line(&mut line).unwrap_or(0), 0, "the connection is closed: {line:?}");
    // A dialer that checks the acceptor's proof refuses a node with another secret too.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let refused = rt.block_on(async {
        let mut stream: tandem_node::peer::PeerStream =
            Box::new(tokio::net::TcpStream::connect(c.listen[2]).await.unwrap());
        tandem_node::peer::dial_handshake(
            &mut stream,
            tandem_core::Sid(1),
            tandem_core::Sid(3),
            b"another secret, 32 bytes long...",
            false,
        )
        .await
    });
    assert!(refused.is_err_and(|e| e.0.contains("does not know the cluster secret")));
    assert!(harness::eventually(|| c.log(1).contains("authentication failed")), "logged");
    // The cluster is undisturbed.
    c.deliver(0, "dave@example.org/INBOX", "Subject: x\r\n\r\n").unwrap();
    c.converged("dave@example.org/INBOX", CONVERGE);
}

#[test]
fn garbage_on_the_peer_port_gets_an_error_and_changes_nothing() {
    let c = Cluster::start(3, "");
    let answer = raw_exchange(c.listen[0], b"\x16\x03\x01\x02\x00GET / HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("ERROR expected TANDEM/4 HELLO"), "{answer:?}");
    let answer = raw_exchange(c.listen[0], &[0xffu8; 4000]);
    assert!(answer.starts_with("ERROR handshake line too long"), "{answer:?}");
    let answer = raw_exchange(c.listen[0], b"TANDEM/4 HELLO 9 000102030405060708090a0b0c0d0e0f 0\r\n");
    assert!(answer.starts_with("ERROR server 9 is not in this cluster"), "{answer:?}");
    // A server of the release before pushed bindings is told why it cannot join.
    let answer = raw_exchange(c.listen[0], b"TANDEM/2 HELLO 2 000102030405060708090a0b0c0d0e0f 0\r\n");
    assert!(
        answer.starts_with("ERROR the peer speaks the peer protocol TANDEM/2 and this server TANDEM/4"),
        "{answer:?}"
    );
    let s = c.status(0);
    assert!(s.links.iter().all(|l| l.connected), "{s:?}");
    c.deliver(1, "erin@example.org/INBOX", "Subject: y\r\n\r\n").unwrap();
    let view = c.converged("erin@example.org/INBOX", CONVERGE);
    assert_eq!(view.messages.len(), 1);
}

/// A CA and one certificate per node, named `tandem-N`, written into `dir`.
fn make_certs(dir: &std::path::Path, nodes: u32) {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for id in 1..=nodes {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![format!("tandem-{id}")]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("node-{id}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("node-{id}.key")), key.serialize_pem()).unwrap();
    }
}

#[test]
fn mutual_tls_links_carry_replication_and_refuse_plain_peers() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path(), 3);
    let p = certs.path().display().to_string();
    let c = Cluster::start_with(3, "compression = true", |i| {
        format!("tls_cert = \"{p}/node-{0}.pem\"\ntls_key = \"{p}/node-{0}.key\"\ntls_ca = \"{p}/ca.pem\"", i + 1)
    });
    for node in 0..3 {
        c.deliver(node, "tls@example.org/INBOX", &format!("Subject: {node}\r\n\r\n")).unwrap();
    }
    let view = c.converged("tls@example.org/INBOX", CONVERGE);
    assert_eq!(view.messages.len(), 3);
    // A peer speaking plain text to a TLS port gets nowhere.
    let answer = raw_exchange(c.listen[1], b"TANDEM/4 HELLO 1 000102030405060708090a0b0c0d0e0f 0\r\n");
    assert!(!answer.contains("CHALLENGE"), "{answer:?}");
    assert!(harness::eventually(|| c.log(1).contains("TLS handshake")), "the refusal is logged");
    assert!(c.status(1).links.iter().all(|l| l.connected));
    // Server 1's certificate (valid, signed by the CA) cannot speak for server 3.
    let tls = tandem_node::tls::Tls::load(
        &certs.path().join("node-1.pem"),
        &certs.path().join("node-1.key"),
        &certs.path().join("ca.pem"),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let refused = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(c.listen[1]).await.unwrap();
        let name = tandem_node::tls::server_name(2).unwrap();
        let stream = tls.connector.connect(name, tcp).await.unwrap();
        let mut stream: tandem_node::peer::PeerStream = Box::new(stream);
        tandem_node::peer::dial_handshake(
            &mut stream,
            tandem_core::types::Sid(3),
            tandem_core::types::Sid(2),
            harness::SECRET.as_bytes(),
            false,
        )
        .await
    });
    assert!(refused.is_err_and(|e| e.0.contains("does not name tandem-3")));
}

#[test]
fn tombstones_are_collected_once_every_node_agreed_and_survive_a_kill_9() {
    let metrics: Vec<std::net::SocketAddr> = (0..3).map(|_| harness::free_port()).collect();
    let mut c = Cluster::start_with(3, "mode = \"sync\"\nreplicas = 1\ntombstone_grace_secs = 10", |i| {
        format!("metrics = \"{}\"", metrics[i])
    });
    let mailbox = "alice@example.org/INBOX";
    let mut uids = Vec::new();
    for n in 0..6 {
        let (uid, _) = c.deliver(n % 3, mailbox, &format!("Subject: {n}\r\n\r\nbody {n}\r\n")).expect("deliver");
        uids.push(uid);
    }
    let expunge = tandem_node::admin::AdminRequest::Expunge { mailbox: mailbox.into(), uids: uids[1..4].to_vec() };
    let reply = harness::call(&c.admin[1], &expunge).expect("expunge");
    assert!(matches!(reply, tandem_node::admin::AdminReply::Expunged { ref uids } if uids.len() == 3), "{reply:?}");
    c.converged(mailbox, CONVERGE);
    // Collection waits for every node to have shown the master the same copy for the
    // grace period (10 s) after the expunge: not before, but well within a minute.
    let collected = || (0..3).map(|i| harness::event_count(metrics[i], i + 1, "tombstones_collected")).sum::<u64>();
    assert_eq!(collected(), 0, "collected before the grace period");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while collected() == 0 {
        assert!(std::time::Instant::now() < deadline, "no collection within a minute\n{}", c.log(0));
        std::thread::sleep(Duration::from_millis(500));
    }
    c.converged(mailbox, CONVERGE);
    // Every node's store holds no tombstone of the mailbox any more, only retired UIDs.
    c.kill9(2);
    let store = tandem_node::store::Store::open(&c.dir.path().join("data-3")).expect("open the store");
    let image = store.load().expect("load");
    drop(store);
    let key = tandem_core::MailboxKey::new("alice@example.org", "INBOX");
    let m = &image.mailboxes[&key];
    assert!(m.tombstones.is_empty(), "tombstones left: {:?}", m.tombstones);
    for uid in &uids[1..4] {
        assert!(m.retired.contains(*uid), "UID {uid} not retired: {:?}", m.retired);
    }
    // After a kill -9 and a restart nothing expunged is back, and a new save gets a UID
    // above every retired one.
    c.spawn(2);
    c.wait_up(2);
    c.wait_linked();
    let (uid, _) = c.deliver(2, mailbox, "Subject: after\r\n\r\nafter\r\n").expect("deliver after");
    assert!(uid > uids[5], "UID {uid} reused");
    let view = c.converged(mailbox, CONVERGE);
    let shown: Vec<u32> = view.messages.iter().map(|m| m.uid).collect();
    assert_eq!(shown, vec![uids[0], uids[4], uids[5], uid]);
}

/// A node whose disk is lost comes back with a new store: its peers hear the new store
/// identity from it on the new link (so no master goes on counting what the old store
/// acknowledged), and the mail is copied onto the new disk.
#[test]
fn a_node_with_a_new_disk_is_known_by_its_new_store_identity() {
    let mut c = Cluster::start(3, "");
    let mailbox = "frank@example.org/INBOX";
    let mut acked = one_save_through_each(&c, mailbox);
    let heard = |c: &Cluster, from: usize| {
        c.status(from).links.iter().find(|l| l.peer == 3).and_then(|l| l.store.clone()).unwrap_or_default()
    };
    let old = c.status(2).store;
    assert_eq!(old.len(), 16, "{old:?}");
    assert!(harness::eventually(|| heard(&c, 0) == old && heard(&c, 1) == old), "the peers know node 3's store");
    c.kill9(2);
    std::fs::remove_dir_all(c.dir.path().join("data-3")).expect("the disk is lost");
    c.spawn(2);
    c.wait_up(2);
    c.wait_linked();
    let new = c.status(2).store;
    assert_eq!(new.len(), 16, "{new:?}");
    assert_ne!(new, old, "a new store has a new identity");
    assert!(
        harness::eventually(|| heard(&c, 0) == new && heard(&c, 1) == new),
        "the peers hear the new store: {} {}",
        heard(&c, 0),
        heard(&c, 1)
    );
    let (_, guid) = c.deliver(2, mailbox, "Subject: after\r\n\r\n").expect("a save through the new disk");
    acked.insert(guid);
    let view = c.converged(mailbox, CONVERGE);
    let present: BTreeSet<String> = view.messages.iter().map(|m| m.guid.clone()).collect();
    assert_eq!(present, acked, "every acknowledged message is on every disk, the new one too");
    // The new store is a newcomer (made after the cluster had run); its copy of the
    // mailbox is confirmed by the master's check once filled. The others are not.
    assert_eq!(c.status(0).unconfirmed, None, "a store from the cluster's start is no newcomer");
    assert!(
        harness::eventually(|| c.status(2).unconfirmed == Some(0) && c.status(2).filled == Some(true)),
        "the new store's copies are confirmed: {:?}",
        c.status(2).unconfirmed
    );
    assert_eq!(c.status(0).filled, Some(true));
    // A restart keeps the store's identity, and what was confirmed.
    c.kill9(2);
    c.spawn(2);
    c.wait_up(2);
    assert_eq!(c.status(2).store, new);
    assert_eq!(c.status(2).unconfirmed, Some(0));
}

/// A node started on an empty disk while cut off from the others takes no mastership
/// alone (its store was never in a root term): a delivery through it gets a temporary
/// failure instead of UID 1 again under the cluster's UIDVALIDITY (async mode, where a
/// master alone acknowledges). Once it is linked it is filled, its copy confirmed, and
/// it takes mail.
#[test]
fn a_node_on_an_empty_disk_cut_off_masters_nothing() {
    let mut c = Cluster::start(3, "mode = \"async\"\nreplicas = 1");
    let mailbox = "gina@example.org/INBOX";
    let mut acked = one_save_through_each(&c, mailbox);
    c.kill9(2);
    std::fs::remove_dir_all(c.dir.path().join("data-3")).expect("the disk is lost");
    c.isolate(2);
    c.spawn(2);
    c.wait_up(2);
    // Past its start-up hold (2 s) and with the request's whole time (3 s).
    let refused = c.deliver(2, mailbox, "Subject: alone\r\n\r\n");
    assert!(refused.is_err(), "a store never in a term masters nothing alone: {refused:?}");
    let alone = c.status(2);
    assert_eq!(alone.root, None, "no term of its own");
    assert_eq!(alone.filled, Some(false), "never in a term");
    assert!(alone.mailboxes.is_empty(), "{:?}", alone.mailboxes);
    c.heal();
    c.wait_linked();
    assert!(
        harness::eventually(|| c.status(2).filled == Some(true)
            && c.status(2).mailboxes.iter().any(|m| m.mailbox == mailbox && m.messages == 3)),
        "filled and confirmed once linked: {:?}",
        c.status(2).unconfirmed
    );
    let (_, guid) = c.deliver(2, mailbox, "Subject: after\r\n\r\n").expect("a save once filled");
    acked.insert(guid);
    let view = c.converged(mailbox, CONVERGE);
    let present: BTreeSet<String> = view.messages.iter().map(|m| m.guid.clone()).collect();
    assert_eq!(present, acked, "the refused delivery stored nothing");
}

/// One delivery through each of the three nodes, converged: their GUIDs.
fn one_save_through_each(c: &Cluster, mailbox: &str) -> BTreeSet<String> {
    let mut acked = BTreeSet::new();
    for i in 0..3 {
        let (_, guid) = c.deliver(i, mailbox, &format!("Subject: before {i}\r\n\r\n")).expect("save");
        acked.insert(guid);
    }
    c.converged(mailbox, CONVERGE);
    acked
}
