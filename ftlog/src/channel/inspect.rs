//! Looking at channel frames from outside the channel: what kind of message
//! a frame holds, the entry or acks inside it, and a freshly framed `Ack`.
//!
//! For test tools that sit on the wire between a primary and a backup (the
//! failure-injection relay in `ftvmm::testkit::relay`): they count entries,
//! cut or truncate the stream at a chosen entry, and rewrite acks. Nothing
//! here is used by the channel itself, and the channel's message type stays
//! private: these functions are the stable view of it.
//!
//! After the 12-byte preamble each direction is a sequence of frames: u32 LE
//! payload length, u32 LE CRC-32 of the payload, then the payload
//! (docs/channel.md).

use super::wire::{encode_msg, Msg};
use crate::codec::{decode_value, FRAME_HEAD_LEN, MAX_FRAME_LEN};
use crate::{FramePos, LogEntry};

pub use super::Acks;

/// Bytes in a frame's head (length and checksum).
pub const FRAME_HEAD: usize = FRAME_HEAD_LEN;

/// The largest payload a frame may announce.
pub const MAX_PAYLOAD: u32 = MAX_FRAME_LEN;

/// What a channel message is, by name (docs/channel.md's message table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MsgKind {
    /// Primary → backup: who the primary is.
    Hello,
    /// Backup → primary: the backup's nonce.
    Challenge,
    /// Primary → backup: the primary's proof of the key.
    Auth,
    /// Backup → primary: accepted.
    Welcome,
    /// Backup → primary: refused.
    Refuse,
    /// Primary → backup: the log header.
    Header,
    /// Primary → backup: one log entry.
    Entry,
    /// Primary → backup: still alive.
    Keepalive,
    /// Backup → primary: received and executed.
    Ack,
    /// Either way: a clean close.
    Close,
    /// Either way: a fatal error.
    Abort,
    /// Primary → backup: outputs released up to a seq.
    Released,
    /// Primary → backup, joining: guest pages.
    Pages,
    /// Primary → backup, joining: the state at the join point.
    JoinState,
}

impl MsgKind {
    fn of(msg: &Msg) -> MsgKind {
        match msg {
            Msg::Hello { .. } => MsgKind::Hello,
            Msg::Challenge { .. } => MsgKind::Challenge,
            Msg::Auth { .. } => MsgKind::Auth,
            Msg::Welcome { .. } => MsgKind::Welcome,
            Msg::Refuse(_) => MsgKind::Refuse,
            Msg::Header(_) => MsgKind::Header,
            Msg::Entry(_) => MsgKind::Entry,
            Msg::Keepalive => MsgKind::Keepalive,
            Msg::Ack { .. } => MsgKind::Ack,
            Msg::Close => MsgKind::Close,
            Msg::Abort { .. } => MsgKind::Abort,
            Msg::Released { .. } => MsgKind::Released,
            Msg::Pages { .. } => MsgKind::Pages,
            Msg::JoinState { .. } => MsgKind::JoinState,
        }
    }
}

/// The length of the whole frame (head and payload) that starts `buf`, once
/// its head is there; None while fewer than [`FRAME_HEAD`] bytes are.
/// The length may exceed [`MAX_PAYLOAD`]: the caller decides what to do
/// with such a frame (the channel refuses it).
pub fn frame_len(buf: &[u8]) -> Option<u64> {
    let head = buf.get(..FRAME_HEAD)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    Some(FRAME_HEAD as u64 + u64::from(len))
}

/// The payload of the complete frame `frame`, if its checksum holds.
pub fn payload(frame: &[u8]) -> Option<&[u8]> {
    let len = usize::try_from(frame_len(frame)?).ok()?;
    let body = frame.get(FRAME_HEAD..len)?;
    let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
    (crc32fast::hash(body) == crc).then_some(body)
}

fn decode(frame: &[u8]) -> Option<Msg> {
    decode_value(payload(frame)?).ok()
}

/// The kind of message in the complete frame `frame`; None if the frame is
/// damaged or holds no message this build knows.
pub fn kind(frame: &[u8]) -> Option<MsgKind> {
    decode(frame).map(|m| MsgKind::of(&m))
}

/// The log entry in an `Entry` frame.
pub fn entry(frame: &[u8]) -> Option<LogEntry> {
    match decode(frame)? {
        Msg::Entry(e) => Some(e),
        _ => None,
    }
}

/// The acks in an `Ack` frame.
pub fn acks(frame: &[u8]) -> Option<Acks> {
    match decode(frame)? {
        Msg::Ack { received, executed } => Some(Acks { received, executed }),
        _ => None,
    }
}

/// A complete `Ack` frame carrying `acks`.
pub fn ack_frame(acks: Acks) -> Vec<u8> {
    let msg = Msg::Ack {
        received: acks.received,
        executed: acks.executed,
    };
    let mut out = Vec::new();
    // An ack is a few bytes: it always fits a frame and always encodes.
    if encode_msg(&msg, &mut out, FramePos::default()).is_err() {
        out.clear();
    }
    out
}

/// A frame head announcing a payload of `len` bytes (the checksum of an
/// empty payload): for tests that send a stranger's oversized frame.
pub fn frame_head(len: u32) -> [u8; FRAME_HEAD] {
    let mut h = [0u8; FRAME_HEAD];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..].copy_from_slice(&crc32fast::hash(&[]).to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EntryKind, ExecPoint};

    fn framed(msg: &Msg) -> Vec<u8> {
        let mut out = Vec::new();
        encode_msg(msg, &mut out, FramePos::default()).unwrap();
        out
    }

    #[test]
    fn kinds_entries_and_acks_are_read_back() {
        let e = LogEntry {
            seq: 7,
            point: ExecPoint {
                count: 3,
                rip: 0x1000,
                rcx: 0,
            },
            kind: EntryKind::IrqRaise { irq: 0 },
        };
        let f = framed(&Msg::Entry(e.clone()));
        assert_eq!(frame_len(&f), Some(f.len() as u64));
        assert_eq!(kind(&f), Some(MsgKind::Entry));
        assert_eq!(entry(&f), Some(e));
        assert_eq!(acks(&f), None);
        assert_eq!(kind(&framed(&Msg::Keepalive)), Some(MsgKind::Keepalive));
        assert_eq!(kind(&framed(&Msg::Close)), Some(MsgKind::Close));

        let a = Acks {
            received: Some(9),
            executed: Some(4),
        };
        let f = ack_frame(a);
        assert_eq!(
            f,
            framed(&Msg::Ack {
                received: Some(9),
                executed: Some(4)
            })
        );
        assert_eq!(kind(&f), Some(MsgKind::Ack));
        assert_eq!(acks(&f), Some(a));
    }

    #[test]
    fn partial_and_damaged_frames_are_not_decoded() {
        let f = framed(&Msg::Keepalive);
        assert_eq!(frame_len(&f[..FRAME_HEAD - 1]), None);
        assert_eq!(kind(&f[..f.len() - 1]), None);
        let mut bad = f.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(kind(&bad), None);
        let head = frame_head(16 << 20);
        assert_eq!(frame_len(&head), Some(FRAME_HEAD as u64 + (16 << 20)));
    }
}
