//! The output gate: the output rule of VMware FT.
//!
//! Nothing the guest sends to the outside world (serial bytes, network
//! frames) may leave the primary before the backup has acknowledged every
//! log entry up to the one that was last at the moment the output was
//! produced: otherwise a failover could show the world an output the new
//! primary never produces. The guest is never stalled by this; outputs are
//! tagged when produced and held here until the acknowledgement arrives.
//!
//! The gate is bounded without ever losing an output: `hold` always takes
//! the output, and [`OutputGate::is_full`] tells the caller (the primary's
//! vCPU thread, at its next execution point) to stall the guest until the
//! held outputs drain to half the limit ([`OutputGate::wait_room`]). That
//! is the only time the output rule stalls the guest.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A tag: the log sequence number an output waits for (None: it depends on
/// no logged input and may go at once).
pub type Tag = Option<u64>;

/// Default most outputs held before the guest is stalled: console bytes
/// come one per output, so this is 16 KiB of console or 16 Ki frames
/// waiting for one acknowledgement.
pub const DEFAULT_LIMIT: usize = 16 * 1024;

#[derive(Debug)]
struct State<T> {
    held: VecDeque<(Tag, Instant, T)>,
    acked: Option<u64>,
    open: bool,
    released: u64,
    max_held: usize,
    limit: usize,
}

impl<T> State<T> {
    /// Whether the oldest held output may go.
    fn front_releasable(&self) -> bool {
        self.held.front().is_some_and(|(tag, _, _)| {
            self.open
                || match (tag, self.acked) {
                    (None, _) => true,
                    (Some(t), Some(a)) => *t <= a,
                    (Some(_), None) => false,
                }
        })
    }

    fn release(&mut self) -> Vec<Released<T>> {
        let mut out = Vec::new();
        while self.front_releasable() {
            if let Some((tag, at, item)) = self.held.pop_front() {
                out.push(Released {
                    item,
                    tag,
                    held_for: at.elapsed(),
                });
            }
        }
        self.released += out.len() as u64;
        out
    }
}

/// Outputs held until their tag is acknowledged. Clone to share between the
/// vCPU thread (which holds outputs) and the thread that releases them.
#[derive(Debug)]
pub struct OutputGate<T> {
    inner: Arc<(Mutex<State<T>>, Condvar)>,
}

impl<T> Clone for OutputGate<T> {
    fn clone(&self) -> Self {
        OutputGate {
            inner: self.inner.clone(),
        }
    }
}

/// An output that was released, with how long it was held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released<T> {
    /// The output.
    pub item: T,
    /// The tag it was held with.
    pub tag: Tag,
    /// Time between holding and release.
    pub held_for: Duration,
}

impl<T> Default for OutputGate<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> OutputGate<T> {
    /// A gate that holds outputs until acknowledged, stalling the guest
    /// beyond [`DEFAULT_LIMIT`] held outputs.
    pub fn new() -> Self {
        Self::with_limit(DEFAULT_LIMIT)
    }

    /// A gate that counts as full with `limit` outputs held (at least 2).
    pub fn with_limit(limit: usize) -> Self {
        OutputGate {
            inner: Arc::new((
                Mutex::new(State {
                    held: VecDeque::new(),
                    acked: None,
                    open: false,
                    released: 0,
                    max_held: 0,
                    limit: limit.max(2),
                }),
                Condvar::new(),
            )),
        }
    }

    /// Run `f` on the state; wake a waiting releaser only if there is now
    /// something for it (a wake-up per ack or per held output would cost
    /// the host a context switch each, for nothing).
    fn with<R>(&self, f: impl FnOnce(&mut State<T>) -> R) -> R {
        let (m, cv) = &*self.inner;
        let mut s = match m.lock() {
            Ok(g) => g,
            // A panicking holder cannot leave the queue half-updated: every
            // update below is a single push, pop or assignment.
            Err(p) => p.into_inner(),
        };
        let before = s.held.len();
        let r = f(&mut s);
        // Wake the releaser, or a vCPU waiting for room.
        if s.front_releasable() || s.held.len() < before {
            cv.notify_all();
        }
        r
    }

    /// Hold `item`, produced when `tag` was the last log entry.
    pub fn hold(&self, tag: Tag, item: T) {
        self.with(|s| {
            s.held.push_back((tag, Instant::now(), item));
            s.max_held = s.max_held.max(s.held.len());
        });
    }

    /// The backup has acknowledged every entry up to `seq`.
    pub fn ack(&self, seq: u64) {
        self.with(|s| s.acked = Some(s.acked.map_or(seq, |a| a.max(seq))));
    }

    /// Release everything from now on without waiting, acknowledged or
    /// not. Only a side that runs alone may do this: one that won the
    /// arbiter, or a VM that never had a backup. (ftvmm calls it only
    /// through a proof of winning the arbiter.)
    pub fn open(&self) {
        self.with(|s| s.open = true);
    }

    /// Outputs whose tag is acknowledged, in the order they were held.
    /// Outputs never overtake each other: a later one with an older tag
    /// still waits behind an earlier held one.
    pub fn take_released(&self) -> Vec<Released<T>> {
        self.with(State::release)
    }

