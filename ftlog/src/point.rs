//! Execution points and the backends that count them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::LogError;

/// One instant of the guest's instruction stream.
///
/// `count` is what the session's [`ExecBackend`] counts; `rip` and `rcx`
/// tell apart instants within one count (RCX for REP string instructions,
/// which stay at one RIP while RCX counts down). The derived order is
/// lexicographic by (count, rip, rcx): handy for sorting, but only `count`
/// is guaranteed to grow with time.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ExecPoint {
    /// The backend's counter at this instant.
    pub count: u64,
    /// Guest RIP.
    pub rip: u64,
    /// Guest RCX.
    pub rcx: u64,
}

impl fmt::Display for ExecPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "count={} rip={:#x} rcx={:#x}",
            self.count, self.rip, self.rcx
        )
    }
}

/// What [`ExecPoint::count`] counts. Fixed for a whole log (see
/// [`crate::LogHeader::backend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExecBackend {
    /// Guest retired branches, from a guest-only PMU counter.
    Pmu,
    /// Single-step exits plus deterministic VM exits.
    Singlestep,
    /// Deterministic VM exits only: port and MMIO accesses, HLT, MSR
    /// accesses, and interrupt-window exits requested at a point.
    Exits,
}

impl ExecBackend {
    /// Every backend, in declaration order.
    pub const ALL: [ExecBackend; 3] = [
        ExecBackend::Pmu,
        ExecBackend::Singlestep,
        ExecBackend::Exits,
    ];

    /// The backend's name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            ExecBackend::Pmu => "pmu",
            ExecBackend::Singlestep => "singlestep",
            ExecBackend::Exits => "exits",
        }
    }
}

impl fmt::Display for ExecBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ExecBackend {
    type Err = LogError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ExecBackend::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| LogError::UnknownBackend(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_round_trip() {
        for b in ExecBackend::ALL {
            assert_eq!(b.to_string().parse::<ExecBackend>().unwrap(), b);
        }
        assert_eq!("pmu".parse::<ExecBackend>().unwrap(), ExecBackend::Pmu);
        assert_eq!(
            "singlestep".parse::<ExecBackend>().unwrap(),
            ExecBackend::Singlestep
        );
        assert_eq!("exits".parse::<ExecBackend>().unwrap(), ExecBackend::Exits);
    }

    #[test]
    fn unknown_backend_is_named_in_the_error() {
        let e = "PMU".parse::<ExecBackend>().unwrap_err();
        assert!(matches!(&e, LogError::UnknownBackend(n) if n == "PMU"));
        assert!(e.to_string().contains("\"PMU\""), "{e}");
    }

    #[test]
    fn points_order_by_count_then_rip_then_rcx() {
        let p = |count, rip, rcx| ExecPoint { count, rip, rcx };
        assert!(p(1, 9, 9) < p(2, 0, 0));
        assert!(p(1, 1, 9) < p(1, 2, 0));
        assert!(p(1, 1, 1) < p(1, 1, 2));
        assert_eq!(p(3, 0x10, 5).to_string(), "count=3 rip=0x10 rcx=0x5");
    }
}
