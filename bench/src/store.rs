//! What one message to many recipients costs each node: one LMTP transaction with
//! `recipients` RCPTs and a body of `body_mib` MiB into a 3-node cluster (sync,
//! replicas=1); each node's RSS and data directory before and after, once the cluster
//! has converged. Run with one or two `tandem` binaries (a baseline beside this build).

use crate::cluster::{BenchCluster, Setup};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct RecipientsRow {
    pub build: String,
    pub recipients: usize,
    pub body_mib: usize,
    pub delivery_s: f64,
    /// Per node: (RSS growth, disk growth), bytes.
    pub growth: Vec<(i64, i64)>,
}

fn rss_bytes(pid: u32) -> Result<i64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<i64>().ok())
        .ok_or("no VmRSS")?;
    Ok(kib * 1024)
}

fn disk_bytes(dir: &Path) -> i64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                // Allocated blocks, not apparent size: what the disk really gave.
                Ok(m) => total += std::os::unix::fs::MetadataExt::blocks(&m) as i64 * 512,
                Err(_) => {}
            }
        }
    }
    total
}

fn user(i: usize) -> String {
    format!("r{i}@example.org")
}

/// Adds `n` recipients to the cluster's users file, reusing one password hash (hashing a
/// thousand passwords would take minutes and is not what is measured).
fn add_recipients(dir: &Path, n: usize) -> Result<(), String> {
    let path = dir.join("users.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
    let hash = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("password = "))
        .ok_or("no password in the users file")?
        .to_string();
    let mut more = String::new();
    for i in 0..n {
        more.push_str(&format!("\n[[user]]\nname = \"{}\"\npassword = {hash}\n", user(i)));
    }
    std::fs::write(&path, text + &more).map_err(|e| e.to_string())
}

fn expect(reader: &mut BufReader<TcpStream>, code: &str) -> Result<(), String> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("LMTP server closed the connection".into());
        }
        if !line.starts_with(code) {
            return Err(format!("expected {code}: {}", line.trim_end()));
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(());
        }
    }
}

fn deliver_to_all(addr: std::net::SocketAddr, recipients: usize, body: &[u8]) -> Result<(), String> {
    let stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(300))).map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    expect(&mut reader, "220")?;
    writer.write_all(b"LHLO bench.example\r\n").map_err(|e| e.to_string())?;
    expect(&mut reader, "250")?;
    writer.write_all(b"MAIL FROM:<sender@bench.example>\r\n").map_err(|e| e.to_string())?;
    expect(&mut reader, "250")?;
    for i in 0..recipients {
        writer.write_all(format!("RCPT TO:<{}>\r\n", user(i)).as_bytes()).map_err(|e| e.to_string())?;
        expect(&mut reader, "250")?;
    }
    writer.write_all(b"DATA\r\n").map_err(|e| e.to_string())?;
    expect(&mut reader, "354")?;
    writer.write_all(body).map_err(|e| e.to_string())?;
    writer.write_all(b".\r\n").map_err(|e| e.to_string())?;
    for _ in 0..recipients {
        expect(&mut reader, "250")?;
    }
    Ok(())
}

/// A message of about `mib` MiB: headers, then 76-character lines (no line starts with
/// a dot, so nothing is dot-stuffed).
fn message(mib: usize) -> Vec<u8> {
    let mut body = b"From: sender@bench.example\r\nSubject: one for everyone\r\n\r\n".to_vec();
    let line = [b'x'; 76];
    while body.len() < mib << 20 {
        body.extend_from_slice(&line);
        body.extend_from_slice(b"\r\n");
    }
    body
}

