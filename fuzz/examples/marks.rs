//! Which coverage marks of the core a corpus reaches through the core_messages harness:
//! `cargo run --release --example marks -- corpus/core_messages seeds/core_messages`.

use std::collections::BTreeMap;
use tandem_core::Mark;
use tandem_fuzz::Harness;

fn main() {
    let mut files = 0;
    let mut reached: BTreeMap<Mark, u64> = BTreeMap::new();
    for dir in std::env::args().skip(1) {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let mut h = Harness::new();
            h.run_ops(&data);
            h.finish();
            files += 1;
            for (mark, n) in h.server().marks().iter() {
                *reached.entry(mark).or_default() += u64::from(n > 0);
            }
        }
    }
    println!("{files} inputs");
    for mark in Mark::ALL {
        println!("{:>30} {}", mark.name(), reached.get(&mark).copied().unwrap_or(0));
    }
}
