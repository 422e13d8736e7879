//! Real `tandem` node processes on loopback for the benchmark: configs, start and stop,
//! a counting proxy on every peer link, data-directory snapshots, and admin queries.

use crate::proxy::CountingProxy;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tandem_node::admin::{AdminAddr, AdminReply, AdminRequest, MailboxStatus, Status};

pub const USER: &str = "bench@example.org";
pub const MAILBOX: &str = "bench@example.org/INBOX";

/// What every node of one cluster is configured with.
#[derive(Clone, Debug)]
pub struct Setup {
    pub nodes: usize,
    pub mode: &'static str,
    pub replicas: usize,
    pub compression: bool,
    /// Record each core's inputs (`[record]`): None is off, Some(bodies) on.
    pub record: Option<bool>,
}

pub struct Node {
    pub config: PathBuf,
    /// The same node configured without peers: mail it takes then is in no
    /// replication log, as on a server that was alone before the others were added.
    pub config_alone: PathBuf,
    pub data: PathBuf,
    pub admin: AdminAddr,
    pub lmtp: SocketAddr,
    child: Option<Child>,
}

pub struct BenchCluster {
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    /// (dialer index, acceptor index) -> proxy; the lower id dials.
    pub proxies: BTreeMap<(usize, usize), CountingProxy>,
    tandem: PathBuf,
}

fn free_addrs(n: usize) -> Result<Vec<SocketAddr>, String> {
    let held: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    held.iter().map(|l| l.local_addr().map_err(|e| e.to_string())).collect()
}

impl BenchCluster {
    /// Writes configs for `setup` into `dir` (which must exist); starts nothing.
    pub fn create(dir: &Path, tandem: &Path, setup: &Setup) -> Result<BenchCluster, String> {
        let err = |e: std::io::Error| format!("{}: {e}", dir.display());
        tandem_node::users::write_private(&dir.join("secret"), b"bench-secret-0123456789abcdef\n")?;
        let users = dir.join("users.toml");
        if !users.exists() {
            tandem_node::users::add_user(&users, USER, b"bench")?;
        }
        let n = setup.nodes;
        let addrs = free_addrs(2 * n)?;
        let (listen, lmtp) = (&addrs[..n], &addrs[n..]);
        let mut proxies = BTreeMap::new();
        for i in 0..n {
            for (j, upstream) in listen.iter().enumerate().skip(i + 1) {
                proxies.insert((i, j), CountingProxy::start(*upstream).map_err(err)?);
            }
        }
        let mut nodes = Vec::new();
        for i in 0..n {
            let data = dir.join(format!("data-{}", i + 1));
            let mut text = format!(
                "id = {}\nlisten = \"{}\"\nlmtp = \"{}\"\nusers_file = \"{}\"\ndata_dir = \"{}\"\n\
                 secret_file = \"{}\"\nmode = \"{}\"\nreplicas = {}\ncompression = {}\nlog_capacity = 200000\n\
                 request_timeout_ms = 30000\n",
                i + 1,
                listen[i],
                lmtp[i],
                users.display(),
                data.display(),
                dir.join("secret").display(),
                setup.mode,
                setup.replicas,
                setup.compression,
            );
            if let Some(bodies) = setup.record {
                text.push_str(&format!(
                    "[record]\ndir = \"{}\"\nmax_mb = 4096\nbodies = {bodies}\n",
                    dir.join(format!("record-{}", i + 1)).display()
                ));
            }
            let config_alone = dir.join(format!("node-{}-alone.toml", i + 1));
            std::fs::write(&config_alone, &text).map_err(err)?;
            for j in (0..n).filter(|j| *j != i) {
                let address = if i < j { proxies[&(i, j)].addr } else { listen[j] };
                text.push_str(&format!("\n[[peer]]\nid = {}\naddress = \"{address}\"\n", j + 1));
            }
            let config = dir.join(format!("node-{}.toml", i + 1));
            std::fs::write(&config, text).map_err(err)?;
            let admin = AdminAddr::Unix(data.join("admin.sock"));
            nodes.push(Node { config, config_alone, data, admin, lmtp: lmtp[i], child: None });
        }
        Ok(BenchCluster { dir: dir.to_path_buf(), nodes, proxies, tandem: tandem.to_path_buf() })
    }

