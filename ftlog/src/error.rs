//! The crate's error type.

use std::io;

use crate::codec::{FramePos, MAGIC, PREAMBLE_LEN};
use crate::ExecPoint;

/// Everything that can go wrong writing or reading a log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The underlying reader or writer failed.
    #[error("log I/O error: {0}")]
    Io(#[from] io::Error),

    /// The stream does not start with [`MAGIC`].
    #[error("not an ftvmm log: it starts with {found:02x?}, not {MAGIC:02x?} (\"FTVMMLOG\")")]
    BadMagic {
        /// The first eight bytes of the stream.
        found: [u8; 8],
    },

    /// The stream's format version is one this build cannot read.
    #[error("unsupported log format version {found}: this build reads versions {min} to {max}")]
    UnsupportedVersion {
        /// The version in the stream.
        found: u32,
        /// Oldest version this build reads.
        min: u32,
        /// Newest version this build reads (and the one it writes).
        max: u32,
    },

    /// The stream ended inside its preamble.
    #[error("log truncated in its {PREAMBLE_LEN}-byte preamble: {present} bytes present")]
    TruncatedPreamble {
        /// Bytes there were.
        present: usize,
    },

    /// The stream ended inside a frame.
    #[error("log truncated in {at}: expected {expected} bytes, {present} present")]
    Truncated {
        /// The cut frame.
        at: FramePos,
        /// Bytes the frame needs (its 8-byte head, then the head's length).
        expected: u64,
        /// Bytes there were.
        present: u64,
    },

    /// A frame claims more bytes than the stream has, but the entry after
    /// it starts inside them: the length field is damaged (not a stream
    /// cut in the middle of its last frame).
    #[error(
        "damaged length in {at}: it claims {claimed} bytes, but the next entry starts at byte {next_at}"
    )]
    DamagedLength {
        /// The damaged frame.
        at: FramePos,
        /// Bytes the damaged head claims (head included).
        claimed: u64,
        /// Where the next entry's frame starts.
        next_at: u64,
    },

    /// A frame's payload does not match its CRC-32.
    #[error("checksum mismatch in {at}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The damaged frame.
        at: FramePos,
        /// The CRC in the frame head.
        stored: u32,
        /// The CRC of the payload as read.
        computed: u32,
    },

    /// A frame claims (or would need) a payload over the limit.
    #[error("{at} has a {len}-byte payload, over the {max}-byte frame limit")]
    FrameTooLarge {
        /// The frame.
        at: FramePos,
        /// Its payload length.
        len: u64,
        /// [`crate::codec::MAX_FRAME_LEN`].
        max: u32,
    },

    /// A frame's checksum is right but its payload is not a frame.
    #[error("undecodable payload in {at}: {reason}")]
    Decode {
        /// The frame.
        at: FramePos,
        /// What the decoder said.
        reason: String,
    },

    /// A value could not be encoded.
    #[error("cannot encode {at}: {reason}")]
    Encode {
        /// Where it would have gone.
        at: FramePos,
        /// What the encoder said.
        reason: String,
    },

    /// The stream ended cleanly before its header frame.
    #[error("log has no header: the stream ends at byte {offset}")]
    MissingHeader {
        /// Where it ended.
        offset: u64,
    },

    /// A frame of the wrong type (a second header, an entry first).
    #[error("unexpected frame in {at}: expected {expected}, found {found}")]
    UnexpectedFrame {
        /// The frame.
        at: FramePos,
        /// What belonged there.
        expected: &'static str,
        /// What was there.
        found: &'static str,
    },

    /// An entry's sequence number is not the previous one plus one.
    #[error("entry out of sequence in {at}: expected seq {expected}, found {found}")]
    Sequence {
        /// The entry's frame.
        at: FramePos,
        /// The next sequence number.
        expected: u64,
        /// The entry's.
        found: u64,
    },

    /// An entry's point count is below its predecessor's.
    #[error("entry {seq} in {at} goes back in time: point {point} after {prev}")]
    PointBackwards {
        /// The entry's frame.
        at: FramePos,
        /// The entry's sequence number.
        seq: u64,
        /// The previous entry's point.
        prev: ExecPoint,
        /// The entry's point.
        point: ExecPoint,
    },

    /// An earlier write failed, so the stream may end inside a frame and
    /// nothing may be appended to it.
    #[error("the log writer failed earlier; its stream may end inside a frame")]
    WriterBroken,

    /// Not one of `pmu`, `singlestep`, `exits`.
    #[error("unknown execution-point backend {0:?}: expected pmu, singlestep or exits")]
    UnknownBackend(String),
}
