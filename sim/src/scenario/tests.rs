use super::*;

const EXAMPLE: &str = r#"# comment: the seed's UID conflict
name = "seed-uid-conflict"
seed = 7
wire = true
settle_ms = 30000
heal_at_end = false

[cluster]
servers = 3
replicas = 1
mode = "async"
log_capacity = 50
granularity = "user"
latency_ms = 2
disk_latency_us = [100, 300]
request_timeout_ms = 4000
links = [ { a = "s1", b = "s2", latency_ms = [100, 120] }, { a = "s2", b = "s3" } ]

[[event]]
at_ms = 900
op = "read"
server = "s2"
mailbox = "alice/INBOX"

[[event]]
at_ms = 600                        # sorted before the read
op = "save"
server = "s1"
mailbox = "alice/INBOX"
label = "m1"
flags = ["\\Flagged", "$Junk"]
size = 2000
id = "save1"
expect = "ok"

[[event]]
at_ms = 900
op = "isolate"
server = "s3"

[[expect]]
check = "present"
label = "m1"

[[expect]]
check = "exactly_one_ok"
events = ["save1"]

[[expect]]
check = "invariants"
"#;

fn mb(s: &str) -> MailboxKey {
    let (u, n) = s.split_once('/').unwrap();
    MailboxKey::new(u, n)
}

fn fl(s: &str) -> Flag {
    Flag::new(s).unwrap()
}

fn err_of(text: &str) -> ScenarioError {
    match parse(text, Some(Path::new("t.toml"))) {
        Ok(s) => panic!("expected an error, parsed {s:?}"),
        Err(e) => e,
    }
}

fn assert_err(text: &str, line: usize, needles: &[&str]) {
    let e = err_of(text);
    assert_eq!(e.line, line, "wrong line for error: {e}");
    for n in needles {
        assert!(e.message.contains(n), "error {e} lacks {n:?}");
    }
}

const HEAD: &str = "[cluster]\nservers = 3\n";

#[test]
fn example_parses_to_expected_structure() {
    let s = parse(EXAMPLE, None).unwrap();
    let expected = Scenario {
        name: "seed-uid-conflict".into(),
        path: None,
        seed: 7,
        wire: true,
        cluster: ClusterSpec {
            partial_servers: BTreeMap::new(),
            servers: vec![Sid(1), Sid(2), Sid(3)],
            spares: Vec::new(),
            replicas: 1,
            durability: Durability::Async,
            log_capacity: 50,
            granularity: Granularity::User,
            latency_ms: (2, 2),
            links: Some(vec![
                LinkSpec { a: Sid(1), b: Sid(2), latency_ms: Some((100, 120)) },
                LinkSpec { a: Sid(2), b: Sid(3), latency_ms: None },
            ]),
            disk_latency_us: (100, 300),
            request_timeout_ms: 4000,
            tombstone_grace_ms: TOMBSTONE_GRACE_MS_DEFAULT,
            startup_hold_ms: STARTUP_HOLD_MS_DEFAULT,
            mta_retry_ms: None,
            laptops: Vec::new(),
        },
        events: vec![
            TimedEvent {
                at_ms: 600,
                id: Some("save1".into()),
                action: Action::Save {
                    server: Sid(1),
                    mailbox: mb("alice/INBOX"),
                    label: Some("m1".into()),
                    flags: vec![fl("\\Flagged"), fl("$Junk")],
                    size: 2000,
                },
                expect: Some(ReplyExpect::Ok),
                line: 25,
            },
            TimedEvent {
                at_ms: 900,
                id: None,
                action: Action::Read { server: Sid(2), mailbox: mb("alice/INBOX"), fresh: false },
                expect: None,
                line: 19,
            },
            TimedEvent { at_ms: 900, id: None, action: Action::Isolate { server: Sid(3) }, expect: None, line: 36 },
        ],
        expects: vec![
            Expect::Present { label: "m1".into() },
            Expect::ExactlyOneOk { events: vec!["save1".into()] },
            Expect::Invariants,
        ],
        settle_ms: 30000,
        heal_at_end: false,
        schedule: Vec::new(),
    };
    assert_eq!(s, expected);
}

