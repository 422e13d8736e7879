//! Dovecot's dsync on the same work: runs the anchor script
//! (`../shared/anchors/dsync/bench.sh`) and reads the medians it measured.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// One dsync figure: median wall time of its runs, and bytes both ways from the
/// single proxied run (when there was one).
#[derive(Clone, Copy, Debug, Default)]
pub struct DsyncFigure {
    pub wall_ms: f64,
    pub bytes: Option<f64>,
}

/// (scenario, n, state, mode) -> figure, e.g. ("initial", 10000, "none", "tcp").
pub type DsyncResults = BTreeMap<(String, usize, String, String), DsyncFigure>;

/// Runs the anchor script with its results in `results` and its stores under
/// `bench_dir`. Needs root and Dovecot 2.3.
pub fn run(script: &Path, results: &Path, bench_dir: &Path, runs: usize) -> Result<DsyncResults, String> {
    let status = Command::new("bash")
        .arg(script)
        .env("RESULTS", results)
        .env("BENCH_DIR", bench_dir)
        .env("RUNS", runs.to_string())
        .env("SIZES", "1000 10000")
        .env("INC_N", "10000")
        .status()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !status.success() {
        return Err(format!("{} failed: {status}", script.display()));
    }
    parse(&std::fs::read_to_string(results.join("raw.tsv")).map_err(|e| format!("raw.tsv: {e}"))?)
}

/// Reads `raw.tsv`: medians of `wall_ms` per (scenario, n, state, mode); bytes from the
/// `-proxy` rows are attached to the mode they proxy.
pub fn parse(raw: &str) -> Result<DsyncResults, String> {
    let mut lines = raw.lines();
    let header: Vec<&str> = lines.next().ok_or("raw.tsv is empty")?.split('\t').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).ok_or(format!("raw.tsv has no column {name}"));
    let (scen, mode, n, state, wall, rc, c2s, s2c) = (
        col("scenario")?,
        col("mode")?,
        col("n")?,
        col("state")?,
        col("wall_ms")?,
        col("rc")?,
        col("c2s_bytes")?,
        col("s2c_bytes")?,
    );
    let mut walls: BTreeMap<(String, usize, String, String), Vec<f64>> = BTreeMap::new();
    let mut bytes: BTreeMap<(String, usize, String, String), f64> = BTreeMap::new();
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < header.len() || f[rc] != "0" {
            continue;
        }
        let n: usize = f[n].parse().map_err(|_| format!("bad n in {line:?}"))?;
        let (base, proxied) = match f[mode].strip_suffix("-proxy") {
            Some(base) => (base, true),
            None => (f[mode], false),
        };
        let key = (f[scen].to_string(), n, f[state].to_string(), base.to_string());
        if proxied {
            if let (Ok(a), Ok(b)) = (f[c2s].parse::<f64>(), f[s2c].parse::<f64>()) {
                bytes.insert(key, a + b);
            }
        } else if let Ok(w) = f[wall].parse::<f64>() {
            walls.entry(key).or_default().push(w);
        }
    }
    Ok(walls
        .into_iter()
        .map(|(key, mut w)| {
            w.sort_by(|a, b| a.total_cmp(b));
            let figure = DsyncFigure { wall_ms: w[w.len() / 2], bytes: bytes.get(&key).copied() };
            (key, figure)
        })
        .collect())
}

pub fn get(results: &DsyncResults, scenario: &str, n: usize, state: &str, mode: &str) -> Option<DsyncFigure> {
    results.get(&(scenario.to_string(), n, state.to_string(), mode.to_string())).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_proxied_bytes_are_read() {
        let raw = "scenario\tmode\tn\tstate\trun\twall_ms\tcli_cpu_ms\tcli_rss_kb\tsrv_cpu_ms\tsrv_rss_kb\ttot_cpu_ms\trc\tc2s_bytes\ts2c_bytes\n\
            initial\ttcp\t10000\tnone\t1\t4600\t0\t0\t0\t0\t0\t0\tNA\tNA\n\
            initial\ttcp\t10000\tnone\t2\t4300\t0\t0\t0\t0\t0\t0\tNA\tNA\n\
            initial\ttcp\t10000\tnone\t3\t4800\t0\t0\t0\t0\t0\t0\tNA\tNA\n\
            initial\ttcp\t10000\tnone\t4\t1\t0\t0\t0\t0\t0\t75\tNA\tNA\n\
            initial\ttcp-proxy\t10000\tnone\t1\t5000\t0\t0\t0\t0\t0\t0\t100\t20\n";
        let r = parse(raw).unwrap();
        let f = get(&r, "initial", 10000, "none", "tcp").unwrap();
        assert_eq!(f.wall_ms, 4600.0);
        assert_eq!(f.bytes, Some(120.0));
        assert!(get(&r, "initial", 1000, "none", "tcp").is_none());
    }
}
