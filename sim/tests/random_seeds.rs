//! The swarm scenario under many seeds. `TANDEM_SEEDS` sets how many (default 40); a
//! failure prints the seed, so `tandem-sim run --seed N scenarios/random-five-servers.toml
//! --trace` replays it.

use std::path::PathBuf;
use tandem_sim::{RunOptions, run, scenario};

#[test]
fn swarm_seeds_keep_every_invariant() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/random-five-servers.toml");
    let s = scenario::load(&path).expect("scenario parses");
    let seeds: u64 = std::env::var("TANDEM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let mut failures = Vec::new();
    for seed in 1..=seeds {
        let report = run(&s, &RunOptions { seed: Some(seed), tail: true, ..Default::default() });
        if !report.passed {
            failures.push(format!("seed {seed}: {:?}", report.failures));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
