//! `tandem`: run a node, start a local cluster, or talk to a node's admin interface.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tandem_node::admin::{self, AdminAddr, AdminReply, AdminRequest};
use tandem_node::config::{LogFormat, NodeConfig};

#[derive(Parser)]
#[command(name = "tandem", version, about = "Multi-master replication for IMAP mailboxes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Node {
        #[arg(long)]
        config: PathBuf,
        /// Log JSON lines instead of text (overrides the config's log_format).
        #[arg(long)]
        log_json: bool,
        /// Stop when standard input closes (how `tandem cluster` ties its nodes to itself).
        #[arg(long, hide = true)]
        stop_on_stdin_eof: bool,
        /// Start on a restored backup older than tombstone_grace_secs (messages expunged
        /// since may come back): only where the backup is all that is left of the mail.
        #[arg(long)]
        accept_old_backup: bool,
    },
    /// Read a node's config file as `tandem node` would (secret, TLS files, users file,
    /// limits) and say what it sets up, or what is wrong; exits 1 on a bad file.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Start N nodes on loopback in a new directory and keep them running.
    Cluster {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Where configs and data go (default: a new directory under the system temp
        /// dir); a directory an earlier run made is taken up again, data and all.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Sync or async.
        #[arg(long, default_value = "sync")]
        mode: String,
    },
    /// A node's root, epoch, masters, links, backlog and mailboxes.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        json: bool,
    },
    /// Save a message (from --file or standard input) through a node.
    Deliver {
        #[command(flatten)]
        admin: AdminArgs,
        /// user/name, e.g. alice@example.org/INBOX
        #[arg(long)]
        mailbox: String,
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long = "flag")]
        flags: Vec<String>,
    },
    /// A mailbox as a node shows it: UIDs, GUIDs, flags.
    Dump {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        mailbox: String,
        #[arg(long)]
        json: bool,
    },
    /// Manage mail users.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// The cluster's servers: add one, retire one, or list them (through any node; the
    /// change reaches every server).
    Member {
        #[command(subcommand)]
        action: MemberAction,
    },
    /// Bring a user's mail in from another server: any IMAP server (--from) or a
    /// Dovecot Maildir (--maildir), into a running cluster through one node. Flags,
    /// keywords and INTERNALDATEs are kept, and UIDVALIDITY and UIDs where the target
    /// mailbox is new, so mail clients download nothing again. Run it again to resume an
    /// interrupted import: what is already there is not imported twice.
    Import {
        #[command(flatten)]
        admin: AdminArgs,
        /// The tandem user the mail goes to.
        #[arg(long)]
        user: String,
        /// imap://user@host[:port] or imaps://user@host[:port] (user@domain as user%40domain).
        #[arg(long, conflicts_with = "maildir", required_unless_present = "maildir")]
        from: Option<String>,
        /// The file holding the source account's password (else it is asked for).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// CA certificates (PEM) to trust for imaps:// (default: the system's).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// A user's Maildir (the directory holding cur/, new/ and the .Folder directories).
        #[arg(long)]
        maildir: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Messages sent to the node per request (1 to 64): their round trips overlap.
        #[arg(long, default_value_t = 64)]
        batch: usize,
    },
    /// Write mailboxes out as Dovecot Maildirs (DIR/<user>/Maildir, with dovecot-uidlist:
    /// UIDs and UIDVALIDITY kept). Run again into the same DIR, it writes what is new.
    Export {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        maildir: PathBuf,
        /// One user (default: every user).
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        quiet: bool,
    },
    /// A consistent copy of a running node's store in DIR (new or empty, writable by the
    /// node), taken without stopping it. Restore: a node started on the copy (same id)
    /// catches up with the others by SYNC.
    Backup {
        #[command(flatten)]
        admin: AdminArgs,
        dir: PathBuf,
    },
    /// Keep a user replica (this machine's tandem node, `user_replica = true`) in two-way
    /// sync with the user's mailboxes on a cluster: logs in to the cluster's IMAP port as
    /// the user over TLS and syncs by `X-REPLICATE`. Once by default (for cron or a
    /// systemd timer); with --every, again and again. Exits 1 when a sync does not end
    /// with both sides alike.
    Replicate {
        /// The user replica's node (its admin socket).
        #[command(flatten)]
        admin: AdminArgs,
        /// The cluster's IMAP server: host[:port] (port 993, or 143 with --starttls).
        #[arg(long)]
        server: String,
        #[arg(long)]
        user: String,
        /// The file holding the user's password or app token (else it is asked for).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// CA certificates (PEM) to trust (default: the system's).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Connect in plain text and STARTTLS before the password.
        #[arg(long)]
        starttls: bool,
        /// No COMPRESS=DEFLATE on the link.
        #[arg(long)]
        no_compress: bool,
        /// Where the sync's marks are kept (default: beside the admin socket,
        /// replica-<user>.marks). Keep it with the store: without it the next sync is
        /// whole.
        #[arg(long)]
        marks: Option<PathBuf>,
        /// Sync again every SECONDS, for ever (a long-running agent).
        #[arg(long)]
        every: Option<u64>,
        /// Rounds a sync makes at most (a round syncs what the one before left unequal).
        #[arg(long, default_value_t = tandem_core::user_replica::ROUNDS_MAX_DEFAULT)]
        rounds: u32,
        /// The report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add or remove flags.
    Store {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        mailbox: String,
        #[arg(long, value_delimiter = ',')]
        uids: Vec<u32>,
        #[arg(long = "add")]
        add: Vec<String>,
        #[arg(long = "remove")]
        remove: Vec<String>,
    },
}

