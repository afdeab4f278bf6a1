//! UDP heartbeats between primary and backup, and a failure detector.
//!
//! Each side runs one [`Heartbeat`]: a thread that sends a small datagram to
//! the peer every `interval` and receives the peer's datagrams on the same
//! socket. Only a well-formed datagram with our magic, version and
//! generation, sent by the *other* role, counts as a sign of life; anything
//! else is counted in [`HeartbeatStats`] and otherwise ignored.
//!
//! The peer is declared dead once it has been silent for `timeout`
//! ([`Heartbeat::is_alive`], [`Heartbeat::wait_dead`]). Silence is measured
//! from the last valid datagram, or from [`Heartbeat::start`] if none has
//! arrived yet, so a peer that never shows up is declared dead after
//! `timeout` too.
//!
//! Heartbeats are not authenticated: a forged datagram can only make a dead
//! peer look alive (delaying failover). Going live is decided by the arbiter,
//! never by heartbeats alone.
//!
//! Wire format (40 bytes, big-endian):
//!
//! | bytes  | field                                    |
//! |--------|------------------------------------------|
//! | 0..4   | magic `FTHB`                             |
//! | 4      | version (1)                              |
//! | 5      | sender role (1 primary, 2 backup)        |
//! | 6..8   | reserved, zero                           |
//! | 8..16  | generation                               |
//! | 16..24 | sequence number (1, 2, ... per sender)   |
//! | 24..32 | sender's log position (0 if unused)      |
//! | 32..40 | FNV-1a 64 of bytes 0..32                 |

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// First bytes of every heartbeat datagram.
pub const MAGIC: [u8; 4] = *b"FTHB";
/// Wire format version.
pub const VERSION: u8 = 1;
/// Size of a heartbeat datagram.
pub const DATAGRAM_LEN: usize = 40;
/// Default time between heartbeats.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);
/// Default silence after which the peer is declared dead.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest the worker blocks in `recv` before checking for shutdown.
const RECV_POLL: Duration = Duration::from_millis(50);
/// Longest [`Heartbeat::wait_dead`] sleeps before re-checking.
const WAIT_POLL: Duration = Duration::from_millis(10);

/// Errors from starting heartbeats.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// Interval/timeout make no sense.
    #[error("invalid heartbeat configuration: {0}")]
    InvalidConfig(String),
    /// The UDP socket could not be bound.
    #[error("heartbeat: cannot bind UDP {addr}: {source}")]
    Bind {
        /// The requested local address.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// A socket operation failed while setting up.
    #[error("heartbeat: {op}: {source}")]
    Socket {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The heartbeat thread could not be started.
    #[error("heartbeat: cannot spawn thread: {0}")]
    Spawn(io::Error),
}

/// Which side of the pair a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Runs the guest and sends the log.
    Primary,
    /// Replays the log.
    Backup,
}

impl Role {
    /// The role of the other side.
    pub fn peer(self) -> Role {
        match self {
            Role::Primary => Role::Backup,
            Role::Backup => Role::Primary,
        }
    }

    fn code(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Backup => 2,
        }
    }

    fn from_code(code: u8) -> Option<Role> {
        match code {
            1 => Some(Role::Primary),
            2 => Some(Role::Backup),
            _ => None,
        }
    }
}

/// Settings for one [`Heartbeat`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// This node's role; only datagrams from the other role count.
    pub role: Role,
    /// The pairing's generation; datagrams of other generations are ignored.
    pub generation: u64,
    /// Time between our datagrams. Must be non-zero.
    pub interval: Duration,
    /// Silence after which the peer is dead. Must be at least 2 × interval.
    pub timeout: Duration,
}

