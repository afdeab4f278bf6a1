//! Restarting redundancy: a new backup joins a running VM by live snapshot.
//!
//! A side that runs alone (a primary started without its backup, or the
//! survivor of a failover) keeps offering a new pairing to the backup
//! address it was given ([`BackupSearch`]). When a backup accepts, the
//! state moves by pre-copy while the guest keeps running:
//!
//! 1. every page of RAM, then rounds of the pages dirtied meanwhile (KVM's
//!    dirty log, through a cursor of its own), until a round finds few
//!    pages or the rounds run out ([`JoinWatch`], a pre-copy thread);
//! 2. at the next execution point the guest stops: the vCPU, every device
//!    and the run loop are captured, the last dirty pages and that state
//!    are sent ([`join_point`]); this is the only pause;
//! 3. from that point the primary records into the channel, starting with a
//!    state digest that proves both sides equal, and the output rule holds
//!    again.
//!
//! Until the join point the primary runs unprotected and releases output as
//! a lone primary does. A join that fails before it (either side killed,
//! the channel cut) leaves the primary alone, searching again; the backup,
//! which has no state to run, stops. The backup side is [`receive`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftlog::{BackupReceiver, ChannelError, JoinPart, LogHeader, PrimarySender};
use vm_memory::{Bytes, GuestAddress};
use vmm::dirty::{DirtyCursor, PageSet};
use vmm::inputs::HostInputs;
use vmm::memory::GuestRam;
use vmm::{Flow, Machine, MachineConfig, Observer};

use crate::arbiter::Arbiter;
use crate::ft_options::FtOptions;

const PAGE: usize = 4096;
/// Pages in one channel message (256 KiB).
const RUN_PAGES: usize = 64;
/// A round that finds at most this many dirty pages ends the pre-copy: the
/// rest move during the pause.
const CONVERGED_PAGES: usize = 256;
/// Rounds before the pause whatever the dirty rate (a guest writing faster
/// than the channel carries never converges).
const MAX_ROUNDS: usize = 10;
/// How often a side that runs alone tries its backup address.
const SEARCH_EVERY: Duration = Duration::from_millis(300);

/// A backup that accepted a join: its channel and the pairing generation.
pub struct Joined {
    /// The logging channel, not yet carrying entries.
    pub tx: Arc<PrimarySender>,
    /// The pairing generation the backup accepted.
    pub generation: u64,
}

/// Offers a pairing to the backup address again and again in the
/// background until a backup accepts; wakes the idle guest when one does.
pub struct BackupSearch {
    found: Arc<Mutex<Option<Joined>>>,
    stop: Arc<AtomicBool>,
    offer: Arc<(String, FtOptions, LogHeader, HostInputs)>,
}

impl BackupSearch {
    /// Start offering `header` (the guest's log header) to `peer`, under a
    /// new generation from the arbiter each time (only the latest winner
    /// may start one, so a side that lost ownership offers nothing).
    pub fn start(peer: &str, ft: &FtOptions, header: &LogHeader, wake: HostInputs) -> Self {
        let s = BackupSearch {
            found: Arc::new(Mutex::new(None)),
            stop: Arc::new(AtomicBool::new(false)),
            offer: Arc::new((peer.to_owned(), ft.clone(), header.clone(), wake)),
        };
        s.again();
        s
    }

    /// Search (again, after a join that failed).
    fn again(&self) {
        let (found, stop, offer) = (self.found.clone(), self.stop.clone(), self.offer.clone());
        // Detached: an offer in progress ends within the handshake timeout
        // and then sees `stop`.
        std::thread::spawn(move || {
            let (peer, ft, header, wake) = &*offer;
            search(peer, ft, header, &found, &stop, wake);
        });
    }

    /// The backup that accepted, once one did (taken once).
    pub fn take(&self) -> Option<Joined> {
        lock(&self.found).take()
    }
}

impl Drop for BackupSearch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // A backup that accepted after the guest ended sees the channel cut.
        drop(lock(&self.found).take());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn search(
    peer: &str,
    ft: &FtOptions,
    header: &LogHeader,
    found: &Mutex<Option<Joined>>,
    stop: &AtomicBool,
    wake: &HostInputs,
) {
    let mut last_problem = String::new();
    let mut say = |what: String| {
        if what != last_problem {
            eprintln!("ftvmm: {what}");
            last_problem = what;
        }
    };
    while !stop.load(Ordering::Acquire) {
        match offer(peer, ft, header) {
            Ok(Some(joined)) => {
                eprintln!(
                    "ftvmm: a backup at {} accepted generation {}; joining it",
                    joined.tx.peer_addr(),
                    joined.generation
                );
                *lock(found) = Some(joined);
                wake.wake();
                return;
            }
            Ok(None) => {}
            Err(e) => say(format!("no backup can join yet: {e:#}")),
        }
        std::thread::sleep(SEARCH_EVERY);
    }
}

