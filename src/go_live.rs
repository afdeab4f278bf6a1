//! Going on alone: winning the arbiter, and a backup taking over at the
//! exact point its log ends.

use anyhow::{bail, Result};
use vmm::output::OutputSink;
use vmm::Machine;

use crate::arbiter::{Arbiter, Outcome};
use crate::ft_options::FtOptions;
use crate::net::{LiveTap, NetOptions};
use crate::output::{ConsoleFile, ConsoleTarget, Direct, HeldOutputs};

/// Win the arbiter or explain why not: the only way either side may go on
/// without its peer.
pub fn win_arbiter(ft: &FtOptions, why: &str) -> Result<()> {
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

/// Make a backup whose replay stopped at the end of its log the live VM.
/// It has won the arbiter and replayed every entry it received (the last
/// output entry included), so nothing it does from here contradicts what
/// the primary released. Its network (if any) goes live with the guest's
/// MAC announced; the outputs it held are put out again: console bytes
/// rewritten at the same offsets (identical bytes), frames sent again (the
/// primary may not have released them; a duplicate is harmless to TCP).
/// Then its outputs go straight out, and its timers start from the replayed
/// device state. The returned TAP must live as long as the VM runs.
pub fn take_over(
    m: &mut Machine,
    ft: &FtOptions,
    held: &HeldOutputs,
    net: Option<&NetOptions>,
) -> Result<Option<LiveTap>> {
    let point = m.point()?;
    eprintln!("ftvmm: going live at {point}");
    let console = ConsoleFile::open(&ft.console)?;
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
    let again = held.take();
    eprintln!("ftvmm: {} outputs of the replay put out again", again.len());
    for (o, tag) in again {
        out.put(o, tag);
    }
    m.set_output_sink(Box::new(out));
    m.set_live_timers(true);
    Ok(live)
}
