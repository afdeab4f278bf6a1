//! The two fault-tolerance roles: a primary that records into the logging
//! channel and releases console output only when the backup has the log
//! entries it depends on, and a backup that replays the channel and goes
//! live when the primary is gone (after winning the arbiter).
//!
//! Console output is a byte stream addressed by offset (bytes since boot,
//! the same on both sides), written into `--console-file` with positioned
//! writes: a backup that goes live rewrites what it produced at the same
//! offsets (identical bytes), so an outside reader sees neither a gap nor a
//! contradiction.

use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftlog::{Acks, BackupExpect, BackupListener, ChannelConfig, PrimarySender};
use netdev::OutputGate;
use vmm::link::ChannelSource;
use vmm::points::PointMode;
use vmm::record::Recorder;
use vmm::replay::Replayer;
use vmm::{Live, Machine, MachineConfig, RunEnd};

use crate::arbiter::{Arbiter, Outcome};
use crate::heartbeat::{Heartbeat, HeartbeatConfig, Role};
use crate::net::{self, LiveTap, NetOptions};
use crate::rr::{header_for, RecordOptions};

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
}

/// An output to the outside world, held by the output gate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Output {
    /// Console bytes at this stream offset.
    Console(u64, Vec<u8>),
    /// A network frame.
    Frame(Vec<u8>),
}

/// The console file, written at stream offsets.
#[derive(Clone)]
struct ConsoleFile(Arc<File>);

impl ConsoleFile {
    fn open(path: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open console file {}", path.display()))?;
        Ok(ConsoleFile(Arc::new(f)))
    }

    fn put(&self, offset: u64, bytes: &[u8]) {
        if let Err(e) = self.0.write_all_at(bytes, offset) {
            tracing::warn!("console output lost at offset {offset}: {e}");
        }
    }
}

/// Serial output on the primary: tagged with the last log entry and held in
/// the gate until the backup has it.
struct GatedSerial {
    gate: OutputGate<Output>,
    tx: Arc<PrimarySender>,
    offset: u64,
}

impl Write for GatedSerial {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let tag = self.tx.next_seq().checked_sub(1);
        self.gate
            .hold(tag, Output::Console(self.offset, buf.to_vec()));
        self.offset += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serial output on a backup: kept with its offsets, shown only on go-live.
#[derive(Clone, Default)]
struct HeldSerial(Arc<Mutex<(u64, Vec<u8>)>>);

impl Write for HeldSerial {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut g) = self.0.lock() {
            g.1.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serial output of a live VM with no backup: straight to the console file.
struct DirectSerial {
    console: ConsoleFile,
    offset: u64,
}

impl Write for DirectSerial {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.console.put(self.offset, buf);
        self.offset += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

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

/// Feed the backup's acks into the gate as they arrive, until `done` or the
/// channel dies; returns the sampled round trips.
fn ack_pump(
    gate: OutputGate<Output>,
    tx: Arc<PrimarySender>,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut seen = Acks::default();
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        // After an error the vCPU thread opens or discards the gate.
        let Ok(a) = tx.wait_acks_change(seen, Duration::from_millis(50)) else {
            break;
        };
        if a != seen {
            latencies.extend(tx.stats().ack_latency);
            if let Some(r) = a.received {
                gate.ack(r);
            }
            seen = a;
        }
    }
    latencies
}

/// Put released outputs where they go, as soon as the gate lets them out
/// (an ack, or a new output whose tag is already acknowledged), until `done`.
fn releaser(
    gate: OutputGate<Output>,
    console: ConsoleFile,
    tap: Option<netdev::Tap>,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> PrimaryReport {
    let mut report = PrimaryReport::default();
    let mut put = |released: Vec<netdev::Released<Output>>| {
        for r in released {
            match r.item {
                Output::Console(offset, bytes) => {
                    console.put(offset, &bytes);
                    report.output_delays.push(r.held_for);
                }
                Output::Frame(frame) => {
                    if let Some(t) = &tap {
                        t.send_logged(&frame);
                    }
                    report.frame_delays.push(r.held_for);
                }
            }
        }
    };
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        put(gate.wait_released(Duration::from_millis(20)));
    }
    put(gate.take_released());
    report
}

/// How far (in host time) the backup's replay is behind: the age of the
/// oldest entry it has not executed, from samples of the log position taken
/// at execution points.
#[derive(Debug, Default)]
pub struct LagClock {
    samples: std::collections::VecDeque<(u64, Instant)>,
}

impl LagClock {
    /// At this moment `produced` entries exist.
    pub fn note(&mut self, produced: u64) {
        if self.samples.back().is_none_or(|(s, _)| *s < produced) {
            self.samples.push_back((produced, Instant::now()));
        }
    }

