//! The logging channel: a primary streams its log to a backup over TCP.
//!
//! The primary connects ([`PrimarySender::connect`]), the backup accepts
//! ([`BackupListener::accept`]). After a mutually authenticated handshake
//! (protocol version, execution-point backend, guest image digest, an
//! HMAC-SHA256 challenge-response over a shared key) the primary sends the
//! [`LogHeader`](crate::LogHeader) and then entries; the backup acknowledges
//! every batch it reads with the highest seq received and the highest seq
//! its replayer reported executed. `docs/channel.md` describes the wire
//! protocol and the guarantees.
//!
//! Both ends are synchronous APIs for plain threads (the vCPU thread, a
//! replay thread, an output thread). Each end runs its socket I/O on a
//! private one-worker tokio runtime, so the vCPU thread never blocks on the
//! network except where the API says so (a full window, [`PrimarySender::throttle`],
//! [`PrimarySender::flush`], the waits). Do not call the blocking methods from
//! inside an async task: use `spawn_blocking`.

mod backup;
mod error;
pub mod inspect;
mod primary;
mod wire;

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use backup::{BackupExpect, BackupListener, BackupReceiver, BusyListener};
pub use error::{ChannelError, Refusal};

pub use primary::{ChannelStats, PrimarySender};
pub use wire::{CHANNEL_MAGIC, CHANNEL_PREAMBLE_LEN, PRE_AUTH_FRAME_LEN, PROTOCOL_VERSION};

/// Settings both ends use. Build with [`ChannelConfig::new`] and adjust
/// the fields.
#[derive(Clone)]
pub struct ChannelConfig {
    /// The shared secret both sides prove knowledge of. Never sent; use 32
    /// random bytes.
    pub key: Vec<u8>,
    /// Primary: most entries sent but not yet acknowledged as received;
    /// [`PrimarySender::send`] blocks (the vCPU stalls) while this many
    /// are outstanding. Default 4096.
    pub window: u64,
    /// Primary: the execution-lag bound, in entries: [`PrimarySender::throttle`]
    /// blocks while more than this many sent entries are not yet reported
    /// executed by the backup. Default 10 000, about one second of a busy
    /// guest (1 kHz timer plus the reads it triggers and some I/O).
    pub lag_bound: u64,
    /// Both: a side with nothing to send for this long sends a keepalive
    /// (the backup's keepalive is a repeated ack). Default 100 ms.
    pub keepalive_interval: Duration,
    /// Both: the peer is declared dead ([`ChannelError::PeerTimeout`]) if
    /// nothing arrives from it for this long, or (primary) if entries are
    /// outstanding and no ack advances for this long. Default 2 s.
    pub peer_timeout: Duration,
    /// Both: the whole handshake must finish within this. Default 5 s.
    pub handshake_timeout: Duration,
    /// The channel protocol version this side speaks. Leave it at
    /// [`PROTOCOL_VERSION`]; it is a field so that tests can exercise the
    /// version refusal.
    pub protocol_version: u32,
    /// Primary: the pairing generation it offers in the handshake (the FT
    /// control plane takes it from the arbiter; at least 1). The backup
    /// learns it from the handshake ([`BackupReceiver::generation`]) and
    /// decides whether to accept it with
    /// [`BackupListener::with_generation_check`]. Default 1.
    pub generation: u64,
}

impl ChannelConfig {
    /// The defaults, with this shared key.
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        ChannelConfig {
            key: key.into(),
            window: 4096,
            lag_bound: 10_000,
            keepalive_interval: Duration::from_millis(100),
            peer_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            protocol_version: PROTOCOL_VERSION,
            generation: 1,
        }
    }

    /// Backup: most entries it holds received but not yet taken by the
    /// replayer; at this many it stops reading the socket, so TCP
    /// backpressure reaches the primary. A primary that throttles at the
    /// same `lag_bound` never gets there: it holds at most `lag_bound`
    /// entries unexecuted, and at most `window` more are unacknowledged.
    pub fn queue_limit(&self) -> usize {
        usize::try_from(self.window.saturating_add(self.lag_bound)).unwrap_or(usize::MAX)
    }

    /// Check the settings make sense together.
    pub fn validate(&self) -> Result<(), ChannelError> {
        if self.key.is_empty() {
            return Err(ChannelError::Config("the shared key is empty".into()));
        }
        if self.window == 0 {
            return Err(ChannelError::Config(
                "the window must allow at least one entry".into(),
            ));
        }
        if self.lag_bound == 0 {
            return Err(ChannelError::Config(
                "the lag bound must allow at least one entry".into(),
            ));
        }
        if self.keepalive_interval.is_zero() || self.keepalive_interval >= self.peer_timeout {
            return Err(ChannelError::Config(format!(
                "the keepalive interval ({:?}) must be non-zero and shorter than the peer timeout ({:?})",
                self.keepalive_interval, self.peer_timeout
            )));
        }
        if self.handshake_timeout.is_zero() {
            return Err(ChannelError::Config("the handshake timeout is zero".into()));
        }
        if self.generation == 0 {
            return Err(ChannelError::Config(
                "the pairing generation must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for ChannelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelConfig")
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .field("window", &self.window)
            .field("lag_bound", &self.lag_bound)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("peer_timeout", &self.peer_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("protocol_version", &self.protocol_version)
            .field("generation", &self.generation)
            .finish()
    }
}

/// A part of a joining primary's state, as the backup receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinPart {
    /// Guest RAM from page `first` on (4 KiB pages); a later copy of a
    /// page replaces an earlier one.
    Pages {
        /// The first page's number (guest-physical address / 4096).
        first: u64,
        /// Whole pages.
        data: Vec<u8>,
    },
    /// The VM's state at the join point (opaque to the channel); the last
    /// part, after every page.
    State(Vec<u8>),
}

/// What the backup has acknowledged: the highest seq it received and the
/// highest its replayer executed (None: nothing yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acks {
    /// Highest seq received by the backup (all lower ones too).
    pub received: Option<u64>,
    /// Highest seq the backup's replayer reported executed.
    pub executed: Option<u64>,
}

impl Acks {
    /// Whether entry `seq` is acknowledged as received.
    pub fn has_received(&self, seq: u64) -> bool {
        self.received.is_some_and(|r| r >= seq)
    }
}

/// Entries covered by "up to seq `s`": s + 1, or 0 for None.
fn count(s: Option<u64>) -> u64 {
    s.map_or(0, |s| s.saturating_add(1))
}

/// Lock, ignoring poisoning: the state stays consistent because no code
/// holding these locks can panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A private one-worker runtime for one channel end.
fn runtime() -> Result<tokio::runtime::Runtime, ChannelError> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(ChannelError::Config(
            "the logging channel's blocking API was called from inside an async runtime; \
             call it from a plain thread or spawn_blocking"
                .into(),
        ));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ftlog-channel")
        .enable_all()
        .build()
        .map_err(|e| ChannelError::io("starting the channel's I/O runtime", e))
}

/// A quarter of the peer timeout, at least 5 ms: how often the primary checks its timers.
fn tick(peer_timeout: Duration) -> Duration {
    (peer_timeout / 4).max(Duration::from_millis(5))
}
