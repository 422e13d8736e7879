//! A randomized soak of three real `tandem` processes: client threads deliver (through
//! the admin socket, over LMTP to two recipients at once, and by IMAP APPEND), flag and
//! expunge through
//! every node while a schedule drawn from a seed kills nodes (SIGKILL), loses one disk,
//! cuts, freezes and isolates peer links and moves masterships. Then everything heals
//! and the cluster must agree: every acknowledged delivery (an admin `saved`, an LMTP
//! 250 for that recipient, an APPEND's OK) present on every node unless an acknowledged EXPUNGE took
//! it, no acknowledged expunge undone, no UID a client was told bound to another
//! message, no permanent error, no node that stopped by itself, no panic in any log.
//!
//! The simulator checks the core under far more schedules; this checks what it cannot:
//! the node's shell (sockets, redb, body files, redials, the admin, LMTP and IMAP front
//! ends)
//! under the same kinds of faults. `TANDEM_SOAK_SECS` (default 25) sets how long the
//! faults go on and `TANDEM_SOAK_SEED` the schedule (default 1; the seed is printed, and
//! a failure names it), `TANDEM_SOAK_NODES` (default 3), `TANDEM_SOAK_MODE` (`sync`, the
//! default, or `async`: then no disk is lost) and `TANDEM_SOAK_REPLICAS` (default 1) the
//! cluster: `TANDEM_SOAK_SECS=600 TANDEM_SOAK_SEED=7 cargo test --release
//! -p tandem-node --test soak -- --nocapture` for a long run by hand. The nodes are real
//! processes, so a seed fixes the schedule, not the interleaving.

mod harness;

use harness::{Cluster, call};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_node::admin::{AdminAddr, AdminReply, AdminRequest};

/// The first `ADMIN_MAILBOXES` take the admin clients' deliveries, flags and expunges;
/// the INBOXes after them only LMTP deliveries, which no client expunges (in async mode
/// an EXPUNGE of a UID told across a partition may hit another message there).
const MAILBOXES: [&str; 6] = [
    "soak@example.org/Archive",
    "other@example.org/Work",
    "third@example.org/INBOX",
    "soak@example.org/INBOX",
    "other@example.org/INBOX",
    "other@example.org/Sent",
];
/// Where the IMAP client appends (its place in `MAILBOXES`), as that user.
const IMAP_USER: &str = "other@example.org";
const IMAP_MAILBOX: (&str, usize) = ("Sent", 5);
const PASSWORD: &[u8] = b"a soak password";
const ADMIN_MAILBOXES: usize = 3;
const FLAGS: [&str; 3] = ["\\Seen", "\\Flagged", "$Label1"];
const CLIENTS: usize = 3;
const CONVERGE: Duration = Duration::from_secs(120);

/// What the clients were told, by mailbox and GUID.
#[derive(Default)]
struct Told {
    /// Acknowledged deliveries: GUID -> the UID the client was told.
    saved: BTreeMap<(usize, String), u32>,
    /// UIDs an EXPUNGE was sent for, whatever its answer (an error or no answer may
    /// still have expunged). By UID, not GUID: in async mode both sides of a partition
    /// tell clients the same UIDs for different messages until the heal renumbers them,
    /// and an EXPUNGE of a UID takes the message its node has there.
    expunge_sent: BTreeSet<(usize, u32)>,
    /// UIDs whose EXPUNGE was acknowledged (the reply named the UID).
    expunged: BTreeSet<(usize, u32)>,
    /// UIDs told before the disk was lost: the disk may have taken the cluster's last
    /// knowledge of one while its message lay on a node that was down, and the others
    /// may then bind it to a message whose answer was lost, which an EXPUNGE of the UID
    /// takes instead.
    told_before_loss: BTreeSet<(usize, u32)>,
    /// Requests answered, by kind and outcome (for the closing line).
    counts: BTreeMap<&'static str, u64>,
    /// Answers that were neither OK nor a temporary failure.
    permanent: Vec<String>,
    /// Deliveries over LMTP answered 250 for a recipient and IMAP APPENDs answered OK,
    /// whose GUIDs the client is not told: (mailbox, body checksum as the admin dump
    /// shows it). Never expunged by the soak, so each must stay.
    saved_unseen: BTreeSet<(usize, String)>,
    /// Every fault and acknowledged request, with its time since the start: written
    /// beside the nodes' logs when the run fails.
    timeline: Vec<String>,
    /// Every STORE sent, answered or not.
    flag_writes: Vec<FlagWrite>,
}

