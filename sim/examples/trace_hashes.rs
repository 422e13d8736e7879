//! Prints, per explore seed, the run's trace hash and counters, to compare two builds:
//! `cargo run --release -p tandem-sim --example trace_hashes -- FROM COUNT`.

use tandem_sim::{RunOptions, explore, run};

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let from = args.first().copied().unwrap_or(1_000_000);
    let count = args.get(1).copied().unwrap_or(200);
    for seed in from..from + count {
        let scenario = explore::generate(seed);
        let r = run(&scenario, &RunOptions::default());
        println!(
            "seed {seed} hash {:016x} passed {} msgs {} steps {} sim_us {} wire {} violations {} laptops {} partial_servers {}",
            r.trace_hash,
            r.passed,
            r.messages,
            r.steps,
            r.sim_time_us,
            r.wire_bytes,
            r.violations.len(),
            scenario.cluster.laptops.len(),
            scenario.cluster.partial_servers.len()
        );
    }
}
