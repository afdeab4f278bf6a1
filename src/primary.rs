//! The primary: runs the guest, records into the logging channel, and
//! releases output only when the backup has the entries it depends on.
//!
//! How a pairing ends on the primary:
//! - the guest ends and the backup acknowledges the end of the log: every
//!   output is acknowledged and released, the channel closes cleanly;
//! - anything else (the channel fails, the end is not acknowledged in time,
//!   the backup is declared dead by its heartbeats or by the lag bound) is
//!   a channel failure: the primary cuts the channel, asks the arbiter, and
//!   either goes on alone (releasing what it held) or stops (dropping what
//!   the backup never acknowledged);
//! - the VMM itself fails: the primary cuts the channel so the backup takes
//!   over, and stops without releasing anything unacknowledged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use ftlog::{ChannelConfig, PrimarySender};
use netdev::OutputGate;
use vmm::points::PointMode;
use vmm::record::Recorder;
use vmm::{Live, Machine, MachineConfig, RunEnd};

use crate::arbiter::Arbiter;
use crate::ft_options::FtOptions;
use crate::generation;
use crate::go_live::win_arbiter;
use crate::heartbeat::{PeerWatch, Role};
use crate::join::{join_point, BackupSearch, JoinReport, JoinWatch};
use crate::net::{self, LiveTap};
use crate::output::{ConsoleFile, ConsoleTarget, Direct, GatedOutputs, Output};
use crate::release::OutputRelease;
use crate::rr::{header_for, RecordOptions};
use crate::throttle::{ThrottleBounds, Throttled};

/// What the primary measured, for the status line and the benchmarks.
#[derive(Debug, Default, Clone)]
pub struct PrimaryReport {
    /// How the guest stopped.
    pub end: Option<RunEnd>,
    /// How long each console write was held by the output rule.
    pub output_delays: Vec<Duration>,
    /// How long each network frame was held by the output rule.
    pub frame_delays: Vec<Duration>,
    /// Channel round trips (write of a batch to its ack), sampled.
    pub ack_latencies: Vec<Duration>,
    /// Log bytes written to the channel.
    pub log_bytes: u64,
    /// Log entries written.
    pub log_entries: u64,
    /// Every backup that joined the running guest.
    pub joins: Vec<JoinReport>,
}

/// A status line every 2 s: entries, bytes, ack latency, lag, held output.
fn spawn_status(
    generation: u64,
    tx: Arc<PrimarySender>,
    gate: OutputGate<Output>,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut last = (0u64, 0u64, Instant::now());
        while !done.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(100));
            if last.2.elapsed() < Duration::from_secs(2) {
                continue;
            }
            let s = tx.stats();
            let secs = last.2.elapsed().as_secs_f64();
            eprintln!(
                "[primary {:.0}s] generation {generation}, {}; {:.0} entries/s, {:.0} bytes/s, ack latency {:?}, lag {} entries, {} outputs held",
                start.elapsed().as_secs_f64(),
                if s.lag < 1000 { "in sync" } else { "backup lagging" },
                (s.entries_written - last.0) as f64 / secs,
                (s.bytes_written - last.1) as f64 / secs,
                s.ack_latency,
                s.lag,
                gate.held()
            );
            last = (s.entries_written, s.bytes_written, Instant::now());
        }
    })
}