impl HeartbeatConfig {
    /// [`DEFAULT_INTERVAL`] and [`DEFAULT_TIMEOUT`] for `role` in `generation`.
    pub fn new(role: Role, generation: u64) -> Self {
        HeartbeatConfig {
            role,
            generation,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Check interval and timeout.
    pub fn validate(&self) -> Result<(), HeartbeatError> {
        if self.interval.is_zero() {
            return Err(HeartbeatError::InvalidConfig(
                "interval must be non-zero".into(),
            ));
        }
        if self.timeout < self.interval.saturating_mul(2) {
            return Err(HeartbeatError::InvalidConfig(format!(
                "timeout {:?} must be at least twice the interval {:?}",
                self.timeout, self.interval
            )));
        }
        Ok(())
    }
}

/// One heartbeat datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    /// Sender's role.
    pub role: Role,
    /// Sender's generation.
    pub generation: u64,
    /// Sender's sequence number.
    pub seq: u64,
    /// Sender's log position (0 if unused).
    pub log_position: u64,
}

impl Datagram {
    /// Serialize to the wire format.
    pub fn encode(&self) -> [u8; DATAGRAM_LEN] {
        let mut b = [0u8; DATAGRAM_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.role.code();
        b[8..16].copy_from_slice(&self.generation.to_be_bytes());
        b[16..24].copy_from_slice(&self.seq.to_be_bytes());
        b[24..32].copy_from_slice(&self.log_position.to_be_bytes());
        let sum = fnv1a(&b[0..32]);
        b[32..40].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Parse the wire format; the error says why the bytes are garbage.
    pub fn decode(b: &[u8]) -> Result<Datagram, &'static str> {
        if b.len() != DATAGRAM_LEN {
            return Err("wrong length");
        }
        if b[0..4] != MAGIC {
            return Err("wrong magic");
        }
        if b[4] != VERSION {
            return Err("unknown version");
        }
        if b[6..8] != [0, 0] {
            return Err("reserved bytes set");
        }
        if b[32..40] != fnv1a(&b[0..32]).to_be_bytes() {
            return Err("bad checksum");
        }
        let role = Role::from_code(b[5]).ok_or("unknown role")?;
        Ok(Datagram {
            role,
            generation: be_u64(&b[8..16]),
            seq: be_u64(&b[16..24]),
            log_position: be_u64(&b[24..32]),
        })
    }
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Counters kept by a [`Heartbeat`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeartbeatStats {
    /// Datagrams sent.
    pub sent: u64,
    /// Failed sends (the thread keeps going).
    pub send_errors: u64,
    /// Failed receives other than timeouts.
    pub recv_errors: u64,
    /// Valid datagrams from the peer (these count as liveness).
    pub received: u64,
    /// Datagrams that are not heartbeats (length, magic, version, checksum...).
    pub garbage: u64,
    /// Well-formed heartbeats of another generation.
    pub wrong_generation: u64,
    /// Well-formed heartbeats of our generation from our own role.
    pub wrong_role: u64,
}

/// What we know about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStatus {
    /// Silent for less than the timeout.
    pub alive: bool,
    /// Time since the last valid datagram (or since start if none yet).
    pub silent_for: Duration,
    /// Whether any valid datagram has arrived.
    pub heard: bool,
    /// Highest sequence number received.
    pub last_seq: u64,
    /// Log position from the newest datagram.
    pub log_position: u64,
    /// Source address of the last valid datagram.
    pub from: Option<SocketAddr>,
}

/// Result of [`Heartbeat::wait_dead`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The peer has been silent for at least the timeout.
    PeerDead {
        /// How long it had been silent when noticed.
        silent_for: Duration,
    },
    /// The stop flag was set first.
    Stopped,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    send_errors: AtomicU64,
    recv_errors: AtomicU64,
    received: AtomicU64,
    garbage: AtomicU64,
    wrong_generation: AtomicU64,
    wrong_role: AtomicU64,
}

#[derive(Debug)]
struct PeerState {
    last: Option<Instant>,
    seq: u64,
    log_position: u64,
    from: Option<SocketAddr>,
}

#[derive(Debug)]
struct Shared {
    started: Instant,
    stop: AtomicBool,
    log_position: AtomicU64,
    counters: Counters,
    peer: Mutex<PeerState>,
}

impl Shared {
    fn peer(&self) -> MutexGuard<'_, PeerState> {
        // A poisoned lock only means a panic elsewhere; the data is plain.
        self.peer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn accept(&self, bytes: &[u8], from: SocketAddr, config: &HeartbeatConfig) {
        let bump = |c: &AtomicU64| c.fetch_add(1, Ordering::Relaxed);
        let d = match Datagram::decode(bytes) {
            Ok(d) => d,
            Err(why) => {
                bump(&self.counters.garbage);
                tracing::debug!(%from, len = bytes.len(), why, "heartbeat: ignored garbage");
                return;
            }
        };
        if d.generation != config.generation {
            bump(&self.counters.wrong_generation);
            tracing::debug!(%from, generation = d.generation, "heartbeat: ignored other generation");
            return;
        }
        if d.role != config.role.peer() {
            bump(&self.counters.wrong_role);
            tracing::debug!(%from, role = ?d.role, "heartbeat: ignored datagram from our own role");
            return;
        }
        bump(&self.counters.received);
        let mut p = self.peer();
        p.last = Some(Instant::now());
        if d.seq >= p.seq {
            // Reordered old datagrams still prove life but do not move
            // the sequence or log position backwards.
            p.seq = d.seq;
            p.log_position = d.log_position;
        }
        p.from = Some(from);
    }
}

/// A running heartbeat endpoint. Dropping it stops its thread.
#[derive(Debug)]
pub struct Heartbeat {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    local: SocketAddr,
    peer: SocketAddr,
    config: HeartbeatConfig,
}

impl Heartbeat {
    /// Bind `local` and start heartbeating with `peer`.
    pub fn bind(
        local: SocketAddr,
        peer: SocketAddr,
        config: HeartbeatConfig,
    ) -> Result<Heartbeat, HeartbeatError> {
        config.validate()?;
        let socket = UdpSocket::bind(local).map_err(|source| HeartbeatError::Bind {
            addr: local,
            source,
        })?;
        Self::start(socket, peer, config)
    }

