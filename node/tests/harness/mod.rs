//! Test harness: real `tandem` processes on loopback, a fault-injecting TCP proxy in
//! front of every peer link, and a blocking admin client.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_node::admin::{AdminAddr, AdminReply, AdminRequest, Dump, Status};

pub const SECRET: &str = "test-secret-0123456789abcdef";

/// A TCP proxy for one direction of dialing (dialer -> acceptor) that can be cut.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Connections stay open but carry nothing (bytes are read and dropped).
    frozen: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let frozen = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, l, f) = (cut.clone(), live.clone(), frozen.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let mut live = l.lock().unwrap();
                live.push(client.try_clone().unwrap());
                live.push(server.try_clone().unwrap());
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    let f = f.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if f.load(Ordering::SeqCst) {
                                continue;
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy { addr, cut, frozen, live }
    }

    /// The link goes silent: connections stay open, nothing gets through.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Drops every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub listen: Vec<SocketAddr>,
    /// Each node's admin socket (data-N/admin.sock).
    pub admin: Vec<AdminAddr>,
    /// (dialer index, acceptor index) -> proxy; the lower id dials.
    pub proxies: BTreeMap<(usize, usize), Proxy>,
    procs: Vec<Option<Child>>,
    configs: Vec<PathBuf>,
}

/// A port no other test of this process got, below the kernel's ephemeral range (so no
/// outgoing connection takes it between now and the node's bind).
pub fn free_port() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let base = 20_000 + (std::process::id() * 97) % 8_000;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = base + offset % 4_000;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

impl Cluster {
    /// `extra` is appended to every node's config (mode, replicas, ...).
    pub fn start(n: usize, extra: &str) -> Cluster {
        Cluster::start_with(n, extra, |_| String::new())
    }

