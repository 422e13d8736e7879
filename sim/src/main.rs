//! `tandem-sim`: runs scenario files in the deterministic simulator.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tandem_core::Bug;
use tandem_sim::explore::{self, ExploreOptions};
use tandem_sim::focus::Focus;
use tandem_sim::scenario::{self, Scenario};
use tandem_sim::scenario_write::to_toml;
use tandem_sim::shrink::{ShrinkBudget, shrink};
use tandem_sim::{RunOptions, run};

// The simulator allocates and frees small objects at nearly every step (messages,
// records, merge outcomes); mimalloc serves those faster than the system allocator
// (BENCHMARKS.md, "Simulator speed").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tandem-sim", about = "Deterministic simulator of a tandem cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenario files (a file, or every .toml file in a directory).
    Run {
        paths: Vec<PathBuf>,
        /// Print a readable timeline of every run.
        #[arg(long)]
        trace: bool,
        /// Override every file's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Pass every peer message through the wire codec.
        #[arg(long)]
        wire: bool,
        /// Print how many peer messages of each kind every run sent.
        #[arg(long)]
        stats: bool,
        /// Run a deliberately broken variant of the core (build with --features broken).
        #[arg(long, value_parser = parse_bug)]
        bug: Option<Bug>,
    },
    /// Run generated seeds (each its own cluster, workload and faults), report failing
    /// seeds and coverage marks, and shrink failures to scenario files.
    Explore {
        #[arg(long, default_value_t = 1000)]
        seeds: u64,
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Stop after this many seconds.
        #[arg(long)]
        time_budget: Option<u64>,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Failing seeds to shrink and write to --out.
        #[arg(long, default_value_t = 3)]
        shrink: usize,
        #[arg(long, default_value = "explore-failures")]
        out: PathBuf,
        #[arg(long, value_parser = parse_bug)]
        bug: Option<Bug>,
        /// Seeds of a focused generator: move-back, laptop, partial, leave, rename, conflict,
        /// import, slow, minority, incarnation, edit, restore, replace or late-restore (see
        /// `tandem_sim::focus`).
        #[arg(long, value_parser = parse_focus)]
        focus: Option<Focus>,
    },
    /// Explore every order of events for a small cluster (breadth first, each state
    /// once) and check the invariants in every state; the first violation is written as
    /// a scenario file with the schedule that reaches it in the fewest steps.
    Check {
        #[arg(long, default_value_t = 2)]
        servers: usize,
        #[arg(long, default_value_t = 2)]
        ops: usize,
        #[arg(long, default_value_t = 0)]
        faults: usize,
        /// Steps explored from the start at most.
        #[arg(long, default_value_t = 40)]
        depth: usize,
        /// States explored at most.
        #[arg(long, default_value_t = 20_000)]
        states: u64,
        #[arg(long, value_parser = parse_bug)]
        bug: Option<Bug>,
        /// Where to write a counterexample.
        #[arg(long, default_value = "check-failures")]
        out: PathBuf,
        /// Explore this scenario's events (its client operations and its faults, each
        /// stream in its order) instead of the menus; --servers, --ops and --faults are
        /// then taken from the file.
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Only orders that depart from time order at most this many times (reaches
        /// deep into a run: retries, timeouts; default: every order).
        #[arg(long)]
        deviations: Option<usize>,
    },
    /// Replay node recordings (`[record]` in a node's configuration) through this core
    /// and check that it asks for the same outputs after every input.
    Replay {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Replay a recording made by another core build (to see where they differ).
        #[arg(long)]
        any_build: bool,
        /// Instead of checking the outputs, turn the recordings of one incident (every
        /// node's files) into a scenario file written here, run it, and shrink it if it
        /// fails.
        #[arg(long, value_name = "OUT.toml")]
        to_scenario: Option<PathBuf>,
    },
    /// Shrink a failing explore seed, or a failing scenario file (such as one
    /// `replay --to-scenario` made), to a minimal scenario file.
    Shrink {
        #[arg(long, required_unless_present = "scenario", conflicts_with = "scenario")]
        seed: Option<u64>,
        #[arg(long)]
        scenario: Option<PathBuf>,
        #[arg(long, value_parser = parse_bug)]
        bug: Option<Bug>,
        /// The seed is a focused generator's (see `explore --focus`).
        #[arg(long, value_parser = parse_focus)]
        focus: Option<Focus>,
        /// Where to write the scenario (default: shrunk-seed-N.toml).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn parse_focus(name: &str) -> Result<Focus, String> {
    Focus::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Focus::ALL.iter().map(|f| f.name()).collect();
        format!("unknown focus {name:?}; one of {}", names.join(", "))
    })
}

