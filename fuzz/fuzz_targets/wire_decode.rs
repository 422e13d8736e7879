//! Decodes a byte stream as peer traffic; every decoded envelope must survive a round
//! trip through a fresh `Encoder` and a fresh `Decoder` unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem_fuzz::wire_decode(data));
