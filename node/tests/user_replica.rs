//! A user replica on real processes: a 3-node cluster serving IMAP over TLS, a laptop's
//! tandem node (`user_replica = true`, IMAP on loopback), and `tandem replicate` between
//! them. Both sides change while apart; a sync brings them together, as IMAP clients on
//! both sides see, with QRESYNC's VANISHED for the laptop's renumbered UIDs. The cluster
//! refuses a wrong password, another user's mailboxes and anything a master does.

mod harness;

use harness::Cluster;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use tandem_node::admin::{AdminAddr, AdminReply, AdminRequest, Dump};

const ALICE: &str = "alice@example.org";
const ALICE_PASSWORD: &str = "correct horse battery staple";
const LAPTOP_PASSWORD: &str = "the laptop's own";

struct Setup {
    cluster: Cluster,
    laptop: Cluster,
    cluster_imap: Vec<SocketAddr>,
    cluster_imaps: Vec<SocketAddr>,
    laptop_imap: SocketAddr,
    tls_dir: tempfile::TempDir,
}

fn start() -> Setup {
    start_laptop("")
}

/// The cluster, and a laptop with `extra` in its config (a partial replica's spec).
fn start_laptop(extra: &str) -> Setup {
    start_with(extra, "")
}

/// [`start_laptop`], with `third` in the third cluster server's config.
fn start_with(extra: &str, third: &str) -> Setup {
    let third = third.to_string();
    let tls_dir = tempfile::tempdir().unwrap();
    harness::make_mail_tls(tls_dir.path());
    let users = tls_dir.path().join("users");
    tandem_node::users::add_user(&users, ALICE, ALICE_PASSWORD.as_bytes()).unwrap();
    tandem_node::users::add_user(&users, "bob@example.org", b"bob's password").unwrap();
    let cluster_imap: Vec<SocketAddr> = (0..3).map(|_| harness::free_port()).collect();
    let cluster_imaps: Vec<SocketAddr> = (0..3).map(|_| harness::free_port()).collect();
    let (imap, imaps, users_path, dir) =
        (cluster_imap.clone(), cluster_imaps.clone(), users.clone(), tls_dir.path().to_path_buf());
    let cluster = Cluster::start_with(3, "", move |i| {
        format!(
            "imap = \"{}\"\nimaps = \"{}\"\nusers_file = \"{}\"\nmail_tls_cert = \"{d}/mail.pem\"\nmail_tls_key = \"{d}/mail.key\"\n{}",
            imap[i],
            imaps[i],
            users_path.display(),
            if i == 2 { third.as_str() } else { "" },
            d = dir.display()
        )
    });
    let laptop_users = tls_dir.path().join("laptop-users");
    tandem_node::users::add_user(&laptop_users, ALICE, LAPTOP_PASSWORD.as_bytes()).unwrap();
    let laptop_imap = harness::free_port();
    let laptop = Cluster::start_with(1, &format!("user_replica = true\n{extra}"), move |_| {
        format!("imap = \"{laptop_imap}\"\nusers_file = \"{}\"", laptop_users.display())
    });
    Setup { cluster, laptop, cluster_imap, cluster_imaps, laptop_imap, tls_dir }
}

impl Setup {
    fn password_file(&self, password: &str) -> PathBuf {
        let path = self.tls_dir.path().join(format!("password-{}", password.len()));
        harness::write_private(&path, password);
        path
    }

