//! Pairing generations: which pairing of a primary with a backup an arbiter
//! decision, a channel handshake and a heartbeat belong to.
//!
//! A primary that boots its guest offers its backup the generation two past
//! the latest decided one ([`offer`]). Once the backup has accepted it, the
//! primary claims the generation in between for its boot ([`claim_boot`]):
//! from then on it is the latest winner, the node that owns the VM, and the
//! pairing is the generation it starts (`Arbiter::start_generation`). The
//! pairing generation travels in the channel handshake (bound by its MAC)
//! and in every heartbeat; it stays undecided while the pair is in sync, and
//! at a failover both sides `try_win` it. So a lock left in the directory by
//! an earlier pairing never decides a later one, a primary offering a
//! generation that is already decided belongs to an earlier pairing (the
//! backup refuses it), and a primary refused by a busy backup leaves no
//! trace in the arbiter (it claims nothing before it is accepted).

use anyhow::{bail, Result};
use ftlog::Refusal;

use crate::arbiter::{Arbiter, Outcome};

/// The pairing generation a booting primary offers its backup.
pub fn offer(arb: &Arbiter) -> Result<u64> {
    let latest = arb.latest_decided()?.map_or(0, |(g, _)| g);
    Ok(latest.saturating_add(2))
}

/// The backup accepted `pairing`: claim the generation before it for this
/// boot, so that this primary is the latest winner and `pairing` is the
/// generation it starts.
pub fn claim_boot(arb: &Arbiter, pairing: u64) -> Result<()> {
    let boot = pairing.saturating_sub(1);
    if let Outcome::Lost { winner } = arb.try_win(boot)? {
        bail!(
            "{winner} claimed generation {boot} in the arbiter directory {} first: another \
             primary is starting the same VM; not starting a second one",
            arb.dir().display()
        );
    }
    let started = arb.start_generation()?;
    if started != pairing {
        bail!(
            "generation {} was decided while this primary paired as generation {pairing}: \
             another pairing of the same VM is running; not starting a second one",
            started.saturating_sub(1)
        );
    }
    Ok(())
}

/// No backup listened at boot: claim the generation after the latest
/// decided one for this boot, so this primary is the latest winner and may
/// start the pairing of a backup that joins later
/// (`Arbiter::start_generation`). Returns the generation claimed.
pub fn claim_alone(arb: &Arbiter) -> Result<u64> {
    let boot = arb
        .latest_decided()?
        .map_or(0, |(g, _)| g)
        .saturating_add(1);
    if let Outcome::Lost { winner } = arb.try_win(boot)? {
        bail!(
            "{winner} claimed generation {boot} in the arbiter directory {} first: another \
             primary is starting the same VM; not starting a second one",
            arb.dir().display()
        );
    }
    Ok(boot)
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
        let first = offer(&p)?;
        assert_eq!(first, 2, "boot claim 1, pairing 2");
        assert!(check_offer(&b, first).is_ok());
        claim_boot(&p, first)?;
        assert_eq!(b.winner(1)?.as_deref(), Some("primary"));
        assert!(
            check_offer(&b, first).is_ok(),
            "the pairing stays undecided"
        );
        // The backup wins that pairing's failover.
        assert_eq!(b.try_win(first)?, Outcome::Won);
        // A later pairing in the same directory, same node ids: the old lock
        // decides nothing.
        let second = offer(&p)?;
        assert_eq!(second, 4);
        assert!(check_offer(&b, second).is_ok());
        claim_boot(&p, second)?;
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

    #[test]
    fn finding_8_a_primary_that_only_offered_leaves_the_running_pairing_alone() -> Result<()> {
        let d = dir("offer");
        let p1 = Arbiter::new(&d, "primary-1")?;
        let p2 = Arbiter::new(&d, "primary-2")?;
        let running = offer(&p1)?;
        claim_boot(&p1, running)?;
        // A second primary offers (and is refused by the busy backup): the
        // running pairing's generation stays undecided.
        assert!(offer(&p2)? > running);
        assert_eq!(p1.winner(running)?, None);
        // Two primaries racing for one boot: the second is told.
        let d2 = dir("race");
        let (a, b) = (Arbiter::new(&d2, "a")?, Arbiter::new(&d2, "b")?);
        let (ga, gb) = (offer(&a)?, offer(&b)?);
        claim_boot(&a, ga)?;
        let e = claim_boot(&b, gb).expect_err("b lost the boot claim");
        assert!(e.to_string().contains("another primary"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&d2);
        Ok(())
    }
}
