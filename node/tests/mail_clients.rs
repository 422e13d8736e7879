//! Real mail clients (Python's imaplib and smtplib.LMTP) against a 3-node cluster.

mod harness;

use harness::Cluster;
use serde_json::Value;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

const USER: &str = "alice@example.org";
const PASSWORD: &str = "correct horse battery";

struct Mail {
    cluster: Cluster,
    imap: Vec<SocketAddr>,
    lmtp: Vec<SocketAddr>,
    /// The users file every node reads.
    users: std::path::PathBuf,
}

fn start(extra: &str) -> Mail {
    start_with_tls(extra, None).0
}

/// Like `start`; with a directory, every node also serves IMAP over TLS (STARTTLS and an
/// implicit-TLS port) with a certificate for 127.0.0.1 signed by `ca.pem` there.
fn start_with_tls(extra: &str, tls_dir: Option<&std::path::Path>) -> (Mail, Vec<SocketAddr>) {
    let users = tempfile::NamedTempFile::new().unwrap().into_temp_path().keep().unwrap();
    tandem_node::users::add_user(&users, USER, PASSWORD.as_bytes()).unwrap();
    tandem_node::users::add_user(&users, "bob@example.org", b"another password").unwrap();
    let imap: Vec<SocketAddr> = (0..3).map(|_| harness::free_port()).collect();
    let lmtp: Vec<SocketAddr> = (0..3).map(|_| harness::free_port()).collect();
    let imaps: Vec<SocketAddr> = (0..3).map(|_| harness::free_port()).collect();
    let tls_lines = match tls_dir {
        None => vec![String::new(); 3],
        Some(dir) => {
            harness::make_mail_tls(dir);
            imaps
                .iter()
                .map(|a| {
                    format!(
                        "imaps = \"{a}\"\nmail_tls_cert = \"{0}/mail.pem\"\nmail_tls_key = \"{0}/mail.key\"",
                        dir.display()
                    )
                })
                .collect()
        }
    };
    let (i2, l2, u2) = (imap.clone(), lmtp.clone(), users.clone());
    let cluster = Cluster::start_with(3, extra, move |i| {
        format!("imap = \"{}\"\nlmtp = \"{}\"\nusers_file = \"{}\"\n{}", i2[i], l2[i], u2.display(), tls_lines[i])
    });
    (Mail { cluster, imap, lmtp, users }, imaps)
}

#[test]
fn idle_sees_other_servers_mail_and_protocol_edges_hold() {
    let m = start("mode = \"sync\"\nreplicas = 1");
    client(&["lmtp", &port(m.lmtp[0]), "sender@example.net", "2", USER]);
    client(&["wait-count", &port(m.imap[2]), USER, PASSWORD, "2"]);
    // A session on node 3 in IDLE hears of an APPEND made on node 2.
    let r = client(&["idle", &port(m.imap[2]), USER, PASSWORD, &port(m.imap[1])]);
    assert_eq!(r["exists"], 3);
    // COMPRESS=DEFLATE: the same session, every command and answer deflated.
    client(&["compress", &port(m.imap[1]), USER, PASSWORD]);
    client(&["protocol-edges", &port(m.imap[0]), USER, PASSWORD]);
    client(&["copy-edges", &port(m.imap[0]), USER, PASSWORD]);
}

/// LIST-STATUS and SPECIAL-USE: a STATUS after each selectable mailbox listed, and the
/// special use of the names configured for one (Dovecot's default names here).
#[test]
fn list_status_and_special_use() {
    let m = start("");
    let script = format!(
        "a LOGIN {USER} \"{PASSWORD}\"\r\nb CREATE Sent\r\nc CREATE work\r\n\
         d LIST \"\" % RETURN (STATUS (MESSAGES UIDNEXT) SPECIAL-USE)\r\n\
         e LIST (SPECIAL-USE) \"\" *\r\nf LIST \"\" Sent\r\ng LOGOUT\r\n"
    );
    let answer = harness::raw_exchange(m.imap[0], script.as_bytes());
    let lines: Vec<&str> = answer.lines().collect();
    let at = |needle: &str| lines.iter().position(|l| *l == needle).unwrap_or_else(|| panic!("{needle:?} in {answer}"));
    assert!(at("* LIST (\\Sent \\HasNoChildren) \"/\" Sent") + 1 == at("* STATUS Sent (MESSAGES 0 UIDNEXT 1)"));
    assert!(at("* LIST (\\HasNoChildren) \"/\" work") + 1 == at("* STATUS work (MESSAGES 0 UIDNEXT 1)"));
    assert!(lines.iter().any(|l| l.starts_with("* STATUS INBOX (MESSAGES ")), "{answer}");
    let selection: Vec<&&str> =
        lines.iter().skip_while(|l| !l.starts_with("d OK")).take_while(|l| !l.starts_with("e OK")).skip(1).collect();
    assert_eq!(selection, vec![&"* LIST (\\Sent \\HasNoChildren) \"/\" Sent"], "{answer}");
    assert!(lines.iter().filter(|l| l.ends_with("\"/\" Sent")).count() == 3, "base LIST says it too: {answer}");
    assert!(answer.contains("f OK"), "{answer}");
}

