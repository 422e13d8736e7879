//! A partial replica's text parts (issue 17: above its size limit "only the metadata and
//! the text parts are copied"). The cluster's node cuts each large message it sends a
//! partial replica's agent down to its header, every MIME header and boundary, and the
//! bodies of its inline text parts; the bodies of its attachments (every other leaf) are
//! left out. Beside those bytes go ENVELOPE, BODY and BODYSTRUCTURE of the whole message,
//! so a mail client on the laptop sees the attachments listed with their real sizes and
//! reads the text; a FETCH of what was left out asks the agent for the whole body.
//!
//! The core stores these bytes as they come and never looks inside: the mail format is
//! the driver's business (the simulator cuts its own messages its own way).

use super::mime::{self, Holds, Structure};
use super::parsed::Parsed;
use crate::codec::{Bincode, RecordCodec};
use imap_codec::imap_types::fetch::{MessageDataItemName, Section};
use serde::{Deserialize, Serialize};

/// What a partial replica holds of a message whose body it omits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextParts {
    /// ENVELOPE, BODY and BODYSTRUCTURE of the whole message.
    pub whole: Parsed,
    /// The message with the bodies of the parts in `left_out` emptied: every header and
    /// every boundary stays, so its MIME parts have the whole message's numbers.
    pub abridged: Vec<u8>,
    /// The parts (indices into the abridged message's [`Structure`]) whose bodies are not
    /// here.
    pub left_out: Vec<u32>,
}

/// Whether a leaf part's body comes with the text parts: inline text.
fn is_text(part: &mime::Part) -> bool {
    let attachment = part.content.disposition.as_ref().is_some_and(|(kind, _)| kind.eq_ignore_ascii_case("attachment"));
    part.content.main.eq_ignore_ascii_case("text") && !attachment
}

/// Cuts `msg` to its text parts (encoded for the link and the store).
pub fn cut(msg: &[u8]) -> Vec<u8> {
    let structure = Structure::of(msg);
    let leaves: Vec<usize> = (0..structure.parts.len())
        .filter(|&i| structure.parts[i].holds == Holds::Nothing && !is_text(&structure.parts[i]))
        .collect();
    let mut abridged = Vec::with_capacity(msg.len().min(1 << 20));
    let mut copied = 0;
    // Leaves do not overlap, and the walk found them in the order of their bytes.
    for &i in &leaves {
        let body = &structure.parts[i].body;
        if body.start < copied || body.end > msg.len() {
            continue;
        }
        abridged.extend_from_slice(&msg[copied..body.start]);
        copied = body.end;
    }
    abridged.extend_from_slice(&msg[copied..]);
    let mut left_out: Vec<u32> = leaves.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
    if Structure::of(&abridged).parts.len() != structure.parts.len() {
        // Emptying a part changed how the rest reads (a sender's odd boundaries): only
        // the header comes, and everything past it is asked for whole.
        abridged = msg[..mime::header_end(msg)].to_vec();
        left_out = vec![0];
    }
    let parts = TextParts { whole: Parsed::of(msg, &structure), abridged, left_out };
    // Encoding plain bytes and vectors cannot fail; an empty answer is one the replica
    // cannot read, and its FETCH then asks for the whole body.
    Bincode::encode(&parts).unwrap_or_default()
}

impl TextParts {
    /// Reads what [`cut`] made; None if the bytes are not that.
    pub fn decode(bytes: &[u8]) -> Option<TextParts> {
        Bincode::decode::<TextParts>(bytes).ok()
    }

