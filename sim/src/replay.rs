//! Replays a node's recording (`tandem_core::record`) through this build's core: the
//! core starts from the recorded store, configuration and seed, gets every recorded
//! input at its recorded instant, reads bodies as the recording says the node's store
//! answered, and must ask for the same outputs after each input. The first input after
//! which it does not is the divergence: a different core build, a non-determinism in
//! the core, or a shell that fed the core something it did not record.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tandem_core::record::{self, BodyKey, Frame, OutputDigest, Recording};
use tandem_core::store::BodyStore;
use tandem_core::types::{Body, Guid};
use tandem_core::{Input, Server};

/// What a replay found.
#[derive(Clone, Debug, Default)]
pub struct ReplayReport {
    pub inputs: u64,
    pub outputs: u64,
    /// The first input after which this core asked for something else, described.
    pub divergence: Option<String>,
    /// Why the recording ended early (a crash while writing), if it did.
    pub torn: Option<String>,
}

/// The body store a replayed core reads: what the node's store answered, by GUID, as
/// the recording gives it (the latest read of each GUID so far).
#[derive(Clone, Debug, Default)]
pub(crate) struct RecordedReads {
    answers: Arc<Mutex<BTreeMap<Guid, Option<Body>>>>,
    /// The checksums the store gave, by GUID (the latest so far).
    checksums: Arc<Mutex<BTreeMap<Guid, Option<u64>>>>,
    /// GUIDs the core read that the recording never saw read: a divergence.
    unrecorded: Arc<Mutex<Vec<Guid>>>,
    /// The text parts the store cut, by GUID (the latest so far).
    text_parts: Arc<Mutex<BTreeMap<Guid, Option<Body>>>>,
}

