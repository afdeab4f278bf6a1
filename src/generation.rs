//! Pairing generations: which pairing of a primary with a backup an arbiter
//! decision, a channel handshake and a heartbeat belong to.
//!
//! A primary that boots its guest first claims the next undecided
//! generation of the arbiter directory for itself (its *boot claim*: from
//! then on it is the latest winner, the node that owns the VM), then pairs
//! with its backup in the generation after it (`Arbiter::start_generation`).
//! The pairing generation travels in the channel handshake (bound by its
//! MAC) and in every heartbeat; it stays undecided while the pair is in
//! sync, and at a failover both sides `try_win` it. A lock left in the
//! directory by an earlier pairing therefore never decides a later one, and
//! a primary offering a generation that is already decided belongs to an
//! earlier pairing: the backup refuses it.

use anyhow::{bail, Result};
use ftlog::Refusal;

use crate::arbiter::{Arbiter, Outcome};

/// A primary booting its guest: claim the next generation for this boot and
/// return the pairing generation to offer the backup.
pub fn start_as_primary(arb: &Arbiter) -> Result<u64> {
    let boot = arb
        .latest_decided()?
        .map_or(1, |(g, _)| g.saturating_add(1));
    if let Outcome::Lost { winner } = arb.try_win(boot)? {
        bail!(
            "{winner} claimed generation {boot} in the arbiter directory {} at the same moment: \
             another primary is starting the same VM; not starting a second one",
            arb.dir().display()
        );
    }
    Ok(arb.start_generation()?)
}

/// Backup: whether a primary offering generation `offered` may pair. A
/// generation at or below the latest decided one belongs to a pairing that
/// is over (or to another arbiter directory that has seen more pairings).
/// The check is advisory: if the arbiter cannot be read it accepts, since
/// going live needs the arbiter anyway.
pub fn check_offer(arb: &Arbiter, offered: u64) -> Result<(), Refusal> {
    match arb.latest_decided() {
        Ok(Some((decided, _))) if offered <= decided => Err(Refusal::Generation {
            offered,
            latest_decided: decided,
        }),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(
                "cannot read the arbiter to check the primary's generation {offered}: {e}; accepting it"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ftvmm-gen-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn finding_8_every_pairing_gets_a_fresh_generation() -> Result<()> {
        let d = dir("fresh");
        let p = Arbiter::new(&d, "primary")?;
        let b = Arbiter::new(&d, "backup")?;
        let first = start_as_primary(&p)?;
        assert_eq!(first, 2, "boot claim 1, pairing 2");
        assert!(check_offer(&b, first).is_ok());
        // The backup wins that pairing's failover.
        assert_eq!(b.try_win(first)?, Outcome::Won);
        // A later pairing in the same directory, same node ids: the old lock
        // decides nothing.
        let second = start_as_primary(&p)?;
        assert_eq!(second, 4);
        assert!(check_offer(&b, second).is_ok());
        assert_eq!(p.try_win(second)?, Outcome::Won);
        // A primary of the first pairing is refused.
        assert_eq!(
            check_offer(&b, first),
            Err(Refusal::Generation {
                offered: 2,
                latest_decided: 4
            })
        );
        let _ = std::fs::remove_dir_all(&d);
        Ok(())
    }
}
