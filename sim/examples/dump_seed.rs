//! Writes an explore seed's generated scenario as a file, to run it with `--trace`:
//! `cargo run --release -p tandem-sim --example dump_seed -- SEED [FOCUS] > seed.toml`
//! (FOCUS: a focused generator's name, as `explore --focus` takes it).

use tandem_sim::{explore, focus::Focus, scenario_write};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(seed) = args.next().and_then(|a| a.parse::<u64>().ok()) else {
        eprintln!("usage: dump_seed SEED [FOCUS]");
        std::process::exit(2);
    };
    let focus = match args.next() {
        None => None,
        Some(name) => match Focus::from_name(&name) {
            Some(focus) => Some(focus),
            None => {
                let names: Vec<&str> = Focus::ALL.iter().map(|f| f.name()).collect();
                eprintln!("unknown focus {name:?}; one of {}", names.join(", "));
                std::process::exit(2);
            }
        },
    };
    let scenario = explore::scenario_of(seed, focus);
    let what = match focus {
        Some(f) => format!("focus {} seed {seed}, as generated", f.name()),
        None => format!("explore seed {seed}, as generated"),
    };
    print!("{}", scenario_write::to_toml(&scenario, &what));
}