/// Connect to the backup at boot, retrying for `wait` while it is not
/// listening yet; None if nobody listened in that time (the guest then
/// boots alone and the backup joins later). A backup that refuses is an
/// error: the two sides are configured differently.
fn connect_at_boot(
    peer: &str,
    cfg: &ChannelConfig,
    header: &ftlog::LogHeader,
    wait: Duration,
) -> Result<Option<PrimarySender>> {
    let start = Instant::now();
    loop {
        match PrimarySender::connect(peer, cfg, header) {
            Ok(tx) => return Ok(Some(tx)),
            // A backup that refuses us, or fails to prove the key, is
            // configured differently: an error. Anything else (nobody
            // listening yet, a connection that broke) is no backup yet.
            Err(
                e @ (ftlog::ChannelError::Refused(_)
                | ftlog::ChannelError::BackupAuth
                | ftlog::ChannelError::Config(_)),
            ) => return Err(e).with_context(|| format!("cannot pair with the backup at {peer}")),
            Err(e) if start.elapsed() < wait => {
                tracing::debug!("no backup at {peer} yet: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(_) => return Ok(None),
        }
    }
}

/// How the paired run ended.
enum PairEnd {
    /// The guest ended and the backup acknowledged the whole log.
    Complete(RunEnd),
    /// The channel failed (or the backup was declared dead), with the
    /// guest's end if it had ended.
    ChannelFailed(String, Option<RunEnd>),
    /// The VMM failed.
    VmFailed(vmm::Error),
}

/// Run the guest paired: record, and at the guest's end have the backup
/// acknowledge the end of the log.
fn run_paired(m: &mut Machine, rec: Throttled, tx: &PrimarySender, ft: &FtOptions) -> PairEnd {
    let mut rec = rec;
    let run = m.run(&mut rec);
    let gave_up = rec.gave_up().map(str::to_owned);
    let mut rec = rec.into_recorder();
    let end = match run {
        Ok(end) => end,
        Err(e) => {
            return match (tx.error(), gave_up) {
                (_, Some(why)) => PairEnd::ChannelFailed(why, None),
                (Some(_), None) => PairEnd::ChannelFailed(e.to_string(), None),
                (None, None) => PairEnd::VmFailed(e),
            };
        }
    };
    if let Err(e) = rec.finish(m, end) {
        return PairEnd::ChannelFailed(format!("cannot log the end of the guest ({e})"), Some(end));
    }
    // The end of the log is the last entry; every output is tagged at or
    // below it. Until the backup acknowledges it, none of the outputs held
    // for it may go out without the arbiter.
    let last = tx.next_seq().saturating_sub(1);
    let wait = ft.peer_timeout * 2;
    match tx.wait_received(last, wait) {
        Ok(true) => PairEnd::Complete(end),
        Ok(false) => PairEnd::ChannelFailed(
            format!("the backup did not acknowledge the end of the log within {wait:?}"),
            Some(end),
        ),
        Err(e) => PairEnd::ChannelFailed(
            format!("the logging channel failed before the end of the log was acknowledged ({e})"),
            Some(end),
        ),
    }
}

/// Declare the backup dead when its heartbeats stop: through the channel,
/// so the guest stops at once wherever the vCPU waits.
fn watch_heartbeats(
    ft: &FtOptions,
    generation: u64,
    tx: &Arc<PrimarySender>,
) -> Result<Option<PeerWatch>> {
    let Some(hb) = ft.heartbeat(Role::Primary, generation)? else {
        return Ok(None);
    };
    let tx = tx.clone();
    Ok(Some(hb.watch(move |silent| {
        tx.abort(format!("the backup's heartbeats stopped {silent:?} ago"));
    })))
}

/// Pair with the backup at `peer` at boot: offer a new generation,
/// connect, and claim the boot once the backup accepted (generation.rs).
/// None: no backup listened within `--backup-wait-ms`; the boot was
/// claimed alone and a backup may join later.
fn pair_at_boot(
    peer: &str,
    ft: &FtOptions,
    header: &ftlog::LogHeader,
) -> Result<Option<(Arc<PrimarySender>, u64)>> {
    let arbiter = Arbiter::new(&ft.arbiter, &ft.node_id)?;
    let generation = generation::offer(&arbiter)?;
    let mut channel = ft.channel_config();
    channel.generation = generation;
    let Some(tx) = connect_at_boot(peer, &channel, header, ft.backup_wait)? else {
        let boot = generation::claim_alone(&arbiter)?;
        eprintln!(
            "ftvmm: {} found no backup at {peer} within {:?}; booting alone as generation {boot}, \
             a backup may join at any time",
            ft.node_id, ft.backup_wait
        );
        return Ok(None);
    };
    let tx = Arc::new(tx);
    if let Err(e) = generation::claim_boot(&arbiter, generation) {
        tx.abort(e.to_string());
        return Err(e);
    }
    eprintln!(
        "ftvmm: {} paired with the backup at {} as generation {generation}",
        ft.node_id,
        tx.peer_addr()
    );
    Ok(Some((tx, generation)))
}

/// After the paired run: close cleanly with everything acknowledged, or
/// let the arbiter decide whether this side goes on alone.
fn end_pairing(
    paired: PairEnd,
    tx: &PrimarySender,
    release: &OutputRelease,
    ft: &FtOptions,
    generation: u64,
) -> Result<Paired> {
    match paired {
        PairEnd::Complete(end) => {
            release.acknowledged(tx.next_seq().saturating_sub(1));
            match tx.close() {
                Ok(_) => eprintln!("ftvmm: the backup has the whole log; logging channel closed"),
                // Everything was acknowledged: nothing depends on the close.
                Err(e) => eprintln!(
                    "ftvmm: the backup has the whole log; the logging channel did not close cleanly ({e})"
                ),
            }
            Ok(Paired::GuestEnded(end))
        }
        PairEnd::ChannelFailed(why, end) => {
            // The arbiter first: a backup declared dead (lagging, silent)
            // is the worst side to take over. Then cut the channel, so a
            // backup that is still there stops waiting.
            let won = win_arbiter(ft, generation, &why);
            tx.abort(why);
            let alone = won?;
            release.go_alone(&alone);
            Ok(match end {
                Some(end) => Paired::GuestEnded(end),
                None => Paired::Alone,
            })
        }
        PairEnd::VmFailed(e) => {
            tx.abort(format!("the primary's VM failed: {e}"));
            Err(anyhow!(e).context("the VM failed; the backup takes over"))
        }
    }
}

/// How a pairing ended for a side that goes on.
enum Paired {
    /// The guest ended (the backup has the whole log, or this side won the
    /// arbiter after the guest's end).
    GuestEnded(RunEnd),
    /// The backup is gone and this side won the arbiter: it runs alone and
    /// accepts the next backup.
    Alone,
}

/// What a live VM needs besides the machine: where its outputs go, and
/// what it offers a joining backup.
pub struct LiveSide<'a> {
    /// The FT options.
    pub ft: &'a FtOptions,
    /// The guest's log header (the same for every pairing of this VM).
    pub header: &'a ftlog::LogHeader,
    /// The console file, written at stream offsets.
    pub console: ConsoleFile,
    /// The guest's TAP, when it has a network device.
    pub tap: Option<netdev::Tap>,
    /// Where a new backup listens; None: this side never pairs again.
    pub peer: Option<&'a str>,
}

impl LiveSide<'_> {
    fn direct(&self) -> Box<Direct> {
        Box::new(Direct::new(
            ConsoleTarget::File(self.console.clone()),
            self.tap.clone(),
        ))
    }
}

