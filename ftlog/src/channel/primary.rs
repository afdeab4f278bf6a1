//! The primary's end: connects, proves itself, streams entries, tracks acks.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::wire::{
    encode_preamble, nonce, prove, read_preamble, verify, FrameReader, FrameWriter, Msg, Prover,
    Transcript,
};
use super::{count, lock, runtime, tick, Acks, ChannelConfig, ChannelError, Refusal};
use crate::{EntryKind, ExecPoint, LogEntry, LogHeader};

/// State shared by the caller's threads and the I/O tasks.
struct Shared {
    st: Mutex<State>,
    /// Signalled whenever acks advance, entries are written, or the
    /// channel fails or closes.
    cv: Condvar,
    /// Wakes the writer task.
    wake: Notify,
    acks_tx: watch::Sender<Acks>,
}

struct State {
    /// Entries handed to `send` but not yet taken by the writer.
    queue: Vec<LogEntry>,
    /// The seq the next entry must have.
    next_seq: u64,
    /// The last entry's point count.
    last_count: Option<u64>,
    /// Entries written to the socket.
    written: u64,
    /// Bytes written to the socket after the handshake.
    bytes: u64,
    /// (last seq, write time) of each written batch not yet acked as
    /// received, for the ack latency.
    in_flight: VecDeque<(u64, Instant)>,
    /// Write-to-ack time of the latest acked batch.
    ack_latency: Option<Duration>,
    acks: Acks,
    /// When the received ack last advanced, or when entries became
    /// outstanding with none before.
    progress_at: Instant,
    /// When the executed ack last advanced (or the channel opened).
    executed_at: Instant,
    /// The primary's release watermark: every output whose entry is at or
    /// below it has been put out.
    released_through: Option<u64>,
    /// The watermark last sent to the backup.
    released_sent: Option<u64>,
    /// The channel's fatal error, once it has one.
    error: Option<ChannelError>,
    /// `close` was called.
    closing: bool,
    /// The backup answered our close.
    closed: bool,
    /// Joining: the state transfer is not finished (no entry may be sent
    /// before the join state).
    joining: bool,
    /// Join messages (pages, the join state) not yet taken by the writer,
    /// and their bytes.
    join: Vec<Msg>,
    join_queued: usize,
    /// Bytes of join messages written to the socket.
    join_written: u64,
}

/// Most bytes of pages queued but not yet written: a pre-copy runs as fast
/// as the socket takes it, with bounded memory.
const JOIN_QUEUE_BYTES: usize = 8 << 20;

impl Shared {
    /// Record the channel's first fatal error and wake everyone.
    fn fail(&self, e: ChannelError) {
        let mut st = lock(&self.st);
        if st.error.is_none() && !st.closed {
            tracing::warn!(error = %e, "logging channel to the backup failed");
            st.error = Some(e);
        }
        drop(st);
        self.cv.notify_all();
        self.wake.notify_one();
    }
}

/// What a status line shows about the channel (see [`PrimarySender::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Entries handed to `send`/`push` (= the next seq).
    pub entries_queued: u64,
    /// Entries written to the socket.
    pub entries_written: u64,
    /// Bytes written to the socket after the handshake (entries,
    /// keepalives, the close).
    pub bytes_written: u64,
    /// The backup's acks.
    pub acks: Acks,
    /// Entries sent but not reported executed.
    pub lag: u64,
    /// Time from writing the latest acknowledged batch to receiving its
    /// ack: one channel round trip plus the backup's read time.
    pub ack_latency: Option<Duration>,
}

/// The primary's end of the logging channel.
///
/// All methods take `&self`, and the sender is `Send + Sync`: put it in an
/// `Arc` to share it between the vCPU thread (which sends) and an output
/// thread (which waits for acks). Dropping it without [`close`] cuts the
/// connection, which the backup sees as the primary's death.
///
/// [`close`]: PrimarySender::close
pub struct PrimarySender {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    rt: Option<Runtime>,
    window: u64,
    lag_bound: u64,
    peer_timeout: Duration,
    peer: SocketAddr,
    generation: u64,
}

