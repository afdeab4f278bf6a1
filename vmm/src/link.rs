//! The logging channel as a [`LogSink`] (primary) and a [`LogSource`]
//! (backup), so the same Recorder and Replayer run over TCP.

use std::sync::Arc;

use ftlog::{BackupReceiver, ChannelError, EntryKind, LogEntry, PrimarySender};

use crate::points::ExecPoint;
use crate::record::LogSink;
use crate::replay::LogSource;
use crate::{Error, Result};

fn channel_err(e: ChannelError) -> Error {
    Error::Observer(format!("logging channel: {e}"))
}

impl LogSink for Arc<PrimarySender> {
    fn append(&mut self, point: ExecPoint, kind: EntryKind) -> Result<u64> {
        self.push(point, kind).map_err(channel_err)
    }
}

/// Entries as the backup receives them. The end of the log is a clean close
/// by the primary, or the primary's death (kept in [`ChannelSource::ended`]):
/// every entry received before it has been yielded by then.
pub struct ChannelSource {
    rx: Arc<BackupReceiver>,
    peeked: Option<LogEntry>,
    ended: Option<ChannelError>,
    closed: bool,
    saw_end: bool,
}

impl ChannelSource {
    /// Replay what `rx` receives.
    pub fn new(rx: Arc<BackupReceiver>) -> Self {
        ChannelSource {
            rx,
            peeked: None,
            ended: None,
            closed: false,
            saw_end: false,
        }
    }

    /// Whether the log's end marker was consumed: a log that closed
    /// cleanly must have had one.
    pub fn saw_end(&self) -> bool {
        self.saw_end
    }

    /// Why the log ended, if the primary died (None: a clean close, or not
    /// ended yet).
    pub fn ended(&self) -> Option<&ChannelError> {
        self.ended.as_ref()
    }

    /// Whether the log has ended.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

impl LogSource for ChannelSource {
    fn peek(&mut self) -> Result<Option<&LogEntry>> {
        if self.peeked.is_none() && !self.closed {
            match self.rx.next() {
                Ok(Some(e)) => self.peeked = Some(e),
                Ok(None) => self.closed = true,
                Err(e) if e.is_peer_death() => {
                    tracing::warn!("the primary is gone: {e}");
                    self.ended = Some(e);
                    self.closed = true;
                }
                Err(e) => return Err(channel_err(e)),
            }
        }
        Ok(self.peeked.as_ref())
    }

    fn cut_short(&self) -> bool {
        self.ended.is_some()
    }

    fn advance(&mut self) {
        if let Some(e) = self.peeked.take() {
            self.saw_end |= matches!(e.kind, EntryKind::End { .. });
            if let Err(err) = self.rx.report_executed(e.seq) {
                tracing::debug!("cannot report progress to the primary: {err}");
            }
        }
    }
}
