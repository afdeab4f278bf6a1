//! The lag throttle: the primary's recorder, slowed at execution points
//! while the backup's replay is too far behind (so a failover never has far
//! to catch up) or while the output gate is full (so no output is lost),
//! and stopped when the backup is found dead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ftlog::PrimarySender;
use netdev::OutputGate;
use vmm::record::Recorder;
use vmm::Machine;

use crate::output::Output;

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

/// The throttle's bounds.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleBounds {
    /// How far behind (host time) the backup's replay may fall before the
    /// guest is stalled; the channel's `lag_bound` caps it in entries.
    pub lag: Duration,
    /// How long the guest may stay stalled by the lag before the backup is
    /// declared dead ([`FtOptions::throttle_limit`](crate::ft_options::FtOptions::throttle_limit)).
    pub give_up: Duration,
}

/// The recorder behind the lag throttle and the output gate's bound. A
/// backup that keeps the guest stalled past the bound is declared dead: the
/// run ends with an error ([`Throttled::gave_up`] says why), which the
/// primary answers with the arbiter. A channel that failed (a heartbeat
/// watch declares a dead backup through it too) ends the run at the next
/// point.
pub struct Throttled {
    inner: Recorder<Arc<PrimarySender>>,
    tx: Arc<PrimarySender>,
    gate: OutputGate<Output>,
    lag: LagClock,
    bounds: ThrottleBounds,
    gave_up: Option<String>,
}

/// How often a stalled guest re-checks.
const POLL: Duration = Duration::from_millis(50);

fn channel(e: ftlog::ChannelError) -> vmm::Error {
    vmm::Error::Observer(format!("logging channel: {e}"))
}

impl Throttled {
    /// Throttle `inner` (which records into `tx`, its outputs held in
    /// `gate`) within `bounds`.
    pub fn new(
        inner: Recorder<Arc<PrimarySender>>,
        tx: Arc<PrimarySender>,
        gate: OutputGate<Output>,
        bounds: ThrottleBounds,
    ) -> Self {
        Throttled {
            inner,
            tx,
            gate,
            lag: LagClock::default(),
            bounds,
            gave_up: None,
        }
    }

    /// Why the throttle declared the backup dead, if it did.
    pub fn gave_up(&self) -> Option<&str> {
        self.gave_up.as_deref()
    }

    /// The recorder inside.
    pub fn into_recorder(self) -> Recorder<Arc<PrimarySender>> {
        self.inner
    }

    /// Stall while the backup lags or the gate is full; give up on a
    /// backup that stays behind past the bound.
    fn hold_back(&mut self) -> vmm::Result<()> {
        self.lag.note(self.tx.next_seq());
        let mut since: Option<Instant> = None;
        loop {
            if let Some(e) = self.tx.error() {
                return Err(channel(e));
            }
            let acks = self.tx.acks();
            let entries = self.tx.lag();
            let behind = self.lag.lag(acks.executed);
            let lagging = entries > self.tx.lag_bound() || behind > self.bounds.lag;
            let full = self.gate.is_full();
            if !lagging && !full {
                return Ok(());
            }
            let stalled = since.get_or_insert_with(Instant::now).elapsed();
            if lagging && stalled > self.bounds.give_up {
                let why = format!(
                    "the backup's replay stayed behind the lag bound for {stalled:?} \
                     ({entries} entries, {behind:?} not executed): declaring the backup dead"
                );
                self.gave_up = Some(why.clone());
                return Err(vmm::Error::Observer(why));
            }
            if lagging {
                self.tx.wait_acks_change(acks, POLL).map_err(channel)?;
            } else {
                // Full gate: the outputs wait for acks the channel's own
                // liveness check bounds.
                self.gate.wait_room(POLL);
            }
        }
    }
}

