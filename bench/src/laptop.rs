//! A laptop's catch-up after a day apart, over a slow link: `tandem replicate` against a
//! 3-node cluster, Dovecot 2.3's `doveadm sync` (dsync, stateful) and isync's mbsync
//! (Maildir on the laptop, IMAP on the server) on the same work, each through the same
//! byte-counting proxy that holds every byte for the link's one-way latency.
//!
//! The work: the laptop holds the server's 1,000 messages (the first sync, measured
//! too); then, apart, the server takes 200 new messages and 500 flag changes, the laptop
//! 20 new messages and 30 flag changes on other messages; then one sync brings both to
//! 1,220 messages with every flag, which is checked on both sides.

use crate::cluster::{BenchCluster, Setup, USER};
use crate::proxy::CountingProxy;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tandem_node::admin::{AdminAddr, AdminReply, AdminRequest};

pub const BASE: usize = 1000;
pub const SERVER_NEW: usize = 200;
pub const SERVER_FLAGS: usize = 500;
pub const LAPTOP_NEW: usize = 20;
pub const LAPTOP_FLAGS: usize = 30;
const PASSWORD: &str = "bench";

#[derive(Clone, Debug)]
pub struct Row {
    pub tool: String,
    pub initial_ms: f64,
    pub initial_bytes: u64,
    pub catchup_ms: f64,
    pub catchup_bytes: u64,
    /// Messages each side holds after the catch-up (laptop, server).
    pub messages: (usize, usize),
}

fn free_addr() -> Result<SocketAddr, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map_err(|e| e.to_string())
}

