//! Recording the core's inputs for replay (`[record]` in the configuration, off by
//! default; the file format is `tandem_core::record`'s). Each start of the node begins
//! a recording in `dir` with the store the core recovered from; every input the event
//! loop gives the core is written with its instant, every body the core reads from its
//! store with the read, and after each input the count and digest of the core's
//! outputs. `tandem-sim replay` feeds a recording to the same core build and checks
//! that it asks for the same.
//!
//! Bounded: the recordings in `dir` take at most `max_bytes` together. A file rotates
//! when it passes a quarter of that: the next begins with the core's snapshot (with
//! bodies), so each replays on its own, and the oldest are deleted to make room. A
//! file that alone would pass the bound stops (with a warning).
//! Bodies are written as their SHA-256 and size unless `bodies` is set; then each
//! distinct body's bytes are written once per recording.

use crate::config::RecordConfig;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tandem_core::record::{self, BodyKey, Frame, Header, OutputDigest};
use tandem_core::store::BodyStore;
use tandem_core::types::{Body, Guid, Instant};
use tandem_core::{Input, Output};
use tracing::{error, info, warn};

/// A recording file's name ends so.
pub const EXTENSION: &str = "tdrec";
/// Bytes buffered before a write to the file.
const BUFFER_BYTES: usize = 64 * 1024;
/// What is buffered is handed to the file at the first input after this long (a crash
/// loses at most about this much of the recording).
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

pub struct Recorder {
    out: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    dir: PathBuf,
    /// The header of this run's files (the store image only in the first).
    header: Header,
    written: u64,
    /// What this file's header took.
    header_bytes: u64,
    max_bytes: u64,
    /// Older recordings in the directory, oldest first, with their sizes: deleted to
    /// make room as this one grows.
    older: std::collections::VecDeque<(PathBuf, u64)>,
    bodies: bool,
    bodies_written: BTreeSet<BodyKey>,
    outputs: OutputDigest,
    /// An input was written whose outputs are not yet.
    input_open: bool,
    /// Recording stopped: the bound was reached or the file failed.
    stopped: bool,
    last_flush: std::time::Instant,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("path", &self.path).field("written", &self.written).finish()
    }
}

/// The recorder, shared by the event loop and the body store the core reads through.
pub type SharedRecorder = Arc<Mutex<Recorder>>;

pub fn lock(recorder: &SharedRecorder) -> MutexGuard<'_, Recorder> {
    // The recorder's state stays whole if a panic elsewhere held the lock.
    recorder.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn recordings_in(dir: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == EXTENSION) {
            found.push((path, entry.metadata()?.len()));
        }
    }
    // Names start with the start time in milliseconds, zero-padded: by name is by age.
    found.sort();
    Ok(found)
}

fn key_of(body: &[u8]) -> BodyKey {
    Sha256::digest(body).into()
}

