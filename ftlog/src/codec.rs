//! The wire format, and the only module that knows the payload encoding
//! (postcard). Everything here works on byte slices, so blocking and async
//! code can share it.
//!
//! A stream is a [`PREAMBLE_LEN`]-byte preamble ([`MAGIC`], then the format
//! version as a u32 LE), then frames. A frame is its payload length (u32
//! LE), the payload's CRC-32 (u32 LE), and the payload: a postcard-encoded
//! [`Frame`]. The first frame is a [`Frame::Header`].

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{LogEntry, LogError, LogHeader};

/// The first eight bytes of every log.
pub const MAGIC: [u8; 8] = *b"FTVMMLOG";
/// The format version this build writes.
pub const FORMAT_VERSION: u32 = 5;
/// The oldest format version this build reads.
pub const MIN_READ_VERSION: u32 = 5;
/// Magic plus version.
pub const PREAMBLE_LEN: usize = 12;
/// Length plus CRC.
pub const FRAME_HEAD_LEN: usize = 8;
/// Largest payload accepted, so a corrupt length cannot make a reader wait
/// for (or allocate) gigabytes.
pub const MAX_FRAME_LEN: u32 = 16 << 20;

/// What a frame carries. Variant order is part of the wire format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// The log header; first frame of a stream, and only there.
    Header(LogHeader),
    /// One entry.
    Entry(LogEntry),
}

impl Frame {
    /// The variant's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Header(_) => "header",
            Frame::Entry(_) => "entry",
        }
    }
}

/// [`Frame`] by reference, so entries are encoded without a copy; the
/// encoding is the same (postcard writes only the variant index).
#[derive(Serialize)]
enum FrameRef<'a> {
    Header(&'a LogHeader),
    Entry(&'a LogEntry),
}

/// Where a frame sits in its stream, for error messages: its index (the
/// header is frame 0) and the byte offset of its head from the start of
/// the stream, preamble included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FramePos {
    /// Frame number, from 0.
    pub index: u64,
    /// Byte offset of the frame's head.
    pub offset: u64,
}

impl FramePos {
    /// Where the first frame of a stream starts.
    pub const FIRST: FramePos = FramePos {
        index: 0,
        offset: PREAMBLE_LEN as u64,
    };

    /// The position of the frame after this one, which took `len` bytes.
    pub fn next(self, len: usize) -> FramePos {
        FramePos {
            index: self.index.saturating_add(1),
            offset: self.offset.saturating_add(len as u64),
        }
    }
}

impl fmt::Display for FramePos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "frame {} at byte {}", self.index, self.offset)
    }
}

/// Append the stream preamble for [`FORMAT_VERSION`] to `out`.
pub fn encode_preamble(out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
}

/// Check a stream's preamble and return its format version; Ok(None) if
/// `buf` is too short to tell yet. Bad magic is reported as soon as the
/// bytes present differ from it.
pub fn decode_preamble(buf: &[u8]) -> Result<Option<u32>, LogError> {
    let n = buf.len().min(MAGIC.len());
    if buf[..n] != MAGIC[..n] {
        let mut found = [0u8; 8];
        found[..n].copy_from_slice(&buf[..n]);
        return Err(LogError::BadMagic { found });
    }
    let Some(v) = buf.get(MAGIC.len()..PREAMBLE_LEN) else {
        return Ok(None);
    };
    let version = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
    if !(MIN_READ_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(LogError::UnsupportedVersion {
            found: version,
            min: MIN_READ_VERSION,
            max: FORMAT_VERSION,
        });
    }
    Ok(Some(version))
}

/// The error for a stream that ended with `buf.len()` bytes of an
/// incomplete preamble.
pub fn preamble_eof(buf: &[u8]) -> LogError {
    LogError::TruncatedPreamble { present: buf.len() }
}

/// Append `frame`, framed, to `out`; returns the bytes appended. On error
/// `out` is left as it was.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) -> Result<usize, LogError> {
    encode_frame_at(frame, out, FramePos::default())
}