    /// Start heartbeating on an already bound socket (useful with ephemeral
    /// ports: bind both sockets first, then start each with the other's
    /// address).
    pub fn start(
        socket: UdpSocket,
        peer: SocketAddr,
        config: HeartbeatConfig,
    ) -> Result<Heartbeat, HeartbeatError> {
        config.validate()?;
        let local = socket
            .local_addr()
            .map_err(|source| HeartbeatError::Socket {
                op: "local_addr",
                source,
            })?;
        socket
            .set_read_timeout(Some(RECV_POLL))
            .map_err(|source| HeartbeatError::Socket {
                op: "set_read_timeout",
                source,
            })?;
        let shared = Arc::new(Shared {
            started: Instant::now(),
            stop: AtomicBool::new(false),
            log_position: AtomicU64::new(0),
            counters: Counters::default(),
            peer: Mutex::new(PeerState {
                last: None,
                seq: 0,
                log_position: 0,
                from: None,
            }),
        });
        let worker = Arc::clone(&shared);
        let cfg = config.clone();
        let thread = std::thread::Builder::new()
            .name("ftvmm-heartbeat".into())
            .spawn(move || run(socket, peer, cfg, worker))
            .map_err(HeartbeatError::Spawn)?;
        tracing::info!(%local, %peer, role = ?config.role, generation = config.generation,
            interval = ?config.interval, timeout = ?config.timeout, "heartbeat started");
        Ok(Heartbeat {
            shared,
            thread: Some(thread),
            local,
            peer,
            config,
        })
    }

    /// The bound local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Where heartbeats are sent.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The configuration in use.
    pub fn config(&self) -> &HeartbeatConfig {
        &self.config
    }

    /// Set the log position carried by our next datagrams.
    pub fn set_log_position(&self, position: u64) {
        self.shared.log_position.store(position, Ordering::Relaxed);
    }

    /// Time since the last valid datagram from the peer (or since start).
    pub fn silence(&self) -> Duration {
        let last = self.shared.peer().last.unwrap_or(self.shared.started);
        last.elapsed()
    }

    /// Whether the peer has been heard within the configured timeout.
    pub fn is_alive(&self) -> bool {
        self.silence() < self.config.timeout
    }

    /// Snapshot of the peer's state.
    pub fn status(&self) -> PeerStatus {
        let p = self.shared.peer();
        let silent_for = p.last.unwrap_or(self.shared.started).elapsed();
        PeerStatus {
            alive: silent_for < self.config.timeout,
            silent_for,
            heard: p.last.is_some(),
            last_seq: p.seq,
            log_position: p.log_position,
            from: p.from,
        }
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> HeartbeatStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HeartbeatStats {
            sent: get(&c.sent),
            send_errors: get(&c.send_errors),
            recv_errors: get(&c.recv_errors),
            received: get(&c.received),
            garbage: get(&c.garbage),
            wrong_generation: get(&c.wrong_generation),
            wrong_role: get(&c.wrong_role),
        }
    }

    /// Block until the peer has been silent for the configured timeout, or
    /// until `stop` is set (checked every few milliseconds).
    pub fn wait_dead(&self, stop: &AtomicBool) -> WaitOutcome {
        loop {
            let silent_for = self.silence();
            if silent_for >= self.config.timeout {
                tracing::warn!(peer = %self.peer, ?silent_for, "heartbeat: peer is dead");
                return WaitOutcome::PeerDead { silent_for };
            }
            if stop.load(Ordering::Acquire) {
                return WaitOutcome::Stopped;
            }
            std::thread::sleep((self.config.timeout - silent_for).min(WAIT_POLL));
        }
    }