/// CREATE-SPECIAL-USE: the use a client gives a mailbox is replicated (another node
/// lists it), goes with the mailbox when it is renamed, replaces the node's default for
/// that name, and an unknown use is refused without creating anything.
#[test]
fn a_special_use_given_at_create_is_listed_on_every_node() {
    let m = start("");
    let mut one = Lines::login(m.imap[0]);
    one.ok("CREATE \"Old Mail\" (USE (\\Archive))");
    one.ok("CREATE Sent (USE (\\Drafts \\Sent))");
    let refused = one.command("CREATE Spam (USE (\\Spam))");
    assert!(refused.last().is_some_and(|l| l.contains(" NO [USEATTR]")), "{refused:?}");
    let bad = one.command("CREATE Other (FOO)");
    assert!(bad.last().is_some_and(|l| l.contains(" BAD ")), "{bad:?}");
    let mut two = Lines::login(m.imap[1]);
    let wanted = [
        "* LIST (\\Archive \\HasNoChildren) \"/\" \"Old Mail\"",
        "* LIST (\\Drafts \\Sent \\HasNoChildren) \"/\" Sent",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let listed = two.ok("LIST (SPECIAL-USE) \"\" *");
        if listed[..listed.len() - 1] == wanted {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "node 2 lists {listed:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let all = two.ok("LIST \"\" *");
    assert!(!all.iter().any(|l| l.contains("Spam") || l.contains("Other")), "{all:?}");
    two.ok("RENAME \"Old Mail\" Attic");
    let listed = two.ok("LIST \"\" Attic");
    assert_eq!(listed[0], "* LIST (\\Archive \\HasNoChildren) \"/\" Attic", "{listed:?}");
    let capabilities = one.ok("CAPABILITY");
    assert!(capabilities[0].contains(" CREATE-SPECIAL-USE"), "{capabilities:?}");
}

/// One IMAP connection, line by line (commands without literals).
struct Lines {
    reader: std::io::BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
    tag: u32,
}

impl Lines {
    fn login(addr: SocketAddr) -> Lines {
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let writer = stream.try_clone().expect("clone");
        let mut c = Lines { reader: std::io::BufReader::new(stream), writer, tag: 0 };
        let mut greeting = String::new();
        std::io::BufRead::read_line(&mut c.reader, &mut greeting).expect("greeting");
        let answer = c.command(&format!("LOGIN {USER} \"{PASSWORD}\""));
        assert!(answer.last().is_some_and(|l| l.contains(" OK")), "{answer:?}");
        c
    }

    /// Every line of the answer, the tagged one last.
    fn command(&mut self, text: &str) -> Vec<String> {
        self.tag += 1;
        let tag = format!("x{}", self.tag);
        std::io::Write::write_all(&mut self.writer, format!("{tag} {text}\r\n").as_bytes()).expect("send");
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut self.reader, &mut line).expect("read");
            assert!(n > 0, "connection closed during {text}: {lines:?}");
            let done = line.starts_with(&format!("{tag} "));
            lines.push(line.trim_end().to_string());
            if done {
                return lines;
            }
        }
    }

    fn ok(&mut self, text: &str) -> Vec<String> {
        let lines = self.command(text);
        assert!(lines.last().is_some_and(|l| l.split(' ').nth(1) == Some("OK")), "{text}: {lines:?}");
        lines
    }

    /// Lines the server sends without a command, up to and with the first that `until`
    /// accepts (the read timeout fails the test if none comes).
    fn unsolicited(&mut self, until: impl Fn(&str) -> bool) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut self.reader, &mut line)
                .unwrap_or_else(|e| panic!("waiting for a notification after {lines:?}: {e}"));
            assert!(n > 0, "connection closed after {lines:?}");
            let line = line.trim_end().to_string();
            let done = until(&line);
            lines.push(line);
            if done {
                return lines;
            }
        }
    }
}

