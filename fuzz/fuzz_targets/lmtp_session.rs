//! The LMTP path on an in-memory node: any bytes from an MTA must neither panic nor hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem_node::fuzzing::lmtp(data));
