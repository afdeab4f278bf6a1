//! The recorder: an [`Observer`] that applies inputs as they come due and
//! logs each one, every host value a device takes in, every output, every
//! injection and periodic state digests, with the execution point where it
//! happened.

use std::time::{Duration, Instant};

use ftlog::{EndReason, EntryKind};

use crate::devices::SampleKind;
use crate::inputs::Input;
use crate::machine::Machine;
use crate::output::Output;
use crate::points::{ExecPoint, PointMode};
use crate::run::{Access, Flow, Observer, RunEnd};
use crate::{Error, Result};

/// Where recorded entries go (a log file, the logging channel, a Vec).
pub trait LogSink {
    /// Append one entry at `point`; returns its sequence number.
    fn append(&mut self, point: ExecPoint, kind: EntryKind) -> Result<u64>;
}

/// Entries kept in memory (tests, benches).
#[derive(Debug, Default)]
pub struct MemorySink {
    /// Entries so far.
    pub entries: Vec<ftlog::LogEntry>,
}

impl LogSink for MemorySink {
    fn append(&mut self, point: ExecPoint, kind: EntryKind) -> Result<u64> {
        let seq = self.entries.len() as u64;
        self.entries.push(ftlog::LogEntry { seq, point, kind });
        Ok(seq)
    }
}

/// The log entry for an input.
pub fn input_entry(input: &Input) -> EntryKind {
    match input {
        Input::Irq(irq) => EntryKind::IrqRaise { irq: *irq },
        Input::Serial(bytes) => EntryKind::SerialInput {
            bytes: bytes.clone(),
        },
        Input::Frame(bytes) => EntryKind::RxFrame {
            queue: 0,
            bytes: bytes.clone(),
        },
    }
}

/// The log entry for the host values a device access took in: each value
/// as a u64 LE (docs/log-format.md).
pub fn sample_entry(at: Access, kind: Option<SampleKind>, values: &[u64]) -> EntryKind {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    match (at, kind) {
        (Access::Port(port), Some(SampleKind::Entropy)) => EntryKind::EntropyRead { port, data },
        (Access::Port(port), Some(SampleKind::Time | SampleKind::Counter)) => {
            EntryKind::ClockRead { port, data }
        }
        (Access::Port(port), _) => EntryKind::PortIn { port, data },
        (Access::Mmio(addr), _) => EntryKind::MmioRead { addr, data },
        (Access::Msr(index), _) => EntryKind::MsrRead { index, data },
    }
}

/// The host values a logged access entry holds; None if it holds none, or
/// its data is not whole u64s.
pub fn logged_values(kind: &EntryKind) -> Option<Vec<u64>> {
    let data = kind.read_data()?;
    if data.len() % 8 != 0 {
        return None;
    }
    Some(
        data.chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect(),
    )
}

/// Counters a status line can show.
#[derive(Debug, Default, Clone, Copy)]
pub struct RecordStats {
    /// Entries written.
    pub entries: u64,
    /// Inputs applied (ticks, serial bursts).
    pub inputs: u64,
    /// Device accesses whose host values were logged.
    pub reads: u64,
    /// Outputs logged.
    pub outputs: u64,
    /// Interrupts injected.
    pub injections: u64,
    /// Digests logged.
    pub digests: u64,
}

/// Records a run into a [`LogSink`].
pub struct Recorder<S: LogSink> {
    sink: S,
    digest_every: Option<Duration>,
    last_digest: Instant,
    stats: RecordStats,
}

impl<S: LogSink> Recorder<S> {
    /// A recorder writing to `sink`, logging a state digest at the first
    /// point after each `digest_every` of host time (None: only at the end).
    pub fn new(sink: S, digest_every: Option<Duration>) -> Self {
        Recorder {
            sink,
            digest_every,
            last_digest: Instant::now(),
            stats: RecordStats::default(),
        }
    }

    /// Check that `m` can be recorded: its points must be deterministic.
    pub fn check_machine(m: &Machine) -> Result<()> {
        if m.point_mode() == PointMode::AnyExit {
            return Err(Error::Observer(
                "recording needs a deterministic execution-point backend (exits or singlestep)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn log(&mut self, point: ExecPoint, kind: EntryKind) -> Result<u64> {
        let seq = self.sink.append(point, kind)?;
        self.stats.entries += 1;
        Ok(seq)
    }

    /// Log a state digest at the current point.
    pub fn log_digest(&mut self, m: &mut Machine) -> Result<()> {
        let point = m.point()?;
        let value = m.digest()?;
        self.stats.digests += 1;
        self.last_digest = Instant::now();
        self.log(point, EntryKind::Digest { value }).map(drop)
    }

    /// Close the log after `run` returned `end`: a last digest, then the end
    /// marker, both at the final point.
    pub fn finish(&mut self, m: &mut Machine, end: RunEnd) -> Result<()> {
        self.log_digest(m)?;
        let point = m.point()?;
        self.log(
            point,
            EntryKind::End {
                reason: end_reason(end),
            },
        )
        .map(drop)
    }

    /// Counters so far.
    pub fn stats(&self) -> RecordStats {
        self.stats
    }

    /// The sink.
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// Give back the sink.
    pub fn into_sink(self) -> S {
        self.sink
    }
}

/// The log's name for how a run ended.
pub fn end_reason(end: RunEnd) -> EndReason {
    match end {
        RunEnd::PowerOff(code) => EndReason::PowerOff { code },
        RunEnd::HaltedForever => EndReason::Halted,
        RunEnd::Shutdown => EndReason::Shutdown,
        RunEnd::Paused | RunEnd::Stopped => EndReason::Stopped,
    }
}

impl<S: LogSink> Observer for Recorder<S> {
    fn at_point(&mut self, m: &mut Machine) -> Result<Flow> {
        let inputs = m.poll_host_inputs();
        if !inputs.is_empty() {
            let point = m.point()?;
            // Every input taken from the host queue is applied, even if
            // logging fails: a primary that goes on alone loses none.
            let applied: Vec<Input> = inputs.iter().map(|i| m.apply(i)).collect();
            for input in applied {
                self.stats.inputs += 1;
                self.log(point, input_entry(&input))?;
            }
        }
        if self
            .digest_every
            .is_some_and(|d| self.last_digest.elapsed() >= d)
        {
            self.log_digest(m)?;
        }
        Ok(Flow::Continue)
    }

    fn on_sample(
        &mut self,
        m: &mut Machine,
        at: Access,
        kind: Option<SampleKind>,
        values: &[u64],
    ) -> Result<()> {
        let point = m.point()?;
        self.stats.reads += 1;
        self.log(point, sample_entry(at, kind, values)).map(drop)
    }

    fn on_output(&mut self, m: &mut Machine, out: &Output) -> Result<Option<u64>> {
        let point = m.point()?;
        self.stats.outputs += 1;
        self.log(point, out.entry()).map(Some)
    }

    fn on_inject(&mut self, m: &mut Machine, vector: u8) -> Result<()> {
        let point = m.point()?;
        self.stats.injections += 1;
        self.log(point, EntryKind::Inject { vector }).map(drop)
    }
}

impl<W: std::io::Write> LogSink for ftlog::LogWriter<W> {
    fn append(&mut self, point: ExecPoint, kind: EntryKind) -> Result<u64> {
        Ok(self.push(point, kind)?)
    }
}
