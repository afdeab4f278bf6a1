//! The writing end.

use std::io::{BufWriter, Write};

use super::Order;
use crate::codec::{encode_entry_at, encode_header_at, encode_preamble, FORMAT_VERSION};
use crate::{EntryKind, ExecPoint, FramePos, LogEntry, LogError, LogHeader};

/// Writes a log: the preamble and header on creation, then entries.
///
/// Output is buffered: call [`LogWriter::flush`] when the other end must
/// see what was appended (a backup waiting on a socket). Dropping the
/// writer flushes too, but ignores errors. After a failed write the writer
/// refuses further entries ([`LogError::WriterBroken`]).
#[derive(Debug)]
pub struct LogWriter<W: Write> {
    out: BufWriter<W>,
    /// Scratch space for one encoded frame.
    frame: Vec<u8>,
    /// Where the next frame goes.
    pos: FramePos,
    order: Order,
    /// A write failed: the stream may end inside a frame, so nothing more
    /// may follow.
    broken: bool,
}

impl<W: Write> LogWriter<W> {
    /// Start a log on `inner`: writes the preamble and the header frame
    /// (buffered, not yet flushed).
    pub fn new(inner: W, header: &LogHeader) -> Result<Self, LogError> {
        let mut w = LogWriter {
            out: BufWriter::with_capacity(64 * 1024, inner),
            frame: Vec::new(),
            pos: FramePos::FIRST,
            order: Order::default(),
            broken: false,
        };
        encode_preamble(&mut w.frame);
        w.out.write_all(&w.frame)?;
        w.frame.clear();
        let len = encode_header_at(header, &mut w.frame, w.pos)?;
        w.write_frame(len)?;
        tracing::debug!(version = FORMAT_VERSION, backend = %header.backend, "log writer started");
        Ok(w)
    }

    /// Append `entry`. Its seq must be [`LogWriter::next_seq`] and its
    /// point count no lower than the previous entry's; otherwise nothing is
    /// written and the error says why.
    pub fn append(&mut self, entry: &LogEntry) -> Result<(), LogError> {
        self.order.check(entry, self.pos)?;
        self.frame.clear();
        let len = encode_entry_at(entry, &mut self.frame, self.pos)?;
        self.write_frame(len)?;
        self.order.accept(entry);
        Ok(())
    }

    /// Append an entry with the next sequence number; returns that number.
    pub fn push(&mut self, point: ExecPoint, kind: EntryKind) -> Result<u64, LogError> {
        let seq = self.order.next_seq;
        self.append(&LogEntry { seq, point, kind })?;
        Ok(seq)
    }

    /// The sequence number the next entry must have.
    pub fn next_seq(&self) -> u64 {
        self.order.next_seq
    }

    /// Bytes of log produced so far, preamble included (some may still be
    /// in the buffer).
    pub fn bytes_written(&self) -> u64 {
        self.pos.offset
    }

    /// Push buffered bytes to the underlying writer and flush it.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.out.flush()?;
        Ok(())
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        self.out.get_ref()
    }

    /// Flush, then give back the underlying writer.
    pub fn into_inner(self) -> Result<W, LogError> {
        self.out
            .into_inner()
            .map_err(|e| LogError::Io(e.into_error()))
    }

    /// Write the `len`-byte frame encoded in `self.frame`.
    fn write_frame(&mut self, len: usize) -> Result<(), LogError> {
        if self.broken {
            return Err(LogError::WriterBroken);
        }
        if let Err(e) = self.out.write_all(&self.frame) {
            self.broken = true;
            return Err(e.into());
        }
        self.pos = self.pos.next(len);
        Ok(())
    }
}
