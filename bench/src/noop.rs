//! NOOP latency on a large mailbox: what a session pays to learn what changed before
//! each command (and on each IDLE poll). One node whose store holds one user's INBOX of
//! `messages` messages (written directly, as the restart figures are); one IMAP session
//! selects it and times NOOPs: with nothing changed, and with one flag changed by
//! another session before each; then the session waits in IDLE and the time from
//! another session's STORE being answered to the IDLE session hearing of it is timed.

use crate::cluster::{BenchCluster, Setup, USER};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct NoopRow {
    pub build: String,
    pub messages: usize,
    pub idle_p50_us: f64,
    pub idle_p99_us: f64,
    pub changed_p50_us: f64,
    pub changed_p99_us: f64,
    pub wake_p50_us: f64,
    pub wake_p99_us: f64,
    pub status_p50_us: f64,
    pub status_p99_us: f64,
}

pub(crate) struct Imap {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    tag: u64,
}

impl Imap {
    pub(crate) fn connect(addr: SocketAddr) -> Result<Imap, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("imap {addr}: {e}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut imap = Imap { reader: BufReader::new(stream), writer, tag: 0 };
        let mut greeting = String::new();
        imap.reader.read_line(&mut greeting).map_err(|e| e.to_string())?;
        Ok(imap)
    }

    /// Sends a command and reads through its tagged answer, which must be OK.
    pub(crate) fn command(&mut self, text: &str) -> Result<(), String> {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        self.send(&format!("{tag} {text}"))?;
        self.read_until(&format!("{tag} ")).and_then(|line| {
            if line[tag.len() + 1..].starts_with("OK") { Ok(()) } else { Err(format!("{text}: {}", line.trim_end())) }
        })
    }

    fn send(&mut self, line: &str) -> Result<(), String> {
        self.writer.write_all(format!("{line}\r\n").as_bytes()).map_err(|e| e.to_string())
    }

    /// Reads lines until one that contains `text` (a tag or a response name); returns it.
    fn read_until(&mut self, text: &str) -> Result<String, String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err(format!("connection closed while waiting for {text:?}"));
            }
            if line.contains(text) {
                return Ok(line);
            }
        }
    }
}

pub(crate) fn percentile(sorted_us: &[f64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() - 1) as f64 * p).round() as usize;
    sorted_us[i.min(sorted_us.len() - 1)]
}

