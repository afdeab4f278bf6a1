//! The backup's end: accepts a primary, checks it, receives entries, acks.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

use super::wire::{
    encode_preamble, nonce, prove, read_preamble, verify, FrameReader, FrameWriter, Msg, Prover,
    Transcript,
};
use super::{lock, runtime, Acks, ChannelConfig, ChannelError, JoinPart, Refusal};
use crate::{ExecBackend, LogEntry, LogHeader};

/// What the backup requires of a primary, besides the key and the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupExpect {
    /// The backend this backup replays with.
    pub backend: ExecBackend,
    /// The digest of the guest image this backup booted.
    pub image_digest: [u8; 32],
}

/// Decides whether the pairing generation a primary offers may pair with
/// this backup (see [`BackupListener::with_generation_check`]).
type GenerationCheck = Arc<dyn Fn(u64) -> Result<(), Refusal> + Send + Sync>;

/// Most handshakes run at once; further connections wait in the kernel's
/// backlog until one finishes (each is bounded by the handshake timeout).
const MAX_HANDSHAKES: usize = 8;

/// A listening backup. Connections are handshaken concurrently, so a
/// stranger that connects and stays silent does not delay the primary;
/// every connection that fails the handshake (a stranger, a refused
/// primary) is reported and closed, and the listener keeps waiting.
pub struct BackupListener {
    listener: Arc<TcpListener>,
    config: ChannelConfig,
    expect: BackupExpect,
    check: GenerationCheck,
    rt: Option<Arc<Runtime>>,
}

impl std::fmt::Debug for BackupListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupListener")
            .field("addr", &self.listener.local_addr().ok())
            .field("expect", &self.expect)
            .finish_non_exhaustive()
    }
}

impl BackupListener {
    /// Listen on `addr` ("host:port"; port 0 picks a free one). Every
    /// generation is accepted until [`with_generation_check`] says
    /// otherwise.
    ///
    /// [`with_generation_check`]: BackupListener::with_generation_check
    pub fn bind(
        addr: &str,
        config: &ChannelConfig,
        expect: BackupExpect,
    ) -> Result<BackupListener, ChannelError> {
        config.validate()?;
        let rt = runtime()?;
        let listener = rt
            .block_on(TcpListener::bind(addr))
            .map_err(|e| ChannelError::Connect {
                action: "listen on",
                addr: addr.to_owned(),
                source: Arc::new(e),
            })?;
        Ok(BackupListener {
            listener: Arc::new(listener),
            config: config.clone(),
            expect,
            check: Arc::new(|_| Ok(())),
            rt: Some(Arc::new(rt)),
        })
    }

    /// Decide, for a primary that proved the key and matches the backend
    /// and image, whether the pairing generation it offers may pair with
    /// this backup; an `Err` is sent to the primary as the refusal. Called
    /// during each handshake (so it sees the arbiter as it is then), from
    /// the channel's I/O thread: keep it short.
    pub fn with_generation_check(
        mut self,
        check: impl Fn(u64) -> Result<(), Refusal> + Send + Sync + 'static,
    ) -> Self {
        self.check = Arc::new(check);
        self
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, ChannelError> {
        self.listener
            .local_addr()
            .map_err(|e| ChannelError::io("reading the listening address", e))
    }

    /// Wait for a primary that passes the handshake, up to and including
    /// the log header. Connections that fail it are refused (a primary is
    /// told why), logged with `tracing::warn`, and do not end the wait.
    pub fn accept(&self) -> Result<BackupReceiver, ChannelError> {
        self.accept_reporting(None, log_refusal)
    }

    /// [`accept`](BackupListener::accept), giving up with
    /// [`ChannelError::PeerTimeout`] if no primary passes the handshake
    /// within `timeout`.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<BackupReceiver, ChannelError> {
        self.accept_reporting(Some(timeout), log_refusal)
    }