/// Where the node's admin interface is.
#[derive(clap::Args)]
struct AdminArgs {
    /// The node's admin socket (its data_dir/admin.sock), or host:port of a TCP admin port.
    #[arg(long, default_value = "/var/lib/tandem/admin.sock")]
    admin: String,
    /// The token of a TCP admin port (also TANDEM_ADMIN_TOKEN).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
}

impl AdminArgs {
    fn addr(&self) -> Result<AdminAddr, String> {
        let token = match &self.admin_token_file {
            Some(path) => {
                Some(std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?.trim().to_string())
            }
            None => std::env::var("TANDEM_ADMIN_TOKEN").ok(),
        };
        AdminAddr::parse(&self.admin, token)
    }
}

#[derive(Subcommand)]
enum MemberAction {
    /// Add a server: ID (1..65535, never used before) and ADDRESS (host:port of its
    /// peer port). Start it afterwards with a config listing any running server as peer.
    Add {
        #[command(flatten)]
        admin: AdminArgs,
        id: u32,
        address: String,
    },
    /// Retire a server: it hands its masterships and copies over, then retires itself
    /// (`member list` shows it retired; then stop it). `--lost`: it is gone for good and
    /// is retired at once; what only it held is lost.
    Remove {
        #[command(flatten)]
        admin: AdminArgs,
        id: u32,
        #[arg(long)]
        lost: bool,
    },
    /// Every server and its state (active, leaving, retired), as this node knows them.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Add a user (or set a new password); the password is read from standard input.
    Add {
        name: String,
        #[arg(long)]
        users: PathBuf,
    },
    /// Remove a user (their mail stays in the store); a running node forgets them at its
    /// next SIGHUP.
    Remove {
        name: String,
        #[arg(long)]
        users: PathBuf,
    },
    /// List the users in the file.
    List {
        #[arg(long)]
        users: PathBuf,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tandem: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: {e}");
            ExitCode::FAILURE
        }
    }
}

const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The source account's password: the file's first line, or asked for on the terminal.
fn read_password(file: Option<&std::path::Path>, user: &str) -> Result<String, String> {
    use std::io::{BufRead, IsTerminal, Write};
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        return Ok(text.lines().next().unwrap_or_default().to_string());
    }
    if !std::io::stdin().is_terminal() {
        return Err("no --password-file and no terminal to ask for the password on".into());
    }
    eprint!("password for {user}: ");
    let _ = std::io::stderr().flush();
    let echo_off = std::process::Command::new("stty").arg("-echo").status().is_ok_and(|s| s.success());
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if echo_off {
        let _ = std::process::Command::new("stty").arg("echo").status();
        eprintln!();
    }
    read.map_err(|e| e.to_string())?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

async fn call(admin: AdminArgs, request: AdminRequest) -> Result<AdminReply, String> {
    match admin::call(&admin.addr()?, &request, ADMIN_TIMEOUT).await? {
        AdminReply::Error { temporary, reason } => {
            Err(format!("{}: {reason}", if temporary { "temporary failure" } else { "failed" }))
        }
        reply => Ok(reply),
    }
}

/// Prints `text` and a newline; a closed standard output (`tandem status | head`) ends
/// the command quietly instead of panicking as `println!` does.
fn out(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.write_all(b"\n")).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(format!("standard output: {e}")),
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, String> {
    serde_json::to_string(value).map_err(|e| e.to_string())
}

