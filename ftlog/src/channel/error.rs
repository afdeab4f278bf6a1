//! What can go wrong on the logging channel.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ExecBackend, LogError};

/// Why a backup refused a primary in the handshake. The backup sends it to
/// the primary before closing, so both sides report the same reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The primary's HMAC over the handshake does not verify with the
    /// backup's key: the two were given different shared keys (or the
    /// primary is a stranger).
    WrongKey,
    /// The two sides speak different channel protocol versions.
    Version {
        /// The primary's version.
        primary: u32,
        /// The backup's version.
        backup: u32,
    },
    /// The two sides count execution points with different backends.
    Backend {
        /// The primary's backend.
        primary: ExecBackend,
        /// The backend the backup was started with.
        backup: ExecBackend,
    },
    /// The primary booted another guest image than the backup has.
    Image {
        /// The primary's image digest.
        primary: [u8; 32],
        /// The backup's image digest.
        backup: [u8; 32],
    },
    /// The primary offers a pairing generation that is already decided (or
    /// older than one that is) in the backup's arbiter directory: it
    /// belongs to an earlier pairing, or the two sides were given different
    /// arbiter directories.
    Generation {
        /// The generation the primary offered.
        offered: u64,
        /// The latest generation decided in the backup's arbiter.
        latest_decided: u64,
    },
    /// The backup is already paired with a primary and replaying its log.
    Busy {
        /// The generation of the pairing it serves.
        generation: u64,
    },
}

/// The first bytes of a digest in hex, enough to tell two apart.
fn short_hex(d: &[u8; 32]) -> String {
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::WrongKey => f.write_str(
                "wrong shared key: the primary's handshake MAC does not verify with the backup's key",
            ),
            Refusal::Version { primary, backup } => write!(
                f,
                "protocol version mismatch: the primary speaks channel protocol version {primary}, \
                 the backup speaks version {backup}"
            ),
            Refusal::Backend { primary, backup } => write!(
                f,
                "execution-point backend mismatch: the primary uses {primary}, the backup uses {backup}"
            ),
            Refusal::Image { primary, backup } => write!(
                f,
                "guest image mismatch: the primary booted image {}.., the backup has image {}..",
                short_hex(primary),
                short_hex(backup)
            ),
            Refusal::Generation {
                offered,
                latest_decided,
            } => write!(
                f,
                "pairing generation mismatch: the primary offers generation {offered}, but \
                 generation {latest_decided} is already decided in the backup's arbiter \
                 directory (the primary belongs to an older pairing, or the two sides use \
                 different arbiter directories)"
            ),
            Refusal::Busy { generation } => write!(
                f,
                "the backup is busy: it is already paired with a primary (generation {generation})"
            ),
        }
    }
}