    /// Runs `tandem replicate` once; its exit status and what it printed.
    fn replicate(&self, password: &str) -> (bool, String) {
        let AdminAddr::Unix(socket) = &self.laptop.admin[0] else { panic!("a Unix admin socket") };
        let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .arg("replicate")
            .arg("--admin")
            .arg(socket)
            .arg("--server")
            .arg(self.cluster_imaps[1].to_string())
            .arg("--user")
            .arg(ALICE)
            .arg("--password-file")
            .arg(self.password_file(password))
            .arg("--ca-file")
            .arg(self.tls_dir.path().join("ca.pem"))
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    fn laptop_dump(&self, mailbox: &str) -> Dump {
        self.laptop.dump(0, &format!("{ALICE}/{mailbox}"))
    }

    fn cluster_dump(&self, mailbox: &str) -> Dump {
        self.cluster.converged(&format!("{ALICE}/{mailbox}"), Duration::from_secs(30))
    }
}

/// UIDVALIDITY and (UID, GUID, sorted flags): what both sides must show alike.
fn shape(d: &Dump) -> (u32, Vec<(u32, String, Vec<String>)>) {
    let mut messages: Vec<(u32, String, Vec<String>)> = d
        .messages
        .iter()
        .map(|m| {
            let mut flags = m.flags.clone();
            flags.sort();
            (m.uid, m.guid.clone(), flags)
        })
        .collect();
    messages.sort();
    (d.uidvalidity, messages)
}

/// A blocking IMAP client, just enough for the checks.
struct Imap {
    conn: BufReader<TcpStream>,
    tag: u32,
}

impl Imap {
    fn login(addr: SocketAddr, user: &str, password: &str) -> Imap {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut imap = Imap { conn: BufReader::new(tcp), tag: 0 };
        let greeting = imap.read_line();
        assert!(greeting.starts_with("* OK"), "{greeting}");
        let (ok, lines) = imap.run(&format!("LOGIN \"{user}\" \"{password}\""));
        assert!(ok, "login: {lines:?}");
        imap
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.conn.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the server closed the connection");
        line.trim_end().to_string()
    }

    /// Sends a command; whether it ended OK, and every line of the answer.
    fn run(&mut self, command: &str) -> (bool, Vec<String>) {
        self.send(command.as_bytes())
    }

    fn send(&mut self, command: &[u8]) -> (bool, Vec<String>) {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        let stream = self.conn.get_mut();
        stream.write_all(format!("{tag} ").as_bytes()).unwrap();
        stream.write_all(command).unwrap();
        stream.write_all(b"\r\n").unwrap();
        let mut lines = Vec::new();
        loop {
            let line = self.read_line();
            if let Some(rest) = line.strip_prefix(&format!("{tag} ")) {
                let ok = rest.starts_with("OK");
                lines.push(line);
                return (ok, lines);
            }
            lines.push(line);
        }
    }

    fn append(&mut self, mailbox: &str, flags: &str, body: &str) {
        let mut command = format!("APPEND \"{mailbox}\" ({flags}) {{{}+}}\r\n", body.len()).into_bytes();
        command.extend_from_slice(body.as_bytes());
        let (ok, lines) = self.send(&command);
        assert!(ok, "append: {lines:?}");
    }

    fn ok(&mut self, command: &str) -> Vec<String> {
        let (ok, lines) = self.run(command);
        assert!(ok, "{command}: {lines:?}");
        lines
    }

