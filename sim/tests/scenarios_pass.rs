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