/// A STORE of one flag on one message: when it was sent, and when it was acknowledged
/// (None: not answered OK, so it may or may not have been done, at any time after).
struct FlagWrite {
    mbox: usize,
    uid: u32,
    flag: String,
    present: bool,
    sent: Instant,
    acked: Option<Instant>,
}

/// Whether `present` is a value the flag may end with, given every STORE of it: that of
/// a write no acknowledged write was sent after the end of (a later acknowledged write
/// overrides it), or the delivery's (absent) if none was acknowledged. What a client
/// that waits for each answer may expect of a register, whichever node it asks.
fn flag_may_end(writes: &[&FlagWrite], present: bool) -> bool {
    let after = |done: Instant| writes.iter().any(|w| w.acked.is_some() && w.sent > done);
    let none_acked = writes.iter().all(|w| w.acked.is_none());
    (none_acked && !present) || writes.iter().any(|w| w.present == present && w.acked.is_none_or(|done| !after(done)))
}

impl Told {
    fn note(&mut self, what: String) {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let ms = START.get_or_init(Instant::now).elapsed().as_millis();
        self.timeline.push(format!("{ms:>8} ms  {what}"));
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One client: random requests through random nodes until `stop`.
/// Calls `request` with the client's generator, a random node (of `nodes`) and the
/// request's number, one request after another, until `stop`.
fn until_stopped(seed: u64, nodes: usize, stop: &AtomicBool, mut request: impl FnMut(&mut ChaCha8Rng, usize, u64)) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let node = rng.random_range(0..nodes);
        request(&mut rng, node, n);
    }
}