    /// The lag when the backup has executed every entry up to `executed`.
    pub fn lag(&mut self, executed: Option<u64>) -> Duration {
        let done = executed.map_or(0, |e| e + 1);
        while self.samples.front().is_some_and(|(s, _)| *s <= done) {
            self.samples.pop_front();
        }
        self.samples
            .front()
            .map_or(Duration::ZERO, |(_, t)| t.elapsed())
    }
}

/// The recorder, slowed down while the backup's replay lags too far behind
/// (the channel's lag bound), so a failover never has far to catch up, and
/// stopped when the backup's heartbeats stop.
struct Throttled {
    inner: Recorder<Arc<PrimarySender>>,
    tx: Arc<PrimarySender>,
    heartbeat: Option<Heartbeat>,
    lag: LagClock,
    lag_bound: Duration,
}

impl vmm::Observer for Throttled {
    fn at_point(&mut self, m: &mut Machine) -> vmm::Result<vmm::Flow> {
        if let Some(hb) = &self.heartbeat {
            if !hb.is_alive() {
                return Err(vmm::Error::Observer(format!(
                    "the backup's heartbeats stopped {:?} ago",
                    hb.silence()
                )));
            }
        }
        let channel =
            |e: ftlog::ChannelError| vmm::Error::Observer(format!("logging channel: {e}"));
        self.tx.throttle().map_err(channel)?;
        self.lag.note(self.tx.next_seq());
        let mut acks = self.tx.acks();
        while self.lag.lag(acks.executed) > self.lag_bound {
            acks = self
                .tx
                .wait_acks_change(acks, Duration::from_millis(50))
                .map_err(channel)?;
        }
        self.inner.at_point(m)
    }

    fn on_read(
        &mut self,
        m: &mut Machine,
        src: vmm::ReadSource,
        class: vmm::devices::ReadClass,
        data: &mut [u8],
    ) -> vmm::Result<()> {
        self.inner.on_read(m, src, class, data)
    }

