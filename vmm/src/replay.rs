//! The replayer: an [`Observer`] that feeds a recorded log back into a VM,
//! applying each input and host value at its exact execution point, and
//! checking outputs, injections and state digests on the way.
//!
//! A log can end anywhere: a primary that dies leaves a log cut between any
//! two entries, or inside a multi-entry event (an injection and the reads
//! its handler makes). The replayer then uses every entry it has, and at
//! the first point after the last one pauses the run, so the caller can go
//! live there; anything the guest does between the last entry and that
//! point (a read, an output, an injection) is its own, since nothing after
//! the log's end was released. Only an entry that contradicts the replay is
//! a divergence.

use ftlog::{EntryKind, LogEntry, LogError};

use crate::devices::SampleKind;
use crate::inputs::Input;
use crate::machine::Machine;
use crate::output::{Output, Stream};
use crate::points::ExecPoint;
use crate::record::{end_reason, logged_values, sample_entry};
use crate::run::{Access, Flow, Observer, RunEnd};
use crate::{Error, Result};

/// Where replayed entries come from.
pub trait LogSource {
    /// The next entry without consuming it; Ok(None) at the end of the log.
    fn peek(&mut self) -> Result<Option<&LogEntry>>;
    /// Consume the entry `peek` returned.
    fn advance(&mut self);
    /// The log ended because its writer died (not by its end marker): once
    /// every entry is used, the replay stops at the next point and lets the
    /// caller go live there.
    fn cut_short(&self) -> bool {
        false
    }
}

/// A log held in memory.
#[derive(Debug, Default)]
pub struct MemorySource {
    entries: std::collections::VecDeque<LogEntry>,
    cut: bool,
}

impl MemorySource {
    /// Replay these entries.
    pub fn new(entries: Vec<LogEntry>) -> Self {
        MemorySource {
            entries: entries.into(),
            cut: false,
        }
    }

    /// Replay these entries of a log whose writer died after them.
    pub fn cut(entries: Vec<LogEntry>) -> Self {
        MemorySource {
            entries: entries.into(),
            cut: true,
        }
    }
}

impl LogSource for MemorySource {
    fn peek(&mut self) -> Result<Option<&LogEntry>> {
        Ok(self.entries.front())
    }

    fn advance(&mut self) {
        self.entries.pop_front();
    }

    fn cut_short(&self) -> bool {
        self.cut
    }
}

/// Where the replay stands.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplayStats {
    /// Entries consumed.
    pub entries: u64,
    /// Digests compared (all equal, or the replay would have stopped).
    pub digests_checked: u64,
}

/// Replays from a [`LogSource`].
pub struct Replayer<S: LogSource> {
    source: S,
    stats: ReplayStats,
    /// The log's end marker was reached at the current point.
    at_end: bool,
    /// Points count branches (the `pmu` backend).
    by_branches: bool,
    /// The entry whose host values the current device access was given.
    given: Option<u64>,
    /// Every entry of a cut-short log is used: the guest is on its own.
    past_end: bool,
}

fn describe(e: &LogEntry) -> String {
    format!("entry #{} ({}) at {}", e.seq, e.kind.name(), e.point)
}

fn describe_output(o: &Output) -> String {
    match o.stream {
        Stream::Console => format!(
            "console output of {} bytes at offset {}",
            o.bytes.len(),
            o.position
        ),
        Stream::Net => format!("frame #{} ({} bytes)", o.position, o.bytes.len()),
    }
}

fn diverged(what: String) -> Error {
    Error::Divergence(what)
}

/// The device access a logged host-value entry belongs to.
fn entry_access(kind: &EntryKind) -> Option<Access> {
    match kind {
        EntryKind::PortIn { port, .. }
        | EntryKind::ClockRead { port, .. }
        | EntryKind::EntropyRead { port, .. } => Some(Access::Port(*port)),
        EntryKind::MmioRead { addr, .. } => Some(Access::Mmio(*addr)),
        EntryKind::MsrRead { index, .. } => Some(Access::Msr(*index)),
        _ => None,
    }
}

/// Entries the guest's own exit makes (matched then, not at the point).
fn made_by_an_exit(kind: &EntryKind) -> bool {
    entry_access(kind).is_some() || matches!(kind, EntryKind::Output { .. })
}

