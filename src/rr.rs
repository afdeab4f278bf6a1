//! Record a run to a log, and replay a log: the pieces `ftvmm record`,
//! `ftvmm replay` and `ftvmm demo` share with the tests and benches.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftlog::{EntryKind, ExecBackend, ExecPoint, LogHeader, LogReader, LogWriter};
use vmm::digest::image_digest;
use vmm::output::OutputSink;
use vmm::points::PointMode;
use vmm::record::{LogSink, RecordStats, Recorder};
use vmm::replay::{LogSource, ReaderSource, ReplayStats, Replayer};
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

/// The header a recording of `image` with `cfg` writes. Its CPUID table is
/// `cfg.cpuid`, or this host's guest table.
pub fn header_for(image: &[u8], cfg: &MachineConfig, opts: &RecordOptions) -> Result<LogHeader> {
    let cpuid = match &cfg.cpuid {
        Some(t) => t.clone(),
        None => vmm::arch::cpuid::host_guest_table().context("cannot compute the guest CPUID")?,
    };
    Ok(LogHeader {
        backend: opts.backend,
        image_digest: image_digest(image),
        mem_mib: cfg.mem_mib as u32,
        cmdline: cfg.cmdline.clone(),
        state_digest: vmm::digest::DEFAULT_KIND,
        digest_interval_ms: opts.digest_every.map(|d| d.as_millis() as u64),
        net_mac: opts.net_mac,
        cpuid,
        initrd_digest: cfg.initrd.as_deref().map(image_digest),
    })
}

/// Refuse a log recorded with another initrd than `initrd` (or with one
/// when there is none here, or the other way round).
pub fn check_initrd(header: &LogHeader, initrd: Option<&[u8]>) -> Result<()> {
    let here = initrd.map(image_digest);
    match (header.initrd_digest, here) {
        (a, b) if a == b => Ok(()),
        (Some(want), Some(got)) => bail!(
            "the log was recorded with another initrd (BLAKE3 {}…), this one is {}…; \
             pass the same --initrd",
            &hex(&want)[..16],
            &hex(&got)[..16]
        ),
        (Some(want), None) => bail!(
            "the log was recorded with an initrd (BLAKE3 {}…); pass it with --initrd",
            &hex(&want)[..16]
        ),
        (None, _) => bail!("the log was recorded without an initrd; do not pass --initrd"),
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
    let header = header_for(image, &cfg, &opts)?;
    cfg.cpuid = Some(header.cpuid.clone());
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
    /// The log ended without its end marker (its recorder died): the
    /// replay went up to its last complete entry.
    pub cut_short: bool,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Replay `log` on `image`, sending the guest's outputs to `out`.
pub fn replay<R: Read>(image: &[u8], log: R, out: Box<dyn OutputSink>) -> Result<Replayed> {
    replay_with_initrd(image, None, log, out)
}

/// Replay `log` on `image` and `initrd` (which must be the recording's),
/// sending the guest's outputs to `out`.
pub fn replay_with_initrd<R: Read>(
    image: &[u8],
    initrd: Option<&[u8]>,
    log: R,
    out: Box<dyn OutputSink>,
) -> Result<Replayed> {
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
    check_initrd(&header, initrd)?;
    let mut cfg = MachineConfig::new(u64::from(header.mem_mib), &header.cmdline, out);
    cfg.initrd = initrd.map(<[u8]>::to_vec);
    cfg.points = PointMode::for_backend(header.backend)?;
    cfg.cpuid = Some(header.cpuid.clone());
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
        cut_short: rep.source().cut_short(),
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
        "ftvmm: recorded {:?} with the {} backend: {} entries ({} inputs, {} reads, {} outputs, {} injections, {} digests), {} exits, {} bytes -> {}",
        done.end,
        opts.backend,
        done.stats.entries,
        done.stats.inputs,
        done.stats.reads,
        done.stats.outputs,
        done.stats.injections,
        done.stats.digests,
        done.exits,
        done.bytes,
        log.display()
    );
    Ok(done)
}

/// `ftvmm replay`: replay the file `log` on `image` (and `initrd`), and say
/// how it went.
pub fn replay_file(
    image: &[u8],
    initrd: Option<&[u8]>,
    log: &Path,
    out: Box<dyn OutputSink>,
) -> Result<Replayed> {
    let file =
        std::fs::File::open(log).with_context(|| format!("cannot open log {}", log.display()))?;
    let start = Instant::now();
    let done = replay_with_initrd(image, initrd, std::io::BufReader::new(file), out)
        .with_context(|| format!("replay of {} failed", log.display()))?;
    if done.cut_short {
        eprintln!(
            "ftvmm: the log ends early (its recorder died): the replay used every complete entry and stopped at the last point"
        );
    }
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
