//! The replayer: an [`Observer`] that feeds a recorded log back into a VM,
//! applying each input and read value at its exact execution point and
//! checking injections and state digests on the way.

use ftlog::{EntryKind, LogEntry};

use crate::devices::ReadClass;
use crate::inputs::Input;
use crate::machine::Machine;
use crate::points::ExecPoint;
use crate::record::{end_reason, read_entry};
use crate::run::{Flow, Observer, ReadSource, RunEnd};
use crate::{Error, Result};

/// Where replayed entries come from.
pub trait LogSource {
    /// The next entry without consuming it; Ok(None) at the end of the log.
    fn peek(&mut self) -> Result<Option<&LogEntry>>;
    /// Consume the entry `peek` returned.
    fn advance(&mut self);
    /// The log ended because its writer died (not by its end marker): the
    /// replay should stop at the next point and let the caller go live.
    fn cut_short(&self) -> bool {
        false
    }
}

/// A log held in memory.
#[derive(Debug, Default)]
pub struct MemorySource {
    entries: std::collections::VecDeque<LogEntry>,
}

impl MemorySource {
    /// Replay these entries.
    pub fn new(entries: Vec<LogEntry>) -> Self {
        MemorySource {
            entries: entries.into(),
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
}

fn describe(e: &LogEntry) -> String {
    format!("entry #{} ({}) at {}", e.seq, e.kind.name(), e.point)
}

fn diverged(what: String) -> Error {
    Error::Divergence(what)
}

impl<S: LogSource> Replayer<S> {
    /// Replay `source`.
    pub fn new(source: S) -> Self {
        Replayer {
            source,
            stats: ReplayStats::default(),
            at_end: false,
            by_branches: false,
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
    /// equal to ours.
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
                // A read is matched when the guest makes it (`on_read`); with
                // branch counts the stop just before that access has its point.
                kind if self.by_branches && kind.read_data().is_some() => {
                    return Ok(Flow::Continue)
                }
                EntryKind::End { .. } => {
                    self.at_end = true;
                    return Ok(Flow::Pause);
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
        if self.source.cut_short() && self.source.peek()?.is_none() {
            return Ok(Flow::Pause);
        }
        Ok(Flow::Continue)
    }

    fn on_read(
        &mut self,
        m: &mut Machine,
        src: ReadSource,
        class: ReadClass,
        data: &mut [u8],
    ) -> Result<()> {
        let p = m.point()?;
        let want = read_entry(src, class, data);
        let Some(e) = self.due(p)? else {
            return Err(diverged(format!(
                "the guest made a {} at {p} that the log does not have",
                want.name()
            )));
        };
        let logged = e.kind.read_data().filter(|_| e.kind.same_source(&want));
        let Some(logged) = logged else {
            return Err(diverged(format!(
                "{} expected, but the guest made a {} at {p}",
                describe(&e),
                want.name()
            )));
        };
        if logged.len() != data.len() {
            return Err(diverged(format!(
                "{} holds {} bytes, the guest read {}",
                describe(&e),
                logged.len(),
                data.len()
            )));
        }
        data.copy_from_slice(logged);
        self.consume();
        Ok(())
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
            None => Ok(Flow::Pause),
            Some(e) => Err(diverged(format!(
                "the guest halted at {p} with nothing to wake it, but the log goes on with {}",
                describe(e)
            ))),
        }
    }
}

/// Entries read from an ftlog stream (a file or a socket).
pub struct ReaderSource<R: std::io::Read> {
    reader: ftlog::LogReader<R>,
    peeked: Option<LogEntry>,
}

impl<R: std::io::Read> ReaderSource<R> {
    /// Replay from `reader`, whose header has already been read.
    pub fn new(reader: ftlog::LogReader<R>) -> Self {
        ReaderSource {
            reader,
            peeked: None,
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
}

impl<R: std::io::Read> LogSource for ReaderSource<R> {
    fn peek(&mut self) -> Result<Option<&LogEntry>> {
        if self.peeked.is_none() {
            self.peeked = self.reader.next_entry()?;
        }
        Ok(self.peeked.as_ref())
    }

    fn advance(&mut self) {
        self.peeked = None;
    }
}