/// NOTIFY (RFC 5465): a session that sends no command is told, as they happen, of new
/// mail in its selected mailbox (EXISTS), of other mailboxes' counts (STATUS), and of
/// names and subscriptions that change (LIST), whichever node the change came through;
/// NOTIFY NONE stops it, and events tandem cannot report are refused with BADEVENT.
#[test]
fn notify_tells_an_idle_session_of_changes_anywhere() {
    let m = start("mode = \"sync\"\nreplicas = 1");
    let mut watcher = Lines::login(m.imap[2]);
    let mut other = Lines::login(m.imap[0]);
    assert!(watcher.ok("CAPABILITY")[0].contains(" NOTIFY"));
    watcher.ok("CREATE Work");
    watcher.ok("SELECT INBOX");
    let refused = watcher.command("NOTIFY SET (personal (MessageNew MessageExpunge AnnotationChange))");
    assert!(refused.last().is_some_and(|l| l.contains(" NO [BADEVENT")), "{refused:?}");
    let set = watcher.ok("NOTIFY SET STATUS (selected (MessageNew MessageExpunge)) \
         (personal (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange))");
    assert!(set.iter().any(|l| l.starts_with("* STATUS Work (MESSAGES 0 UIDNEXT 1 UIDVALIDITY ")), "{set:?}");
    assert!(!set.iter().any(|l| l.starts_with("* STATUS INBOX")), "the selected mailbox has no STATUS: {set:?}");

    // New mail in the selected mailbox, delivered through another node: EXISTS.
    client(&["lmtp", &port(m.lmtp[0]), "sender@example.net", "1", USER]);
    watcher.unsolicited(|l| l == "* 1 EXISTS");
    // A message copied into another mailbox through another node: its STATUS.
    other.ok("SELECT INBOX");
    other.ok("COPY 1 Work");
    watcher.unsolicited(|l| l.starts_with("* STATUS Work (MESSAGES 1 UIDNEXT 2 "));
    // An expunge in the selected mailbox (`selected`, not `selected-delayed`): at once.
    other.ok("STORE 1 +FLAGS.SILENT (\\Deleted)");
    other.ok("EXPUNGE");
    watcher.unsolicited(|l| l == "* 1 EXPUNGE");
    // Names and subscriptions.
    other.ok("CREATE Projects");
    watcher.unsolicited(|l| l.starts_with("* LIST (") && l.ends_with(" Projects"));
    other.ok("SUBSCRIBE Projects");
    watcher.unsolicited(|l| l == "* LIST (\\Subscribed) \"/\" Projects");
    // A rename is told under the new name with the old one (OLDNAME, RFC 5258) when its
    // writes are durable together, else as the old name gone and the new one there.
    other.ok("RENAME Projects Plans");
    let renamed = watcher.unsolicited(|l| l.starts_with("* LIST (") && l.contains(" Plans"));
    let told_as_rename = renamed.last().is_some_and(|l| l.ends_with(" Plans (\"OLDNAME\" (Projects))"));
    if !told_as_rename {
        watcher.unsolicited(|l| l.starts_with("* LIST (\\NonExistent") && l.ends_with(" Projects"));
    }
    other.ok("DELETE Plans");
    watcher.unsolicited(|l| l.starts_with("* LIST (\\NonExistent") && l.ends_with(" Plans"));

    // NOTIFY NONE: nothing more without a command.
    watcher.ok("NOTIFY NONE");
    other.ok("CREATE Later");
    std::thread::sleep(Duration::from_millis(1500));
    let noop = watcher.ok("NOOP");
    assert!(!noop.iter().any(|l| l.starts_with("* LIST") || l.starts_with("* STATUS")), "{noop:?}");
}