/// Without `expunges` (async mode, or `replicas` too few for an acknowledgement to need
/// a majority), the third kind of request is another flag change: there a renumbered
/// message can sit, after a heal, at a UID that a later partition's other side told a
/// client for another message, and an EXPUNGE of that UID rightly takes it; the
/// clients cannot tell that from a loss.
fn client(seed: u64, admin: Vec<AdminAddr>, expunges: bool, told: Arc<Mutex<Told>>, stop: Arc<AtomicBool>) {
    until_stopped(seed, admin.len(), &stop, |rng, node, n| {
        let mbox = rng.random_range(0..ADMIN_MAILBOXES);
        let mailbox = MAILBOXES[mbox].to_string();
        let roll = rng.random_range(0..100u32);
        // A message this client may flag or expunge: one it was told was saved.
        let pick = |rng: &mut ChaCha8Rng| {
            let t = told.lock().unwrap();
            let known: Vec<(&String, &u32)> =
                t.saved.iter().filter(|((m, _), _)| *m == mbox).map(|((_, g), u)| (g, u)).collect();
            if known.is_empty() {
                return None;
            }
            let (guid, uid) = known[rng.random_range(0..known.len())];
            Some((guid.clone(), *uid))
        };
        let count = |what: &'static str| {
            *told.lock().unwrap().counts.entry(what).or_default() += 1;
        };
        // A request that was not answered OK: a node down (no admin socket), a temporary
        // failure (no master or too few replicas in reach), or an error the node calls
        // permanent, which faults alone should never cause: kept to be shown.
        let failed = |what: &'static str, reply: Result<AdminReply, String>| {
            let mut t = told.lock().unwrap();
            match reply {
                Err(_) => *t.counts.entry("node unreachable").or_default() += 1,
                Ok(AdminReply::Error { temporary: true, .. }) => *t.counts.entry(what).or_default() += 1,
                other => t.permanent.push(format!("{what}: {other:?}")),
            }
            drop(t);
            std::thread::sleep(Duration::from_millis(20));
        };
        if roll < 60 {
            let body = format!(
                "From: soak@example.org\r\nMessage-ID: <{seed}.{n}@soak>\r\nSubject: soak {seed} {n}\r\n\r\nbody {n}\r\n"
            );
            let request = AdminRequest::Deliver { mailbox, body, flags: vec![] };
            match call(&admin[node], &request) {
                Ok(AdminReply::Saved { uid, guid, .. }) => {
                    let mut t = told.lock().unwrap();
                    t.note(format!("saved via node {} {}: UID {uid} {guid}", node + 1, MAILBOXES[mbox]));
                    t.saved.insert((mbox, guid), uid);
                    drop(t);
                    count("deliver ok");
                }
                other => failed("deliver failed", other),
            }
        } else if roll < 85 || !expunges {
            let Some((_, uid)) = pick(rng) else { return };
            let flag = FLAGS[rng.random_range(0..FLAGS.len())].to_string();
            let (add, remove) = if rng.random_bool(0.6) { (vec![flag], vec![]) } else { (vec![], vec![flag]) };
            let (flag, present) = match (add.first(), remove.first()) {
                (Some(f), _) => (f.clone(), true),
                (None, Some(f)) => (f.clone(), false),
                (None, None) => return,
            };
            let request = AdminRequest::Store { mailbox, uids: vec![uid], add, remove };
            let sent = Instant::now();
            let reply = call(&admin[node], &request);
            let acked = matches!(reply, Ok(AdminReply::Stored { .. })).then(Instant::now);
            let mut t = told.lock().unwrap();
            if acked.is_some() {
                let sign = if present { '+' } else { '-' };
                t.note(format!("store via node {} {} UID {uid} {sign}{flag}", node + 1, MAILBOXES[mbox]));
            }
            t.flag_writes.push(FlagWrite { mbox, uid, flag, present, sent, acked });
            drop(t);
            match reply {
                Ok(AdminReply::Stored { .. }) => count("store ok"),
                other => failed("store failed", other),
            }
        } else {
            let Some((guid, uid)) = pick(rng) else { return };
            // Noted before the request: a kill in the middle leaves it unknown.
            told.lock().unwrap().expunge_sent.insert((mbox, uid));
            let request = AdminRequest::Expunge { mailbox, uids: vec![uid] };
            match call(&admin[node], &request) {
                Ok(AdminReply::Expunged { uids }) => {
                    let mut t = told.lock().unwrap();
                    t.note(format!("expunge via node {} {}: UID {uid} ({guid}): {uids:?}", node + 1, MAILBOXES[mbox]));
                    if uids.contains(&uid) {
                        t.expunged.insert((mbox, uid));
                        *t.counts.entry("expunge ok").or_default() += 1;
                    } else {
                        // Nothing at that UID any more: expunged before, or renumbered
                        // away (a UID is never reused, so nothing else was hit).
                        *t.counts.entry("expunge of nothing").or_default() += 1;
                    }
                }
                other => failed("expunge failed", other),
            }
        }
    });
}

/// The LMTP recipients and their INBOXes' places in `MAILBOXES`.
const RECIPIENTS: [(&str, usize); 2] = [("soak@example.org", 3), ("other@example.org", 4)];

/// One LMTP transaction of `body` to every recipient in `RECIPIENTS`: the reply code of
/// each recipient after DATA, or why the session broke (a node killed mid-session is
/// one of the faults, so nothing here may panic).
fn lmtp_once(addr: SocketAddr, body: &str) -> Result<Vec<String>, String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut w = stream;
    let reply = |r: &mut BufReader<TcpStream>| -> Result<String, String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err(format!("closed after {all:?}"));
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return Ok(all);
            }
        }
    };
    let send = |w: &mut TcpStream, text: &str| w.write_all(text.as_bytes()).map_err(|e| e.to_string());
    reply(&mut r)?;
    send(&mut w, "LHLO soak\r\n")?;
    reply(&mut r)?;
    send(&mut w, "MAIL FROM:<sender@example.net>\r\n")?;
    reply(&mut r)?;
    let mut accepted = 0;
    for (rcpt, _) in RECIPIENTS {
        send(&mut w, &format!("RCPT TO:<{rcpt}>\r\n"))?;
        let answer = reply(&mut r)?;
        if !answer.starts_with("250") {
            return Err(format!("{}RCPT {rcpt}: {answer}", if answer.starts_with('5') { "BAD " } else { "" }));
        }
        accepted += 1;
    }
    send(&mut w, "DATA\r\n")?;
    let go = reply(&mut r)?;
    if !go.starts_with("354") {
        return Err(format!("{}DATA: {go}", if go.starts_with('5') { "BAD " } else { "" }));
    }
    send(&mut w, body)?;
    send(&mut w, ".\r\n")?;
    (0..accepted).map(|_| reply(&mut r)).collect()
}

