//! The `pmu` execution-point backend: name a point of the guest's
//! instruction stream by (retired conditional branches, RIP, RCX), and land a
//! replaying vCPU on exactly such a point.
//!
//! # Method
//!
//! The idea is the one rr (the Mozilla record-and-replay debugger) made
//! practical for user-space processes, applied here to a whole guest:
//!
//! * A hardware counter of *retired conditional branches*, restricted to guest
//!   mode, advances only when the guest executes a conditional branch. Every
//!   loop iteration retires one, so the count tells loop passes apart; the
//!   iterations of one REP string instruction keep RIP and the count, and
//!   RCX tells them apart. So (branches, RIP, RCX) names one instant, the
//!   same on every run of the same guest. (Not always: a branch-free
//!   function called twice in one stretch with equal RCX gives two equal
//!   triples; docs/pmu.md, Limits.)
//! * On the primary the vCPU stops wherever it stops (any exit, a host
//!   signal); reading the counter and the registers there names the point at
//!   which an asynchronous input was applied.
//! * On the backup, reaching a point cannot rely on the counter's overflow
//!   interrupt alone: the interrupt arrives some branches after the overflow
//!   ("skid"). So, like rr, the backend asks for the interrupt a safety
//!   *margin* of branches early, lets the guest run free until then, and
//!   covers the remaining distance by single-stepping, comparing the count,
//!   RIP and RCX after every step. Going past the target is detected and
//!   reported, never silently accepted.
//! * A counter is only trusted after it counted a guest loop with a known
//!   number of branches exactly, repeatedly (virtual PMUs and some CPUs
//!   over- or under-count). See [`validate`].
//!
//! # Pieces
//!
//! * [`probe()`]: is a usable counter there at all, and which event.
//! * [`counter`]: the [`BranchCounter`] trait and the real [`PerfCounter`].
//! * [`landing`]: the pure decision function [`Lander::plan`], and
//!   [`Landing`], which the run loop consults after every stop.
//! * [`validate`]: start-up checks of exactness and skid.
//!
//! docs/pmu.md explains the run-loop integration and the limits. The hosts
//! the project is developed and tested on have no PMU; only the pure parts
//! (landing, validation, attribute layout) and the probe's refusal run there.

pub mod counter;
pub mod drive;
pub mod landing;
pub mod probe;
mod sys;
pub mod validate;

#[cfg(test)]
mod sim;

pub use counter::{BranchCounter, PerfCounter, Scope, SignalTarget};
pub use drive::{PmuDrive, StepCounter};
pub use landing::{Action, Lander, Landing, Position};
pub use probe::{probe, BranchEvent, CpuVendor, PmuInfo};
pub use validate::{calibration_loop, check_counter, check_skid};

/// What the user should do when this backend cannot be used.
pub const FALLBACK_ADVICE: &str =
    "the pmu backend cannot be used here; choose `--backend exits` or `--backend singlestep`";

/// Errors of the `pmu` backend.
#[derive(Debug, thiserror::Error)]
pub enum PmuError {
    /// The kernel exposes no hardware PMU (no `cpu` event source).
    #[error("no hardware performance counters: {detail}; {advice}", advice = FALLBACK_ADVICE)]
    NoPmu {
        /// Why we think so (VM without a virtual PMU, missing event source).
        detail: String,
    },

    /// The PMU exists but refuses the event or an attribute we need.
    #[error("the PMU does not support {what} ({errno_name}: {source}); {advice}", advice = FALLBACK_ADVICE)]
    Unsupported {
        /// What was asked for.
        what: String,
        /// Symbolic errno, e.g. `ENOENT`.
        errno_name: &'static str,
        /// The OS error.
        source: std::io::Error,
    },

    /// Permission denied opening the counter.
    #[error(
        "not permitted to open a guest branch counter ({errno_name}); \
         kernel.perf_event_paranoid is {paranoid}: run as root, grant CAP_PERFMON, \
         or set kernel.perf_event_paranoid to 1 or less; otherwise {advice}",
        advice = FALLBACK_ADVICE
    )]
    NotPermitted {
        /// Symbolic errno, `EACCES` or `EPERM`.
        errno_name: &'static str,
        /// /proc/sys/kernel/perf_event_paranoid, or "unknown".
        paranoid: String,
    },

    /// Any other failing system call.
    #[error("{op} failed: {source}")]
    Sys {
        /// The call, e.g. `ioctl(PERF_EVENT_IOC_PERIOD)`.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },

    /// The pinned counter lost its hardware counter (another user took it),
    /// so its value is no longer exact.
    #[error("the branch counter was descheduled from the PMU (pinned event in error state); its count is lost")]
    CounterLost,

    /// The replaying vCPU went past the target point.
    #[error(
        "overshot the execution point: now at count {} rip {:#x} rcx {:#x}, target count {} rip {:#x} rcx {:#x} \
         (the skid exceeded the margin, or the counter is not deterministic)",
        now.count, now.rip, now.rcx, target.count, target.rip, target.rcx
    )]
    Overshoot {
        /// Where the vCPU is.
        now: Position,
        /// Where it should have stopped.
        target: Position,
    },

    /// The start-up calibration found the counter inexact.
    #[error("the branch counter is not exact: {detail}; {advice}", advice = FALLBACK_ADVICE)]
    Inexact {
        /// The numbers.
        detail: String,
    },

    /// The measured overflow skid does not fit the landing margin.
    #[error("the overflow interrupt skid is too large: {detail}")]
    Skid {
        /// The numbers and what to do.
        detail: String,
    },

    /// A caller passed a value the API cannot use.
    #[error("invalid argument: {0}")]
    Invalid(String),
}