fn run(command: &mut Command, what: &str) -> Result<String, String> {
    let out = command.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn admin(addr: &AdminAddr, request: &AdminRequest) -> Result<AdminReply, String> {
    match crate::cluster::call(addr, request)? {
        AdminReply::Error { reason, .. } => Err(reason),
        reply => Ok(reply),
    }
}

fn deliver(addr: &AdminAddr, mailbox: &str, body: &[u8]) -> Result<(), String> {
    let body = String::from_utf8_lossy(body).into_owned();
    admin(addr, &AdminRequest::Deliver { mailbox: mailbox.into(), body, flags: vec![] }).map(|_| ())
}

fn flag(addr: &AdminAddr, mailbox: &str, uids: Vec<u32>, flag: &str) -> Result<(), String> {
    let request = AdminRequest::Store { mailbox: mailbox.into(), uids, add: vec![flag.into()], remove: vec![] };
    admin(addr, &request).map(|_| ())
}

fn shape(addr: &AdminAddr, mailbox: &str) -> Result<Vec<(u32, String, Vec<String>)>, String> {
    match admin(addr, &AdminRequest::Dump { mailbox: mailbox.into() })? {
        AdminReply::Dump(d) => Ok(d
            .messages
            .into_iter()
            .map(|m| {
                let mut f = m.flags;
                f.sort();
                (m.uid, m.guid, f)
            })
            .collect()),
        other => Err(format!("dump: {other:?}")),
    }
}

/// Every node has sent its peers everything (no backlog, no job, no body wanted).
fn wait_quiet(cluster: &BenchCluster) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let quiet = (0..cluster.nodes.len()).all(|i| {
            cluster.status(i).is_ok_and(|s| {
                s.wanted_bodies == 0 && s.jobs == 0 && s.links.iter().all(|l| l.backlog == 0 && l.connected)
            })
        });
        if quiet {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("the cluster did not settle".into())
}

/// tandem: a 3-node cluster serving IMAPS, a laptop node, `tandem replicate` through the
/// proxy.
pub fn tandem(tandem: &Path, root: &Path, base: &[Vec<u8>], day: &[Vec<u8>], one_way: Duration) -> Result<Row, String> {
    let dir = root.join("laptop-tandem");
    let _ = std::fs::remove_dir_all(&dir);
    let (cluster_dir, laptop_dir, tls_dir) = (dir.join("cluster"), dir.join("laptop"), dir.join("tls"));
    for d in [&cluster_dir, &laptop_dir] {
        std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    let ca = tandem_node::cluster::write_certificates(&tls_dir)?;
    let setup = Setup { nodes: 3, mode: "sync", replicas: 1, compression: true, record: None };
    let mut cluster = BenchCluster::create(&cluster_dir, tandem, &setup)?;
    let mut imaps = Vec::new();
    for node in &cluster.nodes {
        let addr = free_addr()?;
        imaps.push(addr);
        let text = std::fs::read_to_string(&node.config).map_err(|e| e.to_string())?;
        let lines = format!(
            "imaps = \"{addr}\"\nmail_tls_cert = \"{0}/mail.pem\"\nmail_tls_key = \"{0}/mail.key\"\n",
            tls_dir.display()
        );
        std::fs::write(&node.config, lines + &text).map_err(|e| e.to_string())?;
    }
    let laptop_setup = Setup { nodes: 1, mode: "sync", replicas: 0, compression: true, record: None };
    let mut laptop = BenchCluster::create(&laptop_dir, tandem, &laptop_setup)?;
    let text = std::fs::read_to_string(&laptop.nodes[0].config).map_err(|e| e.to_string())?;
    // The laptop's id is one no cluster server has: the GUIDs it writes name it, and its
    // pull hands over the bodies of those (its own new mail) for the first push.
    let text = text.replacen("id = 1\n", "id = 99\n", 1);
    std::fs::write(&laptop.nodes[0].config, format!("user_replica = true\n{text}")).map_err(|e| e.to_string())?;
    for i in 0..3 {
        cluster.start(i)?;
    }
    cluster.wait_linked(&[0, 1, 2], Duration::from_secs(60))?;
    laptop.start(0)?;
    let result = (|| {
        let inbox = format!("{USER}/INBOX");
        let server = &cluster.nodes[0].admin;
        let laptop_admin = laptop.nodes[0].admin.clone();
        for body in base {
            deliver(server, &inbox, body)?;
        }
        let proxy = CountingProxy::start_delayed(imaps[0], one_way).map_err(|e| e.to_string())?;
        let password_file = dir.join("password");
        tandem_node::users::write_private(&password_file, PASSWORD.as_bytes())?;
        let AdminAddr::Unix(socket) = &laptop_admin else { return Err("a Unix admin socket".into()) };
        let replicate = |what: &str| -> Result<(f64, u64), String> {
            let before = proxy.bytes();
            let started = Instant::now();
            let out = run(
                Command::new(tandem)
                    .arg("replicate")
                    .arg("--admin")
                    .arg(socket)
                    .arg("--server")
                    .arg(proxy.addr.to_string())
                    .arg("--user")
                    .arg(USER)
                    .arg("--password-file")
                    .arg(&password_file)
                    .arg("--ca-file")
                    .arg(&ca),
                what,
            )?;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            crate::say(&format!("  tandem {what}: {}", out.trim()));
            Ok((ms, proxy.bytes() - before))
        };
        let (initial_ms, initial_bytes) = replicate("initial sync")?;
        // The day apart.
        for body in &day[..SERVER_NEW] {
            deliver(server, &inbox, body)?;
        }
        flag(server, &inbox, (1..=SERVER_FLAGS as u32).collect(), "\\Flagged")?;
        for body in &day[SERVER_NEW..SERVER_NEW + LAPTOP_NEW] {
            deliver(&laptop_admin, &inbox, body)?;
        }
        let first = SERVER_FLAGS as u32 + 1;
        flag(&laptop_admin, &inbox, (first..first + LAPTOP_FLAGS as u32).collect(), "\\Answered")?;
        wait_quiet(&cluster)?;
        let (catchup_ms, catchup_bytes) = replicate("catch-up")?;
        let (on_laptop, on_server) = (shape(&laptop_admin, &inbox)?, shape(server, &inbox)?);
        if on_laptop != on_server {
            return Err("tandem: the laptop and the cluster differ after the catch-up".into());
        }
        Ok(Row {
            tool: "tandem replicate".into(),
            initial_ms,
            initial_bytes,
            catchup_ms,
            catchup_bytes,
            messages: (on_laptop.len(), on_server.len()),
        })
    })();
    laptop.stop_all();
    cluster.stop_all();
    result
}

/// A private Dovecot 2.3 instance (as the anchor script runs them): doveadm on a TCP
/// port, and IMAP when `imap` is set.
struct Dovecot {
    conf: PathBuf,
    master: Child,
}

impl Dovecot {
    fn start(root: &Path, name: &str, doveadm: SocketAddr, imap: Option<SocketAddr>) -> Result<Dovecot, String> {
        let base = root.join(format!("run-{name}"));
        std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
        let mail = root.join(name);
        std::fs::create_dir_all(&mail).map_err(|e| e.to_string())?;
        let protocols = if imap.is_some() { "imap" } else { "" };
        let imap_service = match imap {
            Some(a) => format!(
                "service imap-login {{\n  inet_listener imap {{\n    address = 127.0.0.1\n    port = {}\n  }}\n  inet_listener imaps {{\n    port = 0\n  }}\n}}\n",
                a.port()
            ),
            None => String::new(),
        };
        let conf = root.join(format!("{name}.conf"));
        let text = format!(
            "base_dir = {base}\nstate_dir = {base}/state\ninstance_name = tandem-laptop-bench-{name}-{pid}\n\
             log_path = {root}/{name}.log\nprotocols = {protocols}\nssl = no\nlisten = 127.0.0.1\n\
             disable_plaintext_auth = no\nfirst_valid_uid = 1\nmail_location = maildir:{mail}/%u/Maildir\n\
             maildir_copy_with_hardlinks = no\ndoveadm_port = {port}\ndoveadm_password = bench-secret\n\
             passdb {{\n  driver = static\n  args = password={PASSWORD}\n}}\n\
             userdb {{\n  driver = static\n  args = uid=65534 gid=65534 home={mail}/%u\n}}\n\
             service doveadm {{\n  inet_listener {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n}}\n{imap_service}",
            base = base.display(),
            pid = std::process::id(),
            root = root.display(),
            mail = mail.display(),
            port = doveadm.port(),
        );
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        run(Command::new("chown").arg("-R").arg("65534:65534").arg(&mail), "chown")?;
        let master = Command::new("dovecot")
            .arg("-F")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("dovecot: {e}"))?;
        let dovecot = Dovecot { conf, master };
        let deadline = Instant::now() + Duration::from_secs(20);
        let ports: Vec<SocketAddr> = [Some(doveadm), imap].into_iter().flatten().collect();
        while Instant::now() < deadline {
            if base.join("auth-userdb").exists() && ports.iter().all(|a| std::net::TcpStream::connect(a).is_ok()) {
                return Ok(dovecot);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("dovecot {name} did not start; see {}", root.join(format!("{name}.log")).display()))
    }

    fn doveadm(&self) -> Command {
        let mut c = Command::new("doveadm");
        c.arg("-c").arg(&self.conf);
        c
    }

    fn save(&self, body: &[u8]) -> Result<(), String> {
        use std::io::Write;
        let mut child = self
            .doveadm()
            .args(["save", "-u", "bench"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("doveadm save: {e}"))?;
        child.stdin.take().ok_or("no stdin")?.write_all(body).map_err(|e| e.to_string())?;
        let status = child.wait().map_err(|e| e.to_string())?;
        if status.success() { Ok(()) } else { Err(format!("doveadm save: {status}")) }
    }

    fn flag(&self, flag: &str, first: usize, count: usize) -> Result<(), String> {
        let uids = format!("{first}:{}", first + count - 1);
        run(self.doveadm().args(["flags", "add", "-u", "bench", flag, "mailbox", "INBOX", "uid", &uids]), "flags")
            .map(|_| ())
    }

    /// "guid flags" lines, sorted, \Recent left out.
    fn messages(&self) -> Result<Vec<String>, String> {
        let out = run(
            self.doveadm().args(["-f", "tab", "fetch", "-u", "bench", "guid flags", "mailbox", "INBOX", "all"]),
            "fetch",
        )?;
        let mut lines: Vec<String> =
            out.lines().skip(1).map(|l| l.replace("\\Recent", "").trim().to_string()).collect();
        lines.sort();
        Ok(lines)
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.master.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.master.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.master.kill();
        let _ = self.master.wait();
    }
}

/// Writes the base messages into a Maildir as the anchor does (genmail.py) and has
/// Dovecot index them.
fn seed(genmail: &Path, dovecot: &Dovecot, mail: &Path) -> Result<(), String> {
    let maildir = mail.join("bench").join("Maildir");
    run(Command::new("python3").arg(genmail).arg("maildir").arg(&maildir).arg(BASE.to_string()), "genmail.py maildir")?;
    run(Command::new("chown").arg("-R").arg("65534:65534").arg(mail), "chown")?;
    run(dovecot.doveadm().args(["index", "-u", "bench", "INBOX"]), "doveadm index").map(|_| ())
}

/// dsync: A (the laptop) syncs with B (the server) through the proxy, with saved state.
pub fn dsync(root: &Path, genmail: &Path, day: &[Vec<u8>], one_way: Duration) -> Result<Row, String> {
    let dir = root.join("laptop-dsync");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let a = Dovecot::start(&dir, "a", free_addr()?, None)?;
    let b = Dovecot::start(&dir, "b", free_addr()?, None)?;
    seed(genmail, &b, &dir.join("b"))?;
    let b_port = {
        let text = std::fs::read_to_string(&b.conf).map_err(|e| e.to_string())?;
        let line = text.lines().find(|l| l.starts_with("doveadm_port")).ok_or("no doveadm_port")?;
        line.rsplit(' ').next().and_then(|p| p.parse::<u16>().ok()).ok_or("bad doveadm_port")?
    };
    let proxy =
        CountingProxy::start_delayed(SocketAddr::from(([127, 0, 0, 1], b_port)), one_way).map_err(|e| e.to_string())?;
    let target = format!("tcp:{}", proxy.addr);
    let sync = |state: &str| -> Result<(f64, u64, String), String> {
        let before = proxy.bytes();
        let started = Instant::now();
        let out = run(a.doveadm().args(["sync", "-N", "-l", "30", "-u", "bench", "-s", state, &target]), "dsync")?;
        Ok((started.elapsed().as_secs_f64() * 1000.0, proxy.bytes() - before, out.trim().to_string()))
    };
    let (initial_ms, initial_bytes, mut state) = sync("")?;
    // The state is stable only after a second sync (the anchor's "Problems found").
    for _ in 0..2 {
        state = sync(&state)?.2;
    }
    for body in &day[..SERVER_NEW] {
        b.save(body)?;
    }
    b.flag("\\Flagged", 1, SERVER_FLAGS)?;
    for body in &day[SERVER_NEW..SERVER_NEW + LAPTOP_NEW] {
        a.save(body)?;
    }
    a.flag("\\Answered", SERVER_FLAGS + 1, LAPTOP_FLAGS)?;
    let (catchup_ms, catchup_bytes, _) = sync(&state)?;
    let (on_a, on_b) = (a.messages()?, b.messages()?);
    if on_a != on_b {
        return Err("dsync: the two stores differ after the catch-up".into());
    }
    Ok(Row {
        tool: "dsync (doveadm sync -s, tcp)".into(),
        initial_ms,
        initial_bytes,
        catchup_ms,
        catchup_bytes,
        messages: (on_a.len(), on_b.len()),
    })
}

/// mbsync: a Maildir on the laptop, B's IMAP through the proxy.
pub fn mbsync(root: &Path, genmail: &Path, day: &[Vec<u8>], one_way: Duration) -> Result<Row, String> {
    let dir = root.join("laptop-mbsync");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let imap = free_addr()?;
    let b = Dovecot::start(&dir, "b", free_addr()?, Some(imap))?;
    seed(genmail, &b, &dir.join("b"))?;
    let proxy = CountingProxy::start_delayed(imap, one_way).map_err(|e| e.to_string())?;
    let near = dir.join("near");
    std::fs::create_dir_all(&near).map_err(|e| e.to_string())?;
    let rc = dir.join("mbsyncrc");
    std::fs::write(
        &rc,
        format!(
            "IMAPAccount far\nHost 127.0.0.1\nPort {port}\nUser bench\nPass {PASSWORD}\nSSLType None\nAuthMechs LOGIN\nTimeout 600\n\n\
             IMAPStore far\nAccount far\n\n\
             MaildirStore near\nPath {near}/\nInbox {near}/INBOX\nSubFolders Verbatim\n\n\
             Channel laptop\nFar :far:\nNear :near:\nPatterns *\nCreate Both\nExpunge Both\nSyncState *\nSync All\n",
            port = proxy.addr.port(),
            near = near.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let sync = || -> Result<(f64, u64), String> {
        let before = proxy.bytes();
        let started = Instant::now();
        run(Command::new("mbsync").arg("-q").arg("-c").arg(&rc).arg("-a"), "mbsync")?;
        Ok((started.elapsed().as_secs_f64() * 1000.0, proxy.bytes() - before))
    };
    let (initial_ms, initial_bytes) = sync()?;
    for body in &day[..SERVER_NEW] {
        b.save(body)?;
    }
    b.flag("\\Flagged", 1, SERVER_FLAGS)?;
    // The laptop's own: new files in new/, and \Answered (R) on files of UIDs 501-530.
    let inbox = near.join("INBOX");
    for (i, body) in day[SERVER_NEW..SERVER_NEW + LAPTOP_NEW].iter().enumerate() {
        let name = inbox.join("new").join(format!("1700000000.laptop{i}.bench"));
        std::fs::write(name, body).map_err(|e| e.to_string())?;
    }
    // mbsync keeps unseen mail in new/ (no info part) and the rest in cur/.
    let mut answered = 0;
    for sub in ["cur", "new"] {
        for entry in std::fs::read_dir(inbox.join(sub)).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let (stem, flags) = name.split_once(":2,").unwrap_or((name.as_str(), ""));
            let uid = stem.rsplit_once(",U=").and_then(|(_, u)| u.parse::<usize>().ok()).unwrap_or(0);
            if (SERVER_FLAGS + 1..=SERVER_FLAGS + LAPTOP_FLAGS).contains(&uid) {
                let mut letters: Vec<char> = flags.chars().chain(['R']).collect();
                letters.sort();
                letters.dedup();
                let renamed = inbox.join("cur").join(format!("{stem}:2,{}", letters.into_iter().collect::<String>()));
                std::fs::rename(&path, renamed).map_err(|e| e.to_string())?;
                answered += 1;
            }
        }
    }
    if answered != LAPTOP_FLAGS {
        return Err(format!("mbsync: {answered} local messages flagged, not {LAPTOP_FLAGS}"));
    }
    let (catchup_ms, catchup_bytes) = sync()?;
    let on_server = b.messages()?;
    let on_laptop =
        ["cur", "new"].iter().map(|d| std::fs::read_dir(inbox.join(d)).map(|r| r.count()).unwrap_or(0)).sum::<usize>();
    let flagged = on_server.iter().filter(|l| l.contains("\\Flagged")).count();
    let answered_on_server = on_server.iter().filter(|l| l.contains("\\Answered")).count();
    if on_laptop != on_server.len() || flagged != SERVER_FLAGS || answered_on_server != LAPTOP_FLAGS {
        return Err(format!(
            "mbsync: laptop {on_laptop}, server {} messages ({flagged} flagged, {answered_on_server} answered)",
            on_server.len()
        ));
    }
    Ok(Row {
        tool: "mbsync (isync, IMAP)".into(),
        initial_ms,
        initial_bytes,
        catchup_ms,
        catchup_bytes,
        messages: (on_laptop, on_server.len()),
    })
}

pub fn markdown(rows: &[Row], one_way: Duration, command: &str) -> String {
    let mut md = String::from("## A laptop's day apart, over a slow link\n\n");
    md.push_str(&format!(
        "A laptop holds a server's {BASE} messages (the first sync). Apart for a day, the server takes {SERVER_NEW} new messages \
         and {SERVER_FLAGS} flag changes, the laptop {LAPTOP_NEW} new messages and {LAPTOP_FLAGS} flag changes on other \
         messages; then one sync. Every byte crosses a proxy that holds it {} ms each way (a satellite link's latency; \
         bandwidth not limited) and counts it, both ways. Both sides are checked alike after the catch-up ({} messages).\n\n",
        one_way.as_millis(),
        BASE + SERVER_NEW + LAPTOP_NEW
    ));
    md.push_str(
        "tandem: `tandem replicate` from a laptop node (`user_replica = true`) to a 3-node cluster's IMAPS port \
         (TLS, then X-REPLICATE DEFLATE). dsync: `doveadm sync -N -s STATE tcp:` from the laptop's Dovecot \
         to the server's doveadm port (no TLS, no compression), with a state made stable by two more syncs. \
         mbsync: a Maildir on the laptop and the server's IMAP (no TLS, no compression).\n\n\
         tandem's catch-up is 7 round trips: TCP, TLS, the login sent with the switch to the replica link, the \
         list, the push (the laptop's new messages' bodies with it), the pull, and the bodies the laptop lacks; \
         the adopt's answer shows both copies alike, so nothing is looked at again. The bytes include TLS.\n\n",
    );
    md.push_str("| tool | first sync: wall | first sync: bytes | catch-up: wall | catch-up: bytes | catch-up bytes vs tandem | messages after (laptop / server) |\n|---|---|---|---|---|---|---|\n");
    let tandem_bytes = rows.iter().find(|r| r.tool.starts_with("tandem")).map(|r| r.catchup_bytes as f64);
    for r in rows {
        let ratio = match tandem_bytes {
            Some(t) if t > 0.0 => format!("{:.2}", r.catchup_bytes as f64 / t),
            _ => "–".into(),
        };
        md.push_str(&format!(
            "| {} | {:.1} s | {} | {:.1} s | {} | {ratio} | {} / {} |\n",
            r.tool,
            r.initial_ms / 1000.0,
            crate::report::bytes(r.initial_bytes as f64),
            r.catchup_ms / 1000.0,
            crate::report::bytes(r.catchup_bytes as f64),
            r.messages.0,
            r.messages.1,
        ));
    }
    md.push_str(&format!("\nCommand: `{command}`\n\n"));
    md
}