impl RecordedReads {
    pub(crate) fn answers(&self) -> std::sync::MutexGuard<'_, BTreeMap<Guid, Option<Body>>> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub(crate) fn checksums(&self) -> std::sync::MutexGuard<'_, BTreeMap<Guid, Option<u64>>> {
        self.checksums.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub(crate) fn text_parts(&self) -> std::sync::MutexGuard<'_, BTreeMap<Guid, Option<Body>>> {
        self.text_parts.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn unrecorded(&self) -> std::sync::MutexGuard<'_, Vec<Guid>> {
        self.unrecorded.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RecordedReads {
    /// What the node's store answered (`recorded`), or, if the recording never saw the
    /// question, nothing, noted as a divergence.
    fn answer<T>(&self, guid: Guid, recorded: Option<Option<T>>) -> Option<T> {
        recorded.unwrap_or_else(|| {
            self.unrecorded().push(guid);
            None
        })
    }
}

impl BodyStore for RecordedReads {
    fn read(&self, guid: Guid) -> Option<Body> {
        let recorded = self.answers().get(&guid).cloned();
        self.answer(guid, recorded)
    }

    fn checksum(&self, guid: Guid) -> Option<u64> {
        let recorded = self.checksums().get(&guid).copied();
        self.answer(guid, recorded)
    }

    fn text_parts(&self, guid: Guid, _body: &[u8]) -> Option<Body> {
        let recorded = self.text_parts().get(&guid).cloned();
        self.answer(guid, recorded)
    }
}

/// Reads a recording file.
pub fn load(path: &std::path::Path) -> Result<Recording, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    record::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// An input in a line (bodies by size).
fn describe(input: &Input) -> String {
    match input {
        Input::Peer { from, envelope } => format!("{} from {from}", envelope.msg.name()),
        Input::Client { id, request } => {
            let text = format!("{request:?}");
            let cut: String = text.chars().take(120).collect();
            format!("client request #{id}: {cut}")
        }
        other => {
            let text = format!("{other:?}");
            text.chars().take(120).collect()
        }
    }
}

/// A body's bytes, or a read the node's store answered (its body resolved), taken in;
/// the key of a body referred to before its bytes is the error.
pub(crate) fn take_body_or_read(
    frame: &Frame,
    bodies: &mut BTreeMap<BodyKey, Body>,
    reads: &RecordedReads,
) -> Result<(), BodyKey> {
    match frame {
        Frame::Body { key, bytes } => {
            bodies.insert(*key, bytes.clone());
        }
        Frame::Read { guid, body } => {
            let body = resolved(body, bodies)?;
            reads.answers().insert(*guid, body);
        }
        Frame::Checksum { guid, checksum } => {
            reads.checksums().insert(*guid, *checksum);
        }
        Frame::TextParts { guid, parts } => {
            let parts = resolved(parts, bodies)?;
            reads.text_parts().insert(*guid, parts);
        }
        Frame::Header(_) | Frame::Input { .. } | Frame::Outputs { .. } => {}
    }
    Ok(())
}

/// A recorded answer's bytes, with a stand-in replaced by the body it refers to (its key
/// is the error when that body's frame has not come yet).
fn resolved(answer: &Option<Body>, bodies: &BTreeMap<BodyKey, Body>) -> Result<Option<Body>, BodyKey> {
    let mut answer = answer.clone();
    if let Some(b) = &mut answer {
        let mut missing = None;
        record::resolve_one(b, bodies, &mut missing);
        if let Some(key) = missing {
            return Err(key);
        }
    }
    Ok(answer)
}

/// The core a recording begins with: recovered from the header's store, or, for a file
/// that continues a run, resumed from the snapshot it begins with.
pub(crate) fn start(recording: &Recording, bodies: Box<dyn BodyStore>) -> Result<Server, String> {
    let header = &recording.header;
    match &header.resumed {
        None => Ok(Server::recover(header.cfg.clone(), header.disk.clone(), header.seed, bodies)),
        Some(resumed) => match &resumed.snapshot {
            Some(snapshot) => {
                Server::resume(snapshot, bodies).map_err(|e| format!("its snapshot does not decode: {e}"))
            }
            None => Err(format!(
                "it continues {} and was recorded without bodies, so it holds no snapshot of the core to \
                 begin from: it can be read but not replayed",
                resumed.previous
            )),
        },
    }
}

/// A recording made by another core build cannot be replayed by this one (unless
/// `any_build`, to see where the two differ): the error names both.
pub(crate) fn same_build(recording: &Recording, any_build: bool) -> Result<(), String> {
    let header = &recording.header;
    if header.build != tandem_core::BUILD && !any_build {
        return Err(format!(
            "recorded by core build {}, and this is core build {}: a replay needs the core that made \
             the recording (build tandem-sim from the node's commit), or pass --any-build to see where they differ",
            header.build,
            tandem_core::BUILD
        ));
    }
    Ok(())
}

/// Replays `recording`; `any_build` replays one made by another core build anyway (to
/// see where the two differ).
pub fn replay(recording: &Recording, any_build: bool) -> Result<ReplayReport, String> {
    let header = &recording.header;
    same_build(recording, any_build)?;
    let mut report = ReplayReport { torn: recording.torn.clone(), ..Default::default() };
    let reads = RecordedReads::default();
    let mut bodies: BTreeMap<BodyKey, Body> = BTreeMap::new();
    let mut server = start(recording, Box::new(reads.clone()))?;
    let mut digest = OutputDigest::default();
    let mut last = "the start".to_string();
    let missing_body = |key: BodyKey| {
        let hex: String = key.iter().take(8).map(|b| format!("{b:02x}")).collect();
        if header.bodies {
            format!("body {hex}… is referred to before its bytes: the recording is damaged")
        } else {
            format!(
                "the recording holds no mail (record.bodies = false), so it can be read but not replayed \
                 (first body needed: {hex}…); record with bodies = true to replay"
            )
        }
    };
    let frames = &recording.frames;
    let mut i = 0;
    while i < frames.len() {
        match &frames[i] {
            Frame::Header(_) => return Err(format!("a second header at frame {}", i + 1)),
            frame @ (Frame::Body { .. } | Frame::Read { .. } | Frame::Checksum { .. } | Frame::TextParts { .. }) => {
                take_body_or_read(frame, &mut bodies, &reads).map_err(missing_body)?;
            }
            Frame::Input { now, input } => {
                // The reads made while the node handled this input follow it in the file
                // (with the bytes of bodies read for the first time): the store must
                // answer them before the core asks.
                let mut j = i + 1;
                while let Some(
                    frame
                    @ (Frame::Read { .. } | Frame::Body { .. } | Frame::Checksum { .. } | Frame::TextParts { .. }),
                ) = frames.get(j)
                {
                    take_body_or_read(frame, &mut bodies, &reads).map_err(missing_body)?;
                    j += 1;
                }
                if j == frames.len() {
                    // The node stopped (or the recording filled up) while it handled this
                    // input: what the core read and asked for then is not all here.
                    report.torn.get_or_insert_with(|| "the recording ends inside its last input".into());
                    break;
                }
                let mut input = tandem_core::Input::clone(input);
                record::resolve_bodies(&mut input, &bodies).map_err(missing_body)?;
                last = format!("input {} at {} µs ({})", report.inputs + 1, now.0, describe(&input));
                server.handle(*now, input);
                report.inputs += 1;
                while let Some(output) = server.poll_output() {
                    digest.add(&output);
                    report.outputs += 1;
                }
                let unrecorded = std::mem::take(&mut *reads.unrecorded());
                if let Some(guid) = unrecorded.first() {
                    let later = frames[j..].iter().position(
                        |f| matches!(f, Frame::Read { guid: g, .. } | Frame::Checksum { guid: g, .. } | Frame::TextParts { guid: g, .. } if g == guid),
                    );
                    let inputs_before =
                        |k: usize| frames[..k].iter().filter(|f| matches!(f, Frame::Input { .. })).count();
                    let when = match later {
                        Some(k) => format!("its first recorded read is in input {}", inputs_before(j + k)),
                        None => "it never read it".into(),
                    };
                    report.divergence = Some(format!(
                        "after {last}: the core read body {guid:?}, which the node's core did not read here ({when})"
                    ));
                    return Ok(report);
                }
                i = j;
                continue;
            }
            Frame::Outputs { count, digest: recorded } => {
                // Outputs before the first input come from recovery itself.
                if report.inputs == 0 {
                    while let Some(output) = server.poll_output() {
                        digest.add(&output);
                        report.outputs += 1;
                    }
                }
                let replayed = std::mem::take(&mut digest);
                if replayed.count != *count || replayed.digest != *recorded {
                    report.divergence = Some(format!(
                        "after {last}: the node's core asked for {count} outputs (digest {recorded:016x}), \
                         this core for {} (digest {:016x})",
                        replayed.count, replayed.digest
                    ));
                    return Ok(report);
                }
            }
        }
        i += 1;
    }
    Ok(report)
}