    /// Wait up to `timeout` for something to become releasable (an ack, a
    /// hold, an open), then take it. The check and the wait are one step
    /// under the lock, so a wake-up between them is not lost.
    pub fn wait_released(&self, timeout: Duration) -> Vec<Released<T>> {
        let out = self.wait_for(timeout, |s| {
            let out = s.release();
            (!out.is_empty()).then_some(out)
        });
        match out {
            Some(out) => {
                self.inner.1.notify_all(); // room for a stalled vCPU
                out
            }
            None => Vec::new(),
        }
    }

    /// Wait up to `timeout` until `ready` gives something, checking it
    /// under the lock at every wake-up.
    fn wait_for<R>(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&mut State<T>) -> Option<R>,
    ) -> Option<R> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.inner;
        let mut s = match m.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        loop {
            if let Some(r) = ready(&mut s) {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            s = match cv.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Outputs held right now.
    pub fn held(&self) -> usize {
        self.with(|s| s.held.len())
    }

    /// Whether the limit is reached: the guest should be stalled at its
    /// next point until [`wait_room`](OutputGate::wait_room) says it
    /// drained. `hold` still takes every output meanwhile.
    pub fn is_full(&self) -> bool {
        self.with(|s| s.held.len() >= s.limit)
    }

    /// Wait up to `timeout` until at most half the limit is held; returns
    /// whether it is.
    pub fn wait_room(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |s| (s.held.len() <= s.limit / 2).then_some(()))
            .is_some()
    }

    /// Drop everything held (a backup discards its own outputs; a primary
    /// that lost the arbiter must not release what the backup never saw).
    pub fn discard(&self) -> usize {
        self.with(|s| {
            let n = s.held.len();
            s.held.clear();
            n
        })
    }

    /// (released so far, most ever held at once).
    pub fn counters(&self) -> (u64, usize) {
        self.with(|s| (s.released, s.max_held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(r: Vec<Released<&'static str>>) -> Vec<&'static str> {
        r.into_iter().map(|r| r.item).collect()
    }

    #[test]
    fn untagged_output_goes_at_once_tagged_waits_for_its_ack() {
        let g = OutputGate::new();
        g.hold(None, "boot banner");
        g.hold(Some(3), "after entry 3");
        assert_eq!(items(g.take_released()), ["boot banner"]);
        g.ack(2);
        assert!(g.take_released().is_empty());
        g.ack(3);
        assert_eq!(items(g.take_released()), ["after entry 3"]);
        assert_eq!(g.held(), 0);
    }

    #[test]
    fn outputs_never_overtake_each_other() {
        let g = OutputGate::new();
        g.hold(Some(5), "a");
        g.hold(None, "b");
        g.hold(Some(4), "c");
        g.ack(4);
        assert!(
            g.take_released().is_empty(),
            "a still waits, so b and c wait"
        );
        g.ack(5);
        assert_eq!(items(g.take_released()), ["a", "b", "c"]);
    }

    #[test]
    fn acks_only_move_forward_and_open_releases_everything() {
        let g = OutputGate::new();
        g.ack(9);
        g.ack(3);
        g.hold(Some(9), "x");
        assert_eq!(items(g.take_released()), ["x"]);
        g.hold(Some(100), "y");
        g.open();
        assert_eq!(items(g.take_released()), ["y"]);
    }

    #[test]
    fn finding_11_a_full_gate_loses_nothing_and_reports_room_once_half_drained() {
        let g = OutputGate::with_limit(4);
        for i in 0..6u64 {
            g.hold(Some(i), i);
        }
        assert_eq!(g.held(), 6, "hold never drops an output");
        assert!(g.is_full());
        assert!(!g.wait_room(Duration::from_millis(20)));
        let g2 = g.clone();
        let waiter = std::thread::spawn(move || g2.wait_room(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(20));
        g.ack(3);
        let released = g.take_released();
        assert_eq!(
            released.iter().map(|r| (r.item, r.tag)).collect::<Vec<_>>(),
            [(0, Some(0)), (1, Some(1)), (2, Some(2)), (3, Some(3))]
        );
        assert!(waiter.join().unwrap(), "woken by the release");
        assert!(!g.is_full());
    }

    #[test]
    fn discard_drops_what_the_backup_never_acknowledged() {
        let g = OutputGate::new();
        g.hold(Some(1), "x");
        g.hold(Some(2), "y");
        assert_eq!(g.discard(), 2);
        g.ack(5);
        assert!(g.take_released().is_empty());
    }

    #[test]
    fn a_waiting_releaser_wakes_on_ack() {
        let g = OutputGate::new();
        g.hold(Some(7), "late");
        let g2 = g.clone();
        let t = std::thread::spawn(move || g2.wait_released(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(20));
        g.ack(7);
        let got = t.join().unwrap();
        assert_eq!(items(got), ["late"]);
    }

    #[test]
    fn an_output_whose_tag_is_already_acked_wakes_a_waiting_releaser() {
        let g = OutputGate::new();
        g.ack(9);
        let g2 = g.clone();
        let start = Instant::now();
        let t = std::thread::spawn(move || g2.wait_released(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(20));
        g.hold(Some(9), "reply");
        assert_eq!(items(t.join().unwrap()), ["reply"]);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "woken by the hold, not the timeout"
        );
    }
}
