//! The attack suite: each test reproduces one way a node was broken from outside (issue
//! "Hostile input and load") against real `tandem` processes, and checks that the node
//! stays up, keeps serving everyone else within a stated time, keeps its memory within a
//! stated bound, and answers the attacker with the protocol's error.

mod harness;

use harness::{Cluster, SECRET};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tandem_node::admin::{AdminAddr, AdminRequest};

const USER: &str = "alice@example.org";
const PASSWORD: &str = "correct horse battery";
/// Another client is served within this while an attack runs.
const SERVED_WITHIN: Duration = Duration::from_secs(3);

struct Mail {
    cluster: Cluster,
    imap: Vec<SocketAddr>,
    lmtp: Vec<SocketAddr>,
}

/// `n` nodes with IMAP, LMTP and two users; `limits` goes into every node's `[limits]`.
fn start(n: usize, extra: &str, limits: &str) -> Mail {
    let users = tempfile::NamedTempFile::new().unwrap().into_temp_path().keep().unwrap();
    tandem_node::users::add_user(&users, USER, PASSWORD.as_bytes()).unwrap();
    tandem_node::users::add_user(&users, "bob@example.org", b"another password").unwrap();
    let imap: Vec<SocketAddr> = (0..n).map(|_| harness::free_port()).collect();
    let lmtp: Vec<SocketAddr> = (0..n).map(|_| harness::free_port()).collect();
    let (i2, l2, u2, x2, lim) = (imap.clone(), lmtp.clone(), users.clone(), extra.to_string(), limits.to_string());
    let cluster = Cluster::start_with(n, "", move |i| {
        format!(
            "imap = \"{}\"\nlmtp = \"{}\"\nusers_file = \"{}\"\n{x2}\n[limits]\n{lim}\n",
            i2[i],
            l2[i],
            u2.display()
        )
    });
    Mail { cluster, imap, lmtp }
}

/// A minimal IMAP client: lines and tagged answers.
struct Imap {
    r: BufReader<TcpStream>,
    w: TcpStream,
    tag: u32,
}

impl Imap {
    fn connect(addr: SocketAddr) -> Imap {
        Imap::connect_from(addr, None)
    }

    /// From a chosen loopback source address (127.0.0.x), so that per-address limits
    /// can tell an attacker from an honest client on one machine.
    fn connect_from(addr: SocketAddr, source: Option<[u8; 4]>) -> Imap {
        let stream = connect_from(addr, source);
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut imap = Imap { r: BufReader::new(stream.try_clone().unwrap()), w: stream, tag: 0 };
        let greeting = imap.line();
        assert!(greeting.starts_with("* OK"), "greeting: {greeting:?}");
        imap
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap_or(0);
        line
    }

    /// Sends `command` with a fresh tag; returns (untagged lines, tagged line).
    fn run(&mut self, command: &str) -> (Vec<String>, String) {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        self.w.write_all(format!("{tag} {command}\r\n").as_bytes()).unwrap();
        let mut untagged = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                return (untagged, String::new());
            }
            if line.starts_with(&format!("{tag} ")) {
                return (untagged, line);
            }
            untagged.push(line);
        }
    }

    fn login(&mut self) {
        let (_, done) = self.run(&format!("LOGIN \"{USER}\" \"{PASSWORD}\""));
        assert!(done.contains("OK"), "{done}");
    }
}

fn connect_from(addr: SocketAddr, source: Option<[u8; 4]>) -> TcpStream {
    match source {
        None => TcpStream::connect(addr).unwrap(),
        Some(ip) => {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
            socket.connect(&addr.into()).unwrap();
            socket.into()
        }
    }
}

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    kib / 1024
}

/// CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<u64> = after_name.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    // utime and stime are fields 14 and 15 of the line; after the name, 12 and 13 (the
    // state letter is not a number, so they are at 10 and 11 of the numbers).
    let ticks = fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// An honest client's login and SELECT, timed.