pub fn recipients(
    build: &str,
    tandem: &Path,
    root: &Path,
    recipients: usize,
    body_mib: usize,
) -> Result<RecipientsRow, String> {
    let dir = root.join(format!("store-{build}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let setup = Setup { nodes: 3, mode: "sync", replicas: 1, compression: false, record: None };
    let mut cluster = BenchCluster::create(&dir, tandem, &setup)?;
    add_recipients(&dir, recipients)?;
    for node in &cluster.nodes {
        let mut text = std::fs::read_to_string(&node.config).map_err(|e| e.to_string())?;
        text.push_str(&format!("\n[limits]\nrecipients_max = {}\n", recipients.max(1)));
        std::fs::write(&node.config, text).map_err(|e| e.to_string())?;
    }
    for i in 0..3 {
        cluster.start(i)?;
    }
    let result = (|| {
        cluster.wait_linked(&[0, 1, 2], Duration::from_secs(60))?;
        let pids: Vec<u32> = (0..3).map(|i| cluster.pid(i).ok_or("a node has no process")).collect::<Result<_, _>>()?;
        let before: Vec<(i64, i64)> = (0..3)
            .map(|i| Ok((rss_bytes(pids[i])?, disk_bytes(&cluster.nodes[i].data))))
            .collect::<Result<_, String>>()?;
        let started = Instant::now();
        deliver_to_all(cluster.nodes[0].lmtp, recipients, &message(body_mib))?;
        let delivery_s = started.elapsed().as_secs_f64();
        cluster.wait_quiet(&[0, 1, 2], recipients, Duration::from_secs(600))?;
        let growth = (0..3)
            .map(|i| Ok((rss_bytes(pids[i])? - before[i].0, disk_bytes(&cluster.nodes[i].data) - before[i].1)))
            .collect::<Result<_, String>>()?;
        Ok(RecipientsRow { build: build.to_string(), recipients, body_mib, delivery_s, growth })
    })();
    cluster.stop_all();
    result
}

pub fn markdown(rows: &[RecipientsRow], command: &str) -> String {
    let mib = |b: i64| b as f64 / f64::from(1 << 20);
    let mut out = String::from(
        "## One message to many recipients\n\n\
         One LMTP transaction, every recipient a different user, into a 3-node cluster \
         (sync, replicas=1), on the benchmark directory's filesystem; growth of each \
         node's RSS and data directory (allocated blocks) once the cluster is quiet.\n\n",
    );
    out.push_str(&format!(
        "Command: `{command}` (the baseline, when given, is an earlier `tandem` binary: its path is in the command)\n\n"
    ));
    out.push_str(
        "| build | recipients × size | delivery s | RSS growth MiB (n1, n2, n3) | disk growth MiB (n1, n2, n3) |\n",
    );
    out.push_str("|---|---|---:|---|---|\n");
    for r in rows {
        let rss: Vec<String> = r.growth.iter().map(|g| format!("{:.1}", mib(g.0))).collect();
        let disk: Vec<String> = r.growth.iter().map(|g| format!("{:.1}", mib(g.1))).collect();
        out.push_str(&format!(
            "| {} | {} × {} MiB | {:.2} | {} | {} |\n",
            r.build,
            r.recipients,
            r.body_mib,
            r.delivery_s,
            rss.join(", "),
            disk.join(", ")
        ));
    }
    out
}

/// Replaces the part of BENCHMARKS.md between the store markers (appending it the
/// first time), so this part can be rerun alone.
pub fn splice(benchmarks: &Path, section: &str) -> Result<(), String> {
    splice_marked(benchmarks, "store", section)
}

/// Replaces the block between `<!-- NAME:start -->` and `<!-- NAME:end -->`, appending
/// it the first time.
pub fn splice_marked(benchmarks: &Path, name: &str, section: &str) -> Result<(), String> {
    let (start, end) = (format!("<!-- {name}:start -->"), format!("<!-- {name}:end -->"));
    let text = std::fs::read_to_string(benchmarks).unwrap_or_default();
    let block = format!("{start}\n{section}{end}\n");
    let new = match (text.find(&start), text.find(&end)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{block}{}", &text[..a], text[b + end.len()..].trim_start_matches('\n'))
        }
        _ => format!("{}\n\n{block}", text.trim_end()),
    };
    std::fs::write(benchmarks, new).map_err(|e| format!("{}: {e}", benchmarks.display()))
}

#[derive(Clone, Debug)]
pub struct RestartRow {
    pub messages: usize,
    /// Time to write the store directly (not part of the figure; said for scale).
    pub generate_s: f64,
    /// From process start to the admin port answering (the store loaded, the core
    /// recovered, stray body files collected).
    pub restart_s: f64,
    /// From process start until it is linked again and agrees with both peers.
    pub rejoin_s: f64,
    /// The restarted node's RSS once it has rejoined.
    pub rss_bytes: i64,
    /// The larger of the two peers' RSS then.
    pub peer_rss_bytes: i64,
    pub disk_bytes: i64,
}

/// A store of `messages` distinct messages of about `body_bytes` each, spread over 100
/// users' INBOXes, written through the node's own store code in large transactions.
fn generate_store(data: &Path, messages: usize, body_bytes: usize) -> Result<(), String> {
    let users: Vec<String> = (0..100).map(|u| format!("load{u}@example.org")).collect();
    generate_mailboxes(data, &users, messages, body_bytes)
}

/// `messages` distinct messages of about `body_bytes` each, spread over the INBOXes of
/// `users`, written through the node's own store code in large transactions.
pub fn generate_mailboxes(data: &Path, users: &[String], messages: usize, body_bytes: usize) -> Result<(), String> {
    use tandem_core::store::StoreWrite;
    use tandem_core::types::{Guid, MailboxKey, MessageRecord};
    let store = tandem_node::store::Store::open(data).map_err(|e| e.to_string())?;
    let per_user = messages.div_ceil(users.len().max(1));
    let filler = "z".repeat(body_bytes.saturating_sub(80));
    let mut writes = Vec::new();
    for (u, user) in users.iter().enumerate() {
        let mailbox = MailboxKey::new(user, "INBOX");
        let count = per_user.min(messages.saturating_sub(u * per_user));
        for n in 0..count {
            let uid = n as u32 + 1;
            let body = format!("From: load@example.org\r\nSubject: message {u}/{n}\r\n\r\n{filler}\r\n");
            let checksum = tandem_core::hash::body_checksum(body.as_bytes());
            let guid = Guid((u as u128) << 64 | n as u128 | 1 << 120);
            let record = MessageRecord {
                uid,
                guid,
                received: 1_700_000_000,
                size: body.len() as u32,
                checksum,
                modseq: u64::from(uid),
                flags: Default::default(),
                claimed: false,
                pushed: false,
            };
            writes.push(StoreWrite::PutBody { guid, checksum, bytes: body.into_bytes().into() });
            writes.push(StoreWrite::PutMessage { mailbox: mailbox.clone(), record });
            if writes.len() >= 20_000 {
                store.apply(&writes).map_err(|e| e.to_string())?;
                writes.clear();
            }
        }
        writes.push(StoreWrite::MailboxMeta {
            mailbox,
            uidvalidity: 1,
            uidnext: count as u32 + 1,
            highest_modseq: count as u64,
        });
    }
    store.apply(&writes).map_err(|e| e.to_string())
}

/// Every node in `ids` answers, holds `messages` messages in all, and shows every
/// mailbox exactly as node `ids[0]` does (digests included), linked to the others.
fn cluster_agrees(cluster: &BenchCluster, ids: &[usize], messages: usize) -> Result<bool, String> {
    let statuses: Vec<_> = ids.iter().map(|i| cluster.status(*i)).collect::<Result<_, _>>()?;
    let complete =
        statuses.iter().all(|s| s.mailboxes.iter().map(|m| u64::from(m.messages)).sum::<u64>() == messages as u64);
    let same = statuses.windows(2).all(|w| w[0].mailboxes == w[1].mailboxes);
    let linked = statuses.iter().all(|s| {
        s.links.iter().filter(|l| ids.contains(&(l.peer as usize - 1))).all(|l| l.connected && l.reachable)
            && s.root.is_some()
    });
    Ok(complete && same && linked)
}

fn wait_agreed(cluster: &BenchCluster, ids: &[usize], messages: usize, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cluster_agrees(cluster, ids, messages)? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("nodes {ids:?} did not agree on {messages} messages; logs in {}", cluster.dir.display()))
}