#[test]
fn doc_example_parses() {
    let readme = include_str!("../../../scenarios/README.md");
    let example: String = readme
        .lines()
        .skip_while(|l| *l != "```toml")
        .skip(1)
        .take_while(|l| *l != "```")
        .map(|l| format!("{l}\n"))
        .collect();
    let s = parse(&example, None).unwrap();
    assert_eq!(s.name, "seed-uid-conflict");
    assert_eq!(s.cluster.links.as_ref().map(Vec::len), Some(2));
    assert_eq!(s.events.len(), 2);
    assert_eq!(s.expects, vec![Expect::Present { label: "m1".into() }, Expect::Invariants]);
}

#[test]
fn defaults_apply() {
    let s = parse("[cluster]\nservers = [\"s5\", \"s2\"]\n", Some(Path::new("/x/my-case.toml"))).unwrap();
    assert_eq!(s.name, "my-case");
    assert_eq!(s.path.as_deref(), Some(Path::new("/x/my-case.toml")));
    assert_eq!((s.seed, s.wire, s.settle_ms, s.heal_at_end), (1, false, 60_000, true));
    let c = &s.cluster;
    assert_eq!(c.servers, vec![Sid(2), Sid(5)]);
    assert_eq!((c.replicas, c.durability, c.log_capacity), (1, Durability::Sync, 10_000));
    assert_eq!((c.granularity, c.latency_ms, c.disk_latency_us), (Granularity::Mailbox, (1, 5), (200, 1000)));
    assert_eq!((c.request_timeout_ms, c.links.clone()), (5000, None));
    assert!(s.events.is_empty() && s.expects.is_empty());
}

#[test]
fn dotted_keys_without_spans_parse() {
    let s = parse("cluster.servers = 2\ncluster.mode = \"async\"\n", None).unwrap();
    assert_eq!(s.cluster.servers, vec![Sid(1), Sid(2)]);
    assert_eq!(s.cluster.durability, Durability::Async);
    // A typo inside such a table is still caught.
    let e = parse("cluster.servers = 2\ncluster.mdoe = \"async\"\n", None).unwrap_err();
    assert!(e.message.contains("unknown field `mdoe`"), "{e}");
}

