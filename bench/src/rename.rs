//! RENAME latency by master granularity: what a client waits for a RENAME when the two
//! names may have different masters. Under `granularity = "mailbox"` each name has its
//! own master, and a RENAME runs at the master of both names' keys (the greater key's
//! mastership moves to the lesser's master first, `core/src/server/jobs.rs`,
//! `rename_waits_for_target`); under `user` one master holds both. A 3-node cluster
//! (sync, replicas=1) per granularity; each round CREATEs a mailbox through node 2 and
//! times a RENAME of it through node 1 to a name no one used, then a RENAME back
//! through node 3. CREATE's latency through node 2 is shown beside it.

use crate::cluster::{BenchCluster, Setup, USER};
use crate::noop::{Imap, percentile};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct RenameRow {
    pub granularity: &'static str,
    pub renames: usize,
    pub create_p50_us: f64,
    pub create_p99_us: f64,
    pub rename_p50_us: f64,
    pub rename_p99_us: f64,
    pub rename_max_us: f64,
    pub back_p50_us: f64,
    pub back_p99_us: f64,
}

fn timed(session: &mut Imap, command: &str, times: &mut Vec<f64>) -> Result<(), String> {
    let started = Instant::now();
    session.command(command)?;
    times.push(started.elapsed().as_secs_f64() * 1e6);
    Ok(())
}

fn p50_p99(mut times: Vec<f64>) -> (f64, f64, f64) {
    times.sort_by(|a, b| a.total_cmp(b));
    (percentile(&times, 0.5), percentile(&times, 0.99), times.last().copied().unwrap_or(0.0))
}

/// One cluster per granularity, `rounds` rounds each (after a tenth as many of warm-up).
pub fn rename_latency(tandem: &Path, root: &Path, rounds: usize) -> Result<Vec<RenameRow>, String> {
    let mut rows = Vec::new();
    for granularity in ["user", "mailbox"] {
        let dir = root.join(format!("rename-{granularity}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let setup = Setup { nodes: 3, mode: "sync", replicas: 1, compression: false, record: None };
        let mut cluster = BenchCluster::create(&dir, tandem, &setup)?;
        let mut imap: Vec<SocketAddr> = Vec::new();
        for node in &cluster.nodes {
            let addr =
                std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?;
            // Top-level keys go before the `[[peer]]` tables.
            let text = std::fs::read_to_string(&node.config).map_err(|e| e.to_string())?;
            let text = format!("imap = \"{addr}\"\ngranularity = \"{granularity}\"\n{text}");
            std::fs::write(&node.config, text).map_err(|e| e.to_string())?;
            imap.push(addr);
        }
        for i in 0..3 {
            cluster.start(i)?;
        }
        let result: Result<RenameRow, String> = (|| {
            cluster.wait_linked(&[0, 1, 2], Duration::from_secs(60))?;
            let mut sessions = Vec::new();
            for addr in &imap {
                let mut s = Imap::connect(*addr)?;
                s.command(&format!("LOGIN {USER} bench"))?;
                sessions.push(s);
            }
            let [one, two, three] = sessions.as_mut_slice() else { return Err("three sessions".into()) };
            let warm_up = (rounds / 10).max(1);
            let (mut creates, mut renames, mut backs) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..warm_up + rounds {
                let (mut c, mut r, mut b) = (Vec::new(), Vec::new(), Vec::new());
                timed(two, &format!("CREATE src{round}"), &mut c)?;
                timed(one, &format!("RENAME src{round} dst{round}"), &mut r)?;
                timed(three, &format!("RENAME dst{round} back{round}"), &mut b)?;
                if round >= warm_up {
                    creates.extend(c);
                    renames.extend(r);
                    backs.extend(b);
                }
            }
            let (create_p50_us, create_p99_us, _) = p50_p99(creates);
            let (rename_p50_us, rename_p99_us, rename_max_us) = p50_p99(renames);
            let (back_p50_us, back_p99_us, _) = p50_p99(backs);
            Ok(RenameRow {
                granularity,
                renames: rounds,
                create_p50_us,
                create_p99_us,
                rename_p50_us,
                rename_p99_us,
                rename_max_us,
                back_p50_us,
                back_p99_us,
            })
        })();
        cluster.stop_all();
        rows.push(result?);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(rows)
}

pub fn markdown(rows: &[RenameRow], command: &str) -> String {
    let mut out = String::from(
        "## RENAME latency by master granularity\n\n\
         A 3-node cluster (sync, replicas=1) on loopback per granularity. Each round CREATEs a mailbox \
         through node 2, RENAMEs it through node 1 to a name no one used, and RENAMEs that through \
         node 3 to another new name; the rounds after a warm-up of a tenth as many are timed, from \
         the command sent to its tagged OK. Under `mailbox` granularity each name has a master of \
         its own: a RENAME runs at the master of both names' keys, and the greater key's mastership \
         moves to the lesser's master first (`rename_waits_for_target` in \
         `core/src/server/jobs.rs`). Command: `",
    );
    out.push_str(command);
    out.push_str(
        "`.\n\n| granularity | rounds | CREATE p50 µs | CREATE p99 µs | RENAME p50 µs | RENAME p99 µs | RENAME max µs | second RENAME p50 µs | second RENAME p99 µs |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            r.granularity,
            r.renames,
            r.create_p50_us,
            r.create_p99_us,
            r.rename_p50_us,
            r.rename_p99_us,
            r.rename_max_us,
            r.back_p50_us,
            r.back_p99_us
        ));
    }
    out.push_str(
        "\nNot shown: when the master of the greater key cannot be reached, a RENAME under `mailbox` \
         granularity waits for the key move until its request deadline (`request_timeout_ms`) and then \
         fails with a temporary error (\"the new name's master did not hand it over in time\"); under \
         `user` granularity the same RENAME needs only the one master of the user.\n",
    );
    out
}