/// Everything that can go wrong on the logging channel.
///
/// Cloneable, so that the one fatal error of a channel can be reported to
/// every thread waiting on it (vCPU, output thread, replayer).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChannelError {
    /// Could not connect to, or listen on, an address.
    #[error("logging channel: cannot {action} {addr}: {source}")]
    Connect {
        /// "connect to" or "listen on".
        action: &'static str,
        /// The address.
        addr: String,
        /// What the OS said.
        source: Arc<io::Error>,
    },

    /// A socket operation failed (other than the peer closing it).
    #[error("logging channel I/O error while {during}: {source}")]
    Io {
        /// What the channel was doing.
        during: &'static str,
        /// What the OS said.
        source: Arc<io::Error>,
    },

    /// A frame was damaged or broke the log's rules: checksum mismatch,
    /// truncation, oversized or undecodable frame, an entry out of
    /// sequence or going back in time. Names the frame.
    #[error("logging channel: {0}")]
    Log(Arc<LogError>),

    /// The peer does not speak this protocol at all.
    #[error("not an ftvmm logging channel: the peer sent {found:02x?}, not \"FTVMMCHN\"")]
    NotAChannel {
        /// The first eight bytes it sent.
        found: [u8; 8],
    },

    /// Primary side: the backup refused this primary.
    #[error("the backup refused the connection: {0}")]
    Refused(Refusal),

    /// Backup side: this backup refused the primary (and told it why).
    #[error("refused the primary: {0}")]
    Rejected(Refusal),

    /// Primary side: the peer accepted our proof but could not prove it
    /// holds the shared key itself: it is not our backup.
    #[error(
        "the backup failed to prove it holds the shared key: its handshake MAC does not verify"
    )]
    BackupAuth,

    /// The peer sent a message that has no place at this point.
    #[error("logging channel protocol violation: {0}")]
    Protocol(String),

    /// The peer closed the connection without the closing handshake (a
    /// dead or killed process, a reset connection).
    #[error("the peer closed the logging channel without closing it properly ({detail})")]
    PeerClosed {
        /// How it was noticed.
        detail: String,
    },

    /// The peer stopped talking: no frame, or no acknowledgement for
    /// outstanding entries, within the configured timeout.
    #[error("logging channel peer timed out: {what} for {waited:?}")]
    PeerTimeout {
        /// What did not arrive.
        what: String,
        /// How long it was waited for.
        waited: Duration,
    },

    /// The peer hit a fatal error and said so before closing.
    #[error("the peer aborted the logging channel: {reason}")]
    PeerAborted {
        /// The peer's error message.
        reason: String,
    },

    /// This side declared the peer dead although its connection is up (its
    /// heartbeats stopped, its replay made no progress): the channel was
    /// cut on purpose and the peer was told why.
    #[error("declared the peer dead: {reason}")]
    DeclaredDead {
        /// Why.
        reason: String,
    },

    /// The caller handed the sender an entry that breaks the log's order
    /// (seq not the next one, point count going down); nothing was sent.
    #[error("refused to send entry: {0}")]
    BadEntry(String),

    /// This side already closed the channel.
    #[error("the logging channel is closed")]
    Closed,

    /// Invalid local configuration.
    #[error("invalid logging channel configuration: {0}")]
    Config(String),
}

impl ChannelError {
    /// Wrap an I/O error, telling a peer that went away from other
    /// failures.
    pub(crate) fn io(during: &'static str, e: io::Error) -> Self {
        use io::ErrorKind::*;
        match e.kind() {
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => {
                ChannelError::PeerClosed {
                    detail: format!("{e} while {during}"),
                }
            }
            _ => ChannelError::Io {
                during,
                source: Arc::new(e),
            },
        }
    }

    /// Whether this error means the peer is gone or silent (as opposed to
    /// a bad stream, a refusal or a local problem): the cases a failover
    /// decision starts from.
    pub fn is_peer_death(&self) -> bool {
        matches!(
            self,
            ChannelError::PeerClosed { .. }
                | ChannelError::PeerTimeout { .. }
                | ChannelError::PeerAborted { .. }
                | ChannelError::DeclaredDead { .. }
        )
    }

    /// What to tell the peer in an `Abort` before closing, when this side
    /// ends the channel for a reason of its own (a damaged stream, a
    /// protocol violation, declaring the peer dead). None when the peer is
    /// the one that went away: there is nobody to tell.
    pub(crate) fn abort_reason(&self) -> Option<String> {
        match self {
            // A silent peer may still be listening: tell it, in case.
            ChannelError::PeerClosed { .. } | ChannelError::PeerAborted { .. } => None,
            ChannelError::DeclaredDead { reason } => Some(reason.clone()),
            e => Some(e.to_string()),
        }
    }

    /// The log-format error inside, if this is one.
    pub fn log_error(&self) -> Option<&LogError> {
        match self {
            ChannelError::Log(e) => Some(e),
            _ => None,
        }
    }
}

impl From<LogError> for ChannelError {
    fn from(e: LogError) -> Self {
        ChannelError::Log(Arc::new(e))
    }
}
