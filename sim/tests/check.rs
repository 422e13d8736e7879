//! `tandem-sim check` on the real core: a small configuration is explored to the end and
//! nothing is found.

#[test]
fn the_checker_exhausts_a_small_cluster_and_finds_nothing_on_the_real_core() {
    let opts = tandem_sim::check::CheckOptions {
        servers: 2,
        ops: 2,
        faults: 0,
        depth_max: 200,
        states_max: 100_000,
        bug: None,
        scenario: None,
        deviations_max: None,
    };
    let report = tandem_sim::check::check(&opts).expect("check runs");
    assert!(report.exhausted, "2 servers and 2 ops fit the bound: {report:?}");
    assert!(report.states > 100 && report.ends_checked > 0, "{report:?}");
    assert!(report.violation.is_none(), "{:?}", report.violation.map(|v| v.0));
}

fn scenario(name: &str) -> tandem_sim::scenario::Scenario {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/check").join(format!("{name}.toml"));
    tandem_sim::scenario::load(&path).expect("check scenario")
}

/// `check` finds a broken variant within a stated bound, with a counterexample that
/// `run` replays to the same failure and that passes on the real core. The bounds
/// (README's check table) are the states each needed on 2026-12-03, with room.
fn finds(bug: tandem_core::Bug, on: Option<&str>, states_max: u64) {
    finds_within(bug, on, 200, None, states_max);
}

/// `finds`, exploring only the orders that depart from time order at most
/// `deviations` times, to `depth` steps: how `check` reaches bugs deep in a run.
fn finds_within(bug: tandem_core::Bug, on: Option<&str>, depth: usize, deviations: Option<usize>, states_max: u64) {
    let opts = tandem_sim::check::CheckOptions {
        servers: 2,
        ops: 1,
        faults: 0,
        depth_max: depth,
        states_max,
        bug: Some(bug),
        scenario: on.map(scenario),
        deviations_max: deviations,
    };
    let report = tandem_sim::check::check(&opts).expect("check runs");
    let Some((why, counterexample)) = report.violation else {
        panic!("{}: nothing found in {} states: {report:?}", bug.name(), report.states)
    };
    let with_bug = tandem_sim::RunOptions { bug: Some(bug), ..Default::default() };
    let again = tandem_sim::run(&counterexample, &with_bug);
    assert!(!again.passed, "{}: the counterexample replays to a failure ({why})", bug.name());
    let fixed = tandem_sim::run(&counterexample, &tandem_sim::RunOptions::default());
    assert!(fixed.passed, "{}: the counterexample passes on the real core: {:?}", bug.name(), fixed.failures);
    println!("{}: {} states, {} steps: {why}", bug.name(), report.states, counterexample.schedule.len() - 1);
}

#[test]
fn check_finds_an_ack_before_a_replica_is_durable() {
    finds(tandem_core::Bug::AckBeforeReplicaDurable, None, 1_000);
}

#[test]
fn check_finds_a_uid_reused_after_renumbering() {
    finds(tandem_core::Bug::ReuseUidAfterRenumber, Some("uid-conflict"), 20_000);
}

#[test]
fn check_finds_whole_flag_sets_merged() {
    finds(tandem_core::Bug::WholeFlagSets, Some("flags"), 40_000);
}

#[test]
fn check_finds_a_fresh_read_without_its_barrier() {
    finds(tandem_core::Bug::FreshReadWithoutBarrier, Some("fresh-read"), 20_000);
}

#[test]
fn check_finds_a_replica_overwriting_a_uid() {
    finds(tandem_core::Bug::ReplicaOverwritesUid, Some("uid-conflict"), 40_000);
}

#[test]
fn check_finds_a_retried_delivery_stored_twice_one_departure_from_time_order_away() {
    finds_within(tandem_core::Bug::StoreRetriesTwice, Some("deep/retry-after-crash"), 400, Some(1), 20_000);
}

#[test]
fn check_finds_a_cancel_that_loses_a_claimed_save() {
    finds_within(tandem_core::Bug::CancelClaimedSaves, Some("deep/cancel-after-retry"), 60, Some(1), 5_000);
}

/// With no departure allowed, `check` runs time order only: the retry bug needs one.
#[test]
fn a_check_without_departures_follows_time_order_only() {
    let report = check_deep(tandem_core::Bug::StoreRetriesTwice, "deep/retry-after-crash", 0, 20_000);
    assert!(report.exhausted && report.violation.is_none(), "{report:?}");
    assert!(report.states < 1_000, "one order, one state per step: {report:?}");
}

/// `deep/tombstones-after-crash` is where `check` found collect-tombstones-early (a
/// crashed server's copy of a binding collected without its confirmation came back at a
/// new UID, in 367 steps). Servers now tell a copy of a binding they collected lately to
/// go (`Server::tell_collected`), which repairs that early collection too: with the bug,
/// every order within one departure from time order passes. Without the telling this
/// finds the counterexample again (`scenarios/check/found/collect-tombstones-early.toml`);
/// the explorer still finds the variant where no server remembers the collection
/// (`broken_variants.rs`).
#[test]
fn an_early_collection_is_repaired_by_what_the_servers_remember_in_every_order() {
    let report = check_deep(tandem_core::Bug::CollectTombstonesEarly, "deep/tombstones-after-crash", 1, 40_000);
    assert!(report.exhausted && report.violation.is_none(), "{:?}", report.violation.map(|v| v.0));
    assert!(report.states > 1_000 && report.ends_checked > 0, "{report:?}");
}

/// `check` of a deep scenario (to 400 steps) with `bug`, within `deviations` departures
/// from time order and `states_max` states.
fn check_deep(bug: tandem_core::Bug, name: &str, deviations: usize, states_max: u64) -> tandem_sim::check::CheckReport {
    let opts = tandem_sim::check::CheckOptions {
        servers: 2,
        ops: 1,
        faults: 0,
        depth_max: 400,
        states_max,
        bug: Some(bug),
        scenario: Some(scenario(name)),
        deviations_max: Some(deviations),
    };
    tandem_sim::check::check(&opts).expect("check runs")
}
