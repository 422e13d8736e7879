//! `tandem cluster --nodes N`: a cluster of N node processes on loopback, for trying
//! tandem on one machine. Each node gets a config file in a fresh directory.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

pub struct ClusterNode {
    pub id: u32,
    pub config: PathBuf,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
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
    std::fs::write(dir.join("secret"), secret + "\n")?;
    let ports = free_ports(nodes * 2)?;
    let lo = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let all: Vec<(u32, SocketAddr, SocketAddr)> =
        (0..nodes).map(|i| (i as u32 + 1, lo(ports[2 * i]), lo(ports[2 * i + 1]))).collect();
    let mut out = Vec::new();
    for (id, listen, admin) in &all {
        let mut text = format!(
            "id = {id}\nlisten = \"{listen}\"\nadmin = \"{admin}\"\ndata_dir = \"data-{id}\"\nsecret_file = \"secret\"\n{extra}\n"
        );
        for (pid, paddr, _) in all.iter().filter(|(p, ..)| p != id) {
            let _ = write!(text, "\n[[peer]]\nid = {pid}\naddress = \"{paddr}\"\n");
        }
        let config = dir.join(format!("node-{id}.toml"));
        std::fs::write(&config, text)?;
        out.push(ClusterNode { id: *id, config, listen: *listen, admin: *admin });
    }
    Ok(out)
}