/// The `n`th message a client of `kind` sends, and its body checksum as the admin dump
/// shows it: how a delivery whose GUID the client is not told is found at the end.
fn numbered_body(from: &str, kind: &str, seed: u64, n: u64) -> (String, String) {
    let body = format!(
        "From: {from}\r\nMessage-ID: <{kind}.{seed}.{n}@soak>\r\nSubject: {kind} {seed} {n}\r\n\r\nbody {n}\r\n"
    );
    let checksum = format!("{:016x}", tandem_core::hash::body_checksum(body.as_bytes()));
    (body, checksum)
}

/// Delivers over LMTP through random nodes until `stop`, noting each recipient's 250.
fn lmtp_client(seed: u64, lmtp: Vec<SocketAddr>, told: Arc<Mutex<Told>>, stop: Arc<AtomicBool>) {
    until_stopped(seed, lmtp.len(), &stop, |_, node, n| {
        let (body, checksum) = numbered_body("sender@example.net", "lmtp", seed, n);
        let answers = lmtp_once(lmtp[node], &body);
        let mut t = told.lock().unwrap();
        match answers {
            Ok(answers) => {
                for ((_, mbox), answer) in RECIPIENTS.iter().zip(&answers) {
                    if answer.starts_with("250") {
                        t.saved_unseen.insert((*mbox, checksum.clone()));
                        *t.counts.entry("lmtp 250").or_default() += 1;
                    } else if answer.starts_with('4') {
                        *t.counts.entry("lmtp 4xx").or_default() += 1;
                    } else {
                        t.permanent.push(format!("lmtp: {answer}"));
                    }
                }
            }
            Err(why) if why.starts_with("BAD") => t.permanent.push(format!("lmtp: {why}")),
            Err(_) => *t.counts.entry("lmtp session broken").or_default() += 1,
        }
        drop(t);
        std::thread::sleep(Duration::from_millis(10));
    });
}

/// Reads IMAP lines until the one tagged `tag`; returns it.
fn imap_tagged(r: &mut BufReader<TcpStream>, tag: &str) -> Result<String, String> {
    for _ in 0..1000 {
        let mut line = String::new();
        if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("closed".into());
        }
        if line.starts_with(&format!("{tag} ")) {
            return Ok(line);
        }
    }
    Err(format!("no {tag} answer in 1000 lines"))
}