impl<S: LogSource> Replayer<S> {
    /// Replay `source`.
    pub fn new(source: S) -> Self {
        Replayer {
            source,
            stats: ReplayStats::default(),
            at_end: false,
            by_branches: false,
            given: None,
            past_end: false,
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> ReplayStats {
        self.stats
    }

    /// The log source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Whether the log was cut short (its writer died) and the replay has
    /// used every entry: a paused run stopped at the first point after the
    /// last one, where the caller may go live.
    pub fn ran_out(&self) -> bool {
        self.past_end
    }

    /// The next entry, if it is due at `p`. An entry due earlier is a
    /// divergence: the replay has run past it.
    fn due(&mut self, p: ExecPoint) -> Result<Option<LogEntry>> {
        let Some(e) = self.source.peek()? else {
            return Ok(None);
        };
        if e.point == p {
            return Ok(Some(e.clone()));
        }
        // Branch counts stay put through branch-free code, so an equal count
        // with another RIP may still lie ahead; exit counts never repeat.
        let passed = if self.by_branches {
            e.point.count < p.count
        } else {
            e.point.count <= p.count
        };
        if passed {
            return Err(diverged(format!(
                "{} was not reached: the replay is at {p}",
                describe(e)
            )));
        }
        Ok(None)
    }

    /// Whether every entry of a cut-short log has been used.
    fn used_up(&mut self) -> Result<bool> {
        if !self.past_end && self.source.peek()?.is_none() && self.source.cut_short() {
            tracing::info!(
                entries = self.stats.entries,
                "the log was cut short and every entry in it is replayed"
            );
            self.past_end = true;
        }
        Ok(self.past_end)
    }

    fn consume(&mut self) {
        self.source.advance();
        self.stats.entries += 1;
    }

    fn check_digest(&mut self, m: &mut Machine, e: &LogEntry, want: &[u8; 32]) -> Result<()> {
        let got = m.digest()?;
        if &got != want {
            return Err(diverged(format!(
                "state digest differs at {}: recorded {}, replayed {}",
                describe(e),
                hex(want),
                hex(&got)
            )));
        }
        self.stats.digests_checked += 1;
        Ok(())
    }

    /// After `run` returned `end`: the log must end here too, with a digest
    /// equal to ours (or, cut short, have no entry left).
    pub fn finish(&mut self, m: &mut Machine, end: RunEnd) -> Result<()> {
        let p = m.point()?;
        while let Some(e) = self.due(p)? {
            match &e.kind {
                EntryKind::Digest { value } => self.check_digest(m, &e, value)?,
                EntryKind::End { reason } => {
                    if *reason != end_reason(end) && end != RunEnd::Paused {
                        return Err(diverged(format!(
                            "the recording ended with {reason:?}, the replay with {end:?} at {p}"
                        )));
                    }
                    self.consume();
                    return Ok(());
                }
                _ => {
                    return Err(diverged(format!(
                        "{} left unapplied at the end",
                        describe(&e)
                    )))
                }
            }
            self.consume();
        }
        match self.source.peek()? {
            Some(e) => Err(diverged(format!(
                "the replay ended ({end:?}) at {p} but the log goes on with {}",
                describe(e)
            ))),
            None => Ok(()),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

impl<S: LogSource> Observer for Replayer<S> {
    fn next_target(&mut self) -> Result<Option<ExecPoint>> {
        self.by_branches = true;
        Ok(self.source.peek()?.map(|e| e.point))
    }

    fn at_point(&mut self, m: &mut Machine) -> Result<Flow> {
        let p = m.point()?;
        while let Some(e) = self.due(p)? {
            match &e.kind {
                EntryKind::IrqRaise { irq } => {
                    m.apply(&Input::Irq(*irq));
                }
                EntryKind::SerialInput { bytes } => {
                    let applied = m.apply(&Input::Serial(bytes.clone()));
                    if applied != Input::Serial(bytes.clone()) {
                        return Err(diverged(format!(
                            "{}: the UART had room for fewer bytes than on the primary",
                            describe(&e)
                        )));
                    }
                }
                EntryKind::RxFrame { bytes, .. } => {
                    let applied = m.apply(&Input::Frame(bytes.clone()));
                    if applied != Input::Frame(bytes.clone()) {
                        return Err(diverged(format!(
                            "{}: the guest had no receive buffer for it, unlike on the primary",
                            describe(&e)
                        )));
                    }
                }
                EntryKind::Digest { value } => self.check_digest(m, &e, value)?,
                EntryKind::Inject { .. } => return Ok(Flow::Continue),
                // Host values and outputs are matched when the guest's exit
                // makes them; with branch counts the stop just before that
                // access has its point.
                kind if self.by_branches && made_by_an_exit(kind) => return Ok(Flow::Continue),
                EntryKind::End { .. } => {
                    self.at_end = true;
                    return Ok(Flow::Pause);
                }
                EntryKind::Output { .. } => {
                    return Err(diverged(format!(
                        "{} is due but the guest did not send that output",
                        describe(&e)
                    )))
                }
                _ => {
                    return Err(diverged(format!(
                        "{} is due but the guest did not make that access",
                        describe(&e)
                    )))
                }
            }
            self.consume();
        }
        if self.used_up()? {
            return Ok(Flow::Pause);
        }
        Ok(Flow::Continue)
    }

    fn logged_samples(&mut self, m: &mut Machine, at: Access) -> Result<Option<Vec<u64>>> {
        let p = m.point()?;
        let Some(e) = self.due(p)? else {
            return Ok(None);
        };
        if entry_access(&e.kind) != Some(at) {
            return Ok(None);
        }
        let values = logged_values(&e.kind).ok_or_else(|| {
            diverged(format!(
                "{} does not hold whole 64-bit values",
                describe(&e)
            ))
        })?;
        self.given = Some(e.seq);
        Ok(Some(values))
    }

    fn on_sample(
        &mut self,
        m: &mut Machine,
        at: Access,
        kind: Option<SampleKind>,
        values: &[u64],
    ) -> Result<()> {
        let p = m.point()?;
        let took = sample_entry(at, kind, values);
        if self.given.take().is_some() {
            let Some(e) = self.due(p)? else {
                return Err(diverged(format!("the log moved under the access at {p}")));
            };
            let logged = logged_values(&e.kind).unwrap_or_default();
            if logged.len() != values.len() {
                return Err(diverged(format!(
                    "{} holds {} host values, the guest's access took {}",
                    describe(&e),
                    logged.len(),
                    values.len()
                )));
            }
            if !e.kind.same_source(&took) {
                return Err(diverged(format!(
                    "{} expected, but the guest made a {} at {p}",
                    describe(&e),
                    took.name()
                )));
            }
            self.consume();
            return Ok(());
        }
        match self.due(p)? {
            Some(e) => Err(diverged(format!(
                "{} expected, but the guest made a {} at {p}",
                describe(&e),
                took.name()
            ))),
            // Past the end of a cut log: the device's own values.
            None if self.used_up()? => Ok(()),
            None => Err(diverged(format!(
                "the guest made a {} at {p} that the log does not have",
                took.name()
            ))),
        }
    }

    fn on_output(&mut self, m: &mut Machine, out: &Output) -> Result<Option<u64>> {
        let p = m.point()?;
        let want = out.entry();
        match self.due(p)? {
            Some(e) if e.kind == want => {
                self.consume();
                Ok(Some(e.seq))
            }
            Some(e) => Err(diverged(format!(
                "the guest sent {} at {p}, the log has {}",
                describe_output(out),
                describe(&e)
            ))),
            // Past the end of a cut log: an output nobody released yet.
            None if self.used_up()? => Ok(None),
            None => Err(diverged(format!(
                "the guest sent {} at {p} that the log does not have",
                describe_output(out)
            ))),
        }
    }

    fn on_inject(&mut self, m: &mut Machine, vector: u8) -> Result<()> {
        let p = m.point()?;
        match self.due(p)? {
            Some(e) if e.kind == (EntryKind::Inject { vector }) => {
                self.consume();
                Ok(())
            }
            Some(e) => Err(diverged(format!(
                "the replay injected vector {vector:#x} at {p}, the log has {}",
                describe(&e)
            ))),
            None if self.used_up()? => Ok(()),
            None => Err(diverged(format!(
                "the replay injected vector {vector:#x} at {p}, the recording did not"
            ))),
        }
    }

    fn on_idle(&mut self, m: &mut Machine) -> Result<Flow> {
        // A halted guest wakes only by an input logged at this very point.
        let p = m.point()?;
        if self.due(p)?.is_some() {
            return Ok(Flow::Continue);
        }
        match self.source.peek()? {
            None => {
                self.used_up()?;
                Ok(Flow::Pause)
            }
            Some(e) => Err(diverged(format!(
                "the guest halted at {p} with nothing to wake it, but the log goes on with {}",
                describe(e)
            ))),
        }
    }
}

/// Entries read from an ftlog stream (a file or a socket). A stream that
/// ends without an end marker, cleanly or inside its last frame, is a log
/// cut short (its recorder died): a warning, then the replay goes up to its
/// last complete entry. A damaged frame is an error.
pub struct ReaderSource<R: std::io::Read> {
    reader: ftlog::LogReader<R>,
    peeked: Option<LogEntry>,
    seen_end: bool,
    done: bool,
    cut: bool,
}

impl<R: std::io::Read> ReaderSource<R> {
    /// Replay from `reader`, whose header has already been read.
    pub fn new(reader: ftlog::LogReader<R>) -> Self {
        ReaderSource {
            reader,
            peeked: None,
            seen_end: false,
            done: false,
            cut: false,
        }
    }

    /// The log's header.
    pub fn header(&self) -> &ftlog::LogHeader {
        self.reader.header()
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.reader.offset()
    }

    fn ended_early(&mut self, why: &str) {
        tracing::warn!(
            "{why}: the recorder died; replaying up to its last complete entry (#{})",
            self.reader.next_seq().saturating_sub(1)
        );
        self.done = true;
        self.cut = true;
    }
}

impl<R: std::io::Read> LogSource for ReaderSource<R> {
    fn peek(&mut self) -> Result<Option<&LogEntry>> {
        if self.peeked.is_none() && !self.done {
            match self.reader.next_entry() {
                Ok(Some(e)) => {
                    self.seen_end |= matches!(e.kind, EntryKind::End { .. });
                    self.peeked = Some(e);
                }
                Ok(None) if self.seen_end => self.done = true,
                Ok(None) => self.ended_early("the log ends without an end marker"),
                Err(e @ LogError::Truncated { .. }) => {
                    self.ended_early(&format!("the log's last frame is incomplete ({e})"))
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.peeked.as_ref())
    }

    fn advance(&mut self) {
        self.peeked = None;
    }

    fn cut_short(&self) -> bool {
        self.cut
    }
}
