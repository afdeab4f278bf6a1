//! Going on alone: winning the arbiter, and a backup taking over at the
//! exact point its log ends.

use anyhow::{bail, Result};
use vmm::output::OutputSink;
use vmm::Machine;

use crate::arbiter::{Arbiter, Outcome};
use crate::ft_options::FtOptions;
use crate::net::{LiveTap, NetOptions};
use crate::output::{ConsoleTarget, Direct, ReplayOutputs};

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

/// Make a backup whose replay stopped at the end of its log the live VM.
/// It has won the arbiter and replayed every entry it received (the last
/// output entry included), so nothing it does from here contradicts what
/// the primary released. Its console stream (written while replaying where
/// nobody read it) becomes its console file; its network (if any) goes
/// live with the guest's MAC announced, and the frames the primary may not
/// have released are sent again (a duplicate is harmless to TCP). Then its
/// outputs go straight out, and its timers start from the replayed device
/// state. The returned TAP must live as long as the VM runs.
pub fn take_over(
    m: &mut Machine,
    held: &ReplayOutputs,
    net: Option<&NetOptions>,
) -> Result<Option<LiveTap>> {
    let point = m.point()?;
    eprintln!("ftvmm: going live at {point}");
    let (console, frames) = held.go_live()?;
    let live = match net {
        Some(n) => {
            let live = LiveTap::open(&n.tap, m)?;
            live.announce(n.mac);
            eprintln!("ftvmm: network live on {}; guest MAC announced", n.tap);
            Some(live)
        }
        None => None,
    };
    let mut out = Direct::new(
        ConsoleTarget::File(console),
        live.as_ref().map(|l| l.tap().clone()),
    );
    if net.is_some() {
        eprintln!(
            "ftvmm: {} frames the primary may not have released sent again",
            frames.len()
        );
    }
    for (o, tag) in frames {
        out.put(o, tag);
    }
    m.set_output_sink(Box::new(out));
    m.set_live_timers(true);
    Ok(live)
}