/// [`encode_frame`], naming `at` in errors.
pub fn encode_frame_at(frame: &Frame, out: &mut Vec<u8>, at: FramePos) -> Result<usize, LogError> {
    let frame = match frame {
        Frame::Header(h) => FrameRef::Header(h),
        Frame::Entry(e) => FrameRef::Entry(e),
    };
    encode_ref(&frame, out, at)
}

/// Append `Frame::Header(header)`, framed, to `out`, without copying it.
pub fn encode_header_at(
    header: &LogHeader,
    out: &mut Vec<u8>,
    at: FramePos,
) -> Result<usize, LogError> {
    encode_ref(&FrameRef::Header(header), out, at)
}

/// Append `Frame::Entry(entry)`, framed, to `out`, without copying it.
pub fn encode_entry_at(
    entry: &LogEntry,
    out: &mut Vec<u8>,
    at: FramePos,
) -> Result<usize, LogError> {
    encode_ref(&FrameRef::Entry(entry), out, at)
}

fn encode_ref(frame: &FrameRef<'_>, out: &mut Vec<u8>, at: FramePos) -> Result<usize, LogError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEAD_LEN]);
    if let Err(e) = postcard::to_io(frame, &mut *out) {
        out.truncate(start);
        return Err(LogError::Encode {
            at,
            reason: e.to_string(),
        });
    }
    let payload_len = out.len() - start - FRAME_HEAD_LEN;
    let len = match u32::try_from(payload_len) {
        Ok(len) if len <= MAX_FRAME_LEN => len,
        _ => {
            out.truncate(start);
            return Err(LogError::FrameTooLarge {
                at,
                len: payload_len as u64,
                max: MAX_FRAME_LEN,
            });
        }
    };
    let crc = crc32fast::hash(&out[start + FRAME_HEAD_LEN..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + FRAME_HEAD_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(out.len() - start)
}

/// Decode the frame at the start of `buf`: Ok(Some((frame, bytes used))),
/// or Ok(None) if `buf` holds only part of it. Errors name frame 0 at
/// byte 0; use [`decode_frame_at`] to name the real position.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, LogError> {
    decode_frame_at(buf, FramePos::default())
}

/// [`decode_frame`], naming `at` in errors.
pub fn decode_frame_at(buf: &[u8], at: FramePos) -> Result<Option<(Frame, usize)>, LogError> {
    let Some((payload, end)) = checked_payload(buf, at)? else {
        return Ok(None);
    };
    let (frame, rest) =
        postcard::take_from_bytes::<Frame>(payload).map_err(|e| LogError::Decode {
            at,
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(LogError::Decode {
            at,
            reason: format!("{} bytes after the frame's value", rest.len()),
        });
    }
    Ok(Some((frame, end)))
}

/// The payload length and CRC in the head at the start of `buf`, once the
/// head is complete. Rejects an oversized length at once, before any
/// payload is waited for.
fn frame_head(buf: &[u8], at: FramePos) -> Result<Option<(usize, u32)>, LogError> {
    let Some(h) = buf.get(..FRAME_HEAD_LEN) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len > MAX_FRAME_LEN {
        return Err(LogError::FrameTooLarge {
            at,
            len: u64::from(len),
            max: MAX_FRAME_LEN,
        });
    }
    // MAX_FRAME_LEN fits any usize we build for.
    let len = usize::try_from(len).map_err(|_| LogError::FrameTooLarge {
        at,
        len: u64::from(len),
        max: MAX_FRAME_LEN,
    })?;
    Ok(Some((len, crc)))
}

/// The payload of the complete frame at the start of `buf` (length within
/// the limit, CRC verified) and the frame's total length; None while the
/// frame is incomplete. Shared by log streams and the logging channel.
pub(crate) fn checked_payload(
    buf: &[u8],
    at: FramePos,
) -> Result<Option<(&[u8], usize)>, LogError> {
    let Some((len, stored)) = frame_head(buf, at)? else {
        return Ok(None);
    };
    let end = FRAME_HEAD_LEN + len;
    let Some(payload) = buf.get(FRAME_HEAD_LEN..end) else {
        return Ok(None);
    };
    let computed = crc32fast::hash(payload);
    if computed != stored {
        return Err(LogError::Checksum {
            at,
            stored,
            computed,
        });
    }
    Ok(Some((payload, end)))
}

/// Check the bytes left over when a stream ended at `at`: none is a clean
/// end; anything else is a frame cut short.
pub fn check_eof(buf: &[u8], at: FramePos) -> Result<(), LogError> {
    if buf.is_empty() {
        return Ok(());
    }
    let expected = match frame_head(buf, at)? {
        Some((len, _)) => FRAME_HEAD_LEN + len,
        None => FRAME_HEAD_LEN,
    };
    Err(LogError::Truncated {
        at,
        expected: expected as u64,
        present: buf.len() as u64,
    })
}

/// Postcard-encode a value that is not a log frame (snapshot files, see
/// [`crate::blob`]), so postcard stays behind this module.
pub(crate) fn encode_value<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(value).map_err(|e| e.to_string())
}

/// Decode what [`encode_value`] wrote; the whole buffer must be used.
pub(crate) fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, rest) = postcard::take_from_bytes::<T>(bytes).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} stray bytes after the value", rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EntryKind, ExecPoint};

    #[test]
    fn preamble_is_magic_then_version_le() {
        let mut out = Vec::new();
        encode_preamble(&mut out);
        assert_eq!(out.len(), PREAMBLE_LEN);
        assert_eq!(&out, b"FTVMMLOG\x05\x00\x00\x00");
        assert_eq!(decode_preamble(&out).unwrap(), Some(FORMAT_VERSION));
        for cut in 0..PREAMBLE_LEN {
            assert_eq!(decode_preamble(&out[..cut]).unwrap(), None, "cut {cut}");
        }
    }

    #[test]
    fn bad_magic_is_reported_from_the_first_wrong_byte() {
        let e = decode_preamble(b"FTX").unwrap_err();
        assert!(matches!(e, LogError::BadMagic { found } if &found[..3] == b"FTX"));
        assert!(e.to_string().starts_with("not an ftvmm log"), "{e}");
    }

    /// Pins the wire format: a change here breaks every stored log.
    #[test]
    fn entry_frame_bytes_are_stable() {
        let f = Frame::Entry(LogEntry {
            seq: 1,
            point: ExecPoint {
                count: 2,
                rip: 0x10,
                rcx: 0,
            },
            kind: EntryKind::IrqRaise { irq: 4 },
        });
        let mut out = Vec::new();
        assert_eq!(encode_frame(&f, &mut out).unwrap(), 15);
        let want = [
            7, 0, 0, 0, // payload length
            0x89, 0xc7, 0xf3, 0xdd, // CRC-32 of the payload
            1,    // Frame::Entry
            1, 2, 0x10, 0, // seq, count, rip, rcx (varints)
            0, 4, // EntryKind::IrqRaise, irq
        ];
        assert_eq!(out, want);
    }

    #[test]
    fn oversized_entries_are_refused_and_leave_the_buffer_alone() {
        let f = Frame::Entry(LogEntry {
            seq: 0,
            point: ExecPoint::default(),
            kind: EntryKind::RxFrame {
                queue: 0,
                bytes: vec![0; MAX_FRAME_LEN as usize],
            },
        });
        let mut out = vec![1, 2, 3];
        let e = encode_frame(&f, &mut out).unwrap_err();
        assert!(matches!(e, LogError::FrameTooLarge { len, .. } if len > MAX_FRAME_LEN.into()));
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn eof_inside_a_head_or_payload_says_what_was_missing() {
        let at = FramePos {
            index: 4,
            offset: 100,
        };
        assert!(check_eof(&[], at).is_ok());
        let e = check_eof(&[1, 0], at).unwrap_err();
        assert!(matches!(e, LogError::Truncated { at: a, expected: 8, present: 2 } if a == at));
        let e = check_eof(&[5, 0, 0, 0, 0, 0, 0, 0, 9], at).unwrap_err();
        assert!(matches!(
            e,
            LogError::Truncated {
                expected: 13,
                present: 9,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "log truncated in frame 4 at byte 100: expected 13 bytes, 9 present"
        );
    }
}