    /// [`accept`](BackupListener::accept) with an optional overall
    /// `timeout`, calling `on_refused(peer, error)` for every connection
    /// that failed the handshake: [`ChannelError::NotAChannel`] for a
    /// stranger, [`ChannelError::Rejected`] for a refused primary, and so
    /// on. Only a timeout or a closed listener end the wait with an error.
    pub fn accept_reporting(
        &self,
        timeout: Option<Duration>,
        mut on_refused: impl FnMut(SocketAddr, &ChannelError),
    ) -> Result<BackupReceiver, ChannelError> {
        let Some(rt) = self.rt.clone() else {
            return Err(ChannelError::Closed);
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(ChannelError::Config(
                "BackupListener::accept was called from inside an async runtime; \
                 call it from a plain thread or spawn_blocking"
                    .into(),
            ));
        }
        let serving = serve(
            &self.listener,
            &self.config,
            self.expect,
            &self.check,
            &mut on_refused,
        );
        let (paired, peer) = rt.block_on(async {
            match timeout {
                Some(d) => tokio::time::timeout(d, serving).await.map_err(|_| {
                    ChannelError::PeerTimeout {
                        what: "no primary connected".into(),
                        waited: d,
                    }
                })?,
                None => serving.await,
            }
        })?;
        Ok(BackupReceiver::start(rt, paired, peer, &self.config))
    }

    /// Stop waiting for a primary: from now on every connection is refused
    /// (a primary that proves the key is told [`Refusal::Busy`] with
    /// `generation`), in the background, until the returned handle is
    /// dropped. A backup that is replaying keeps its port answering this
    /// way, so a second primary or a stranger learns why and nothing
    /// disturbs the replay.
    pub fn refuse_all(mut self, generation: u64) -> BusyListener {
        let rt = self.rt.take();
        let task = rt.as_ref().map(|rt| {
            let listener = self.listener.clone();
            let config = self.config.clone();
            let expect = self.expect;
            let busy: GenerationCheck = Arc::new(move |_| Err(Refusal::Busy { generation }));
            rt.spawn(async move {
                let mut report = log_refusal;
                // `serve` only returns for a primary the check accepted,
                // which the busy check never does.
                while serve(&listener, &config, expect, &busy, &mut report)
                    .await
                    .is_ok()
                {}
            })
        });
        BusyListener { task, rt }
    }
}

impl Drop for BackupListener {
    fn drop(&mut self) {
        release(self.rt.take());
    }
}

/// A backup's port after it paired: refuses every connection (see
/// [`BackupListener::refuse_all`]) until dropped.
pub struct BusyListener {
    task: Option<JoinHandle<()>>,
    rt: Option<Arc<Runtime>>,
}

impl std::fmt::Debug for BusyListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusyListener").finish_non_exhaustive()
    }
}

impl Drop for BusyListener {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        release(self.rt.take());
    }
}

/// The default report of a refused connection.
fn log_refusal(peer: SocketAddr, e: &ChannelError) {
    tracing::warn!(%peer, error = %e, "refused a connection on the logging channel");
}

/// Accept connections and handshake them concurrently until one passes;
/// report each that fails.
async fn serve(
    listener: &TcpListener,
    config: &ChannelConfig,
    expect: BackupExpect,
    check: &GenerationCheck,
    on_refused: &mut impl FnMut(SocketAddr, &ChannelError),
) -> Result<(Paired, SocketAddr), ChannelError> {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept(), if handshakes.len() < MAX_HANDSHAKES => match r {
                Ok((stream, peer)) => {
                    let (config, check) = (config.clone(), check.clone());
                    handshakes.spawn(async move {
                        let limit = config.handshake_timeout;
                        let hs = handshake(stream, &config, &expect, &check);
                        let r = tokio::time::timeout(limit, hs).await.unwrap_or_else(|_| {
                            Err(ChannelError::PeerTimeout {
                                what: format!("handshake with {peer} not finished"),
                                waited: limit,
                            })
                        });
                        (peer, r)
                    });
                }
                Err(e) => {
                    // Out of descriptors, a connection reset while queued:
                    // nothing a stranger can make us exit for.
                    tracing::warn!(error = %e, "cannot accept a connection on the logging channel");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(done) = handshakes.join_next(), if !handshakes.is_empty() => match done {
                // Dropping the set cuts the other handshakes.
                Ok((peer, Ok(paired))) => return Ok((paired, peer)),
                Ok((peer, Err(e))) => on_refused(peer, &e),
                Err(e) => tracing::warn!(error = %e, "a logging channel handshake task failed"),
            },
        }
    }
}

/// Drop our handle on a runtime; the last one shuts it down without
/// blocking.
fn release(rt: Option<Arc<Runtime>>) {
    if let Some(rt) = rt {
        if let Ok(rt) = Arc::try_unwrap(rt) {
            rt.shutdown_background();
        }
    }
}

