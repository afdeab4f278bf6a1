//! A failure-injection relay for the logging channel: a TCP proxy on
//! 127.0.0.1 between a primary and its backup that forwards both directions
//! and, at a chosen entry, tick or time, cuts the link, ends it (FIN or RST),
//! delays it, truncates a frame in the middle, or freezes the acks the
//! primary gets (both fields, or only `executed` while `received` goes on:
//! a backup that "acks receipt but never executes").
//!
//! It understands the channel's framing (docs/channel.md: a 12-byte preamble
//! each way, then frames of u32 LE length, u32 LE CRC-32, payload) through
//! `ftlog::channel::inspect`, so it counts what it forwards (entries, ticks,
//! acks, bytes) for a test to assert on. A stream that is not a channel is
//! forwarded byte for byte.
//!
//! ```no_run
//! use ftvmm::testkit::relay::{Ending, Fault, Relay, Trigger};
//! let relay = Relay::start("127.0.0.1:7000".parse().unwrap()).unwrap();
//! // Point the primary at 127.0.0.1:{relay.port()}; cut just before tick 50.
//! relay.arm(Trigger::Tick(50), Fault::Cut);
//! relay.arm(Trigger::Entry(900), Fault::Truncate { keep: None, then: Ending::Close });
//! ```

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use ftlog::channel::inspect::{self, Acks, MsgKind};
use ftlog::channel::{CHANNEL_MAGIC, CHANNEL_PREAMBLE_LEN};
use ftlog::EntryKind;

/// Which way bytes flow through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the primary to the backup (entries).
    ToBackup,
    /// From the backup to the primary (acks).
    ToPrimary,
}

/// How the relay ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A FIN both ways: what the kernel sends for a killed process.
    Close,
    /// A RST both ways.
    Reset,
}

/// What the relay does to the link from the moment it takes effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Stop forwarding both ways; the connections stay open (a cut network
    /// link). Bytes that arrive are read and dropped.
    Cut,
    /// End every connection this way, and close later ones at once.
    End(Ending),
    /// Forward every frame this much later (without limiting throughput).
    Delay(Duration),
    /// Forward only the first `keep` bytes (None: the head and half the
    /// payload; at most all but the last byte) of the next entry frame,
    /// then end the connection with `then`: a primary killed in the middle
    /// of a write.
    Truncate {
        /// Bytes of the frame to forward.
        keep: Option<usize>,
        /// How the connection ends after them.
        then: Ending,
    },
    /// Keep forwarding entries, but tell the primary the acks it had been
    /// told when this took effect, both fields: a backup that stops
    /// acknowledging while its bytes still arrive.
    FreezeAcks,
    /// Tell the primary the backup's real `received`, but the `executed` it
    /// had been told when this took effect: a backup that acks receipt but
    /// never executes.
    FreezeExecuted,
    /// Undo `Cut`, `Delay` and the freezes (not an end or a truncation).
    Heal,
}

/// When an armed fault takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// At once.
    Now,
    /// Just before the relay handles entry number `n` (counting every entry
    /// frame from the primary over the relay's life from 0): after `n`
    /// entries.
    Entry(u64),
    /// Just before the relay handles the `n`th timer tick (an `irq-raise`
    /// of IRQ 0; the first is 1).
    Tick(u64),
    /// This long after [`Relay::arm`].
    After(Duration),
}

/// What went through the relay.
#[derive(Debug, Clone, Default)]
pub struct RelayCounters {
    /// Connections accepted from primaries.
    pub connections: u64,
    /// Entry frames the primary sent (handled, whatever became of them).
    pub entries_seen: u64,
    /// Entry frames forwarded whole to the backup.
    pub entries_forwarded: u64,
    /// Timer ticks (irq-raise of IRQ 0) among them.
    pub ticks_forwarded: u64,
    /// The seq of the last entry forwarded whole.
    pub last_seq_forwarded: Option<u64>,
    /// Frames dropped because the link was cut or ended.
    pub frames_dropped: u64,
    /// Bytes written to the backup and to the primary.
    pub bytes_to_backup: u64,
    /// Bytes written to the primary.
    pub bytes_to_primary: u64,
    /// Ack frames from the backup, and how many were rewritten.
    pub acks_seen: u64,
    /// Ack frames rewritten by a freeze.
    pub acks_rewritten: u64,
    /// The latest acks the backup sent.
    pub backup_acks: Acks,
    /// The latest acks forwarded to the primary (what it was told).
    pub primary_told: Acks,
    /// A truncated frame: (its length, bytes forwarded).
    pub truncated: Option<(u64, u64)>,
    /// Faults as they took effect, with the time since the relay started.
    pub faults: Vec<(Duration, Fault)>,
    /// Complete frames seen, by direction and message kind (forwarded or
    /// not).
    pub frames: HashMap<(Direction, MsgKind), u64>,
}