fn honest_session(addr: SocketAddr, source: Option<[u8; 4]>) -> Duration {
    let started = Instant::now();
    let mut imap = Imap::connect_from(addr, source);
    imap.login();
    let (_, done) = imap.run("SELECT INBOX");
    assert!(done.contains("OK"), "{done}");
    started.elapsed()
}

/// LMTP: one message to `rcpts`; returns the replies after DATA.
fn lmtp_deliver(addr: SocketAddr, rcpts: &[&str], body: &[u8]) -> (Vec<String>, Vec<String>) {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut r = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let read_reply = |r: &mut BufReader<TcpStream>| {
        let mut all = String::new();
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            all.push_str(&l);
            if l.len() < 4 || l.as_bytes()[3] != b'-' {
                return all;
            }
        }
    };
    w.write_all(b"LHLO test\r\n").unwrap();
    read_reply(&mut r);
    w.write_all(b"MAIL FROM:<sender@example.net>\r\n").unwrap();
    read_reply(&mut r);
    let mut rcpt_replies = Vec::new();
    // Pipelined (RFC 2920): all RCPTs, then their replies.
    let mut rcpts_text = String::new();
    for rcpt in rcpts {
        rcpts_text.push_str(&format!("RCPT TO:<{rcpt}>\r\n"));
    }
    w.write_all(rcpts_text.as_bytes()).unwrap();
    for _ in rcpts {
        rcpt_replies.push(read_reply(&mut r));
    }
    let accepted = rcpt_replies.iter().filter(|r| r.starts_with("250")).count();
    if accepted == 0 {
        return (rcpt_replies, Vec::new());
    }
    w.write_all(b"DATA\r\n").unwrap();
    let go = read_reply(&mut r);
    assert!(go.starts_with("354"), "{go}");
    w.write_all(body).unwrap();
    w.write_all(b"\r\n.\r\n").unwrap();
    let data_replies = (0..accepted).map(|_| read_reply(&mut r)).collect();
    (rcpt_replies, data_replies)
}

/// `depth` multiparts, each inside the one before, around one text part.
fn nested_multiparts(depth: usize) -> Vec<u8> {
    let mut mail = b"From: a@example.org\r\nSubject: deep\r\nMIME-Version: 1.0\r\n".to_vec();
    for i in 0..depth {
        mail.extend_from_slice(
            format!("Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n").as_bytes(),
        );
    }
    mail.extend_from_slice(b"Content-Type: text/plain\r\n\r\nhello\r\n");
    for i in (0..depth).rev() {
        mail.extend_from_slice(format!("--b{i}--\r\n").as_bytes());
    }
    mail
}

#[test]
fn one_deeply_nested_email_is_described_by_every_node_which_stays_up() {
    let m = start(3, "", "");
    let mail = nested_multiparts(8000);
    assert!(mail.len() > 500_000, "{} bytes, as in the report", mail.len());
    let (_, replies) = lmtp_deliver(m.lmtp[0], &[USER], &mail);
    assert!(replies[0].starts_with("250"), "{replies:?}");
    m.cluster.converged(&format!("{USER}/INBOX"), Duration::from_secs(60));
    for node in 0..3 {
        let started = Instant::now();
        let mut imap = Imap::connect(m.imap[node]);
        imap.login();
        imap.run("SELECT INBOX");
        let (lines, done) = imap.run("FETCH 1:* (BODYSTRUCTURE)");
        assert!(done.contains("OK"), "node {}: {done}\n{}", node + 1, m.cluster.log(node));
        assert!(lines[0].contains("BODYSTRUCTURE ((((("), "{}", &lines[0][..200.min(lines[0].len())]);
        assert!(started.elapsed() < SERVED_WITHIN, "{:?}", started.elapsed());
        eprintln!(
            "figure: node {} answered FETCH 1:* (BODYSTRUCTURE) of 8000 levels in {:?}",
            node + 1,
            started.elapsed()
        );
        // And again: the node is up, not restarting.
        assert_eq!(m.cluster.status(node).id, node as u32 + 1);
    }
}

