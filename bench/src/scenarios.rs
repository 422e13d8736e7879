//! The node benchmarks: each builds its own cluster of real `tandem` processes in a
//! fresh directory under the benchmark root (tmpfs), measures, and stops it.

use crate::cluster::{BenchCluster, MAILBOX, Setup, USER};
use crate::lmtp::{self, DeliveryRun, LmtpClient};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_node::admin::{AdminReply, AdminRequest};

pub struct Ctx {
    pub root: PathBuf,
    pub tandem: PathBuf,
    /// The mailbox content, in delivery order (genmail.py, tag "m").
    pub messages: Arc<Vec<Vec<u8>>>,
    /// Mail that arrives during an outage (genmail.py, tag "append").
    pub arrivals: Arc<Vec<Vec<u8>>>,
    pub runs: usize,
    pub connections: usize,
    next_dir: usize,
}

impl Ctx {
    pub fn new(root: PathBuf, tandem: PathBuf, messages: Vec<Vec<u8>>, arrivals: Vec<Vec<u8>>, runs: usize) -> Ctx {
        Ctx {
            root,
            tandem,
            messages: Arc::new(messages),
            arrivals: Arc::new(arrivals),
            runs: runs.max(1),
            connections: 4,
            next_dir: 0,
        }
    }

    fn fresh_dir(&mut self, name: &str) -> Result<PathBuf, String> {
        self.next_dir += 1;
        let dir = self.root.join(format!("{:02}-{name}", self.next_dir));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(dir)
    }

    fn cluster(&mut self, name: &str, setup: &Setup) -> Result<BenchCluster, String> {
        let dir = self.fresh_dir(name)?;
        BenchCluster::create(&dir, &self.tandem, setup)
    }

