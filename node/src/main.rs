//! The `tandem` node binary. The real shell (sockets, durable store) is issue 4; until it
//! lands this binary only says so, so that nobody mistakes it for a server.

fn main() {
    eprintln!("tandem: the node is not built yet; use tandem-sim (see README.md)");
    std::process::exit(2);
}
