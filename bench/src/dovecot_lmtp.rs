//! A single Dovecot 2.3 LMTP server (Maildir, one mail user) on the benchmark directory's
//! filesystem, driven by the same LMTP client and messages as tandem's throughput rows:
//! the baseline the store issue asks LMTP delivery to be compared with. Needs root
//! (Dovecot switches to the mail user) and dovecot-core with dovecot-lmtpd.

use crate::cluster::USER;
use crate::lmtp::{self, DeliveryRun};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The nobody user and group, which own the Maildir.
const MAIL_UID: u32 = 65534;

struct Dovecot {
    child: Child,
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its lmtp processes.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, port: u16) -> Result<Dovecot, String> {
    let err = |e: std::io::Error| format!("{}: {e}", dir.display());
    for sub in ["mail", "run", "log"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(err)?;
    }
    let chown = Command::new("chown")
        .arg(format!("{MAIL_UID}:{MAIL_UID}"))
        .arg(dir.join("mail"))
        .status()
        .map_err(|e| e.to_string())?;
    if !chown.success() {
        return Err("chown of the Maildir root failed (the Dovecot row needs root)".into());
    }
    let d = dir.display();
    let config = format!(
        "base_dir = {d}/run\nstate_dir = {d}/run/state\ninstance_name = tandem-bench-lmtp-{port}\n\
         log_path = {d}/log/dovecot.log\nprotocols = lmtp\nssl = no\nlisten = 127.0.0.1\nfirst_valid_uid = 1\n\
         mail_location = maildir:{d}/mail/%u/Maildir\n\
         passdb {{\n  driver = static\n  args = nopassword=y\n}}\n\
         userdb {{\n  driver = static\n  args = uid={MAIL_UID} gid={MAIL_UID} home={d}/mail/%u\n}}\n\
         service lmtp {{\n  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n}}\n"
    );
    let path = dir.join("dovecot.conf");
    std::fs::write(&path, config).map_err(err)?;
    let log = std::fs::File::create(dir.join("log/dovecot.out")).map_err(err)?;
    let child = Command::new("dovecot")
        .arg("-F")
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("dovecot: {e} (apt-get install dovecot-core dovecot-lmtpd)"))?;
    let dovecot = Dovecot { child };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if lmtp::LmtpClient::connect(addr).is_ok() {
            return Ok(dovecot);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("Dovecot's LMTP did not come up; see {d}/log"))
}

/// (messages delivered, per second, p50 ms, p99 ms) for `count` messages after 50 of
/// warm-up, over `connections` connections, as tandem's throughput rows.
pub fn throughput(
    dir: &Path,
    messages: &Arc<Vec<Vec<u8>>>,
    count: usize,
    connections: usize,
) -> Result<(usize, f64, f64, f64), String> {
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
    let _dovecot = start(dir, port)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let warmup = Arc::new(messages.iter().take(50).cloned().collect::<Vec<_>>());
    lmtp::deliver_all(addr, USER, warmup, 1)?;
    let batch: Arc<Vec<Vec<u8>>> = Arc::new(messages.iter().skip(50).take(count).cloned().collect());
    let DeliveryRun { delivered, wall, mut latencies } = lmtp::deliver_all(addr, USER, batch, connections)?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok((
        delivered,
        delivered as f64 / wall.as_secs_f64(),
        ms(lmtp::quantile(&mut latencies, 0.5)),
        ms(lmtp::quantile(&mut latencies, 0.99)),
    ))
}
