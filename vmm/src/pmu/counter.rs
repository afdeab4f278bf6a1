//! The branch counter: a trait the landing loop drives, and the real
//! perf_event implementation.
//!
//! [`PerfCounter`] holds two hardware counters of the same event on the vCPU
//! thread: a *counting* one that is never reset (its value names execution
//! points) and an *overflow* one that is re-armed for each landing and
//! raises a signal. Keeping them apart means re-arming can never disturb
//! the count. Both are pinned, so the kernel never multiplexes them: a
//! multiplexed counter misses events and would be inexact.

use std::os::fd::OwnedFd;

use super::probe::{open_error, BranchEvent, HostFacts};
use super::sys::{self, flag, PerfEventAttr};
use super::PmuError;

/// A counter of guest conditional branches on one vCPU thread.
pub trait BranchCounter {
    /// Branches retired so far (since the counter was opened).
    fn read(&mut self) -> Result<u64, PmuError>;
    /// Raise the overflow signal once `after` (≥ 1) more branches have
    /// retired, replacing any earlier arming. The signal comes late by the
    /// CPU's skid.
    fn arm_overflow(&mut self, after: u64) -> Result<(), PmuError>;
    /// Cancel a pending overflow. A signal already queued may still arrive;
    /// the landing loop treats such a stop like any other.
    fn disarm(&mut self) -> Result<(), PmuError>;
}

/// Which execution the counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Guest mode only, guest kernel and user alike (`exclude_host`): what
    /// the backend uses. Counting guest kernel code needs
    /// perf_event_paranoid ≤ 1 or CAP_PERFMON.
    GuestOnly,
    /// The host thread's own user-mode code (`exclude_guest`,
    /// `exclude_kernel`): for self-tests without a guest.
    HostThread,
}

impl Scope {
    fn flags(self) -> u64 {
        match self {
            Scope::GuestOnly => flag::EXCLUDE_HOST | flag::EXCLUDE_HV,
            Scope::HostThread => flag::EXCLUDE_GUEST | flag::EXCLUDE_HV | flag::EXCLUDE_KERNEL,
        }
    }
}

/// The thread to count and to signal on overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalTarget {
    /// Kernel thread id of the vCPU thread.
    pub tid: libc::pid_t,
    /// Signal to raise on overflow. It needs a handler (a no-op one, or the
    /// VMM's kick handler that sets `immediate_exit`) and must be unblocked
    /// while KVM_RUN runs, or KVM_RUN is not interrupted.
    pub signal: libc::c_int,
}

impl SignalTarget {
    /// The calling thread.
    pub fn current_thread(signal: libc::c_int) -> Self {
        SignalTarget {
            tid: sys::gettid(),
            signal,
        }
    }
}

/// Initial period of the overflow counter; it is opened disabled and every
/// arming sets the real period, so this only has to be valid.
const PARKED_PERIOD: u64 = 1 << 40;

/// Open one counter of `event` on thread `tid` (0: the calling thread).
/// `sampling` makes it an overflow counter.
pub(crate) fn open_event(
    event: BranchEvent,
    scope: Scope,
    tid: libc::pid_t,
    sampling: bool,
) -> std::io::Result<OwnedFd> {
    sys::perf_event_open(&attr(event, scope, sampling), tid)
}

fn attr(event: BranchEvent, scope: Scope, sampling: bool) -> PerfEventAttr {
    let (type_, config) = event.type_config();
    let mut a = PerfEventAttr::new(type_, config);
    a.flags = flag::DISABLED | flag::PINNED | scope.flags();
    if sampling {
        a.sample_period = PARKED_PERIOD;
        a.wakeup_events = 1;
    }
    a
}

/// The real counter: perf_event on the vCPU thread.
#[derive(Debug)]
pub struct PerfCounter {
    count: OwnedFd,
    overflow: OwnedFd,
    event: BranchEvent,
    /// Absolute count at which the armed overflow fires, to skip re-arming
    /// the same point after an unrelated exit.
    armed_at: Option<u64>,
}