async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Node { config, log_json, stop_on_stdin_eof, accept_old_backup } => {
            let mut cfg = NodeConfig::load(&config).map_err(|e| e.to_string())?;
            cfg.accept_old_backup = accept_old_backup;
            init_logs(if log_json { LogFormat::Json } else { cfg.log_format });
            // Signal handlers first, before the store loads (seconds for a large one): a
            // SIGTERM or SIGINT then is a clean stop once the node is up, not a kill by
            // the default action.
            let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
            let interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
            let shutdown = async move {
                let stdin_closed = async {
                    if !stop_on_stdin_eof {
                        return std::future::pending().await;
                    }
                    let mut sink = Vec::new();
                    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
                };
                // SIGTERM (systemd's stop) and SIGINT stop the node the same way.
                let received = |stream: std::io::Result<tokio::signal::unix::Signal>| async move {
                    match stream {
                        Ok(mut stream) => {
                            stream.recv().await;
                        }
                        Err(_) => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = received(interrupt) => {}
                    _ = received(term) => {}
                    _ = stdin_closed => {}
                }
            };
            tandem_node::node::run(cfg, shutdown).await
        }
        Command::CheckConfig { config } => {
            let cfg = NodeConfig::load(&config).map_err(|e| e.to_string())?;
            println!("{}: ok", config.display());
            println!("{}", describe_config(&cfg));
            Ok(())
        }
        Command::Cluster { nodes, dir, mode } => run_cluster(nodes, dir, &mode).await,
        Command::Status { admin, json: as_json } => {
            let reply = call(admin, AdminRequest::Status).await?;
            let AdminReply::Status(s) = reply else { return Err(format!("unexpected answer {reply:?}")) };
            if as_json {
                return out(&json(&s)?);
            }
            let mut text = format!("server {}  store {}  root {:?}  epoch {}\n", s.id, s.store, s.root, s.epoch);
            match (s.filled, s.unconfirmed) {
                (Some(false), Some(n)) => {
                    text +=
                        &format!("store not filled yet: a newcomer, {n} mailboxes not yet confirmed by their masters\n")
                }
                (Some(false), None) => text += "store not filled yet: never in a root term\n",
                (Some(true), Some(_)) => text += "store filled: a newcomer, every mailbox it holds confirmed\n",
                _ => {}
            }
            text += &format!("masters known: {:?}\n", s.masters);
            text += &format!("mastered here: {:?}\n", s.mastered_here);
            for l in &s.links {
                text += &format!(
                    "{}\n",
                    format_args!(
                        "peer {}: {} {} backlog {} store {}",
                        l.peer,
                        if l.connected { "connected" } else { "not connected" },
                        if l.reachable { "reachable" } else { "unreachable" },
                        l.backlog,
                        l.store.as_deref().unwrap_or("unknown")
                    )
                );
            }
            for m in &s.mailboxes {
                text += &format!(
                    "{}: UIDVALIDITY {} UIDNEXT {} messages {} HIGHESTMODSEQ {} digest {}\n",
                    m.mailbox, m.uidvalidity, m.uidnext, m.messages, m.highest_modseq, m.digest
                );
            }
            out(text.trim_end())
        }
        Command::Deliver { admin, mailbox, file, flags } => {
            let body = match file {
                Some(path) => std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?,
                None => {
                    use std::io::Read;
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf).map_err(|e| format!("stdin: {e}"))?;
                    buf
                }
            };
            let body = String::from_utf8(body).map_err(|_| "the message is not UTF-8 text".to_string())?;
            match call(admin, AdminRequest::Deliver { mailbox, body, flags }).await? {
                AdminReply::Saved { uidvalidity, uid, guid } => {
                    out(&format!("saved UID {uid} (UIDVALIDITY {uidvalidity}) GUID {guid}"))
                }
                other => Err(format!("unexpected answer {other:?}")),
            }
        }
        Command::Dump { admin, mailbox, json: as_json } => {
            let reply = call(admin, AdminRequest::Dump { mailbox }).await?;
            let AdminReply::Dump(d) = reply else { return Err(format!("unexpected answer {reply:?}")) };
            if as_json {
                return out(&json(&d)?);
            }
            let mut text = format!(
                "{} UIDVALIDITY {} UIDNEXT {} HIGHESTMODSEQ {}\n",
                d.mailbox, d.uidvalidity, d.uidnext, d.highest_modseq
            );
            for m in &d.messages {
                text += &format!("{} {} ({}) modseq {}\n", m.uid, m.guid, m.flags.join(" "), m.modseq);
            }
            out(text.trim_end())
        }
        Command::User { action: UserAction::Add { name, users } } => {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password).map_err(|e| format!("stdin: {e}"))?;
            let password = password.trim_end_matches(['\r', '\n']);
            tandem_node::users::add_user(&users, &name, password.as_bytes())?;
            out(&format!("user {name} written to {}", users.display()))
        }
        Command::User { action: UserAction::Remove { name, users } } => {
            tandem_node::users::remove_user(&users, &name)?;
            out(&format!("user {name} removed from {}; send the nodes a SIGHUP", users.display()))
        }
        Command::User { action: UserAction::List { users } } => {
            out(&tandem_node::users::list_users(&users)?.join("\n"))
        }
        Command::Member { action } => {
            let (admin, request, as_json) = match action {
                MemberAction::Add { admin, id, address } => (admin, AdminRequest::MemberAdd { id, address }, false),
                MemberAction::Remove { admin, id, lost } => (admin, AdminRequest::MemberRemove { id, lost }, false),
                MemberAction::List { admin, json } => (admin, AdminRequest::Members, json),
            };
            match call(admin, request).await? {
                AdminReply::Members { members: lines } if as_json => out(&json(&lines)?),
                AdminReply::Members { members: lines } => out(&lines
                    .iter()
                    .map(|m| format!("{} {} {}", m.id, m.state, if m.address.is_empty() { "-" } else { &m.address }))
                    .collect::<Vec<_>>()
                    .join("\n")),
                other => Err(format!("unexpected answer {other:?}")),
            }
        }
        Command::Import { admin, user, from, password_file, ca_file, maildir, quiet, batch } => {
            let addr = admin.addr()?;
            let done = tokio::task::spawn_blocking(move || {
                use tandem_node::migrate::{Source, imap_source, maildir::MaildirSource};
                let mut source = match (from, maildir) {
                    (_, Some(dir)) => Source::Maildir(MaildirSource::open(&dir)?),
                    (Some(url), None) => {
                        let url = imap_source::ImapUrl::parse(&url)?;
                        let password = read_password(password_file.as_deref(), &url.user)?;
                        Source::Imap(imap_source::ImapSource::connect(&url, &password, ca_file.as_deref())?)
                    }
                    (None, None) => return Err("give --from imap[s]://user@host or --maildir DIR".to_string()),
                };
                let done = tandem_node::migrate::import(&mut source, &addr, &user, batch, quiet);
                if let Source::Imap(s) = source {
                    s.logout();
                }
                done
            })
            .await
            .map_err(|e| e.to_string())??;
            out(&format!(
                "imported {} messages ({} bytes) into {} mailboxes; {} already there; {} at new UIDs",
                done.messages, done.bytes, done.folders, done.skipped, done.renumbered
            ))
        }
        Command::Replicate {
            admin,
            server,
            user,
            password_file,
            ca_file,
            starttls,
            no_compress,
            marks,
            every,
            rounds,
            json,
        } => {
            use tandem_node::replicate::{self, ClusterLogin, ReplicateOptions, TlsMode};
            let tls = if starttls { TlsMode::StartTls } else { TlsMode::Implicit };
            let (host, port) = ClusterLogin::parse_server(&server, tls)?;
            let replica = admin.addr()?;
            let marks_file = match (marks, &replica) {
                (Some(path), _) => path,
                (None, admin::AdminAddr::Unix(socket)) => {
                    socket.with_file_name(format!("replica-{}.marks", user.replace(['/', '\\'], "_")))
                }
                (None, admin::AdminAddr::Tcp { .. }) => {
                    return Err("a TCP admin port has no directory beside it: give --marks".into());
                }
            };
            let password = read_password(password_file.as_deref(), &user)?;
            let opts = ReplicateOptions {
                cluster: ClusterLogin { host, port, tls, user, password, ca_file, compress: !no_compress },
                replica,
                marks_file,
                rounds_max: rounds,
            };
            loop {
                let outcome = replicate::sync_once(&opts).await;
                let converged = match &outcome {
                    Ok(report) if json => {
                        out(&serde_json::to_string(report).map_err(|e| e.to_string())?)?;
                        report.converged
                    }
                    Ok(report) => {
                        out(&replicate::summary(report))?;
                        report.converged
                    }
                    Err(e) => {
                        eprintln!("tandem: replicate: {e}");
                        false
                    }
                };
                match every {
                    Some(seconds) => tokio::time::sleep(Duration::from_secs(seconds.max(1))).await,
                    None if converged => return Ok(()),
                    None => return Err(outcome.err().unwrap_or_else(|| "the sync ended with the sides unlike".into())),
                }
            }
        }
        Command::Export { admin, maildir, user, quiet } => {
            let addr = admin.addr()?;
            let done = tokio::task::spawn_blocking(move || {
                tandem_node::migrate::export(&addr, user.as_deref(), &maildir, quiet)
            })
            .await
            .map_err(|e| e.to_string())??;
            let dropped = if done.keywords_dropped > 0 {
                format!("; {} keywords beyond the 26 a Maildir folder can hold were left out", done.keywords_dropped)
            } else {
                String::new()
            };
            out(&format!(
                "exported {} messages ({} bytes) in {} mailboxes of {} users{dropped}",
                done.messages, done.bytes, done.mailboxes, done.users
            ))
        }
        Command::Backup { admin, dir } => {
            let dir = std::path::absolute(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let request = AdminRequest::Backup { dir: dir.display().to_string() };
            match admin::call(&admin.addr()?, &request, Duration::from_secs(24 * 3600)).await? {
                AdminReply::BackedUp { dir, bytes, body_files, mailboxes, messages } => out(&format!(
                    "backup in {dir}: {mailboxes} mailboxes, {messages} messages, {body_files} body files, {bytes} bytes"
                )),
                AdminReply::Error { reason, .. } => Err(format!("backup failed: {reason}")),
                other => Err(format!("unexpected answer {other:?}")),
            }
        }
        Command::Store { admin, mailbox, uids, add, remove } => {
            match call(admin, AdminRequest::Store { mailbox, uids, add, remove }).await? {
                AdminReply::Stored { modseq } => out(&format!("stored, MODSEQ {modseq}")),
                other => Err(format!("unexpected answer {other:?}")),
            }
        }
    }
}

