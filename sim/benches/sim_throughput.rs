//! Simulator speed: simulated messages and simulated seconds per wall-clock second, for
//! the 30-server scenario (random workload and faults), for a 5-server cluster under
//! steady load without faults, and for 3, 10 and 30 servers under that same load. Run: `cargo bench -p tandem-sim --bench sim_throughput`
//! (`BENCH_RUNS=n` runs per line, `BENCH_FILTER=text` only the lines whose name contains it).

use std::path::PathBuf;
use std::time::Instant;
use tandem_sim::{RunOptions, run, scenario};

// The allocator the `tandem-sim` binary runs with (see its src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn measure(name: &str, s: &scenario::Scenario, runs: u64) {
    if std::env::var("BENCH_FILTER").is_ok_and(|f| !name.contains(f.as_str())) {
        return;
    }
    let mut wall = Vec::new();
    let mut messages = 0;
    let mut sim_us = 0;
    for seed in 1..=runs {
        let started = Instant::now();
        let report = run(s, &RunOptions { seed: Some(seed), ..Default::default() });
        wall.push(started.elapsed().as_secs_f64());
        assert!(report.passed, "{name} seed {seed} failed: {:?}", report.failures);
        messages += report.messages;
        sim_us += report.sim_time_us;
    }
    let total: f64 = wall.iter().sum();
    wall.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name:<34} runs {runs:>2}  median wall {:>7.3} s  sim msgs/wall s {:>10.0}  sim s/wall s {:>8.1}",
        wall[wall.len() / 2],
        messages as f64 / total,
        sim_us as f64 / 1e6 / total
    );
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let thirty = scenario::load(&dir.join("thirty-servers.toml")).expect("thirty-servers.toml");
    let steady = |servers: usize, until_ms: u64| {
        let text = format!(
            "name = \"{servers}-servers-steady\"\nsettle_ms = 60000\n[cluster]\nservers = {servers}\n\
             [[event]]\nat_ms = 500\nop = \"random_workload\"\nuntil_ms = {until_ms}\nops_per_s = 50\n\
             users = 5\nmailboxes = 3\n"
        );
        scenario::parse(&text, None).expect("steady scenario")
    };
    let runs = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    measure("thirty-servers (faults)", &thirty, runs);
    measure("five-servers-steady (no faults)", &steady(5, 120_000), runs);
    // Cluster size under the same steady load (no faults), for the cost curve.
    measure("3-servers-steady (no faults)", &steady(3, 60_000), runs);
    measure("10-servers-steady (no faults)", &steady(10, 60_000), runs);
    measure("30-servers-steady (no faults)", &steady(30, 60_000), runs);
}
