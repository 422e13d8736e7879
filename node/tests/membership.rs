//! Servers join and leave a running cluster of real `tandem` processes, through the
//! `tandem member` command an operator uses.

mod harness;

use harness::{Cluster, eventually};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;
use tandem_node::admin::AdminAddr;

const CONVERGE: Duration = Duration::from_secs(60);

/// `tandem member ...` against node `i`'s admin socket; its standard output.
fn member(c: &Cluster, i: usize, args: &[&str]) -> String {
    let AdminAddr::Unix(socket) = &c.admin[i] else { panic!("a Unix admin socket") };
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("member")
        .args(args)
        .arg("--admin")
        .arg(socket)
        .output()
        .expect("run tandem member");
    assert!(
        out.status.success(),
        "tandem member {args:?}: {}\nnode log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.log(i)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `member list` as (id, state) pairs.
fn states(c: &Cluster, i: usize) -> BTreeMap<u32, String> {
    member(c, i, &["list"])
        .lines()
        .filter_map(|l| {
            let mut words = l.split(' ');
            Some((words.next()?.parse().ok()?, words.next()?.to_string()))
        })
        .collect()
}

#[test]
fn a_fourth_node_joins_a_running_cluster_then_the_root_retires() {
    let mut c = Cluster::start(3, "mode = \"sync\"\nreplicas = 1");
    let mailboxes = ["erin@example.org/INBOX", "erin@example.org/Archive", "frank@example.org/INBOX"];
    let mut saved = 0;
    for (n, mailbox) in mailboxes.iter().cycle().take(12).enumerate() {
        c.deliver(n % 3, mailbox, &format!("Subject: before the join {n}\r\n\r\nbody {n}\r\n")).expect("save");
        saved += 1;
    }
    // The operator adds server 4 through any node, then starts it with a config that
    // lists the running servers.
    let (four, address) = c.add_node("mode = \"sync\"\nreplicas = 1");
    let listed = member(&c, 1, &["add", "4", &address.to_string()]);
    assert!(listed.contains("4 active"), "{listed}");
    c.spawn(four);
    c.wait_up(four);
    c.wait_linked();
    // Writes go on meanwhile, some through the new node.
    for (n, mailbox) in mailboxes.iter().cycle().take(8).enumerate() {
        c.deliver(n % 4, mailbox, &format!("Subject: after the join {n}\r\n\r\nbody {n}\r\n")).expect("save");
        saved += 1;
    }
    let mut total = 0;
    for mailbox in mailboxes {
        total += c.converged(mailbox, CONVERGE).messages.len();
    }
    assert_eq!(total, saved, "the new node ends with every message, and so does everyone");
    for i in 0..4 {
        assert_eq!(states(&c, i).get(&4).map(String::as_str), Some("active"), "node {} knows 4", i + 1);
    }

    // Server 1, the root, leaves: it hands its masterships over and retires itself.
    member(&c, 2, &["remove", "1"]);
    assert!(
        eventually(|| (1..4).all(|i| states(&c, i).get(&1).map(String::as_str) == Some("retired"))),
        "server 1 never retired; its log:\n{}",
        c.log(0)
    );
    c.kill9(0);
    let root = c.status(1).root;
    assert_eq!(root, Some(2), "the lowest active server is root");
    for (n, mailbox) in mailboxes.iter().enumerate() {
        c.deliver(1 + n % 3, mailbox, &format!("Subject: after the retirement {n}\r\n\r\n")).expect("save");
        saved += 1;
    }
    let mut total = 0;
    for mailbox in mailboxes {
        total += c.converged(mailbox, CONVERGE).messages.len();
    }
    assert_eq!(total, saved, "nothing acknowledged was lost when the root left");
}
