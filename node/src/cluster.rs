//! `tandem cluster --nodes N`: a cluster of N node processes on loopback, for trying
//! tandem on one machine. Each node gets a config file in a fresh directory.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

pub struct ClusterNode {
    pub id: u32,
    pub config: PathBuf,
    pub listen: SocketAddr,
    /// The node's admin socket.
    pub admin: PathBuf,
}

/// Free loopback ports, held until all are picked so none repeats.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect()
}

/// Writes the secret and one config per node into `dir`.
pub fn write_configs(dir: &Path, nodes: usize, extra: &str) -> std::io::Result<Vec<ClusterNode>> {
    std::fs::create_dir_all(dir)?;
    let secret: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
    crate::users::write_private(&dir.join("secret"), (secret + "\n").as_bytes()).map_err(std::io::Error::other)?;
    let ports = free_ports(nodes)?;
    let lo = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let all: Vec<(u32, SocketAddr)> = (0..nodes).map(|i| (i as u32 + 1, lo(ports[i]))).collect();
    let mut out = Vec::new();
    for (id, listen) in &all {
        let mut text =
            format!("id = {id}\nlisten = \"{listen}\"\ndata_dir = \"data-{id}\"\nsecret_file = \"secret\"\n{extra}\n");
        for (pid, paddr) in all.iter().filter(|(p, _)| p != id) {
            let _ = write!(text, "\n[[peer]]\nid = {pid}\naddress = \"{paddr}\"\n");
        }
        let config = dir.join(format!("node-{id}.toml"));
        std::fs::write(&config, text)?;
        let admin = dir.join(format!("data-{id}")).join("admin.sock");
        out.push(ClusterNode { id: *id, config, listen: *listen, admin });
    }
    Ok(out)
}