async fn run_cluster(nodes: usize, dir: Option<PathBuf>, mode: &str) -> Result<(), String> {
    if !(1..=64).contains(&nodes) {
        return Err("--nodes must be between 1 and 64".into());
    }
    let dir = dir.unwrap_or_else(|| {
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        std::env::temp_dir().join(format!("tandem-cluster-{}-{stamp}", std::process::id()))
    });
    let extra = format!("mode = \"{mode}\"");
    let cluster = tandem_node::cluster::prepare(&dir, nodes, &extra)?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A node stops cleanly when its stdin closes: dropping these is the stop.
    let mut stdins = Vec::new();
    let mut running = Vec::new();
    for m in &cluster.node {
        let mut child = tokio::process::Command::new(&exe)
            .arg("node")
            .arg("--config")
            .arg(&m.config)
            .arg("--stop-on-stdin-eof")
            .stdin(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start node {}: {e}", m.id))?;
        stdins.push(child.stdin.take());
        let (id, stopping) = (m.id, stopping.clone());
        running.push(tokio::spawn(async move {
            let status = child.wait().await;
            if !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                match status {
                    Ok(s) => eprintln!("tandem cluster: node {id} stopped by itself ({s}); its log above says why"),
                    Err(e) => eprintln!("tandem cluster: node {id}: {e}"),
                }
            }
        }));
    }
    print!("{}", tandem_node::cluster::describe(&cluster, &dir));
    println!("\n`tandem cluster --nodes {nodes} --dir {}` starts this cluster again, data kept.", dir.display());
    println!("Ctrl-C stops the cluster.");
    let _ = tokio::signal::ctrl_c().await;
    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(stdins);
    // Each node commits what it holds and closes its store; one that does not stop in
    // time is killed (dropping its task drops the child, which kills it).
    for task in running {
        let abort = task.abort_handle();
        if tokio::time::timeout(CLUSTER_STOP_WAIT, task).await.is_err() {
            abort.abort();
        }
    }
    Ok(())
}

/// How long `tandem cluster` waits on Ctrl-C for its nodes' clean stop.
const CLUSTER_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// What a loaded config sets up, one fact a line (`tandem check-config`).
fn describe_config(cfg: &NodeConfig) -> String {
    let on = |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
    let peers: Vec<String> = cfg.peers.iter().map(|p| format!("{} at {}", p.id, p.address)).collect();
    let core = &cfg.core;
    [
        format!("id {}, peers on {}", core.sid.0, cfg.listen),
        format!("peers: {}", if peers.is_empty() { "none (a cluster of one)".into() } else { peers.join(", ") }),
        format!("mode {:?}, replicas {}, granularity {:?}", core.durability, core.replicas, core.granularity),
        format!("peer TLS: {}", if cfg.tls.is_some() { "on" } else { "off" }),
        format!("data_dir {}", cfg.data_dir.display()),
        format!("imap {}, imaps {}, lmtp {}, metrics {}", on(cfg.imap), on(cfg.imaps), on(cfg.lmtp), on(cfg.metrics)),
        format!("mail TLS: {}", if cfg.mail_tls.is_some() { "on" } else { "off" }),
        format!("users: {}", cfg.users.len()),
    ]
    .join("\n")
}
