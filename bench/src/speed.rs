//! In-process figures: simulator speed by cluster size, and the wire codec's rates as
//! the criterion benchmark last measured them.

use std::path::Path;
use std::time::Instant;
use tandem_sim::{RunOptions, run, scenario};

#[derive(Clone, Debug)]
pub struct SimRow {
    pub servers: usize,
    pub sim_s: f64,
    pub wall_s: f64,
    pub messages_per_wall_s: f64,
}

impl SimRow {
    pub fn sim_s_per_wall_s(&self) -> f64 {
        self.sim_s / self.wall_s
    }
}

/// A cluster of `servers` under a steady 50 operations per simulated second (5 users,
/// 3 mailboxes each), no faults, for `load_s` simulated seconds plus settling; seed 1.
pub fn simulator(servers: usize, load_s: u64) -> Result<SimRow, String> {
    let text = format!(
        "name = \"{servers}-servers-steady\"\nsettle_ms = 60000\n[cluster]\nservers = {servers}\n\
         [[event]]\nat_ms = 500\nop = \"random_workload\"\nuntil_ms = {}\nops_per_s = 50\nusers = 5\nmailboxes = 3\n",
        load_s * 1000
    );
    let s = scenario::parse(&text, None).map_err(|e| format!("steady scenario: {e:?}"))?;
    let started = Instant::now();
    let report = run(&s, &RunOptions { seed: Some(1), ..Default::default() });
    let wall_s = started.elapsed().as_secs_f64();
    if !report.passed {
        return Err(format!("{servers}-server steady run failed: {:?}", report.failures));
    }
    Ok(SimRow {
        servers,
        sim_s: report.sim_time_us as f64 / 1e6,
        wall_s,
        messages_per_wall_s: report.messages as f64 / wall_s,
    })
}

#[derive(Clone, Debug)]
pub struct CodecRow {
    pub kind: String,
    pub encode_ns: f64,
    pub decode_ns: f64,
}

/// Mean times per message kind from `target/criterion/wire/{encode,decode}/*`, written
/// by `cargo bench -p tandem-core --bench codec`; empty when it has not run.
pub fn codec_from_criterion(criterion: &Path) -> Vec<CodecRow> {
    let mean = |op: &str, kind: &str| -> Option<f64> {
        let text =
            std::fs::read_to_string(criterion.join("wire").join(op).join(kind).join("new/estimates.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["mean"]["point_estimate"].as_f64()
    };
    let Ok(entries) = std::fs::read_dir(criterion.join("wire").join("encode")) else { return Vec::new() };
    let mut kinds: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|k| k != "report")
        .collect();
    kinds.sort();
    kinds
        .into_iter()
        .filter_map(|k| Some(CodecRow { encode_ns: mean("encode", &k)?, decode_ns: mean("decode", &k)?, kind: k }))
        .collect()
}
