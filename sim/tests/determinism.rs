//! Same seed, same run: every scenario run twice gives the same trace hash, and another
//! seed gives another run.

use std::path::PathBuf;
use tandem_sim::{RunOptions, run, scenario};

fn scenarios() -> Vec<scenario::Scenario> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let files = scenario::files_in(&dir).expect("scenarios directory");
    files.iter().map(|f| scenario::load(f).expect("scenario parses")).collect()
}

#[test]
fn every_scenario_runs_the_same_twice() {
    let all = scenarios();
    assert!(all.len() >= 5, "expected the seed scenarios");
    for s in all.iter().filter(|s| s.cluster.servers.len() <= 10) {
        let opts = RunOptions::default();
        let a = run(s, &opts);
        let b = run(s, &opts);
        assert_eq!(a.trace_hash, b.trace_hash, "{} is not deterministic", s.name);
        assert_eq!(a.messages, b.messages, "{}", s.name);
        assert_eq!(a.sim_time_us, b.sim_time_us, "{}", s.name);
    }
}

#[test]
fn another_seed_gives_another_run() {
    let all = scenarios();
    let s = all.iter().find(|s| s.name.contains("uid-conflict")).expect("the seed's UID conflict scenario");
    let a = run(s, &RunOptions { seed: Some(1), ..Default::default() });
    let b = run(s, &RunOptions { seed: Some(2), ..Default::default() });
    assert_ne!(a.trace_hash, b.trace_hash);
}

#[test]
fn the_wire_switch_changes_nothing_but_bytes() {
    let all = scenarios();
    for s in all.iter().filter(|s| s.cluster.servers.len() <= 6).take(6) {
        let plain = run(s, &RunOptions::default());
        let wire = run(s, &RunOptions { wire: true, ..Default::default() });
        assert!(wire.wire_bytes > 0, "{}", s.name);
        assert_eq!(plain.trace_hash, wire.trace_hash, "{}: the codec changed behaviour", s.name);
    }
}