/// Record one pairing of `m` into `tx`: outputs wait for the backup's
/// acknowledgements; a join starts with a state digest at the join point.
fn run_pairing(
    m: &mut Machine,
    tx: Arc<PrimarySender>,
    generation: u64,
    side: &LiveSide<'_>,
    joined: bool,
    report: &mut PrimaryReport,
) -> Result<Paired> {
    let ft = side.ft;
    // Every output (console bytes, frames) waits in the gate until the
    // backup has acknowledged its own log entry.
    let gate = OutputGate::new();
    m.set_output_sink(Box::new(GatedOutputs::new(gate.clone())));
    let release = OutputRelease::start(
        gate.clone(),
        tx.clone(),
        side.console.clone(),
        side.tap.clone(),
    );
    let done = Arc::new(AtomicBool::new(false));
    let status = spawn_status(generation, tx.clone(), gate.clone(), done.clone());
    let watch = watch_heartbeats(ft, generation, &tx)?;
    let bounds = ThrottleBounds {
        lag: ft.lag_time_bound,
        give_up: ft.throttle_limit(),
    };
    let mut recorder = Recorder::new(tx.clone(), Some(ft.digest_every));
    let paired = match joined.then(|| recorder.log_digest(m)).transpose() {
        // Both sides' state at the join point, compared by the backup.
        Err(e) => PairEnd::ChannelFailed(format!("cannot log the join point's digest ({e})"), None),
        Ok(_) => {
            let rec = Throttled::new(recorder, tx.clone(), gate.clone(), bounds);
            run_paired(m, rec, &tx, ft)
        }
    };
    drop(watch);
    let end = end_pairing(paired, &tx, &release, ft, generation);
    done.store(true, Ordering::Release);
    let released = release.finish();
    if status.join().is_err() {
        tracing::warn!("the status thread panicked");
    }
    // From here on nothing waits for an acknowledgement.
    m.set_output_sink(side.direct());
    let stats = tx.stats();
    report.output_delays.extend(released.report.output_delays);
    report.frame_delays.extend(released.report.frame_delays);
    report.ack_latencies.extend(released.ack_latencies);
    report.log_bytes += stats.bytes_written;
    report.log_entries += stats.entries_written;
    end
}

