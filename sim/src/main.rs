//! `tandem-sim`: runs scenario files in the deterministic simulator.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tandem_sim::scenario::{self, Scenario};
use tandem_sim::{RunOptions, run};

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
    },
}

fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            found.sort();
            files.extend(found);
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
        Command::Run { paths, trace, seed, wire, stats } => {
            let paths = if paths.is_empty() { vec![PathBuf::from("scenarios")] } else { paths };
            let files = match collect(&paths) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("tandem-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = RunOptions { wire, trace, tail: true, seed };
            let mut failed = 0;
            let mut passed = 0;
            for file in files {
                let scenario = match load(&file) {
                    Ok(s) => s,
                    Err(e) => {
                        println!("ERROR {e}");
                        failed += 1;
                        continue;
                    }
                };
                let started = std::time::Instant::now();
                let report = run(&scenario, &opts);
                let wall = started.elapsed();
                if trace {
                    println!("--- timeline of {} (seed {})", report.name, report.seed);
                    for line in &report.trace {
                        println!("{line}");
                    }
                }
                let converged = report
                    .converged_after_us
                    .map(|t| format!("{:.1}s", t as f64 / 1e6))
                    .unwrap_or_else(|| "never".into());
                println!(
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
                    println!("    messages: {}", kinds.join(", "));
                }
                if report.passed {
                    passed += 1;
                } else {
                    failed += 1;
                    for f in &report.failures {
                        println!("    {f}");
                    }
                    if !trace {
                        println!("    last events before the end (rerun with --trace for all):");
                        for line in report.trace.iter().rev().take(40).rev() {
                            println!("      {line}");
                        }
                    }
                }
            }
            println!("{passed} passed, {failed} failed");
            if failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
        }
    }
}
