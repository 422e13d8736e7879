//! The IMAP command path (imap-codec's parser and tandem's session) on an in-memory node:
//! any bytes from a client, logged in or not (first byte), must neither panic nor hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem_node::fuzzing::imap(data));
