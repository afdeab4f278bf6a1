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
use tokio::task::JoinHandle;

use super::wire::{
    encode_preamble, nonce, prove, read_preamble, verify, FrameReader, FrameWriter, Msg, Prover,
    Transcript,
};
use super::{lock, runtime, Acks, ChannelConfig, ChannelError, Refusal};
use crate::{ExecBackend, LogEntry, LogHeader};

/// What the backup requires of a primary, besides the key and the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupExpect {
    /// The backend this backup replays with.
    pub backend: ExecBackend,
    /// The digest of the guest image this backup booted.
    pub image_digest: [u8; 32],
}

/// A listening backup. Accepts one primary at a time; a refused primary
/// leaves the listener usable.
pub struct BackupListener {
    listener: TcpListener,
    config: ChannelConfig,
    expect: BackupExpect,
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
    /// Listen on `addr` ("host:port"; port 0 picks a free one).
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
            listener,
            config: config.clone(),
            expect,
            rt: Some(Arc::new(rt)),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, ChannelError> {
        self.listener
            .local_addr()
            .map_err(|e| ChannelError::io("reading the listening address", e))
    }

    /// Wait for a primary and run the handshake, up to and including the
    /// log header. A primary that fails a check is refused (it is told
    /// why) and this returns [`ChannelError::Rejected`] naming the reason.
    pub fn accept(&self) -> Result<BackupReceiver, ChannelError> {
        self.accept_inner(None)
    }

    /// [`accept`](BackupListener::accept), giving up with
    /// [`ChannelError::PeerTimeout`] if no primary connects within
    /// `timeout`.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<BackupReceiver, ChannelError> {
        self.accept_inner(Some(timeout))
    }

    fn accept_inner(&self, wait: Option<Duration>) -> Result<BackupReceiver, ChannelError> {
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
        let config = &self.config;
        let (stream, peer) = rt.block_on(async {
            let accept = self.listener.accept();
            let r = match wait {
                Some(d) => tokio::time::timeout(d, accept).await.map_err(|_| {
                    ChannelError::PeerTimeout {
                        what: "no primary connected".into(),
                        waited: d,
                    }
                })?,
                None => accept.await,
            };
            r.map_err(|e| ChannelError::io("accepting a primary", e))
        })?;
        let hs = rt.block_on(async {
            tokio::time::timeout(
                config.handshake_timeout,
                handshake(stream, config, &self.expect),
            )
            .await
            .unwrap_or_else(|_| {
                Err(ChannelError::PeerTimeout {
                    what: format!("handshake with the primary at {peer} not finished"),
                    waited: config.handshake_timeout,
                })
            })
        });
        let (rd, wr, fr, fw, header) = match hs {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "primary refused");
                return Err(e);
            }
        };
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                queue: VecDeque::new(),
                received: None,
                executed: None,
                error: None,
                close_requested: false,
                closed: false,
            }),
            cv: Condvar::new(),
            wake: Notify::new(),
        });
        let reader = {
            let shared = shared.clone();
            let timeout = config.peer_timeout;
            rt.spawn(async move {
                if let Err(e) = read_loop(&shared, rd, fr, timeout).await {
                    shared.fail(e);
                }
            })
        };
        let writer = {
            let shared = shared.clone();
            let keepalive = config.keepalive_interval;
            rt.spawn(async move {
                if let Err(e) = write_loop(&shared, wr, fw, keepalive).await {
                    shared.fail(e);
                }
            })
        };
        tracing::info!(%peer, backend = %header.backend, "primary accepted on the logging channel");
        Ok(BackupReceiver {
            shared,
            tasks: vec![reader, writer],
            rt: Some(rt),
            header,
            peer,
        })
    }
}

impl Drop for BackupListener {
    fn drop(&mut self) {
        release(self.rt.take());
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
}

struct State {
    /// Received, not yet taken by the replayer.
    queue: VecDeque<LogEntry>,
    received: Option<u64>,
    executed: Option<u64>,
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
}

impl std::fmt::Debug for BackupReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupReceiver")
            .field("peer", &self.peer)
            .field("acks", &self.acks())
            .finish_non_exhaustive()
    }
}

impl BackupReceiver {
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

type Handshaken = (
    OwnedReadHalf,
    OwnedWriteHalf,
    FrameReader,
    FrameWriter,
    LogHeader,
);

/// The backup's side of the handshake: check the version, the key, the
/// backend and the image, in that order; then read the header.
async fn handshake(
    stream: TcpStream,
    config: &ChannelConfig,
    expect: &BackupExpect,
) -> Result<Handshaken, ChannelError> {
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
    let (backend, image_digest, primary_nonce) = match fr.next(&mut rd, "reading the hello").await?
    {
        Some(Msg::Hello {
            backend,
            image_digest,
            nonce,
        }) => (backend, image_digest, nonce),
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
    Ok((rd, wr, fr, fw, header))
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
) -> Result<(), ChannelError> {
    let mut next_seq = 0u64;
    let mut last_count: Option<u64> = None;
    let mut batch = Vec::new();
    let mut last_rx = Instant::now();
    loop {
        let mut closed = false;
        let mut failure = None;
        loop {
            let at = fr.pos();
            match fr.next_buffered() {
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
        if !batch.is_empty() || closed {
            let mut st = lock(&shared.st);
            if let Some(last) = batch.last() {
                st.received = Some(last.seq);
            }
            st.queue.extend(batch.drain(..));
            st.close_requested |= closed;
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
                break (!e.is_peer_death()).then(|| e.to_string());
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
