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
    };
    let report = tandem_sim::check::check(&opts).expect("check runs");
    assert!(report.exhausted, "2 servers and 2 ops fit the bound: {report:?}");
    assert!(report.states > 100 && report.ends_checked > 0, "{report:?}");
    assert!(report.violation.is_none(), "{:?}", report.violation.map(|v| v.0));
}