    /// Whether every item can be answered from the text parts (with the abridged message
    /// as the bytes, and `whole` as what is parsed): nothing it needs was left out.
    pub fn answer(&self, items: &[MessageDataItemName<'_>]) -> bool {
        let structure = Structure::of(&self.abridged);
        items.iter().all(|item| self.answers(&structure, item))
    }

    fn answers(&self, structure: &Structure, item: &MessageDataItemName<'_>) -> bool {
        let numbers = |part: Option<&imap_codec::imap_types::fetch::Part>| -> Vec<u32> {
            part.map(|p| p.0.as_ref().iter().map(|n| n.get()).collect()).unwrap_or_default()
        };
        match item {
            MessageDataItemName::Rfc822 | MessageDataItemName::Rfc822Text => self.left_out.is_empty(),
            MessageDataItemName::BodyExt { section, .. } => match section {
                None => self.left_out.is_empty(),
                Some(Section::Part(p)) => self.holds_all_of(structure, &numbers(Some(p))),
                Some(Section::Text(p)) => self.holds_all_of(structure, &numbers(p.as_ref())),
                Some(Section::Header(_) | Section::HeaderFields(..) | Section::HeaderFieldsNot(..))
                | Some(Section::Mime(_)) => true,
            },
            MessageDataItemName::Binary { section, .. } | MessageDataItemName::BinarySize { section } => {
                let path: Vec<u32> = section.iter().map(|n| n.get()).collect();
                self.holds_all_of(structure, &path)
            }
            _ => true,
        }
    }

    /// Whether the part `path` names (and every part inside it) has its body here. A path
    /// that names no part is answered (as empty) whatever was left out.
    fn holds_all_of(&self, structure: &Structure, path: &[u32]) -> bool {
        let Some(index) = structure.resolve(path) else { return true };
        let Some(part) = structure.parts.get(index) else { return true };
        let (start, end) = (part.header.start, part.body.end.max(part.header.end));
        self.left_out.iter().all(|&l| {
            let Some(gone) = structure.parts.get(l as usize) else { return true };
            l as usize != index && !(gone.header.start >= start && gone.header.end <= end)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imap_codec::imap_types::core::Vec1;
    use std::num::NonZeroU32;

    const MIXED: &[u8] = b"From: a@example.org\r\nSubject: report\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\n\
Content-Type: text/plain\r\n\r\nHere is the report.\r\n--b1\r\n\
Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=r.pdf\r\n\
Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFIKL0ZpbHRlciAvRmxhdGVEZWNvZGU+Pgpz\r\n\
dHJlYW0KeJytWk1v2zAMvetX6LgdqkqyZNnHYdgwYMCAYTl0t2JbmgZt0iFJ0/77UbYsybQlO2lRoLVN\r\n\
--b1--\r\n";

    fn part(n: &[u32]) -> MessageDataItemName<'static> {
        let numbers: Vec<NonZeroU32> = n.iter().filter_map(|x| NonZeroU32::new(*x)).collect();
        let p = imap_codec::imap_types::fetch::Part(Vec1::try_from(numbers).unwrap());
        MessageDataItemName::BodyExt { section: Some(Section::Part(p)), partial: None, peek: true }
    }

    #[test]
    fn the_attachment_is_left_out_and_the_text_and_structure_stay() {
        let cut = cut(MIXED);
        let parts = TextParts::decode(&cut).unwrap();
        assert!(parts.abridged.len() < MIXED.len());
        assert!(!parts.abridged.windows(8).any(|w| w == b"JVBERi0x"), "the PDF's bytes are not there");
        let whole = Structure::of(MIXED);
        let abridged = Structure::of(&parts.abridged);
        assert_eq!(whole.parts.len(), abridged.parts.len());
        let text = |msg: &[u8], s: &Structure| mime::section(msg, s, &[1], mime::SectionText::All);
        assert_eq!(text(MIXED, &whole), text(&parts.abridged, &abridged), "the text part is the same");
        assert_eq!(
            parts.whole.bodystructure,
            mime::describe(MIXED, &whole, true),
            "BODYSTRUCTURE is the whole message's (the PDF's size included)"
        );
        assert!(parts.answer(&[MessageDataItemName::BodyStructure, MessageDataItemName::Envelope, part(&[1])]));
        assert!(!parts.answer(&[part(&[2])]), "the attachment is not here");
        let whole_message = MessageDataItemName::BodyExt { section: None, partial: None, peek: true };
        assert!(!parts.answer(&[whole_message]));
        let header = MessageDataItemName::BodyExt { section: Some(Section::Header(None)), partial: None, peek: true };
        assert!(parts.answer(&[header, MessageDataItemName::Rfc822Header]));
    }

    #[test]
    fn a_megabyte_attachment_leaves_a_few_hundred_bytes() {
        let mut msg = MIXED[..MIXED.len() - b"--b1--\r\n".len()].to_vec();
        msg.extend_from_slice(b"--b1\r\nContent-Type: image/jpeg\r\nContent-Transfer-Encoding: base64\r\n\r\n");
        for _ in 0..(1 << 20) / 78 {
            msg.extend_from_slice(&[b'A'; 76]);
            msg.extend_from_slice(b"\r\n");
        }
        msg.extend_from_slice(b"--b1--\r\n");
        let cut = cut(&msg);
        assert!(msg.len() > 1 << 20);
        eprintln!("{} bytes of text parts for {} of message", cut.len(), msg.len());
        assert!(cut.len() < 2048, "{} bytes of text parts for {} of message", cut.len(), msg.len());
        let parts = TextParts::decode(&cut).unwrap();
        assert_eq!(parts.left_out.len(), 2, "the PDF and the photo");
    }

    #[test]
    fn a_message_of_text_only_is_whole_and_garbage_is_not_text_parts() {
        let plain = b"From: a@example.org\r\nSubject: hi\r\n\r\nJust text.\r\n";
        let parts = TextParts::decode(&cut(plain)).unwrap();
        assert_eq!(parts.abridged, plain.to_vec());
        assert!(parts.left_out.is_empty());
        assert!(parts.answer(&[MessageDataItemName::Rfc822]));
        assert_eq!(TextParts::decode(b"\xff\xff\xff"), None);
    }

    #[test]
    fn a_single_part_attachment_keeps_only_its_header() {
        let pdf = b"From: a@example.org\r\nContent-Type: application/pdf\r\n\r\nJVBERi0xLjQK\r\n";
        let parts = TextParts::decode(&cut(pdf)).unwrap();
        assert!(!parts.abridged.windows(8).any(|w| w == b"JVBERi0x"));
        assert!(!parts.answer(&[part(&[1])]));
        assert!(parts.answer(&[MessageDataItemName::Rfc822Header]));
    }
}
