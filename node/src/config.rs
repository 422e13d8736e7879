//! The node's TOML configuration. Unknown keys and bad values are errors that name the
//! key; everything but the server id, the listen address and the peers has a default.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tandem_core::io::Config as CoreConfig;
use tandem_core::types::{Durability, Granularity, Sid};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: u32,
    listen: SocketAddr,
    #[serde(default)]
    admin: Option<SocketAddr>,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    secret_file: Option<PathBuf>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    replicas: Option<u8>,
    #[serde(default)]
    log_capacity: Option<usize>,
    #[serde(default)]
    granularity: Option<String>,
    #[serde(default)]
    request_timeout_ms: Option<u64>,
    #[serde(default)]
    compression: Option<bool>,
    #[serde(default)]
    metrics: Option<SocketAddr>,
    #[serde(default)]
    log_format: Option<String>,
    #[serde(default)]
    imap: Option<SocketAddr>,
    #[serde(default)]
    lmtp: Option<SocketAddr>,
    #[serde(default)]
    users_file: Option<PathBuf>,
    #[serde(default)]
    imaps: Option<SocketAddr>,
    #[serde(default)]
    mail_tls_cert: Option<PathBuf>,
    #[serde(default)]
    mail_tls_key: Option<PathBuf>,
    #[serde(default)]
    tls_cert: Option<PathBuf>,
    #[serde(default)]
    tls_key: Option<PathBuf>,
    #[serde(default)]
    tls_ca: Option<PathBuf>,
    #[serde(default)]
    peer: Vec<PeerConfig>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u32,
    pub address: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything a node needs, checked.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub core: CoreConfig,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub secret: Vec<u8>,
    pub compression: bool,
    pub metrics: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub peers: Vec<PeerConfig>,
    /// Mutual TLS on peer links, when `tls_cert`, `tls_key` and `tls_ca` are set.
    pub tls: Option<crate::tls::Tls>,
    pub imap: Option<SocketAddr>,
    /// IMAP over implicit TLS (needs `mail_tls_cert`); the plain port offers STARTTLS
    /// whenever a certificate is configured.
    pub imaps: Option<SocketAddr>,
    pub mail_tls: Option<crate::tls::MailTls>,
    pub lmtp: Option<SocketAddr>,
    pub users: std::sync::Arc<crate::users::Users>,
}

/// The smallest secret accepted: a cluster secret is a key, not a password.
const SECRET_LEN_MIN: usize = 16;

