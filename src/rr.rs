//! Record a run to a log, and replay a log: the pieces `ftvmm record`,
//! `ftvmm replay` and `ftvmm demo` share with the tests and benches.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftlog::{EntryKind, ExecBackend, ExecPoint, LogHeader, LogReader, LogWriter};
use vmm::devices::serial::SerialOut;
use vmm::digest::image_digest;
use vmm::points::PointMode;
use vmm::record::{LogSink, RecordStats, Recorder};
use vmm::replay::{ReaderSource, ReplayStats, Replayer};
use vmm::{Machine, MachineConfig, RunEnd};

use crate::console;
use crate::status::{self, Progress};

/// A log writer that also feeds the status line.
pub struct ProgressSink<W: Write> {
    writer: LogWriter<W>,
    progress: Arc<Progress>,
}

impl<W: Write> LogSink for ProgressSink<W> {
    fn append(&mut self, point: ExecPoint, kind: EntryKind) -> vmm::Result<u64> {
        let seq = self.writer.push(point, kind)?;
        let p = &self.progress;
        p.entries.store(seq + 1, Ordering::Relaxed);
        p.exits.store(point.count, Ordering::Relaxed);
        p.bytes
            .store(self.writer.bytes_written(), Ordering::Relaxed);
        Ok(seq)
    }
}

/// How to record.
#[derive(Debug, Clone, Copy)]
pub struct RecordOptions {
    /// Execution-point backend.
    pub backend: ExecBackend,
    /// Host time between state digests.
    pub digest_every: Option<Duration>,
    /// The guest's network device MAC, if it has one.
    pub net_mac: Option<[u8; 6]>,
}

/// What a recording produced.
#[derive(Debug, Clone, Copy)]
pub struct Recorded {
    /// How the guest stopped.
    pub end: RunEnd,
    /// Counters.
    pub stats: RecordStats,
    /// Deterministic exits.
    pub exits: u64,
    /// Log bytes written.
    pub bytes: u64,
}

/// The header a recording of `image` with `cfg` writes.
pub fn header_for(image: &[u8], cfg: &MachineConfig, opts: &RecordOptions) -> LogHeader {
    LogHeader {
        backend: opts.backend,
        image_digest: image_digest(image),
        mem_mib: cfg.mem_mib as u32,
        cmdline: cfg.cmdline.clone(),
        state_digest: vmm::digest::DEFAULT_KIND,
        digest_interval_ms: opts.digest_every.map(|d| d.as_millis() as u64),
        net_mac: opts.net_mac,
    }
}

/// Boot `image` and record the run into `log` until the guest stops.
pub fn record<W: Write>(
    image: &[u8],
    mut cfg: MachineConfig,
    log: W,
    opts: RecordOptions,
    progress: Arc<Progress>,
    on_start: impl FnOnce(&Machine),
) -> Result<Recorded> {
    cfg.points = PointMode::for_backend(opts.backend)?;
    let header = header_for(image, &cfg, &opts);
    let writer = LogWriter::new(log, &header).context("cannot start the log")?;
    let sink = ProgressSink { writer, progress };
    let mut rec = Recorder::new(sink, opts.digest_every);
    let mut m = Machine::new(cfg, image).context("cannot start the VM")?;
    on_start(&m);
    let end = m.run(&mut rec).context("recording failed")?;
    rec.finish(&mut m, end).context("cannot close the log")?;
    let stats = rec.stats();
    let mut sink = rec.into_sink();
    sink.writer.flush().context("cannot flush the log")?;
    Ok(Recorded {
        end,
        stats,
        exits: m.exit_count(),
        bytes: sink.writer.bytes_written(),
    })
}

/// What a replay found.
#[derive(Debug, Clone, Copy)]
pub struct Replayed {
    /// How the guest stopped.
    pub end: RunEnd,
    /// Counters.
    pub stats: ReplayStats,
    /// Deterministic exits.
    pub exits: u64,
    /// The log's backend.
    pub backend: ExecBackend,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Replay `log` on `image`, writing the guest's serial output to `out`.
pub fn replay<R: Read>(image: &[u8], log: R, out: SerialOut) -> Result<Replayed> {
    let reader = LogReader::new(log).context("cannot read the log")?;
    let header = reader.header().clone();
    let digest = image_digest(image);
    if header.image_digest != digest {
        bail!(
            "the log was recorded with another guest image (BLAKE3 {}…), this one is {}…; \
             pass the same --kernel",
            &hex(&header.image_digest)[..16],
            &hex(&digest)[..16]
        );
    }
    let mut cfg = MachineConfig::new(u64::from(header.mem_mib), &header.cmdline, out);
    cfg.points = PointMode::for_backend(header.backend)?;
    // The backup's clocks are silent: every input comes from the log.
    cfg.live_timers = false;
    let mut m = Machine::new(cfg, image).context("cannot start the VM")?;
    // A version-2 log's digests are of all RAM.
    m.set_digest_kind(header.state_digest);
    let mut rep = Replayer::new(ReaderSource::new(reader));
    let end = m.run(&mut rep)?;
    rep.finish(&mut m, end)?;
    Ok(Replayed {
        end,
        stats: rep.stats(),
        exits: m.exit_count(),
        backend: header.backend,
    })
}

/// `ftvmm record`: record `image` into the file `log` with a status line,
/// and say what was recorded.
pub fn record_file(
    image: &[u8],
    cfg: MachineConfig,
    log: &Path,
    opts: RecordOptions,
    forward_stdin: bool,
) -> Result<Recorded> {
    let file = std::fs::File::create(log)
        .with_context(|| format!("cannot create log {}", log.display()))?;
    let progress = Progress::new();
    status::spawn("record", progress.clone(), Duration::from_secs(2));
    let done = record(image, cfg, file, opts, progress.clone(), |m| {
        if forward_stdin {
            console::forward_stdin(m.host_inputs());
        }
    });
    progress.finish();
    let done = done?;
    eprintln!(
        "ftvmm: recorded {:?} with the {} backend: {} entries ({} inputs, {} reads, {} injections, {} digests), {} exits, {} bytes -> {}",
        done.end,
        opts.backend,
        done.stats.entries,
        done.stats.inputs,
        done.stats.reads,
        done.stats.injections,
        done.stats.digests,
        done.exits,
        done.bytes,
        log.display()
    );
    Ok(done)
}

/// `ftvmm replay`: replay the file `log` on `image`, and say how it went.
pub fn replay_file(image: &[u8], log: &Path, out: SerialOut) -> Result<Replayed> {
    let file =
        std::fs::File::open(log).with_context(|| format!("cannot open log {}", log.display()))?;
    let start = Instant::now();
    let done = replay(image, std::io::BufReader::new(file), out)
        .with_context(|| format!("replay of {} failed", log.display()))?;
    eprintln!(
        "ftvmm: replay matched the recording ({} backend): {} entries, {} state digests equal, {} exits, ended {:?}, {:.2}s",
        done.backend,
        done.stats.entries,
        done.stats.digests_checked,
        done.exits,
        done.end,
        start.elapsed().as_secs_f64()
    );
    Ok(done)
}
