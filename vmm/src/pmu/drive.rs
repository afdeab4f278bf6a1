//! Driving the vCPU loop with a branch counter: naming points on the
//! primary, landing on them on the backup.

use super::{Action, BranchCounter, Lander, Landing, PmuError, Position};
use crate::points::ExecPoint;

/// A counter that counts single steps instead of hardware branches: the VMM
/// single-steps every instruction and bumps it. It lets the landing loop run
/// (slowly, exactly) on hosts without a PMU, which is how the loop itself is
/// tested here; it is not a production backend.
#[derive(Debug, Default, Clone)]
pub struct StepCounter {
    count: u64,
}

impl BranchCounter for StepCounter {
    fn read(&mut self) -> Result<u64, PmuError> {
        Ok(self.count)
    }
    // Every instruction stops the vCPU anyway, so there is nothing to arm.
    fn arm_overflow(&mut self, _after: u64) -> Result<(), PmuError> {
        Ok(())
    }
    fn disarm(&mut self) -> Result<(), PmuError> {
        Ok(())
    }
}

/// Where counts come from.
enum Source {
    Hardware(Box<dyn BranchCounter + Send>),
    Steps(StepCounter),
}

/// The counter, the lander and the landing in progress.
pub struct PmuDrive {
    source: Source,
    lander: Lander,
    landing: Option<Landing>,
    next: Action,
}

impl PmuDrive {
    /// Drive with a hardware counter and a landing margin.
    pub fn hardware(counter: Box<dyn BranchCounter + Send>, margin: u64) -> Result<Self, PmuError> {
        Ok(PmuDrive {
            source: Source::Hardware(counter),
            lander: Lander::new(margin)?,
            landing: None,
            next: Action::RunFree,
        })
    }

    /// Drive with a [`StepCounter`].
    pub fn stepping() -> Result<Self, PmuError> {
        Ok(PmuDrive {
            source: Source::Steps(StepCounter::default()),
            lander: Lander::new(1)?,
            landing: None,
            next: Action::RunFree,
        })
    }

    /// Whether the counter counts single steps (so every instruction steps).
    pub fn counts_steps(&self) -> bool {
        matches!(self.source, Source::Steps(_))
    }

    /// A single step retired (only meaningful for a step counter).
    pub fn on_step(&mut self) {
        if let Source::Steps(c) = &mut self.source {
            c.count += 1;
        }
    }

    /// The counter's value now.
    pub fn count(&mut self) -> Result<u64, PmuError> {
        match &mut self.source {
            Source::Steps(c) => c.read(),
            Source::Hardware(c) => c.read(),
        }
    }

    /// After a stop at `now`: is it the target? Decides the next run action.
    /// With no target every stop is a point (the primary).
    pub fn at_stop(&mut self, now: ExecPoint, target: Option<ExecPoint>) -> Result<bool, PmuError> {
        let Some(t) = target else {
            self.landing = None;
            self.next = Action::RunFree;
            return Ok(true);
        };
        let t = position(t);
        let landing = match &mut self.landing {
            Some(l) if l.target() == t => l,
            slot => slot.insert(Landing::new(self.lander, t)),
        };
        let action = landing.next(position(now))?;
        if action == Action::Arrived {
            self.landing = None;
            self.next = Action::RunFree;
            return Ok(true);
        }
        self.next = action;
        Ok(false)
    }

    /// Before KVM_RUN: arm or disarm the counter. Returns whether to
    /// single-step the next entry.
    pub fn before_entry(&mut self) -> Result<bool, PmuError> {
        let Source::Hardware(counter) = &mut self.source else {
            return Ok(true);
        };
        match self.next {
            Action::ArmAndRun { overflow_after } => {
                counter.arm_overflow(overflow_after)?;
                Ok(false)
            }
            Action::Step => {
                counter.disarm()?;
                Ok(true)
            }
            _ => {
                counter.disarm()?;
                Ok(false)
            }
        }
    }
}

fn position(p: ExecPoint) -> Position {
    Position {
        count: p.count,
        rip: p.rip,
        rcx: p.rcx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(count: u64, rip: u64) -> ExecPoint {
        ExecPoint { count, rip, rcx: 0 }
    }

    #[test]
    fn without_target_every_stop_is_a_point() {
        let mut d = PmuDrive::stepping().unwrap();
        assert!(d.at_stop(pt(5, 1), None).unwrap());
    }

    #[test]
    fn step_counter_lands_exactly_and_reports_overshoot() {
        let mut d = PmuDrive::stepping().unwrap();
        let target = pt(3, 0x20);
        assert!(!d.at_stop(pt(1, 0x10), Some(target)).unwrap());
        assert!(d.before_entry().unwrap(), "a step counter always steps");
        assert!(!d.at_stop(pt(3, 0x18), Some(target)).unwrap());
        assert!(d.at_stop(pt(3, 0x20), Some(target)).unwrap());
        assert!(d.at_stop(pt(4, 0x30), Some(target)).is_err());
    }

    #[test]
    fn step_counter_counts_steps() {
        let mut d = PmuDrive::stepping().unwrap();
        d.on_step();
        d.on_step();
        assert_eq!(d.count().unwrap(), 2);
    }
}
