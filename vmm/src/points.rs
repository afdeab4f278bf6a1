//! Execution points: which VM exits name a deterministic instant of the
//! guest's instruction stream, where inputs may be applied.
//!
//! See docs/replay.md. In short: an exit the guest's own instruction caused
//! (port I/O, MMIO, HLT, an MSR access, an interrupt window requested at a
//! point) happens at the same instruction on every run; an exit caused by a
//! host event (a signal, a host interrupt) does not.

pub use ftlog::ExecPoint;

/// Which exits are execution points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PointMode {
    /// Every exit, host-caused ones included: fine for a VM nobody replays,
    /// and it gives the lowest interrupt latency.
    AnyExit,
    /// Only deterministic exits (the `exits` backend).
    Exits,
    /// Deterministic exits plus a single-step exit after every instruction
    /// (the `singlestep` backend).
    SingleStep,
    /// Any stop, named by a guest branch counter (the `pmu` backend); the
    /// backup lands on each logged point with [`crate::pmu::PmuDrive`].
    Pmu,
}

impl PointMode {
    /// Whether an exit of this kind is an execution point in this mode.
    pub fn is_point(self, exit: ExitKind) -> bool {
        if exit == ExitKind::Emulated {
            return false;
        }
        matches!(self, PointMode::AnyExit | PointMode::Pmu) || self.counts(exit)
    }

    /// Whether host kicks are useful: only where a host-caused stop is a point.
    pub fn wants_kicks(self) -> bool {
        matches!(self, PointMode::AnyExit | PointMode::Pmu)
    }

    /// Whether an exit of this kind advances the point counter.
    pub fn counts(self, exit: ExitKind) -> bool {
        match exit {
            _ if self == PointMode::Pmu => false,
            ExitKind::Interrupted | ExitKind::Emulated => false,
            ExitKind::Debug => self == PointMode::SingleStep,
            _ => true,
        }
    }
}

impl PointMode {
    /// The mode that implements a logged backend on this host. The `pmu`
    /// backend needs a hardware PMU; where there is none the error says so.
    pub fn for_backend(backend: ftlog::ExecBackend) -> crate::Result<Self> {
        match backend {
            ftlog::ExecBackend::Exits => Ok(PointMode::Exits),
            ftlog::ExecBackend::Singlestep => Ok(PointMode::SingleStep),
            ftlog::ExecBackend::Pmu => match crate::pmu::probe() {
                Err(e) => Err(crate::Error::Backend(format!("pmu: {e}"))),
                Ok(_) => Ok(PointMode::Pmu),
            },
        }
    }

    /// The backend name a log records for this mode.
    pub fn backend(self) -> Option<ftlog::ExecBackend> {
        match self {
            PointMode::Exits => Some(ftlog::ExecBackend::Exits),
            PointMode::SingleStep => Some(ftlog::ExecBackend::Singlestep),
            PointMode::Pmu => Some(ftlog::ExecBackend::Pmu),
            PointMode::AnyExit => None,
        }
    }

    /// The best backend this host supports: `pmu` where it works, else `exits`.
    pub fn best_available() -> ftlog::ExecBackend {
        match PointMode::for_backend(ftlog::ExecBackend::Pmu) {
            Ok(_) => ftlog::ExecBackend::Pmu,
            Err(e) => {
                tracing::info!("{e}; using the exits backend");
                ftlog::ExecBackend::Exits
            }
        }
    }
}

/// The exits the run loop distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Port I/O.
    Io,
    /// MMIO.
    Mmio,
    /// HLT.
    Hlt,
    /// RDMSR/WRMSR of a filtered MSR.
    Msr,
    /// The requested interrupt window opened.
    IrqWindow,
    /// A single-step (or other debug) exit.
    Debug,
    /// KVM_RUN returned because of a signal or host event.
    Interrupted,
    /// KVM could not emulate an instruction and the VMM did
    /// ([`crate::emulate`]). Never a point, in any mode: which instructions
    /// KVM gives up on is a property of the host, and not a stable one.
    Emulated,
    /// A trapped RDTSC the VMM answered ([`crate::rdtsc`]): a breakpoint
    /// at a fixed guest address, so like port I/O the guest's own
    /// instruction caused it, and it is a point. Only without stepping and
    /// outside the `pmu` backend (there it is treated as `Emulated`).
    Rdtsc,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_caused_exits_are_points_only_when_nobody_replays() {
        assert!(PointMode::AnyExit.is_point(ExitKind::Interrupted));
        assert!(!PointMode::Exits.is_point(ExitKind::Interrupted));
        assert!(!PointMode::SingleStep.is_point(ExitKind::Interrupted));
        assert!(!PointMode::Exits.counts(ExitKind::Interrupted));
        assert!(PointMode::Exits.counts(ExitKind::Rdtsc));
        assert!(PointMode::Exits.is_point(ExitKind::Rdtsc));
    }

    #[test]
    fn emulated_instructions_are_never_points_nor_counted() {
        for mode in [
            PointMode::AnyExit,
            PointMode::Exits,
            PointMode::SingleStep,
            PointMode::Pmu,
        ] {
            assert!(!mode.is_point(ExitKind::Emulated), "{mode:?}");
            assert!(!mode.counts(ExitKind::Emulated), "{mode:?}");
        }
    }

    #[test]
    fn single_steps_count_only_in_singlestep_mode() {
        assert!(PointMode::SingleStep.counts(ExitKind::Debug));
        assert!(!PointMode::Exits.counts(ExitKind::Debug));
        assert!(PointMode::Exits.counts(ExitKind::Hlt));
    }
}