/// One IMAP session: LOGIN, APPEND of `body` (a CREATE first when the mailbox is not
/// there yet), LOGOUT. Ok(true) for an APPEND answered OK, Ok(false) for a NO (a
/// temporary failure under faults); Err when the session broke, or for an answer a
/// fault should never cause (then starting "BAD").
fn imap_append_once(addr: SocketAddr, body: &str) -> Result<bool, String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut w = stream;
    let send = |w: &mut TcpStream, text: &str| w.write_all(text.as_bytes()).map_err(|e| e.to_string());
    let mut greeting = String::new();
    if r.read_line(&mut greeting).map_err(|e| e.to_string())? == 0 {
        return Err("closed".into());
    }
    let password = String::from_utf8_lossy(PASSWORD);
    send(&mut w, &format!("a LOGIN \"{IMAP_USER}\" \"{password}\"\r\n"))?;
    let login = imap_tagged(&mut r, "a")?;
    if !login.starts_with("a OK") {
        return Err(format!("BAD login: {login}"));
    }
    let mut answer = String::new();
    for (attempt, tag) in ["b", "d"].iter().enumerate() {
        send(&mut w, &format!("{tag} APPEND {} {{{}}}\r\n", IMAP_MAILBOX.0, body.len()))?;
        // The continuation, or the tagged answer that refuses the literal; untagged
        // lines may come first, and a node killed here ends the stream.
        let go = loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("closed".into());
            }
            if !line.starts_with("* ") {
                break line;
            }
        };
        answer = if go.starts_with('+') {
            send(&mut w, body)?;
            send(&mut w, "\r\n")?;
            imap_tagged(&mut r, tag)?
        } else {
            go
        };
        if attempt == 0 && answer.contains("[TRYCREATE]") {
            send(&mut w, &format!("c CREATE {}\r\n", IMAP_MAILBOX.0))?;
            imap_tagged(&mut r, "c")?;
            continue;
        }
        break;
    }
    let _ = send(&mut w, "z LOGOUT\r\n");
    let ok = answer.split_whitespace().nth(1);
    match ok {
        Some("OK") => Ok(true),
        Some("NO") => Ok(false),
        _ => Err(format!("BAD append: {answer}")),
    }
}

/// Appends over IMAP through random nodes until `stop`, noting each OK.
fn imap_client(seed: u64, imap: Vec<SocketAddr>, told: Arc<Mutex<Told>>, stop: Arc<AtomicBool>) {
    until_stopped(seed, imap.len(), &stop, |_, node, n| {
        let (body, checksum) = numbered_body(IMAP_USER, "imap", seed, n);
        let answer = imap_append_once(imap[node], &body);
        let mut t = told.lock().unwrap();
        match answer {
            Ok(true) => {
                t.saved_unseen.insert((IMAP_MAILBOX.1, checksum));
                *t.counts.entry("imap append ok").or_default() += 1;
            }
            Ok(false) => *t.counts.entry("imap append no").or_default() += 1,
            Err(why) if why.starts_with("BAD") => t.permanent.push(format!("imap: {why}")),
            Err(_) => *t.counts.entry("imap session broken").or_default() += 1,
        }
        drop(t);
        std::thread::sleep(Duration::from_millis(10));
    });
}

/// Fails with the node's log if a node we did not stop has stopped by itself.
fn check_running(c: &mut Cluster, up: &[bool], seed: u64) {
    for (i, is_up) in up.iter().enumerate() {
        if *is_up && let Some(status) = c.exited(i) {
            panic!("seed {seed}: node {} stopped by itself ({status}); log:\n{}", i + 1, c.log(i));
        }
    }
}

