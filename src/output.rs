//! Guest output on its way to the outside world (the output rule).
//!
//! Every output (a console write, a transmitted frame) has a log entry of
//! its own, logged by the recorder at the exit that produced it; the run
//! loop hands the output with that entry's sequence number (its tag) to the
//! VM's output sink. On the primary the sink is the [`OutputGate`]: an
//! output waits there until the backup has acknowledged its entry.
//!
//! Console output is a byte stream addressed by offset (bytes since boot,
//! the same on both sides), written into the console file with positioned
//! writes. A replaying backup ([`ReplayOutputs`]) writes its console into a
//! shadow of its console file that nobody reads, and holds its frames with
//! their tags until the primary has released them. Going live, the shadow
//! becomes its console file (the whole stream, identical to what the
//! primary released where the primary released it: an outside reader sees
//! neither a gap nor a contradiction) and it sends the frames it holds again
//! (the primary may not have released them; a duplicate is harmless to TCP).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use ftlog::{Acks, PrimarySender};
use netdev::{OutputGate, Tap};
pub use vmm::output::{Output, OutputSink, Stream, Tag};

/// The most frames a replaying backup holds: the most the primary's gate
/// holds before it stalls its guest (so, with the release watermark
/// arriving, never reached in practice).
pub const MAX_HELD_FRAMES: usize = netdev::gate::DEFAULT_LIMIT;

/// The console file, written at stream offsets.
#[derive(Clone)]
pub struct ConsoleFile(Arc<File>);

impl ConsoleFile {
    /// Open (or create) the console file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open console file {}", path.display()))?;
        Ok(ConsoleFile(Arc::new(f)))
    }

    /// Write `bytes` at stream offset `offset`.
    pub fn put(&self, offset: u64, bytes: &[u8]) {
        if let Err(e) = self.0.write_all_at(bytes, offset) {
            tracing::warn!("console output lost at offset {offset}: {e}");
        }
    }
}

/// The primary's outputs: held in the gate under their own entry's tag.
pub struct GatedOutputs {
    gate: OutputGate<Output>,
}

impl GatedOutputs {
    /// Hold outputs in `gate`.
    pub fn new(gate: OutputGate<Output>) -> Self {
        GatedOutputs { gate }
    }
}

/// The tag an output with no entry waits for: none the backup will ever
/// acknowledge, so only an open gate (the arbiter won) lets it out.
pub const NEVER_ACKED: u64 = u64::MAX;

impl OutputSink for GatedOutputs {
    fn put(&mut self, output: Output, tag: Tag) {
        self.gate.hold(Some(tag.unwrap_or(NEVER_ACKED)), output);
    }
}

/// The primary's release watermark as a backup sees it: every output whose
/// entry is at or below it has reached the outside world.
pub type Watermark = Box<dyn Fn() -> Option<u64> + Send>;

struct Replaying {
    /// The console stream, written at offsets where nobody reads it.
    shadow: ConsoleFile,
    shadow_path: PathBuf,
    console_path: PathBuf,
    /// Frames the primary may not have released, oldest first.
    frames: VecDeque<(Output, Tag)>,
    released: Watermark,
    overflowed: bool,
    /// The shadow became the console file.
    live: bool,
}

impl Drop for Replaying {
    fn drop(&mut self) {
        // A backup that never went live put nothing out.
        if !self.live {
            let _ = std::fs::remove_file(&self.shadow_path);
        }
    }
}

impl Replaying {
    /// Forget the held frames the primary has released: the one place that
    /// decides it (the release watermark; past [`MAX_HELD_FRAMES`] the
    /// oldest go too, with a warning, so memory stays bounded whatever the
    /// primary reports).
    fn forget_released(&mut self) {
        let released = (self.released)();
        while let Some((_, Some(tag))) = self.frames.front() {
            if released.is_none_or(|r| *tag > r) {
                break;
            }
            self.frames.pop_front();
        }
        while self.frames.len() > MAX_HELD_FRAMES {
            self.frames.pop_front();
            if !self.overflowed {
                self.overflowed = true;
                tracing::warn!(
                    "more than {MAX_HELD_FRAMES} frames not yet known to be released: \
                     the oldest will not be sent again at go-live"
                );
            }
        }
    }
}

