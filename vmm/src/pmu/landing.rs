//! Landing on an execution point: the pure decision function.
//!
//! The run loop calls [`Lander::plan`] after every stop of the vCPU with
//! where the vCPU is and where it must get to, does what the answer says,
//! and asks again. `plan` keeps no state, so a stop for any other reason
//! (an I/O exit, a stale signal, a kick) is handled by simply asking again.

use super::PmuError;

/// A point of the guest's instruction stream: guest conditional branches
/// retired, RIP, and RCX (which tells apart the iterations of one REP
/// string instruction, where the other two stay the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    /// Retired guest conditional branches.
    pub count: u64,
    /// Guest RIP.
    pub rip: u64,
    /// Guest RCX.
    pub rcx: u64,
}

/// What the run loop should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// No target: run with no overflow armed (disarm a pending one).
    RunFree,
    /// Far from the target: arm the overflow `overflow_after` branches from
    /// now and run. The overflow is early by the margin, so the skid cannot
    /// carry the vCPU past the target.
    ArmAndRun {
        /// Branches from now until the overflow signal.
        overflow_after: u64,
    },
    /// Close to the target: disarm, and execute one guest instruction (one
    /// iteration of a REP string instruction) with single-stepping.
    Step,
    /// Close to the target, with breakpoints enabled
    /// ([`Lander::with_breakpoints`]): disarm, set a hardware instruction
    /// breakpoint at `rip` (KVM_GUESTDBG_USE_HW_BP, DR0 = rip) and run. The
    /// vCPU stops each time it reaches `rip`; far fewer exits than stepping
    /// through long straight-line code or many REP iterations.
    RunToBreakpoint {
        /// The target's RIP.
        rip: u64,
    },
    /// The vCPU is exactly at the target: apply the event.
    Arrived,
    /// The vCPU went past the target; replay cannot continue.
    Overshot {
        /// Where the vCPU is.
        now: Position,
        /// Where it should have stopped.
        target: Position,
    },
}

impl Action {
    /// `Overshot` as an error, any other action as itself.
    pub fn check(self) -> Result<Action, PmuError> {
        match self {
            Action::Overshot { now, target } => Err(PmuError::Overshoot { now, target }),
            other => Ok(other),
        }
    }
}

/// Smallest overflow period the landing arms. The x86 perf driver raises
/// a period of 1 to 2, and for so few branches stepping costs less than an
/// overflow interrupt anyway.
pub const DEFAULT_MIN_ARM: u64 = 2;

/// Largest overflow period armed at once: 2^31 - 1 fits every x86 counter
/// width; a longer distance is covered by re-arming after the early stop.
pub const DEFAULT_MAX_ARM: u64 = (1 << 31) - 1;

/// Decides how to reach a target point. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lander {
    margin: u64,
    min_arm: u64,
    max_arm: u64,
    breakpoints: bool,
}

impl Lander {
    /// A lander that stops free running `margin` branches before the
    /// target. `margin` must exceed the largest skid of the CPU (see
    /// [`super::check_skid`] and [`Lander::margin_for_skid`]); it must be at
    /// least 1, since even a skid of 0 stops the vCPU some instructions
    /// after the overflowing branch.
    pub fn new(margin: u64) -> Result<Self, PmuError> {
        if margin == 0 {
            return Err(PmuError::Invalid(
                "landing margin must be at least 1 branch".to_owned(),
            ));
        }
        Ok(Lander {
            margin,
            min_arm: DEFAULT_MIN_ARM,
            max_arm: DEFAULT_MAX_ARM,
            breakpoints: false,
        })
    }

    /// A margin with headroom for a measured worst skid: twice it plus 16.
    pub fn margin_for_skid(max_skid: u64) -> u64 {
        max_skid.saturating_mul(2).saturating_add(16)
    }

    /// Change the smallest period worth arming (at least 1).
    pub fn with_min_arm(mut self, min_arm: u64) -> Self {
        self.min_arm = min_arm.max(1);
        self
    }

    /// Change the largest period armed at once (at least 1).
    pub fn with_max_arm(mut self, max_arm: u64) -> Self {
        self.max_arm = max_arm.max(1);
        self
    }

    /// Cover the last stretch by running to a hardware breakpoint at the
    /// target's RIP instead of stepping every instruction; stepping remains
    /// for leaving the breakpoint's RIP and for REP iterations.
    pub fn with_breakpoints(mut self, on: bool) -> Self {
        self.breakpoints = on;
        self
    }

