//! Every scenario in `scenarios/` passes, with and without the wire switch.

use std::path::PathBuf;
use tandem_sim::{RunOptions, run, scenario};

fn check_all(wire: bool) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let files = scenario::files_in(&dir).expect("scenarios directory");
    let mut failures = Vec::new();
    for f in &files {
        let s = scenario::load(f).expect("scenario parses");
        let report = run(&s, &RunOptions { wire, tail: true, ..Default::default() });
        if !report.passed {
            failures.push(format!(
                "{}: {:?}\n{}",
                s.name,
                report.failures,
                report.trace.iter().rev().take(30).rev().cloned().collect::<Vec<_>>().join("\n")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn scenarios_pass() {
    check_all(false);
}

#[test]
fn scenarios_pass_through_the_wire_codec() {
    check_all(true);
}

/// The start-up hold is what keeps a restart from renumbering: without it (a hold of 0)
/// the restarted server masters the mailbox from its stale disk, and the scenario that
/// expects no renumbering fails on exactly that.
#[test]
fn without_the_startup_hold_a_restart_renumbers() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/restart-without-renumbering.toml");
    let mut s = scenario::load(&path).expect("scenario parses");
    assert!(run(&s, &RunOptions::default()).passed);
    s.cluster.startup_hold_ms = 0;
    let report = run(&s, &RunOptions::default());
    assert!(!report.passed, "a restart without the hold did not renumber");
    assert!(
        report.failures.iter().any(|f| f.contains("uid_conflict_renumbered")),
        "the failure is the renumbering: {:?}",
        report.failures
    );
}