/// One rule for NUL on every path: LMTP takes it, FETCH shows it as 0x80 in a plain
/// literal and as itself in BINARY's literal8, and an APPEND with NUL in a plain literal
/// is refused saying why.
#[test]
fn a_nul_byte_follows_one_rule_on_every_path() {
    let m = start(1, "", "");
    let (_, replies) = lmtp_deliver(m.lmtp[0], &[USER], b"Subject: nul\r\n\r\nx\0y\r\n");
    assert!(replies[0].starts_with("250"), "{replies:?}");
    let stream = TcpStream::connect(m.imap[0]).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    // Everything up to and including the line starting with `tag`.
    let mut until = |tag: &[u8]| -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let mut line = Vec::new();
            if std::io::BufRead::read_until(&mut r, b'\n', &mut line).unwrap_or(0) == 0 {
                return all;
            }
            all.extend_from_slice(&line);
            if line.starts_with(tag) {
                return all;
            }
        }
    };
    until(b"* OK");
    w.write_all(format!("a LOGIN \"{USER}\" \"{PASSWORD}\"\r\nb SELECT INBOX\r\n").as_bytes()).unwrap();
    until(b"b ");
    w.write_all(b"c FETCH 1 (BODY.PEEK[TEXT] BINARY.PEEK[1])\r\n").unwrap();
    let fetched = until(b"c ");
    let has = |needle: &[u8]| fetched.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"BODY[TEXT] {7}\r\nx\x80y\r\n"), "{}", String::from_utf8_lossy(&fetched));
    assert!(has(b"BINARY[1] ~{7}\r\nx\0y\r\n"), "{}", String::from_utf8_lossy(&fetched));
    w.write_all(b"d APPEND INBOX {3}\r\n").unwrap();
    until(b"+");
    w.write_all(b"a\0b\r\n").unwrap();
    let refused = String::from_utf8_lossy(&until(b"d ")).into_owned();
    assert!(refused.contains("d BAD a literal may not contain NUL"), "{refused}");
}

#[test]
fn list_patterns_and_huge_names_cost_little_and_refuse_cleanly() {
    let m = start(3, "", "");
    let mut imap = Imap::connect(m.imap[0]);
    imap.login();
    let (_, done) = imap.run(&format!("CREATE {}", "a".repeat(60)));
    assert!(done.contains("OK"), "{done}");
    let started = Instant::now();
    let pattern = format!("{}b", "*a".repeat(13));
    let (lines, done) = imap.run(&format!("LIST \"\" \"{pattern}\""));
    assert!(done.contains("OK") && lines.is_empty(), "{lines:?} {done}");
    let pattern = format!("{}*", "*a".repeat(30));
    let (lines, done) = imap.run(&format!("LIST \"\" \"{pattern}\""));
    assert!(done.contains("OK") && lines.len() == 1, "{lines:?} {done}");
    let pattern = format!("{}b", "*a".repeat(500));
    let (lines, done) = imap.run(&format!("LIST \"\" \"{pattern}\""));
    assert!(done.contains("OK") && lines.is_empty(), "{lines:?} {done}");
    assert!(started.elapsed() < Duration::from_secs(1), "LIST took {:?}", started.elapsed());
    eprintln!("figure: three LISTs of 13 to 500 wildcards in {:?}", started.elapsed());
    // A 1.1 MiB mailbox name in a literal: refused with NO [LIMIT], and the peer links
    // never see it.
    let name = "n".repeat(1_100_000);
    imap.w.write_all(format!("big CREATE {{{}}}\r\n", name.len()).as_bytes()).unwrap();
    let go = imap.line();
    assert!(go.starts_with('+'), "{go}");
    imap.w.write_all(name.as_bytes()).unwrap();
    imap.w.write_all(b"\r\n").unwrap();
    let done = imap.line();
    assert!(done.starts_with("big NO [LIMIT]"), "{done}");
    let too_deep = vec!["d"; 40].join("/");
    let (_, done) = imap.run(&format!("CREATE {too_deep}"));
    assert!(done.contains("NO [LIMIT]"), "{done}");
    std::thread::sleep(Duration::from_secs(2));
    for node in 0..3 {
        assert!(m.cluster.status(node).links.iter().all(|l| l.connected), "node {} lost a link", node + 1);
    }
}