#[test]
fn every_op_parses() {
    let text = format!(
        r#"{HEAD}laptops = [{{ server = "s9", user = "alice", home = "s2", latency_ms = [100, 200], partial = {{ mailboxes = ["INBOX"], since_ms = 5000, body_bytes_max = 900, keep_fetched = false }} }}]
[[event]]
at_ms = 1
op = "save"
server = "s1"
mailbox = "alice/INBOX"
[[event]]
at_ms = 2
op = "copy"
server = "s2"
from = "alice/INBOX"
label = "m1"
to = "alice/Archive/2008"
as_label = "c1"
[[event]]
at_ms = 2
op = "move"
server = "s2"
from = "alice/INBOX"
label = "m2"
to = "alice/Archive/2008"
[[event]]
at_ms = 3
op = "expunge"
server = "s1"
mailbox = "alice/INBOX"
labels = ["m1", "m2"]
[[event]]
at_ms = 4
op = "expunge"
server = "s1"
mailbox = "alice/INBOX"
label = "m3"
[[event]]
at_ms = 5
op = "store"
server = "s3"
mailbox = "alice/INBOX"
label = "m1"
add = ["\\Seen"]
remove = ["\\Flagged"]
unchanged_since = "current"
[[event]]
at_ms = 6
op = "store"
server = "s3"
mailbox = "alice/INBOX"
labels = ["m1"]
remove = []
unchanged_since = 12
[[event]]
at_ms = 7
op = "read"
server = "s1"
mailbox = "bob/INBOX"
fresh = true
[[event]]
at_ms = 8
op = "master_move"
server = "s2"
mailbox = "bob/INBOX"
[[event]]
at_ms = 9
op = "cut"
a = "s1"
b = "s2"
[[event]]
at_ms = 10
op = "restore"
a = "s2"
b = "s1"
[[event]]
at_ms = 11
op = "isolate"
server = "s3"
[[event]]
at_ms = 12
op = "partition"
groups = [["s1", "s2"], ["s3"]]
[[event]]
at_ms = 13
op = "heal"
[[event]]
at_ms = 14
op = "flap"
a = "s1"
b = "s3"
[[event]]
at_ms = 15
op = "flap"
a = "s1"
b = "s3"
down_ms = 40
[[event]]
at_ms = 16
op = "crash"
server = "s1"
[[event]]
at_ms = 17
op = "restart"
server = "s1"
[[event]]
at_ms = 18
op = "lose"
server = "s2"
[[event]]
at_ms = 19
op = "replace"
server = "s2"
[[event]]
at_ms = 20
op = "hand_add"
server = "s2"
mailbox = "alice/INBOX"
label = "h1"
[[event]]
at_ms = 21
op = "hand_add"
server = "s2"
mailbox = "alice/INBOX"
[[event]]
at_ms = 22
op = "hand_delete"
server = "s3"
mailbox = "alice/INBOX"
label = "m1"
[[event]]
at_ms = 23
op = "corrupt"
server = "s3"
label = "m1"
[[event]]
at_ms = 24
op = "random_workload"
until_ms = 1000
[[event]]
at_ms = 25
op = "random_workload"
until_ms = 1000
ops_per_s = 50
users = 5
mailboxes = 3
servers = ["s1", "s3"]
[[event]]
at_ms = 26
op = "random_faults"
until_ms = 2000
[[event]]
at_ms = 27
op = "random_faults"
until_ms = 2000
count = 9
kinds = ["lose", "hand_edit", "corrupt", "partition", "cut", "crash", "flap"]
[[event]]
at_ms = 28
op = "create_mailbox"
server = "s1"
mailbox = "alice/Projects"
[[event]]
at_ms = 29
op = "delete_mailbox"
server = "s2"
mailbox = "alice/Projects"
[[event]]
at_ms = 30
op = "rename_mailbox"
server = "s3"
from = "alice/Projects"
to = "alice/Done"
[[event]]
at_ms = 31
op = "status"
server = "s2"
mailbox = "bob/INBOX"
[[event]]
at_ms = 32
op = "create_mailbox"
server = "s1"
mailbox = "alice/Sent"
special_use = ["\\Sent", "\\Archive"]
[[event]]
at_ms = 33
op = "slow"
a = "s1"
b = "s2"
delay_ms = 2000
for_ms = 3000
[[event]]
at_ms = 34
op = "silence"
a = "s3"
b = "s1"
for_ms = 4000
[[event]]
at_ms = 35
op = "member_add"
server = "s1"
member = "s3"
[[event]]
at_ms = 36
op = "member_remove"
server = "s2"
member = "s1"
lost = true
[[event]]
at_ms = 37
op = "reset"
a = "s2"
b = "s3"
down_ms = 80
[[event]]
at_ms = 38
op = "import"
server = "s1"
mailbox = "alice/Old"
label = "i7"
uidvalidity = 555
uid = 7
flags = ['\Seen']
size = 300
[[event]]
at_ms = 39
op = "replicate"
server = "s9"
home = "s3"
[[event]]
at_ms = 40
op = "fetch_body"
server = "s9"
mailbox = "alice/INBOX"
label = "m1"
[[event]]
at_ms = 41
op = "backup"
server = "s2"
[[event]]
at_ms = 42
op = "restore_backup"
server = "s2"
"#
    );
    let s = parse(&text, None).unwrap();
    assert_eq!(
        s.cluster.laptops,
        vec![LaptopSpec {
            sid: Sid(9),
            user: "alice".into(),
            home: Sid(2),
            latency_ms: (100, 200),
            partial: Some(tandem_core::partial::Partial {
                mailboxes: vec!["INBOX".into()],
                since_s: SIM_EPOCH_S + 5,
                body_bytes_max: Some(900),
                keep_fetched: false,
            }),
        }]
    );
    // A written scenario (a shrunk failure) keeps its laptops' partial specs.
    let again = parse(&crate::scenario_write::to_toml(&s, "round trip"), None).unwrap();
    assert_eq!(again.cluster.laptops, s.cluster.laptops);
    let (s1, s2, s3) = (Sid(1), Sid(2), Sid(3));
    let inbox = mb("alice/INBOX");
    let all_but_lose = vec![
        FaultKind::Partition,
        FaultKind::Cut,
        FaultKind::Crash,
        FaultKind::Flap,
        FaultKind::HandEdit,
        FaultKind::Corrupt,
    ];
    let expected = vec![
        Action::Save { server: s1, mailbox: inbox.clone(), label: None, flags: vec![], size: 1000 },
        Action::Copy {
            server: s2,
            from: inbox.clone(),
            label: "m1".into(),
            to: mb("alice/Archive/2008"),
            as_label: Some("c1".into()),
            moving: false,
        },
        Action::Copy {
            server: s2,
            from: inbox.clone(),
            label: "m2".into(),
            to: mb("alice/Archive/2008"),
            as_label: None,
            moving: true,
        },
        Action::Expunge { server: s1, mailbox: inbox.clone(), labels: vec!["m1".into(), "m2".into()] },
        Action::Expunge { server: s1, mailbox: inbox.clone(), labels: vec!["m3".into()] },
        Action::Store {
            server: s3,
            mailbox: inbox.clone(),
            labels: vec!["m1".into()],
            add: vec![fl("\\Seen")],
            remove: vec![fl("\\Flagged")],
            unchanged_since: Some(UnchangedSince::Current),
        },
        Action::Store {
            server: s3,
            mailbox: inbox.clone(),
            labels: vec!["m1".into()],
            add: vec![],
            remove: vec![],
            unchanged_since: Some(UnchangedSince::Value(12)),
        },
        Action::Read { server: s1, mailbox: mb("bob/INBOX"), fresh: true },
        Action::MasterMove { server: s2, mailbox: mb("bob/INBOX") },
        Action::Cut { a: s1, b: s2 },
        Action::Restore { a: s2, b: s1 },
        Action::Isolate { server: s3 },
        Action::Partition { groups: vec![vec![s1, s2], vec![s3]] },
        Action::Heal,
        Action::Flap { a: s1, b: s3, down_ms: 500 },
        Action::Flap { a: s1, b: s3, down_ms: 40 },
        Action::Crash { server: s1 },
        Action::Restart { server: s1 },
        Action::Lose { server: s2 },
        Action::Replace { server: s2 },
        Action::HandAdd { server: s2, mailbox: inbox.clone(), label: Some("h1".into()) },
        Action::HandAdd { server: s2, mailbox: inbox.clone(), label: None },
        Action::HandDelete { server: s3, mailbox: inbox.clone(), label: "m1".into() },
        Action::Corrupt { server: s3, label: "m1".into() },
        Action::RandomWorkload { until_ms: 1000, ops_per_s: 20, users: 3, mailboxes: 2, servers: None },
        Action::RandomWorkload { until_ms: 1000, ops_per_s: 50, users: 5, mailboxes: 3, servers: Some(vec![s1, s3]) },
        Action::RandomFaults { until_ms: 2000, count: 5, kinds: all_but_lose },
        Action::RandomFaults {
            until_ms: 2000,
            count: 9,
            kinds: vec![
                FaultKind::Lose,
                FaultKind::HandEdit,
                FaultKind::Corrupt,
                FaultKind::Partition,
                FaultKind::Cut,
                FaultKind::Crash,
                FaultKind::Flap,
            ],
        },
        Action::CreateMailbox { server: s1, mailbox: mb("alice/Projects"), special_use: SpecialUse::NONE },
        Action::DeleteMailbox { server: s2, mailbox: mb("alice/Projects") },
        Action::RenameMailbox { server: s3, from: mb("alice/Projects"), to: mb("alice/Done") },
        Action::Status { server: s2, mailbox: mb("bob/INBOX") },
        Action::CreateMailbox { server: s1, mailbox: mb("alice/Sent"), special_use: SpecialUse(32 | 2) },
        Action::Slow { a: s1, b: s2, delay_ms: 2000, for_ms: 3000 },
        Action::Silence { from: s3, to: s1, for_ms: 4000 },
        Action::MemberAdd { server: s1, member: s3 },
        Action::MemberRemove { server: s2, member: s1, lost: true },
        Action::Reset { a: s2, b: s3, down_ms: 80 },
        Action::Import {
            server: s1,
            mailbox: mb("alice/Old"),
            label: "i7".into(),
            uidvalidity: 555,
            uid: 7,
            flags: vec![fl("\\Seen")],
            size: 300,
        },
        Action::Replicate { server: Sid(9), home: Some(s3) },
        Action::FetchBody { server: Sid(9), mailbox: inbox.clone(), label: "m1".into() },
        Action::Backup { server: s2 },
        Action::RestoreBackup { server: s2 },
    ];
    let got: Vec<Action> = s.events.iter().map(|e| e.action.clone()).collect();
    assert_eq!(got, expected);
    let mut at: Vec<u64> = (1..=42).collect();
    at.insert(2, 2);
    assert_eq!(s.events.iter().map(|e| e.at_ms).collect::<Vec<_>>(), at);
    // Every op in the table is exercised.
    for (op, _) in OPS {
        assert!(text.contains(&format!("op = \"{op}\"")), "op {op} untested");
    }
}