/// Read-your-writes across nodes: what a client did through one node and was told OK
/// is there when it looks through another at once (SELECT and STATUS ask the
/// mailbox's master where it stands and wait for this node's copy to get there). With
/// `replicas = 1` of three nodes, an OK may come before the third node has the change.
#[test]
fn a_write_told_ok_on_one_node_is_seen_on_the_others_at_once() {
    // A loaded test machine must not turn a slow round trip into a stale read.
    let m = start("mode = \"sync\"\nreplicas = 1\nfresh_read_ms = 10000");
    let mut writer = Lines::login(m.imap[0]);
    let mut readers = [Lines::login(m.imap[1]), Lines::login(m.imap[2])];
    for i in 0..30 {
        let name = format!("ryw{i}");
        writer.ok(&format!("CREATE {name}"));
        let reader = &mut readers[i % 2];
        reader.ok(&format!("SELECT {name}"));
        let status = reader.ok(&format!("STATUS {name} (MESSAGES)"));
        assert!(status.iter().any(|l| l.ends_with("(MESSAGES 0)")), "{status:?}");
    }
    // Mail in, then expunged: each step is seen at once through the other nodes.
    client(&["lmtp", &port(m.lmtp[0]), "sender@example.net", "20", USER]);
    writer.ok("SELECT INBOX");
    for (i, reader) in readers.iter_mut().enumerate() {
        let status = reader.ok("STATUS INBOX (MESSAGES)");
        assert!(status.iter().any(|l| l.ends_with("(MESSAGES 20)")), "node {}: {status:?}", i + 2);
    }
    for n in (1..=20).rev() {
        writer.ok(&format!("STORE {n} +FLAGS.SILENT (\\Deleted)"));
        writer.ok("EXPUNGE");
        let reader = &mut readers[n % 2];
        let status = reader.ok("STATUS INBOX (MESSAGES)");
        assert!(status.iter().any(|l| l.ends_with(&format!("(MESSAGES {})", n - 1))), "{status:?}");
    }
}

/// UTF8=ACCEPT (RFC 6855): a client that enables it sends and is shown mailbox names
/// in UTF-8, one that does not in modified UTF-7, for the same mailboxes; APPEND takes
/// `UTF8 (literal8)`.
#[test]
fn utf8_accept_shows_the_same_mailboxes_in_utf8() {
    let m = start("");
    let mut legacy = Lines::login(m.imap[0]);
    let mut modern = Lines::login(m.imap[0]);
    legacy.ok("CREATE \"Entw&APw-rfe\"");
    let enabled = modern.ok("ENABLE UTF8=ACCEPT");
    assert!(enabled.iter().any(|l| l == "* ENABLED UTF8=ACCEPT"), "{enabled:?}");
    let listed = modern.ok("LIST \"\" *");
    assert!(listed.iter().any(|l| l.ends_with("\"/\" \"Entwürfe\"")), "{listed:?}");
    modern.ok("CREATE \"日本語\"");
    let listed = legacy.ok("LIST \"\" *");
    assert!(listed.iter().any(|l| l.ends_with("\"/\" &ZeVnLIqe-")), "{listed:?}");
    let body = "Subject: Grüße\r\n\r\nhé\r\n";
    modern.ok(&format!("APPEND \"日本語\" UTF8 (~{{{}+}}\r\n{body})", body.len()));
    let status = modern.ok("STATUS \"日本語\" (MESSAGES)");
    assert!(status.iter().any(|l| l == "* STATUS \"日本語\" (MESSAGES 1)"), "{status:?}");
    let status = legacy.ok("STATUS &ZeVnLIqe- (MESSAGES)");
    assert!(status.iter().any(|l| l == "* STATUS &ZeVnLIqe- (MESSAGES 1)"), "{status:?}");
    modern.ok("SELECT \"Entwürfe\"");
}

/// offlineimap syncs both ways through any node: mail delivered through one node comes
/// down through another, a flag set and a message written locally go up through a third,
/// and a run with nothing new changes nothing (no duplicates either way).
#[test]
fn offlineimap_syncs_both_ways_through_any_node() {
    let m = start("mode = \"sync\"\nreplicas = 1");
    client(&["lmtp", &port(m.lmtp[0]), "sender@example.net", "5", USER]);
    let dir = m.cluster.dir.path().join("offlineimap");
    let files = offlineimap(&m, 1, &dir);
    assert_eq!(files.len(), 5, "{files:?}");
    // Locally: one message read (the Maildir S flag), one new message written.
    let cur = dir.join("mail/INBOX/cur");
    let first = ["new", "cur"]
        .iter()
        .flat_map(|d| std::fs::read_dir(dir.join("mail/INBOX").join(d)).into_iter().flatten().flatten())
        .map(|e| e.path())
        .min()
        .expect("a message");
    let name = first.file_name().unwrap().to_string_lossy().into_owned();
    let (base, flags) = name.split_once(":2,").unwrap_or((&name, ""));
    let mut flags: Vec<char> = flags.chars().chain(['S']).collect();
    flags.sort();
    flags.dedup();
    std::fs::rename(&first, cur.join(format!("{base}:2,{}", flags.into_iter().collect::<String>()))).unwrap();
    std::fs::write(
        dir.join("mail/INBOX/new/1700000000.local.tandem"),
        "From: me@example.org\r\nSubject: written offline\r\n\r\nhello\r\n",
    )
    .unwrap();
    let files = offlineimap(&m, 2, &dir);
    assert_eq!(files.len(), 6, "{files:?}");
    let state = same_everywhere_with(&m, &[0, 1, 2], |s| s["messages"].as_array().is_some_and(|a| a.len() == 6));
    let seen = state["messages"].as_array().unwrap().iter().filter(|m| m[1].to_string().contains("Seen")).count();
    assert_eq!(seen, 1, "{state}");
    // Nothing new: nothing changes on either side.
    assert_eq!(offlineimap(&m, 0, &dir), files);
    assert_eq!(same_everywhere(&m, &[0, 1, 2]), state);
}