#[test]
fn connection_floods_are_refused_and_idle_logins_time_out() {
    let m = start(1, "", "connections_per_ip_max = 20\nlogin_timeout_s = 2");
    // Twenty idle connections from one address: the next one is told, not left hanging.
    let idle: Vec<TcpStream> = (0..20).map(|_| connect_from(m.imap[0], Some([127, 0, 0, 3]))).collect();
    let mut extra = connect_from(m.imap[0], Some([127, 0, 0, 3]));
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    let _ = extra.read_to_string(&mut answer);
    assert!(answer.starts_with("* BYE"), "{answer:?}");
    // Another address is served meanwhile.
    let took = honest_session(m.imap[0], Some([127, 0, 0, 2]));
    eprintln!("figure: login and SELECT in {took:?} with 20 idle connections from another address");
    assert!(took < SERVED_WITHIN);
    // The idle ones are logged out after the login timeout.
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        assert!(text.contains("* BYE no login in time"), "{text:?}");
    }
    assert!(honest_session(m.imap[0], Some([127, 0, 0, 3])) < SERVED_WITHIN);
    // LMTP the same way.
    let idle: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(m.lmtp[0]).unwrap()).collect();
    let mut extra = TcpStream::connect(m.lmtp[0]).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    let _ = extra.read_to_string(&mut answer);
    assert!(answer.starts_with("421"), "{answer:?}");
    drop(idle);
}

#[test]
fn oversize_lines_and_literals_are_refused_before_they_are_buffered() {
    let m = start(1, "", "");
    let pid = m.cluster.pid(0).unwrap();
    let before = rss_mib(pid);
    // A 64 MiB literal before login: refused, no "+ go ahead".
    let mut imap = Imap::connect(m.imap[0]);
    imap.w.write_all(b"a LOGIN {67108864}\r\n").unwrap();
    let answer = imap.line();
    assert!(answer.starts_with("a BAD [TOOBIG]"), "{answer}");
    // RFC 2971's largest ID (30 pairs, values of 1024 bytes) fits before login.
    let pairs: Vec<String> = (0..30).map(|i| format!("\"k{i}\" \"{}\"", "v".repeat(1024))).collect();
    let (_, done) = imap.run(&format!("ID ({})", pairs.join(" ")));
    assert!(done.contains("OK"), "{done}");
    // Eight connections each sending a 60 MiB line: each is closed after a few KiB.
    let senders: Vec<_> = (0..8)
        .map(|_| {
            let addr = m.imap[0];
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let chunk = vec![b'x'; 1024 * 1024];
                let mut sent = 0usize;
                for _ in 0..60 {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                    sent += chunk.len();
                }
                sent
            })
        })
        .collect();
    for s in senders {
        let sent = s.join().unwrap();
        assert!(sent < 60 * 1024 * 1024, "the node read a whole 60 MiB line");
    }
    // An LMTP DATA line without a line break, 100 MiB: discarded, refused with 552.
    let body = vec![b'y'; 100 * 1024 * 1024];
    let (_, replies) = lmtp_deliver(m.lmtp[0], &[USER], &body);
    assert!(replies[0].starts_with("552"), "{replies:?}");
    let after = rss_mib(pid);
    eprintln!("figure: RSS {before} MiB before, {after} MiB after 8 x 60 MiB lines and a 100 MiB LMTP line");
    assert!(after < before + 64, "RSS went from {before} MiB to {after} MiB");
    assert!(honest_session(m.imap[0], None) < SERVED_WITHIN);
}

