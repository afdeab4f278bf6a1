//! The backup: replays the logging channel, and goes live when the primary
//! is gone (after winning the arbiter).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ftlog::{BackupExpect, BackupListener, BackupReceiver, BusyListener};
use vmm::link::ChannelSource;
use vmm::points::PointMode;
use vmm::replay::Replayer;
use vmm::{Live, Machine, MachineConfig, RunEnd};

use crate::arbiter::Arbiter;
use crate::ft_options::FtOptions;
use crate::generation;
use crate::go_live::{take_over, win_arbiter};
use crate::heartbeat::Role;
use crate::net::{self, NetOptions};
use crate::output::ReplayOutputs;

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
    let (rx, _busy) = wait_for_primary(image, listen, ft)?;
    let generation = rx.generation();
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
    // The same initrd as the primary's, or a clear refusal.
    crate::rr::check_initrd(h, cfg.initrd.as_deref())?;
    // The primary's guest CPU: the same CPUID table, or a clear refusal.
    cfg.cpuid = Some(h.cpuid.clone());
    let net = backup_net(h.net_mac, ft.net.as_ref())?;
    // Beat towards the primary so it can tell this backup is alive.
    let _heartbeat = ft.heartbeat(Role::Backup, generation)?;
    let digest_kind = h.state_digest;
    // The backup's guest sends what the primary's sends; only the primary's
    // copy may reach the outside world: the console goes to a shadow file
    // and frames are held, to be put out if this backup goes live.
    let watermark = rx.clone();
    let held = ReplayOutputs::new(&ft.console, Box::new(move || watermark.released_through()))?;
    cfg.outputs = Box::new(held.clone());
    let mut m = Machine::new(cfg, image).context("cannot start the VM")?;
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
    let _tap = take_over(&mut m, &held, net.as_ref())?;
    if end != RunEnd::Paused {
        return Ok(end);
    }
    Ok(m.run(&mut Live)?)
}

/// Listen until a primary passes the handshake: strangers and refused
/// primaries are logged and the wait goes on. Afterwards the port refuses
/// every connection (the returned listener), so nothing disturbs the replay.
fn wait_for_primary(
    image: &[u8],
    listen: &str,
    ft: &FtOptions,
) -> Result<(Arc<BackupReceiver>, BusyListener)> {
    let expect = BackupExpect {
        backend: ftlog::ExecBackend::Exits,
        image_digest: vmm::digest::image_digest(image),
    };
    let arbiter = Arbiter::new(&ft.arbiter, &ft.node_id)?;
    let listener = BackupListener::bind(listen, &ft.channel_config(), expect)
        .with_context(|| format!("cannot listen on {listen}"))?
        .with_generation_check(move |g| generation::check_offer(&arbiter, g));
    eprintln!("ftvmm: backup waiting for the primary on {listen}");
    let rx = listener
        .accept_reporting(None, |peer, e| {
            eprintln!(
                "ftvmm: refused a connection from {peer}: {e}; still waiting for the primary"
            );
        })
        .context("no primary connected")?;
    eprintln!(
        "ftvmm: paired with the primary at {} (generation {})",
        rx.peer_addr(),
        rx.generation()
    );
    let busy = listener.refuse_all(rx.generation());
    Ok((Arc::new(rx), busy))
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