/// SIGHUP reads the users file again: a user added since start logs in, the node goes
/// on (it used to die of the signal), and a file that does not load leaves the users as
/// they were.
#[test]
fn sighup_reads_the_users_file_again() {
    let m = start("");
    let login = |user: &str, password: &str| {
        let command = format!("a LOGIN {user} \"{password}\"\r\nb LOGOUT\r\n");
        harness::raw_exchange(m.imap[0], command.as_bytes())
    };
    let hangup = || {
        let pid = m.cluster.pid(0).expect("node 1 runs");
        let status = Command::new("sh").arg("-c").arg(format!("kill -HUP {pid}")).status().expect("sh");
        assert!(status.success());
    };
    assert!(login("dave@example.org", "dave's pass").contains("a NO"), "not a user yet");
    tandem_node::users::add_user(&m.users, "dave@example.org", b"dave's pass").unwrap();
    hangup();
    assert!(harness::eventually(|| login("dave@example.org", "dave's pass").contains("a OK")), "read again");
    assert!(login(USER, PASSWORD).contains("a OK"), "the node goes on, its other users too");
    std::fs::write(&m.users, "this is [not a users file").unwrap();
    hangup();
    std::thread::sleep(Duration::from_millis(500));
    assert!(login("dave@example.org", "dave's pass").contains("a OK"), "a broken file changes nothing");
    assert!(m.cluster.pid(0).is_some());
}

#[test]
fn lmtp_answers_451_when_the_durability_promise_cannot_be_kept() {
    let mut m = start("mode = \"sync\"\nreplicas = 2");
    m.cluster.kill9(1);
    m.cluster.kill9(2);
    let r = client(&["lmtp-temporary", &port(m.lmtp[0]), USER]);
    assert_eq!(r["code"], 451, "{r}");
}

#[test]
fn tandem_user_add_writes_a_working_account() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.toml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["user", "add", "carol@example.org", "--users"])
        .arg(&users)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"s3cret pass\n").unwrap();
    assert!(child.wait().unwrap().success());
    let loaded = tandem_node::users::Users::load(&users).unwrap();
    assert!(loaded.verify("carol@example.org", b"s3cret pass"));
    assert!(!loaded.verify("carol@example.org", b"s3cret pass\n"));
}

#[test]
fn create_rename_delete_replicate() {
    let m = start("mode = \"sync\"\nreplicas = 1");
    client(&["lifecycle", &port(m.imap[0]), &port(m.imap[1]), &port(m.imap[2]), USER, PASSWORD]);
}

#[test]
fn starttls_and_implicit_tls_for_imap() {
    let dir = tempfile::tempdir().unwrap();
    let (m, imaps) = start_with_tls("", Some(dir.path()));
    let ca = dir.path().join("ca.pem");
    client(&["tls", &port(m.imap[0]), &port(imaps[0]), USER, PASSWORD, ca.to_str().unwrap()]);
}