#[test]
fn password_guessing_is_slowed_and_honest_logins_go_on() {
    let m = start(1, "", "");
    let addr = m.imap[0];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let attackers: Vec<_> = (0..30)
        .map(|_| {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut imap = Imap::connect_from(addr, Some([127, 0, 0, 3]));
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let (_, done) = imap.run(&format!("LOGIN \"{USER}\" \"guess\""));
                    if done.is_empty() {
                        return;
                    }
                    assert!(done.contains("NO [AUTHENTICATIONFAILED]"), "{done}");
                    answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let took = honest_session(addr, Some([127, 0, 0, 2]));
    std::thread::sleep(Duration::from_secs(4));
    let guesses = answered.load(std::sync::atomic::Ordering::SeqCst);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(attackers);
    assert!(took < SERVED_WITHIN, "an honest login took {took:?} during the attack");
    // 134 guesses a second before; now the attacking address is spaced out.
    assert!(guesses < 60, "{guesses} guesses answered in 6 s");
    eprintln!("attack: {guesses} guesses answered in 6 s; honest login and SELECT in {took:?}");
}

#[test]
fn logins_are_one_per_connection_and_never_as_someone_else() {
    let m = start(1, "", "");
    let mut imap = Imap::connect(m.imap[0]);
    // bob's credentials asking for alice's mailbox.
    let plain = "alice@example.org\0bob@example.org\0another password";
    let b64 = base64_encode(plain.as_bytes());
    let (_, done) = imap.run(&format!("AUTHENTICATE PLAIN {b64}"));
    assert!(done.contains("NO [AUTHORIZATIONFAILED]"), "{done}");
    imap.login();
    let (_, done) = imap.run("LOGIN \"bob@example.org\" \"another password\"");
    assert!(done.contains("BAD"), "{done}");
}

#[test]
fn plaintext_passwords_are_refused_where_tls_is_offered() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let extra = format!(
        "mail_tls_cert = \"{}\"\nmail_tls_key = \"{}\"\nplaintext_auth_on_loopback = false",
        cert.display(),
        key.display()
    );
    let m = start(1, &extra, "");
    let mut imap = Imap::connect(m.imap[0]);
    let (lines, _) = imap.run("CAPABILITY");
    assert!(lines[0].contains("LOGINDISABLED") && lines[0].contains("STARTTLS"), "{lines:?}");
    assert!(!lines[0].contains("AUTH=PLAIN"), "{lines:?}");
    let (_, done) = imap.run(&format!("LOGIN \"{USER}\" \"{PASSWORD}\""));
    assert!(done.contains("NO [PRIVACYREQUIRED]"), "{done}");
}

fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().self_signed(&key).unwrap();
    let (c, k) = (dir.join("mail.pem"), dir.join("mail.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn the_admin_interface_is_private_refuses_http_and_strangers() {
    let m = start(1, "", "");
    // The default: a Unix socket only its owner may open.
    let AdminAddr::Unix(socket) = &m.cluster.admin[0] else { panic!("a Unix socket by default") };
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(socket).unwrap().permissions().mode() & 0o777, 0o600);
    // An HTTP request on it is refused and runs nothing.
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"cmd\":\"status\"}\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.contains("HTTP is not spoken here") && !answer.contains("\"result\":\"status\""), "{answer}");

    // A TCP admin port without a token: the node refuses to start.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("n.toml");
    let port = harness::free_port();
    std::fs::write(&config, format!("id = 1\nlisten = \"{}\"\nadmin = \"{port}\"\n", harness::free_port())).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["node", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin_token_file"), "{out:?}");
    // With a token: strangers and browsers are refused, idle ones cannot lock it.
    harness::write_private(&dir.path().join("token"), "an admin token of some length");
    std::fs::write(
        &config,
        format!("id = 1\nlisten = \"{}\"\nadmin = \"{port}\"\nadmin_token_file = \"token\"\n", harness::free_port()),
    )
    .unwrap();
    let _node = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["node", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let good = AdminAddr::Tcp { addr: port, token: "an admin token of some length".into() };
    let bad = AdminAddr::Tcp { addr: port, token: "a wrong token".into() };
    assert!(harness::eventually(|| harness::call(&good, &AdminRequest::Status).is_ok()));
    let refused = harness::call(&bad, &AdminRequest::Dump { mailbox: format!("{USER}/INBOX") });
    assert!(format!("{refused:?}").contains("TOKEN"), "{refused:?}");
    let http = harness::raw_exchange(port, b"POST / HTTP/1.1\r\n\r\n{\"cmd\":\"status\"}\n");
    assert!(http.contains("HTTP is not spoken here"), "{http}");
    let idle: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(port).unwrap()).collect();
    let started = Instant::now();
    assert!(harness::call(&good, &AdminRequest::Status).is_ok());
    assert!(started.elapsed() < SERVED_WITHIN, "status took {:?} behind idle connections", started.elapsed());
    eprintln!("figure: status answered in {:?} with 64 idle admin connections open", started.elapsed());
    drop(idle);
}