#[test]
fn nodes_under_kills_cuts_and_freezes_lose_nothing_and_agree() {
    let seed = env_u64("TANDEM_SOAK_SEED", 1);
    let secs = env_u64("TANDEM_SOAK_SECS", 25);
    // Any `replicas` of at least 1 leaves every acknowledged message on two disks at
    // least, so the one lost disk a run may have takes none of them.
    let nodes = env_u64("TANDEM_SOAK_NODES", 3).clamp(2, 9) as usize;
    let replicas = env_u64("TANDEM_SOAK_REPLICAS", 1).clamp(1, nodes as u64 - 1);
    // In async mode a master acknowledges alone: a lost disk may take what it alone
    // held, which the mode does not promise to keep, so that run loses no disk.
    let async_mode = std::env::var("TANDEM_SOAK_MODE").is_ok_and(|m| m == "async");
    let mode_name = if async_mode { "async" } else { "sync" };
    eprintln!(
        "soak: seed {seed}, {secs} s of faults, {nodes} nodes, {mode_name}, replicas = {replicas} \
         (TANDEM_SOAK_SEED, TANDEM_SOAK_SECS, TANDEM_SOAK_NODES, TANDEM_SOAK_MODE, TANDEM_SOAK_REPLICAS)"
    );
    let users = tempfile::NamedTempFile::new().unwrap().into_temp_path().keep().unwrap();
    for (user, _) in RECIPIENTS {
        tandem_node::users::add_user(&users, user, PASSWORD).unwrap();
    }
    let lmtp: Vec<SocketAddr> = (0..nodes).map(|_| harness::free_port()).collect();
    let imap: Vec<SocketAddr> = (0..nodes).map(|_| harness::free_port()).collect();
    let (l2, i2, u2) = (lmtp.clone(), imap.clone(), users.clone());
    let mode = format!("mode = \"{mode_name}\"\nreplicas = {replicas}");
    let mut c = Cluster::start_with(nodes, &mode, move |i| {
        format!("lmtp = \"{}\"\nimap = \"{}\"\nusers_file = \"{}\"\n", l2[i], i2[i], u2.display())
    });
    let told: Arc<Mutex<Told>> = Arc::default();
    told.lock().unwrap().note("clients start".to_string());
    let stop = Arc::new(AtomicBool::new(false));
    // Where an acknowledgement needs a majority, two sides of a partition never both
    // tell a client a UID; elsewhere they do, and an EXPUNGE of a UID cannot be pinned
    // to one message (see `client`), so the clients send none.
    let majority_acks = !async_mode && 2 * (replicas as usize + 1) > nodes;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (admin, told, stop) = (c.admin.clone(), told.clone(), stop.clone());
            let client_seed = seed.wrapping_mul(1000).wrapping_add(k as u64);
            std::thread::spawn(move || client(client_seed, admin, majority_acks, told, stop))
        })
        .collect();
    let lmtp_thread = {
        let (told, stop) = (told.clone(), stop.clone());
        std::thread::spawn(move || lmtp_client(seed.wrapping_mul(1000).wrapping_add(999), lmtp, told, stop))
    };

    let imap_thread = {
        let (told, stop) = (told.clone(), stop.clone());
        std::thread::spawn(move || imap_client(seed.wrapping_mul(1000).wrapping_add(998), imap, told, stop))
    };

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut up = vec![true; nodes];
    let links: Vec<(usize, usize)> = c.proxies.keys().copied().collect();
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut disk_lost = false;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..2000)));
        check_running(&mut c, &up, seed);
        let down = up.iter().filter(|u| !**u).count();
        match rng.random_range(0..100u32) {
            // All but one down at most: the last keeps its disk and its term.
            0..20 if down + 1 < nodes => {
                let i = rng.random_range(0..nodes);
                if up[i] {
                    c.kill9(i);
                    up[i] = false;
                    *faults.entry("kill -9").or_default() += 1;
                    told.lock().unwrap().note(format!("kill -9 node {}", i + 1));
                }
            }
            20..45 if down > 0 => {
                let i = (0..nodes).find(|i| !up[*i]).unwrap_or(0);
                c.spawn(i);
                c.wait_up(i);
                up[i] = true;
                *faults.entry("restart").or_default() += 1;
                told.lock().unwrap().note(format!("restart node {}", i + 1));
            }
            45..60 => {
                let link = links[rng.random_range(0..links.len())];
                c.proxies[&link].cut();
                *faults.entry("link cut").or_default() += 1;
                told.lock().unwrap().note(format!("cut link {}-{}", link.0 + 1, link.1 + 1));
            }
            60..70 => {
                let link = links[rng.random_range(0..links.len())];
                c.proxies[&link].freeze();
                *faults.entry("link frozen").or_default() += 1;
                told.lock().unwrap().note(format!("freeze link {}-{}", link.0 + 1, link.1 + 1));
            }
            70..85 => {
                for p in c.proxies.values() {
                    p.heal();
                    p.thaw();
                }
                *faults.entry("links healed").or_default() += 1;
                told.lock().unwrap().note("heal every link".to_string());
            }
            85..95 => {
                let i = rng.random_range(0..nodes);
                let mailbox = MAILBOXES[rng.random_range(0..MAILBOXES.len())].to_string();
                if up[i] {
                    let _ = call(&c.admin[i], &AdminRequest::MasterMove { mailbox: mailbox.clone() });
                    *faults.entry("master move").or_default() += 1;
                    told.lock().unwrap().note(format!("master move of {mailbox} to node {}", i + 1));
                }
            }
            // A lost disk, once a run and only with every node up: in sync mode each
            // acknowledged message is on two disks, so one may go (more would be a loss
            // the mode does not promise to survive).
            95..97 if down == 0 && !disk_lost && !async_mode => {
                let i = rng.random_range(0..nodes);
                c.kill9(i);
                let data = c.dir.path().join(format!("data-{}", i + 1));
                std::fs::remove_dir_all(&data).expect("remove a data directory");
                c.spawn(i);
                c.wait_up(i);
                disk_lost = true;
                let mut t = told.lock().unwrap();
                t.told_before_loss = t.saved.iter().map(|((m, _), uid)| (*m, *uid)).collect();
                drop(t);
                *faults.entry("disk lost").or_default() += 1;
                told.lock().unwrap().note(format!("disk of node {} lost", i + 1));
            }
            _ => {
                let i = rng.random_range(0..nodes);
                if up[i] {
                    c.isolate(i);
                    *faults.entry("node isolated").or_default() += 1;
                    told.lock().unwrap().note(format!("isolate node {}", i + 1));
                }
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().expect("client thread");
    }
    lmtp_thread.join().expect("lmtp thread");
    imap_thread.join().expect("imap thread");
    check_running(&mut c, &up, seed);
    for p in c.proxies.values() {
        p.heal();
        p.thaw();
    }
    for (i, was_up) in up.iter().enumerate() {
        if !was_up {
            c.spawn(i);
            c.wait_up(i);
        }
    }
    c.wait_linked();

    let told = told.lock().unwrap();
    eprintln!("soak: seed {seed}: requests {:?}; faults {faults:?}", told.counts);
    let mut failures: Vec<String> = Vec::new();
    let mut present_total = 0;
    let mut flags_checked = 0;
    for (mbox, mailbox) in MAILBOXES.iter().enumerate() {
        let view = c.converged(mailbox, CONVERGE);
        let present: BTreeSet<&String> = view.messages.iter().map(|m| &m.guid).collect();
        let uids: BTreeSet<u32> = view.messages.iter().map(|m| m.uid).collect();
        if uids.len() != view.messages.len() {
            failures.push(format!("{mailbox}: a UID twice"));
        }
        // How many messages clients were told each UID of this mailbox was: more than
        // one only in async mode, across a partition.
        let mut told_as: BTreeMap<u32, Vec<&String>> = BTreeMap::new();
        for ((m, guid), uid) in &told.saved {
            if *m == mbox {
                told_as.entry(*uid).or_default().push(guid);
            }
        }
        for (uid, guids) in &told_as {
            for guid in guids {
                if !told.expunge_sent.contains(&(mbox, *uid)) && !present.contains(*guid) {
                    failures.push(format!("acknowledged {guid} (told UID {uid}) lost from {mailbox}"));
                }
            }
            // An acknowledged EXPUNGE of a UID told as one message took that message,
            // where acknowledgements need a majority (else two sides of a partition may
            // each bind the UID, one to a message whose answer was lost).
            if let [guid] = guids.as_slice()
                && majority_acks
                && !told.told_before_loss.contains(&(mbox, *uid))
                && told.expunged.contains(&(mbox, *uid))
                && present.contains(*guid)
            {
                failures.push(format!("{guid} came back in {mailbox} after an acknowledged EXPUNGE of UID {uid}"));
            }
        }
        // A UID names one message for good: what sits at a UID a client was told is
        // that message, or nothing (expunged, or renumbered away after a conflict).
        let at_uid: BTreeMap<u32, &String> = view.messages.iter().map(|m| (m.uid, &m.guid)).collect();
        for ((m, guid), uid) in &told.saved {
            if let Some(there) = at_uid.get(uid).filter(|there| *m == mbox && **there != guid) {
                failures.push(format!("{mailbox} UID {uid} was told as {guid}, now holds {there}"));
            }
        }
        // Each flag the clients set or cleared ends as the last acknowledged STORE left
        // it (or as one not acknowledged, or overlapping it, may have), where an
        // acknowledgement needs a majority.
        if majority_acks {
            let mut writes: BTreeMap<(u32, &str), Vec<&FlagWrite>> = BTreeMap::new();
            for w in told.flag_writes.iter().filter(|w| w.mbox == mbox) {
                writes.entry((w.uid, w.flag.as_str())).or_default().push(w);
            }
            for ((uid, flag), writes) in &writes {
                let Some(line) = view.messages.iter().find(|m| m.uid == *uid) else { continue };
                let present = line.flags.iter().any(|f| f.eq_ignore_ascii_case(flag));
                flags_checked += 1;
                if !flag_may_end(writes, present) {
                    let acked = writes.iter().filter(|w| w.acked.is_some()).count();
                    let now = if present { "set" } else { "clear" };
                    failures.push(format!(
                        "{mailbox} UID {uid}: {flag} is {now}, which none of its {} STOREs ({acked} \
                         acknowledged) can have left",
                        writes.len()
                    ));
                }
            }
        }
        let checksums: BTreeSet<&String> = view.messages.iter().map(|m| &m.checksum).collect();
        for (m, checksum) in &told.saved_unseen {
            if *m == mbox && !checksums.contains(checksum) {
                failures
                    .push(format!("a delivery answered 250 over LMTP or an APPEND answered OK (body checksum {checksum}) lost from {mailbox}"));
            }
        }
        present_total += view.messages.len();
    }
    for i in 0..nodes {
        if c.log(i).contains("panicked") {
            failures.push(format!("node {} panicked (see its log)", i + 1));
        }
    }
    failures.extend(told.permanent.iter().map(|p| format!("a permanent error under faults: {p}")));
    let acked = told.counts.get("deliver ok").copied().unwrap_or(0);
    let lmtp_acked = told.counts.get("lmtp 250").copied().unwrap_or(0);
    let imap_acked = told.counts.get("imap append ok").copied().unwrap_or(0);
    if acked < 20 || lmtp_acked == 0 || imap_acked == 0 {
        failures.push(format!("too little got through to test anything: {:?}", told.counts));
    }
    if !failures.is_empty() {
        // The nodes' logs and stores, and what the clients were told when, for the
        // post-mortem: the cluster's directory goes when the test ends.
        let keep = std::env::temp_dir().join(format!("tandem-soak-{seed}-{}", std::process::id()));
        let _ = std::process::Command::new("cp").arg("-a").arg(c.dir.path()).arg(&keep).status();
        let _ = std::fs::write(keep.join("timeline.txt"), told.timeline.join("\n"));
        panic!(
            "seed {seed}: {} failures (logs, stores and timeline.txt in {}):\n{}",
            failures.len(),
            keep.display(),
            failures.join("\n")
        );
    }
    eprintln!(
        "soak: seed {seed}: {present_total} messages agreed on every node, {flags_checked} flags as the STOREs left them"
    );
}

#[test]
fn a_flag_ends_as_the_last_acknowledged_store_left_it_or_as_an_overlapping_one_may_have() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let w = |present: bool, sent: u64, acked: Option<u64>| FlagWrite {
        mbox: 0,
        uid: 1,
        flag: "\\Seen".into(),
        present,
        sent: at(sent),
        acked: acked.map(at),
    };
    let (set, clear) = (w(true, 0, Some(10)), w(false, 20, Some(30)));
    assert!(flag_may_end(&[&set, &clear], false));
    assert!(!flag_may_end(&[&set, &clear], true), "the clear was sent after the set was acknowledged");
    let overlapping = w(false, 5, Some(30));
    assert!(flag_may_end(&[&set, &overlapping], true) && flag_may_end(&[&set, &overlapping], false));
    let unanswered = w(true, 40, None);
    assert!(flag_may_end(&[&set, &clear, &unanswered], true), "it may have been done after all");
    assert!(flag_may_end(&[&unanswered], false) && flag_may_end(&[], false), "as delivered");
    assert!(!flag_may_end(&[], true));
}