    /// The margin in branches.
    pub fn margin(&self) -> u64 {
        self.margin
    }

    /// What to do at `now` to reach `target`.
    pub fn plan(&self, now: Position, target: Position) -> Action {
        let Some(distance) = target.count.checked_sub(now.count) else {
            return Action::Overshot { now, target };
        };
        if distance == 0 {
            return self.plan_same_count(now, target);
        }
        match distance.saturating_sub(self.margin) {
            free if free >= self.min_arm => Action::ArmAndRun {
                overflow_after: free.min(self.max_arm),
            },
            _ => self.approach(now, target),
        }
    }

    /// Like [`Lander::plan`], with no target meaning "run freely".
    pub fn plan_next(&self, now: Position, target: Option<Position>) -> Action {
        target.map_or(Action::RunFree, |t| self.plan(now, t))
    }

    /// On the target's branch count the vCPU is in the target's branch-free
    /// stretch: at the target, or before it (keep stepping). Being past it
    /// cannot be seen from the position alone, since straight-line code may
    /// jump backwards without a conditional branch; single steps from a lower
    /// count never pass the target unseen, and [`Landing`] rejects a free run
    /// that ends on the target's count.
    fn plan_same_count(&self, now: Position, target: Position) -> Action {
        if now.rip == target.rip && now.rcx == target.rcx {
            Action::Arrived
        } else {
            self.approach(now, target)
        }
    }

    /// The slow, exact approach: a single step, or a run to a breakpoint at
    /// the target's RIP unless the vCPU already sits on that RIP (an
    /// earlier visit in a loop, or an earlier REP iteration).
    fn approach(&self, now: Position, target: Position) -> Action {
        if self.breakpoints && now.rip != target.rip {
            Action::RunToBreakpoint { rip: target.rip }
        } else {
            Action::Step
        }
    }
}

/// One landing: [`Lander::plan`] plus the one fact `plan` cannot see, how
/// the vCPU got where it is. A free run (the overflow stop, or any exit
/// while armed) that ends on or beyond the target's branch count has run
/// the margin out: the skid was at least the margin, and the vCPU may be
/// past the target in its branch-free stretch. That is reported as an
/// overshoot at once, unless the vCPU is exactly on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landing {
    lander: Lander,
    target: Position,
    ran_free: bool,
}

impl Landing {
    /// Start landing on `target`.
    pub fn new(lander: Lander, target: Position) -> Self {
        Landing {
            lander,
            target,
            ran_free: false,
        }
    }

    /// The point being landed on.
    pub fn target(&self) -> Position {
        self.target
    }

