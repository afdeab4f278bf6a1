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
//! writes. A backup keeps what it produced while replaying, with tags
//! ([`HeldOutputs`]); going live, it rewrites those console bytes at the
//! same offsets (identical bytes: an outside reader sees neither a gap nor a
//! contradiction) and sends those frames again (the primary may not have
//! released them; a duplicate is harmless to TCP).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use ftlog::{Acks, PrimarySender};
use netdev::{OutputGate, Tap};
pub use vmm::output::{Output, OutputSink, Stream, Tag};

/// The most outputs the primary's gate holds unreleased, and so the most a
/// backup must keep to re-send at go-live. Assumption until the channel
/// carries the primary's "released through" watermark: the gate never
/// holds more (see [`forget_released`]).
pub const MAX_UNRELEASED: usize = 4096;

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
const NEVER_ACKED: u64 = u64::MAX;

impl OutputSink for GatedOutputs {
    fn put(&mut self, output: Output, tag: Tag) {
        self.gate.hold(Some(tag.unwrap_or(NEVER_ACKED)), output);
    }
}

/// A backup's outputs while it replays: kept with their tags (bounded), to
/// be put out again when it goes live.
#[derive(Clone, Default)]
pub struct HeldOutputs(Arc<Mutex<VecDeque<(Output, Tag)>>>);

/// Forget the held outputs the primary has certainly released. The only
/// place that decides it: today by count (the primary never holds more
/// than [`MAX_UNRELEASED`] unreleased, so older ones are out); with the
/// channel's "released through seq N" watermark, every output tagged at or
/// below N.
fn forget_released(held: &mut VecDeque<(Output, Tag)>) {
    while held.len() > MAX_UNRELEASED {
        held.pop_front();
    }
}

impl HeldOutputs {
    /// Take what is held, oldest first.
    pub fn take(&self) -> Vec<(Output, Tag)> {
        self.0
            .lock()
            .map(|mut g| g.drain(..).collect())
            .unwrap_or_default()
    }

    /// Outputs held now.
    pub fn len(&self) -> usize {
        self.0.lock().map(|g| g.len()).unwrap_or(0)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl OutputSink for HeldOutputs {
    fn put(&mut self, output: Output, tag: Tag) {
        if let Ok(mut g) = self.0.lock() {
            g.push_back((output, tag));
            forget_released(&mut g);
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
/// (an ack, or a new output whose tag is already acknowledged), until `done`.
pub fn releaser(
    gate: OutputGate<Output>,
    console: ConsoleFile,
    tap: Option<netdev::Tap>,
    done: Arc<AtomicBool>,
) -> ReleaseReport {
    let mut report = ReleaseReport::default();
    let mut put = |released: Vec<netdev::Released<Output>>| {
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

    #[test]
    fn a_backup_keeps_a_bounded_tail_of_its_outputs_with_tags() {
        let mut held = HeldOutputs::default();
        for i in 0..(MAX_UNRELEASED as u64 + 10) {
            held.put(console(i), Some(i));
        }
        let kept = held.take();
        assert_eq!(kept.len(), MAX_UNRELEASED);
        assert_eq!(kept[0], (console(10), Some(10)), "the oldest went first");
        assert!(held.is_empty());
    }

    #[test]
    fn going_live_rewrites_held_console_bytes_at_their_offsets() {
        let path = std::env::temp_dir().join(format!("ftvmm-console-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let file = ConsoleFile::open(&path).unwrap();
        // What the primary released before it died.
        file.put(0, b"abc");
        let mut held = HeldOutputs::default();
        for (i, b) in b"bc".iter().enumerate() {
            let o = Output {
                stream: Stream::Console,
                position: 1 + i as u64,
                bytes: vec![*b],
            };
            held.put(o, Some(i as u64));
        }
        held.put(
            Output {
                stream: Stream::Net,
                position: 0,
                bytes: vec![0; 60],
            },
            Some(9),
        );
        let mut live = Direct::new(ConsoleTarget::File(file), None);
        for (o, tag) in held.take() {
            live.put(o, tag);
        }
        live.put(
            Output {
                stream: Stream::Console,
                position: 3,
                bytes: b"d".to_vec(),
            },
            None,
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"abcd");
        let _ = std::fs::remove_file(&path);
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