/// Run `m` alone: its outputs go straight out. With a backup address, a
/// backup may join at any time: a pairing then starts at the join point,
/// and when it ends with this side alone again, the next backup may join.
/// Returns when the guest ends.
pub fn serve(m: &mut Machine, side: &LiveSide<'_>, report: &mut PrimaryReport) -> Result<RunEnd> {
    loop {
        m.set_output_sink(side.direct());
        let Some(peer) = side.peer else {
            return Ok(m.run(&mut Live)?);
        };
        eprintln!(
            "ftvmm: {} runs the guest alone (unprotected); a backup may join at {peer}",
            side.ft.node_id
        );
        let search = BackupSearch::start(peer, side.ft, side.header, m.host_inputs());
        let mut watch = JoinWatch::new(search);
        let end = m.run(&mut watch)?;
        let Some(ready) = watch.take_ready() else {
            return Ok(end);
        };
        drop(watch);
        let (joined, join) = match join_point(m, ready) {
            Ok(j) => j,
            Err(e) => {
                // The backup has no state yet: it cannot go live.
                eprintln!("ftvmm: the join failed at the join point ({e:#}); running alone");
                continue;
            }
        };
        report.joins.push(join);
        match run_pairing(m, joined.tx, joined.generation, side, true, report)? {
            Paired::GuestEnded(end) => return Ok(end),
            Paired::Alone => {}
        }
    }
}

/// Run as the primary: record into the channel to `peer`, or, if no backup
/// listens there at boot, run alone until one joins.
pub fn run_primary(
    image: &[u8],
    cfg: MachineConfig,
    peer: &str,
    ft: &FtOptions,
) -> Result<PrimaryReport> {
    let (cfg, header) = prepare(image, cfg, ft)?;
    let boot_pairing = pair_at_boot(peer, ft, &header)?;
    boot(image, cfg, &header, peer, ft, boot_pairing)
}

/// Boot the guest as a primary that already owns it (it won the boot
/// generation), alone; backups join at `peer`.
pub fn run_owned(
    image: &[u8],
    cfg: MachineConfig,
    peer: &str,
    ft: &FtOptions,
) -> Result<PrimaryReport> {
    let (cfg, header) = prepare(image, cfg, ft)?;
    boot(image, cfg, &header, peer, ft, None)
}

/// The primary's machine configuration and the log header every pairing
/// of its guest carries.
fn prepare(
    image: &[u8],
    mut cfg: MachineConfig,
    ft: &FtOptions,
) -> Result<(MachineConfig, ftlog::LogHeader)> {
    cfg.points = PointMode::Exits;
    let opts = RecordOptions {
        backend: ftlog::ExecBackend::Exits,
        digest_every: Some(ft.digest_every),
        net_mac: ft.net.as_ref().map(|n| n.mac),
    };
    let header = header_for(image, &cfg, &opts)?;
    // The guest gets exactly the CPUID table the header tells the backup.
    cfg.cpuid = Some(header.cpuid.clone());
    Ok((cfg, header))
}

fn boot(
    image: &[u8],
    cfg: MachineConfig,
    header: &ftlog::LogHeader,
    peer: &str,
    ft: &FtOptions,
    boot_pairing: Option<(Arc<PrimarySender>, u64)>,
) -> Result<PrimaryReport> {
    let console = ConsoleFile::open(&ft.console)?;
    let mut m = Machine::new(cfg, image).context("cannot start the VM")?;
    // The primary reads its TAP from the start.
    let live_tap = match &ft.net {
        Some(n) => {
            net::attach(&mut m, n.mac)?;
            Some(LiveTap::open(&n.tap, &m)?)
        }
        None => None,
    };
    if let Some(n) = &ft.net {
        if let Some(l) = &live_tap {
            l.announce(n.mac);
        }
    }
    let side = LiveSide {
        ft,
        header,
        console,
        tap: live_tap.as_ref().map(|l| l.tap().clone()),
        peer: Some(peer),
    };
    let mut report = PrimaryReport::default();
    let end = match boot_pairing {
        Some((tx, generation)) => {
            match run_pairing(&mut m, tx, generation, &side, false, &mut report)? {
                Paired::GuestEnded(end) => end,
                Paired::Alone => serve(&mut m, &side, &mut report)?,
            }
        }
        None => serve(&mut m, &side, &mut report)?,
    };
    drop(live_tap);
    report.end = Some(end);
    Ok(report)
}
