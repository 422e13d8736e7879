//! Conformance: seed scenarios run in the simulator and on real processes (faults made
//! by the TCP proxy) must converge to the same mailbox state: the same messages (by
//! label), the same flags, and the same UIDs wherever the scenario orders the saves.

mod harness;

use harness::Cluster;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use tandem_core::{Durability, Granularity};
use tandem_node::admin::{AdminReply, AdminRequest};
use tandem_sim::scenario::{Action, Scenario, load};

/// Per mailbox: label -> (UID, flags).
type State = BTreeMap<String, BTreeMap<String, (u32, Vec<String>)>>;

fn scenario(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios").join(name);
    load(&path).unwrap_or_else(|e| panic!("{name}: {e:?}"))
}

fn simulated(s: &Scenario) -> State {
    let report = tandem_sim::world::run(s, &tandem_sim::RunOptions::default());
    assert!(report.passed, "{}: the simulator run fails: {:?}", s.name, report.failures);
    let label_of: BTreeMap<_, _> = report.labels.iter().map(|(l, g)| (*g, l.clone())).collect();
    let (_, boxes) = report.final_mailboxes.iter().next().expect("a running server");
    boxes
        .iter()
        .map(|(mailbox, messages)| {
            let by_label = messages
                .iter()
                .filter_map(|(uid, guid, flags)| {
                    let mut flags: Vec<String> = flags.iter().map(|f| f.as_str().to_string()).collect();
                    flags.sort();
                    label_of.get(guid).map(|l| (l.clone(), (*uid, flags)))
                })
                .collect();
            (mailbox.to_string(), by_label)
        })
        .collect()
}

fn config_lines(s: &Scenario) -> String {
    let c = &s.cluster;
    let mode = if c.durability == Durability::Sync { "sync" } else { "async" };
    let granularity = match c.granularity {
        Granularity::Mailbox => "mailbox",
        Granularity::User => "user",
        Granularity::Domain => "domain",
        Granularity::Global => "global",
    };
    format!(
        "mode = \"{mode}\"\nreplicas = {}\nlog_capacity = {}\ngranularity = \"{granularity}\"",
        c.replicas, c.log_capacity
    )
}

/// The UID node `i` shows for a labelled message.
fn uid_at(c: &Cluster, i: usize, mailbox: &str, guid: &str) -> Option<u32> {
    c.dump(i, mailbox).messages.iter().find(|m| m.guid == guid).map(|m| m.uid)
}

fn real(s: &Scenario) -> State {
    let n = s.cluster.servers.len();
    for (i, sid) in s.cluster.servers.iter().enumerate() {
        assert_eq!(sid.0 as usize, i + 1, "servers are s1..sN");
    }
    let c = Cluster::start(n, &config_lines(s));
    let idx = |sid: tandem_core::Sid| sid.0 as usize - 1;
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    let mut mailboxes: BTreeSet<String> = BTreeSet::new();
    let start = Instant::now();
    for e in &s.events {
        let at = start + Duration::from_millis(e.at_ms);
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        match &e.action {
            Action::Save { server, mailbox, label, flags, size } => {
                let mut body = format!("Subject: {}\r\n\r\n", label.as_deref().unwrap_or("unlabelled"));
                while body.len() < *size {
                    body.push('x');
                }
                let request = AdminRequest::Deliver {
                    mailbox: mailbox.to_string(),
                    body,
                    flags: flags.iter().map(|f| f.as_str().to_string()).collect(),
                };
                mailboxes.insert(mailbox.to_string());
                match harness::call(&c.admin[idx(*server)], &request) {
                    Ok(AdminReply::Saved { guid, .. }) => {
                        if let Some(l) = label {
                            labels.insert(l.clone(), guid);
                        }
                    }
                    other => panic!("{}: save {label:?} on {server}: {other:?}", s.name),
                }
            }
            Action::Read { .. } => {}
            Action::Store { server, mailbox, labels: which, add, remove, unchanged_since: None } => {
                let i = idx(*server);
                let uids = which.iter().filter_map(|l| uid_at(&c, i, &mailbox.to_string(), &labels[l])).collect();
                let request = AdminRequest::Store {
                    mailbox: mailbox.to_string(),
                    uids,
                    add: add.iter().map(|f| f.as_str().to_string()).collect(),
                    remove: remove.iter().map(|f| f.as_str().to_string()).collect(),
                };
                let reply = harness::call(&c.admin[i], &request);
                assert!(matches!(reply, Ok(AdminReply::Stored { .. })), "{}: store on {server}: {reply:?}", s.name);
            }
            Action::Expunge { server, mailbox, labels: which } => {
                let i = idx(*server);
                let uids = which.iter().filter_map(|l| uid_at(&c, i, &mailbox.to_string(), &labels[l])).collect();
                let reply = harness::call(&c.admin[i], &AdminRequest::Expunge { mailbox: mailbox.to_string(), uids });
                assert!(matches!(reply, Ok(AdminReply::Expunged { .. })), "{}: expunge on {server}: {reply:?}", s.name);
            }
            Action::Isolate { server } => c.isolate(idx(*server)),
            Action::Partition { groups } => {
                let group_of = |i: usize| groups.iter().position(|g| g.iter().any(|s| idx(*s) == i));
                for ((a, b), proxy) in &c.proxies {
                    if group_of(*a).is_none() || group_of(*a) != group_of(*b) {
                        proxy.cut();
                    }
                }
            }
            Action::Heal => c.heal(),
            other => panic!("{}: the conformance runner does not do {other:?}", s.name),
        }
    }
    c.heal();
    let label_of: BTreeMap<&String, &String> = labels.iter().map(|(l, g)| (g, l)).collect();
    mailboxes
        .iter()
        .map(|mailbox| {
            let view = c.converged(mailbox, Duration::from_secs(60));
            let by_label = view
                .messages
                .iter()
                .filter_map(|m| {
                    let mut flags = m.flags.clone();
                    flags.sort();
                    label_of.get(&m.guid).map(|l| ((*l).clone(), (m.uid, flags)))
                })
                .collect();
            (mailbox.clone(), by_label)
        })
        .collect()
}