/// A 3-node cluster (sync, replicas=1) whose nodes each hold the same `messages`
/// messages (the store is written once through the node's store code and copied to the
/// other two, as a restored backup would be); once the three are linked and agree, node
/// 1 is stopped and started again: time until its admin port answers, then until it has
/// rejoined (linked, every mailbox's digest equal to its peers'), and every node's RSS.
/// `keep`: leave the stores (and the nodes' logs, with their start-up timings) behind.
pub fn restart(tandem: &Path, root: &Path, messages: usize, keep: bool) -> Result<RestartRow, String> {
    let dir = root.join(format!("restart-{messages}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let setup = Setup { nodes: 3, mode: "sync", replicas: 1, compression: true, record: None };
    let mut cluster = BenchCluster::create(&dir, tandem, &setup)?;
    let started = Instant::now();
    generate_store(&cluster.nodes[0].data, messages, 4096)?;
    let generate_s = started.elapsed().as_secs_f64();
    let result = (|| {
        for i in 1..3 {
            let _ = std::fs::remove_dir_all(&cluster.nodes[i].data);
            cluster.snapshot(0, &cluster.nodes[i].data.clone())?;
        }
        for i in 0..3 {
            cluster.start(i)?;
        }
        wait_agreed(&cluster, &[0, 1, 2], messages, Duration::from_secs(600))?;
        cluster.stop(0);
        let started = Instant::now();
        cluster.start(0)?;
        let restart_s = started.elapsed().as_secs_f64();
        let status = cluster.status(0)?;
        let shown: u64 = status.mailboxes.iter().map(|m| u64::from(m.messages)).sum();
        if shown != messages as u64 {
            return Err(format!("the restarted node shows {shown} messages, not {messages}"));
        }
        wait_agreed(&cluster, &[0, 1, 2], messages, Duration::from_secs(600))?;
        let rejoin_s = started.elapsed().as_secs_f64();
        let rss: Vec<i64> =
            (0..3).map(|i| rss_bytes(cluster.pid(i).ok_or("no process")?)).collect::<Result<_, String>>()?;
        Ok(RestartRow {
            messages,
            generate_s,
            restart_s,
            rejoin_s,
            rss_bytes: rss[0],
            peer_rss_bytes: rss[1].max(rss[2]),
            disk_bytes: disk_bytes(&cluster.nodes[0].data),
        })
    })();
    cluster.stop_all();
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Restart time and RSS against the number of stored messages, as PNGs in `dir`; their
/// file names with captions.
pub fn restart_plots(rows: &[RestartRow], dir: &Path) -> Result<Vec<(String, String)>, String> {
    use crate::plot::{self, Series};
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    plot::register_font()?;
    let series = |name: &str, value: fn(&RestartRow) -> f64| {
        [Series {
            name: name.into(),
            points: rows.iter().map(|r| (r.messages as f64, value(r))).collect(),
            color: plotters::style::RED,
            points_only: false,
        }]
    };
    let [restart] = series("restart s", |r| r.restart_s);
    let [mut rejoin] = series("rejoin s", |r| r.rejoin_s);
    rejoin.color = plotters::style::BLUE;
    let times = [restart, rejoin];
    plot::log_log(&dir.join("store-restart.png"), "Restart time vs stored messages", "messages", "s", &times)?;
    let rss = series("RSS MiB", |r| r.rss_bytes as f64 / (1024.0 * 1024.0));
    plot::log_log(&dir.join("store-rss.png"), "RSS after restart vs stored messages", "messages", "MiB", &rss)?;
    Ok(vec![
        ("store-restart.png".into(), "restart time by stored messages".into()),
        ("store-rss.png".into(), "RSS by stored messages".into()),
    ])
}

pub fn restart_markdown(rows: &[RestartRow]) -> String {
    let mut out = String::from(
        "\n## Restart and memory by message count\n\n\
         A 3-node cluster (sync, replicas=1) whose nodes each hold this many distinct \
         messages of about 4 KB (100 users' INBOXes): the store is written once directly \
         through the node's store code and copied to the other two nodes, as a restored \
         backup would be; the three start, link up and agree. Then node 1 is stopped and \
         started: *restart* is the time until its admin port answers (store opened, core \
         recovered, stray body files collected), *rejoin* until it is linked again and \
         every mailbox's digest equals its peers'. RSS is node 1's after the rejoin, and \
         the larger of its peers'. Stores on the benchmark directory's filesystem (tmpfs \
         unless `--bench-dir` says otherwise, so the page cache is warm).\n\n\
         | messages | restart s | rejoin s | RSS MiB | RSS bytes per message | peer RSS MiB | data directory MiB | store written in s |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let mib = |b: i64| b as f64 / f64::from(1 << 20);
        out.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} |\n",
            r.messages,
            r.restart_s,
            r.rejoin_s,
            mib(r.rss_bytes),
            r.rss_bytes as f64 / r.messages.max(1) as f64,
            mib(r.peer_rss_bytes),
            mib(r.disk_bytes),
            r.generate_s
        ));
    }
    out
}
