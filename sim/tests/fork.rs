//! A forked world (`World::clone`, over `Server::fork`) shares nothing with the world it
//! was forked from and goes on exactly as that world does: what a model checker that
//! explores several futures of one state relies on.

use std::path::PathBuf;
use tandem_core::Instant;
use tandem_sim::world::World;
use tandem_sim::{RunOptions, explore, scenario};

fn fork_halfway_and_compare(s: &scenario::Scenario) {
    let opts = RunOptions::default();
    let mut world = World::new(s, &opts);
    let Some(end) = world.start() else { panic!("{} does not start", s.name) };
    world.run_until(Instant(end.0 / 2));
    let fork = world.clone();
    assert_eq!(world.server_digests(), fork.server_digests(), "{}: a fork starts in the same state", s.name);
    let at_fork = fork.server_digests();
    world.run_until(end);
    assert_eq!(fork.server_digests(), at_fork, "{}: running the world changed its fork", s.name);
    assert_ne!(world.server_digests(), at_fork, "{}: the digests did not follow the run", s.name);
    let mut fork = fork;
    fork.run_until(end);
    assert_eq!(world.server_digests(), fork.server_digests(), "{}: the fork went another way", s.name);
    let (a, b) = (world.settle_and_report(), fork.settle_and_report());
    assert_eq!(a.trace_hash, b.trace_hash, "{}", s.name);
    assert_eq!(a.passed, b.passed, "{}", s.name);
    assert_eq!(a.final_mailboxes, b.final_mailboxes, "{}", s.name);
    // And the same as a run never forked.
    assert_eq!(tandem_sim::run(s, &opts).trace_hash, a.trace_hash, "{}: forking changed the run", s.name);
}

#[test]
fn a_forked_world_goes_on_alike_and_alone() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    for name in ["random-five-servers.toml", "import-validity-expunge-not-resurrected.toml"] {
        let s = scenario::load(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        fork_halfway_and_compare(&s);
    }
    for seed in [3, 17, 67714] {
        fork_halfway_and_compare(&explore::generate(seed));
    }
}
