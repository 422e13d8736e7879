//! `tandem-bench`: tandem's costs on real nodes (throughput, latency, bytes per change,
//! resynchronisation by mailbox size), the simulator's speed, and Dovecot's dsync on
//! the same messages in the same run; writes BENCHMARKS.md and its plots.

mod cluster;
mod dovecot_lmtp;
mod dsync;
mod laptop;
mod lmtp;
mod noop;
mod plot;
mod proxy;
mod rename;
mod report;
mod scenarios;
mod speed;
mod store;

use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

#[derive(Parser)]
#[command(name = "tandem-bench", about = "tandem benchmarks, side by side with dsync; writes BENCHMARKS.md")]
struct Args {
    /// Mailbox sizes for the resynchronisation curves.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    sizes: Vec<usize>,
    /// Runs per resynchronisation figure (the median is reported); dsync uses the same.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Messages per throughput measurement.
    #[arg(long, default_value_t = 2000)]
    throughput_messages: usize,
    /// Changes per bytes-on-the-wire measurement.
    #[arg(long, default_value_t = 500)]
    wire_changes: usize,
    /// Simulated seconds of load per simulator figure.
    #[arg(long, default_value_t = 120)]
    sim_load_s: u64,
    /// Skip Dovecot's dsync (needs root and dovecot-core 2.3).
    #[arg(long)]
    no_dsync: bool,
    /// Only these parts (sim, throughput, wire, resync; or the extras store, noop, laptop,
    /// record, lmtp, rename), for working on one of them.
    #[arg(long, value_delimiter = ',', default_value = "sim,throughput,wire,resync")]
    parts: Vec<String>,
    /// Where both systems keep their stores (tmpfs by default, as dsync's script).
    #[arg(long, default_value = "/dev/shm")]
    bench_dir: PathBuf,
    /// The workspace root: BENCHMARKS.md, bench/plots/, target/criterion are under it.
    #[arg(long)]
    workspace: Option<PathBuf>,
    /// The "store" part: recipients of one LMTP message, and its size in MiB.
    #[arg(long, default_value_t = 1000)]
    store_recipients: usize,
    #[arg(long, default_value_t = 1)]
    store_body_mib: usize,
    /// Message counts for the "store" part's restart and memory figures.
    #[arg(long, value_delimiter = ',', default_value = "100000,300000,1000000")]
    store_counts: Vec<usize>,
    /// Also run the "store" and "noop" parts with this `tandem` binary (an earlier
    /// build), beside this one.
    #[arg(long)]
    baseline_tandem: Option<PathBuf>,
    /// The "noop" part: messages in the selected mailbox, and NOOPs timed.
    #[arg(long, default_value_t = 100_000)]
    noop_messages: usize,
    #[arg(long, default_value_t = 2000)]
    noops: usize,
    /// The "laptop" part: the slow link's latency, each way, in ms.
    #[arg(long, default_value_t = 750)]
    laptop_one_way_ms: u64,
    /// The "rename" part: RENAMEs timed per granularity.
    #[arg(long, default_value_t = 200)]
    renames: usize,
    /// Keep the benchmark directory afterwards.
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn say(what: &str) {
    eprintln!("[tandem-bench] {what}");
}

fn machine(bench_dir: &Path) -> String {
    let read = |cmd: &str, args: &[&str]| {
        Command::new(cmd).args(args).output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!(
        "{} cores ({cpu}), {mem_gib:.0} GiB, kernel {}, stores on {} ({}), {}; dovecot {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        read("uname", &["-r"]).unwrap_or_default(),
        bench_dir.display(),
        read("stat", &["-f", "-c", "%T", &bench_dir.to_string_lossy()]).unwrap_or_default(),
        read("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
        read("dovecot", &["--version"]).filter(|v| !v.is_empty()).unwrap_or("not installed".into()),
    )
}

fn run(args: &Args) -> Result<(), String> {
    let workspace = match &args.workspace {
        Some(w) => w.clone(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
    };
    let anchors = workspace.join("../shared/anchors/dsync");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let tandem = exe.with_file_name("tandem");
    if !tandem.exists() {
        return Err(format!("{} not found: build it first (cargo build --release -p tandem-node)", tandem.display()));
    }
    let root = tempfile::Builder::new()
        .prefix("tandem-bench.")
        .tempdir_in(&args.bench_dir)
        .map_err(|e| format!("{}: {e}", args.bench_dir.display()))?;
    say(&format!("working in {}", root.path().display()));
    let result = measure_and_report(args, &workspace, &anchors, &tandem, root.path());
    if args.keep || result.is_err() {
        let kept = root.keep();
        say(&format!("kept {}", kept.display()));
    }
    result
}

fn measure_and_report(args: &Args, workspace: &Path, anchors: &Path, tandem: &Path, root: &Path) -> Result<(), String> {
    if args.parts.iter().any(|p| p == "store") {
        say("one message to many recipients");
        let mut rows = Vec::new();
        let builds = args.baseline_tandem.iter().map(|b| ("baseline", b.as_path())).chain([("this build", tandem)]);
        for (build, binary) in builds {
            let row = store::recipients(build, binary, root, args.store_recipients, args.store_body_mib)?;
            say(&format!("  {row:?}"));
            rows.push(row);
        }
        let mut restarts = Vec::new();
        for count in &args.store_counts {
            say(&format!("restart with {count} messages"));
            let row = store::restart(tandem, root, *count, args.keep)?;
            say(&format!("  {row:?}"));
            restarts.push(row);
        }
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let mut section = store::markdown(&rows, &command) + &store::restart_markdown(&restarts);
        if restarts.len() >= 2 {
            for (file, caption) in store::restart_plots(&restarts, &workspace.join("bench/plots"))? {
                section.push_str(&format!("\n![{caption}](bench/plots/{file})\n"));
            }
        }
        store::splice(&workspace.join("BENCHMARKS.md"), &section)?;
    }
    if args.parts.iter().any(|p| p == "noop") {
        say("NOOP latency on a large mailbox");
        let builds: Vec<(&str, &Path)> =
            args.baseline_tandem.iter().map(|b| ("baseline", b.as_path())).chain([("this build", tandem)]).collect();
        let rows = noop::noop_latency(&builds, root, args.noop_messages, args.noops)?;
        for row in &rows {
            say(&format!("  {row:?}"));
        }
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        store::splice_marked(&workspace.join("BENCHMARKS.md"), "noop", &noop::markdown(&rows, &command))?;
    }
    if args.parts.iter().any(|p| p == "laptop") {
        let one_way = std::time::Duration::from_millis(args.laptop_one_way_ms);
        say(&format!("a laptop's day apart over a link of {} ms each way", one_way.as_millis()));
        let genmail = anchors.join("genmail.py");
        let eml = root.join("laptop-mail");
        for (count, tag) in [(laptop::BASE, "m"), (laptop::SERVER_NEW + laptop::LAPTOP_NEW, "day")] {
            generate_eml(&genmail, &eml.join(tag), count, tag)?;
        }
        let base = scenarios::read_messages(&eml.join("m"))?;
        let day = scenarios::read_messages(&eml.join("day"))?;
        let mut rows = vec![laptop::tandem(tandem, root, &base, &day, one_way)?];
        say(&format!("  {:?}", rows[0]));
        if !args.no_dsync {
            rows.push(laptop::dsync(root, &genmail, &day, one_way)?);
            say(&format!("  {:?}", rows[1]));
            rows.push(laptop::mbsync(root, &genmail, &day, one_way)?);
            say(&format!("  {:?}", rows[2]));
        }
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        store::splice_marked(&workspace.join("BENCHMARKS.md"), "laptop", &laptop::markdown(&rows, one_way, &command))?;
    }
    if args.parts.iter().any(|p| p == "rename") {
        say("RENAME latency by master granularity");
        let rows = rename::rename_latency(tandem, root, args.renames)?;
        for row in &rows {
            say(&format!("  {row:?}"));
        }
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        store::splice_marked(&workspace.join("BENCHMARKS.md"), "rename", &rename::markdown(&rows, &command))?;
    }
    let standard = ["sim", "throughput", "wire", "resync"];
    let only_extras = !args.parts.iter().any(|p| standard.contains(&p.as_str()));
    if only_extras && !args.parts.iter().any(|p| p == "lmtp" || p == "record") {
        return Ok(());
    }
    let max_size = args.sizes.iter().copied().max().unwrap_or(0);

    say(&format!("generating {max_size} messages and 1,000 arrivals (genmail.py, as dsync's script does)"));
    let genmail = anchors.join("genmail.py");
    for (dir, count, tag) in [("mail", max_size.max(2100), "m"), ("arrivals", 1000, "append")] {
        generate_eml(&genmail, &root.join(dir), count, tag)?;
    }
    let messages = scenarios::read_messages(&root.join("mail"))?;
    let arrivals = scenarios::read_messages(&root.join("arrivals"))?;
    let mut ctx = scenarios::Ctx::new(root.join("tandem"), tandem.to_path_buf(), messages, arrivals, args.runs);

    if args.parts.iter().any(|p| p == "record") {
        // Recording's overhead: the same delivery with recording off, on without bodies
        // and on with bodies, in rounds, so that drift on a noisy machine hits all three.
        say("LMTP delivery with each node recording its core's inputs ([record]) and without");
        let mut rows: std::collections::BTreeMap<&str, Vec<scenarios::ThroughputRow>> = Default::default();
        for round in 1..=args.runs.max(1) {
            for (name, record) in [("off", None), ("on, no bodies", Some(false)), ("on, bodies", Some(true))] {
                let row = scenarios::throughput_recorded(&mut ctx, "sync", 1, args.throughput_messages, record)?;
                say(&format!("  round {round} recording {name}: {row:?}"));
                rows.entry(name).or_default().push(row);
            }
        }
        let median = |rows: &[scenarios::ThroughputRow], f: fn(&scenarios::ThroughputRow) -> f64| {
            let mut v: Vec<f64> = rows.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let off = median(&rows["off"], |r| r.per_s);
        for (name, rows) in &rows {
            say(&format!(
                "  recording {name}: median {:.0}/s ({:.3} of off), p50 {:.2} ms, p99 {:.2} ms",
                median(rows, |r| r.per_s),
                median(rows, |r| r.per_s) / off,
                median(rows, |r| r.p50_ms),
                median(rows, |r| r.p99_ms)
            ));
        }
    }
    if args.parts.iter().any(|p| p == "lmtp") {
        say("LMTP delivery beside a single Dovecot 2.3 LMTP server");
        let row = scenarios::throughput(&mut ctx, "sync", 1, args.throughput_messages)?;
        say(&format!("  tandem 3 nodes sync replicas=1: {row:?}"));
        let dovecot = dovecot_lmtp::throughput(
            &root.join("dovecot-lmtp"),
            &ctx.messages,
            args.throughput_messages,
            ctx.connections,
        )?;
        say(&format!("  dovecot: {dovecot:?}"));
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let fs = Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(&args.bench_dir)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let section = format!(
            "## LMTP delivery beside Dovecot ({fs})\n\n\
             The same {} messages (genmail.py) over {} LMTP connections, after 50 of warm-up, \
             on {} ({fs}): tandem as a 3-node cluster (sync, replicas=1, delivered to the \
             INBOX's master), Dovecot 2.3 as one LMTP server writing Maildir.\n\n\
             Command: `{command}`\n\n\
             | server | delivered | per s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|\n\
             | tandem, 3 nodes, sync, replicas=1 | {} | {:.0} | {:.2} | {:.2} |\n\
             | Dovecot 2.3, one server | {} | {:.0} | {:.2} | {:.2} |\n",
            args.throughput_messages,
            ctx.connections,
            args.bench_dir.display(),
            row.messages,
            row.per_s,
            row.p50_ms,
            row.p99_ms,
            dovecot.0,
            dovecot.1,
            dovecot.2,
            dovecot.3,
        );
        // One block for tmpfs and one for a real disk, where fsync costs what it costs.
        let block = if fs == "tmpfs" { "lmtp-tmpfs" } else { "lmtp-disk" };
        store::splice_marked(&workspace.join("BENCHMARKS.md"), block, &section)?;
        if only_extras {
            return Ok(());
        }
    }
    if only_extras {
        return Ok(());
    }

    say("simulator speed");
    let mut sim = Vec::new();
    let part = |name: &str| args.parts.iter().any(|p| p == name);
    for servers in [3, 5, 10, 30].into_iter().filter(|_| part("sim")) {
        let row = speed::simulator(servers, args.sim_load_s)?;
        say(&format!("  {servers} servers: {:.0} simulated s per wall s", row.sim_s_per_wall_s()));
        sim.push(row);
    }
    let codec = speed::codec_from_criterion(&workspace.join("target/criterion"));

    say("delivery throughput and latency");
    let mut throughput = Vec::new();
    for mode in ["sync", "async"].into_iter().filter(|_| part("throughput")) {
        for replicas in [0, 1, 2] {
            let row = scenarios::throughput(&mut ctx, mode, replicas, args.throughput_messages)?;
            say(&format!(
                "  {mode} replicas={replicas}: {:.0}/s p50 {:.2} ms p99 {:.2} ms",
                row.per_s, row.p50_ms, row.p99_ms
            ));
            throughput.push(row);
        }
    }

    say("bytes per change");
    let mut wire = Vec::new();
    for compression in [true, false].into_iter().filter(|_| part("wire")) {
        let row = scenarios::wire_bytes(&mut ctx, compression, args.wire_changes)?;
        say(&format!("  {row:?}"));
        wire.push(row);
    }

    let mut sizes = Vec::new();
    for size in args.sizes.iter().filter(|_| part("resync")) {
        say(&format!("resynchronisation, {size} messages"));
        let row = scenarios::by_size(&mut ctx, *size, true)?;
        say(&format!("  {row:?}"));
        sizes.push(row);
    }
    let mut sizes_plain = Vec::new();
    if part("resync") && args.sizes.contains(&10_000) {
        say("resynchronisation, 10000 messages, no DEFLATE");
        sizes_plain.push(scenarios::by_size(&mut ctx, 10_000, false)?);
    }

    let (dsync, dsync_results_dir) = if args.no_dsync {
        (None, None)
    } else {
        say("dsync (../shared/anchors/dsync/bench.sh)");
        let results = root.join("dsync-results");
        let parsed = dsync::run(&anchors.join("bench.sh"), &results, &args.bench_dir, args.runs)?;
        let kept = workspace.join("bench/dsync-results");
        let _ = std::fs::remove_dir_all(&kept);
        copy_files(&results, &kept)?;
        (Some(parsed), Some("bench/dsync-results/".to_string()))
    };

    let results = report::Results {
        machine: machine(&args.bench_dir),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        sim,
        codec,
        throughput,
        wire,
        sizes,
        sizes_plain,
        dsync,
        dsync_results_dir,
    };
    let plots = results.plots(&workspace.join("bench/plots"))?;
    let links: Vec<(String, String)> = plots.iter().map(|(f, c)| (format!("bench/plots/{f}"), c.clone())).collect();
    let refs: Vec<(&str, &str)> = links.iter().map(|(f, c)| (f.as_str(), c.as_str())).collect();
    let out = workspace.join("BENCHMARKS.md");
    let md = keep_imaptest_section(&out, results.markdown(&refs));
    std::fs::write(&out, &md).map_err(|e| format!("{}: {e}", out.display()))?;
    say(&format!("wrote {}", out.display()));
    print!("{md}");
    Ok(())
}

/// Sections other runs wrote (between their markers) are kept when the other
/// benchmarks are rerun: `bench/imaptest --write`'s table, the "store" part's, and
/// `bench/fetch-memory`'s, the NOOP part's and `bench/migrate --write`'s.
/// `count` messages as .eml files in `dir` by the anchor's generator (as dsync's script
/// makes them), their Message-IDs tagged `tag`.
fn generate_eml(genmail: &Path, dir: &Path, count: usize, tag: &str) -> Result<(), String> {
    let status = Command::new("python3")
        .arg(genmail)
        .args(["eml", &dir.to_string_lossy(), &count.to_string(), "--tag", tag])
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("{}: {e}", genmail.display()))?;
    if !status.success() {
        return Err(format!("genmail.py failed: {status}"));
    }
    Ok(())
}

fn keep_imaptest_section(path: &Path, md: String) -> String {
    const MARKERS: [(&str, &str); 8] = [
        ("<!-- imaptest:begin", "<!-- imaptest:end -->"),
        ("<!-- store:start -->", "<!-- store:end -->"),
        ("<!-- fetch:start -->", "<!-- fetch:end -->"),
        ("<!-- lmtp-tmpfs:start -->", "<!-- lmtp-tmpfs:end -->"),
        ("<!-- lmtp-disk:start -->", "<!-- lmtp-disk:end -->"),
        ("<!-- noop:start -->", "<!-- noop:end -->"),
        ("<!-- migrate:start -->", "<!-- migrate:end -->"),
        ("<!-- laptop:start -->", "<!-- laptop:end -->"),
    ];
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = md;
    for (begin_marker, end_marker) in MARKERS {
        if let (Some(begin), Some(end)) = (old.find(begin_marker), old.find(end_marker))
            && begin < end
        {
            out = format!("{}\n\n{}\n", out.trim_end(), &old[begin..end + end_marker.len()]);
        }
    }
    out
}

fn copy_files(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for entry in std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(entry.path(), to.join(entry.file_name())).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
