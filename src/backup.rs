//! The backup: replays the logging channel, and goes live when the primary
//! is gone (after winning the arbiter).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ftlog::{BackupExpect, BackupListener};
use vmm::link::ChannelSource;
use vmm::points::PointMode;
use vmm::replay::Replayer;
use vmm::{Live, Machine, MachineConfig, RunEnd};

use crate::ft_options::FtOptions;
use crate::go_live::{take_over, win_arbiter};
use crate::heartbeat::Role;
use crate::net::{self, NetOptions};
use crate::output::HeldOutputs;

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
    let listener = BackupListener::bind(listen, &ft.channel_config(), expect)
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
    // The primary's guest CPU: the same CPUID table, or a clear refusal.
    cfg.cpuid = Some(h.cpuid.clone());
    let net = backup_net(h.net_mac, ft.net.as_ref())?;
    // Beat towards the primary so it can tell this backup is alive.
    let _heartbeat = ft.heartbeat(Role::Backup)?;
    // The backup's guest sends what the primary's sends; only the primary's
    // copy may reach the outside world, so they are held (to be put out
    // again if this backup goes live).
    let held = HeldOutputs::default();
    cfg.outputs = Box::new(held.clone());
    let mut m = Machine::new(cfg, image).context("cannot start the VM")?;
    if let Some(n) = &net {
        net::attach(&mut m, n.mac)?;
    }
    let mut rep = Replayer::new(ChannelSource::new(rx));
    // The replay uses every entry received; a log cut short pauses at the
    // first point after its last entry (or the guest ended right there).
    let end = m.run(&mut rep)?;
    rep.finish(&mut m, end)?;
    let primary_gone = rep.source().ended().map(|e| e.to_string());
    let Some(why) = primary_gone else {
        return Ok(end);
    };
    // Go live at this exact point.
    win_arbiter(ft, &format!("the primary is gone ({why})"))?;
    let _tap = take_over(&mut m, ft, &held, net.as_ref())?;
    if end != RunEnd::Paused {
        return Ok(end);
    }
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