#[test]
fn every_check_parses() {
    let text = format!(
        r#"{HEAD}
[[event]]
at_ms = 1
op = "heal"
id = "a"
[[event]]
at_ms = 1
op = "heal"
id = "b"
[[expect]]
check = "invariants"
[[expect]]
check = "invariant"
name = "flags_agree"
[[expect]]
check = "root"
server = "s2"
[[expect]]
check = "not_uid"
label = "m2"
uid = 2
[[expect]]
check = "uid"
label = "m1"
uid = 1
[[expect]]
check = "flags"
label = "m1"
flags = []
[[expect]]
check = "flags"
label = "m1"
flags = ["\\Answered", "\\Seen"]
[[expect]]
check = "present"
label = "m1"
[[expect]]
check = "absent"
label = "m3"
[[expect]]
check = "mark"
name = "root_elected"
[[expect]]
check = "mark"
name = "full_sync"
min = 3
[[expect]]
check = "exactly_one_ok"
events = ["a", "b"]
[[expect]]
check = "count"
mailbox = "alice/INBOX"
count = 4
[[expect]]
check = "uidvalidity"
mailbox = "alice/Old"
uidvalidity = 555
[[expect]]
check = "renumbered"
labels = ["m2", "m3"]
[[expect]]
check = "visible"
mailbox = "alice/Archive"
visible = false
[[expect]]
check = "special_use"
mailbox = "alice/Sent"
special_use = ["\\Trash"]
[[expect]]
check = "member"
server = "s3"
state = "leaving"
"#
    );
    let s = parse(&text, None).unwrap();
    assert_eq!(
        s.expects,
        vec![
            Expect::Invariants,
            Expect::Invariant("flags_agree".into()),
            Expect::Root { server: Sid(2) },
            Expect::NotUid { label: "m2".into(), uid: 2 },
            Expect::Uid { label: "m1".into(), uid: 1 },
            Expect::Flags { label: "m1".into(), flags: vec![] },
            Expect::Flags { label: "m1".into(), flags: vec![fl("\\Answered"), fl("\\Seen")] },
            Expect::Present { label: "m1".into() },
            Expect::Absent { label: "m3".into() },
            Expect::Mark { name: "root_elected".into(), min: 1, max: None },
            Expect::Mark { name: "full_sync".into(), min: 3, max: None },
            Expect::ExactlyOneOk { events: vec!["a".into(), "b".into()] },
            Expect::Count { mailbox: mb("alice/INBOX"), count: 4 },
            Expect::Validity { mailbox: mb("alice/Old"), uidvalidity: 555 },
            Expect::Renumbered { labels: vec!["m2".into(), "m3".into()] },
            Expect::Visible { mailbox: mb("alice/Archive"), visible: false },
            Expect::SpecialUse { mailbox: mb("alice/Sent"), special_use: SpecialUse(64) },
            Expect::Member { server: Sid(3), state: tandem_core::MemberState::Leaving },
        ]
    );
}

