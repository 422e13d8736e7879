//! `tandem cluster --nodes N`: a cluster of N node processes on loopback, for trying
//! tandem on one machine with real mail clients. The directory gets a config per node
//! (peers, IMAP with STARTTLS, IMAPS, LMTP, metrics), a CA and a certificate for
//! 127.0.0.1 and localhost, a users file with a demo user, and `cluster.toml`, which
//! records all of it so a later run with the same `--dir` starts the same cluster on
//! the same data.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

/// The demo user `tandem cluster` creates.
pub const DEMO_USER: &str = "demo@example.org";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterNode {
    pub id: u32,
    pub config: PathBuf,
    pub listen: SocketAddr,
    /// The node's admin socket.
    pub admin: PathBuf,
    pub imap: SocketAddr,
    pub imaps: SocketAddr,
    pub lmtp: SocketAddr,
    pub metrics: SocketAddr,
}

/// What a cluster directory holds (`cluster.toml`; the password is in `demo-password`,
/// readable by its owner only).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalCluster {
    pub node: Vec<ClusterNode>,
    pub user: String,
    /// The CA that signed the nodes' certificate: what a mail client must trust.
    pub ca: PathBuf,
    #[serde(skip)]
    pub password: String,
    /// True when an existing directory was taken up again.
    #[serde(skip)]
    pub reused: bool,
}

const RECORD: &str = "cluster.toml";
const PASSWORD_FILE: &str = "demo-password";

/// Free loopback ports, held until all are picked so none repeats.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect()
}

/// The cluster in `dir`: the one recorded there if any (`nodes` must then match), else
/// a new one written there.
pub fn prepare(dir: &Path, nodes: usize, extra: &str) -> Result<LocalCluster, String> {
    let io = |e: std::io::Error| format!("{}: {e}", dir.display());
    let record = dir.join(RECORD);
    if record.exists() {
        let text = std::fs::read_to_string(&record).map_err(io)?;
        let mut cluster: LocalCluster = toml::from_str(&text).map_err(|e| format!("{}: {e}", record.display()))?;
        if cluster.node.len() != nodes {
            return Err(format!(
                "{} holds a cluster of {} nodes, not {nodes}: use another --dir, or --nodes {}",
                dir.display(),
                cluster.node.len(),
                cluster.node.len()
            ));
        }
        let password = std::fs::read_to_string(dir.join(PASSWORD_FILE)).map_err(io)?;
        cluster.password = password.trim().to_string();
        cluster.reused = true;
        return Ok(cluster);
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    let secret: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
    crate::users::write_private(&dir.join("secret"), (secret + "\n").as_bytes())?;
    let ca = write_certificates(&dir.join("tls"))?;
    let password = demo_password();
    crate::users::add_user(&dir.join("users.toml"), DEMO_USER, password.as_bytes())?;
    crate::users::write_private(&dir.join(PASSWORD_FILE), format!("{password}\n").as_bytes())?;
    let node = write_configs(dir, nodes, extra).map_err(io)?;
    let cluster = LocalCluster { node, user: DEMO_USER.to_string(), ca, password, reused: false };
    let text = toml::to_string(&cluster).map_err(|e| e.to_string())?;
    std::fs::write(&record, text).map_err(io)?;
    Ok(cluster)
}

/// 20 letters and digits: typed once into a mail client, strong enough for loopback.
fn demo_password() -> String {
    use rand::Rng;
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(20).map(char::from).collect()
}

/// A CA, and a certificate it signs for 127.0.0.1 and localhost; returns the CA's path.
pub fn write_certificates(dir: &Path) -> Result<PathBuf, String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let err = |e: rcgen::Error| format!("certificate: {e}");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "tandem cluster CA");
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    let key = KeyPair::generate().map_err(err)?;
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).map_err(err)?;
    // Also 127.0.0.1 as a DNS name: some clients (isync's mbsync) compare the host only
    // against DNS names, others (Python, rustls) only against IP addresses.
    let loopback = rcgen::Ia5String::try_from("127.0.0.1").map_err(err)?;
    leaf.subject_alt_names.push(rcgen::SanType::DnsName(loopback));
    leaf.distinguished_name.push(DnType::CommonName, "tandem cluster");
    let cert = leaf.signed_by(&key, &ca, &ca_key).map_err(err)?;
    let ca_path = dir.join("ca.pem");
    let write =
        |path: PathBuf, text: String| std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()));
    write(ca_path.clone(), ca.pem())?;
    write(dir.join("mail.pem"), cert.pem())?;
    crate::users::write_private(&dir.join("mail.key"), key.serialize_pem().as_bytes())?;
    Ok(ca_path)
}

