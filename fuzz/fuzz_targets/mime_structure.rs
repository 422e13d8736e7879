//! MIME structure extraction (BODYSTRUCTURE, ENVELOPE, BODY[n.m], header fields) of any
//! bytes taken as a message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem_node::fuzzing::mime(data));