/// A backup's outputs while it replays: console bytes into a shadow of its
/// console file, frames held with their tags (bounded by the primary's
/// release watermark), to be put out when it goes live. Clone to keep a
/// handle after the VM takes the sink.
#[derive(Clone)]
pub struct ReplayOutputs(Arc<Mutex<Replaying>>);

impl ReplayOutputs {
    /// Outputs of a backup whose console file is `console`; `released`
    /// reads the primary's release watermark.
    pub fn new(console: &Path, released: Watermark) -> Result<Self> {
        let mut name = console.file_name().unwrap_or_default().to_os_string();
        name.push(".replaying");
        let shadow_path = console.with_file_name(name);
        // A shadow left by an earlier backup is stale: start empty.
        let _ = std::fs::remove_file(&shadow_path);
        let shadow = ConsoleFile::open(&shadow_path)?;
        Ok(ReplayOutputs(Arc::new(Mutex::new(Replaying {
            shadow,
            shadow_path,
            console_path: console.to_path_buf(),
            frames: VecDeque::new(),
            released,
            overflowed: false,
            live: false,
        }))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Replaying> {
        match self.0.lock() {
            Ok(g) => g,
            // Every update is a single write, push or pop.
            Err(p) => p.into_inner(),
        }
    }

    /// Going live: the shadow becomes the console file (returned, to write
    /// on at offsets), and the frames the primary may not have released are
    /// handed back, oldest first, to be sent again.
    pub fn go_live(&self) -> Result<(ConsoleFile, Vec<(Output, Tag)>)> {
        let mut r = self.lock();
        r.forget_released();
        std::fs::rename(&r.shadow_path, &r.console_path).with_context(|| {
            format!(
                "cannot make {} the console file {}",
                r.shadow_path.display(),
                r.console_path.display()
            )
        })?;
        r.live = true;
        let file = r.shadow.clone();
        Ok((file, r.frames.drain(..).collect()))
    }

    /// Frames held now.
    pub fn frames_held(&self) -> usize {
        self.lock().frames.len()
    }
}

impl OutputSink for ReplayOutputs {
    fn put(&mut self, output: Output, tag: Tag) {
        let mut r = self.lock();
        match output.stream {
            Stream::Console => r.shadow.put(output.position, &output.bytes),
            Stream::Net => {
                r.frames.push_back((output, tag));
                r.forget_released();
            }
        }
    }
}

/// Where the console of a VM that needs no acknowledgement goes.
pub enum ConsoleTarget {
    /// The console file, at stream offsets.
    File(ConsoleFile),
    /// A stream (the terminal), in order.
    Stream(Box<dyn Write + Send>),
}

/// Outputs of a VM that waits for no backup (alone after winning the
/// arbiter, or never paired): console bytes to the console, frames to the
/// TAP.
pub struct Direct {
    console: ConsoleTarget,
    tap: Option<Tap>,
}

impl Direct {
    /// Console to `console`, frames to `tap` (dropped without one).
    pub fn new(console: ConsoleTarget, tap: Option<Tap>) -> Self {
        Direct { console, tap }
    }
}

impl OutputSink for Direct {
    fn put(&mut self, output: Output, _tag: Tag) {
        match (output.stream, &mut self.console) {
            (Stream::Console, ConsoleTarget::File(f)) => f.put(output.position, &output.bytes),
            (Stream::Console, ConsoleTarget::Stream(w)) => {
                if let Err(e) = w.write_all(&output.bytes).and_then(|()| w.flush()) {
                    tracing::warn!("console output lost at offset {}: {e}", output.position);
                }
            }
            (Stream::Net, _) => {
                if let Some(t) = &self.tap {
                    t.send_logged(&output.bytes);
                }
            }
        }
    }
}

/// How long the output rule held what the releaser put out.
#[derive(Debug, Default, Clone)]
pub struct ReleaseReport {
    /// How long each console write was held.
    pub output_delays: Vec<Duration>,
    /// How long each network frame was held.
    pub frame_delays: Vec<Duration>,
}

/// Feed the backup's acks into the gate as they arrive, until `done` or the
/// channel dies; returns the sampled round trips.
pub fn ack_pump(
    gate: OutputGate<Output>,
    tx: Arc<PrimarySender>,
    done: Arc<AtomicBool>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut seen = Acks::default();
    while !done.load(Ordering::Acquire) {
        // After an error the vCPU thread opens or discards the gate.
        let Ok(a) = tx.wait_acks_change(seen, Duration::from_millis(50)) else {
            break;
        };
        if a != seen {
            latencies.extend(tx.stats().ack_latency);
            if let Some(r) = a.received {
                gate.ack(r);
            }
            seen = a;
        }
    }
    latencies
}

/// Put released outputs where they go, as soon as the gate lets them out
/// (an ack, or a new output whose tag is already acknowledged), until `done`;
/// after each batch, tell `released_through` the highest tag put out.
pub fn releaser(
    gate: OutputGate<Output>,
    console: ConsoleFile,
    tap: Option<netdev::Tap>,
    done: Arc<AtomicBool>,
    released_through: impl Fn(u64),
) -> ReleaseReport {
    let mut report = ReleaseReport::default();
    let mut put = |released: Vec<netdev::Released<Output>>| {
        let through = released
            .iter()
            .filter_map(|r| r.tag)
            .filter(|t| *t != NEVER_ACKED)
            .max();
        for r in released {
            match r.item.stream {
                Stream::Console => {
                    console.put(r.item.position, &r.item.bytes);
                    report.output_delays.push(r.held_for);
                }
                Stream::Net => {
                    if let Some(t) = &tap {
                        t.send_logged(&r.item.bytes);
                    }
                    report.frame_delays.push(r.held_for);
                }
            }
        }
        if let Some(t) = through {
            released_through(t);
        }
    };
    while !done.load(Ordering::Acquire) {
        put(gate.wait_released(Duration::from_millis(20)));
    }
    put(gate.take_released());
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(position: u64) -> Output {
        Output {
            stream: Stream::Console,
            position,
            bytes: vec![b'x'],
        }
    }

    fn frame(position: u64) -> Output {
        Output {
            stream: Stream::Net,
            position,
            bytes: vec![0; 60],
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("console")
    }

    #[test]
    fn a_replaying_backup_holds_only_frames_the_primary_may_not_have_released() {
        let path = temp("held");
        let watermark = Arc::new(Mutex::new(None));
        let w = watermark.clone();
        let mut r = ReplayOutputs::new(&path, Box::new(move || *w.lock().unwrap())).unwrap();
        for i in 0..10 {
            r.put(frame(i), Some(i));
        }
        *watermark.lock().unwrap() = Some(6);
        r.put(frame(10), Some(10));
        let held: Vec<u64> = r
            .go_live()
            .unwrap()
            .1
            .iter()
            .map(|(o, _)| o.position)
            .collect();
        assert_eq!(held, [7, 8, 9, 10], "released through 6: those are out");
        // Bounded even with no watermark at all.
        let mut r = ReplayOutputs::new(&path, Box::new(|| None)).unwrap();
        for i in 0..(MAX_HELD_FRAMES as u64 + 5) {
            r.put(frame(i), Some(i));
        }
        assert_eq!(r.frames_held(), MAX_HELD_FRAMES);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn going_live_makes_the_shadow_the_console_file_with_the_whole_stream() {
        let path = temp("shadow");
        let mut r = ReplayOutputs::new(&path, Box::new(|| None)).unwrap();
        for i in 0..3 {
            r.put(console(i), Some(i));
        }
        assert!(!path.exists(), "nothing is put out while replaying");
        let (file, frames) = r.go_live().unwrap();
        assert!(frames.is_empty());
        let mut live = Direct::new(ConsoleTarget::File(file), None);
        live.put(
            Output {
                stream: Stream::Console,
                position: 3,
                bytes: b"d".to_vec(),
            },
            None,
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"xxxd");
        // A replay that ends without going live leaves nothing behind.
        drop(ReplayOutputs::new(&path, Box::new(|| None)).unwrap());
        let files = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(files, 1, "only the console file");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn the_primary_holds_an_untagged_output_until_the_gate_opens() {
        let gate = OutputGate::new();
        let mut g = GatedOutputs::new(gate.clone());
        g.put(console(0), Some(3));
        g.put(console(1), None);
        gate.ack(1_000_000);
        let out: Vec<u64> = gate
            .take_released()
            .into_iter()
            .map(|r| r.item.position)
            .collect();
        assert_eq!(out, [0], "the unlogged one waits for the arbiter");
        gate.open();
        assert_eq!(gate.take_released().len(), 1);
    }
}