#[test]
fn events_sort_stably_by_time() {
    let text = format!(
        "{HEAD}[[event]]\nat_ms = 50\nop = \"heal\"\nid = \"late\"\n\
         [[event]]\nat_ms = 10\nop = \"heal\"\nid = \"x\"\n\
         [[event]]\nat_ms = 10\nop = \"heal\"\nid = \"y\"\n"
    );
    let s = parse(&text, None).unwrap();
    let ids: Vec<_> = s.events.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_eq!(ids, ["x", "y", "late"]);
    let lines: Vec<_> = s.events.iter().map(|e| e.line).collect();
    assert_eq!(lines, [7, 11, 3]);
}

#[test]
fn error_toml_syntax_line() {
    // Line 4 has an unterminated string.
    assert_err("[cluster]\nservers = 3\n\nname = \"oops\n", 4, &["TOML syntax"]);
    assert_err("seed = 1\n[cluster]\nservers = = 3\n", 3, &["TOML syntax"]);
}

#[test]
fn error_unknown_op_line() {
    let text = format!("{HEAD}\n[[event]]\nat_ms = 1\nop = \"heal\"\n\n[[event]]\nat_ms = 2\nop = \"explode\"\n");
    assert_err(&text, 10, &["event 2", "`op`", "\"explode\"", "save"]);
}

