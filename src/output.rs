//! Guest output on its way to the outside world (the output rule).
//!
//! Console output is a byte stream addressed by offset (bytes since boot,
//! the same on both sides), written into the console file with positioned
//! writes: a backup that goes live rewrites what it produced at the same
//! offsets (identical bytes), so an outside reader sees neither a gap nor a
//! contradiction. On the primary, console bytes and network frames wait in
//! one [`OutputGate`] until the backup has acknowledged the log entry they
//! depend on.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use ftlog::{Acks, PrimarySender};
use netdev::OutputGate;

/// An output to the outside world, held by the output gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Console bytes at this stream offset.
    Console(u64, Vec<u8>),
    /// A network frame.
    Frame(Vec<u8>),
}

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

/// Serial output on the primary: tagged with the last log entry and held in
/// the gate until the backup has it.
pub struct GatedSerial {
    gate: OutputGate<Output>,
    tx: Arc<PrimarySender>,
    offset: u64,
}

impl GatedSerial {
    /// Hold console output in `gate`, tagged from `tx`'s log position.
    pub fn new(gate: OutputGate<Output>, tx: Arc<PrimarySender>) -> Self {
        GatedSerial {
            gate,
            tx,
            offset: 0,
        }
    }
}

impl Write for GatedSerial {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let tag = self.tx.next_seq().checked_sub(1);
        self.gate
            .hold(tag, Output::Console(self.offset, buf.to_vec()));
        self.offset += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serial output on a backup: kept with its offsets, shown only on go-live.
#[derive(Clone, Default)]
pub struct HeldSerial(Arc<Mutex<(u64, Vec<u8>)>>);

impl HeldSerial {
    /// Everything the backup's guest has written so far.
    pub fn produced(&self) -> Vec<u8> {
        self.0.lock().map(|g| g.1.clone()).unwrap_or_default()
    }
}

impl Write for HeldSerial {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut g) = self.0.lock() {
            g.1.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serial output of a live VM with no backup: straight to the console file.
pub struct DirectSerial {
    console: ConsoleFile,
    offset: u64,
}

impl DirectSerial {
    /// Write into `console` from stream offset `offset` on.
    pub fn new(console: ConsoleFile, offset: u64) -> Self {
        DirectSerial { console, offset }
    }
}

impl Write for DirectSerial {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.console.put(self.offset, buf);
        self.offset += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
        let through = released.iter().filter_map(|r| r.tag).max();
        for r in released {
            match r.item {
                Output::Console(offset, bytes) => {
                    console.put(offset, &bytes);
                    report.output_delays.push(r.held_for);
                }
                Output::Frame(frame) => {
                    if let Some(t) = &tap {
                        t.send_logged(&frame);
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