fn conforms(name: &str) {
    let s = scenario(name);
    let sim = simulated(&s);
    let real = real(&s);
    assert_eq!(
        sim.keys().collect::<Vec<_>>(),
        real.keys().collect::<Vec<_>>(),
        "{name}: mailboxes\nsim {sim:#?}\nreal {real:#?}"
    );
    // Saves at the same instant on different servers have no order the scenario fixes:
    // their UIDs are compared as a set.
    let mut saves_at: BTreeMap<u64, usize> = BTreeMap::new();
    let mut saved_at: BTreeMap<String, u64> = BTreeMap::new();
    for e in &s.events {
        if let Action::Save { label: Some(l), .. } = &e.action {
            *saves_at.entry(e.at_ms).or_default() += 1;
            saved_at.insert(l.clone(), e.at_ms);
        }
    }
    assert!(!sim.is_empty(), "{name}: no mailbox to compare");
    for (mailbox, sim_box) in &sim {
        assert!(!sim_box.is_empty(), "{name}: no labelled message in {mailbox}");
        let real_box = &real[mailbox];
        assert_eq!(
            sim_box.keys().collect::<Vec<_>>(),
            real_box.keys().collect::<Vec<_>>(),
            "{name}: messages of {mailbox}\nsim {sim_box:#?}\nreal {real_box:#?}"
        );
        for (label, (uid, flags)) in sim_box {
            let (real_uid, real_flags) = &real_box[label];
            assert_eq!(flags, real_flags, "{name}: flags of {label}");
            let ordered = saved_at.get(label).is_some_and(|t| saves_at[t] == 1);
            if ordered {
                assert_eq!(uid, real_uid, "{name}: UID of {label}\nsim {sim_box:#?}\nreal {real_box:#?}");
            }
        }
        let uids = |b: &BTreeMap<String, (u32, Vec<String>)>| b.values().map(|(u, _)| *u).collect::<BTreeSet<_>>();
        assert_eq!(uids(sim_box), uids(real_box), "{name}: the UIDs of {mailbox}");
    }
}

#[test]
fn seed_uid_conflict_conforms() {
    conforms("seed-uid-conflict.toml");
}

#[test]
fn seed_flags_connected_conforms() {
    conforms("seed-flags-connected.toml");
}

#[test]
fn seed_flags_partitioned_conforms() {
    conforms("seed-flags-partitioned.toml");
}

#[test]
fn fixme_expunged_conflict_conforms() {
    conforms("fixme-expunged-conflict.toml");
}