/// A process stopped when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn lmtp_recipients_collapse_fold_case_and_quota_holds() {
    let m = start(1, "", "recipients_max = 2\nquota_messages = 3");
    // The same user a thousand times: one copy; the repeats are bounded too (four times
    // the recipient limit), and each accepted one is answered.
    let rcpts = vec!["bob@example.org"; 1000];
    let (rcpt_replies, data) = lmtp_deliver(m.lmtp[0], &rcpts, b"Subject: once\r\n\r\nhi");
    assert!(rcpt_replies[..8].iter().all(|r| r.starts_with("250")), "{:?}", &rcpt_replies[..9]);
    assert!(rcpt_replies[8..].iter().all(|r| r.starts_with("452")), "{:?}", &rcpt_replies[8]);
    assert_eq!(data.len(), 8);
    assert!(data.iter().all(|r| r.starts_with("250")), "{data:?}");
    assert_eq!(m.cluster.dump(0, "bob@example.org/INBOX").messages.len(), 1);
    // Case folded; a third distinct user is over the limit.
    let (rcpt_replies, _) =
        lmtp_deliver(m.lmtp[0], &["ALICE@EXAMPLE.ORG", "bob@Example.Org", "carol@example.org"], b"Subject: 2\r\n\r\n");
    assert!(rcpt_replies[0].starts_with("250") && rcpt_replies[1].starts_with("250"), "{rcpt_replies:?}");
    assert!(rcpt_replies[2].starts_with("550"), "{rcpt_replies:?}");
    assert_eq!(m.cluster.dump(0, &format!("{USER}/INBOX")).messages.len(), 1);
    // Quota: three messages, then 552 and NO [OVERQUOTA].
    for i in 0..2 {
        let (_, data) = lmtp_deliver(m.lmtp[0], &[USER], format!("Subject: q{i}\r\n\r\n").as_bytes());
        assert!(data[0].starts_with("250"), "{data:?}");
    }
    let (_, data) = lmtp_deliver(m.lmtp[0], &[USER], b"Subject: over\r\n\r\n");
    assert!(data[0].starts_with("552 5.2.2"), "{data:?}");
    let mut imap = Imap::connect(m.imap[0]);
    imap.login();
    imap.w.write_all(b"a APPEND INBOX {11+}\r\nSubject: x\n\r\n").unwrap();
    let done = imap.line();
    assert!(done.starts_with("a NO [OVERQUOTA]"), "{done}");
    let (lines, done) = imap.run("GETQUOTAROOT INBOX");
    assert!(done.contains("OK"), "{done}");
    assert!(lines.iter().any(|l| l.starts_with("* QUOTA \"\" (MESSAGE 3 3)")), "{lines:?}");
}