fn parse_bug(name: &str) -> Result<Bug, String> {
    Bug::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Bug::ALL.iter().map(|b| b.name()).collect();
        format!("unknown bug {name:?}; one of {}", names.join(", "))
    })
}

/// Shrinks `seed`'s failure and writes the scenario; returns the path and event count.
fn shrink_seed(
    seed: u64,
    bug: Option<Bug>,
    focus: Option<Focus>,
    out: &Path,
) -> Result<(PathBuf, usize, String), String> {
    let scenario = explore::scenario_of(seed, focus);
    let opts = RunOptions { bug, ..Default::default() };
    let Some((small, broken)) = shrink(&scenario, &opts, &ShrinkBudget::default()) else {
        return Err(format!("seed {seed} passes: nothing to shrink"));
    };
    let mut small = small;
    let (prefix, focus_arg) = match focus {
        Some(f) => (format!("focus-{}-", f.name()), format!(" --focus {}", f.name())),
        None => (String::new(), String::new()),
    };
    small.name = format!("shrunk-{prefix}seed-{seed}");
    let bug_line =
        bug.map(|b| format!("\nrun with: tandem-sim run --bug {} <this file>", b.name())).unwrap_or_default();
    let comment = format!(
        "Shrunk by `tandem-sim shrink --seed {seed}{focus_arg}` from explore seed {seed} ({} events -> {}).\nIt breaks invariant {broken}.{bug_line}",
        scenario.events.len(),
        small.events.len()
    );
    let text = to_toml(&small, &comment.replace("\\n", "\n"));
    let path = if out.extension().is_some_and(|x| x == "toml") {
        out.to_path_buf()
    } else {
        out.join(format!("shrunk-{prefix}seed-{seed}.toml"))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path, small.events.len(), broken))
}

/// Runs a replay: a core fed a damaged recording may trip its own assertions (it trusts
/// its driver, which the file stands in for), which is reported as an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(format!("the core refused an input of the recording (damaged, or from another build): {why}"))
    })
}

/// `replay --to-scenario`: writes the incident's scenario to `out`, runs it, and if it
/// fails writes the shrunk failure next to it. Whether it passed.
fn incident_to_scenario(files: &[PathBuf], out: &Path, any_build: bool) -> Result<bool, String> {
    let recordings = files.iter().map(|f| tandem_sim::replay::load(f)).collect::<Result<Vec<_>, _>>()?;
    let name = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "incident".into());
    let conversion = guarded(|| tandem_sim::incident::to_scenario(&recordings, &name, any_build))?;
    let sources: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let text = tandem_sim::incident::to_toml(&conversion, &sources);
    std::fs::write(out, &text).map_err(|e| format!("{}: {e}", out.display()))?;
    for note in &conversion.notes {
        tandem_sim::say!("note: {note}");
    }
    // Run what the file says (as `run` will), not the value it was written from.
    let scenario = load(out)?;
    let opts = RunOptions::default();
    let report = tandem_sim::run(&scenario, &opts);
    let s = &conversion.scenario;
    tandem_sim::say!(
        "wrote {}: {} servers, {} events, {} expectations",
        out.display(),
        s.cluster.servers.len(),
        s.events.len(),
        s.expects.len()
    );
    if report.passed {
        tandem_sim::say!("pass: the simulator runs the incident to what the real cluster held");
        return Ok(true);
    }
    tandem_sim::say!("FAIL: {}", report.failures.join("; "));
    let shrunk = out.with_extension("shrunk.toml");
    match shrink_file(out, None, &shrunk)? {
        Some((n, why)) => tandem_sim::say!("shrunk to {n} events ({why}): {}", shrunk.display()),
        None => tandem_sim::say!("it passed when run again: nothing to shrink"),
    }
    Ok(false)
}

/// Shrinks a failing scenario file (with the broken variant `bug`, if given) into
/// `out`: the number of events left and the invariant it breaks; None if it passes.
fn shrink_file(file: &Path, bug: Option<Bug>, out: &Path) -> Result<Option<(usize, String)>, String> {
    let scenario = load(file)?;
    let opts = RunOptions { bug, ..Default::default() };
    let Some((small, why)) = shrink(&scenario, &opts, &ShrinkBudget::default()) else {
        return Ok(None);
    };
    let bug_line =
        bug.map(|b| format!("\nrun with: tandem-sim run --bug {} <this file>", b.name())).unwrap_or_default();
    let comment = format!(
        "Shrunk by `tandem-sim shrink --scenario {}` ({} events -> {}).\nIt breaks invariant {why}.{bug_line}",
        file.display(),
        scenario.events.len(),
        small.events.len()
    );
    std::fs::write(out, to_toml(&small, &comment)).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(Some((small.events.len(), why)))
}

fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(scenario::files_in(p).map_err(|e| format!("{}: {e}", p.display()))?);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

fn load(path: &Path) -> Result<Scenario, String> {
    scenario::load(path).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Explore { seeds, from, time_budget, threads, shrink, out, bug, focus } => {
            let opts = ExploreOptions {
                from,
                seeds,
                threads,
                time_budget: time_budget.map(Duration::from_secs),
                bug,
                focus,
                stop_after_failures: 0,
                progress: true,
            };
            let summary = explore::explore(&opts);
            tandem_sim::say!(
                "{} seeds in {:.1} s ({:.1} seeds/s), {} failing",
                summary.seeds_run,
                summary.elapsed.as_secs_f64(),
                summary.seeds_run as f64 / summary.elapsed.as_secs_f64().max(1e-9),
                summary.failures.len()
            );
            print!("{}", explore::mark_table(&summary));
            for f in summary.failures.iter().take(shrink) {
                match shrink_seed(f.seed, bug, focus, &out) {
                    Ok((path, n, broken)) => {
                        tandem_sim::say!("seed {} ({broken}) shrunk to {n} events: {}", f.seed, path.display())
                    }
                    Err(e) => tandem_sim::say!("seed {}: {e}", f.seed),
                }
            }
            if summary.failures.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Command::Check { servers, ops, faults, depth, states, bug, out, scenario, deviations } => {
            let given = match scenario.as_deref().map(load).transpose() {
                Ok(given) => given,
                Err(e) => {
                    eprintln!("tandem-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            let what = match (&given, &scenario) {
                (Some(s), Some(path)) => {
                    format!("{}: {} servers, {} events", path.display(), s.cluster.servers.len(), s.events.len())
                }
                _ => format!("{servers} servers, {ops} ops, {faults} faults"),
            };
            let command = match &scenario {
                Some(path) => format!("--scenario {}", path.display()),
                None => format!("--servers {servers} --ops {ops} --faults {faults}"),
            };
            let opts = tandem_sim::check::CheckOptions {
                servers,
                ops,
                faults,
                depth_max: depth,
                states_max: states,
                bug,
                scenario: given,
                deviations_max: deviations,
            };
            let report = match tandem_sim::check::check(&opts) {
                Ok(report) => report,
                Err(e) => {
                    eprintln!("tandem-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            tandem_sim::say!(
                "check: {what}{}: {} states, {} ends checked, depth {} (bound {depth}), {:.1} s, {}",
                bug.map(|b| format!(", bug {}", b.name())).unwrap_or_default(),
                report.states,
                report.ends_checked,
                report.depth_reached,
                report.elapsed_s,
                if report.violation.is_some() {
                    "stopped at the first violation"
                } else if report.exhausted {
                    "every state within the bound"
                } else {
                    "stopped at the state bound"
                }
            );
            let Some((why, s)) = report.violation else { return ExitCode::SUCCESS };
            let path = out.join(format!("{}.toml", s.name));
            let header = format!(
                "Found by `tandem-sim check {command} --depth {depth}{}{}` in {} steps.\n{why}",
                deviations.map(|d| format!(" --deviations {d}")).unwrap_or_default(),
                bug.map(|b| format!(" --bug {}", b.name())).unwrap_or_default(),
                s.schedule.len().saturating_sub(1)
            );
            let written = std::fs::create_dir_all(&out).and_then(|_| std::fs::write(&path, to_toml(&s, &header)));
            match written {
                Ok(()) => tandem_sim::say!(
                    "violation: {why}\ncounterexample ({} steps): {}",
                    s.schedule.len().saturating_sub(1),
                    path.display()
                ),
                Err(e) => eprintln!("tandem-sim: violation: {why}; writing {}: {e}", path.display()),
            }
            ExitCode::from(1)
        }
        Command::Replay { files, any_build, to_scenario: Some(out) } => {
            match incident_to_scenario(&files, &out, any_build) {
                Ok(passed) => {
                    if passed {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("tandem-sim: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Replay { files, any_build, to_scenario: None, .. } => {
            let mut failed = 0;
            for file in &files {
                let outcome = tandem_sim::replay::load(file).and_then(|recording| {
                    guarded(|| tandem_sim::replay::replay(&recording, any_build)).map(|r| (recording, r))
                });
                match outcome {
                    Err(e) => {
                        tandem_sim::say!("ERROR {}: {e}", file.display());
                        failed += 1;
                    }
                    Ok((recording, report)) => {
                        let torn = report.torn.as_deref().map(|t| format!(" (ends early: {t})")).unwrap_or_default();
                        match &report.divergence {
                            None => tandem_sim::say!(
                                "same {}: s{}, {} inputs, {} outputs{torn}",
                                file.display(),
                                recording.header.cfg.sid.0,
                                report.inputs,
                                report.outputs
                            ),
                            Some(d) => {
                                failed += 1;
                                tandem_sim::say!("DIVERGED {}: {d}{torn}", file.display());
                            }
                        }
                    }
                }
            }
            if failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
        }
        Command::Shrink { seed: None, scenario: Some(file), bug, out, .. } => {
            let out = out.unwrap_or_else(|| file.with_extension("shrunk.toml"));
            match shrink_file(&file, bug, &out) {
                Ok(Some((n, why))) => {
                    tandem_sim::say!("{} ({why}) shrunk to {n} events: {}", file.display(), out.display());
                    ExitCode::SUCCESS
                }
                Ok(None) => {
                    eprintln!("tandem-sim: {} passes: nothing to shrink", file.display());
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("tandem-sim: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Shrink { seed, bug, focus, out, .. } => {
            let seed = seed.unwrap_or(0);
            let out = out.unwrap_or_else(|| PathBuf::from("."));
            match shrink_seed(seed, bug, focus, &out) {
                Ok((path, n, broken)) => {
                    tandem_sim::say!("seed {seed} ({broken}) shrunk to {n} events: {}", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tandem-sim: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run { paths, trace, seed, wire, stats, bug } => {
            let paths = if paths.is_empty() { vec![PathBuf::from("scenarios")] } else { paths };
            let files = match collect(&paths) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("tandem-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            // The trace tail costs a formatted line per step; a failing run is run again with it
            // (runs are deterministic), as `explore` does.
            let opts = RunOptions { wire, trace, tail: false, seed, bug };
            let mut failed = 0;
            let mut passed = 0;
            for file in files {
                let scenario = match load(&file) {
                    Ok(s) => s,
                    Err(e) => {
                        tandem_sim::say!("ERROR {e}");
                        failed += 1;
                        continue;
                    }
                };
                let started = std::time::Instant::now();
                let report = run(&scenario, &opts);
                let wall = started.elapsed();
                if trace {
                    tandem_sim::say!("--- timeline of {} (seed {})", report.name, report.seed);
                    for line in &report.trace {
                        tandem_sim::say!("{line}");
                    }
                }
                let converged = report
                    .converged_after_us
                    .map(|t| format!("{:.1}s", t as f64 / 1e6))
                    .unwrap_or_else(|| "never".into());
                tandem_sim::say!(
                    "{} {:<28} seed {:<6} sim {:>8.1}s  msgs {:>8}  converged after heal {:>6}  wall {:>6.2}s",
                    if report.passed { "pass" } else { "FAIL" },
                    report.name,
                    report.seed,
                    report.sim_time_us as f64 / 1e6,
                    report.messages,
                    converged,
                    wall.as_secs_f64()
                );
                if stats {
                    let kinds: Vec<String> = report.messages_by_kind.iter().map(|(k, v)| format!("{k} {v}")).collect();
                    tandem_sim::say!("    messages: {}", kinds.join(", "));
                    tandem_sim::say!(
                        "    fsyncs: {}, of lazy writes only (acknowledged log entries): {}",
                        report.fsyncs,
                        report.fsyncs_of_lazy_writes
                    );
                }
                if report.passed {
                    passed += 1;
                } else {
                    failed += 1;
                    for f in &report.failures {
                        tandem_sim::say!("    {f}");
                    }
                    if !trace {
                        let traced = run(&scenario, &RunOptions { tail: true, ..opts.clone() });
                        tandem_sim::say!("    last events before the end (rerun with --trace for all):");
                        for line in traced.trace.iter().rev().take(40).rev() {
                            tandem_sim::say!("      {line}");
                        }
                    }
                }
            }
            tandem_sim::say!("{passed} passed, {failed} failed");
            if failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
        }
    }
}
