//! The ftvmm replay log.
//!
//! A primary records every non-deterministic input of its guest as a
//! [`LogEntry`] tagged with the [`ExecPoint`] where it happened; a backup
//! replays the entries to reach the identical state. This crate holds the
//! entry types, their versioned and checksummed framing ([`codec`]), and a
//! blocking [`LogWriter`] / [`LogReader`] pair that works over anything that
//! is `Write` / `Read` (files, TCP sockets). The wire layout is described in
//! `docs/log-format.md`.

pub mod blob;
pub mod channel;
pub mod codec;
mod entry;
mod error;
mod header;
mod point;
mod stream;

pub use channel::{
    Acks, BackupExpect, BackupListener, BackupReceiver, BusyListener, ChannelConfig, ChannelError,
    ChannelStats, JoinPart, PrimarySender, Refusal,
};
pub use codec::{Frame, FramePos};
pub use entry::{EndReason, EntryKind, LogEntry, OutputStream};
pub use error::LogError;
pub use header::{CpuidEntry, DigestKind, LogHeader};
pub use point::{ExecBackend, ExecPoint};
pub use stream::{LogReader, LogWriter};