/// Runs the client script; its JSON line on success.
fn client(args: &[&str]) -> Value {
    harness::require_tools();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/mail.py");
    let out = Command::new("python3").arg(script).args(args).output().expect("python3");
    assert!(
        out.status.success(),
        "mail.py {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(out.stdout.trim_ascii()).expect("one JSON line")
}

/// Syncs the user's mailboxes from node `i` into a local Maildir with mbsync (isync);
/// returns how many messages the Maildir's INBOX holds.
fn mbsync(m: &Mail, i: usize, maildir: &std::path::Path) -> usize {
    let config = maildir.with_extension("mbsyncrc");
    std::fs::create_dir_all(maildir).unwrap();
    std::fs::write(
        &config,
        format!(
            "IMAPAccount tandem\nHost 127.0.0.1\nPort {}\nUser {USER}\nPass \"{PASSWORD}\"\nSSLType None\nAuthMechs LOGIN\n\n\
             IMAPStore remote\nAccount tandem\n\n\
             MaildirStore local\nPath {dir}/\nInbox {dir}/INBOX\nSubFolders Verbatim\n\n\
             Channel mail\nFar :remote:\nNear :local:\nPatterns *\nCreate Near\nSync Pull\nSyncState *\n",
            m.imap[i].port(),
            dir = maildir.display()
        ),
    )
    .unwrap();
    harness::require_tools();
    let out = Command::new("mbsync").arg("-c").arg(&config).arg("-a").output().expect("mbsync (package isync)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mbsync failed:\n{text}");
    assert!(!text.to_lowercase().contains("error"), "mbsync reported errors:\n{text}");
    ["cur", "new"]
        .iter()
        .map(|d| std::fs::read_dir(maildir.join("INBOX").join(d)).map(|r| r.count()).unwrap_or(0))
        .sum()
}

/// Two-way sync of the user's mailboxes with a local Maildir by offlineimap, through
/// node `i` (one run); returns the names of the files in the Maildir's INBOX.
fn offlineimap(m: &Mail, i: usize, dir: &std::path::Path) -> Vec<String> {
    let config = dir.join("offlineimaprc");
    std::fs::create_dir_all(dir.join("mail")).unwrap();
    std::fs::write(
        &config,
        format!(
            "[general]\naccounts = tandem\nmetadata = {dir}/meta\n\n\
             [Account tandem]\nlocalrepository = local\nremoterepository = remote\n\n\
             [Repository local]\ntype = Maildir\nlocalfolders = {dir}/mail\n\n\
             [Repository remote]\ntype = IMAP\nremotehost = 127.0.0.1\nremoteport = {}\n\
             remoteuser = {USER}\nremotepass = {PASSWORD}\nssl = no\nstarttls = no\n",
            m.imap[i].port(),
            dir = dir.display()
        ),
    )
    .unwrap();
    harness::require_tools();
    let out = Command::new("offlineimap")
        .arg("-c")
        .arg(&config)
        .arg("-o")
        .arg("-u")
        .arg("basic")
        .output()
        .expect("offlineimap (package offlineimap3)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "offlineimap failed:\n{text}");
    assert!(!text.contains("ERROR"), "offlineimap reported errors:\n{text}");
    let mut files: Vec<String> = ["cur", "new"]
        .iter()
        .flat_map(|d| std::fs::read_dir(dir.join("mail/INBOX").join(d)).into_iter().flatten())
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    files.sort();
    files
}

fn port(a: SocketAddr) -> String {
    a.port().to_string()
}

/// Every node reports the same INBOX (UIDs, flags, HIGHESTMODSEQ); returns it.
fn same_everywhere(m: &Mail, nodes: &[usize]) -> Value {
    same_everywhere_with(m, nodes, |_| true)
}

/// The same, once the agreed state also passes `done` (two sides of a partition can
/// look alike by UIDs and flags before they have merged).
fn same_everywhere_with(m: &Mail, nodes: &[usize], done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let states: Vec<Value> = nodes.iter().map(|i| client(&["state", &port(m.imap[*i]), USER, PASSWORD])).collect();
        if states.windows(2).all(|w| w[0] == w[1]) && done(&states[0]) {
            return states[0].clone();
        }
        assert!(std::time::Instant::now() < deadline, "servers disagree: {states:#?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn lmtp_delivery_imap_work_and_agreement_across_servers() {
    let m = start("mode = \"sync\"\nreplicas = 1");
    let r = client(&["lmtp", &port(m.lmtp[0]), "sender@example.net", "3", USER]);
    assert_eq!(r["refused"], serde_json::json!([{}, {}, {}]), "all accepted with 250");
    let r = client(&["lmtp-unknown", &port(m.lmtp[0]), "nobody@example.org"]);
    assert_eq!(r["refused"]["nobody@example.org"], 550);
    client(&["wait-count", &port(m.imap[1]), USER, PASSWORD, "3"]);
    client(&["work", &port(m.imap[1]), USER, PASSWORD]);
    let s = same_everywhere(&m, &[0, 1, 2]);
    let messages = s["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "3 delivered + 1 appended - 1 expunged: {s}");
    assert!(messages.iter().any(|m| m[1] == serde_json::json!(["\\Flagged"])), "{s}");
    let r = client(&["bad-password", &port(m.imap[2]), USER]);
    assert!(r["seconds"].as_f64().unwrap() >= 0.9, "refused after a delay: {r}");
    // Another user sees none of alice's mail.
    let bob = client(&["state", &port(m.imap[2]), "bob@example.org", "another password"]);
    assert_eq!(bob["messages"], serde_json::json!([]));
}

#[test]
fn kill_9_during_imap_work_and_every_server_agrees_after_restart() {
    let mut m = start("mode = \"sync\"\nreplicas = 1");
    client(&["lmtp", &port(m.lmtp[0]), "sender@example.net", "4", USER]);
    let s = client(&["wait-count", &port(m.imap[1]), USER, PASSWORD, "4"]);
    let first = s["messages"][0][0].to_string();
    client(&["flag", &port(m.imap[1]), USER, PASSWORD, &first, "\\Seen"]);
    let maildir = tempfile::tempdir().unwrap();
    let local = maildir.path().join("mail");
    assert_eq!(mbsync(&m, 1, &local), 4, "mbsync before the kill");
    m.cluster.kill9(0);
    // Node 2 goes on: a new root, new masters, and replicas on node 3.
    let mut appended = 0;
    for i in 0..50 {
        harness::require_tools();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/mail.py");
        let out = Command::new("python3")
            .arg(script)
            .args(["append", &port(m.imap[1]), USER, PASSWORD, &format!("after kill {i}")])
            .output()
            .unwrap();
        if out.status.success() {
            appended += 1;
            if appended == 3 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(appended, 3, "node 2 keeps accepting mail with node 1 dead");
    client(&["flag", &port(m.imap[1]), USER, PASSWORD, &first, "\\Answered"]);
    m.cluster.spawn(0);
    m.cluster.wait_up(0);
    let s = same_everywhere(&m, &[0, 1, 2]);
    let messages = s["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 7, "{s}");
    assert_eq!(mbsync(&m, 2, &local), 7, "mbsync after the restart, from another server: no duplicates");
    assert_eq!(mbsync(&m, 0, &local), 7, "and again from the restarted one");
    assert!(
        messages.iter().any(|x| x[1] == serde_json::json!(["\\Answered", "\\Seen"])),
        "flags set before and after the kill survive: {s}"
    );
}

/// Delivers one message over LMTP to node `i`, retrying while the node cannot take it
/// yet (a fresh partition: the side elects its own root and master first).
fn deliver_until_ok(m: &Mail, i: usize) {
    for _ in 0..100 {
        harness::require_tools();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/mail.py");
        let out = Command::new("python3")
            .arg(script)
            .args(["lmtp", &port(m.lmtp[i]), "sender@example.net", "1", USER])
            .output()
            .unwrap();
        if out.status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("node {} never took the message", i + 1);
}

#[test]
fn partition_uid_conflict_seen_by_a_qresync_client() {
    let m = start("mode = \"async\"\nreplicas = 1");
    client(&["lmtp", &port(m.lmtp[0]), "sender@example.net", "1", USER]);
    same_everywhere(&m, &[0, 1, 2]);
    m.cluster.isolate(2);
    // Both sides deliver: each assigns UID 2 to a different message (the seed thread).
    deliver_until_ok(&m, 0);
    deliver_until_ok(&m, 2);
    let isolated = client(&["qresync-state", &port(m.imap[2]), USER, PASSWORD]);
    let uids: Vec<u64> = isolated["messages"].as_array().unwrap().iter().map(|x| x[0].as_u64().unwrap()).collect();
    assert_eq!(uids, vec![1, 2], "{isolated}");
    let majority = client(&["state", &port(m.imap[0]), USER, PASSWORD]);
    assert_eq!(majority["messages"].as_array().unwrap().len(), 2, "{majority}");
    m.cluster.heal();
    let healed = same_everywhere_with(&m, &[0, 1, 2], |s| s["messages"].as_array().is_some_and(|a| a.len() == 3));
    assert_eq!(healed["messages"].as_array().unwrap().len(), 3, "{healed}");
    let (v, ms) = (isolated["uidvalidity"].to_string(), isolated["highestmodseq"].to_string());
    let mut seen = Vec::new();
    for i in 0..3 {
        let r = client(&["qresync-resume", &port(m.imap[i]), USER, PASSWORD, &v, &ms, "1:2"]);
        assert_eq!(r["vanished"], serde_json::json!([2]), "node {}: UID 2 vanished: {r}", i + 1);
        let uids: Vec<u64> = r["uids"].as_array().unwrap().iter().map(|u| u.as_u64().unwrap()).collect();
        assert_eq!(uids.len(), 3, "{r}");
        assert_eq!(uids[0], 1, "the first message keeps UID 1: {r}");
        assert!(uids[1] > 2 && uids[2] > 2, "both conflicting messages got new UIDs: {r}");
        seen.push(r);
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "identical on every server: {seen:#?}");
}

/// Runs the client script; its JSON line, or None when it failed (a node stopping or
/// starting under the load).
fn try_client(args: &[&str]) -> Option<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/mail.py");
    let out = Command::new("python3").arg(script).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(out.stdout.trim_ascii()).ok()
}

/// An upgrade as an operator does it: each node in turn is stopped (SIGTERM) and
/// started again while LMTP deliveries and IMAP APPENDs go on through the nodes. A
/// restart is a normal condition: a QRESYNC client that cached the mailbox before the
/// roll sees no message vanish and none renumbered, and every acknowledged message is
/// there on every node.
#[test]
fn a_rolling_restart_under_imap_and_lmtp_load_renumbers_nothing() {
    harness::require_tools();
    let mut m = start("mode = \"async\"\nreplicas = 1");
    client(&["lmtp", &port(m.lmtp[0]), "sender@example.net", "3", USER]);
    same_everywhere_with(&m, &[0, 1, 2], |s| s["messages"].as_array().is_some_and(|a| a.len() == 3));
    let cached = client(&["qresync-state", &port(m.imap[0]), USER, PASSWORD]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (imap, lmtp, stop) = (m.imap.clone(), m.lmtp.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut acked = 0usize;
            let mut k = 0usize;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let node = k % 3;
                let ok = if k.is_multiple_of(2) {
                    try_client(&["lmtp", &port(lmtp[node]), "sender@example.net", "1", USER])
                        .is_some_and(|r| r["refused"] == serde_json::json!([{}]))
                } else {
                    try_client(&["append", &port(imap[node]), USER, PASSWORD, &format!("roll {k}")]).is_some()
                };
                acked += usize::from(ok);
                k += 1;
            }
            acked
        })
    };
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        let pid = m.cluster.pid(i).expect("running");
        Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
        assert!(m.cluster.wait_exit(i, Duration::from_secs(20)).is_some(), "node {} did not stop", i + 1);
        std::thread::sleep(Duration::from_millis(300));
        m.cluster.spawn(i);
        m.cluster.wait_up(i);
        m.cluster.wait_linked();
    }
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acked = load.join().expect("load");
    assert!(acked >= 6, "the load went on through the roll: {acked} acknowledged");
    let expected = 3 + acked;
    let settled =
        same_everywhere_with(&m, &[0, 1, 2], |s| s["messages"].as_array().is_some_and(|a| a.len() >= expected));
    let before: Vec<u64> =
        cached["messages"].as_array().unwrap().iter().map(|x| x[0].as_u64().unwrap()).collect::<Vec<_>>();
    let (v, ms) = (cached["uidvalidity"].to_string(), cached["highestmodseq"].to_string());
    let known = format!("1:{}", before.iter().max().copied().unwrap_or(1));
    for i in 0..3 {
        let r = client(&["qresync-resume", &port(m.imap[i]), USER, PASSWORD, &v, &ms, &known]);
        assert_eq!(r["vanished"], serde_json::json!([]), "node {}: nothing vanished: {r}", i + 1);
        let uids: Vec<u64> = r["uids"].as_array().unwrap().iter().map(|u| u.as_u64().unwrap()).collect();
        assert!(before.iter().all(|u| uids.contains(u)), "node {}: the cached UIDs stay: {r}", i + 1);
        assert!(uids.len() >= expected, "node {}: {} messages, {expected} acknowledged", i + 1, uids.len());
    }
    let uids: Vec<u64> = settled["messages"].as_array().unwrap().iter().map(|x| x[0].as_u64().unwrap()).collect();
    assert_eq!(uids, (1..=uids.len() as u64).collect::<Vec<_>>(), "UIDs 1..n, none skipped by a renumbering");
}