    /// The answer to `command` once it is OK, tried every 100 ms for 5 s (a body on its
    /// way from a peer); empty if it never was.
    fn once_ok(&mut self, command: &str) -> String {
        for _ in 0..50 {
            let (ok, lines) = self.run(command);
            if ok {
                return lines.join("\n");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        String::new()
    }

    /// UID -> FLAGS of a mailbox, as a client sees them (flags sorted).
    fn flags_by_uid(&mut self, mailbox: &str) -> Vec<(u32, Vec<String>)> {
        self.ok(&format!("EXAMINE \"{mailbox}\""));
        let lines = self.ok("UID FETCH 1:* (FLAGS)");
        let mut out = Vec::new();
        for line in lines.iter().filter(|l| l.contains(" FETCH (")) {
            let uid = number_after(line, "UID ").unwrap();
            let flags = between(line, "FLAGS (", ")").unwrap_or_default();
            let mut flags: Vec<String> =
                flags.split_whitespace().filter(|f| *f != "\\Recent").map(str::to_string).collect();
            flags.sort();
            out.push((uid, flags));
        }
        out.sort();
        out
    }

    /// The folder names LIST shows.
    fn folders(&mut self) -> Vec<String> {
        let lines = self.ok("LIST \"\" \"*\"");
        let mut names: Vec<String> = lines
            .iter()
            .filter(|l| l.starts_with("* LIST"))
            .filter_map(|l| l.rsplit_once(' ').map(|(_, name)| name.trim_matches('"').to_string()))
            .collect();
        names.sort();
        names
    }
}

fn number_after(line: &str, key: &str) -> Option<u32> {
    let at = line.find(key)? + key.len();
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn between(line: &str, open: &str, close: &str) -> Option<String> {
    let at = line.find(open)? + open.len();
    let end = line[at..].find(close)? + at;
    Some(line[at..end].to_string())
}

/// "1,3:5" -> [1, 3, 4, 5].
fn uid_set(text: &str) -> Vec<u32> {
    let mut uids = Vec::new();
    for part in text.split(',') {
        match part.split_once(':') {
            Some((a, b)) => uids.extend(a.parse::<u32>().unwrap()..=b.parse::<u32>().unwrap()),
            None => uids.push(part.parse().unwrap()),
        }
    }
    uids
}

fn body(subject: &str) -> String {
    format!("From: someone@example.org\r\nTo: {ALICE}\r\nSubject: {subject}\r\n\r\n{subject}, the text.\r\n")
}

#[test]
fn a_laptop_and_the_cluster_change_apart_and_one_replicate_brings_them_together() {
    let s = start();
    for i in 1..=3 {
        s.cluster.deliver(0, &format!("{ALICE}/INBOX"), &body(&format!("cluster {i}"))).unwrap();
    }
    s.cluster.deliver(0, "bob@example.org/INBOX", &body("bob's own")).unwrap();
    let (ok, report) = s.replicate(ALICE_PASSWORD);
    assert!(ok, "first sync: {report}");
    assert!(report.contains("in sync"), "{report}");
    assert_eq!(shape(&s.laptop_dump("INBOX")), shape(&s.cluster_dump("INBOX")));
    assert_eq!(s.laptop_dump("INBOX").messages.len(), 3);
    // Only alice's mail came down.
    assert!(s.laptop.dump(0, "bob@example.org/INBOX").messages.is_empty());

    // The laptop's client remembers where it was (QRESYNC).
    let mut laptop = Imap::login(s.laptop_imap, ALICE, LAPTOP_PASSWORD);
    laptop.ok("ENABLE QRESYNC");
    let selected = laptop.ok("SELECT INBOX");
    let uidvalidity = selected.iter().find_map(|l| number_after(l, "[UIDVALIDITY ")).unwrap();
    let highest = selected.iter().find_map(|l| number_after(l, "[HIGHESTMODSEQ ")).unwrap();

    // Apart. The cluster: a new message (UID 4), a flag, an expunge.
    s.cluster.deliver(2, &format!("{ALICE}/INBOX"), &body("cluster 4")).unwrap();
    let mut on_cluster = Imap::login(s.cluster_imap[0], ALICE, ALICE_PASSWORD);
    on_cluster.ok("SELECT INBOX");
    on_cluster.ok("UID STORE 1 +FLAGS (\\Flagged)");
    on_cluster.ok("UID STORE 2 +FLAGS (\\Deleted)");
    on_cluster.ok("UID EXPUNGE 2");
    drop(on_cluster);
    // The laptop: a new message (also UID 4 there), a draft in a new folder, a message
    // moved to another new folder, a flag.
    laptop.ok("UNSELECT");
    laptop.append("INBOX", "", &body("written offline"));
    laptop.ok("CREATE Notes");
    laptop.append("Notes", "\\Draft", &body("a draft"));
    laptop.ok("CREATE Archive");
    laptop.ok("SELECT INBOX");
    laptop.ok("UID MOVE 3 Archive");
    laptop.ok("UID STORE 1 +FLAGS (\\Seen)");
    laptop.ok("LOGOUT");
    assert_eq!(s.laptop_dump("INBOX").messages.iter().map(|m| m.uid).max(), Some(4));

    let (ok, report) = s.replicate(ALICE_PASSWORD);
    assert!(ok, "second sync: {report}");
    eprintln!("second sync: {report}");

    // Both sides alike, message for message, as the admin dumps and IMAP clients see.
    for mailbox in ["INBOX", "Notes", "Archive"] {
        assert_eq!(shape(&s.laptop_dump(mailbox)), shape(&s.cluster_dump(mailbox)), "{mailbox}");
    }
    let mut laptop = Imap::login(s.laptop_imap, ALICE, LAPTOP_PASSWORD);
    let mut cluster = Imap::login(s.cluster_imap[2], ALICE, ALICE_PASSWORD);
    assert_eq!(laptop.folders(), cluster.folders());
    assert_eq!(laptop.folders(), vec!["Archive", "INBOX", "Notes"]);
    for mailbox in ["INBOX", "Notes", "Archive"] {
        assert_eq!(laptop.flags_by_uid(mailbox), cluster.flags_by_uid(mailbox), "{mailbox}");
    }
    // Nothing acknowledged is lost: cluster 1 and 4, the offline message in INBOX, the
    // moved message in Archive, the draft in Notes; cluster 2 expunged.
    let inbox = laptop.flags_by_uid("INBOX");
    assert_eq!(inbox.len(), 3, "{inbox:?}");
    assert!(
        inbox
            .iter()
            .any(|(uid, f)| *uid == 1 && f.contains(&"\\Seen".to_string()) && f.contains(&"\\Flagged".to_string())),
        "both sides' flags on UID 1: {inbox:?}"
    );
    assert_eq!(laptop.flags_by_uid("Archive").len(), 1);
    assert_eq!(laptop.flags_by_uid("Notes").len(), 1);
    laptop.ok("EXAMINE INBOX");
    let texts = laptop.ok("UID FETCH 1:* (BODY.PEEK[TEXT])").join("\n");
    for subject in ["cluster 1", "cluster 4", "written offline"] {
        assert!(texts.contains(&format!("{subject}, the text.")), "{subject} in {texts}");
    }
    assert!(!texts.contains("cluster 2, the text."), "{texts}");

    // The laptop's client, back, hears that UID 4 vanished (the offline message took a
    // new UID: two messages had UID 4), as well as the expunge and the move.
    laptop.ok("ENABLE QRESYNC");
    let reselected = laptop.ok(&format!("SELECT INBOX (QRESYNC ({uidvalidity} {highest}))"));
    let vanished: Vec<u32> = reselected
        .iter()
        .find_map(|l| l.strip_prefix("* VANISHED (EARLIER) "))
        .map(uid_set)
        .unwrap_or_else(|| panic!("no VANISHED in {reselected:?}"));
    for uid in [2, 3, 4] {
        assert!(vanished.contains(&uid), "UID {uid} not in VANISHED {vanished:?}");
    }
    let now = laptop.flags_by_uid("INBOX");
    assert!(now.iter().all(|(uid, _)| *uid != 4), "UID 4 is retired: {now:?}");

    // A third sync has nothing to do.
    let (ok, report) = s.replicate(ALICE_PASSWORD);
    assert!(ok && report.contains("pushed 0 records") && report.contains("pulled 0 records"), "{report}");
}

#[test]
fn the_cluster_refuses_a_wrong_password_another_user_s_mail_and_a_master_s_work() {
    let s = start();
    s.cluster.deliver(0, "bob@example.org/INBOX", &body("bob's own")).unwrap();
    let (ok, report) = s.replicate("not the password");
    assert!(!ok, "{report}");
    assert!(report.contains("AUTHENTICATIONFAILED"), "{report}");
    assert!(s.laptop_dump("INBOX").messages.is_empty());

    // X-REPLICATE needs a login.
    let mut plain = TcpStream::connect(s.cluster_imap[0]).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(plain.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    plain.write_all(b"r X-REPLICATE 2\r\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("r NO"), "{line}");

    // Logged in, an agent of another link version is refused by name, and the session
    // goes on as IMAP.
    plain.write_all(format!("a LOGIN \"{ALICE}\" \"{ALICE_PASSWORD}\"\r\n").as_bytes()).unwrap();
    let tagged = |reader: &mut BufReader<TcpStream>, tag: &str| {
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 && !line.starts_with(tag) {
            line.clear();
        }
        line
    };
    assert!(tagged(&mut reader, "a ").starts_with("a OK"));
    plain.write_all(b"r X-REPLICATE\r\n").unwrap();
    let refused = tagged(&mut reader, "r ");
    assert!(refused.contains("replica link version 3 and the agent 1 (unnamed)"), "{refused}");
    plain.write_all(b"n NOOP\r\n").unwrap();
    assert!(tagged(&mut reader, "n ").starts_with("n OK"));

    // Logged in as alice, on the link: bob's mailboxes and a master's requests refused.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        use tandem_core::io::{ClientReply, ClientRequest};
        use tandem_node::replica_link::{ReplyFrame, RequestFrame, read_frame, write_frame};
        use tandem_node::replicate::{ClusterLogin, TlsMode, open_cluster};
        let login = ClusterLogin {
            host: "127.0.0.1".into(),
            port: s.cluster_imaps[0].port(),
            tls: TlsMode::Implicit,
            user: ALICE.into(),
            password: ALICE_PASSWORD.into(),
            ca_file: Some(s.tls_dir.path().join("ca.pem")),
            compress: true,
        };
        let mut link = open_cluster(&login).await.unwrap();
        let bob = tandem_core::MailboxKey::new("bob@example.org", "INBOX");
        let own = tandem_core::MailboxKey::new(ALICE, "INBOX");
        let requests = vec![
            ClientRequest::ReplicaList { user: "bob@example.org".into(), partial: None },
            ClientRequest::ReplicaPull { mailbox: bob.clone(), since: None, partial: None },
            ClientRequest::ReplicaBodies { mailbox: bob.clone(), guids: vec![] },
            ClientRequest::ReplicaPush {
                state: tandem_core::MailboxState::empty(bob.clone(), 1),
                bodies: vec![],
                from_cluster: vec![],
            },
            ClientRequest::ReplicaAdopt {
                state: tandem_core::MailboxState::empty(own.clone(), 1),
                bodies: vec![],
                pushed_upto: 0,
                from_cluster: vec![],
            },
            ClientRequest::MasterMove { mailbox: own.clone() },
            ClientRequest::Save { mailbox: own.clone(), received: 0, flags: vec![], body: "x".into(), delivery: false },
            ClientRequest::ReplicaList { user: ALICE.into(), partial: None },
        ];
        let count = requests.len() as u64;
        for (id, request) in requests.into_iter().enumerate() {
            write_frame(&mut link, &RequestFrame { id: id as u64, request }).await.unwrap();
        }
        let mut answers = std::collections::BTreeMap::new();
        for _ in 0..count {
            let frame: ReplyFrame = read_frame(&mut link, Duration::from_secs(30)).await.unwrap().unwrap();
            answers.insert(frame.id, frame.reply);
        }
        for id in 0..count - 1 {
            assert!(
                matches!(&answers[&id], ClientReply::Failed { .. }),
                "request {id} was not refused: {:?}",
                answers[&id]
            );
        }
        // The link goes on serving alice's own.
        assert!(matches!(&answers[&(count - 1)], ClientReply::ReplicaList { .. }), "{:?}", answers[&(count - 1)]);
    });
    // Nothing of bob's reached alice's laptop, nor did alice's refused save land.
    let (ok, report) = s.replicate(ALICE_PASSWORD);
    assert!(ok, "{report}");
    assert!(s.laptop.dump(0, "bob@example.org/INBOX").messages.is_empty());
    assert!(s.cluster_dump("INBOX").messages.is_empty());
}

#[test]
fn a_cluster_node_is_not_a_user_replica_and_a_laptop_has_no_peers() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        "id = 1\nlisten = \"127.0.0.1:7101\"\nuser_replica = true\n[[peer]]\nid = 2\naddress = \"127.0.0.1:7102\"\n";
    let e = tandem_node::config::NodeConfig::parse(text, dir.path()).unwrap_err();
    assert!(e.to_string().contains("user_replica"), "{e}");
    // On the laptop's admin socket, only replica requests are served after the switch.
    let s = start();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        use tandem_core::io::{ClientReply, ClientRequest};
        use tandem_node::replica_link::{ReplyFrame, RequestFrame, read_frame, write_frame};
        let mut link = tandem_node::replicate::open_replica(&s.laptop.admin[0]).await.unwrap();
        let own = tandem_core::MailboxKey::new(ALICE, "INBOX");
        write_frame(&mut link, &RequestFrame { id: 1, request: ClientRequest::MasterMove { mailbox: own } })
            .await
            .unwrap();
        let frame: ReplyFrame = read_frame(&mut link, Duration::from_secs(30)).await.unwrap().unwrap();
        assert!(matches!(frame.reply, ClientReply::Failed { .. }), "{:?}", frame.reply);
    });
    let reply = harness::call(&s.laptop.admin[0], &AdminRequest::Status).unwrap();
    assert!(matches!(reply, AdminReply::Status(_)));
}

/// A message with a text part and a large attachment (about 2,000 bytes of base64).
fn with_attachment(subject: &str) -> String {
    format!(
        "From: someone@example.org\r\nTo: {ALICE}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n\
         {subject}, the text.\r\n--b1\r\nContent-Type: application/octet-stream\r\n\
         Content-Disposition: attachment; filename=a.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n{}--b1--\r\n",
        "QXR0YWNobWVudEF0dGFjaG1lbnRBdHRhY2htZW50QXR0YWNobWVudEF0dGFjaG1lbnRBdHRhY2ht\r\n".repeat(26)
    )
}

/// A partial laptop (issue 17): INBOX only, bodies of up to 400 bytes. The big message
/// comes as a record and its text parts: a client reads its text and its structure at
/// once; a FETCH of the whole of it is answered NO [UNAVAILABLE] and queued, and the
/// next `tandem replicate` brings it. The laptop's expunge goes up; nothing it did not
/// hold (another folder, the big body) is touched on the cluster.
#[test]
fn a_partial_laptop_holds_inbox_and_small_bodies_and_fetches_a_big_one_when_asked() {
    let s = start_laptop("partial = { mailboxes = [\"INBOX\"], body_bytes_max = 400 }");
    s.cluster.deliver(0, &format!("{ALICE}/INBOX"), &body("small")).unwrap();
    let big = with_attachment("big");
    s.cluster.deliver(0, &format!("{ALICE}/INBOX"), &big).unwrap();
    s.cluster.deliver(0, &format!("{ALICE}/Archive"), &body("archived")).unwrap();
    let (ok, report) = s.replicate(ALICE_PASSWORD);
    assert!(ok, "first sync: {report}");
    assert!(report.contains("pulled 2 records and 1 bodies"), "the small body only: {report}");
    assert!(report.contains("text parts of 1 large messages"), "and the big one's text: {report}");
    let text_bytes: usize = between(&report, "large messages (", " bytes)").unwrap().parse().unwrap();
    assert!(text_bytes < big.len(), "the attachment stayed on the cluster: {text_bytes} of {}", big.len());
    assert_eq!(shape(&s.laptop_dump("INBOX")), shape(&s.cluster_dump("INBOX")));

    let mut laptop = Imap::login(s.laptop_imap, ALICE, LAPTOP_PASSWORD);
    assert_eq!(laptop.folders(), vec!["INBOX"], "Archive is not held");
    laptop.ok("EXAMINE INBOX");
    // The text and the structure of the big message are here, the attachment's size too.
    let text = laptop.ok("UID FETCH 2 (BODYSTRUCTURE ENVELOPE BODY.PEEK[1] BODY.PEEK[2.MIME])").join("\n");
    assert!(text.contains("big, the text.") && text.contains("\"APPLICATION\" \"OCTET-STREAM\""), "{text}");
    assert!(text.contains("\"big\""), "ENVELOPE has the subject: {text}");
    assert!(text.contains("filename=a.bin"), "the attachment's MIME header: {text}");
    assert!(!text.contains("QXR0"), "{text}");
    let (ok, lines) = laptop.run("UID FETCH 1:* (BODY.PEEK[TEXT])");
    assert!(!ok, "{lines:?}");
    let text = lines.join("\n");
    assert!(text.contains("small, the text.") && text.contains("NO [UNAVAILABLE]"), "{text}");
    assert!(!text.contains("QXR0"), "{text}");
    laptop.ok("LOGOUT");

    let (ok, report) = s.replicate(ALICE_PASSWORD);
    assert!(ok && report.contains("1 asked for by a client"), "second sync: {report}");
    let mut laptop = Imap::login(s.laptop_imap, ALICE, LAPTOP_PASSWORD);
    laptop.ok("SELECT INBOX");
    let text = laptop.ok("UID FETCH 1:* (BODY.PEEK[TEXT])").join("\n");
    assert!(text.contains("QXR0YWNobWVudEF0"), "the big body is here now: {text}");
    laptop.ok("UID STORE 1 +FLAGS (\\Deleted)");
    laptop.ok("UID EXPUNGE 1");
    laptop.ok("LOGOUT");

    let (ok, report) = s.replicate(ALICE_PASSWORD);
    assert!(ok, "third sync: {report}");
    let inbox = s.cluster_dump("INBOX");
    assert_eq!(inbox.messages.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![2], "the expunge went up, only it");
    assert_eq!(s.cluster_dump("Archive").messages.len(), 1, "what the laptop does not hold stays");
    assert_eq!(shape(&s.laptop_dump("INBOX")), shape(&inbox));
}

/// A partial cluster server (issue 17): the third node keeps bodies above 400 bytes only
/// on demand. A big message delivered through the first is on the third as a record and
/// its text parts: its text and structure are read there at once; an IMAP FETCH of its
/// whole body there is answered NO [UNAVAILABLE] while the node fetches it from a peer,
/// and the same FETCH a moment later gets it.
#[test]
fn a_partial_cluster_server_fetches_a_big_body_from_a_peer_when_a_client_asks() {
    let s = start_with("", "partial = { body_bytes_max = 400 }");
    s.cluster.deliver(0, &format!("{ALICE}/INBOX"), &with_attachment("big")).unwrap();
    s.cluster.deliver(0, &format!("{ALICE}/INBOX"), &body("small")).unwrap();
    let dump = s.cluster_dump("INBOX");
    assert_eq!(dump.messages.len(), 2);
    let mut third = Imap::login(s.cluster_imap[2], ALICE, ALICE_PASSWORD);
    third.ok("EXAMINE INBOX");
    let mut text = String::new();
    for _ in 0..50 {
        // Its replicated save may still be on the way to the third node.
        let (ok, lines) = third.run("UID FETCH 1 (BODYSTRUCTURE BODY.PEEK[1])");
        if ok {
            text = lines.join("\n");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(text.contains("big, the text.") && text.contains("\"APPLICATION\" \"OCTET-STREAM\""), "{text}");
    assert!(!text.contains("QXR0"), "{text}");
    let (ok, lines) = third.run("UID FETCH 1:* (BODY.PEEK[TEXT])");
    let text = lines.join("\n");
    assert!(!ok && text.contains("NO [UNAVAILABLE]") && text.contains("small, the text."), "{text}");
    let got = third.once_ok("UID FETCH 1 (BODY.PEEK[TEXT])");
    assert!(got.contains("QXR0YWNobWVudEF0"), "the body came from a peer: {got}");
}

/// A partial cluster server that holds the bodies of every user's INBOX only (issue 17):
/// a message delivered to Archive through the first node is on the third as a record, and
/// an IMAP FETCH of its text there is answered NO [UNAVAILABLE] while the node fetches
/// the body from a peer, and gets it a moment later; an INBOX message's body is there at
/// once.
#[test]
fn a_partial_cluster_server_by_folder_fetches_another_folders_body_when_asked() {
    let s = start_with("", "partial = { mailboxes = [\"%/INBOX\"] }");
    s.cluster.deliver(0, &format!("{ALICE}/Archive"), &body("archived")).unwrap();
    s.cluster.deliver(0, &format!("{ALICE}/INBOX"), &body("inboxed")).unwrap();
    assert_eq!(s.cluster_dump("Archive").messages.len(), 1);
    let mut third = Imap::login(s.cluster_imap[2], ALICE, ALICE_PASSWORD);
    let mut inbox = String::new();
    for _ in 0..50 {
        // The replicated saves may still be on the way to the third node.
        third.ok("EXAMINE INBOX");
        let (ok, lines) = third.run("UID FETCH 1 (BODY.PEEK[TEXT])");
        if ok && lines.iter().any(|l| l.contains("FETCH")) {
            inbox = lines.join("\n");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(inbox.contains("inboxed, the text."), "an INBOX body is held: {inbox}");
    third.ok("EXAMINE Archive");
    let (ok, lines) = third.run("UID FETCH 1 (BODY.PEEK[TEXT])");
    let first = lines.join("\n");
    assert!(!ok && first.contains("NO [UNAVAILABLE]"), "Archive's body is left out: {first}");
    let got = third.once_ok("UID FETCH 1 (BODY.PEEK[TEXT])");
    assert!(got.contains("archived, the text."), "the body came from a peer: {got}");
}
