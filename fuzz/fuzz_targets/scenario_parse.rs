//! Parses the bytes as a scenario file; the parser must answer Ok or Err, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem_fuzz::scenario_parse(data));
