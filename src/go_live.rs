//! Going on alone: winning the arbiter, and a backup taking over at the
//! exact point its log ends.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Result};
use vmm::Machine;

use crate::arbiter::{Arbiter, Outcome};
use crate::ft_options::FtOptions;
use crate::net::{self, LiveTap, NetOptions};
use crate::output::{ConsoleFile, DirectSerial, HeldSerial};

/// Proof that this side won the arbiter for its pairing's generation: the
/// only thing that lets it run alone and release output its peer never
/// acknowledged. Only [`win_arbiter`] makes one.
#[derive(Debug)]
pub struct Alone {
    generation: u64,
}

impl Alone {
    /// The generation this side won.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// Win the arbiter for `generation` or explain why not: the only way either
/// side may go on without its peer.
pub fn win_arbiter(ft: &FtOptions, generation: u64, why: &str) -> Result<Alone> {
    let arb = Arbiter::new(&ft.arbiter, &ft.node_id)?;
    match arb.try_win(generation)? {
        Outcome::Won => {
            eprintln!(
                "ftvmm: {why}; {} won the arbiter (generation {generation}) and goes on alone",
                ft.node_id
            );
            Ok(Alone { generation })
        }
        Outcome::Lost { winner } => {
            bail!("{why}, but {winner} already won the arbiter (generation {generation}): stopping this VM so there is never more than one primary")
        }
    }
}

/// Make a backup whose replay stopped at the end of its log the live VM:
/// it has won the arbiter; its console is rewritten at the same offsets,
/// its timers start, and its network (if any) goes live with the guest's
/// MAC announced. The returned TAP must live as long as the VM runs.
pub fn take_over(
    m: &mut Machine,
    ft: &FtOptions,
    held: &HeldSerial,
    net: Option<&NetOptions>,
    dropped: &AtomicU64,
) -> Result<Option<LiveTap>> {
    let point = m.point()?;
    eprintln!("ftvmm: going live at {point}");
    let console = ConsoleFile::open(&ft.console)?;
    let produced = held.produced();
    console.put(0, &produced);
    m.devices
        .serial
        .set_output(Box::new(DirectSerial::new(console, produced.len() as u64)));
    m.set_live_timers(true);
    let Some(n) = net else {
        return Ok(None);
    };
    let live = net::go_live(m, n)?;
    eprintln!(
        "ftvmm: network live on {} ({} frames of the replay dropped); guest MAC announced",
        n.tap,
        dropped.load(Ordering::Relaxed)
    );
    Ok(Some(live))
}
