//! The primary: runs the guest, records into the logging channel, and
//! releases output only when the backup has the entries it depends on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ftlog::{ChannelConfig, PrimarySender};
use netdev::OutputGate;
use vmm::points::PointMode;
use vmm::record::Recorder;
use vmm::{Live, Machine, MachineConfig, RunEnd};

use crate::ft_options::FtOptions;
use crate::go_live::win_arbiter;
use crate::heartbeat::Role;
use crate::net::{self, LiveTap};
use crate::output::{ack_pump, releaser, ConsoleFile, GatedOutputs, Output};
use crate::rr::{header_for, RecordOptions};
use crate::throttle::Throttled;

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
    let header = header_for(image, &cfg, &opts)?;
    // The guest gets exactly the CPUID table the header tells the backup.
    cfg.cpuid = Some(header.cpuid.clone());
    let tx = Arc::new(connect(peer, &ft.channel_config(), &header)?);
    let console = ConsoleFile::open(&ft.console)?;
    // Every output (console bytes, frames) waits in the gate until the
    // backup has acknowledged its own log entry.
    let gate = OutputGate::new();
    cfg.outputs = Box::new(GatedOutputs::new(gate.clone()));
    let mut m = Machine::new(cfg, image).context("cannot start the VM")?;
    // The primary reads its TAP from the start.
    let live_tap = match &ft.net {
        Some(n) => {
            net::attach(&mut m, n.mac)?;
            Some(LiveTap::open(&n.tap, &m)?)
        }
        None => None,
    };
    let done = Arc::new(AtomicBool::new(false));
    let rel = {
        let (g, c, d) = (gate.clone(), console.clone(), done.clone());
        let tap = live_tap.as_ref().map(|l| l.tap().clone());
        std::thread::spawn(move || releaser(g, c, tap, d))
    };
    let pump = {
        let (g, t, d) = (gate.clone(), tx.clone(), done.clone());
        std::thread::spawn(move || ack_pump(g, t, d))
    };
    let status = spawn_status(tx.clone(), gate.clone(), done.clone());
    let mut rec = Throttled::new(
        Recorder::new(tx.clone(), opts.digest_every),
        tx.clone(),
        ft.heartbeat(Role::Primary)?,
        ft.lag_time_bound,
    );
    let result = m.run(&mut rec);
    let mut rec = rec.into_recorder();
    let end = match result {
        Ok(end) => {
            rec.finish(&mut m, end)?;
            drop(rec);
            // The last outputs wait for their acks; then close cleanly.
            let last = tx.next_seq().saturating_sub(1);
            let _ = tx.wait_received(last, ft.peer_timeout);
            end
        }
        Err(e) => {
            drop(rec);
            let why = format!("the logging channel failed ({e})");
            if let Err(lost) = win_arbiter(ft, &why) {
                gate.discard();
                done.store(true, Ordering::Release);
                let _ = rel.join();
                let _ = pump.join();
                return Err(lost);
            }
            gate.open();
            m.run(&mut Live)?
        }
    };
    gate.open();
    done.store(true, Ordering::Release);
    let released = rel.join().unwrap_or_default();
    let mut report = PrimaryReport {
        output_delays: released.output_delays,
        frame_delays: released.frame_delays,
        ack_latencies: pump.join().unwrap_or_default(),
        ..PrimaryReport::default()
    };
    let _ = status.join();
    drop(live_tap);
    let stats = tx.stats();
    report.end = Some(end);
    report.log_bytes = stats.bytes_written;
    report.log_entries = stats.entries_written;
    if let Ok(tx) = Arc::try_unwrap(tx) {
        let _ = tx.close();
    }
    Ok(report)
}
