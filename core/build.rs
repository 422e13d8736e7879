//! Names this build of the core by its version and a hash of its sources, so that a
//! recording (`tandem_core::record`) replayed by another core says so: two builds with
//! the same name run the same protocol code.

use std::path::{Path, PathBuf};

fn files(dir: &Path, into: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, into);
        } else {
            into.push(path);
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=src");
    let mut found = Vec::new();
    files(Path::new("src"), &mut found);
    found.sort();
    // FNV-1a over each file's path and bytes: stable across machines and toolchains.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for path in found {
        let name = path.to_string_lossy().replace('\\', "/");
        let bytes = std::fs::read(&path).unwrap_or_default();
        for b in name.as_bytes().iter().chain(&[0u8]).chain(bytes.iter()) {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    // A core with its deliberately broken variants compiled in encodes its
    // configuration differently: it is another build.
    let broken = if std::env::var_os("CARGO_FEATURE_BROKEN").is_some() { ".broken" } else { "" };
    println!("cargo:rustc-env=TANDEM_CORE_BUILD={version}+src.{hash:016x}{broken}");
}
