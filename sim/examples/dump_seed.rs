//! Writes an explore seed's generated scenario as a file, to run it with `--trace`:
//! `cargo run --release -p tandem-sim --example dump_seed -- SEED > seed.toml`.

use tandem_sim::{explore, scenario_write};

fn main() {
    let Some(seed) = std::env::args().nth(1).and_then(|a| a.parse::<u64>().ok()) else {
        eprintln!("usage: dump_seed SEED");
        std::process::exit(2);
    };
    let scenario = explore::generate(seed);
    print!("{}", scenario_write::to_toml(&scenario, &format!("explore seed {seed}, as generated")));
}
