//! Blocking log streams over any `Read` / `Write`: files and sockets alike.

mod reader;
mod writer;

pub use reader::LogReader;
pub use writer::LogWriter;

use crate::{ExecPoint, FramePos, LogEntry, LogError};

/// The ordering rules both ends enforce: seq goes 0, 1, 2, ...; the point
/// count never decreases. Only the count is checked, because RIP and RCX
/// do not grow with time within one count (REP string instructions count
/// RCX down at one RIP).
#[derive(Debug, Default, Clone, Copy)]
struct Order {
    next_seq: u64,
    last: Option<ExecPoint>,
}

impl Order {
    /// Check that `e` may follow what was accepted so far.
    fn check(&self, e: &LogEntry, at: FramePos) -> Result<(), LogError> {
        if e.seq != self.next_seq {
            return Err(LogError::Sequence {
                at,
                expected: self.next_seq,
                found: e.seq,
            });
        }
        match self.last {
            Some(prev) if e.point.count < prev.count => Err(LogError::PointBackwards {
                at,
                seq: e.seq,
                prev,
                point: e.point,
            }),
            _ => Ok(()),
        }
    }

    /// Record that `e` was accepted.
    fn accept(&mut self, e: &LogEntry) {
        self.next_seq = e.seq.saturating_add(1);
        self.last = Some(e.point);
    }
}