    /// Like `start`, with lines for node `i`'s config from `per_node(i)`.
    pub fn start_with(n: usize, extra: &str, per_node: impl Fn(usize) -> String) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        write_private(&dir.path().join("secret"), SECRET);
        let listen: Vec<SocketAddr> = (0..n).map(|_| free_port()).collect();
        let admin: Vec<AdminAddr> =
            (0..n).map(|i| AdminAddr::Unix(dir.path().join(format!("data-{}", i + 1)).join("admin.sock"))).collect();
        let mut proxies = BTreeMap::new();
        for i in 0..n {
            for (j, upstream) in listen.iter().enumerate().skip(i + 1) {
                proxies.insert((i, j), Proxy::start(*upstream));
            }
        }
        let mut configs = Vec::new();
        for i in 0..n {
            let mut text = format!(
                "id = {}\nlisten = \"{}\"\ndata_dir = \"data-{}\"\nsecret_file = \"secret\"\nrequest_timeout_ms = 3000\n{extra}\n{}\n",
                i + 1,
                listen[i],
                i + 1,
                per_node(i)
            );
            for j in (0..n).filter(|j| *j != i) {
                // Only the dialer (lower id) uses the address: it goes through the proxy.
                let address = if i < j { proxies[&(i, j)].addr } else { listen[j] };
                text.push_str(&format!("\n[[peer]]\nid = {}\naddress = \"{address}\"\n", j + 1));
            }
            let path = dir.path().join(format!("node-{}.toml", i + 1));
            std::fs::write(&path, text).unwrap();
            configs.push(path);
        }
        let mut cluster = Cluster { dir, listen, admin, proxies, procs: (0..n).map(|_| None).collect(), configs };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_up(i);
        }
        cluster.wait_linked();
        cluster
    }

    /// Waits until every running node is connected to every other and they agree on
    /// the root.
    pub fn wait_linked(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let running: Vec<usize> = (0..self.procs.len()).filter(|i| self.procs[*i].is_some()).collect();
        while Instant::now() < deadline {
            let statuses: Vec<Status> = running.iter().map(|i| self.status(*i)).collect();
            let linked = statuses.iter().all(|s| {
                s.links.iter().filter(|l| running.contains(&(l.peer as usize - 1))).all(|l| l.connected && l.reachable)
            });
            let one_term = statuses.windows(2).all(|w| (w[0].root, w[0].epoch) == (w[1].root, w[1].epoch));
            if linked && one_term && statuses.iter().all(|s| s.root.is_some()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the cluster did not link up; log of node 1:\n{}", self.log(0));
    }

    /// A new node (the next id), not started: its config lists every existing node as a
    /// peer at its own address (no proxy) with `extra` appended; returns its index and
    /// its peer address, which the others learn from `tandem member add`.
    #[allow(dead_code)]
    pub fn add_node(&mut self, extra: &str) -> (usize, SocketAddr) {
        let i = self.procs.len();
        let listen = free_port();
        let mut text = format!(
            "id = {}\nlisten = \"{listen}\"\ndata_dir = \"data-{}\"\nsecret_file = \"secret\"\nrequest_timeout_ms = 3000\n{extra}\n",
            i + 1,
            i + 1
        );
        for (j, address) in self.listen.iter().enumerate() {
            text.push_str(&format!("\n[[peer]]\nid = {}\naddress = \"{address}\"\n", j + 1));
        }
        let path = self.dir.path().join(format!("node-{}.toml", i + 1));
        std::fs::write(&path, text).unwrap();
        self.configs.push(path);
        self.listen.push(listen);
        self.admin.push(AdminAddr::Unix(self.dir.path().join(format!("data-{}", i + 1)).join("admin.sock")));
        self.procs.push(None);
        (i, listen)
    }

    pub fn spawn(&mut self, i: usize) {
        self.spawn_with(i, &[]);
    }

    /// `spawn` with more arguments for `tandem node`.
    pub fn spawn_with(&mut self, i: usize, args: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{}.log", i + 1)))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .arg("node")
            .arg("--config")
            .arg(&self.configs[i])
            .args(args)
            .env("TANDEM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tandem");
        self.procs[i] = Some(child);
    }

    /// Node `i`'s process id, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i].as_ref().map(|c| c.id())
    }

    /// Node `i`'s config file.
    pub fn config(&self, i: usize) -> &std::path::Path {
        &self.configs[i]
    }

    pub fn wait_up(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if call(&self.admin[i], &AdminRequest::Status).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("node {} did not come up; log:\n{}", i + 1, self.log(i));
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Node `i`'s exit status if its process has ended (without waiting).
    #[allow(dead_code)]
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let status = self.procs[i].as_mut().and_then(|c| c.try_wait().ok().flatten());
        if status.is_some() {
            self.procs[i] = None;
        }
        status
    }

    /// Waits up to `limit` for node `i`'s process to end on its own; its exit status.
    #[allow(dead_code)]
    pub fn wait_exit(&mut self, i: usize, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.procs[i].as_mut().map(|c| c.try_wait()) {
                self.procs[i] = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{}.log", i + 1))).unwrap_or_default()
    }

    /// Cuts every link of node `i`.
    pub fn isolate(&self, i: usize) {
        for ((a, b), p) in &self.proxies {
            if *a == i || *b == i {
                p.cut();
            }
        }
    }

    pub fn heal(&self) {
        for p in self.proxies.values() {
            p.heal();
        }
    }

    pub fn status(&self, i: usize) -> Status {
        match call(&self.admin[i], &AdminRequest::Status) {
            Ok(AdminReply::Status(s)) => s,
            other => panic!("status of node {}: {other:?}", i + 1),
        }
    }

    /// The mailbox as node `i` shows it; a mailbox it does not have yet is empty.
    pub fn dump(&self, i: usize, mailbox: &str) -> Dump {
        match call(&self.admin[i], &AdminRequest::Dump { mailbox: mailbox.into() }) {
            Ok(AdminReply::Dump(d)) => d,
            Ok(AdminReply::Error { reason, .. }) if reason.starts_with("no mailbox") => {
                Dump { mailbox: mailbox.into(), uidvalidity: 0, uidnext: 0, highest_modseq: 0, messages: vec![] }
            }
            other => panic!("dump of node {}: {other:?}", i + 1),
        }
    }

    /// Delivers; Ok((uid, guid)) when the node acknowledged the save.
    pub fn deliver(&self, i: usize, mailbox: &str, body: &str) -> Result<(u32, String), String> {
        let request = AdminRequest::Deliver { mailbox: mailbox.into(), body: body.into(), flags: vec![] };
        match call(&self.admin[i], &request)? {
            AdminReply::Saved { uid, guid, .. } => Ok((uid, guid)),
            other => Err(format!("{other:?}")),
        }
    }

    /// Waits until every running node shows `mailbox` the same way; returns that view.
    pub fn converged(&self, mailbox: &str, timeout: Duration) -> Dump {
        let deadline = Instant::now() + timeout;
        let running: Vec<usize> = (0..self.procs.len()).filter(|i| self.procs[*i].is_some()).collect();
        let mut last = Vec::new();
        while Instant::now() < deadline {
            last = running.iter().map(|i| self.dump(*i, mailbox)).collect::<Vec<_>>();
            let same = last.windows(2).all(|w| w[0] == w[1]);
            let quiet = running.iter().all(|i| {
                let s = self.status(*i);
                s.links.iter().all(|l| l.backlog == 0) && s.jobs == 0 && s.wanted_bodies == 0
            });
            if same && quiet {
                return last.swap_remove(0);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{mailbox} did not converge in {timeout:?}: {last:#?}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.kill9(i);
        }
    }
}

/// One admin request over a fresh connection.
pub fn call(addr: &AdminAddr, request: &AdminRequest) -> Result<AdminReply, String> {
    tandem_node::admin::call_blocking(addr, request, Duration::from_secs(30))
}

/// Writes a file with mode 0600 (the node refuses a secret others can read).
pub fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Polls `check` for up to 10 s (a log line may land just after the socket closed).
pub fn eventually(check: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub fn http_get(addr: SocketAddr) -> String {
    raw_exchange(addr, b"GET /metrics HTTP/1.0\r\n\r\n")
}

/// The node's count of a protocol event (a core mark) from its metrics endpoint.
pub fn event_count(metrics: SocketAddr, sid: usize, event: &str) -> u64 {
    let needle = format!("tandem_protocol_events_total{{server=\"{sid}\",event=\"{event}\"}} ");
    let text = http_get(metrics);
    text.lines().find_map(|l| l.strip_prefix(needle.as_str())).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// Raw bytes to a peer port; returns what the node answered before closing.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let _ = stream.write_all(bytes);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Makes sure the system tools a test drives (python3, mbsync) are installed, through
/// the same `scripts/test-tools` that `.ci/run` uses: installed once per test binary
/// when missing, and a panic saying what to do when they cannot be (never a skip).
#[allow(dead_code)]
pub fn require_tools() {
    static INSTALLED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/test-tools");
        let out = Command::new(script).output().map_err(|e| format!("{script}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{script} failed:\n{}", String::from_utf8_lossy(&out.stderr)))
        }
    });
    if let Err(why) = result {
        panic!("a system tool this test needs is missing: {why}");
    }
}

/// A test CA (`ca.pem`) and a certificate for 127.0.0.1 it signed (`mail.pem`,
/// `mail.key`) in `dir`: what a node's `mail_tls_cert` and `mail_tls_key` take.
pub fn make_mail_tls(dir: &std::path::Path) {
    tandem_node::cluster::write_certificates(dir).unwrap();
}
