//! Entry points for the fuzz targets in `fuzz/`: each takes arbitrary bytes and must
//! neither panic nor hang, whatever they are. Not an API.

use crate::config::Limits;
use crate::front::Front;
use crate::node::spawn_in_memory;
use crate::users::Users;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::io::Config;
use tandem_core::types::Sid;
use tokio::io::AsyncWriteExt;

/// MIME structure extraction: BODYSTRUCTURE, ENVELOPE, parts and header fields of any
/// bytes taken as a message.
pub fn mime(data: &[u8]) {
    use crate::imap::mime::{self, SectionText};
    let structure = mime::Structure::of(data);
    let _ = mime::describe(data, &structure, true);
    let _ = mime::envelope(data);
    let end = mime::header_end(data);
    let names = ["subject".to_string(), "to".to_string()];
    let _ = mime::header_fields(&data[..end], &names, false);
    let _ = mime::address_search_text(&data[..end], "to");
    let _ = mime::sent_date(&data[..end]);
    let _ = mime::SortFields::of(&data[..end]);
    let _ = mime::ThreadFields::of(&data[..end]);
    let _ = mime::encode_binary_parts(data);
    for path in [&[1][..], &[1, 1], &[2, 1, 3], &[1, 2, 1, 2], &[2, 1]] {
        let _ = mime::part_bytes(data, path);
        let _ = mime::binary_section(data, &structure, path);
        for text in [SectionText::Header, SectionText::Text, SectionText::Mime] {
            let _ = mime::section(data, &structure, path, text);
        }
        let _ = mime::section(data, &structure, path, SectionText::HeaderFields { names: &names, not: true });
    }
}

/// One user, fuzz@example.org (password "fuzz"), loaded once per process.
fn users() -> Arc<Users> {
    static USERS: std::sync::OnceLock<Arc<Users>> = std::sync::OnceLock::new();
    USERS
        .get_or_init(|| {
            let path = std::env::temp_dir().join(format!("tandem-fuzz-users-{}.toml", std::process::id()));
            let loaded = crate::users::add_user(&path, "fuzz@example.org", b"fuzz").and_then(|()| Users::load(&path));
            let _ = std::fs::remove_file(&path);
            Arc::new(loaded.unwrap_or_default())
        })
        .clone()
}

fn limits() -> Limits {
    // Small enough that the fuzzer meets every limit.
    Limits {
        message_size_max: 64 * 1024,
        imap_line_len_max: 4096,
        imap_prelogin_len_max: 1024,
        recipients_max: 4,
        mailboxes_per_user_max: 8,
        quota_messages: 16,
        ..Limits::default()
    }
}

/// Runs `session` against an in-memory node with the input as everything the client
/// sends; time is paused, so timeouts and delays cost nothing.
fn with_node<F, Fut>(data: &[u8], session: F)
where
    F: FnOnce(tokio::io::DuplexStream, crate::node::NodeHandle, Front) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build() else {
        return;
    };
    let data = data.to_vec();
    rt.block_on(async move {
        let mut core = Config::new(Sid(1), vec![Sid(1)]);
        core.replicas = 0;
        let node = spawn_in_memory(core);
        let front = Front::with(users(), limits());
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut read, mut write) = tokio::io::split(client);
        let feed = async move {
            let _ = write.write_all(&data).await;
            let _ = write.shutdown().await;
            // Drain what the server says so it never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut read, &mut sink).await;
        };
        let run = async {
            tokio::join!(feed, session(server, node, front));
        };
        // A session that does not end by itself within a (paused) hour has hung.
        if tokio::time::timeout(Duration::from_secs(3600), run).await.is_err() {
            panic!("the session did not end after its input did");
        }
    });
}

/// The IMAP command path: parser plus session. The first byte picks whether the
/// session starts logged in (to reach the commands behind LOGIN).
pub fn imap(data: &[u8]) {
    let Some((first, rest)) = data.split_first() else { return };
    let logged_in = (first & 1 == 1).then(|| "fuzz@example.org".to_string());
    with_node(rest, |stream, node, front| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let ip = std::net::IpAddr::from([192, 0, 2, 1]);
        let _ = crate::imap::session::run_session(Box::new(stream), node, front, ip, deadline, None, false, logged_in)
            .await;
    });
}

/// The LMTP path.
pub fn lmtp(data: &[u8]) {
    with_node(data, |stream, node, front| async move {
        let _ = crate::lmtp::session(stream, node, front, "fuzz").await;
    });
}