#[test]
fn a_silent_peer_is_declared_dead_and_the_link_comes_back() {
    let c = Cluster::start(2, "");
    c.proxies[&(0, 1)].freeze();
    let started = Instant::now();
    assert!(
        wait_for(Duration::from_secs(20), || !c.status(0).links[0].connected && !c.status(1).links[0].connected),
        "the silent link was never declared down"
    );
    let took = started.elapsed();
    c.proxies[&(0, 1)].thaw();
    c.proxies[&(0, 1)].cut();
    c.proxies[&(0, 1)].heal();
    c.wait_linked();
    eprintln!("a silent link was declared dead after {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
}

fn wait_for(limit: Duration, check: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn a_second_hello_for_a_linked_peer_is_refused() {
    let c = Cluster::start(3, "");
    // Someone with the secret claims to be server 1 to server 3, which is linked to 1.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let claimed = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(c.listen[2]).await.unwrap();
        let mut stream: tandem_node::peer::PeerStream = Box::new(tcp);
        let agreed = tandem_node::peer::dial_handshake(
            &mut stream,
            tandem_core::types::Sid(1),
            tandem_core::types::Sid(3),
            SECRET.as_bytes(),
            false,
        )
        .await;
        let mut rest = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest))
                .await;
        agreed.is_ok()
    });
    assert!(claimed, "the handshake itself passes: the impostor holds the secret");
    assert!(harness::eventually(|| c.log(2).contains("a second link for a connected peer: refused")));
    assert!(c.status(2).links.iter().all(|l| l.connected), "the real link stays");
}

#[test]
fn a_closed_stdout_ends_tandem_status_quietly() {
    let c = Cluster::start(1, "");
    let AdminAddr::Unix(socket) = &c.admin[0] else { panic!() };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["status", "--admin"])
        .arg(socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn out_of_file_descriptors_the_node_waits_instead_of_spinning() {
    let m = start(1, "", "connections_per_ip_max = 1000");
    let pid = m.cluster.pid(0).unwrap();
    // Lower the node's descriptor limit, then use them all up.
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=64:64"])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
    let held: Vec<TcpStream> = (0..80).filter_map(|_| TcpStream::connect(m.imap[0]).ok()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time(pid).saturating_sub(before);
    drop(held);
    eprintln!("figure: {used:?} of CPU in 2 s while out of file descriptors");
    assert!(used < Duration::from_millis(600), "the node used {used:?} of CPU in 2 s while out of descriptors");
    // Once descriptors are free, everyone is served again.
    assert!(wait_for(Duration::from_secs(10), || harness::call(&m.cluster.admin[0], &AdminRequest::Status).is_ok()));
    assert!(honest_session(m.imap[0], None) < SERVED_WITHIN);
}

/// Dials `addr` as server `claimed` with the cluster secret, the way an insider (or a
/// stolen secret) could, and sends `envelopes`.
fn impostor_sends(addr: SocketAddr, claimed: u32, to: u32, envelopes: &[tandem_core::msg::Envelope]) -> bool {
    use tandem_core::types::Sid;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut stream: tandem_node::peer::PeerStream = Box::new(tcp);
        let agreed =
            tandem_node::peer::dial_handshake(&mut stream, Sid(claimed), Sid(to), SECRET.as_bytes(), false).await;
        if agreed.is_err() {
            return false;
        }
        let mut bytes = Vec::new();
        let mut encoder = tandem_core::wire::Encoder::new();
        for env in envelopes {
            encoder.encode(env, &mut bytes);
        }
        let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, &bytes).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        true
    })
}

