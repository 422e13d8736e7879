//! The scenario `replay --to-scenario` made from a real 3-node incident
//! (`scenarios/recorded-incident.toml`, from `node/tests/record_replay.rs`) holds what
//! made the incident: it passes on the real core, the UID-conflict bugs fail it, and
//! one shrinks with its bug to a few events that fail with the bug and pass without it.

use std::path::PathBuf;
use tandem_core::Bug;
use tandem_sim::RunOptions;
use tandem_sim::explore::{category, run_guarded};
use tandem_sim::scenario;
use tandem_sim::shrink::{ShrinkBudget, shrink};

fn incident() -> scenario::Scenario {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/recorded-incident.toml");
    scenario::load(&path).expect("the recorded incident's scenario")
}

#[test]
fn the_recorded_incident_passes_and_the_uid_conflict_bugs_fail_it() {
    let s = incident();
    let report = run_guarded(&s, &RunOptions::default());
    assert!(report.passed, "{:?}", report.failures);
    for bug in [Bug::ReuseUidAfterRenumber, Bug::ReplicaOverwritesUid] {
        let report = run_guarded(&s, &RunOptions { bug: Some(bug), ..Default::default() });
        assert!(!report.passed, "{} passes the recorded incident", bug.name());
    }
}

#[test]
fn the_recorded_incident_shrinks_with_its_bug() {
    std::panic::set_hook(Box::new(|_| {}));
    let opts = RunOptions { bug: Some(Bug::ReuseUidAfterRenumber), ..Default::default() };
    let (small, why) = shrink(&incident(), &opts, &ShrinkBudget::default()).expect("it fails with the bug");
    assert!(small.events.len() <= 8, "{} events: {:?}", small.events.len(), small.events);
    assert!(small.expects.iter().all(|x| matches!(x, scenario::Expect::Invariants)), "{:?}", small.expects);
    assert_eq!(category(&run_guarded(&small, &opts)).as_deref(), Some(why.as_str()));
    assert!(run_guarded(&small, &RunOptions::default()).passed, "the shrunk incident passes without the bug");
}