impl std::fmt::Debug for PrimarySender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimarySender")
            .field("peer", &self.peer)
            .field("generation", &self.generation)
            .field("acks", &self.acks())
            .finish_non_exhaustive()
    }
}

impl PrimarySender {
    /// Connect to the backup at `addr` ("host:port"), run the handshake
    /// (the backend and image digest are `header`'s, the generation is
    /// `config.generation`), and send `header`.
    /// Blocks until the backup accepts or refuses; a refusal is
    /// [`ChannelError::Refused`] naming the reason.
    pub fn connect(
        addr: &str,
        config: &ChannelConfig,
        header: &LogHeader,
    ) -> Result<PrimarySender, ChannelError> {
        Self::open(addr, config, header, false)
    }

    /// [`connect`](PrimarySender::connect) for a primary whose guest is
    /// already running: the backup starts from the state sent with
    /// [`send_pages`](PrimarySender::send_pages) and
    /// [`send_join_state`](PrimarySender::send_join_state), and entries
    /// may only follow the join state.
    pub fn connect_joining(
        addr: &str,
        config: &ChannelConfig,
        header: &LogHeader,
    ) -> Result<PrimarySender, ChannelError> {
        Self::open(addr, config, header, true)
    }

    fn open(
        addr: &str,
        config: &ChannelConfig,
        header: &LogHeader,
        join: bool,
    ) -> Result<PrimarySender, ChannelError> {
        config.validate()?;
        let rt = runtime()?;
        let hs = rt.block_on(async {
            let hs = handshake(addr, config, header, join);
            tokio::time::timeout(config.handshake_timeout, hs)
                .await
                .unwrap_or_else(|_| {
                    Err(ChannelError::PeerTimeout {
                        what: format!("handshake with the backup at {addr} not finished"),
                        waited: config.handshake_timeout,
                    })
                })
        })?;
        let (rd, wr, fr, fw, peer) = hs;
        let (acks_tx, _) = watch::channel(Acks::default());
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                queue: Vec::new(),
                next_seq: 0,
                last_count: None,
                written: 0,
                bytes: 0,
                in_flight: VecDeque::new(),
                ack_latency: None,
                acks: Acks::default(),
                progress_at: Instant::now(),
                executed_at: Instant::now(),
                released_through: None,
                released_sent: None,
                error: None,
                closing: false,
                closed: false,
                joining: join,
                join: Vec::new(),
                join_queued: 0,
                join_written: 0,
            }),
            cv: Condvar::new(),
            wake: Notify::new(),
            acks_tx,
        });
        let writer = {
            let shared = shared.clone();
            let keepalive = config.keepalive_interval;
            rt.spawn(async move {
                if let Err(e) = write_loop(&shared, wr, fw, keepalive).await {
                    shared.fail(e);
                }
            })
        };
        let reader = {
            let shared = shared.clone();
            let timeout = config.peer_timeout;
            rt.spawn(async move {
                if let Err(e) = read_loop(&shared, rd, fr, timeout).await {
                    shared.fail(e);
                }
            })
        };
        tracing::info!(%peer, generation = config.generation, "logging channel to the backup established");
        Ok(PrimarySender {
            shared,
            tasks: vec![writer, reader],
            rt: Some(rt),
            window: config.window,
            lag_bound: config.lag_bound,
            peer_timeout: config.peer_timeout,
            peer,
            generation: config.generation,
        })
    }

    /// The pairing generation offered in the handshake.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The backup's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Queue `entry` for sending. Its seq must be [`next_seq`] and its
    /// point count no lower than the previous entry's
    /// ([`ChannelError::BadEntry`] otherwise). Returns at once unless
    /// `window` entries are unacknowledged: then it blocks until the backup
    /// acknowledges more, or the channel fails.
    ///
    /// [`next_seq`]: PrimarySender::next_seq
    pub fn send(&self, entry: LogEntry) -> Result<(), ChannelError> {
        self.enqueue(|_| entry).map(|_| ())
    }

    /// Send an entry with the next seq; returns that seq. Blocks like
    /// [`send`](PrimarySender::send).
    pub fn push(&self, point: ExecPoint, kind: EntryKind) -> Result<u64, ChannelError> {
        self.enqueue(|seq| LogEntry { seq, point, kind })
    }

    fn enqueue(&self, make: impl FnOnce(u64) -> LogEntry) -> Result<u64, ChannelError> {
        let mut st = lock(&self.shared.st);
        loop {
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            if st.closing {
                return Err(ChannelError::Closed);
            }
            if st.next_seq.saturating_sub(count(st.acks.received)) < self.window {
                break;
            }
            st = self
                .shared
                .cv
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if st.joining {
            return Err(ChannelError::BadEntry(
                "an entry before the join state: the backup has no state to replay it on".into(),
            ));
        }
        let entry = make(st.next_seq);
        if entry.seq != st.next_seq {
            return Err(ChannelError::BadEntry(format!(
                "entry out of sequence: expected seq {}, found {}",
                st.next_seq, entry.seq
            )));
        }
        if let Some(prev) = st.last_count.filter(|c| entry.point.count < *c) {
            return Err(ChannelError::BadEntry(format!(
                "entry {} goes back in time: point count {} after {prev}",
                entry.seq, entry.point.count
            )));
        }
        let seq = entry.seq;
        st.next_seq += 1;
        st.last_count = Some(entry.point.count);
        let was_empty = st.queue.is_empty();
        st.queue.push(entry);
        drop(st);
        if was_empty {
            self.shared.wake.notify_one();
        }
        Ok(seq)
    }

    /// Joining: queue guest pages from page `first` (`data` a whole number
    /// of 4 KiB pages). Blocks while more than a few MiB of pages wait for
    /// the socket, so a pre-copy goes at the speed of the channel.
    pub fn send_pages(&self, first: u64, data: Vec<u8>) -> Result<(), ChannelError> {
        if data.len() % 4096 != 0 {
            return Err(ChannelError::BadEntry(format!(
                "pages of {} bytes: not a whole number of 4 KiB pages",
                data.len()
            )));
        }
        let mut st = lock(&self.shared.st);
        loop {
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            if !st.joining {
                return Err(ChannelError::BadEntry(
                    "pages outside a join (before the join state, on a joining channel)".into(),
                ));
            }
            if st.join_queued < JOIN_QUEUE_BYTES {
                break;
            }
            st = self
                .shared
                .cv
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        st.join_queued += data.len();
        st.join.push(Msg::Pages { first, data });
        drop(st);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Joining: queue the VM's state at the join point. From now on
    /// entries may be sent (from seq 0); the pages and the state go out
    /// before them.
    pub fn send_join_state(&self, state: Vec<u8>) -> Result<(), ChannelError> {
        let mut st = lock(&self.shared.st);
        if let Some(e) = &st.error {
            return Err(e.clone());
        }
        if !st.joining {
            return Err(ChannelError::BadEntry(
                "a join state outside a join (or a second one)".into(),
            ));
        }
        st.joining = false;
        st.join_queued += state.len();
        st.join.push(Msg::JoinState { state });
        drop(st);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Bytes of pages and join state written to the socket so far.
    pub fn join_bytes_written(&self) -> u64 {
        lock(&self.shared.st).join_written
    }

    /// Block until every page and the join state queued so far are written
    /// to the socket (not necessarily read by the backup).
    pub fn flush_join(&self) -> Result<(), ChannelError> {
        self.wait_until(|st| st.join_queued == 0)
    }

    /// Block until `done` holds, or the channel fails.
    fn wait_until(&self, done: impl Fn(&State) -> bool) -> Result<(), ChannelError> {
        let mut st = lock(&self.shared.st);
        loop {
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            if done(&st) {
                return Ok(());
            }
            st = self
                .shared
                .cv
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// The seq the next entry gets.
    pub fn next_seq(&self) -> u64 {
        lock(&self.shared.st).next_seq
    }

    /// Block until every entry sent so far is written to the socket (not
    /// necessarily acknowledged).
    pub fn flush(&self) -> Result<(), ChannelError> {
        self.wait_until(|st| st.written >= st.next_seq)
    }

    /// What the backup has acknowledged so far.
    pub fn acks(&self) -> Acks {
        lock(&self.shared.st).acks
    }

    /// Highest seq the backup acknowledged as received.
    pub fn acked_received(&self) -> Option<u64> {
        self.acks().received
    }

    /// Highest seq the backup reported executed.
    pub fn acked_executed(&self) -> Option<u64> {
        self.acks().executed
    }

    /// Whether entry `seq` is acknowledged as received (non-blocking; the
    /// output rule's check).
    pub fn is_received(&self, seq: u64) -> bool {
        self.acks().has_received(seq)
    }

    /// Block until entry `seq` is acknowledged as received: Ok(true), or
    /// Ok(false) after `timeout`. If the channel fails first, its error
    /// (an entry acknowledged before the failure still returns Ok(true)).
    pub fn wait_received(&self, seq: u64, timeout: Duration) -> Result<bool, ChannelError> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.st);
        loop {
            if st.acks.has_received(seq) {
                return Ok(true);
            }
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Block until the acks differ from `seen`, or `timeout` passes;
    /// returns the acks then (equal to `seen` on timeout). The channel's
    /// error if it fails while waiting.
    pub fn wait_acks_change(&self, seen: Acks, timeout: Duration) -> Result<Acks, ChannelError> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.st);
        loop {
            if st.acks != seen {
                return Ok(st.acks);
            }
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(st.acks);
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// A watch of the acks, for async code (an output task can `changed()`
    /// on it). It stops changing when the channel fails: check
    /// [`error`](PrimarySender::error) then.
    pub fn subscribe(&self) -> watch::Receiver<Acks> {
        self.shared.acks_tx.subscribe()
    }

    /// The channel's fatal error, if it has failed.
    pub fn error(&self) -> Option<ChannelError> {
        lock(&self.shared.st).error.clone()
    }

    /// Counters for a status line.
    pub fn stats(&self) -> ChannelStats {
        let st = lock(&self.shared.st);
        ChannelStats {
            entries_queued: st.next_seq,
            entries_written: st.written,
            bytes_written: st.bytes,
            acks: st.acks,
            lag: st.next_seq.saturating_sub(count(st.acks.executed)),
            ack_latency: st.ack_latency,
        }
    }

    /// Execution lag in entries: sent but not yet reported executed.
    pub fn lag(&self) -> u64 {
        let st = lock(&self.shared.st);
        st.next_seq.saturating_sub(count(st.acks.executed))
    }

    /// The configured lag bound, in entries.
    pub fn lag_bound(&self) -> u64 {
        self.lag_bound
    }

    /// Block while the backup is more than the lag bound behind (more than
    /// `lag_bound` entries sent but not executed). Call it from the vCPU
    /// thread between guest runs. Returns the channel's error if it fails
    /// while waiting.
    ///
    /// The wait is bounded: a backup that acknowledges receipt but whose
    /// replay reports nothing executed for `peer_timeout` while the
    /// primary waits here is dead (its replay is stuck), and the channel
    /// fails with [`ChannelError::PeerTimeout`] saying so.
    pub fn throttle(&self) -> Result<(), ChannelError> {
        let started = Instant::now();
        let mut st = lock(&self.shared.st);
        loop {
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            let lag = st.next_seq.saturating_sub(count(st.acks.executed));
            if lag <= self.lag_bound {
                return Ok(());
            }
            let stuck_for = st.executed_at.max(started).elapsed();
            if stuck_for > self.peer_timeout {
                drop(st);
                self.shared.fail(ChannelError::PeerTimeout {
                    what: format!(
                        "the backup's replay executed nothing with {lag} entries not executed \
                         (lag bound {})",
                        self.lag_bound
                    ),
                    waited: self.peer_timeout,
                });
                st = lock(&self.shared.st);
                continue;
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, tick(self.peer_timeout))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// The primary's releaser has put out every output whose log entry is
    /// at or below `seq`. Sent to the backup as a `Released` message,
    /// coalesced (only the latest value goes, after the entries it names),
    /// so a backup going live knows which outputs the world has already
    /// seen ([`BackupReceiver::released_through`](super::BackupReceiver::released_through)).
    /// Lower values than already set are ignored.
    pub fn set_released_through(&self, seq: u64) {
        let mut st = lock(&self.shared.st);
        if st.released_through.is_some_and(|r| r >= seq) {
            return;
        }
        st.released_through = Some(seq);
        drop(st);
        self.shared.wake.notify_one();
    }

    /// Declare the backup dead although its connection is up (its
    /// heartbeats stopped, its replay is stuck): the channel fails with
    /// [`ChannelError::DeclaredDead`] for every waiting thread, the backup
    /// is sent an `Abort` with `reason`, and the connection is closed. No
    /// effect on a channel that has already failed or closed.
    pub fn abort(&self, reason: impl Into<String>) {
        self.shared.fail(ChannelError::DeclaredDead {
            reason: reason.into(),
        });
    }

    /// Close cleanly: send what is queued, then a close message, and wait
    /// (up to the peer timeout) for the backup to acknowledge everything
    /// and answer the close. The backup's receiver then ends with Ok(None).
    /// Takes `&self`, so a sender shared by several threads can be closed
    /// by one of them; later sends fail with [`ChannelError::Closed`].
    /// Calling it again returns the same outcome.
    pub fn close(&self) -> Result<Acks, ChannelError> {
        {
            let mut st = lock(&self.shared.st);
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            st.closing = true;
        }
        self.shared.wake.notify_one();
        let deadline = Instant::now() + self.peer_timeout;
        let mut st = lock(&self.shared.st);
        loop {
            if st.closed {
                return Ok(st.acks);
            }
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                self.shared.fail(ChannelError::PeerTimeout {
                    what: "the backup did not answer our close".into(),
                    waited: self.peer_timeout,
                });
                st = lock(&self.shared.st);
                continue;
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    fn shutdown(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for PrimarySender {
    fn drop(&mut self) {
        self.shutdown();
    }
}

type Handshaken = (
    OwnedReadHalf,
    OwnedWriteHalf,
    FrameReader,
    FrameWriter,
    SocketAddr,
);

/// Connect and run the primary's side of the handshake, then send the
/// header.
async fn handshake(
    addr: &str,
    config: &ChannelConfig,
    header: &LogHeader,
    join: bool,
) -> Result<Handshaken, ChannelError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| ChannelError::Connect {
            action: "connect to",
            addr: addr.to_owned(),
            source: Arc::new(e),
        })?;
    stream
        .set_nodelay(true)
        .map_err(|e| ChannelError::io("setting TCP_NODELAY", e))?;
    let peer = stream
        .peer_addr()
        .map_err(|e| ChannelError::io("reading the backup's address", e))?;
    let (mut rd, mut wr) = stream.into_split();
    let mut fw = FrameWriter::new();
    let mut fr = FrameReader::new();
    let version = config.protocol_version;

    let primary_nonce = nonce()?;
    encode_preamble(version, &mut fw.buf);
    fw.push(&Msg::Hello {
        backend: header.backend,
        image_digest: header.image_digest,
        generation: config.generation,
        join,
        nonce: primary_nonce,
    })?;
    fw.flush(&mut wr, "sending the hello").await?;

    let theirs = read_preamble(&mut rd).await?;
    if theirs != version {
        return Err(ChannelError::Refused(Refusal::Version {
            primary: version,
            backup: theirs,
        }));
    }
    let backup_nonce = match fr.next(&mut rd, "reading the challenge").await? {
        Some(Msg::Challenge { nonce }) => nonce,
        other => return Err(unexpected(other, "challenge")),
    };
    let t = Transcript {
        version,
        backend: header.backend,
        image_digest: header.image_digest,
        generation: config.generation,
        join,
        primary_nonce,
        backup_nonce,
    };
    let mac = prove(&config.key, Prover::Primary, &t)?;
    fw.send(&mut wr, &Msg::Auth { mac }, "sending our proof")
        .await?;
    match fr.next(&mut rd, "reading the backup's answer").await? {
        Some(Msg::Welcome { mac }) => {
            if !verify(&config.key, Prover::Backup, &t, &mac)? {
                return Err(ChannelError::BackupAuth);
            }
            fr.authenticated();
        }
        other => return Err(unexpected(other, "welcome")),
    }
    fw.send(&mut wr, &Msg::Header(header.clone()), "sending the header")
        .await?;
    Ok((rd, wr, fr, fw, peer))
}

/// The error for a handshake message that is not the `expected` one.
fn unexpected(got: Option<Msg>, expected: &str) -> ChannelError {
    match got {
        Some(Msg::Refuse(r)) => ChannelError::Refused(r),
        Some(Msg::Abort { reason }) => ChannelError::PeerAborted { reason },
        Some(m) => ChannelError::Protocol(format!(
            "expected a {expected} message from the backup, got {}",
            m.name()
        )),
        None => ChannelError::PeerClosed {
            detail: format!("the backup closed the connection instead of sending a {expected}"),
        },
    }
}

/// Sends queued entries as they come, keepalives when idle, the close.
async fn write_loop(
    shared: &Shared,
    mut wr: OwnedWriteHalf,
    mut fw: FrameWriter,
    keepalive: Duration,
) -> Result<(), ChannelError> {
    let mut batch = Vec::new();
    let mut join = Vec::new();
    let abort = loop {
        let (closing, released) = {
            let mut st = lock(&shared.st);
            if let Some(e) = &st.error {
                break e.abort_reason();
            }
            // Pages and the join state go before any entry: entries are
            // only queued after the join state.
            std::mem::swap(&mut join, &mut st.join);
            std::mem::swap(&mut batch, &mut st.queue);
            // The watermark goes after the entries it names.
            let in_stream = st.written + batch.len() as u64;
            let released = st
                .released_through
                .filter(|r| st.released_sent < Some(*r) && *r < in_stream);
            if released.is_some() {
                st.released_sent = released;
            }
            (st.closing, released)
        };
        if !join.is_empty() {
            let mut queued = 0;
            for m in join.drain(..) {
                queued += match &m {
                    Msg::Pages { data, .. } => data.len(),
                    Msg::JoinState { state } => state.len(),
                    _ => 0,
                };
                fw.push(&m)?;
            }
            let bytes = fw.buf.len() as u64;
            fw.flush(&mut wr, "sending the guest's state").await?;
            {
                let mut st = lock(&shared.st);
                st.join_queued = st.join_queued.saturating_sub(queued);
                st.join_written += bytes;
                st.bytes += bytes;
            }
            shared.cv.notify_all();
        }
        let n = batch.len() as u64;
        let last = batch.last().map(|e| e.seq);
        for e in batch.drain(..) {
            fw.push(&Msg::Entry(e))?;
        }
        if let Some(through) = released {
            fw.push(&Msg::Released { through })?;
        }
        if !fw.buf.is_empty() {
            let bytes = fw.buf.len() as u64;
            fw.flush(&mut wr, "sending entries").await?;
            {
                let now = Instant::now();
                let mut st = lock(&shared.st);
                if let Some(last) = last {
                    if st.written <= count(st.acks.received) {
                        st.progress_at = now;
                    }
                    st.written += n;
                    if !st.acks.has_received(last) {
                        st.in_flight.push_back((last, now));
                    }
                }
                st.bytes += bytes;
            }
            shared.cv.notify_all();
            continue;
        }
        if closing {
            fw.send(&mut wr, &Msg::Close, "sending the close").await?;
            // The read loop finishes the close when the backup answers.
            return Ok(());
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(keepalive) => {
                fw.push(&Msg::Keepalive)?;
                let bytes = fw.buf.len() as u64;
                fw.flush(&mut wr, "sending a keepalive").await?;
                lock(&shared.st).bytes += bytes;
            }
        }
    };
    if let Some(reason) = abort {
        // Best effort: the channel is dead either way.
        let _ = fw.send(&mut wr, &Msg::Abort { reason }, "aborting").await;
    }
    Ok(())
}

/// Reads acks; watches the backup's liveness.
async fn read_loop(
    shared: &Shared,
    mut rd: OwnedReadHalf,
    mut fr: FrameReader,
    timeout: Duration,
) -> Result<(), ChannelError> {
    let mut last_rx = Instant::now();
    loop {
        while let Some(msg) = fr.next_buffered()? {
            match msg {
                Msg::Ack { received, executed } => on_ack(shared, received, executed)?,
                Msg::Close => {
                    let mut st = lock(&shared.st);
                    if !st.closing {
                        return Err(ChannelError::PeerClosed {
                            detail: "the backup closed the channel".into(),
                        });
                    }
                    st.closed = true;
                    drop(st);
                    shared.cv.notify_all();
                    return Ok(());
                }
                Msg::Abort { reason } => return Err(ChannelError::PeerAborted { reason }),
                Msg::Keepalive => {}
                other => {
                    return Err(ChannelError::Protocol(format!(
                        "unexpected {} message from the backup after the handshake",
                        other.name()
                    )))
                }
            }
        }
        tokio::select! {
            more = fr.read_more(&mut rd, "reading acks") => {
                if !more? {
                    return Err(ChannelError::PeerClosed {
                        detail: "end of stream from the backup".into(),
                    });
                }
                last_rx = Instant::now();
            }
            _ = tokio::time::sleep(tick(timeout)) => {}
        }
        if last_rx.elapsed() > timeout {
            return Err(ChannelError::PeerTimeout {
                what: "nothing received from the backup".into(),
                waited: timeout,
            });
        }
        let st = lock(&shared.st);
        if st.error.is_some() {
            return Ok(());
        }
        let outstanding = st.written.saturating_sub(count(st.acks.received));
        if outstanding > 0 && st.progress_at.elapsed() > timeout {
            return Err(ChannelError::PeerTimeout {
                what: format!(
                    "no acknowledgement from the backup with {outstanding} entries outstanding"
                ),
                waited: timeout,
            });
        }
    }
}

fn on_ack(
    shared: &Shared,
    received: Option<u64>,
    executed: Option<u64>,
) -> Result<(), ChannelError> {
    let mut st = lock(&shared.st);
    if received < st.acks.received || executed < st.acks.executed {
        return Err(ChannelError::Protocol(format!(
            "acks went backwards: received {received:?} executed {executed:?} after {:?}",
            st.acks
        )));
    }
    if count(received) > st.next_seq || executed > received {
        return Err(ChannelError::Protocol(format!(
            "ack for entries never sent: received {received:?} executed {executed:?}, {} sent",
            st.next_seq
        )));
    }
    let new = super::Acks { received, executed };
    if new == st.acks {
        return Ok(());
    }
    if executed > st.acks.executed {
        st.executed_at = Instant::now();
    }
    if let Some(r) = received.filter(|_| received > st.acks.received) {
        let now = Instant::now();
        st.progress_at = now;
        let mut newest = None;
        while let Some(&(last, at)) = st.in_flight.front() {
            if last > r {
                break;
            }
            newest = Some(at);
            st.in_flight.pop_front();
        }
        if let Some(at) = newest {
            st.ack_latency = Some(now.saturating_duration_since(at));
        }
    }
    st.acks = new;
    drop(st);
    shared.acks_tx.send_replace(new);
    shared.cv.notify_all();
    Ok(())
}