/// One offer: Ok(None) while nobody listens at `peer`.
fn offer(peer: &str, ft: &FtOptions, header: &LogHeader) -> Result<Option<Joined>> {
    let arbiter = Arbiter::new(&ft.arbiter, &ft.node_id)?;
    let generation = arbiter
        .start_generation()
        .context("this side may not start a new pairing")?;
    let mut cfg = ft.channel_config();
    cfg.generation = generation;
    // A peer that does not finish the handshake within a few peer
    // timeouts is as good as dead: try again rather than wait longer.
    cfg.handshake_timeout = cfg
        .handshake_timeout
        .min((ft.peer_timeout * 4).max(Duration::from_secs(2)));
    match PrimarySender::connect_joining(peer, &cfg, header) {
        Ok(tx) => Ok(Some(Joined {
            tx: Arc::new(tx),
            generation,
        })),
        Err(ChannelError::Connect { .. }) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("the backup at {peer} refused the join")),
    }
}

/// What the pre-copy moved before the pause.
#[derive(Debug, Clone, Default)]
pub struct PrecopyReport {
    /// Pages sent in each round (the first is all of RAM).
    pub rounds: Vec<usize>,
    /// Time from the first page to the end of the last round.
    pub took: Duration,
}

type PrecopyResult = std::result::Result<(DirtyCursor, PrecopyReport), ChannelError>;

/// A pre-copy finished, ready for the join point.
pub struct Ready {
    /// The new pairing.
    pub joined: Joined,
    cursor: DirtyCursor,
    /// What the rounds moved.
    pub precopy: PrecopyReport,
}

/// The observer of a VM that runs alone: inputs apply as they come (as
/// [`vmm::Live`]), and when a backup has accepted, the pre-copy runs beside
/// the guest and the run pauses at the first point after it finished.
pub struct JoinWatch {
    search: BackupSearch,
    running: Option<(Joined, JoinHandle<PrecopyResult>)>,
    ready: Option<Ready>,
}

impl JoinWatch {
    /// Watch `search`.
    pub fn new(search: BackupSearch) -> Self {
        JoinWatch {
            search,
            running: None,
            ready: None,
        }
    }

    /// The finished pre-copy, after the run paused for it.
    pub fn take_ready(&mut self) -> Option<Ready> {
        self.ready.take()
    }

    /// Start or finish the pre-copy; true when the join point is here.
    fn progress(&mut self, m: &mut Machine) -> bool {
        if self.running.is_none() {
            if let Some(joined) = self.search.take() {
                let cursor = m.dirty_log().cursor();
                let (tx, wake) = (joined.tx.clone(), m.host_inputs());
                let h = std::thread::spawn(move || {
                    let r = precopy(cursor, &tx);
                    wake.wake();
                    r
                });
                self.running = Some((joined, h));
            }
            return false;
        }
        if !self.running.as_ref().is_some_and(|(_, h)| h.is_finished()) {
            return false;
        }
        let Some((joined, h)) = self.running.take() else {
            return false;
        };
        match h.join() {
            Ok(Ok((cursor, precopy))) => {
                self.ready = Some(Ready {
                    joined,
                    cursor,
                    precopy,
                });
                true
            }
            Ok(Err(e)) => {
                eprintln!("ftvmm: the join failed during the pre-copy ({e}); running alone, waiting for the next backup");
                joined.tx.abort(format!("the join failed: {e}"));
                self.search.again();
                false
            }
            Err(_) => {
                eprintln!("ftvmm: the pre-copy thread panicked; running alone, waiting for the next backup");
                joined.tx.abort("the primary's pre-copy failed");
                self.search.again();
                false
            }
        }
    }
}

impl Observer for JoinWatch {
    fn at_point(&mut self, m: &mut Machine) -> vmm::Result<Flow> {
        // Pause before taking this point's inputs: the recorder takes and
        // logs them, so the backup sees them at the same point.
        if self.progress(m) {
            return Ok(Flow::Pause);
        }
        for input in m.poll_host_inputs() {
            m.apply(&input);
        }
        Ok(Flow::Continue)
    }
}

/// Send every page in `pages`, in runs of contiguous pages.
fn send_pages(tx: &PrimarySender, mem: &GuestRam, pages: &PageSet) -> Result<(), ChannelError> {
    let mut run: Option<(usize, usize)> = None;
    let flush = |first: usize, n: usize| -> Result<(), ChannelError> {
        let mut data = vec![0u8; n * PAGE];
        mem.read_slice(&mut data, GuestAddress((first * PAGE) as u64))
            .map_err(|e| ChannelError::BadEntry(format!("reading guest page {first}: {e}")))?;
        tx.send_pages(first as u64, data)
    };
    for p in pages.iter() {
        run = match run {
            Some((first, n)) if first + n == p && n < RUN_PAGES => Some((first, n + 1)),
            Some((first, n)) => {
                flush(first, n)?;
                Some((p, 1))
            }
            None => Some((p, 1)),
        };
    }
    match run {
        Some((first, n)) => flush(first, n),
        None => Ok(()),
    }
}

