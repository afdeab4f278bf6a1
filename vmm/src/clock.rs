//! The VMM's notion of "now", which devices use for timers and clock reads.
//!
//! `Host` is real time. `Virtual` advances only with the guest's own
//! deterministic exits, so a run is a pure function of its start state:
//! used for reproducible runs and for tests that need the same inputs twice.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// How time advances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClockMode {
    /// Host monotonic time.
    Host,
    /// Each deterministic exit advances time by this many ns; idle HLT jumps
    /// to the next timer deadline.
    Virtual {
        /// Nanoseconds per deterministic exit.
        ns_per_exit: u64,
    },
}

/// A clock in ns since the VM started.
#[derive(Debug, Clone)]
pub struct Clock {
    mode: ClockMode,
    start: Instant,
    virtual_ns: u64,
}

impl Clock {
    /// A clock reading `now_ns` now.
    pub fn new(mode: ClockMode, now_ns: u64) -> Self {
        let start = Instant::now()
            .checked_sub(std::time::Duration::from_nanos(now_ns))
            .unwrap_or_else(Instant::now);
        Clock {
            mode,
            start,
            virtual_ns: now_ns,
        }
    }

    /// The mode.
    pub fn mode(&self) -> ClockMode {
        self.mode
    }

    /// Whether time follows the guest rather than the host.
    pub fn is_virtual(&self) -> bool {
        matches!(self.mode, ClockMode::Virtual { .. })
    }

    /// Now, in ns since the VM started.
    pub fn now_ns(&self) -> u64 {
        match self.mode {
            ClockMode::Host => self.start.elapsed().as_nanos() as u64,
            ClockMode::Virtual { .. } => self.virtual_ns,
        }
    }

    /// The host instant at which the clock will read `ns` (for timers).
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.start + std::time::Duration::from_nanos(ns)
    }

    /// A deterministic exit happened.
    pub fn on_exit(&mut self) {
        if let ClockMode::Virtual { ns_per_exit } = self.mode {
            self.virtual_ns = self.virtual_ns.saturating_add(ns_per_exit);
        }
    }

    /// Make the clock read at least `ns` from now on (never backwards): a
    /// backup going live continues from the latest time its guest was given.
    pub fn advance_to(&mut self, ns: u64) {
        let now = self.now_ns();
        if ns <= now {
            return;
        }
        match self.mode {
            ClockMode::Host => {
                let ahead = std::time::Duration::from_nanos(ns - now);
                self.start = self.start.checked_sub(ahead).unwrap_or(self.start);
            }
            ClockMode::Virtual { .. } => self.virtual_ns = ns,
        }
    }

    /// Idle until `ns`: virtual time jumps there at once.
    pub fn skip_to(&mut self, ns: u64) {
        if self.is_virtual() {
            self.virtual_ns = self.virtual_ns.max(ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_clock_follows_exits_only() {
        let mut c = Clock::new(ClockMode::Virtual { ns_per_exit: 10 }, 5);
        assert_eq!(c.now_ns(), 5);
        c.on_exit();
        c.on_exit();
        assert_eq!(c.now_ns(), 25);
        c.skip_to(100);
        c.skip_to(50);
        assert_eq!(c.now_ns(), 100);
    }

    #[test]
    fn advance_never_goes_back() {
        let mut c = Clock::new(ClockMode::Host, 0);
        c.advance_to(5_000_000_000);
        assert!(c.now_ns() >= 5_000_000_000);
        c.advance_to(1);
        assert!(c.now_ns() >= 5_000_000_000);
        let mut v = Clock::new(ClockMode::Virtual { ns_per_exit: 1 }, 10);
        v.advance_to(3);
        assert_eq!(v.now_ns(), 10);
        v.advance_to(30);
        assert_eq!(v.now_ns(), 30);
    }

    #[test]
    fn host_clock_starts_at_given_time() {
        let c = Clock::new(ClockMode::Host, 1_000_000_000);
        assert!(c.now_ns() >= 1_000_000_000);
    }
}