    fn on_inject(&mut self, m: &mut Machine, vector: u8) -> vmm::Result<()> {
        self.inner.on_inject(m, vector)
    }
}

/// A status line every 2 s: entries, bytes, ack latency, lag, held output.
fn spawn_status(
    tx: Arc<PrimarySender>,
    gate: OutputGate<Output>,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut last = (0u64, 0u64, Instant::now());
        while !done.load(std::sync::atomic::Ordering::Acquire) {
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

/// UDP heartbeats to the peer, if configured. A heartbeat path that cannot
/// be set up is a warning: the channel's keepalives still detect a dead peer.
fn heartbeat(role: Role, ft: &FtOptions) -> Result<Option<Heartbeat>> {
    let Some((local, peer)) = &ft.heartbeat else {
        return Ok(None);
    };
    let mut cfg = HeartbeatConfig::new(role, 1);
    cfg.timeout = ft.heartbeat_timeout.max(cfg.interval * 2);
    Ok(Heartbeat::bind(resolve(local)?, resolve(peer)?, cfg)
        .map_err(|e| tracing::warn!("no UDP heartbeats ({e}); relying on the logging channel"))
        .ok())
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))
}

/// Win the arbiter or explain why not.
fn win(ft: &FtOptions, why: &str) -> Result<()> {
    let arb = Arbiter::new(&ft.arbiter, &ft.node_id)?;
    match arb.try_win(1)? {
        Outcome::Won => {
            eprintln!(
                "ftvmm: {why}; {} won the arbiter and goes on alone",
                ft.node_id
            );
            Ok(())
        }
        Outcome::Lost { winner } => {
            bail!("{why}, but {winner} already won the arbiter: stopping this VM so there is never more than one primary")
        }
    }
}

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

fn channel_config(ft: &FtOptions) -> ChannelConfig {
    let mut c = ChannelConfig::new(ft.key.clone());
    c.peer_timeout = ft.peer_timeout;
    if let Some(b) = ft.lag_bound {
        c.lag_bound = b;
    }
    c
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
    let tx = Arc::new(connect(peer, &channel_config(ft), &header)?);
    let console = ConsoleFile::open(&ft.console)?;
    let gate = OutputGate::new();
    cfg.serial_out = Box::new(GatedSerial {
        gate: gate.clone(),
        tx: tx.clone(),
        offset: 0,
    });
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
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
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
    let mut rec = Throttled {
        inner: Recorder::new(tx.clone(), opts.digest_every),
        tx: tx.clone(),
        heartbeat: heartbeat(Role::Primary, ft)?,
        lag: LagClock::default(),
        lag_bound: ft.lag_time_bound,
    };
    let result = m.run(&mut rec);
    let mut rec = rec.inner;
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
            if let Err(lost) = win(ft, &why) {
                gate.discard();
                done.store(true, std::sync::atomic::Ordering::Release);
                let _ = rel.join();
                let _ = pump.join();
                return Err(lost);
            }
            gate.open();
            m.run(&mut Live)?
        }
    };
    gate.open();
    done.store(true, std::sync::atomic::Ordering::Release);
    let mut report = rel.join().unwrap_or_default();
    report.ack_latencies = pump.join().unwrap_or_default();
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

/// Run as the backup: replay what arrives on `listen`; go live if the
/// primary dies.
pub fn run_backup(
    image: &[u8],
    mut cfg: MachineConfig,
    listen: &str,
    ft: &FtOptions,
) -> Result<RunEnd> {
    cfg.points = PointMode::Exits;
    cfg.live_timers = false;
    let expect = BackupExpect {
        backend: ftlog::ExecBackend::Exits,
        image_digest: vmm::digest::image_digest(image),
    };
    let listener = BackupListener::bind(listen, &channel_config(ft), expect)
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("ftvmm: backup waiting for the primary on {listen}");
    let rx = Arc::new(listener.accept().context("no primary connected")?);
    // Same image (checked in the handshake), same memory and command line:
    // the backup starts from the primary's initial state.
    let h = rx.header();
    if u64::from(h.mem_mib) != cfg.mem_mib || h.cmdline != cfg.cmdline {
        eprintln!(
            "ftvmm: using the primary's guest configuration ({} MiB, {:?})",
            h.mem_mib, h.cmdline
        );
        cfg.mem_mib = u64::from(h.mem_mib);
        cfg.cmdline = h.cmdline.clone();
    }
    let net = backup_net(h.net_mac, ft.net.as_ref())?;
    // Beat towards the primary so it can tell this backup is alive.
    let _heartbeat = heartbeat(Role::Backup, ft)?;
    let held = HeldSerial::default();
    cfg.serial_out = Box::new(held.clone());
    let mut m = Machine::new(cfg, image).context("cannot start the VM")?;
    // The backup's guest sends what the primary's sends; only the primary's
    // copy may reach the wire, so these are dropped.
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if let Some(n) = &net {
        net::attach(&mut m, n.mac, net::discard(dropped.clone()))?;
    }
    let mut rep = Replayer::new(ChannelSource::new(rx));
    let end = m.run(&mut rep)?;
    let primary_gone = rep.source().ended().map(|e| e.to_string());
    let Some(why) = primary_gone else {
        rep.finish(&mut m, end)?;
        return Ok(end);
    };
    // Go live at this exact point.
    win(ft, &format!("the primary is gone ({why})"))?;
    let point = m.point()?;
    eprintln!("ftvmm: going live at {point}");
    let console = ConsoleFile::open(&ft.console)?;
    let produced = held.0.lock().map(|g| g.1.clone()).unwrap_or_default();
    console.put(0, &produced);
    m.devices.serial.set_output(Box::new(DirectSerial {
        console,
        offset: produced.len() as u64,
    }));
    m.set_live_timers(true);
    let _tap = match &net {
        Some(n) => {
            let live = net::go_live(&mut m, n)?;
            eprintln!(
                "ftvmm: network live on {} ({} frames of the replay dropped); guest MAC announced",
                n.tap,
                dropped.load(std::sync::atomic::Ordering::Relaxed)
            );
            Some(live)
        }
        None => None,
    };
    Ok(m.run(&mut Live)?)
}

/// The backup's network: the primary's MAC (from the log header) on the
/// backup's own TAP.
fn backup_net(mac: Option<[u8; 6]>, mine: Option<&NetOptions>) -> Result<Option<NetOptions>> {
    match (mac, mine) {
        (None, None) => Ok(None),
        (None, Some(n)) => {
            eprintln!(
                "ftvmm: the primary's guest has no network device; --tap {} is not used",
                n.tap
            );
            Ok(None)
        }
        (Some(_), None) => bail!(
            "the primary's guest has a network device: give the backup --tap NAME for going live"
        ),
        (Some(mac), Some(n)) => Ok(Some(NetOptions {
            tap: n.tap.clone(),
            mac,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_unexecuted_entry() {
        let mut c = LagClock::default();
        assert_eq!(c.lag(None), Duration::ZERO);
        c.note(3); // entries 0..3 exist
        std::thread::sleep(Duration::from_millis(30));
        c.note(5);
        assert!(c.lag(None) >= Duration::from_millis(30));
        assert!(
            c.lag(Some(1)) >= Duration::from_millis(30),
            "entry 2 is still pending"
        );
        let after_first = c.lag(Some(2));
        assert!(
            after_first < Duration::from_millis(30),
            "only entries 3 and 4 pending"
        );
        assert_eq!(c.lag(Some(4)), Duration::ZERO);
    }
}