    /// Call after every stop of the vCPU with its position; do what it
    /// returns. Never returns [`Action::Overshot`]: that is the error.
    pub fn next(&mut self, now: Position) -> Result<Action, PmuError> {
        let target = self.target;
        if self.ran_free && now.count >= target.count && now != target {
            return Err(PmuError::Overshoot { now, target });
        }
        let action = self.lander.plan(now, target).check()?;
        self.ran_free = matches!(action, Action::ArmAndRun { .. } | Action::RunFree);
        Ok(action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(count: u64, rip: u64, rcx: u64) -> Position {
        Position { count, rip, rcx }
    }

    #[test]
    fn far_away_arms_margin_early() {
        let l = Lander::new(10).unwrap();
        assert_eq!(
            l.plan(pos(0, 1, 0), pos(1000, 5, 0)),
            Action::ArmAndRun {
                overflow_after: 990
            }
        );
    }

    #[test]
    fn within_margin_steps() {
        let l = Lander::new(10).unwrap();
        assert_eq!(l.plan(pos(990, 1, 0), pos(1000, 5, 0)), Action::Step);
        assert_eq!(l.plan(pos(999, 1, 0), pos(1000, 5, 0)), Action::Step);
        // free distance 1 < min_arm 2: step
        assert_eq!(l.plan(pos(989, 1, 0), pos(1000, 5, 0)), Action::Step);
        assert_eq!(
            l.plan(pos(988, 1, 0), pos(1000, 5, 0)),
            Action::ArmAndRun { overflow_after: 2 }
        );
    }

    #[test]
    fn same_count_compares_rip_and_rcx() {
        let l = Lander::new(3).unwrap();
        let t = pos(7, 0x100, 4);
        assert_eq!(l.plan(pos(7, 0x100, 4), t), Action::Arrived);
        assert_eq!(l.plan(pos(7, 0xf0, 4), t), Action::Step);
        assert_eq!(l.plan(pos(7, 0x100, 5), t), Action::Step);
        assert_eq!(l.plan(pos(7, 0x110, 4), t), Action::Step);
    }

    #[test]
    fn past_the_count_is_overshoot_naming_both_points() {
        let l = Lander::new(3).unwrap();
        let (now, target) = (pos(8, 0x100, 0), pos(7, 0x200, 9));
        let a = l.plan(now, target);
        assert_eq!(a, Action::Overshot { now, target });
        let msg = a.check().unwrap_err().to_string();
        assert!(msg.contains("now at count 8 rip 0x100 rcx 0x0"), "{msg}");
        assert!(msg.contains("target count 7 rip 0x200 rcx 0x9"), "{msg}");
    }

    #[test]
    fn long_distances_are_armed_in_chunks() {
        let l = Lander::new(100).unwrap().with_max_arm(1000);
        assert_eq!(
            l.plan(pos(0, 0, 0), pos(u64::MAX, 0, 0)),
            Action::ArmAndRun {
                overflow_after: 1000
            }
        );
    }

    #[test]
    fn min_arm_is_configurable() {
        let l = Lander::new(5).unwrap().with_min_arm(50);
        assert_eq!(l.plan(pos(0, 0, 0), pos(54, 0, 0)), Action::Step);
        assert_eq!(
            l.plan(pos(0, 0, 0), pos(55, 0, 0)),
            Action::ArmAndRun { overflow_after: 50 }
        );
    }

    #[test]
    fn breakpoints_replace_steps_away_from_the_target_rip() {
        let l = Lander::new(10).unwrap().with_breakpoints(true);
        let t = pos(1000, 0x500, 3);
        assert_eq!(
            l.plan(pos(995, 0x100, 0), t),
            Action::RunToBreakpoint { rip: 0x500 }
        );
        assert_eq!(l.plan(pos(995, 0x500, 0), t), Action::Step);
        assert_eq!(l.plan(pos(1000, 0x500, 5), t), Action::Step);
        assert_eq!(
            l.plan(pos(1000, 0x400, 3), t),
            Action::RunToBreakpoint { rip: 0x500 }
        );
        assert_eq!(l.plan(pos(1000, 0x500, 3), t), Action::Arrived);
        assert_eq!(
            l.plan(pos(0, 0, 0), t),
            Action::ArmAndRun {
                overflow_after: 990
            }
        );
    }

    #[test]
    fn no_target_runs_free() {
        let l = Lander::new(5).unwrap();
        assert_eq!(l.plan_next(pos(1, 2, 3), None), Action::RunFree);
        assert_eq!(
            l.plan_next(pos(1, 2, 3), Some(pos(1, 2, 3))),
            Action::Arrived
        );
    }

    #[test]
    fn landing_rejects_a_free_run_onto_the_target_count() {
        let l = Lander::new(4).unwrap();
        let target = pos(100, 0x500, 0);
        let mut landing = Landing::new(l, target);
        assert_eq!(
            landing.next(pos(0, 0, 0)).unwrap(),
            Action::ArmAndRun { overflow_after: 96 }
        );
        // the stop came 4 branches late: margin exhausted
        let err = landing.next(pos(100, 0x480, 0)).unwrap_err();
        assert!(matches!(err, PmuError::Overshoot { .. }), "{err}");
    }

    #[test]
    fn landing_accepts_stepping_within_the_stretch() {
        let target = pos(100, 0x500, 0);
        let mut landing = Landing::new(Lander::new(4).unwrap(), target);
        assert_eq!(
            landing.next(pos(0, 0, 0)).unwrap(),
            Action::ArmAndRun { overflow_after: 96 }
        );
        assert_eq!(landing.next(pos(98, 0x400, 0)).unwrap(), Action::Step);
        assert_eq!(landing.next(pos(100, 0x480, 0)).unwrap(), Action::Step);
        assert_eq!(landing.next(pos(100, 0x500, 0)).unwrap(), Action::Arrived);
        // a free run that stops exactly on the target is exact, not lucky
        let mut landing = Landing::new(Lander::new(4).unwrap(), target);
        landing.next(pos(0, 0, 0)).unwrap();
        assert_eq!(landing.next(target).unwrap(), Action::Arrived);
        assert_eq!(landing.target(), target);
    }

    #[test]
    fn zero_margin_is_rejected() {
        assert!(matches!(Lander::new(0), Err(PmuError::Invalid(_))));
        assert_eq!(Lander::margin_for_skid(10), 36);
        assert_eq!(Lander::margin_for_skid(u64::MAX), u64::MAX);
    }
}
