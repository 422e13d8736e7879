//! Record and replay on real processes: a 3-node cluster records its cores' inputs
//! (`[record]`) through a partition, a conflict, a kill -9 and a restart, and every
//! recording (the killed node's torn one and its restart's too) replays through this
//! build's core with the same outputs after every input.

mod harness;

use harness::Cluster;
use std::path::PathBuf;
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(30);

fn recordings(c: &Cluster, node: usize) -> Vec<PathBuf> {
    let dir = c.dir.path().join(format!("rec-{}", node + 1));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tdrec"))
        .collect();
    files.sort();
    files
}

#[test]
fn a_recorded_cluster_run_replays_input_for_input() {
    let mut c = Cluster::start_with(3, "mode = \"async\"\nreplicas = 1", |i| {
        format!("[record]\ndir = \"rec-{}\"\nmax_mb = 64\nbodies = true\n", i + 1)
    });
    let mailbox = "dave@example.org/INBOX";
    for n in 0..5 {
        c.deliver(n % 3, mailbox, &format!("Subject: before {n}\r\n\r\nbody {n}\r\n")).expect("delivered");
    }
    c.converged(mailbox, CONVERGE);
    // A partition with a save on each side (a UID conflict), then the heal.
    c.isolate(2);
    let mut a = None;
    let mut b = None;
    for _ in 0..100 {
        a = a.or_else(|| c.deliver(0, mailbox, "Subject: majority\r\n\r\n").ok());
        b = b.or_else(|| c.deliver(2, mailbox, "Subject: isolated\r\n\r\n").ok());
        if a.is_some() && b.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(a.is_some() && b.is_some(), "both sides saved");
    c.heal();
    c.converged(mailbox, CONVERGE);
    // kill -9 and a restart: the first recording of node 2 ends torn or short, and
    // its restart begins a second one from what its store recovered.
    c.kill9(1);
    c.deliver(0, mailbox, "Subject: while node 2 is down\r\n\r\n").expect("delivered");
    c.spawn(1);
    c.wait_up(1);
    c.deliver(1, mailbox, "Subject: after the restart\r\n\r\n").expect("delivered");
    let view = c.converged(mailbox, CONVERGE);
    assert_eq!(view.messages.len(), 9, "{view:#?}");
    // Let a timer flush the last inputs, then stop every node the hard way.
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..3 {
        c.kill9(i);
    }
    let mut replayed = Vec::new();
    let mut incident = Vec::new();
    let mut names = Vec::new();
    let kept_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("recorded-incident");
    let _ = std::fs::remove_dir_all(&kept_dir);
    for node in 0..3 {
        let files = recordings(&c, node);
        assert_eq!(files.len(), if node == 1 { 2 } else { 1 }, "node {}: {files:?}", node + 1);
        for file in files {
            let recording = tandem_sim::replay::load(&file).expect("the recording reads");
            let report = tandem_sim::replay::replay(&recording, false).expect("the recording replays");
            assert!(report.divergence.is_none(), "{}: {:?}", file.display(), report.divergence);
            assert!(report.inputs > 20 && report.outputs > 0, "{}: {report:?}", file.display());
            replayed.push((file.clone(), report.inputs, report.outputs, report.torn));
            let name = format!("rec-{}/{}", node + 1, file.file_name().unwrap_or_default().to_string_lossy());
            // Kept for `tandem-sim replay --to-scenario target/tmp/recorded-incident/rec-*/*`.
            let kept = kept_dir.join(&name);
            if let Some(dir) = kept.parent() {
                std::fs::create_dir_all(dir).expect("a directory for the kept recordings");
            }
            std::fs::copy(&file, &kept).expect("the recording kept");
            names.push(name);
            incident.push(recording);
        }
    }
    println!("{replayed:#?}");
    incident_becomes_a_scenario(&incident, &names);
}

/// The incident's four recordings become a scenario with its shape (the partition's cuts
/// and restores, node 2's crash and restart, the nine deliveries) that the simulator runs
/// to what the real cluster held at the end. The file is written to
/// `target/tmp/recorded-incident.toml` (`scenarios/recorded-incident.toml` is one).
fn incident_becomes_a_scenario(incident: &[tandem_core::record::Recording], names: &[String]) {
    use tandem_sim::scenario::{Action, Expect};
    let conversion =
        tandem_sim::incident::to_scenario(incident, "recorded-incident", false).expect("the recordings convert");
    let s = &conversion.scenario;
    let count = |f: &dyn Fn(&Action) -> bool| s.events.iter().filter(|e| f(&e.action)).count();
    let sid = |n: u32| tandem_core::Sid(n);
    let text = tandem_sim::incident::to_toml(&conversion, names);
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("recorded-incident.toml");
    std::fs::write(&path, &text).expect("written");
    let shape = format!("{}:\n{text}", path.display());
    assert_eq!(count(&|a| matches!(a, Action::Cut { b, .. } if *b == sid(3))), 2, "{shape}");
    assert_eq!(count(&|a| matches!(a, Action::Restore { b, .. } if *b == sid(3))), 2, "{shape}");
    assert_eq!(count(&|a| matches!(a, Action::Cut { .. } | Action::Restore { .. })), 4, "{shape}");
    assert_eq!(count(&|a| matches!(a, Action::Crash { server } if *server == sid(2))), 1, "{shape}");
    assert_eq!(count(&|a| matches!(a, Action::Restart { server } if *server == sid(2))), 1, "{shape}");
    assert_eq!(count(&|a| matches!(a, Action::Crash { .. } | Action::Restart { .. })), 2, "{shape}");
    let labels: std::collections::BTreeSet<&String> = s
        .events
        .iter()
        .filter_map(|e| match &e.action {
            Action::Save { label, .. } => label.as_ref(),
            _ => None,
        })
        .collect();
    assert_eq!(labels.len(), 9, "{shape}");
    let present = s.expects.iter().filter(|x| matches!(x, Expect::Present { .. })).count();
    assert_eq!(present, 9, "{shape}");
    assert!(s.expects.iter().any(|x| matches!(x, Expect::Count { count: 9, .. })), "{shape}");
    // What the file says runs (not only the value it was written from), and converges
    // the same way: the nine messages on every server, the invariants held throughout.
    let parsed = tandem_sim::scenario::load(&path).expect("the scenario file parses");
    let report = tandem_sim::run(&parsed, &tandem_sim::RunOptions::default());
    assert!(report.passed, "{:?}\n{shape}", report.failures);
}

/// A recording that grows past a quarter of `max_mb` goes on in a new file that begins
/// with the core's snapshot: every file replays on its own, the directory stays within
/// its bound, and the rotated files of one run make one life in a scenario (no crash).
#[test]
fn a_long_recording_rotates_and_every_file_replays_on_its_own() {
    let c = Cluster::start_with(3, "mode = \"sync\"\nreplicas = 1", |i| {
        format!("[record]\ndir = \"rec-{}\"\nmax_mb = 1\nbodies = true\n", i + 1)
    });
    let mailbox = "fay@example.org/INBOX";
    let filler = "x".repeat(4000);
    let total = 300;
    for n in 0..total {
        c.deliver(n % 3, mailbox, &format!("Subject: rotation {n}\r\n\r\n{n} {filler}\r\n")).expect("delivered");
    }
    c.converged(mailbox, CONVERGE);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut incident = Vec::new();
    for node in 0..3 {
        let files = recordings(&c, node);
        let sizes: u64 = files.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum();
        assert!(sizes <= 1 << 20, "node {}: {sizes} bytes in {files:?}", node + 1);
        let mut resumed = 0;
        let mut snapshot_bytes = Vec::new();
        for file in &files {
            let recording = tandem_sim::replay::load(file).expect("the recording reads");
            if let Some(r) = &recording.header.resumed {
                resumed += 1;
                assert!(r.snapshot.is_some(), "{}: a snapshot with bodies = true", file.display());
                snapshot_bytes.extend(r.snapshot.as_ref().map(Vec::len));
            }
            let report = tandem_sim::replay::replay(&recording, false).expect("the file replays on its own");
            assert!(report.divergence.is_none(), "{}: {:?}", file.display(), report.divergence);
            incident.push(recording);
        }
        assert!(resumed >= 2, "node {}: fewer than two rotations in {files:?}\n{}", node + 1, c.log(node));
        // BENCHMARKS.md's snapshot sizes (run with --nocapture).
        println!(
            "node {}: {} files, {sizes} bytes, {resumed} resumed, snapshots of {snapshot_bytes:?} bytes",
            node + 1,
            files.len()
        );
    }
    let conversion = tandem_sim::incident::to_scenario(&incident, "rotated", false).expect("it converts");
    let s = &conversion.scenario;
    assert!(
        !s.events.iter().any(|e| matches!(e.action, tandem_sim::scenario::Action::Crash { .. })),
        "a rotation is not a crash: {:?}",
        conversion.notes
    );
}

#[test]
fn a_recording_without_bodies_holds_no_mail_and_says_it_cannot_replay() {
    let c = Cluster::start_with(2, "mode = \"sync\"\nreplicas = 1", |i| format!("[record]\ndir = \"rec-{}\"\n", i + 1));
    let mailbox = "erin@example.org/INBOX";
    let secret = "a sentence only this message holds";
    c.deliver(0, mailbox, &format!("Subject: private\r\n\r\n{secret}\r\n")).expect("delivered");
    c.converged(mailbox, CONVERGE);
    // The save reaches the file at the next flush (within about 100 ms of an input).
    let files = recordings(&c, 0);
    let has_save = || {
        let bytes = std::fs::read(&files[0]).unwrap_or_default();
        tandem_core::record::parse(&bytes).is_ok_and(|r| {
            r.frames.iter().any(|f| {
                matches!(
                    f,
                    tandem_core::record::Frame::Input { input, .. }
                        if matches!(**input, tandem_core::Input::Client { request: tandem_core::ClientRequest::Save { .. }, .. })
                )
            })
        })
    };
    assert!(harness::eventually(has_save), "the save was recorded");
    let bytes = std::fs::read(&files[0]).unwrap();
    assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "no mail in the file");
    let recording = tandem_sim::replay::load(&files[0]).expect("it reads");
    assert!(!recording.header.bodies);
    let err = tandem_sim::replay::replay(&recording, false).expect_err("no bodies, no replay");
    assert!(err.contains("bodies = true"), "{err}");
    // Another build is named as such.
    let mut other = recording.clone();
    other.header.build = "0.0.0+src.0000000000000000".into();
    let err = tandem_sim::replay::replay(&other, false).expect_err("another build");
    assert!(err.contains("core build 0.0.0+src.0000000000000000") && err.contains("--any-build"), "{err}");
}