    /// Block until a valid datagram from the peer has arrived, for at most
    /// `within`. Returns whether the peer was heard.
    pub fn wait_heard(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.shared.peer().last.is_some() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::sleep((deadline - now).min(WAIT_POLL));
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("heartbeat thread panicked");
            }
        }
    }
}

impl Heartbeat {
    /// Keep beating, and call `on_dead` once, from a thread of its own, as
    /// soon as the peer has been silent for the timeout: so a death is
    /// noticed at once, whatever the caller is blocked in. Dropping the
    /// returned watch stops both.
    pub fn watch(self, on_dead: impl FnOnce(Duration) + Send + 'static) -> PeerWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            if let WaitOutcome::PeerDead { silent_for } = self.wait_dead(&s) {
                on_dead(silent_for);
            }
        });
        PeerWatch {
            stop,
            thread: Some(thread),
        }
    }
}

/// A [`Heartbeat`] watched by a thread (see [`Heartbeat::watch`]).
#[derive(Debug)]
pub struct PeerWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for PeerWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("heartbeat watch thread panicked");
            }
        }
    }
}

/// The worker: send every interval, receive in between, until stopped.
fn run(socket: UdpSocket, peer: SocketAddr, config: HeartbeatConfig, shared: Arc<Shared>) {
    let mut seq = 0u64;
    let mut next_send = Instant::now();
    // Larger than a heartbeat so oversized datagrams are seen as garbage.
    let mut buf = [0u8; 512];
    let mut last_timeout = RECV_POLL;
    while !shared.stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now >= next_send {
            seq += 1;
            let d = Datagram {
                role: config.role,
                generation: config.generation,
                seq,
                log_position: shared.log_position.load(Ordering::Relaxed),
            };
            match socket.send_to(&d.encode(), peer) {
                Ok(_) => {
                    shared.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let n = shared.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    if n.is_power_of_two() || n == 0 {
                        tracing::warn!(%peer, error = %e, errors = n + 1, "heartbeat: send failed");
                    }
                }
            }
            next_send += config.interval;
            if next_send <= now {
                // We fell behind (stalled host): do not burst to catch up.
                next_send = now + config.interval;
            }
        }
        let wait = next_send
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), RECV_POLL);
        if wait != last_timeout && socket.set_read_timeout(Some(wait)).is_ok() {
            last_timeout = wait;
        }
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => shared.accept(&buf[..n], from, &config),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                let n = shared.counters.recv_errors.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() || n == 0 {
                    tracing::warn!(error = %e, errors = n + 1, "heartbeat: receive failed");
                }
                // Errors such as ICMP-reported refusals: avoid spinning.
                std::thread::sleep(wait);
            }
        }
    }
    tracing::debug!(sent = seq, "heartbeat thread stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const INTERVAL: Duration = Duration::from_millis(20);
    const TIMEOUT: Duration = Duration::from_millis(300);
    /// Allowed lateness on a loaded test machine.
    const SLACK: Duration = Duration::from_millis(1000);

    /// Poll `cond` for up to 5 s (the worker may lag on a loaded machine).
    fn eventually(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        cond()
    }

    fn cfg(role: Role, generation: u64) -> HeartbeatConfig {
        HeartbeatConfig {
            role,
            generation,
            interval: INTERVAL,
            timeout: TIMEOUT,
        }
    }

    fn loopback_socket() -> UdpSocket {
        UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind loopback")
    }

    /// Two started endpoints pointed at each other.
    fn pair(a: HeartbeatConfig, b: HeartbeatConfig) -> (Heartbeat, Heartbeat) {
        let sa = loopback_socket();
        let sb = loopback_socket();
        let (aa, ba) = (
            sa.local_addr().expect("addr a"),
            sb.local_addr().expect("addr b"),
        );
        let ha = Heartbeat::start(sa, ba, a).expect("start a");
        let hb = Heartbeat::start(sb, aa, b).expect("start b");
        (ha, hb)
    }

    #[test]
    fn datagram_roundtrip_and_garbage() {
        let d = Datagram {
            role: Role::Backup,
            generation: 0x0102_0304_0506_0708,
            seq: 42,
            log_position: u64::MAX,
        };
        let bytes = d.encode();
        assert_eq!(&bytes[0..4], b"FTHB");
        assert_eq!(Datagram::decode(&bytes), Ok(d));
        assert_eq!(Datagram::decode(&bytes[..39]), Err("wrong length"));
        assert_eq!(
            Datagram::decode(&[bytes.as_slice(), &[0]].concat()),
            Err("wrong length")
        );
        let mutate = |i: usize, v: u8| {
            let mut b = bytes;
            b[i] = v;
            Datagram::decode(&b)
        };
        assert_eq!(mutate(0, b'X'), Err("wrong magic"));
        assert_eq!(mutate(4, 9), Err("unknown version"));
        assert_eq!(mutate(6, 1), Err("reserved bytes set"));
        assert_eq!(mutate(20, 0xff), Err("bad checksum"));
        assert_eq!(mutate(39, 0), Err("bad checksum"));
        // Unknown role with a valid checksum.
        let mut b = bytes;
        b[5] = 7;
        let sum = fnv1a(&b[0..32]).to_be_bytes();
        b[32..40].copy_from_slice(&sum);
        assert_eq!(Datagram::decode(&b), Err("unknown role"));
    }

    #[test]
    fn config_is_validated() {
        let mut c = cfg(Role::Primary, 1);
        c.interval = Duration::ZERO;
        assert!(matches!(
            c.validate(),
            Err(HeartbeatError::InvalidConfig(_))
        ));
        let mut c = cfg(Role::Primary, 1);
        c.timeout = c.interval;
        let err = Heartbeat::start(loopback_socket(), "127.0.0.1:9".parse().expect("addr"), c)
            .expect_err("timeout too short");
        assert!(err.to_string().contains("twice the interval"), "{err}");
        assert!(HeartbeatConfig::new(Role::Backup, 3).validate().is_ok());
        // Binding a port that is taken names the address.
        let taken = loopback_socket();
        let addr = taken.local_addr().expect("addr");
        let err = Heartbeat::bind(addr, addr, cfg(Role::Primary, 1)).expect_err("in use");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    #[test]
    fn two_endpoints_see_each_other_alive() {
        // A longer timeout here: a starved thread must not look like death.
        let long = |role| HeartbeatConfig {
            timeout: Duration::from_secs(1),
            ..cfg(role, 5)
        };
        let (a, b) = pair(long(Role::Primary), long(Role::Backup));
        b.set_log_position(1234);
        assert!(a.wait_heard(Duration::from_secs(5)), "a never heard b");
        assert!(b.wait_heard(Duration::from_secs(5)), "b never heard a");
        assert!(a.is_alive() && b.is_alive());
        // Stays alive over several timeouts: wait_dead must not fire.
        let stop = AtomicBool::new(false);
        let outcome = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(1500));
                stop.store(true, Ordering::Release);
            });
            a.wait_dead(&stop)
        });
        assert_eq!(outcome, WaitOutcome::Stopped);
        let st = a.status();
        assert!(st.alive && st.heard, "{st:?}");
        assert_eq!(st.log_position, 1234);
        assert_eq!(st.from, Some(b.local_addr()));
        assert!(st.last_seq >= 10, "{st:?}");
        let stats = a.stats();
        assert!(stats.received >= 10 && stats.sent >= 10, "{stats:?}");
        assert_eq!(
            (stats.garbage, stats.wrong_generation, stats.wrong_role),
            (0, 0, 0)
        );
    }

    #[test]
    fn death_is_detected_within_timeout() {
        let (a, b) = pair(cfg(Role::Backup, 9), cfg(Role::Primary, 9));
        assert!(a.wait_heard(Duration::from_secs(5)), "never heard");
        let silent_before = a.silence();
        let dropped = Instant::now();
        drop(b);
        let stop = AtomicBool::new(false);
        let outcome = a.wait_dead(&stop);
        let took = dropped.elapsed();
        let WaitOutcome::PeerDead { silent_for } = outcome else {
            panic!("expected death, got {outcome:?}");
        };
        assert!(silent_for >= TIMEOUT, "{silent_for:?}");
        // Silence is counted from the last datagram, which arrived no earlier
        // than `silent_before` before the drop.
        assert!(
            took + silent_before + Duration::from_millis(5) >= TIMEOUT,
            "declared dead too early: {took:?} (silent {silent_before:?} at drop)"
        );
        assert!(took <= TIMEOUT + SLACK, "detected too late: {took:?}");
        assert!(!a.is_alive());
        eprintln!("death detected {took:?} after drop (timeout {TIMEOUT:?})");
    }

    #[test]
    fn a_watch_reports_death_once_and_stops_when_dropped() {
        let (a, b) = pair(cfg(Role::Primary, 2), cfg(Role::Backup, 2));
        assert!(a.wait_heard(Duration::from_secs(5)), "never heard");
        let (tx, rx) = std::sync::mpsc::channel();
        let watch = a.watch(move |silent| {
            let _ = tx.send(silent);
        });
        assert!(rx.recv_timeout(TIMEOUT * 2).is_err(), "alive while b beats");
        let dropped = Instant::now();
        drop(b);
        let silent = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("death reported");
        assert!(silent >= TIMEOUT, "{silent:?}");
        assert!(
            dropped.elapsed() <= TIMEOUT + SLACK,
            "{:?}",
            dropped.elapsed()
        );
        let t = Instant::now();
        drop(watch);
        assert!(t.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn garbage_is_ignored_and_is_not_liveness() {
        let raw = loopback_socket();
        let raw_addr = raw.local_addr().expect("raw addr");
        let started = Instant::now();
        let a =
            Heartbeat::start(loopback_socket(), raw_addr, cfg(Role::Primary, 1)).expect("start");
        let target = a.local_addr();
        let good = |role, generation| {
            Datagram {
                role,
                generation,
                seq: 1,
                log_position: 0,
            }
            .encode()
        };
        let mut bad_magic = good(Role::Backup, 1);
        bad_magic[0] = b'X';
        let mut bad_sum = good(Role::Backup, 1);
        bad_sum[16] ^= 1;
        let junk: Vec<Vec<u8>> = vec![
            b"hello".to_vec(),
            Vec::new(),
            vec![0u8; 1000],
            bad_magic.to_vec(),
            bad_sum.to_vec(),
            [good(Role::Backup, 1).as_slice(), b"!"].concat(),
        ];
        let own_role = good(Role::Primary, 1);
        let stop = AtomicBool::new(false);
        let outcome = std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Acquire) {
                    for j in &junk {
                        let _ = raw.send_to(j, target);
                    }
                    let _ = raw.send_to(&own_role, target);
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            let outcome = a.wait_dead(&AtomicBool::new(false));
            let took = started.elapsed();
            // The worker may lag behind the sender on a loaded machine.
            let counted = eventually(|| {
                let st = a.stats();
                st.garbage >= 6 && st.wrong_role >= 1
            });
            stop.store(true, Ordering::Release);
            (outcome, took, counted)
        });
        let (outcome, took, counted) = outcome;
        assert!(
            matches!(outcome, WaitOutcome::PeerDead { .. }),
            "{outcome:?}"
        );
        assert!(took <= TIMEOUT + SLACK, "{took:?}");
        let stats = a.stats();
        assert!(counted, "{stats:?}");
        assert_eq!(stats.received, 0, "{stats:?}");
        let st = a.status();
        assert!(!st.heard && !st.alive, "{st:?}");
        // Our own heartbeats did reach the raw socket.
        let mut buf = [0u8; 64];
        raw.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let (n, from) = raw.recv_from(&mut buf).expect("heartbeat from a");
        assert_eq!(from, target);
        let d = Datagram::decode(&buf[..n]).expect("valid heartbeat");
        assert_eq!((d.role, d.generation), (Role::Primary, 1));
    }

    #[test]
    fn wrong_generation_is_ignored() {
        let started = Instant::now();
        let (a, b) = pair(cfg(Role::Primary, 1), cfg(Role::Backup, 2));
        let outcome = a.wait_dead(&AtomicBool::new(false));
        assert!(
            matches!(outcome, WaitOutcome::PeerDead { .. }),
            "{outcome:?}"
        );
        assert!(started.elapsed() <= TIMEOUT + SLACK);
        for h in [&a, &b] {
            assert!(
                eventually(|| h.stats().wrong_generation >= 3),
                "{:?}",
                h.stats()
            );
            assert_eq!(h.stats().received, 0, "{:?}", h.stats());
            assert!(!h.status().heard);
        }
    }

    #[test]
    fn drop_is_prompt_even_with_a_long_interval() {
        let c = HeartbeatConfig {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            ..cfg(Role::Primary, 1)
        };
        let h = Heartbeat::start(loopback_socket(), "127.0.0.1:9".parse().expect("addr"), c)
            .expect("start");
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        drop(h);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
}