    /// Starts node `i` and waits until its admin port answers.
    pub fn start(&mut self, i: usize) -> Result<(), String> {
        let config = self.nodes[i].config.clone();
        self.start_with(i, &config)
    }

    /// Starts node `i` configured without peers.
    pub fn start_alone(&mut self, i: usize) -> Result<(), String> {
        let config = self.nodes[i].config_alone.clone();
        self.start_with(i, &config)
    }

    fn start_with(&mut self, i: usize, config: &Path) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{}.log", i + 1)))
            .map_err(|e| e.to_string())?;
        let child = Command::new(&self.tandem)
            .arg("node")
            .arg("--config")
            .arg(config)
            .arg("--stop-on-stdin-eof")
            .env("TANDEM_LOG", std::env::var("TANDEM_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.tandem.display()))?;
        self.nodes[i].child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if self.status(i).is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(exit))) = self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("node {} exited: {exit}; see {}", i + 1, self.dir.display()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(format!("node {} did not come up", i + 1))
    }

    /// Clean stop: closing standard input asks the node to shut down.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            drop(child.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i);
        }
    }

    pub fn status(&self, i: usize) -> Result<Status, String> {
        match call(&self.nodes[i].admin, &AdminRequest::Status)? {
            AdminReply::Status(s) => Ok(s),
            other => Err(format!("status: {other:?}")),
        }
    }

    /// Waits until the running nodes in `ids` are linked to each other under one root.
    pub fn wait_linked(&self, ids: &[usize], timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let statuses: Vec<Status> = ids.iter().map(|i| self.status(*i)).collect::<Result<_, _>>()?;
            let linked = statuses.iter().all(|s| {
                s.links.iter().filter(|l| ids.contains(&(l.peer as usize - 1))).all(|l| l.connected && l.reachable)
            });
            let one_term = statuses.windows(2).all(|w| (w[0].root, w[0].epoch) == (w[1].root, w[1].epoch));
            if linked && one_term && statuses.iter().all(|s| s.root.is_some()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Err(format!("nodes {ids:?} did not link up; logs in {}", self.dir.display()))
    }

    /// Waits until every node in `ids` shows the INBOX with `messages` messages,
    /// identically (digest included), every body present, nothing queued or running.
    /// Polls every `poll`; returns when it saw that.
    pub fn wait_converged(
        &self,
        ids: &[usize],
        messages: u32,
        poll: Duration,
        timeout: Duration,
    ) -> Result<Instant, String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        let trace = std::env::var_os("TANDEM_BENCH_TRACE").is_some();
        let started = Instant::now();
        while Instant::now() < deadline {
            let statuses: Vec<Status> = ids.iter().map(|i| self.status(*i)).collect::<Result<_, _>>()?;
            let seen = Instant::now();
            let inboxes: Vec<Option<&MailboxStatus>> =
                statuses.iter().map(|s| s.mailboxes.iter().find(|m| m.mailbox == MAILBOX)).collect();
            let same = inboxes.windows(2).all(|w| w[0] == w[1]);
            let complete = inboxes[0].is_some_and(|m| m.messages == messages);
            // Backlog towards a server not taking part (down on purpose) is expected.
            let quiet = statuses.iter().all(|s| {
                s.wanted_bodies == 0
                    && s.jobs == 0
                    && s.links.iter().filter(|l| ids.contains(&(l.peer as usize - 1))).all(|l| l.backlog == 0)
            });
            if same && complete && quiet {
                if trace {
                    eprintln!("{:>9.3} ms converged", started.elapsed().as_secs_f64() * 1e3);
                }
                return Ok(seen);
            }
            let brief: Vec<String> = inboxes
                .iter()
                .map(|m| {
                    m.map(|m| format!("{}/{}/{}", m.messages, m.highest_modseq, &m.digest[..6])).unwrap_or_default()
                })
                .collect();
            let now = format!(
                "{brief:?} wanted {:?} jobs {:?} backlog {:?}",
                statuses.iter().map(|s| s.wanted_bodies).collect::<Vec<_>>(),
                statuses.iter().map(|s| s.jobs).collect::<Vec<_>>(),
                statuses.iter().map(|s| s.links.iter().map(|l| l.backlog).collect::<Vec<_>>()).collect::<Vec<_>>()
            );
            if trace && now != last {
                eprintln!("{:>9.3} ms {now}", started.elapsed().as_secs_f64() * 1e3);
            }
            last = now;
            std::thread::sleep(poll);
        }
        Err(format!("no convergence on {messages} messages: {last}; logs in {}", self.dir.display()))
    }

    /// The process id of node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(|c| c.id())
    }

    /// Waits until every node in `ids` holds `inboxes` INBOXes of one message each
    /// (besides the bench user's), nothing queued, fetched or running.
    pub fn wait_quiet(&self, ids: &[usize], inboxes: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let statuses: Vec<Status> = ids.iter().map(|i| self.status(*i)).collect::<Result<_, _>>()?;
            let counts: Vec<usize> = statuses
                .iter()
                .map(|s| s.mailboxes.iter().filter(|m| m.mailbox != MAILBOX && m.messages == 1).count())
                .collect();
            let quiet =
                statuses.iter().all(|s| s.wanted_bodies == 0 && s.jobs == 0 && s.links.iter().all(|l| l.backlog == 0));
            if quiet && counts.iter().all(|c| *c == inboxes) {
                return Ok(());
            }
            last = format!("{counts:?} quiet {quiet}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("not quiet: {last}; logs in {}", self.dir.display()))
    }

    /// Copies node `i`'s data directory to `to` (the node must be stopped).
    pub fn snapshot(&self, i: usize, to: &Path) -> Result<(), String> {
        copy_dir(&self.nodes[i].data, to)
    }

    /// Replaces node `i`'s data directory with `from` (the node must be stopped); an
    /// absent `from` leaves it empty.
    pub fn restore(&self, i: usize, from: Option<&Path>) -> Result<(), String> {
        let data = &self.nodes[i].data;
        if data.exists() {
            std::fs::remove_dir_all(data).map_err(|e| format!("{}: {e}", data.display()))?;
        }
        match from {
            Some(from) => copy_dir(from, data),
            None => Ok(()),
        }
    }

    /// Bytes through every peer-link proxy so far.
    pub fn link_bytes(&self) -> u64 {
        self.proxies.values().map(|p| p.bytes()).sum()
    }

    pub fn admin(&self, i: usize, request: &AdminRequest) -> Result<AdminReply, String> {
        call(&self.nodes[i].admin, request)
    }
}

impl Drop for BenchCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    let err = |e: std::io::Error| format!("copy {} -> {}: {e}", from.display(), to.display());
    std::fs::create_dir_all(to).map_err(err)?;
    for entry in std::fs::read_dir(from).map_err(err)? {
        let entry = entry.map_err(err)?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type().map_err(err)?;
        if kind.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if std::os::unix::fs::FileTypeExt::is_socket(&kind) {
            // The admin socket belongs to the running node, not to its data.
        } else {
            std::fs::copy(entry.path(), target).map_err(err)?;
        }
    }
    Ok(())
}

/// One admin request over a fresh connection.
pub fn call(addr: &AdminAddr, request: &AdminRequest) -> Result<AdminReply, String> {
    tandem_node::admin::call_blocking(addr, request, Duration::from_secs(60))
}