struct Shared {
    st: Mutex<State>,
    /// Signalled when entries arrive or the channel ends.
    cv: Condvar,
    /// Wakes the ack writer.
    wake: Notify,
    /// Wakes the reader when the replayer made room in a full queue.
    room: Notify,
    /// The reader stops reading the socket while this many entries wait.
    queue_limit: usize,
}

struct State {
    /// Received, not yet taken by the replayer.
    queue: VecDeque<LogEntry>,
    /// Pages and the join state of a joining primary, not yet taken.
    join: VecDeque<JoinPart>,
    received: Option<u64>,
    executed: Option<u64>,
    /// The primary's release watermark.
    released_through: Option<u64>,
    /// The channel's fatal error, once it has one.
    error: Option<ChannelError>,
    /// The primary asked to close; the ack writer answers.
    close_requested: bool,
    /// The primary closed cleanly and we answered: the stream is over.
    closed: bool,
}

impl Shared {
    fn fail(&self, e: ChannelError) {
        let mut st = lock(&self.st);
        if st.error.is_none() && !st.close_requested {
            tracing::warn!(error = %e, "logging channel from the primary failed");
            st.error = Some(e);
        }
        drop(st);
        self.cv.notify_all();
        self.wake.notify_one();
    }
}

/// The backup's end of the logging channel, after the handshake.
///
/// `Send + Sync`; the replay thread calls [`next`](BackupReceiver::next)
/// and [`report_executed`](BackupReceiver::report_executed). Entries are
/// acknowledged as received by the channel's own I/O thread as soon as
/// they are read off the socket, whether or not the replayer has taken
/// them. Dropping the receiver cuts the connection, which the primary sees
/// as the backup's death.
pub struct BackupReceiver {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    rt: Option<Arc<Runtime>>,
    header: LogHeader,
    peer: SocketAddr,
    generation: u64,
    joins: bool,
}

/// Most join parts (pages messages) held before the socket is left
/// unread, so TCP slows a primary whose pages arrive faster than they are
/// taken.
const JOIN_QUEUE_PARTS: usize = 64;

impl std::fmt::Debug for BackupReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupReceiver")
            .field("peer", &self.peer)
            .field("generation", &self.generation)
            .field("acks", &self.acks())
            .finish_non_exhaustive()
    }
}

