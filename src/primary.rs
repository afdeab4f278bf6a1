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
use crate::net::{self, LiveTap};
use crate::output::{ConsoleFile, GatedSerial, Output};
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
}

/// A status line every 2 s: entries, bytes, ack latency, lag, held output.
fn spawn_status(
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
                "[primary {:.0}s] {:.0} entries/s, {:.0} bytes/s, ack latency {:?}, lag {} entries, {} outputs held",
                start.elapsed().as_secs_f64(),
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

/// Connect to the backup, retrying for 30 s while it is not listening yet.
fn connect(peer: &str, cfg: &ChannelConfig, header: &ftlog::LogHeader) -> Result<PrimarySender> {
    let start = Instant::now();
    loop {
        match PrimarySender::connect(peer, cfg, header) {
            Ok(tx) => return Ok(tx),
            Err(ftlog::ChannelError::Connect { .. })
                if start.elapsed() < Duration::from_secs(30) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot reach the backup at {peer}")),
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

/// Pair with the backup at `peer`: offer a new generation, connect, and
/// claim the boot once the backup accepted (generation.rs).
fn pair(
    peer: &str,
    ft: &FtOptions,
    header: &ftlog::LogHeader,
) -> Result<(Arc<PrimarySender>, u64)> {
    let arbiter = Arbiter::new(&ft.arbiter, &ft.node_id)?;
    let generation = generation::offer(&arbiter)?;
    let mut channel = ft.channel_config();
    channel.generation = generation;
    let tx = Arc::new(connect(peer, &channel, header)?);
    if let Err(e) = generation::claim_boot(&arbiter, generation) {
        tx.abort(e.to_string());
        return Err(e);
    }
    eprintln!(
        "ftvmm: {} paired with the backup at {} as generation {generation}",
        ft.node_id,
        tx.peer_addr()
    );
    Ok((tx, generation))
}

/// After the paired run: close cleanly with everything acknowledged, or
/// let the arbiter decide whether this side goes on alone.
fn end_pairing(
    m: &mut Machine,
    paired: PairEnd,
    tx: &PrimarySender,
    release: &OutputRelease,
    ft: &FtOptions,
    generation: u64,
) -> Result<RunEnd> {
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
            Ok(end)
        }
        PairEnd::ChannelFailed(why, end) => {
            // The arbiter first: a backup declared dead (lagging, silent)
            // is the worst side to take over. Then cut the channel, so a
            // backup that is still there stops waiting.
            let won = win_arbiter(ft, generation, &why);
            tx.abort(why);
            let alone = won?;
            release.go_alone(&alone);
            match end {
                Some(end) => Ok(end),
                None => Ok(m.run(&mut Live)?),
            }
        }
        PairEnd::VmFailed(e) => {
            tx.abort(format!("the primary's VM failed: {e}"));
            Err(anyhow!(e).context("the VM failed; the backup takes over"))
        }
    }
}

/// Run as the primary: record into the channel to `peer`.
pub fn run_primary(
    image: &[u8],
    mut cfg: MachineConfig,
    peer: &str,
    ft: &FtOptions,
) -> Result<PrimaryReport> {
    cfg.points = PointMode::Exits;
    let opts = RecordOptions {
        backend: ftlog::ExecBackend::Exits,
        digest_every: Some(ft.digest_every),
        net_mac: ft.net.as_ref().map(|n| n.mac),
    };
    let header = header_for(image, &cfg, &opts);
    let (tx, generation) = pair(peer, ft, &header)?;
    let console = ConsoleFile::open(&ft.console)?;
    let gate = OutputGate::new();
    cfg.serial_out = Box::new(GatedSerial::new(gate.clone(), tx.clone()));
    let mut m = Machine::new(cfg, image).context("cannot start the VM")?;
    // The primary reads its TAP from the start; what it sends waits in the
    // gate like console output.
    let live_tap = match &ft.net {
        Some(n) => {
            let (g, t) = (gate.clone(), tx.clone());
            net::attach(
                &mut m,
                n.mac,
                Box::new(move |f| g.hold(t.next_seq().checked_sub(1), Output::Frame(f))),
            )?;
            Some(LiveTap::open(&n.tap, &m)?)
        }
        None => None,
    };
    let release = OutputRelease::start(
        gate.clone(),
        tx.clone(),
        console,
        live_tap.as_ref().map(|l| l.tap().clone()),
    );
    let done = Arc::new(AtomicBool::new(false));
    let status = spawn_status(tx.clone(), gate.clone(), done.clone());
    let watch = watch_heartbeats(ft, generation, &tx)?;
    let bounds = ThrottleBounds {
        lag: ft.lag_time_bound,
        give_up: ft.throttle_limit(),
    };
    let rec = Throttled::new(
        Recorder::new(tx.clone(), opts.digest_every),
        tx.clone(),
        gate.clone(),
        bounds,
    );
    let paired = run_paired(&mut m, rec, &tx, ft);
    drop(watch);
    let end = end_pairing(&mut m, paired, &tx, &release, ft, generation);
    done.store(true, Ordering::Release);
    let released = release.finish();
    if status.join().is_err() {
        tracing::warn!("the status thread panicked");
    }
    drop(live_tap);
    let end = end?;
    let stats = tx.stats();
    Ok(PrimaryReport {
        end: Some(end),
        output_delays: released.report.output_delays,
        frame_delays: released.report.frame_delays,
        ack_latencies: released.ack_latencies,
        log_bytes: stats.bytes_written,
        log_entries: stats.entries_written,
    })
}