/// A partial server's recording (issue 17): the text parts its store cut from a large
/// replicated save are recorded as the store's answer (a `TextParts` frame), and the
/// recording replays without divergence on a core whose store cuts nothing.
#[test]
fn a_partial_server_s_text_parts_are_recorded_and_replay() {
    let c = Cluster::start_with(3, "mode = \"sync\"\nreplicas = 1", |i| {
        let partial = if i == 2 { "partial = { body_bytes_max = 400 }\n" } else { "" };
        format!("{partial}[record]\ndir = \"rec-{}\"\nmax_mb = 64\nbodies = true\n", i + 1)
    });
    let mailbox = "fay@example.org/INBOX";
    let big = format!(
        "Subject: big\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n\
         Content-Type: text/plain\r\n\r\nthe text\r\n--b\r\nContent-Type: image/png\r\n\r\n{}\r\n--b--\r\n",
        "iVBORw0KGgo".repeat(100)
    );
    c.deliver(0, mailbox, &big).expect("delivered");
    c.converged(mailbox, CONVERGE);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut cut = 0;
    for file in recordings(&c, 2) {
        let recording = tandem_sim::replay::load(&file).expect("the recording reads");
        cut += recording
            .frames
            .iter()
            .filter(|f| matches!(f, tandem_core::record::Frame::TextParts { parts: Some(_), .. }))
            .count();
        let report = tandem_sim::replay::replay(&recording, false).expect("the recording replays");
        assert!(report.divergence.is_none(), "{}: {:?}", file.display(), report.divergence);
    }
    assert!(cut >= 1, "the partial server cut the big message's text parts");
}
