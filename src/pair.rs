//! `ftvmm run --pair`: the same command on both hosts of a pair (its own
//! channel address, the peer's, the shared arbiter directory, the guest).
//!
//! A node starts as a backup: it listens, and a live peer (a primary
//! running alone searches for its backup all the time) makes it join the
//! running guest. If no offer comes for a while, the node boots the guest
//! itself, but only after winning a new generation in the arbiter, which
//! only the winner of the latest generation (or anyone, in a fresh
//! directory) may start: two nodes starting together boot one guest, and a
//! node coming back while its peer is live but unreachable keeps waiting.
//! Whichever way it became live, the node then lets its peer join again
//! after every failure. Restarting a node that exits is the service
//! manager's job (dist/ has the systemd unit).

use std::time::Duration;

use anyhow::{Context, Result};
use ftlog::ChannelError;
use vmm::{MachineConfig, RunEnd};

use crate::arbiter::{Arbiter, ArbiterError, Outcome};
use crate::backup::{listen_for_primary, replay, report_refusal};
use crate::ft_options::FtOptions;
use crate::primary::run_owned;

/// How long a node waits for a live peer's offer before it tries to boot
/// the guest itself: a few of the searching primary's attempts.
pub const OFFER_WAIT: Duration = Duration::from_millis(1500);

/// Run one node of a pair listening on `listen`, its peer listening on
/// `peer`, with the VM configuration `cfg` (a backup adopts the primary's).
pub fn run_pair(
    image: &[u8],
    cfg: MachineConfig,
    listen: &str,
    peer: &str,
    ft: &FtOptions,
) -> Result<RunEnd> {
    let mut ft = ft.clone();
    ft.rejoin = Some(peer.to_owned());
    let arbiter = Arbiter::new(&ft.arbiter, &ft.node_id)?;
    let listener = listen_for_primary(image, listen, &ft)?;
    eprintln!(
        "ftvmm: {} waiting on {listen} for a live peer to join",
        ft.node_id
    );
    let mut said = String::new();
    loop {
        match listener.accept_reporting(Some(OFFER_WAIT), report_refusal) {
            Ok(rx) => return replay(image, cfg, listener, rx, &ft),
            Err(ChannelError::PeerTimeout { .. }) => {}
            Err(e) => return Err(e).context("the pair's listener failed"),
        }
        match claim(&arbiter) {
            Ok(Some(g)) => {
                eprintln!(
                    "ftvmm: no live peer; {} won generation {g} and boots the guest",
                    ft.node_id
                );
                drop(listener);
                let report = run_owned(image, cfg, peer, &ft)?;
                return Ok(report.end.unwrap_or(RunEnd::Stopped));
            }
            Ok(None) => {}
            Err(why) => {
                if why != said {
                    eprintln!("ftvmm: not booting the guest: {why}; waiting for the peer");
                    said = why;
                }
            }
        }
    }
}

/// Win a new generation for booting the guest; None if another node won
/// it first (it boots, and will offer this node a join).
fn claim(arbiter: &Arbiter) -> std::result::Result<Option<u64>, String> {
    let g = match arbiter.start_generation() {
        Ok(g) => g,
        Err(ArbiterError::Superseded {
            generation, winner, ..
        }) => {
            return Err(format!(
                "{winner} owns the guest (it won generation {generation})"
            ))
        }
        Err(e) => return Err(e.to_string()),
    };
    match arbiter.try_win(g) {
        Ok(Outcome::Won) => Ok(Some(g)),
        Ok(Outcome::Lost { .. }) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}