/// Writes one config per node into `dir`, with the secret, users and certificate that
/// `prepare` put there.
pub fn write_configs(dir: &Path, nodes: usize, extra: &str) -> std::io::Result<Vec<ClusterNode>> {
    let ports = free_ports(nodes * 5)?;
    let lo = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let all: Vec<ClusterNode> = (0..nodes)
        .map(|i| {
            let id = i as u32 + 1;
            let port = |k: usize| lo(ports[i * 5 + k]);
            ClusterNode {
                id,
                config: dir.join(format!("node-{id}.toml")),
                listen: port(0),
                admin: dir.join(format!("data-{id}")).join("admin.sock"),
                imap: port(1),
                imaps: port(2),
                lmtp: port(3),
                metrics: port(4),
            }
        })
        .collect();
    for n in &all {
        let mut text = format!(
            "id = {}\nlisten = \"{}\"\ndata_dir = \"data-{}\"\nsecret_file = \"secret\"\n\
             imap = \"{}\"\nimaps = \"{}\"\nlmtp = \"{}\"\nmetrics = \"{}\"\nusers_file = \"users.toml\"\n\
             mail_tls_cert = \"tls/mail.pem\"\nmail_tls_key = \"tls/mail.key\"\n{extra}\n",
            n.id, n.listen, n.id, n.imap, n.imaps, n.lmtp, n.metrics
        );
        for p in all.iter().filter(|p| p.id != n.id) {
            let _ = write!(text, "\n[[peer]]\nid = {}\naddress = \"{}\"\n", p.id, p.listen);
        }
        std::fs::write(&n.config, text)?;
    }
    Ok(all)
}

/// What `tandem cluster` prints once the nodes run: where everything is, and settings a
/// mail client takes as they are.
pub fn describe(cluster: &LocalCluster, dir: &Path) -> String {
    let mut s = String::new();
    let how = if cluster.reused { "the cluster recorded in" } else { "a new cluster in" };
    let _ = writeln!(s, "tandem cluster of {} nodes: {how} {}", cluster.node.len(), dir.display());
    for n in &cluster.node {
        let _ = writeln!(
            s,
            "  node {}: imap {} (STARTTLS), imaps {}, lmtp {}, metrics http://{}/metrics, peers on {}, admin on {}, config {}",
            n.id,
            n.imap,
            n.imaps,
            n.lmtp,
            n.metrics,
            n.listen,
            n.admin.display(),
            n.config.display()
        );
    }
    let _ = writeln!(s, "user {} password {}", cluster.user, cluster.password);
    let _ = writeln!(s, "CA to trust: {}", cluster.ca.display());
    let Some(first) = cluster.node.first() else { return s };
    let (host, imaps, lmtp) = ("127.0.0.1", first.imaps.port(), first.lmtp.port());
    let user = &cluster.user;
    let ca = cluster.ca.display();
    let _ = writeln!(
        s,
        "\nThunderbird (manual config): incoming IMAP, server {host}, port {imaps}, SSL/TLS, normal password, username {user}; import the CA above under Settings > Certificates > Authorities."
    );
    let pass = &cluster.password;
    let _ = writeln!(s, "\n--- mutt, ~/.muttrc ---");
    let _ = writeln!(s, "set folder = \"imaps://{}@{host}:{imaps}/\"", user.replace('@', "%40"));
    let _ =
        writeln!(s, "set spoolfile = \"+INBOX\"\nset imap_pass = \"{pass}\"\nset ssl_ca_certificates_file = \"{ca}\"");
    let _ = writeln!(s, "--- mbsync, ~/.mbsyncrc ---");
    let _ = writeln!(
        s,
        "IMAPAccount tandem\nHost {host}\nPort {imaps}\nUser {user}\nPass {pass}\nSSLType IMAPS\nCertificateFile {ca}\n"
    );
    let _ = writeln!(s, "IMAPStore tandem-remote\nAccount tandem\n");
    let _ =
        writeln!(s, "MaildirStore tandem-local\nPath ~/Mail/tandem/\nInbox ~/Mail/tandem/INBOX\nSubFolders Verbatim\n");
    let _ =
        writeln!(s, "Channel tandem\nFar :tandem-remote:\nNear :tandem-local:\nPatterns *\nCreate Both\nSyncState *");
    let _ = writeln!(s, "--- end ---");
    let _ = writeln!(s, "(mbsync wants the folder: mkdir -p ~/Mail/tandem, then mbsync -a)");
    let _ = writeln!(s, "\ndeliver a message over LMTP to node 1 (then read it on any node):");
    let _ = writeln!(
        s,
        "  printf 'LHLO me\\r\\nMAIL FROM:<a@example.net>\\r\\nRCPT TO:<{user}>\\r\\nDATA\\r\\nSubject: hi\\r\\n\\r\\nhello\\r\\n.\\r\\nQUIT\\r\\n' | nc {host} {lmtp}"
    );
    let _ = writeln!(
        s,
        "  or: echo 'Subject: hi' | tandem deliver --admin {} --mailbox {user}/INBOX",
        first.admin.display()
    );
    s
}