#[test]
fn error_unknown_key_line() {
    let text = format!("{HEAD}\n[[event]]\nat_ms = 1\nop = \"save\"\nsever = \"s1\"\nmailbox = \"a/b\"\n");
    assert_err(&text, 7, &["event 1", "unknown field `sever`", "server"]);
    assert_err("seeed = 3\n[cluster]\nservers = 3\n", 1, &["top level", "unknown field `seeed`"]);
    assert_err("[cluster]\nservers = 3\nreplica = 1\n", 3, &["[cluster]", "unknown field `replica`"]);
    let text = format!("{HEAD}[[expect]]\ncheck = \"present\"\nlabel = \"m1\"\nuid = 3\n");
    assert_err(&text, 6, &["expect 1", "unknown field `uid`"]);
    let text = "[cluster]\nservers = 2\nlinks = [{ a = \"s1\", b = \"s2\", latncy_ms = 3 }]\n";
    assert_err(text, 3, &["[cluster]", "`links`", "unknown field `latncy_ms`"]);
}

#[test]
fn error_unknown_server_line() {
    let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"crash\"\n\nserver = \"s4\"\n");
    assert_err(&text, 7, &["event 1", "`server`", "\"s4\"", "s1, s2, s3"]);
    let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"isolate\"\nserver = \"x\"\n");
    let e = err_of(&text);
    assert_eq!(e.line, 6);
    assert_eq!(e.message, "event 1 (isolate): `server` must be a server name like \"s2\"; got \"x\"");
    let text =
        format!("{HEAD}[[event]]\nat_ms = 1\nop = \"partition\"\ngroups = [\n  [\"s1\"],\n  [\"s2\", \"s9\"],\n]\n");
    assert_err(&text, 8, &["`groups`", "\"s9\""]);
    let text = "[cluster]\nservers = 2\nlinks = [\n  { a = \"s1\", b = \"s3\" },\n]\n";
    assert_err(text, 4, &["`b`", "\"s3\""]);
    let text = format!("{HEAD}[[expect]]\ncheck = \"root\"\nserver = \"s0\"\n");
    assert_err(&text, 5, &["`server`", "\"s0\""]);
}

#[test]
fn error_bad_flag_line() {
    let text = format!(
        "{HEAD}[[event]]\nat_ms = 1\nop = \"store\"\nserver = \"s1\"\nmailbox = \"a/INBOX\"\nlabel = \"m\"\nadd = [\"\\\\Seen\",\n  \"bad flag\"]\n"
    );
    assert_err(&text, 10, &["`add`", "\"bad flag\""]);
}

#[test]
fn error_bad_mailbox_line() {
    let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"read\"\nserver = \"s1\"\nmailbox = \"noslash\"\n");
    assert_err(&text, 7, &["`mailbox`", "\"noslash\"", "user/name"]);
    let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"read\"\nserver = \"s1\"\nmailbox = \"/INBOX\"\n");
    assert_err(&text, 7, &["`mailbox`"]);
}