impl RelayCounters {
    /// Frames of `kind` seen going `dir`.
    pub fn frames_of(&self, dir: Direction, kind: MsgKind) -> u64 {
        self.frames.get(&(dir, kind)).copied().unwrap_or(0)
    }
}

/// A frame rewriter: gets each complete frame, returns its replacement.
pub type Rewrite = Box<dyn FnMut(&[u8]) -> Option<Vec<u8>> + Send>;

/// The relay. Dropping it ends every connection and stops listening.
pub struct Relay {
    port: u16,
    shared: Arc<Shared>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freeze {
    None,
    Both(Acks),
    Executed(Option<u64>),
}

struct State {
    counters: RelayCounters,
    plan: Vec<(Trigger, Fault)>,
    ticks_seen: u64,
    cut: bool,
    ended: Option<Ending>,
    delay: Duration,
    truncate: Option<(Option<usize>, Ending)>,
    freeze: Freeze,
    rewrite_to_backup: Option<Rewrite>,
    rewrite_to_primary: Option<Rewrite>,
    conns: Vec<Weak<Conn>>,
}

struct Shared {
    st: Mutex<State>,
    cv: Condvar,
    stop: AtomicBool,
    start: Instant,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One relayed connection: the primary's socket and ours to the backup.
/// Both close when the last thread using them lets go.
struct Conn {
    primary: TcpStream,
    backup: TcpStream,
    dead: AtomicBool,
}

impl Conn {
    fn sock(&self, to: Direction) -> &TcpStream {
        match to {
            Direction::ToBackup => &self.backup,
            Direction::ToPrimary => &self.primary,
        }
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// End both sides. A reset needs every handle closed with a zero
    /// linger, so it only wakes the readers; their threads then let go.
    fn end(&self, how: Ending) {
        self.dead.store(true, Ordering::Release);
        for s in [&self.primary, &self.backup] {
            match how {
                Ending::Close => {
                    let _ = s.shutdown(Shutdown::Both);
                }
                Ending::Reset => {
                    set_linger_zero(s);
                    let _ = s.shutdown(Shutdown::Read);
                }
            }
        }
    }
}

fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes from a live
    // local; the fd belongs to `s`, which outlives the call.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

impl Relay {
    /// Listen on an ephemeral port of 127.0.0.1 and relay every connection
    /// to `backup` (retried for up to 10 s: the backup may still be
    /// starting).
    pub fn start(backup: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                counters: RelayCounters::default(),
                plan: Vec::new(),
                ticks_seen: 0,
                cut: false,
                ended: None,
                delay: Duration::ZERO,
                truncate: None,
                freeze: Freeze::None,
                rewrite_to_backup: None,
                rewrite_to_primary: None,
                conns: Vec::new(),
            }),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            start: Instant::now(),
        });
        let s = shared.clone();
        std::thread::spawn(move || accept_loop(listener, backup, s));
        Ok(Relay { port, shared })
    }

    /// The port primaries connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// "127.0.0.1:port", for `--peer`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Make `fault` take effect at `when`.
    pub fn arm(&self, when: Trigger, fault: Fault) {
        match when {
            Trigger::Now => activate(&self.shared, &mut lock(&self.shared.st), fault, None),
            Trigger::After(d) => {
                let weak = Arc::downgrade(&self.shared);
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    if let Some(s) = weak.upgrade() {
                        if !s.stop.load(Ordering::Acquire) {
                            activate(&s, &mut lock(&s.st), fault, None);
                        }
                    }
                });
            }
            Trigger::Entry(_) | Trigger::Tick(_) => lock(&self.shared.st).plan.push((when, fault)),
        }
    }

    /// Replace frames going `dir`: `f` sees each complete frame and returns
    /// its replacement (None: forward it unchanged).
    pub fn rewrite(&self, dir: Direction, f: Rewrite) {
        let mut st = lock(&self.shared.st);
        match dir {
            Direction::ToBackup => st.rewrite_to_backup = Some(f),
            Direction::ToPrimary => st.rewrite_to_primary = Some(f),
        }
    }

    /// What went through so far.
    pub fn counters(&self) -> RelayCounters {
        lock(&self.shared.st).counters.clone()
    }

    /// Wait until `pred` holds for the counters (true) or `timeout` passes
    /// (false).
    pub fn wait_until(&self, timeout: Duration, pred: impl Fn(&RelayCounters) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.st);
        loop {
            if pred(&st.counters) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let conns: Vec<_> = lock(&self.shared.st)
            .conns
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for c in conns {
            c.end(Ending::Close);
        }
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Put `fault` into effect. An end triggered by an entry spares `deferred`
/// (the connection that entry came on): its pump ends it in order, after
/// what it already handed to its writer.
fn activate(shared: &Shared, st: &mut State, fault: Fault, deferred: Option<&Arc<Conn>>) {
    st.counters
        .faults
        .push((shared.start.elapsed(), fault.clone()));
    match fault {
        Fault::Cut => st.cut = true,
        Fault::End(how) => {
            st.ended = Some(how);
            for c in st.conns.iter().filter_map(Weak::upgrade) {
                if !deferred.is_some_and(|d| Arc::ptr_eq(d, &c)) {
                    c.end(how);
                }
            }
        }
        Fault::Delay(d) => st.delay = d,
        Fault::Truncate { keep, then } => st.truncate = Some((keep, then)),
        Fault::FreezeAcks => st.freeze = Freeze::Both(st.counters.primary_told),
        Fault::FreezeExecuted => st.freeze = Freeze::Executed(st.counters.primary_told.executed),
        Fault::Heal => {
            st.ended = None;
            st.cut = false;
            st.delay = Duration::ZERO;
            st.freeze = Freeze::None;
        }
    }
    shared.cv.notify_all();
}

fn accept_loop(listener: TcpListener, backup: SocketAddr, shared: Arc<Shared>) {
    for incoming in listener.incoming() {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(primary) = incoming else { continue };
        let s = shared.clone();
        std::thread::spawn(move || relay_connection(primary, backup, s));
    }
}

fn connect_backup(backup: SocketAddr, shared: &Shared) -> Option<TcpStream> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) && !shared.stop.load(Ordering::Acquire) {
        if let Ok(s) = TcpStream::connect_timeout(&backup, Duration::from_secs(1)) {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn relay_connection(primary: TcpStream, backup: SocketAddr, shared: Arc<Shared>) {
    let ended = lock(&shared.st).ended;
    if let Some(how) = ended {
        if how == Ending::Reset {
            set_linger_zero(&primary);
        }
        return;
    }
    let Some(b) = connect_backup(backup, &shared) else {
        return;
    };
    let _ = primary.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let conn = Arc::new(Conn {
        primary,
        backup: b,
        dead: AtomicBool::new(false),
    });
    {
        let mut st = lock(&shared.st);
        st.conns.retain(|w| w.strong_count() > 0);
        st.conns.push(Arc::downgrade(&conn));
        st.counters.connections += 1;
        shared.cv.notify_all();
    }
    for dir in [Direction::ToBackup, Direction::ToPrimary] {
        let (tx, rx) = channel();
        let (c, s) = (conn.clone(), shared.clone());
        std::thread::spawn(move || writer(c, dir, rx, s));
        let (c, s) = (conn.clone(), shared.clone());
        std::thread::spawn(move || Pump::new(c, dir, tx, s).run());
    }
}

/// What a pump asks its writer to do.
enum Cmd {
    /// Write these bytes at `due`.
    Data(Instant, Vec<u8>),
    /// The source closed: pass the FIN on.
    HalfClose,
    /// End the whole connection (after a truncated frame, or a reset).
    End(Instant, Ending),
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn writer(conn: Arc<Conn>, dir: Direction, rx: Receiver<Cmd>, shared: Arc<Shared>) {
    let mut into = conn.sock(dir);
    let mut broken = false;
    for cmd in rx {
        match cmd {
            Cmd::Data(due, bytes) => {
                sleep_until(due);
                if broken || conn.is_dead() {
                    continue;
                }
                if into.write_all(&bytes).is_err() {
                    broken = true;
                    continue;
                }
                let mut st = lock(&shared.st);
                match dir {
                    Direction::ToBackup => st.counters.bytes_to_backup += bytes.len() as u64,
                    Direction::ToPrimary => st.counters.bytes_to_primary += bytes.len() as u64,
                }
                shared.cv.notify_all();
            }
            Cmd::HalfClose => {
                if !conn.is_dead() {
                    let _ = into.shutdown(Shutdown::Write);
                }
            }
            Cmd::End(due, how) => {
                sleep_until(due);
                conn.end(how);
            }
        }
    }
}

/// Reads one direction, frame by frame, and hands what may pass to the
/// writer.
struct Pump {
    conn: Arc<Conn>,
    dir: Direction,
    tx: Sender<Cmd>,
    shared: Arc<Shared>,
    buf: VecDeque<u8>,
    /// Preamble bytes still to pass before the frames start.
    preamble_left: usize,
    /// Not a channel (or a frame too large to wait for): bytes pass as is.
    raw: bool,
    /// A frame was truncated: nothing more passes.
    truncated: bool,
}

impl Pump {
    fn new(conn: Arc<Conn>, dir: Direction, tx: Sender<Cmd>, shared: Arc<Shared>) -> Pump {
        Pump {
            conn,
            dir,
            tx,
            shared,
            buf: VecDeque::new(),
            preamble_left: CHANNEL_PREAMBLE_LEN,
            raw: false,
            truncated: false,
        }
    }

    fn from(&self) -> &TcpStream {
        match self.dir {
            Direction::ToBackup => &self.conn.primary,
            Direction::ToPrimary => &self.conn.backup,
        }
    }

    fn run(mut self) {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match self.from().read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A reset (or any error) on one side: reset the other.
                    let how = if e.kind() == ErrorKind::ConnectionReset {
                        Ending::Reset
                    } else {
                        Ending::Close
                    };
                    self.flush_partial();
                    let _ = self.tx.send(Cmd::End(Instant::now(), how));
                    return;
                }
            };
            if self.conn.is_dead() {
                return;
            }
            if n == 0 {
                // What a killed sender left half written still goes on.
                self.flush_partial();
                let _ = self.tx.send(Cmd::HalfClose);
                return;
            }
            self.buf.extend(&chunk[..n]);
            self.process();
        }
    }

    /// Pass on bytes of an incomplete frame (the source is gone).
    fn flush_partial(&mut self) {
        if self.buf.is_empty() || self.truncated {
            return;
        }
        let bytes: Vec<u8> = self.buf.drain(..).collect();
        let st = lock(&self.shared.st);
        if st.cut || st.ended.is_some() {
            return;
        }
        let due = Instant::now() + st.delay;
        drop(st);
        let _ = self.tx.send(Cmd::Data(due, bytes));
    }

    fn process(&mut self) {
        if self.preamble_left > 0 {
            let k = self.preamble_left.min(self.buf.len());
            let seen: Vec<u8> = self.buf.drain(..k).collect();
            let at = CHANNEL_PREAMBLE_LEN - self.preamble_left;
            let magic_end = CHANNEL_MAGIC.len().min(at + k);
            if at < magic_end && seen[..magic_end - at] != CHANNEL_MAGIC[at..magic_end] {
                self.raw = true;
            }
            self.preamble_left -= k;
            self.pass(seen);
        }
        if self.raw {
            let bytes: Vec<u8> = self.buf.drain(..).collect();
            if !bytes.is_empty() {
                self.pass(bytes);
            }
            return;
        }
        loop {
            let head: Vec<u8> = self.buf.iter().take(inspect::FRAME_HEAD).copied().collect();
            let Some(len) = inspect::frame_len(&head) else {
                return;
            };
            if len > inspect::FRAME_HEAD as u64 + u64::from(inspect::MAX_PAYLOAD) {
                // Not ours to judge: pass it on as bytes.
                self.raw = true;
                let bytes: Vec<u8> = self.buf.drain(..).collect();
                self.pass(bytes);
                return;
            }
            let len = len as usize;
            if self.buf.len() < len {
                return;
            }
            let frame: Vec<u8> = self.buf.drain(..len).collect();
            self.frame(frame);
        }
    }

    /// One complete frame.
    fn frame(&mut self, frame: Vec<u8>) {
        let kind = inspect::kind(&frame);
        let mut st = lock(&self.shared.st);
        if let Some(k) = kind {
            *st.counters.frames.entry((self.dir, k)).or_default() += 1;
        }
        let mut frame = frame;
        match (self.dir, kind) {
            (Direction::ToBackup, Some(MsgKind::Entry)) => {
                let entry = inspect::entry(&frame);
                let is_tick = matches!(
                    entry.as_ref().map(|e| &e.kind),
                    Some(EntryKind::IrqRaise { irq: 0 })
                );
                let index = st.counters.entries_seen;
                if is_tick {
                    st.ticks_seen += 1;
                }
                let ticks = st.ticks_seen;
                let due: Vec<Fault> = {
                    let mut fire = Vec::new();
                    st.plan.retain(|(t, f)| {
                        let now = match t {
                            Trigger::Entry(n) => *n <= index,
                            Trigger::Tick(n) => is_tick && *n <= ticks,
                            _ => false,
                        };
                        if now {
                            fire.push(f.clone());
                        }
                        !now
                    });
                    fire
                };
                for f in due {
                    if let Fault::End(how) = f {
                        let at = Instant::now() + st.delay;
                        let _ = self.tx.send(Cmd::End(at, how));
                    }
                    activate(&self.shared, &mut st, f, Some(&self.conn));
                }
                st.counters.entries_seen += 1;
                if let Some((keep, then)) = st.truncate.take() {
                    if !(st.cut || st.ended.is_some()) {
                        let k = keep
                            .unwrap_or(
                                inspect::FRAME_HEAD + (frame.len() - inspect::FRAME_HEAD) / 2,
                            )
                            .min(frame.len() - 1);
                        st.counters.truncated = Some((frame.len() as u64, k as u64));
                        let due = Instant::now() + st.delay;
                        frame.truncate(k);
                        self.truncated = true;
                        self.shared.cv.notify_all();
                        drop(st);
                        let _ = self.tx.send(Cmd::Data(due, frame));
                        let _ = self.tx.send(Cmd::End(due, then));
                        return;
                    }
                }
                if !(st.cut || st.ended.is_some() || self.truncated) {
                    st.counters.entries_forwarded += 1;
                    if is_tick {
                        st.counters.ticks_forwarded += 1;
                    }
                    if let Some(e) = &entry {
                        st.counters.last_seq_forwarded = Some(e.seq);
                    }
                }
            }
            (Direction::ToPrimary, Some(MsgKind::Ack)) => {
                if let Some(real) = inspect::acks(&frame) {
                    st.counters.acks_seen += 1;
                    st.counters.backup_acks = real;
                    let told = match st.freeze {
                        Freeze::None => real,
                        Freeze::Both(a) => a,
                        Freeze::Executed(e) => Acks {
                            received: real.received,
                            executed: e,
                        },
                    };
                    if told != real {
                        st.counters.acks_rewritten += 1;
                        frame = inspect::ack_frame(told);
                    }
                    if !(st.cut || st.ended.is_some()) {
                        st.counters.primary_told = told;
                    }
                }
            }
            _ => {}
        }
        let rewrite = match self.dir {
            Direction::ToBackup => st.rewrite_to_backup.as_mut(),
            Direction::ToPrimary => st.rewrite_to_primary.as_mut(),
        };
        if let Some(f) = rewrite {
            if let Some(new) = f(&frame) {
                frame = new;
            }
        }
        drop(st);
        self.pass(frame);
    }

    /// Hand bytes to the writer unless the link is cut or ended.
    fn pass(&mut self, bytes: Vec<u8>) {
        let mut st = lock(&self.shared.st);
        if st.cut || st.ended.is_some() || self.truncated {
            st.counters.frames_dropped += 1;
            self.shared.cv.notify_all();
            return;
        }
        let due = Instant::now() + st.delay;
        self.shared.cv.notify_all();
        drop(st);
        let _ = self.tx.send(Cmd::Data(due, bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that echoes nothing but records what it got.
    fn sink() -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            got
        });
        (addr, h)
    }

    #[test]
    fn bytes_that_are_not_a_channel_pass_unchanged() {
        let (addr, got) = sink();
        let relay = Relay::start(addr).unwrap();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(got.join().unwrap(), b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(relay.counters().connections, 1);
    }
}