#[test]
fn absurd_numbers_from_a_peer_with_the_secret_change_nothing() {
    use tandem_core::msg::{Envelope, Msg};
    use tandem_core::types::Sid;
    let mut c = Cluster::start(3, "");
    c.deliver(0, "alice@example.org/INBOX", "Subject: before\r\n\r\n").unwrap();
    let epoch_before = c.status(1).epoch;
    // Server 1 goes down; someone holding the secret speaks as server 1 to server 2.
    c.kill9(0);
    let forged = |msg| Envelope { src: Sid(1), dst: Sid(2), hops: 0, msg };
    let sent = impostor_sends(
        c.listen[1],
        1,
        2,
        &[
            forged(Msg::LinkState {
                origin: Sid(2),
                seq: 999_999,
                epoch: u64::MAX,
                store: 1,
                neighbors: vec![Sid(1), Sid(3)],
            }),
            forged(Msg::LinkState {
                origin: Sid(1),
                seq: u64::MAX,
                epoch: u64::MAX - 5,
                store: 2,
                neighbors: vec![Sid(2)],
            }),
        ],
    );
    assert!(sent, "the forged link came up (the impostor holds the secret)");
    let epoch = c.status(1).epoch;
    assert!(epoch < 1 << 50, "the epoch jumped from {epoch_before} to {epoch}");
    // Server 1 comes back: one root, one term, the mail everywhere.
    c.spawn(0);
    c.wait_up(0);
    c.wait_linked();
    c.deliver(1, "alice@example.org/INBOX", "Subject: after\r\n\r\n").unwrap();
    let view = c.converged("alice@example.org/INBOX", Duration::from_secs(60));
    assert_eq!(view.messages.len(), 2);
}

/// The silent master of the hostile-input and refused-delivery issues: the node that
/// masters a user's INBOX keeps its connections open but they carry nothing. Deliveries
/// through the other nodes are answered 451 ("not confirmed") until those links are
/// declared dead and mastership moves, then 250; an MTA that retries every 451 at the
/// next node ends, after the heal, with each message exactly once on every node.
#[test]
fn an_mta_retrying_around_a_silent_master_stores_each_message_once() {
    let m = start(3, "mode = \"sync\"\nreplicas = 1", "");
    let (_, first) = lmtp_deliver(m.lmtp[1], &[USER], b"Message-ID: <0@retry.test>\r\nSubject: first\r\n\r\nx\r\n");
    assert!(first[0].starts_with("250"), "{first:?}");
    let master = (0..3)
        .find(|i| m.cluster.status(*i).mastered_here.iter().any(|k| k.contains(USER)))
        .expect("some node masters the INBOX");
    let others: Vec<usize> = (0..3).filter(|i| *i != master).collect();
    let around_master: Vec<&harness::Proxy> =
        m.cluster.proxies.iter().filter(|((a, b), _)| *a == master || *b == master).map(|(_, p)| p).collect();
    around_master.iter().for_each(|p| p.freeze());
    let frozen_at = Instant::now();
    let mut first_ok_after = None;
    let mut not_confirmed = 0;
    for n in 1..=10 {
        let body = format!("Message-ID: <{n}@retry.test>\r\nSubject: m{n}\r\n\r\nbody {n}\r\n");
        for attempt in 0.. {
            assert!(attempt < 120, "message {n} was never delivered");
            let (_, data) = lmtp_deliver(m.lmtp[others[attempt % 2]], &[USER], body.as_bytes());
            if data[0].starts_with("250") {
                first_ok_after.get_or_insert(frozen_at.elapsed());
                break;
            }
            assert!(data[0].starts_with("451 4.3.0") && data[0].contains("not confirmed"), "{data:?}");
            not_confirmed += 1;
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let moved_after = first_ok_after.expect("deliveries resumed");
    for p in &around_master {
        p.thaw();
        p.cut();
        p.heal();
    }
    m.cluster.wait_linked();
    let view = m.cluster.converged(&format!("{USER}/INBOX"), Duration::from_secs(60));
    assert_eq!(view.messages.len(), 11, "each delivery once on every node: {view:?}");
    eprintln!(
        "silent master: {not_confirmed} deliveries answered 451, the first 250 {moved_after:?} after the silence began"
    );
    assert!(moved_after < Duration::from_secs(20), "{moved_after:?}");
}
