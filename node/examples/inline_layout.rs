//! Bytes of redb pages per small body, stored as one value against stored as the
//! store's chunks and tail (`tandem_node::bodies::InlineTables`): the figures behind
//! `INLINE_CHUNK_LEN`. Writes COUNT bodies of each SIZE into a fresh database under
//! DIR, 10,000 per transaction, and prints the allocated pages divided by COUNT.
//!
//! cargo run --release -p tandem-node --example inline_layout -- [DIR [COUNT [SIZE,...]]]
//! (defaults: /dev/shm, 100000, 3000,4080,10000,30000)

use redb::{Database, TableDefinition};
use tandem_node::bodies::{BodyHash, InlineTables, hash_of};

const WHOLE: TableDefinition<BodyHash, &[u8]> = TableDefinition::new("whole");
const PER_TRANSACTION: usize = 10_000;

fn page_bytes_per_body(dir: &std::path::Path, count: usize, size: usize, chunked: bool) -> Result<u64, String> {
    let path = dir.join(format!("inline-layout-{}-{size}.redb", if chunked { "chunks" } else { "whole" }));
    let _ = std::fs::remove_file(&path);
    let db = Database::create(&path).map_err(|e| e.to_string())?;
    let mut written = 0;
    let mut allocated = 0;
    while written < count {
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut chunks = InlineTables::open(&txn).map_err(|e| e.to_string())?;
            let mut whole = txn.open_table(WHOLE).map_err(|e| e.to_string())?;
            for _ in 0..PER_TRANSACTION.min(count - written) {
                let mut body = vec![b'z'; size];
                body[..8].copy_from_slice(&(written as u64).to_le_bytes());
                let hash = hash_of(&body);
                if chunked {
                    chunks.write(&hash, &body).map_err(|e| e.to_string())?;
                } else {
                    whole.insert(hash, body.as_slice()).map_err(|e| e.to_string())?;
                }
                written += 1;
            }
        }
        allocated = txn.stats().map_err(|e| e.to_string())?.allocated_pages() * 4096;
        txn.commit().map_err(|e| e.to_string())?;
    }
    drop(db);
    let _ = std::fs::remove_file(&path);
    Ok(allocated / count as u64)
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| "/dev/shm".into()));
    let count: usize =
        args.next().map(|c| c.parse().map_err(|_| "COUNT must be a number")).transpose()?.unwrap_or(100_000);
    let sizes: Vec<usize> = match args.next() {
        Some(list) => {
            list.split(',').map(|s| s.parse().map_err(|_| "SIZE must be numbers")).collect::<Result<_, _>>()?
        }
        None => vec![3000, 4080, 10_000, 30_000],
    };
    println!("| body bytes | one value: page bytes per body | chunks and tail: page bytes per body |");
    println!("|---:|---:|---:|");
    for size in sizes {
        let whole = page_bytes_per_body(&dir, count, size, false)?;
        let chunked = page_bytes_per_body(&dir, count, size, true)?;
        println!("| {size} | {whole} | {chunked} |");
    }
    Ok(())
}