/// The p50 and p99 round trips of `command` on `session`, `count` times; before each,
/// `other` (if any) sets or clears `flag` on message `message`, so the command has a
/// change to report or count.
fn timed(
    session: &mut Imap,
    other: Option<(&mut Imap, u32, &str)>,
    command: &str,
    count: usize,
) -> Result<(f64, f64), String> {
    let mut other = other;
    let mut times = Vec::with_capacity(count);
    for i in 0..count {
        if let Some((o, message, flag)) = other.as_mut() {
            let op = if i % 2 == 0 { '+' } else { '-' };
            o.command(&format!("STORE {message} {op}FLAGS.SILENT ({flag})"))?;
        }
        let started = Instant::now();
        session.command(command)?;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((percentile(&times, 0.5), percentile(&times, 0.99)))
}

/// STATUS of the large mailbox with the counts a mail client asks for.
const STATUS_COMMAND: &str = "STATUS INBOX (MESSAGES UNSEEN DELETED UIDNEXT HIGHESTMODSEQ)";

/// `session` waits in IDLE while `other` changes a flag `count` times: the time from
/// each STORE's OK to the FETCH reaching the IDLE session (nothing when it came first).
fn timed_idle_wakeups(session: &mut Imap, other: &mut Imap, count: usize) -> Result<(f64, f64), String> {
    session.tag += 1;
    let tag = format!("t{}", session.tag);
    session.send(&format!("{tag} IDLE"))?;
    session.read_until("+ ")?;
    let mut times = Vec::with_capacity(count);
    for i in 0..count {
        let op = if i % 2 == 0 { '+' } else { '-' };
        other.command(&format!("STORE 1 {op}FLAGS.SILENT (\\Flagged)"))?;
        let answered = Instant::now();
        session.read_until(" FETCH ")?;
        times.push(answered.elapsed().as_secs_f64() * 1e6);
    }
    session.send("DONE")?;
    session.read_until(&format!("{tag} OK"))?;
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((percentile(&times, 0.5), percentile(&times, 0.99)))
}

/// Each build in turn on the same store (generated once).
pub fn noop_latency(
    builds: &[(&str, &Path)],
    root: &Path,
    messages: usize,
    noops: usize,
) -> Result<Vec<NoopRow>, String> {
    let dir = root.join(format!("noop-{messages}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let setup = Setup { nodes: 1, mode: "sync", replicas: 0, compression: false, record: None };
    let mut rows = Vec::new();
    for (i, (build, binary)) in builds.iter().enumerate() {
        let mut cluster = BenchCluster::create(&dir, binary, &setup)?;
        if i == 0 {
            crate::store::generate_mailboxes(&cluster.nodes[0].data, &[USER.to_string()], messages, 2048)?;
        }
        let imap_addr =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?;
        let config = cluster.nodes[0].config.clone();
        let mut text = std::fs::read_to_string(&config).map_err(|e| e.to_string())?;
        text.push_str(&format!("imap = \"{imap_addr}\"\n"));
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        cluster.start(0)?;
        let result: Result<NoopRow, String> = (|| {
            let mut session = Imap::connect(imap_addr)?;
            session.command(&format!("LOGIN {USER} bench"))?;
            session.command("SELECT INBOX")?;
            let mut other = Imap::connect(imap_addr)?;
            other.command(&format!("LOGIN {USER} bench"))?;
            other.command("SELECT INBOX")?;
            timed(&mut session, None, "NOOP", noops / 10)?;
            let (idle_p50_us, idle_p99_us) = timed(&mut session, None, "NOOP", noops)?;
            let flagged = Some((&mut other, 1, "\\Flagged"));
            let (changed_p50_us, changed_p99_us) = timed(&mut session, flagged, "NOOP", noops / 2)?;
            let (wake_p50_us, wake_p99_us) = timed_idle_wakeups(&mut session, &mut other, noops / 10)?;
            let mut third = Imap::connect(imap_addr)?;
            third.command(&format!("LOGIN {USER} bench"))?;
            // Another session's flag change before each, so nothing can be remembered.
            let seen = Some((&mut other, 2, "\\Seen"));
            let (status_p50_us, status_p99_us) = timed(&mut third, seen, STATUS_COMMAND, noops / 10)?;
            Ok(NoopRow {
                build: build.to_string(),
                messages,
                idle_p50_us,
                idle_p99_us,
                changed_p50_us,
                changed_p99_us,
                wake_p50_us,
                wake_p99_us,
                status_p50_us,
                status_p99_us,
            })
        })();
        cluster.stop_all();
        rows.push(result?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}

pub fn markdown(rows: &[NoopRow], command: &str) -> String {
    let mut out = String::from(
        "## NOOP latency on a large mailbox\n\n\
         One node; one user's INBOX written directly into its store (2 KB messages); one IMAP session \
         has it selected and times NOOP round trips on loopback. \"Idle\": nothing changed between NOOPs \
         (what an IDLE poll costs too). \"One change\": another session changed one message's flag \
         before each NOOP, which the NOOP reports. \"IDLE wake-up\": the session waits in IDLE while \
         the other session changes a flag; the time from the STORE's OK to the IDLE session receiving its \
         FETCH (0 when it came first). \"STATUS\": a third session asks `STATUS INBOX (MESSAGES UNSEEN \
         DELETED UIDNEXT HIGHESTMODSEQ)`, the other session having changed a flag before each. Builds ran one after the other in one run: `",
    );
    out.push_str(command);
    out.push_str("`.\n\n| build | messages | idle p50 µs | idle p99 µs | one change p50 µs | one change p99 µs | IDLE wake-up p50 µs | IDLE wake-up p99 µs | STATUS p50 µs | STATUS p99 µs |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            r.build,
            r.messages,
            r.idle_p50_us,
            r.idle_p99_us,
            r.changed_p50_us,
            r.changed_p99_us,
            r.wake_p50_us,
            r.wake_p99_us,
            r.status_p50_us,
            r.status_p99_us
        ));
    }
    out.push_str(
        "\nBefore 2026-12-01 (commit 6d27edb) a session read the whole mailbox before every command (and every \
         IDLE poll), through the event loop: every other session of the node waited behind it (idle NOOP p50 63,665 µs, \
         p99 76,501 µs on the same 100k messages). Now it asks \
         for the changes after the HIGHESTMODSEQ it has shown (`Server::changes_since`, a range of a \
         per-mailbox modseq index). Before 2026-12-02 (commit c4fa896) IDLE polled every 500 ms; now the \
         node wakes the sessions watching a mailbox when a change to it is durable (`NodeHandle::watch`), \
         and IDLE polls every 30 s only as a fallback (IDLE wake-up p50 499,768 µs, p99 500,746 µs before, on \
         the same 100k messages). Before commit 7d91d3a STATUS built the whole mailbox's view through the \
         event loop to count it (p50 6,662 µs here); now the records keep counts of `\\Seen` and `\\Deleted` \
         as they change (`Messages::flag_counts`) and STATUS asks the core for them \
         (`ClientRequest::FreshStatus`).\n",
    );
    out
}
