//! A fresh read at the mailbox's own master shows what the master ordered before it,
//! once that is durable: a master's copy can hold writes not yet on disk (a mastership
//! just taken over merges the states it was handed), and a read answered from the disk
//! at once would miss them while saying it caught up.

mod one;

use one::One;
use tandem_core::*;

fn save(mailbox: &MailboxKey, text: &'static [u8]) -> ClientRequest {
    ClientRequest::Save {
        mailbox: mailbox.clone(),
        received: 0,
        flags: Vec::new(),
        body: Body::from_static(text),
        delivery: false,
    }
}

#[test]
fn a_masters_fresh_read_waits_until_its_own_copy_is_durable() {
    let inbox = MailboxKey::new("u", "INBOX");
    let mut one = One::new();
    one.input(Input::Client { id: 1, request: save(&inbox, b"first") });
    for _ in 0..200 {
        if one.reply(1).is_some() {
            break;
        }
        one.tick(true);
    }
    // The second save is ordered and in the master's copy, not yet on disk.
    one.input(Input::Client { id: 2, request: save(&inbox, b"second") });
    assert!(!one.held.is_empty(), "the second save's writes are issued");
    one.input(Input::Client { id: 3, request: ClientRequest::FreshRead { mailbox: inbox.clone() } });
    one.tick(false);
    assert!(one.reply(3).is_none(), "answered before the master's own copy was durable");
    one.durable();
    match one.reply(3) {
        Some(ClientReply::FreshRead { view, caught_up: true }) => assert_eq!(view.messages.len(), 2, "{view:?}"),
        other => panic!("expected a caught-up view of both messages, got {other:?}"),
    }
    assert!(matches!(one.reply(2), Some(ClientReply::Write(WriteResult::Saved { .. }))));
    // STATUS waits the same way and counts what the view shows.
    let flags = vec![Flag::new("\\Seen").unwrap()];
    let seen = ClientRequest::Save {
        mailbox: inbox.clone(),
        received: 0,
        flags,
        body: Body::from_static(b"third"),
        delivery: false,
    };
    one.input(Input::Client { id: 4, request: seen });
    one.input(Input::Client { id: 5, request: ClientRequest::FreshStatus { mailbox: inbox.clone() } });
    one.tick(false);
    assert!(one.reply(5).is_none(), "STATUS answered before the master's own copy was durable");
    one.durable();
    match one.reply(5) {
        Some(ClientReply::FreshStatus { status, caught_up: true }) => {
            assert_eq!((status.messages, status.seen, status.deleted, status.uidnext), (3, 1, 0, 4), "{status:?}")
        }
        other => panic!("expected a caught-up STATUS, got {other:?}"),
    }
}

#[test]
fn a_fresh_read_of_a_bad_name_is_refused_at_once() {
    let mut one = One::new();
    let bad = MailboxKey::new("u", "");
    one.input(Input::Client { id: 1, request: ClientRequest::FreshRead { mailbox: bad } });
    assert!(matches!(one.reply(1), Some(ClientReply::Failed { kind: FailKind::Permanent, .. })));
}
