//! What both fault-tolerance roles are configured with besides the VM, and
//! the channel and heartbeat settings derived from it.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use ftlog::ChannelConfig;

use crate::heartbeat::{Heartbeat, HeartbeatConfig, Role};
use crate::net::NetOptions;

/// What both roles need besides the VM.
#[derive(Debug, Clone)]
pub struct FtOptions {
    /// Shared key for the channel handshake.
    pub key: Vec<u8>,
    /// Shared directory for the arbiter.
    pub arbiter: PathBuf,
    /// This node's id for the arbiter.
    pub node_id: String,
    /// Where console output goes, by offset.
    pub console: PathBuf,
    /// How long the peer may be silent before it counts as dead.
    pub peer_timeout: Duration,
    /// Host time between state digests in the log.
    pub digest_every: Duration,
    /// How many log entries the backup's replay may lag behind before the
    /// primary is slowed (None: the channel's default).
    pub lag_bound: Option<u64>,
    /// UDP heartbeats: (local address, peer address); None: the channel's
    /// keepalives alone detect a dead peer.
    pub heartbeat: Option<(String, String)>,
    /// Silence after which heartbeats declare the peer dead.
    pub heartbeat_timeout: Duration,
    /// How far behind (host time) the backup's replay may fall before the
    /// primary is slowed.
    pub lag_time_bound: Duration,
    /// The guest's network device and the TAP the live side uses.
    pub net: Option<NetOptions>,
    /// How long a booting primary waits for its backup to listen before it
    /// boots alone (the backup then joins the running guest).
    pub backup_wait: Duration,
    /// A backup that went live: where a new backup listens, so redundancy
    /// is restored (None: it runs alone for good).
    pub rejoin: Option<String>,
}

impl FtOptions {
    /// The logging channel's settings.
    pub fn channel_config(&self) -> ChannelConfig {
        let mut c = ChannelConfig::new(self.key.clone());
        c.peer_timeout = self.peer_timeout;
        if let Some(b) = self.lag_bound {
            c.lag_bound = b;
        }
        c
    }

    /// How long the primary stays throttled by the lag bound before it
    /// declares the backup dead: the lag bound plus the peer timeout. While
    /// the primary is throttled it produces nothing new, so a backup that
    /// was at most the lag bound behind catches up within about the lag
    /// bound; one that has not after the peer timeout more is stuck (or far
    /// too slow for a failover to finish in time) and as good as dead.
    pub fn throttle_limit(&self) -> Duration {
        self.lag_time_bound + self.peer_timeout
    }

    /// UDP heartbeats to the peer for the pairing `generation`, if
    /// configured. A heartbeat path that cannot be set up is a warning: the
    /// channel's keepalives still detect a dead peer.
    pub fn heartbeat(&self, role: Role, generation: u64) -> Result<Option<Heartbeat>> {
        let Some((local, peer)) = &self.heartbeat else {
            return Ok(None);
        };
        let mut cfg = HeartbeatConfig::new(role, generation);
        cfg.timeout = self.heartbeat_timeout.max(cfg.interval * 2);
        Ok(Heartbeat::bind(resolve(local)?, resolve(peer)?, cfg)
            .map_err(|e| tracing::warn!("no UDP heartbeats ({e}); relying on the logging channel"))
            .ok())
    }
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))
}
