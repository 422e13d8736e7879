//! Drives one `tandem_core::Server` (s1 of s1..s3) with peer messages, client requests,
//! timers, durability reports and link changes derived from the bytes; it must never
//! panic (debug assertions included).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem_fuzz::core_messages(data));