    fn first(&self, n: usize) -> Arc<Vec<Vec<u8>>> {
        Arc::new(self.messages.iter().take(n).cloned().collect())
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The server that masters the bench INBOX, as node `asked` knows it (0-based).
fn master_of_inbox(c: &BenchCluster, asked: usize) -> Result<usize, String> {
    let status = c.status(asked)?;
    // Keys read like "mailbox bench@example.org/INBOX" (or "user ...", by granularity).
    let key = status
        .masters
        .iter()
        .find(|(k, _)| k.contains(USER))
        .map(|(_, m)| *m)
        .or_else(|| status.mastered_here.iter().any(|k| k.contains(USER)).then_some(status.id))
        .ok_or_else(|| format!("node {} knows no master for {MAILBOX}: {status:?}", asked + 1))?;
    Ok(key as usize - 1)
}

#[derive(Clone, Debug)]
pub struct ThroughputRow {
    pub mode: &'static str,
    pub replicas: usize,
    pub messages: usize,
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// LMTP delivery of `count` messages to the INBOX master of a 3-node cluster over
/// `ctx.connections` sessions; the first 50 messages (creating the mailbox) are not timed.
pub fn throughput(ctx: &mut Ctx, mode: &'static str, replicas: usize, count: usize) -> Result<ThroughputRow, String> {
    throughput_recorded(ctx, mode, replicas, count, None)
}

/// As [`throughput`], with each node recording its core's inputs when `record` is
/// Some(bodies) (the "record" part: recording's overhead).
pub fn throughput_recorded(
    ctx: &mut Ctx,
    mode: &'static str,
    replicas: usize,
    count: usize,
    record: Option<bool>,
) -> Result<ThroughputRow, String> {
    let setup = Setup { nodes: 3, mode, replicas, compression: true, record };
    let name = match record {
        None => format!("throughput-{mode}-{replicas}"),
        Some(bodies) => format!("throughput-{mode}-{replicas}-record-{bodies}"),
    };
    let mut c = ctx.cluster(&name, &setup)?;
    for i in 0..3 {
        c.start(i)?;
    }
    c.wait_linked(&[0, 1, 2], Duration::from_secs(60))?;
    let warmup = Arc::new(ctx.messages.iter().take(50).cloned().collect::<Vec<_>>());
    lmtp::deliver_all(c.nodes[0].lmtp, USER, warmup, 1)?;
    let master = master_of_inbox(&c, 0)?;
    let batch: Arc<Vec<Vec<u8>>> = Arc::new(ctx.messages.iter().skip(50).take(count).cloned().collect());
    let DeliveryRun { delivered, wall, mut latencies } =
        lmtp::deliver_all(c.nodes[master].lmtp, USER, batch, ctx.connections)?;
    c.stop_all();
    Ok(ThroughputRow {
        mode,
        replicas,
        messages: delivered,
        per_s: delivered as f64 / wall.as_secs_f64(),
        p50_ms: ms(lmtp::quantile(&mut latencies, 0.5)),
        p99_ms: ms(lmtp::quantile(&mut latencies, 0.99)),
    })
}

#[derive(Clone, Debug)]
pub struct WireRow {
    pub compression: bool,
    pub save_bytes: f64,
    pub store_bytes: f64,
    pub expunge_bytes: f64,
    pub idle_bytes_per_s: f64,
}

/// Bytes on the one peer link of a 2-node sync cluster per replicated SAVE, STORE and
/// EXPUNGE, each done `count` times at the master, one at a time.
pub fn wire_bytes(ctx: &mut Ctx, compression: bool, count: usize) -> Result<WireRow, String> {
    let setup = Setup { nodes: 2, mode: "sync", replicas: 1, compression, record: None };
    let mut c = ctx.cluster(&format!("wire-{}", if compression { "deflate" } else { "plain" }), &setup)?;
    c.start(1)?;
    c.start(0)?;
    c.wait_linked(&[0, 1], Duration::from_secs(60))?;
    let poll = Duration::from_millis(5);
    lmtp::deliver_all(c.nodes[0].lmtp, USER, ctx.first(10), 1)?;
    c.wait_converged(&[0, 1], 10, poll, Duration::from_secs(60))?;
    let master = master_of_inbox(&c, 0)?;

    let idle_from = (c.link_bytes(), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let idle_bytes_per_s = (c.link_bytes() - idle_from.0) as f64 / idle_from.1.elapsed().as_secs_f64();

    let before = c.link_bytes();
    let batch: Arc<Vec<Vec<u8>>> = Arc::new(ctx.messages.iter().skip(10).take(count).cloned().collect());
    lmtp::deliver_all(c.nodes[master].lmtp, USER, batch, 1)?;
    let total = 10 + count as u32;
    c.wait_converged(&[0, 1], total, poll, Duration::from_secs(120))?;
    let save_bytes = (c.link_bytes() - before) as f64 / count as f64;

    let uids: Vec<u32> = (11..11 + count as u32).collect();
    let before = c.link_bytes();
    for uid in &uids {
        admin_retrying(
            &c,
            master,
            &AdminRequest::Store {
                mailbox: MAILBOX.into(),
                uids: vec![*uid],
                add: vec!["\\Flagged".into()],
                remove: vec![],
            },
        )?;
    }
    c.wait_converged(&[0, 1], total, poll, Duration::from_secs(120))?;
    let store_bytes = (c.link_bytes() - before) as f64 / count as f64;

    let before = c.link_bytes();
    for uid in &uids {
        admin_retrying(&c, master, &AdminRequest::Expunge { mailbox: MAILBOX.into(), uids: vec![*uid] })?;
    }
    c.wait_converged(&[0, 1], 10, poll, Duration::from_secs(120))?;
    let expunge_bytes = (c.link_bytes() - before) as f64 / count as f64;
    c.stop_all();
    Ok(WireRow { compression, save_bytes, store_bytes, expunge_bytes, idle_bytes_per_s })
}

/// An admin write, retried while the answer is a temporary failure.
fn admin_retrying(c: &BenchCluster, node: usize, request: &AdminRequest) -> Result<AdminReply, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.admin(node, request)? {
            AdminReply::Error { temporary: true, .. } if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            AdminReply::Error { reason, .. } => return Err(format!("{request:?}: {reason}")),
            reply => return Ok(reply),
        }
    }
}

/// One measured resynchronisation: wall time from the moment the link came up to the
/// moment both servers showed the same complete mailbox, and the bytes on the link.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncFigure {
    pub wall_ms: f64,
    pub bytes: f64,
}

fn median_figure(figures: &[SyncFigure]) -> SyncFigure {
    SyncFigure {
        wall_ms: median(figures.iter().map(|f| f.wall_ms).collect()),
        bytes: median(figures.iter().map(|f| f.bytes).collect()),
    }
}

#[derive(Clone, Debug)]
pub struct SizeRow {
    pub size: usize,
    pub load_per_s: f64,
    pub initial: SyncFigure,
    /// The initial sync timed from starting the loaded node's process, not from link-up.
    pub initial_from_start_ms: f64,
    pub flags10: SyncFigure,
    pub new100: SyncFigure,
    pub new1000: SyncFigure,
}

/// What an outage leaves behind for the returning server.
#[derive(Clone, Copy)]
enum Outage {
    FlagChanges(usize),
    NewMessages(usize),
}

/// Every cost that depends on the mailbox size, for a mailbox of `size` messages on a
/// 2-node async cluster (`compression` on the link).
pub fn by_size(ctx: &mut Ctx, size: usize, compression: bool) -> Result<SizeRow, String> {
    let setup = Setup { nodes: 2, mode: "async", replicas: 0, compression, record: None };
    let mut c = ctx.cluster(&format!("size-{size}"), &setup)?;
    let poll = Duration::from_millis(if size > 20_000 { 10 } else { 2 });
    let timeout = Duration::from_secs(600);

    // The mailbox, delivered to node 1 while it has no peers configured (so none of it
    // waits in a replication log: the second server is new), kept as a template.
    c.start_alone(0)?;
    let load = lmtp::deliver_all(c.nodes[0].lmtp, USER, ctx.first(size), ctx.connections)?;
    let load_per_s = load.delivered as f64 / load.wall.as_secs_f64();
    c.wait_converged(&[0], size as u32, poll, timeout)?;
    c.stop(0);
    let loaded = c.dir.join("template-loaded");
    c.snapshot(0, &loaded)?;

    // Initial sync to a new, empty server. The empty server starts first, so the
    // loaded one dials it at once when it comes up.
    // The largest mailboxes get one run: their figures are for the curve's shape.
    let runs = if size > 20_000 { 1 } else { ctx.runs };
    let mut initial = Vec::new();
    let mut from_start = Vec::new();
    for _ in 0..runs {
        c.restore(0, Some(&loaded))?;
        c.restore(1, None)?;
        c.start(1)?;
        let bytes_before = c.link_bytes();
        let started = Instant::now();
        c.start(0)?;
        let done = c.wait_converged(&[0, 1], size as u32, poll, timeout)?;
        let link_up = c.proxies[&(0, 1)].connected_at().ok_or("the link never came up")?;
        initial.push(SyncFigure {
            wall_ms: ms(done.saturating_duration_since(link_up)),
            bytes: (c.link_bytes() - bytes_before) as f64,
        });
        from_start.push(ms(done - started));
        c.stop_all();
    }
    let synced = [c.dir.join("template-synced-1"), c.dir.join("template-synced-2")];
    c.snapshot(0, &synced[0])?;
    c.snapshot(1, &synced[1])?;

    let mut outage = |what: Outage| -> Result<SyncFigure, String> {
        let mut figures = Vec::new();
        for _ in 0..runs {
            figures.push(after_outage(&mut c, &synced, size, what, &ctx.arrivals, poll, timeout)?);
        }
        Ok(median_figure(&figures))
    };
    let flags10 = outage(Outage::FlagChanges(10))?;
    let new100 = outage(Outage::NewMessages(100))?;
    let new1000 = outage(Outage::NewMessages(1000))?;
    Ok(SizeRow {
        size,
        load_per_s,
        initial: median_figure(&initial),
        initial_from_start_ms: median(from_start),
        flags10,
        new100,
        new1000,
    })
}

/// Both servers in sync on `size` messages; the link is cut; node 1 takes `what`; the
/// link comes back. Measures from the reconnection to convergence.
fn after_outage(
    c: &mut BenchCluster,
    synced: &[PathBuf; 2],
    size: usize,
    what: Outage,
    arrivals: &Arc<Vec<Vec<u8>>>,
    poll: Duration,
    timeout: Duration,
) -> Result<SyncFigure, String> {
    c.restore(0, Some(&synced[0]))?;
    c.restore(1, Some(&synced[1]))?;
    c.start(1)?;
    c.start(0)?;
    c.wait_converged(&[0, 1], size as u32, poll, timeout)?;
    // A cluster that has run a while: both sides have confirmed each other's copy in an
    // anti-entropy round (once a second) before the outage starts.
    std::thread::sleep(Duration::from_millis(2500));
    let link = &c.proxies[&(0, 1)];
    link.cut();
    c.wait_partitioned(0, 1, timeout)?;
    let expected = match what {
        Outage::FlagChanges(n) => {
            let step = (size / n).max(1);
            for i in 0..n {
                let uid = (1 + i * step) as u32;
                let request = AdminRequest::Store {
                    mailbox: MAILBOX.into(),
                    uids: vec![uid],
                    add: vec!["\\Flagged".into()],
                    remove: vec![],
                };
                admin_retrying(c, 0, &request)?;
            }
            size
        }
        Outage::NewMessages(n) => {
            let mut client = LmtpClient::connect(c.nodes[0].lmtp)?;
            for message in arrivals.iter().take(n) {
                lmtp::deliver_retrying(&mut client, USER, message)?;
            }
            size + n.min(arrivals.len())
        }
    };
    let link = &c.proxies[&(0, 1)];
    let bytes_before = c.link_bytes();
    let healed = Instant::now();
    link.heal();
    let done = c.wait_converged(&[0, 1], expected as u32, poll, timeout)?;
    let link_up = link.connected_at().filter(|at| *at >= healed).ok_or("the link did not come back")?;
    let figure = SyncFigure {
        wall_ms: ms(done.saturating_duration_since(link_up)),
        bytes: (c.link_bytes() - bytes_before) as f64,
    };
    c.stop_all();
    Ok(figure)
}

impl BenchCluster {
    /// Waits until node `a` no longer counts `b` as connected.
    pub fn wait_partitioned(&self, a: usize, b: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let status = self.status(a)?;
            if status.links.iter().any(|l| l.peer as usize == b + 1 && !l.connected) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(format!("node {} still linked to node {}", a + 1, b + 1))
    }
}

/// Reads the `.eml` files genmail.py wrote into `dir`, in name order.
pub fn read_messages(dir: &Path) -> Result<Vec<Vec<u8>>, String> {
    let err = |e: std::io::Error| format!("{}: {e}", dir.display());
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .collect();
    names.sort();
    names.iter().map(|p| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))).collect()
}