/// The rounds before the pause, on their own thread while the guest runs.
fn precopy(mut cursor: DirtyCursor, tx: &PrimarySender) -> PrecopyResult {
    let mem = cursor.log().memory().clone();
    let start = Instant::now();
    let mut report = PrecopyReport::default();
    loop {
        let t = Instant::now();
        let dirty = cursor.take();
        let n = dirty.pages.count();
        send_pages(tx, &mem, &dirty.pages)?;
        let secs = t.elapsed().as_secs_f64().max(1e-6);
        eprintln!(
            "ftvmm: join pre-copy round {}: {n} pages ({:.1} MiB) in {:.0} ms, {:.0} MB/s",
            report.rounds.len() + 1,
            (n * PAGE) as f64 / (1 << 20) as f64,
            secs * 1e3,
            (n * PAGE) as f64 / secs / 1e6
        );
        report.rounds.push(n);
        if (dirty.exact && n <= CONVERGED_PAGES) || report.rounds.len() >= MAX_ROUNDS {
            break;
        }
    }
    report.took = start.elapsed();
    Ok((cursor, report))
}

/// What the pause at the join point took.
#[derive(Debug, Clone)]
pub struct JoinReport {
    /// The pre-copy before it.
    pub precopy: PrecopyReport,
    /// Pages sent during the pause.
    pub last_pages: usize,
    /// How long the guest was stopped.
    pub pause: Duration,
}

/// At the join point (the run paused for `ready`): capture the VM, send the
/// pages dirtied since the last round and the state. The guest is stopped
/// only for this.
pub fn join_point(m: &mut Machine, ready: Ready) -> Result<(Joined, JoinReport)> {
    let Ready {
        joined,
        mut cursor,
        precopy,
    } = ready;
    let start = Instant::now();
    // The state first: finishing the pending I/O may write guest memory.
    let state = m
        .snapshot_state()
        .context("cannot capture the VM at the join point")?;
    let last = cursor.take();
    send_pages(&joined.tx, m.memory(), &last.pages)?;
    let encoded = vmm::snapshot::encode(&state)?;
    joined.tx.send_join_state(encoded)?;
    let pause = start.elapsed();
    let point = m.point()?;
    eprintln!(
        "ftvmm: join point at {point}: {} pages in the pause, guest paused {:.1} ms; \
         protected again from here (generation {})",
        last.pages.count(),
        pause.as_secs_f64() * 1e3,
        joined.generation
    );
    let report = JoinReport {
        precopy,
        last_pages: last.pages.count(),
        pause,
    };
    Ok((joined, report))
}

/// The backup's side of a join: take the primary's pages and its state at
/// the join point, and build the VM there (with `cfg`'s output sink, point
/// mode and timers).
pub fn receive(rx: &BackupReceiver, cfg: MachineConfig) -> Result<Machine> {
    let mem_mib = u64::from(rx.header().mem_mib);
    let size = usize::try_from(mem_mib << 20).context("guest RAM too large for this host")?;
    let mut ram = vec![0u8; size];
    let start = Instant::now();
    let mut received = 0usize;
    let mut next_report = 16usize << 20;
    eprintln!("ftvmm: joining the running primary: receiving its RAM ({mem_mib} MiB)");
    let state = loop {
        match rx
            .next_join_part()
            .context("the primary went away during the join")?
        {
            JoinPart::Pages { first, data } => {
                let at = usize::try_from(first)
                    .ok()
                    .and_then(|f| f.checked_mul(PAGE))
                    .filter(|at| at.checked_add(data.len()).is_some_and(|end| end <= size));
                let Some(at) = at else {
                    bail!(
                        "the primary sent pages from page {first} ({} bytes) beyond the guest's {mem_mib} MiB",
                        data.len()
                    );
                };
                ram[at..at + data.len()].copy_from_slice(&data);
                received += data.len();
                if received >= next_report {
                    let secs = start.elapsed().as_secs_f64().max(1e-6);
                    eprintln!(
                        "ftvmm: join: {} MiB received, {:.0} MB/s",
                        received >> 20,
                        received as f64 / secs / 1e6
                    );
                    next_report += 16 << 20;
                }
            }
            JoinPart::State(bytes) => break bytes,
        }
    };
    let mut snap = vmm::snapshot::decode(&state).context("the primary's join state")?;
    if snap.mem_mib != mem_mib {
        bail!(
            "the primary's join state is for {} MiB of RAM, its log header says {mem_mib} MiB",
            snap.mem_mib
        );
    }
    snap.memory = ram;
    let m = Machine::restore(&snap, cfg).context("cannot build the VM from the join state")?;
    eprintln!(
        "ftvmm: joined: {:.1} MiB of pages and the state in {:.0} ms",
        received as f64 / (1 << 20) as f64,
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(m)
}
