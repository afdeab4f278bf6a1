//! The backup: replays the logging channel, and goes live when the primary
//! is gone (after winning the arbiter).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ftlog::{BackupExpect, BackupListener, BackupReceiver};
use vmm::link::ChannelSource;
use vmm::points::PointMode;
use vmm::replay::Replayer;
use vmm::{Machine, MachineConfig, RunEnd};

use crate::arbiter::Arbiter;
use crate::ft_options::FtOptions;
use crate::generation;
use crate::go_live::{take_over, win_arbiter};
use crate::heartbeat::Role;
use crate::join;
use crate::net::{self, NetOptions};
use crate::output::{ConsoleFile, ReplayOutputs};
use crate::primary::{serve, LiveSide, PrimaryReport};

/// Run as the backup: replay what arrives on `listen`; go live if the
/// primary dies.
pub fn run_backup(
    image: &[u8],
    cfg: MachineConfig,
    listen: &str,
    ft: &FtOptions,
) -> Result<RunEnd> {
    let listener = listen_for_primary(image, listen, ft)?;
    eprintln!("ftvmm: backup waiting for the primary on {listen}");
    let rx = listener
        .accept_reporting(None, report_refusal)
        .context("no primary connected")?;
    replay(image, cfg, listener, rx, ft)
}

/// A refused connection: logged, and the wait goes on.
pub fn report_refusal(peer: std::net::SocketAddr, e: &ftlog::ChannelError) {
    eprintln!("ftvmm: refused a connection from {peer}: {e}; still waiting for the primary");
}

/// Replay what the primary that `listener` accepted (`rx`) sends, from its
/// boot or from the join point; go live if the primary dies.
pub fn replay(
    image: &[u8],
    mut cfg: MachineConfig,
    listener: BackupListener,
    rx: BackupReceiver,
    ft: &FtOptions,
) -> Result<RunEnd> {
    cfg.points = PointMode::Exits;
    cfg.live_timers = false;
    eprintln!(
        "ftvmm: paired with the primary at {} (generation {})",
        rx.peer_addr(),
        rx.generation()
    );
    // From now on the port refuses every connection, so nothing disturbs
    // the replay.
    let _busy = listener.refuse_all(rx.generation());
    let rx = Arc::new(rx);
    let generation = rx.generation();
    // Same image (checked in the handshake), same memory and command line:
    // the backup starts from the primary's initial state.
    let header = rx.header().clone();
    let h = &header;
    if u64::from(h.mem_mib) != cfg.mem_mib || h.cmdline != cfg.cmdline {
        eprintln!(
            "ftvmm: using the primary's guest configuration ({} MiB, {:?})",
            h.mem_mib, h.cmdline
        );
        cfg.mem_mib = u64::from(h.mem_mib);
        cfg.cmdline = h.cmdline.clone();
    }
    // The same initrd as the primary's, or a clear refusal.
    crate::rr::check_initrd(h, cfg.initrd.as_deref())?;
    // The primary's guest CPU: the same CPUID table, or a clear refusal.
    cfg.cpuid = Some(h.cpuid.clone());
    let net = backup_net(h.net_mac, ft.net.as_ref())?;
    // Beat towards the primary so it can tell this backup is alive.
    let heartbeat = ft.heartbeat(Role::Backup, generation)?;
    let digest_kind = h.state_digest;
    // The backup's guest sends what the primary's sends; only the primary's
    // copy may reach the outside world: the console goes to a shadow file
    // and frames are held, to be put out if this backup goes live.
    let watermark = rx.clone();
    let held = ReplayOutputs::new(&ft.console, Box::new(move || watermark.released_through()))?;
    cfg.outputs = Box::new(held.clone());
    // A joining primary's guest is already running: start from its state.
    let mut m = if rx.joins() {
        join::receive(&rx, cfg)?
    } else {
        Machine::new(cfg, image).context("cannot start the VM")?
    };
    m.set_digest_kind(digest_kind);
    if let Some(n) = &net {
        net::attach(&mut m, n.mac)?;
    }
    let mut rep = Replayer::new(ChannelSource::new(rx.clone()));
    // The replay uses every entry received; a log cut short pauses at the
    // first point after its last entry (or the guest ended right there).
    let end = m.run(&mut rep)?;
    rep.finish(&mut m, end)?;
    let primary_gone = rep.source().ended().map(|e| e.to_string());
    let Some(why) = primary_gone else {
        return finish_replay(&rx, rep.source(), end);
    };
    // Go live at this exact point.
    win_arbiter(ft, generation, &format!("the primary is gone ({why})"))?;
    let tap = take_over(&mut m, &held, net.as_ref())?;
    if end != RunEnd::Paused {
        return Ok(end);
    }
    // Live: the primary now, alone until a new backup joins (if this side
    // knows where one listens); its heartbeats beat as a primary's then.
    drop(held);
    drop(heartbeat);
    let side = LiveSide {
        ft,
        header: &header,
        console: ConsoleFile::open(&ft.console)?,
        tap: tap.as_ref().map(|l| l.tap().clone()),
        peer: ft.rejoin.as_deref(),
    };
    let end = serve(&mut m, &side, &mut PrimaryReport::default())?;
    drop(tap);
    Ok(end)
}

/// Listen for a primary: one that passes the handshake (key, version,
/// backend, image, a generation not older than the arbiter's latest) is
/// accepted; strangers and refused primaries are reported and the wait
/// goes on.
pub fn listen_for_primary(image: &[u8], listen: &str, ft: &FtOptions) -> Result<BackupListener> {
    let expect = BackupExpect {
        backend: ftlog::ExecBackend::Exits,
        image_digest: vmm::digest::image_digest(image),
    };
    let arbiter = Arbiter::new(&ft.arbiter, &ft.node_id)?;
    Ok(BackupListener::bind(listen, &ft.channel_config(), expect)
        .with_context(|| format!("cannot listen on {listen}"))?
        .with_generation_check(move |g| generation::check_offer(&arbiter, g)))
}

/// The replay reached the guest's end with the primary's log: it must end
/// with the primary's end marker, and the primary closes the channel
/// cleanly after it. Nothing is taken over: the guest has ended.
fn finish_replay(rx: &BackupReceiver, log: &ChannelSource, end: RunEnd) -> Result<RunEnd> {
    if !log.saw_end() {
        bail!("the replay ended ({end:?}) but the primary's log has no end marker");
    }
    match rx.next() {
        Ok(None) => eprintln!("ftvmm: the primary closed the logging channel cleanly; replay complete"),
        Ok(Some(e)) => bail!("the primary's log goes on after its end marker (entry #{})", e.seq),
        Err(e) if e.is_peer_death() => eprintln!(
            "ftvmm: replay complete; the primary did not close the channel after its end marker ({e})"
        ),
        Err(e) => return Err(e).context("the logging channel failed after the end of the log"),
    }
    Ok(end)
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