/// A new recording file in `dir` for a file starting at `at_ms` (a later millisecond if
/// that name is taken).
fn create(dir: &Path, at_ms: u64, sid: tandem_core::Sid) -> Result<(std::fs::File, PathBuf, u64), String> {
    let mut at_ms = at_ms;
    loop {
        let path = dir.join(format!("{at_ms:020}-s{}.{EXTENSION}", sid.0));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((file, path, at_ms)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && at_ms < u64::MAX => at_ms += 1,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
}

/// Now on the wall clock, in milliseconds since the Unix epoch (a name and a header field).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A file rotates once its frames after the header pass this share of the directory's
/// bound, so the directory holds the current file and a few before it.
const ROTATE_SHARE: u64 = 4;

impl Recorder {
    /// Begins a recording of a core that starts from `header`.
    pub fn start(cfg: &RecordConfig, header: Header) -> Result<Recorder, String> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
        let older = recordings_in(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
        let (file, path, _) = create(&cfg.dir, header.started_unix_ms, header.cfg.sid)?;
        let mut recorder = Recorder {
            out: std::io::BufWriter::with_capacity(BUFFER_BYTES, file),
            path,
            dir: cfg.dir.clone(),
            header: header.clone(),
            written: 0,
            header_bytes: 0,
            max_bytes: cfg.max_bytes,
            older: older.into(),
            bodies: header.bodies,
            bodies_written: BTreeSet::new(),
            outputs: OutputDigest::default(),
            input_open: false,
            stopped: false,
            last_flush: std::time::Instant::now(),
        };
        recorder.write_bytes(record::MAGIC)?;
        recorder.write(&Frame::Header(Box::new(header)))?;
        recorder.header_bytes = recorder.written;
        // Later files of the run resume from a snapshot, not from the store's image.
        recorder.header.disk = Default::default();
        recorder.flush();
        if recorder.stopped {
            // Only the header can have filled it: the store's image is the big part.
            let _ = std::fs::remove_file(&recorder.path);
            return Err(format!(
                "the store's image does not fit in record.max_mb = {} MiB: raise it to record this node",
                recorder.max_bytes >> 20
            ));
        }
        info!(path = %recorder.path.display(), "recording the core's inputs");
        Ok(recorder)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This file has grown past its share of the bound: the event loop should call
    /// [`Recorder::rotate`] with the core's snapshot before the next input.
    pub fn wants_rotation(&self) -> bool {
        !self.stopped && self.written.saturating_sub(self.header_bytes) >= self.max_bytes / ROTATE_SHARE
    }

    /// Whether this recording keeps body bytes (then a rotated file carries the core's
    /// snapshot, which holds bodies in flight).
    pub fn keeps_bodies(&self) -> bool {
        self.bodies
    }

    /// Ends this file and begins the next of the run, whose header carries `snapshot`
    /// (the core's state now, between two inputs; None without bodies). The finished
    /// file joins the older ones, deleted first when room is needed; the new one is
    /// replayable on its own.
    pub fn rotate(&mut self, snapshot: Option<Result<Vec<u8>, String>>) {
        if self.stopped {
            return;
        }
        self.close_outputs();
        self.flush();
        let snapshot = match snapshot.transpose() {
            Ok(snapshot) => snapshot,
            Err(e) => {
                self.stopped = true;
                error!(path = %self.path.display(), error = %e, "the core's snapshot failed: recording stopped");
                return;
            }
        };
        let (file, path, at_ms) =
            match create(&self.dir, unix_ms().max(self.header.started_unix_ms + 1), self.header.cfg.sid) {
                Ok(created) => created,
                Err(e) => {
                    self.stopped = true;
                    error!(error = %e, "recording failed: stopped");
                    return;
                }
            };
        let run_started_unix_ms = self.header.clock_origin_unix_ms();
        let previous = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.older.push_back((std::mem::replace(&mut self.path, path), self.written));
        self.out = std::io::BufWriter::with_capacity(BUFFER_BYTES, file);
        self.written = 0;
        self.bodies_written.clear();
        self.header.started_unix_ms = at_ms;
        self.header.resumed = Some(record::Resumed { snapshot, run_started_unix_ms, previous });
        let header = self.header.clone();
        if let Err(e) = self.write_bytes(record::MAGIC).and_then(|()| self.write(&Frame::Header(Box::new(header)))) {
            error!(error = %e, "recording failed: stopped");
            return;
        }
        self.header_bytes = self.written;
        if self.written > self.max_bytes / 2 {
            // The core's state alone takes half the bound: rotating again would leave
            // no room for what it records.
            self.stopped = true;
            warn!(path = %self.path.display(), max_bytes = self.max_bytes, "the core's snapshot takes half of record.max_mb: recording stopped");
        }
        self.flush();
        info!(path = %self.path.display(), "recording continues in a new file");
    }

    /// Makes room for `len` more bytes, deleting the oldest recordings; false when this
    /// recording alone would pass the bound.
    fn make_room(&mut self, len: u64) -> bool {
        loop {
            let older: u64 = self.older.iter().map(|(_, size)| size).sum();
            if self.written + len + older <= self.max_bytes {
                return true;
            }
            let Some((oldest, _)) = self.older.pop_front() else { return false };
            match std::fs::remove_file(&oldest) {
                Ok(()) => info!(path = %oldest.display(), "old recording deleted to make room"),
                Err(e) => warn!(path = %oldest.display(), error = %e, "deleting an old recording"),
            }
        }
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.stopped {
            return Ok(());
        }
        if !self.make_room(bytes.len() as u64) {
            self.stopped = true;
            warn!(path = %self.path.display(), max_bytes = self.max_bytes, "recording full: stopped");
            return Ok(());
        }
        if let Err(e) = self.out.write_all(bytes) {
            self.stopped = true;
            error!(path = %self.path.display(), error = %e, "recording failed: stopped");
            return Err(e.to_string());
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn write(&mut self, frame: &Frame) -> Result<(), String> {
        if self.stopped {
            return Ok(());
        }
        let bytes = record::frame_bytes(frame)?;
        self.write_bytes(&bytes)
    }

    /// Writes a recording failure off: the node goes on without it.
    fn write_or_stop(&mut self, frame: &Frame) {
        if let Err(e) = self.write(frame) {
            self.stopped = true;
            error!(error = %e, "recording stopped");
        }
    }

    /// The stand-in of a body, writing its bytes first if they are kept and new here.
    fn stand_in(&mut self, body: &Body) -> Body {
        let key = key_of(body);
        if self.bodies && self.bodies_written.insert(key) {
            self.write_or_stop(&Frame::Body { key, bytes: body.clone() });
        }
        record::body_ref(&key, body.len() as u64)
    }

    /// The outputs since the last input, if any are owed.
    fn close_outputs(&mut self) {
        if self.input_open || self.outputs.count > 0 {
            let OutputDigest { count, digest } = std::mem::take(&mut self.outputs);
            self.write_or_stop(&Frame::Outputs { count, digest });
            self.input_open = false;
        }
    }

    /// An input about to be given to the core at `now`.
    pub fn input(&mut self, now: Instant, input: &Input) {
        if self.stopped {
            return;
        }
        self.close_outputs();
        let mut copy = input.clone();
        let mut found = Vec::new();
        record::for_each_body(&mut copy, &mut |b| found.push(b.clone()));
        let mut stand_ins = Vec::with_capacity(found.len());
        for body in &found {
            stand_ins.push(self.stand_in(body));
        }
        let mut stand_ins = stand_ins.into_iter();
        record::for_each_body(&mut copy, &mut |b| {
            if let Some(s) = stand_ins.next() {
                *b = s;
            }
        });
        self.write_or_stop(&Frame::Input { now, input: Box::new(copy) });
        self.input_open = true;
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush();
        }
    }

    /// A body the core read from its store, as the store answered.
    pub fn read(&mut self, guid: Guid, body: Option<&Body>) {
        if self.stopped {
            return;
        }
        let body = body.map(|b| self.stand_in(b));
        self.write_or_stop(&Frame::Read { guid, body });
    }

    /// A body's checksum the core asked its store for, as the store answered.
    pub fn checksum(&mut self, guid: Guid, checksum: Option<u64>) {
        if !self.stopped {
            self.write_or_stop(&Frame::Checksum { guid, checksum });
        }
    }

    /// Text parts the core asked its store to cut, as the store answered.
    pub fn text_parts(&mut self, guid: Guid, parts: Option<&Body>) {
        if self.stopped {
            return;
        }
        let parts = parts.map(|b| self.stand_in(b));
        self.write_or_stop(&Frame::TextParts { guid, parts });
    }

    /// An output the core asked for.
    pub fn output(&mut self, output: &Output) {
        if !self.stopped {
            self.outputs.add(output);
        }
    }

    /// Between inputs (the event loop calls this every `FLUSH_EVERY`): the last input's
    /// outputs are all drained, so its Outputs frame is written and the file flushed. A
    /// node that goes quiet after an input has that input on disk within about
    /// `FLUSH_EVERY`, not at its next input, which may never come before a kill -9.
    pub fn idle(&mut self) {
        if self.stopped || self.last_flush.elapsed() < FLUSH_EVERY {
            return;
        }
        self.close_outputs();
        // What was written since the last flush is what the buffer holds.
        if !self.out.buffer().is_empty() {
            self.flush();
        }
    }

    /// Hands what is buffered to the file (now and then, and when the node stops).
    pub fn flush(&mut self) {
        self.last_flush = std::time::Instant::now();
        if let Err(e) = self.out.flush() {
            self.stopped = true;
            error!(path = %self.path.display(), error = %e, "recording failed: stopped");
        }
    }

    /// Writes the last outputs and flushes (the node is stopping).
    pub fn finish(&mut self) {
        self.close_outputs();
        self.flush();
    }
}

/// The core's body store, with every read written to the recording (a read is an input
/// to the core: its answer decides what the core does).
#[derive(Debug)]
pub struct RecordingBodies {
    pub inner: Box<dyn BodyStore>,
    pub recorder: SharedRecorder,
}

impl BodyStore for RecordingBodies {
    fn read(&self, guid: Guid) -> Option<Body> {
        let body = self.inner.read(guid);
        lock(&self.recorder).read(guid, body.as_ref());
        body
    }

    fn checksum(&self, guid: Guid) -> Option<u64> {
        let checksum = self.inner.checksum(guid);
        lock(&self.recorder).checksum(guid, checksum);
        checksum
    }

    fn text_parts(&self, guid: Guid, body: &[u8]) -> Option<Body> {
        let parts = self.inner.text_parts(guid, body);
        lock(&self.recorder).text_parts(guid, parts.as_ref());
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::io::Config;
    use tandem_core::store::DiskImage;
    use tandem_core::types::Sid;

    fn header(at_ms: u64, bodies: bool) -> Header {
        Header {
            format: record::FORMAT,
            build: tandem_core::BUILD.into(),
            cfg: Config::new(Sid(1), vec![Sid(1)]),
            seed: 3,
            disk: DiskImage::default(),
            bodies,
            started_unix_ms: at_ms,
            resumed: None,
        }
    }

    fn save(body: &'static [u8]) -> Input {
        Input::Client {
            id: 1,
            request: tandem_core::ClientRequest::Save {
                mailbox: tandem_core::types::MailboxKey::new("u", "INBOX"),
                received: 0,
                flags: vec![],
                body: Body::from_static(body),
                delivery: false,
            },
        }
    }

    #[test]
    fn a_recording_keeps_bodies_once_or_not_at_all_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        for bodies in [true, false] {
            let cfg = RecordConfig { dir: dir.path().join(format!("{bodies}")), max_bytes: 1 << 20, bodies };
            let mut r = Recorder::start(&cfg, header(1, bodies)).unwrap();
            r.input(Instant(1), &save(b"the mail"));
            r.read(Guid(5), Some(&Body::from_static(b"the mail")));
            r.output(&Output::Reply {
                id: 1,
                reply: tandem_core::ClientReply::Failed { kind: tandem_core::FailKind::Temporary, reason: "x".into() },
            });
            r.input(Instant(2), &Input::Timer);
            r.finish();
            let bytes = std::fs::read(r.path()).unwrap();
            let rec = record::parse(&bytes).unwrap();
            assert!(rec.torn.is_none());
            let kinds: Vec<&str> = rec
                .frames
                .iter()
                .map(|f| match f {
                    Frame::Body { .. } => "body",
                    Frame::Input { .. } => "input",
                    Frame::Read { .. } => "read",
                    Frame::Checksum { .. } => "checksum",
                    Frame::TextParts { .. } => "text parts",
                    Frame::Outputs { count, .. } => {
                        if *count == 1 {
                            "outputs1"
                        } else {
                            "outputs0"
                        }
                    }
                    Frame::Header(_) => "header",
                })
                .collect();
            let expected: &[&str] = if bodies {
                &["body", "input", "read", "outputs1", "input", "outputs0"]
            } else {
                &["input", "read", "outputs1", "input", "outputs0"]
            };
            assert_eq!(kinds, expected);
            let mail_in_file = bytes.windows(8).any(|w| w == b"the mail");
            assert_eq!(mail_in_file, bodies, "the file holds mail only when asked to");
        }
    }

    #[test]
    fn a_growing_recording_rotates_within_its_bound_each_file_beginning_with_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RecordConfig { dir: dir.path().to_path_buf(), max_bytes: 1 << 20, bodies: true };
        let mut r = Recorder::start(&cfg, header(1, true)).unwrap();
        let mut rotations = 0;
        for i in 0..400u64 {
            if r.wants_rotation() {
                r.rotate(Some(Ok(vec![i as u8; 1000])));
                rotations += 1;
            }
            let body: &'static [u8] = Box::leak(format!("{i} {}", "x".repeat(8000)).into_bytes().into_boxed_slice());
            r.input(Instant(i), &save(body));
        }
        r.finish();
        assert!(!r.stopped);
        let left = recordings_in(dir.path()).unwrap();
        let total: u64 = left.iter().map(|(_, size)| size).sum();
        assert!(rotations >= 10, "{rotations} rotations");
        assert!(total <= 1 << 20 && left.len() >= 4, "{total} bytes in {left:?}");
        let mut previous: Option<String> = None;
        for (path, _) in &left {
            let rec = record::parse(&std::fs::read(path).unwrap()).unwrap();
            let resumed = rec.header.resumed.as_ref().expect("the first file was deleted: each left resumes");
            assert_eq!(resumed.snapshot.as_ref().map(Vec::len), Some(1000));
            assert_eq!(resumed.run_started_unix_ms, 1);
            if let Some(p) = &previous {
                assert_eq!(&resumed.previous, p);
            }
            previous = path.file_name().map(|n| n.to_string_lossy().into_owned());
            // Each file holds the bytes of the bodies it refers to.
            assert!(matches!(rec.frames.first(), Some(Frame::Body { .. })), "{}", path.display());
        }
    }

    #[test]
    fn a_store_too_big_for_the_bound_is_refused_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RecordConfig { dir: dir.path().to_path_buf(), max_bytes: 64, bodies: false };
        let err = Recorder::start(&cfg, header(1, false)).unwrap_err();
        assert!(err.contains("record.max_mb"), "{err}");
        assert!(recordings_in(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn recordings_stay_within_their_bound_oldest_going_first() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RecordConfig { dir: dir.path().to_path_buf(), max_bytes: 4096, bodies: true };
        for at in 1..=3 {
            let mut r = Recorder::start(&cfg, header(at, true)).unwrap();
            for i in 0..200u64 {
                r.input(Instant(i), &Input::Timer);
            }
            r.finish();
        }
        let left = recordings_in(dir.path()).unwrap();
        let total: u64 = left.iter().map(|(_, size)| size).sum();
        assert!(total <= 4096, "{left:?}");
        assert!(left.last().unwrap().0.to_string_lossy().contains("00000000000000000003-s1"), "{left:?}");
        // The newest is whole up to where it stopped.
        let rec = record::parse(&std::fs::read(&left.last().unwrap().0).unwrap()).unwrap();
        assert!(rec.torn.is_none() && !rec.frames.is_empty());
    }
}