#[test]
fn error_unknown_mark_line() {
    let text =
        format!("{HEAD}[[expect]]\ncheck = \"invariants\"\n[[expect]]\ncheck = \"mark\"\nname = \"root_elekted\"\n");
    assert_err(&text, 7, &["expect 2", "\"root_elekted\"", "root_elected"]);
}

#[test]
fn error_exactly_one_ok_missing_id_line() {
    let text = format!(
        "{HEAD}[[event]]\nat_ms = 1\nop = \"heal\"\nid = \"st1\"\n[[expect]]\ncheck = \"exactly_one_ok\"\nevents = [\"st1\",\n  \"st2\"]\n"
    );
    assert_err(&text, 10, &["`events`", "\"st2\"", "st1"]);
}

#[test]
fn error_missing_key_names_event_line() {
    let text = format!("{HEAD}\n[[event]]\nat_ms = 1\nop = \"save\"\nmailbox = \"a/b\"\n");
    assert_err(&text, 4, &["event 1", "missing `server`"]);
    assert_err("seed = 2\n", 1, &["missing `[cluster]`"]);
    let text = format!("{HEAD}\n[[event]]\nop = \"heal\"\n");
    assert_err(&text, 4, &["missing `at_ms`"]);
}

#[test]
fn other_errors() {
    let text = format!(
        "{HEAD}[[event]]\nat_ms = 1\nop = \"heal\"\nid = \"a\"\n[[event]]\nat_ms = 2\nop = \"heal\"\nid = \"a\"\n"
    );
    assert_err(&text, 10, &["duplicate event id"]);
    assert_err("[cluster]\nservers = 2\nreplicas = 2\n", 3, &["replicas"]);
    assert_err("[cluster]\nservers = 2\nlatency_ms = [5, 1]\n", 3, &["latency_ms"]);
    assert_err("[cluster]\nservers = [\"s1\", \"s1\"]\n", 2, &["already listed"]);
    assert_err("[cluster]\nservers = 0\n", 2, &["servers"]);
    let text = format!("{HEAD}[[event]]\nat_ms = -1\nop = \"heal\"\n");
    assert_err(&text, 4, &["event 1", "`at_ms`", "-1", "expected u64"]);
    let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"cut\"\na = \"s1\"\nb = \"s1\"\n");
    assert_err(&text, 7, &["`b`"]);
    let text = format!("{HEAD}[[expect]]\ncheck = \"invariant\"\nname = \"no_loss\"\n");
    assert_err(&text, 5, &["no_acked_loss"]);
    let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"random_faults\"\nuntil_ms = 10\nkinds = [\"meteor\"]\n");
    assert_err(&text, 7, &["event 1", "`kinds`", "`meteor`", "hand_edit"]);
}

#[test]
fn error_display_is_path_line_message() {
    let e = ScenarioError { path: Some(PathBuf::from("scenarios/x.toml")), line: 12, message: "boom".into() };
    assert_eq!(e.to_string(), "scenarios/x.toml:12: boom");
    let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"isolate\"\nserver = \"x\"\n");
    let e = err_of(&text);
    assert_eq!(e.to_string(), "t.toml:6: event 1 (isolate): `server` must be a server name like \"s2\"; got \"x\"");
}

#[test]
fn load_reports_missing_file() {
    let e = load(Path::new("/nonexistent/dir/x.toml")).unwrap_err();
    assert_eq!(e.line, 0);
    assert!(e.to_string().starts_with("/nonexistent/dir/x.toml:0: cannot read"));
}

#[test]
fn every_scenario_file_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let files = files_in(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    assert!(!files.is_empty(), "no scenario files in {}", dir.display());
    let mut failures = Vec::new();
    for f in &files {
        match load(f) {
            Ok(s) => {
                assert_eq!(
                    s.name,
                    f.file_stem().unwrap().to_string_lossy(),
                    "{}: name differs from the file stem",
                    f.display()
                );
                assert!(!s.expects.is_empty(), "{}: no [[expect]]", f.display());
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(failures.is_empty(), "scenario files fail to parse:\n{}", failures.join("\n"));
}
