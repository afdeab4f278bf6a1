//! The reading end.

use std::io::{ErrorKind, Read};

use super::Order;
use crate::codec::{
    check_eof, check_header_version, decode_frame_at, decode_preamble, preamble_eof, Frame,
    PREAMBLE_LEN,
};
use crate::{FramePos, LogEntry, LogError, LogHeader};

/// How much to ask the underlying reader for at a time.
const CHUNK: usize = 64 * 1024;

/// Reads a log: the preamble and header on creation, then entries.
///
/// Errors are sticky: after a corrupt or out-of-order frame, every later
/// [`LogReader::next_entry`] returns the same error. An I/O error (a socket
/// timeout) loses no data, and the call may be retried. As an iterator the
/// reader yields entries, then at most one error, then stops.
#[derive(Debug)]
pub struct LogReader<R: Read> {
    src: Source<R>,
    version: u32,
    header: LogHeader,
    order: Order,
    /// The iterator has yielded an error.
    iter_failed: bool,
}

impl<R: Read> LogReader<R> {
    /// Open a log on `inner`: reads and checks the preamble and header.
    pub fn new(inner: R) -> Result<Self, LogError> {
        let mut src = Source {
            inner,
            buf: Vec::new(),
            start: 0,
            eof: false,
            pos: FramePos::FIRST,
        };
        let version = src.read_preamble()?;
        let header = match src.peek_frame()? {
            Some((Frame::Header(h), len)) => {
                check_header_version(&h, version, src.pos)?;
                src.consume(len);
                h
            }
            Some((other, _)) => {
                return Err(LogError::UnexpectedFrame {
                    at: src.pos,
                    expected: "header",
                    found: other.name(),
                })
            }
            None => {
                return Err(LogError::MissingHeader {
                    offset: src.pos.offset,
                })
            }
        };
        tracing::debug!(version, backend = %header.backend, "log reader opened");
        Ok(LogReader {
            src,
            version,
            header,
            order: Order::default(),
            iter_failed: false,
        })
    }

    /// The log's header.
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// The format version in the stream's preamble.
    pub fn format_version(&self) -> u32 {
        self.version
    }

    /// Bytes of log consumed so far, preamble included.
    pub fn offset(&self) -> u64 {
        self.src.pos.offset
    }

    /// The sequence number the next entry must have.
    pub fn next_seq(&self) -> u64 {
        self.order.next_seq
    }

    /// The next entry; Ok(None) when the stream ends cleanly at a frame
    /// boundary. A stream cut inside a frame is [`LogError::Truncated`].
    pub fn next_entry(&mut self) -> Result<Option<LogEntry>, LogError> {
        let at = self.src.pos;
        let Some((frame, len)) = self.src.peek_frame()? else {
            return Ok(None);
        };
        let entry = match frame {
            Frame::Entry(e) => e,
            other => {
                return Err(LogError::UnexpectedFrame {
                    at,
                    expected: "entry",
                    found: other.name(),
                })
            }
        };
        self.order.check(&entry, at)?;
        self.order.accept(&entry);
        self.src.consume(len);
        Ok(Some(entry))
    }
}

impl<R: Read> Iterator for LogReader<R> {
    type Item = Result<LogEntry, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.iter_failed {
            return None;
        }
        let item = self.next_entry().transpose();
        self.iter_failed = matches!(item, Some(Err(_)));
        item
    }
}

/// Buffered bytes from the underlying reader, and where they sit in the log.
#[derive(Debug)]
struct Source<R> {
    inner: R,
    /// Unconsumed bytes are `buf[start..]`.
    buf: Vec<u8>,
    start: usize,
    eof: bool,
    /// Where the next frame starts.
    pos: FramePos,
}

impl<R: Read> Source<R> {
    fn read_preamble(&mut self) -> Result<u32, LogError> {
        loop {
            if let Some(v) = decode_preamble(&self.buf)? {
                self.start = PREAMBLE_LEN;
                return Ok(v);
            }
            if !self.fill()? {
                return Err(preamble_eof(&self.buf));
            }
        }
    }

    /// The next frame and its length, not yet consumed; reads as needed.
    fn peek_frame(&mut self) -> Result<Option<(Frame, usize)>, LogError> {
        loop {
            if let Some(found) = decode_frame_at(self.pending(), self.pos)? {
                return Ok(Some(found));
            }
            if !self.fill()? {
                check_eof(self.pending(), self.pos)?;
                return Ok(None);
            }
        }
    }

    fn pending(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or_default()
    }

    fn consume(&mut self, len: usize) {
        self.start += len;
        self.pos = self.pos.next(len);
    }

    /// Read more bytes; false at end of stream.
    fn fill(&mut self) -> Result<bool, LogError> {
        if self.eof {
            return Ok(false);
        }
        // Drop consumed bytes first, so each frame is moved at most once.
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + CHUNK, 0);
        let n = loop {
            match self.inner.read(&mut self.buf[old..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.buf.truncate(old);
                    return Err(e.into());
                }
            }
        };
        self.buf.truncate(old + n);
        self.eof = n == 0;
        Ok(n > 0)
    }
}