#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn bad(key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("key `{key}`: {why}"))
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        NodeConfig::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// Parses a configuration; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<NodeConfig, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        if file.id == 0 || file.id >= 1 << 16 {
            return Err(bad("id", format!("{} is not a server id (1 to 65535)", file.id)));
        }
        let mut servers = vec![Sid(file.id)];
        for (i, p) in file.peer.iter().enumerate() {
            if p.id == 0 || p.id >= 1 << 16 {
                return Err(bad(&format!("peer[{i}].id"), format!("{} is not a server id (1 to 65535)", p.id)));
            }
            if servers.contains(&Sid(p.id)) {
                return Err(bad(&format!("peer[{i}].id"), format!("server id {} appears twice", p.id)));
            }
            servers.push(Sid(p.id));
        }
        servers.sort();
        let mut core = CoreConfig::new(Sid(file.id), servers);
        core.durability = match file.mode.as_deref() {
            None | Some("sync") => Durability::Sync,
            Some("async") => Durability::Async,
            Some(other) => return Err(bad("mode", format!("{other:?} is neither \"sync\" nor \"async\""))),
        };
        core.granularity = match file.granularity.as_deref() {
            None | Some("mailbox") => Granularity::Mailbox,
            Some("user") => Granularity::User,
            Some("domain") => Granularity::Domain,
            Some("global") => Granularity::Global,
            Some(other) => {
                return Err(bad("granularity", format!("{other:?} is not mailbox, user, domain or global")));
            }
        };
        if let Some(r) = file.replicas {
            if usize::from(r) > file.peer.len() {
                return Err(bad(
                    "replicas",
                    format!("{r} replicas need at least {r} peers, {} configured", file.peer.len()),
                ));
            }
            core.replicas = r;
        } else {
            core.replicas = u8::from(!file.peer.is_empty());
        }
        if let Some(c) = file.log_capacity {
            if c == 0 {
                return Err(bad("log_capacity", "must be at least 1"));
            }
            core.log_capacity = c;
        }
        if let Some(ms) = file.request_timeout_ms {
            if ms == 0 {
                return Err(bad("request_timeout_ms", "must be at least 1"));
            }
            core.request_timeout_us = ms.saturating_mul(1000);
        }
        let secret = match &file.secret_file {
            None => {
                if !file.peer.is_empty() {
                    return Err(bad("secret_file", "required when peers are configured"));
                }
                Vec::new()
            }
            Some(p) => {
                let path = base.join(p);
                let text = std::fs::read(&path).map_err(|e| bad("secret_file", format!("{}: {e}", path.display())))?;
                let secret = text.trim_ascii().to_vec();
                if secret.len() < SECRET_LEN_MIN {
                    return Err(bad("secret_file", format!("the secret must be at least {SECRET_LEN_MIN} bytes")));
                }
                secret
            }
        };
        let log_format = match file.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(bad("log_format", format!("{other:?} is neither \"text\" nor \"json\""))),
        };
        let tls = match (&file.tls_cert, &file.tls_key, &file.tls_ca) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(
                crate::tls::Tls::load(&base.join(cert), &base.join(key), &base.join(ca))
                    .map_err(|e| bad("tls_cert", e))?,
            ),
            _ => return Err(bad("tls_cert", "tls_cert, tls_key and tls_ca go together")),
        };
        if (file.imap.is_some() || file.imaps.is_some() || file.lmtp.is_some()) && file.users_file.is_none() {
            return Err(bad("users_file", "required when imap, imaps or lmtp is set"));
        }
        let mail_tls = match (&file.mail_tls_cert, &file.mail_tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(
                crate::tls::client_facing(&base.join(cert), &base.join(key)).map_err(|e| bad("mail_tls_cert", e))?,
            ),
            _ => return Err(bad("mail_tls_cert", "mail_tls_cert and mail_tls_key go together")),
        };
        if file.imaps.is_some() && mail_tls.is_none() {
            return Err(bad("imaps", "needs mail_tls_cert and mail_tls_key"));
        }
        let users = match &file.users_file {
            None => crate::users::Users::default(),
            Some(p) => crate::users::Users::load(&base.join(p)).map_err(|e| bad("users_file", e))?,
        };
        let admin = match file.admin {
            Some(a) => a,
            None => {
                let port = file.listen.port().checked_add(100).ok_or_else(|| {
                    bad("admin", "no default: the listen port + 100 is not a port; set admin explicitly")
                })?;
                SocketAddr::new([127, 0, 0, 1].into(), port)
            }
        };
        Ok(NodeConfig {
            core,
            listen: file.listen,
            admin,
            data_dir: base.join(file.data_dir.unwrap_or_else(|| PathBuf::from(format!("tandem-{}", file.id)))),
            secret,
            compression: file.compression.unwrap_or(false),
            metrics: file.metrics,
            log_format,
            peers: file.peer,
            tls,
            imap: file.imap,
            imaps: file.imaps,
            mail_tls,
            lmtp: file.lmtp,
            users: std::sync::Arc::new(users),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(text, Path::new("/nonexistent"))
    }

    #[test]
    fn a_minimal_file_works() {
        let c = parse("id = 1\nlisten = \"127.0.0.1:7101\"\n").unwrap();
        assert_eq!(c.core.servers, vec![Sid(1)]);
        assert_eq!(c.core.replicas, 0);
        assert_eq!(c.admin.port(), 7201);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("id = 1\nlisten = \"127.0.0.1:7101\"\nmode = \"fast\"\n").unwrap_err();
        assert!(e.0.contains("`mode`"), "{e}");
        let e = parse("id = 1\nlisten = \"127.0.0.1:7101\"\nreplica = 2\n").unwrap_err();
        assert!(e.0.contains("replica"), "{e}");
        let e = parse("id = 1\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(e.0.contains("listen"), "{e}");
        let e = parse("id = 1\nlisten = \"127.0.0.1:1\"\n[[peer]]\nid = 2\naddress = \"127.0.0.1:2\"\n").unwrap_err();
        assert!(e.0.contains("`secret_file`"), "{e}");
        let e = parse("id = 70000\nlisten = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(e.0.contains("`id`"), "{e}");
    }
}
