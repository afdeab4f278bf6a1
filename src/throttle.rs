//! The lag throttle: the primary's recorder, slowed while the backup's
//! replay is too far behind, so a failover never has far to catch up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ftlog::PrimarySender;
use vmm::record::Recorder;
use vmm::Machine;

use crate::heartbeat::Heartbeat;

/// How far (in host time) the backup's replay is behind: the age of the
/// oldest entry it has not executed, from samples of the log position taken
/// at execution points.
#[derive(Debug, Default)]
pub struct LagClock {
    samples: std::collections::VecDeque<(u64, Instant)>,
}

impl LagClock {
    /// At this moment `produced` entries exist.
    pub fn note(&mut self, produced: u64) {
        if self.samples.back().is_none_or(|(s, _)| *s < produced) {
            self.samples.push_back((produced, Instant::now()));
        }
    }

    /// The lag when the backup has executed every entry up to `executed`.
    pub fn lag(&mut self, executed: Option<u64>) -> Duration {
        let done = executed.map_or(0, |e| e + 1);
        while self.samples.front().is_some_and(|(s, _)| *s <= done) {
            self.samples.pop_front();
        }
        self.samples
            .front()
            .map_or(Duration::ZERO, |(_, t)| t.elapsed())
    }
}

/// The recorder, slowed down while the backup's replay lags too far behind
/// (the channel's lag bound), so a failover never has far to catch up, and
/// stopped when the backup's heartbeats stop.
pub struct Throttled {
    inner: Recorder<Arc<PrimarySender>>,
    tx: Arc<PrimarySender>,
    heartbeat: Option<Heartbeat>,
    lag: LagClock,
    lag_bound: Duration,
}

impl Throttled {
    /// Throttle `inner` (which records into `tx`) to `lag_bound` of replay
    /// lag; stop when `heartbeat` finds the backup dead.
    pub fn new(
        inner: Recorder<Arc<PrimarySender>>,
        tx: Arc<PrimarySender>,
        heartbeat: Option<Heartbeat>,
        lag_bound: Duration,
    ) -> Self {
        Throttled {
            inner,
            tx,
            heartbeat,
            lag: LagClock::default(),
            lag_bound,
        }
    }

    /// The recorder inside.
    pub fn into_recorder(self) -> Recorder<Arc<PrimarySender>> {
        self.inner
    }
}

impl vmm::Observer for Throttled {
    fn at_point(&mut self, m: &mut Machine) -> vmm::Result<vmm::Flow> {
        if let Some(hb) = &self.heartbeat {
            if !hb.is_alive() {
                return Err(vmm::Error::Observer(format!(
                    "the backup's heartbeats stopped {:?} ago",
                    hb.silence()
                )));
            }
        }
        let channel =
            |e: ftlog::ChannelError| vmm::Error::Observer(format!("logging channel: {e}"));
        self.tx.throttle().map_err(channel)?;
        self.lag.note(self.tx.next_seq());
        let mut acks = self.tx.acks();
        while self.lag.lag(acks.executed) > self.lag_bound {
            acks = self
                .tx
                .wait_acks_change(acks, Duration::from_millis(50))
                .map_err(channel)?;
        }
        self.inner.at_point(m)
    }

    fn on_sample(
        &mut self,
        m: &mut Machine,
        at: vmm::Access,
        kind: Option<vmm::devices::SampleKind>,
        values: &[u64],
    ) -> vmm::Result<()> {
        self.inner.on_sample(m, at, kind, values)
    }

    fn on_output(
        &mut self,
        m: &mut Machine,
        out: &vmm::output::Output,
    ) -> vmm::Result<Option<u64>> {
        self.inner.on_output(m, out)
    }

    fn on_inject(&mut self, m: &mut Machine, vector: u8) -> vmm::Result<()> {
        self.inner.on_inject(m, vector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_unexecuted_entry() {
        let mut c = LagClock::default();
        assert_eq!(c.lag(None), Duration::ZERO);
        c.note(3); // entries 0..3 exist
        std::thread::sleep(Duration::from_millis(30));
        c.note(5);
        assert!(c.lag(None) >= Duration::from_millis(30));
        assert!(
            c.lag(Some(1)) >= Duration::from_millis(30),
            "entry 2 is still pending"
        );
        let after_first = c.lag(Some(2));
        assert!(
            after_first < Duration::from_millis(30),
            "only entries 3 and 4 pending"
        );
        assert_eq!(c.lag(Some(4)), Duration::ZERO);
    }
}