impl BackupReceiver {
    /// Start the I/O tasks for a primary that passed the handshake.
    fn start(rt: Arc<Runtime>, p: Paired, peer: SocketAddr, config: &ChannelConfig) -> Self {
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                queue: VecDeque::new(),
                join: VecDeque::new(),
                received: None,
                executed: None,
                released_through: None,
                error: None,
                close_requested: false,
                closed: false,
            }),
            cv: Condvar::new(),
            wake: Notify::new(),
            room: Notify::new(),
            queue_limit: config.queue_limit().max(1),
        });
        let reader = {
            let shared = shared.clone();
            let timeout = config.peer_timeout;
            let (rd, fr, join) = (p.rd, p.fr, p.join);
            rt.spawn(async move {
                if let Err(e) = read_loop(&shared, rd, fr, timeout, join).await {
                    shared.fail(e);
                }
            })
        };
        let writer = {
            let shared = shared.clone();
            let keepalive = config.keepalive_interval;
            let (wr, fw) = (p.wr, p.fw);
            rt.spawn(async move {
                if let Err(e) = write_loop(&shared, wr, fw, keepalive).await {
                    shared.fail(e);
                }
            })
        };
        tracing::info!(%peer, backend = %p.header.backend, generation = p.generation,
            "primary accepted on the logging channel");
        BackupReceiver {
            shared,
            tasks: vec![reader, writer],
            rt: Some(rt),
            header: p.header,
            peer,
            generation: p.generation,
            joins: p.join,
        }
    }

    /// The primary's guest is already running: the replay starts from the
    /// state that [`next_join_part`](BackupReceiver::next_join_part)
    /// delivers, not from the image.
    pub fn joins(&self) -> bool {
        self.joins
    }

    /// Joining: the next part of the primary's state (pages, then the
    /// join state last), blocking until it arrives. Entries follow the
    /// join state. An error if the channel fails first.
    pub fn next_join_part(&self) -> Result<JoinPart, ChannelError> {
        let mut st = lock(&self.shared.st);
        loop {
            if let Some(p) = st.join.pop_front() {
                if st.join.len() + 1 >= JOIN_QUEUE_PARTS {
                    self.shared.room.notify_one();
                }
                return Ok(p);
            }
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            if st.closed || st.close_requested {
                return Err(ChannelError::PeerClosed {
                    detail: "the primary closed the channel in the middle of a join".into(),
                });
            }
            st = self
                .shared
                .cv
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The pairing generation the primary offered (and the generation
    /// check accepted): the one to use with the arbiter.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The primary's release watermark: it has put out every output whose
    /// log entry is at or below this seq (None: nothing reported yet).
    /// Outputs with later entries may or may not have reached the world.
    pub fn released_through(&self) -> Option<u64> {
        lock(&self.shared.st).released_through
    }
    /// The log header the primary sent.
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// The primary's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The next entry, in seq order; blocks while none has arrived.
    ///
    /// Entries received before the channel ended are always yielded first.
    /// Then: Ok(None) if the primary closed cleanly; otherwise the error
    /// that ended the channel: [`ChannelError::PeerClosed`] (the primary's
    /// connection went away without a close), [`ChannelError::PeerTimeout`]
    /// (nothing from it within the peer timeout),
    /// [`ChannelError::PeerAborted`], or a stream error
    /// ([`ChannelError::Log`]: checksum, truncation, order). The same
    /// result is returned again on later calls.
    pub fn next(&self) -> Result<Option<LogEntry>, ChannelError> {
        let mut st = lock(&self.shared.st);
        loop {
            if let Some(e) = st.queue.pop_front() {
                if st.queue.len() + 1 >= self.shared.queue_limit {
                    self.shared.room.notify_one();
                }
                return Ok(Some(e));
            }
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            if st.closed {
                return Ok(None);
            }
            st = self
                .shared
                .cv
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Entries received and not yet taken by [`next`](BackupReceiver::next).
    pub fn pending(&self) -> usize {
        lock(&self.shared.st).queue.len()
    }

    /// Report that the replayer has applied every entry up to `seq`. Sent
    /// to the primary with the next ack (at once if the I/O thread is
    /// idle). Lower values than already reported are ignored; a seq not
    /// yet received is a [`ChannelError::BadEntry`].
    pub fn report_executed(&self, seq: u64) -> Result<(), ChannelError> {
        let mut st = lock(&self.shared.st);
        if st.received.is_none_or(|r| r < seq) {
            return Err(ChannelError::BadEntry(format!(
                "reported entry {seq} executed, but only up to {:?} was received",
                st.received
            )));
        }
        if st.executed.is_some_and(|x| x >= seq) {
            return Ok(());
        }
        st.executed = Some(seq);
        drop(st);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// What this backup has received and executed (what it acks).
    pub fn acks(&self) -> Acks {
        let st = lock(&self.shared.st);
        Acks {
            received: st.received,
            executed: st.executed,
        }
    }

    /// Highest seq received.
    pub fn received(&self) -> Option<u64> {
        lock(&self.shared.st).received
    }

    /// The error that ended the channel, if one did (entries may still be
    /// queued).
    pub fn error(&self) -> Option<ChannelError> {
        lock(&self.shared.st).error.clone()
    }

    /// Whether the primary closed the channel cleanly.
    pub fn is_closed(&self) -> bool {
        lock(&self.shared.st).closed
    }
}

impl Drop for BackupReceiver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        release(self.rt.take());
    }
}

/// A connection that passed the handshake.
struct Paired {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    fr: FrameReader,
    fw: FrameWriter,
    header: LogHeader,
    generation: u64,
    join: bool,
}

/// The backup's side of the handshake: check the version, the key, the
/// backend, the image and the generation, in that order; then read the
/// header.
async fn handshake(
    stream: TcpStream,
    config: &ChannelConfig,
    expect: &BackupExpect,
    check: &GenerationCheck,
) -> Result<Paired, ChannelError> {
    stream
        .set_nodelay(true)
        .map_err(|e| ChannelError::io("setting TCP_NODELAY", e))?;
    let (mut rd, mut wr) = stream.into_split();
    let mut fw = FrameWriter::new();
    let mut fr = FrameReader::new();
    let version = config.protocol_version;

    let theirs = read_preamble(&mut rd).await?;
    encode_preamble(version, &mut fw.buf);
    if theirs != version {
        let why = Refusal::Version {
            primary: theirs,
            backup: version,
        };
        return Err(refuse(rd, wr, fw, why).await);
    }
    let (backend, image_digest, generation, join, primary_nonce) =
        match fr.next(&mut rd, "reading the hello").await? {
            Some(Msg::Hello {
                backend,
                image_digest,
                generation,
                join,
                nonce,
            }) => (backend, image_digest, generation, join, nonce),
            other => return Err(unexpected(other, "hello")),
        };
    let backup_nonce = nonce()?;
    fw.send(
        &mut wr,
        &Msg::Challenge {
            nonce: backup_nonce,
        },
        "sending the challenge",
    )
    .await?;
    let t = Transcript {
        version,
        backend,
        image_digest,
        generation,
        join,
        primary_nonce,
        backup_nonce,
    };
    let mac = match fr.next(&mut rd, "reading the primary's proof").await? {
        Some(Msg::Auth { mac }) => mac,
        other => return Err(unexpected(other, "auth")),
    };
    if !verify(&config.key, Prover::Primary, &t, &mac)? {
        return Err(refuse(rd, wr, fw, Refusal::WrongKey).await);
    }
    fr.authenticated();
    if backend != expect.backend {
        let why = Refusal::Backend {
            primary: backend,
            backup: expect.backend,
        };
        return Err(refuse(rd, wr, fw, why).await);
    }
    if image_digest != expect.image_digest {
        let why = Refusal::Image {
            primary: image_digest,
            backup: expect.image_digest,
        };
        return Err(refuse(rd, wr, fw, why).await);
    }
    if let Err(why) = check(generation) {
        return Err(refuse(rd, wr, fw, why).await);
    }
    let mac = prove(&config.key, Prover::Backup, &t)?;
    fw.send(&mut wr, &Msg::Welcome { mac }, "sending the welcome")
        .await?;
    let header = match fr.next(&mut rd, "reading the log header").await? {
        Some(Msg::Header(h)) => h,
        other => return Err(unexpected(other, "header")),
    };
    if header.backend != backend || header.image_digest != image_digest {
        return Err(ChannelError::Protocol(format!(
            "the log header (backend {}) contradicts the handshake (backend {backend}, \
             or another image digest)",
            header.backend
        )));
    }
    Ok(Paired {
        rd,
        wr,
        fr,
        fw,
        header,
        generation,
        join,
    })
}

/// Tell the primary why it is refused, close without losing that message
/// to a reset, and return the error for our caller.
async fn refuse(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    mut fw: FrameWriter,
    why: Refusal,
) -> ChannelError {
    tracing::warn!(reason = %why, "refusing a primary");
    // Best effort: the refusal stands whether or not the primary hears it.
    if fw
        .send(&mut wr, &Msg::Refuse(why.clone()), "sending a refusal")
        .await
        .is_ok()
    {
        let _ = wr.shutdown().await;
        // Drain what the primary still sends until it closes, so our close
        // does not reset the connection before it read the refusal.
        let mut sink = [0u8; 4096];
        let drain = async {
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
    ChannelError::Rejected(why)
}

fn unexpected(got: Option<Msg>, expected: &str) -> ChannelError {
    match got {
        Some(Msg::Abort { reason }) => ChannelError::PeerAborted { reason },
        Some(m) => ChannelError::Protocol(format!(
            "expected a {expected} message from the primary, got {}",
            m.name()
        )),
        None => ChannelError::PeerClosed {
            detail: format!("the primary closed the connection instead of sending a {expected}"),
        },
    }
}

/// Receives entries, checks their order, queues them, wakes the ack writer
/// after every read; watches the primary's liveness.
async fn read_loop(
    shared: &Shared,
    mut rd: OwnedReadHalf,
    mut fr: FrameReader,
    timeout: Duration,
    mut joining: bool,
) -> Result<(), ChannelError> {
    let mut next_seq = 0u64;
    let mut last_count: Option<u64> = None;
    let mut batch = Vec::new();
    let mut parts = Vec::new();
    let mut last_rx = Instant::now();
    loop {
        let mut closed = false;
        let mut failure = None;
        let mut released = None;
        loop {
            let at = fr.pos();
            match fr.next_buffered() {
                Ok(Some(Msg::Entry(_))) if joining => {
                    failure = Some(ChannelError::Protocol(format!(
                        "an entry in {at} before the join state"
                    )));
                    break;
                }
                Ok(Some(Msg::Pages { first, data })) if joining => {
                    parts.push(JoinPart::Pages { first, data });
                }
                Ok(Some(Msg::JoinState { state })) if joining => {
                    parts.push(JoinPart::State(state));
                    joining = false;
                }
                Ok(Some(Msg::Entry(e))) => {
                    if e.seq != next_seq {
                        failure = Some(
                            crate::LogError::Sequence {
                                at,
                                expected: next_seq,
                                found: e.seq,
                            }
                            .into(),
                        );
                        break;
                    }
                    if let Some(prev) = last_count.filter(|c| e.point.count < *c) {
                        failure = Some(ChannelError::Protocol(format!(
                            "entry {} in {at} goes back in time: point count {} after {prev}",
                            e.seq, e.point.count
                        )));
                        break;
                    }
                    next_seq += 1;
                    last_count = Some(e.point.count);
                    batch.push(e);
                }
                Ok(Some(Msg::Keepalive)) => {}
                Ok(Some(Msg::Released { through })) => {
                    if through >= next_seq {
                        failure = Some(ChannelError::Protocol(format!(
                            "the primary reports outputs released through entry {through} in \
                             {at}, but only {next_seq} entries arrived"
                        )));
                        break;
                    }
                    released = Some(through);
                }
                Ok(Some(Msg::Close)) => {
                    closed = true;
                    break;
                }
                Ok(Some(Msg::Abort { reason })) => {
                    failure = Some(ChannelError::PeerAborted { reason });
                    break;
                }
                Ok(Some(other)) => {
                    failure = Some(ChannelError::Protocol(format!(
                        "unexpected {} message from the primary in {at}",
                        other.name()
                    )));
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        // Entries that arrived intact before a failure are still delivered
        // (and acknowledged): the backup replays all it has on failover.
        if !batch.is_empty() || !parts.is_empty() || closed || released.is_some() {
            let mut st = lock(&shared.st);
            st.join.extend(parts.drain(..));
            if let Some(last) = batch.last() {
                st.received = Some(last.seq);
            }
            st.queue.extend(batch.drain(..));
            st.close_requested |= closed;
            st.released_through = st.released_through.max(released);
            drop(st);
            shared.cv.notify_all();
            shared.wake.notify_one();
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if closed {
            return Ok(());
        }
        // Backpressure: with the queue full, leave the bytes in the socket
        // so TCP stops the primary. The primary's silence meanwhile is ours,
        // not its death.
        while {
            let st = lock(&shared.st);
            st.queue.len() >= shared.queue_limit || st.join.len() >= JOIN_QUEUE_PARTS
        } {
            shared.room.notified().await;
            last_rx = Instant::now();
        }
        let left = timeout.saturating_sub(last_rx.elapsed());
        tokio::select! {
            more = fr.read_more(&mut rd, "reading entries") => {
                if !more? {
                    return Err(ChannelError::PeerClosed {
                        detail: "end of stream from the primary without a close message".into(),
                    });
                }
                last_rx = Instant::now();
            }
            _ = tokio::time::sleep(left) => {
                return Err(ChannelError::PeerTimeout {
                    what: "nothing received from the primary".into(),
                    waited: timeout,
                });
            }
        }
    }
}

/// Sends an ack whenever received or executed advance, a repeated one as
/// keepalive when idle, and answers the primary's close.
async fn write_loop(
    shared: &Shared,
    mut wr: OwnedWriteHalf,
    mut fw: FrameWriter,
    keepalive: Duration,
) -> Result<(), ChannelError> {
    let mut sent: Option<Acks> = None;
    let abort = loop {
        let (acks, closed) = {
            let st = lock(&shared.st);
            if let Some(e) = &st.error {
                break e.abort_reason();
            }
            (
                Acks {
                    received: st.received,
                    executed: st.executed,
                },
                st.close_requested,
            )
        };
        if sent != Some(acks) {
            fw.push(&Msg::Ack {
                received: acks.received,
                executed: acks.executed,
            })?;
            sent = Some(acks);
        }
        if closed {
            // Best effort: the primary closed cleanly whether or not it
            // hears our answer, so the stream is complete either way.
            if fw.push(&Msg::Close).is_ok() {
                let _ = fw.flush(&mut wr, "answering the close").await;
            }
            let _ = wr.shutdown().await;
            lock(&shared.st).closed = true;
            shared.cv.notify_all();
            return Ok(());
        }
        fw.flush(&mut wr, "sending an ack").await?;
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(keepalive) => {
                fw.push(&Msg::Ack {
                    received: acks.received,
                    executed: acks.executed,
                })?;
            }
        }
    };
    if let Some(reason) = abort {
        // Best effort: the channel is dead either way.
        let _ = fw.send(&mut wr, &Msg::Abort { reason }, "aborting").await;
    }
    Ok(())
}
