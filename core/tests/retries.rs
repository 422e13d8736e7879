//! A delivery retried after a timeout (an MTA after a 451) whose first attempt was
//! stored after all is answered with that message, not stored twice: the mailbox's
//! master recognises the same bytes received within `Config::retry_window_s` (see
//! `Server::stored_before`). An IMAP APPEND of the same bytes stays a new message.

mod one;

use one::{One, S1};
use tandem_core::*;

fn deliver(id: RequestId, one: &mut One, mailbox: &MailboxKey, received: u64, text: &'static [u8]) -> (Uid, Guid) {
    save(id, one, mailbox, received, text, true)
}

fn save(
    id: RequestId,
    one: &mut One,
    mailbox: &MailboxKey,
    received: u64,
    text: &'static [u8],
    delivery: bool,
) -> (Uid, Guid) {
    let body = Body::from_static(text);
    let request = ClientRequest::Save { mailbox: mailbox.clone(), received, flags: Vec::new(), body, delivery };
    one.input(Input::Client { id, request });
    for _ in 0..200 {
        if let Some(reply) = one.reply(id) {
            match reply {
                ClientReply::Write(WriteResult::Saved { uid, guid, .. }) => return (uid, guid),
                other => panic!("save {id}: {other:?}"),
            }
        }
        one.tick(true);
    }
    panic!("save {id} never answered");
}

const MAIL: &[u8] = b"Message-ID: <1@example.org>\r\nSubject: hello\r\n\r\nbody\r\n";
const SAME_ID_OTHER_TEXT: &[u8] = b"Message-ID: <1@example.org>\r\nSubject: hello\r\n\r\nanother body\r\n";

#[test]
fn a_retry_with_the_same_bytes_gets_the_first_attempts_message() {
    let inbox = MailboxKey::new("u", "INBOX");
    let mut one = One::new();
    let first = deliver(1, &mut one, &inbox, 1000, MAIL);
    // An hour later, the same bytes: the retry.
    assert_eq!(deliver(2, &mut one, &inbox, 1000 + 3600, MAIL), first);
    assert_eq!(one.server.marks().count(Mark::RetryRecognised), 1);
    // Same Message-ID, other bytes: another message.
    let other = deliver(3, &mut one, &inbox, 1000 + 3600, SAME_ID_OTHER_TEXT);
    assert_ne!(other.0, first.0);
    // The same bytes in another mailbox, or after the window: stored.
    let archive = MailboxKey::new("u", "Archive");
    assert_eq!(deliver(4, &mut one, &archive, 1000, MAIL).0, 1);
    let late = deliver(5, &mut one, &inbox, 1000 + Config::RETRY_WINDOW_S_DEFAULT + 1, MAIL);
    assert_ne!(late.0, first.0);
    let view = |one: &mut One| match one.server.read(&inbox) {
        ClientReply::Read(view) => view.messages.len(),
        other => panic!("{other:?}"),
    };
    assert_eq!(view(&mut one), 3);
    // An IMAP APPEND of the same bytes is a new message (RFC 3501).
    let appended = save(6, &mut one, &inbox, 1000, MAIL, false);
    assert_ne!(appended.0, first.0);
    assert_eq!(view(&mut one), 4);
}

#[test]
fn a_window_of_zero_stores_every_attempt() {
    let inbox = MailboxKey::new("u", "INBOX");
    let mut cfg = Config::new(S1, vec![S1]);
    cfg.replicas = 0;
    cfg.retry_window_s = 0;
    let mut one = One::with(cfg);
    let first = deliver(1, &mut one, &inbox, 1000, MAIL);
    let second = deliver(2, &mut one, &inbox, 1000, MAIL);
    assert_ne!(first.0, second.0);
}
