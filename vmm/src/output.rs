//! Guest outputs (console bytes, network frames) on their way out of the VM.
//!
//! Devices only append what the guest sent to the access's
//! [`crate::devices::DeviceCtx`]. The run loop numbers each output in its
//! stream, asks the observer for the output's own log entry (its tag: a
//! recorder logs one, a replayer matches the logged one), and hands output
//! and tag to the [`OutputSink`] the caller configured, so console bytes and
//! frames leave in one order (docs/replay.md, "The output rule").

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use ftlog::OutputStream as Stream;

/// One output of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Where it goes.
    pub stream: Stream,
    /// Console: the stream offset of its first byte (bytes since boot);
    /// network: the frame's index since boot.
    pub position: u64,
    /// The console bytes, or the whole frame.
    pub bytes: Vec<u8>,
}

impl Output {
    /// The first 8 bytes of the BLAKE3 hash of the bytes (what the log keeps).
    pub fn hash(&self) -> [u8; 8] {
        let h = blake3::hash(&self.bytes);
        let mut out = [0u8; 8];
        out.copy_from_slice(&h.as_bytes()[..8]);
        out
    }

    /// The log entry that stands for this output.
    pub fn entry(&self) -> ftlog::EntryKind {
        ftlog::EntryKind::Output {
            stream: self.stream,
            position: self.position,
            len: u32::try_from(self.bytes.len()).unwrap_or(u32::MAX),
            hash: self.hash(),
        }
    }
}

/// The sequence number of an output's own log entry; None when it has none
/// (a VM nobody replays, a backup past the end of its log, or an entry that
/// could not be logged).
pub type Tag = Option<u64>;

/// Where the guest's outputs go. The run loop calls it on the vCPU thread,
/// inside the exit that produced the output, after the observer gave the
/// output its tag; it must not block on the outside world for long.
pub trait OutputSink: Send {
    /// Take `output`, whose log entry is `tag`.
    fn put(&mut self, output: Output, tag: Tag);
}

/// Console bytes to a writer in the order produced (a terminal, a test
/// capture); frames are dropped.
pub struct ConsoleWriter<W>(pub W);

impl<W: Write + Send> OutputSink for ConsoleWriter<W> {
    fn put(&mut self, output: Output, _tag: Tag) {
        if output.stream != Stream::Console {
            return;
        }
        if let Err(e) = self
            .0
            .write_all(&output.bytes)
            .and_then(|()| self.0.flush())
        {
            tracing::warn!("console output lost at offset {}: {e}", output.position);
        }
    }
}

/// Everything dropped.
impl OutputSink for std::io::Sink {
    fn put(&mut self, _output: Output, _tag: Tag) {}
}

/// Every output with its tag, kept in memory (tests, benches). Clone to
/// look at it from outside the VM.
#[derive(Debug, Clone, Default)]
pub struct Collector(Arc<Mutex<Vec<(Output, Tag)>>>);

impl Collector {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything so far, in order.
    pub fn all(&self) -> Vec<(Output, Tag)> {
        self.0.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// The console bytes so far.
    pub fn console(&self) -> Vec<u8> {
        self.all()
            .into_iter()
            .filter(|(o, _)| o.stream == Stream::Console)
            .flat_map(|(o, _)| o.bytes)
            .collect()
    }

    /// The frames so far.
    pub fn frames(&self) -> Vec<Vec<u8>> {
        self.all()
            .into_iter()
            .filter(|(o, _)| o.stream == Stream::Net)
            .map(|(o, _)| o.bytes)
            .collect()
    }
}

impl OutputSink for Collector {
    fn put(&mut self, output: Output, tag: Tag) {
        if let Ok(mut g) = self.0.lock() {
            g.push((output, tag));
        }
    }
}

/// How much each stream has carried since boot: where the next output
/// goes. Part of the run-loop state (snapshots).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputCounters {
    /// Console bytes so far.
    pub console_bytes: u64,
    /// Frames so far.
    pub frames: u64,
}

impl OutputCounters {
    /// Give `bytes`, just sent on `stream`, its position.
    pub(crate) fn number(&mut self, stream: Stream, bytes: Vec<u8>) -> Output {
        let counter = match stream {
            Stream::Console => &mut self.console_bytes,
            Stream::Net => &mut self.frames,
        };
        let position = *counter;
        *counter += match stream {
            Stream::Console => bytes.len() as u64,
            Stream::Net => 1,
        };
        Output {
            stream,
            position,
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_is_numbered_by_byte_and_frames_by_index() {
        let mut c = OutputCounters::default();
        assert_eq!(c.number(Stream::Console, b"ab".to_vec()).position, 0);
        assert_eq!(c.number(Stream::Net, vec![0; 60]).position, 0);
        assert_eq!(c.number(Stream::Console, b"c".to_vec()).position, 2);
        assert_eq!(c.number(Stream::Net, vec![1; 60]).position, 1);
        assert_eq!(
            c,
            OutputCounters {
                console_bytes: 3,
                frames: 2
            }
        );
    }

    #[test]
    fn the_entry_names_stream_position_length_and_hash() {
        let o = Output {
            stream: Stream::Console,
            position: 7,
            bytes: b"x".to_vec(),
        };
        let other = Output {
            bytes: b"y".to_vec(),
            ..o.clone()
        };
        assert_ne!(o.entry(), other.entry(), "the hash tells bytes apart");
        assert!(matches!(
            o.entry(),
            ftlog::EntryKind::Output {
                stream: Stream::Console,
                position: 7,
                len: 1,
                ..
            }
        ));
    }

    #[test]
    fn console_writer_keeps_bytes_and_drops_frames() {
        let mut w = ConsoleWriter(Vec::new());
        let mut c = OutputCounters::default();
        w.put(c.number(Stream::Console, b"hi".to_vec()), Some(1));
        w.put(c.number(Stream::Net, vec![9; 60]), None);
        assert_eq!(w.0, b"hi");
    }
}