impl vmm::Observer for Throttled {
    fn at_point(&mut self, m: &mut Machine) -> vmm::Result<vmm::Flow> {
        self.hold_back()?;
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
    use ftlog::{
        BackupExpect, BackupListener, BackupReceiver, ChannelConfig, EntryKind, ExecPoint,
    };

    /// A primary and a backup on loopback; `lag_bound` entries.
    fn channel(lag_bound: u64) -> (Arc<PrimarySender>, BackupReceiver) {
        let mut cfg = ChannelConfig::new(b"throttle test key".to_vec());
        cfg.lag_bound = lag_bound;
        cfg.peer_timeout = Duration::from_secs(3);
        let header = ftlog::LogHeader {
            backend: ftlog::ExecBackend::Exits,
            image_digest: [7; 32],
            mem_mib: 32,
            cmdline: String::new(),
            state_digest: ftlog::DigestKind::Blake3RegsRam,
            digest_interval_ms: None,
            net_mac: None,
            cpuid: Vec::new(),
            initrd_digest: None,
        };
        let expect = BackupExpect {
            backend: header.backend,
            image_digest: header.image_digest,
        };
        let l = BackupListener::bind("127.0.0.1:0", &cfg, expect).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let b = std::thread::spawn(move || l.accept_timeout(Duration::from_secs(5)));
        let tx = PrimarySender::connect(&addr, &cfg, &header).unwrap();
        (Arc::new(tx), b.join().unwrap().unwrap())
    }

    fn assert_waited(since: Instant, at_least: Duration) {
        let took = since.elapsed();
        assert!(took >= at_least, "returned after {took:?}");
    }

    fn push(tx: &PrimarySender, n: u64) {
        for i in 0..n {
            let point = ExecPoint {
                count: i,
                rip: 0,
                rcx: 0,
            };
            tx.push(point, EntryKind::IrqRaise { irq: 0 }).unwrap();
        }
        assert!(tx.wait_received(n - 1, Duration::from_secs(3)).unwrap());
    }

    fn throttled(
        tx: &Arc<PrimarySender>,
        gate: OutputGate<Output>,
        give_up: Duration,
    ) -> Throttled {
        let bounds = ThrottleBounds {
            lag: Duration::from_millis(100),
            give_up,
        };
        Throttled::new(Recorder::new(tx.clone(), None), tx.clone(), gate, bounds)
    }

    #[test]
    fn finding_6_a_backup_that_acks_but_never_executes_is_declared_dead_within_the_bound() {
        let (tx, _rx) = channel(10);
        push(&tx, 20);
        let mut t = throttled(&tx, OutputGate::new(), Duration::from_millis(400));
        let t0 = Instant::now();
        let e = t.hold_back().unwrap_err();
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert!(e.to_string().contains("declaring the backup dead"), "{e}");
        assert!(t.gave_up().is_some());
        assert!(
            tx.error().is_none(),
            "the channel stays up: the primary asks the arbiter before cutting it"
        );
    }

    #[test]
    fn a_backup_that_catches_up_ends_the_stall() {
        let (tx, rx) = channel(10);
        push(&tx, 20);
        let mut t = throttled(&tx, OutputGate::new(), Duration::from_secs(2));
        let catch_up = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            for _ in 0..20 {
                rx.next().unwrap();
            }
            rx.report_executed(19).unwrap();
            rx
        });
        let t0 = Instant::now();
        t.hold_back().unwrap();
        assert_waited(t0, Duration::from_millis(100));
        assert!(t.gave_up().is_none());
        drop(catch_up.join().unwrap());
    }

    #[test]
    fn finding_6_a_dead_heartbeat_is_noticed_while_throttled() {
        let (tx, _rx) = channel(10);
        push(&tx, 20);
        let mut t = throttled(&tx, OutputGate::new(), Duration::from_secs(10));
        let watch = {
            let tx = tx.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                tx.abort("the backup's heartbeats stopped");
            })
        };
        let t0 = Instant::now();
        let e = t.hold_back().unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(e.to_string().contains("heartbeats stopped"), "{e}");
        watch.join().unwrap();
    }

    #[test]
    fn finding_11_a_full_gate_stalls_the_guest_until_it_drains() {
        let (tx, rx) = channel(1000);
        push(&tx, 1);
        rx.next().unwrap();
        rx.report_executed(0).unwrap();
        let gate = OutputGate::with_limit(4);
        for b in 0..6u8 {
            let out = Output {
                stream: vmm::output::Stream::Console,
                position: u64::from(b),
                bytes: vec![b],
            };
            gate.hold(Some(0), out);
        }
        let mut t = throttled(&tx, gate.clone(), Duration::from_secs(10));
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            gate.ack(0);
            gate.take_released().len()
        });
        let t0 = Instant::now();
        t.hold_back().unwrap();
        assert_waited(t0, Duration::from_millis(100));
        assert_eq!(releaser.join().unwrap(), 6, "nothing was lost");
    }

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