impl PerfCounter {
    /// Open, reset and enable the counter for `target.tid`, routing the
    /// overflow signal to that thread. Call it before the vCPU first runs:
    /// points count from here.
    pub fn open(event: BranchEvent, scope: Scope, target: SignalTarget) -> Result<Self, PmuError> {
        let tid = if target.tid == 0 {
            sys::gettid()
        } else {
            target.tid
        };
        let open = |sampling| {
            open_event(event, scope, tid, sampling)
                .map_err(|e| open_error(e, event, &HostFacts::read()))
        };
        let count = open(false)?;
        let overflow = open(true)?;
        sys::route_signal(&overflow, tid, target.signal).map_err(|source| PmuError::Sys {
            op: "fcntl(F_SETOWN_EX/F_SETSIG/O_ASYNC)",
            source,
        })?;
        ioctl(&count, sys::IOC_RESET, 0, "ioctl(PERF_EVENT_IOC_RESET)")?;
        ioctl(&count, sys::IOC_ENABLE, 0, "ioctl(PERF_EVENT_IOC_ENABLE)")?;
        Ok(PerfCounter {
            count,
            overflow,
            event,
            armed_at: None,
        })
    }

    /// The event counted.
    pub fn event(&self) -> BranchEvent {
        self.event
    }
}

impl BranchCounter for PerfCounter {
    fn read(&mut self) -> Result<u64, PmuError> {
        match sys::read_u64(&self.count) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(PmuError::CounterLost),
            Err(source) => Err(PmuError::Sys {
                op: "read(perf counter)",
                source,
            }),
        }
    }

    fn arm_overflow(&mut self, after: u64) -> Result<(), PmuError> {
        if after == 0 || after >= 1 << 63 {
            return Err(PmuError::Invalid(format!("overflow period {after}")));
        }
        let at = self.read()?.saturating_add(after);
        if self.armed_at == Some(at) {
            return Ok(());
        }
        // Stop, zero, set the period, then enable for exactly one overflow:
        // REFRESH(1) disables the counter again after it fires, so a late
        // stop never gets a second signal. Since Linux 3.14 PERIOD restarts
        // the countdown instead of waiting for the old period to expire.
        ioctl(
            &self.overflow,
            sys::IOC_DISABLE,
            0,
            "ioctl(PERF_EVENT_IOC_DISABLE)",
        )?;
        ioctl(
            &self.overflow,
            sys::IOC_RESET,
            0,
            "ioctl(PERF_EVENT_IOC_RESET)",
        )?;
        sys::ioctl_period(&self.overflow, after).map_err(|source| PmuError::Sys {
            op: "ioctl(PERF_EVENT_IOC_PERIOD)",
            source,
        })?;
        ioctl(
            &self.overflow,
            sys::IOC_REFRESH,
            1,
            "ioctl(PERF_EVENT_IOC_REFRESH)",
        )?;
        self.armed_at = Some(at);
        Ok(())
    }

    fn disarm(&mut self) -> Result<(), PmuError> {
        self.armed_at = None;
        ioctl(
            &self.overflow,
            sys::IOC_DISABLE,
            0,
            "ioctl(PERF_EVENT_IOC_DISABLE)",
        )
    }
}

fn ioctl(
    fd: &OwnedFd,
    req: libc::c_ulong,
    arg: libc::c_ulong,
    op: &'static str,
) -> Result<(), PmuError> {
    sys::ioctl_int(fd, req, arg).map_err(|source| PmuError::Sys { op, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_counter_attributes() {
        let a = attr(BranchEvent::IntelConditional, Scope::GuestOnly, false);
        assert_eq!((a.type_, a.config), (sys::TYPE_RAW, 0x5101c4));
        assert_eq!(a.flags & flag::EXCLUDE_HOST, flag::EXCLUDE_HOST);
        assert_eq!(a.flags & (flag::EXCLUDE_GUEST | flag::EXCLUDE_KERNEL), 0);
        assert_ne!(a.flags & flag::PINNED, 0);
        assert_ne!(a.flags & flag::DISABLED, 0);
        assert_eq!(a.sample_period, 0);
    }

    #[test]
    fn overflow_counter_attributes() {
        let a = attr(BranchEvent::Generic, Scope::GuestOnly, true);
        assert_eq!(
            (a.type_, a.config),
            (sys::TYPE_HARDWARE, sys::HW_BRANCH_INSTRUCTIONS)
        );
        assert!(a.sample_period > 0 && a.sample_period < 1 << 63);
        assert_eq!(a.wakeup_events, 1);
    }

    #[test]
    fn host_scope_counts_only_host_user_mode() {
        let a = attr(BranchEvent::AmdConditional, Scope::HostThread, false);
        assert_eq!(a.config, 0x5100d1);
        assert_eq!(a.flags & flag::EXCLUDE_HOST, 0);
        assert_ne!(a.flags & flag::EXCLUDE_GUEST, 0);
        assert_ne!(a.flags & flag::EXCLUDE_KERNEL, 0);
    }
}
