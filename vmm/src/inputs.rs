//! Inputs from the outside world, and the queue host threads fill.
//!
//! Host threads never touch a device: they queue bytes and kick the vCPU.
//! The vCPU thread applies an [`Input`] only when it is stopped at an
//! execution point the fault-tolerance layer accepts, so the same input can
//! be applied at the same point on the backup.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::kick::Kicker;

/// One asynchronous input to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Pulse an ISA interrupt line (a timer tick).
    Irq(u8),
    /// Bytes arriving at COM1.
    Serial(Vec<u8>),
    /// A network frame for the network device.
    Frame(Vec<u8>),
}

/// Received frames a host thread may queue before new ones are dropped (as
/// a NIC drops when its ring is full; TCP recovers).
pub const FRAME_QUEUE_MAX: usize = 512;

/// Serial bytes a host thread may queue before new ones are dropped (as a
/// UART overruns when nobody reads it).
pub const SERIAL_QUEUE_MAX: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Queue {
    serial: VecDeque<u8>,
    serial_dropped: u64,
    frames: VecDeque<Vec<u8>>,
    frames_dropped: u64,
    stop: bool,
    /// A host thread has news for the vCPU thread's observer: the idle
    /// wait returns once.
    woken: bool,
    kicker: Option<Kicker>,
}

/// Serial input and stop requests from host threads. Clone to share.
#[derive(Debug, Clone, Default)]
pub struct HostInputs {
    inner: Arc<(Mutex<Queue>, Condvar)>,
}

/// Why the idle wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Input may be ready, or the deadline passed.
    Ready,
    /// A stop was requested.
    Stop,
}

impl HostInputs {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Queue) -> R) -> Option<R> {
        let (m, cv) = &*self.inner;
        let mut q = m.lock().ok()?;
        let r = f(&mut q);
        cv.notify_all();
        Some(r)
    }

    /// Queue bytes for COM1 and wake the vCPU. Bytes beyond
    /// [`SERIAL_QUEUE_MAX`] queued are dropped and counted (an overrun);
    /// returns how many were queued.
    pub fn push_serial(&self, bytes: &[u8]) -> usize {
        let r = self.with(|q| {
            let n = bytes
                .len()
                .min(SERIAL_QUEUE_MAX.saturating_sub(q.serial.len()));
            q.serial.extend(&bytes[..n]);
            q.serial_dropped += (bytes.len() - n) as u64;
            (n, q.kicker)
        });
        let Some((n, kicker)) = r else {
            return 0;
        };
        if let Some(k) = kicker {
            k.kick();
        }
        n
    }

    /// Serial bytes dropped because the queue was full.
    pub fn serial_dropped(&self) -> u64 {
        self.with(|q| q.serial_dropped).unwrap_or(0)
    }

    /// Queue a received frame and wake the vCPU. Returns false if the queue
    /// was full and the frame was dropped.
    pub fn push_frame(&self, frame: Vec<u8>) -> bool {
        let r = self.with(|q| {
            if q.frames.len() >= FRAME_QUEUE_MAX {
                q.frames_dropped += 1;
                return (false, None);
            }
            q.frames.push_back(frame);
            (true, q.kicker)
        });
        let Some((queued, kicker)) = r else {
            return false;
        };
        if let Some(k) = kicker {
            k.kick();
        }
        queued
    }

    /// Take the oldest queued frame.
    pub fn take_frame(&self) -> Option<Vec<u8>> {
        self.with(|q| q.frames.pop_front()).flatten()
    }

    /// Frames dropped because the queue was full.
    pub fn frames_dropped(&self) -> u64 {
        self.with(|q| q.frames_dropped).unwrap_or(0)
    }

    /// Ask the VM to stop at its next execution point.
    pub fn request_stop(&self) {
        if let Some(Some(k)) = self.with(|q| {
            q.stop = true;
            q.kicker
        }) {
            k.kick();
        }
    }

    /// Whether a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.with(|q| q.stop).unwrap_or(true)
    }

    pub(crate) fn set_kicker(&self, k: Option<Kicker>) {
        self.with(|q| q.kicker = k);
    }

    /// Take up to `max` queued serial bytes.
    pub fn take_serial(&self, max: usize) -> Vec<u8> {
        self.with(|q| {
            let n = max.min(q.serial.len());
            q.serial.drain(..n).collect()
        })
        .unwrap_or_default()
    }

    /// End an idle guest's wait once, without an input: a host thread has
    /// news for the observer (a backup connected to join), which sees it
    /// at the point the wait returns to. A running guest is not disturbed.
    pub fn wake(&self) {
        self.with(|q| q.woken = true);
    }

    /// Block until serial input (or, with `frames`, a frame) is queued, a
    /// stop is requested, [`wake`](HostInputs::wake), or `deadline`.
    pub fn wait(&self, deadline: Option<Instant>, frames: bool) -> Wake {
        let (m, cv) = &*self.inner;
        let Ok(mut q) = m.lock() else {
            return Wake::Stop;
        };
        loop {
            if q.stop {
                return Wake::Stop;
            }
            if !q.serial.is_empty() || (frames && !q.frames.is_empty()) {
                return Wake::Ready;
            }
            if q.woken {
                q.woken = false;
                return Wake::Ready;
            }
            let now = Instant::now();
            match deadline {
                Some(d) if now >= d => return Wake::Ready,
                Some(d) => match cv.wait_timeout(q, d - now) {
                    Ok((g, _)) => q = g,
                    Err(_) => return Wake::Stop,
                },
                None => match cv.wait(q) {
                    Ok(g) => q = g,
                    Err(_) => return Wake::Stop,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn serial_bytes_are_taken_in_order_and_bounded() {
        let h = HostInputs::new();
        h.push_serial(b"hello");
        assert_eq!(h.take_serial(2), b"he");
        assert_eq!(h.take_serial(10), b"llo");
        assert!(h.take_serial(10).is_empty());
    }

    #[test]
    fn a_full_serial_queue_drops_and_counts_like_an_overrun() {
        let h = HostInputs::new();
        assert_eq!(
            h.push_serial(&vec![b'a'; SERIAL_QUEUE_MAX - 1]),
            SERIAL_QUEUE_MAX - 1
        );
        assert_eq!(h.push_serial(b"xyz"), 1);
        assert_eq!(h.serial_dropped(), 2);
        assert_eq!(h.take_serial(SERIAL_QUEUE_MAX).len(), SERIAL_QUEUE_MAX);
        assert_eq!(h.push_serial(b"q"), 1, "room again once the guest read");
    }

    #[test]
    fn wait_returns_on_deadline_input_and_stop() {
        let h = HostInputs::new();
        let t = Instant::now();
        assert_eq!(
            h.wait(Some(t + Duration::from_millis(20)), true),
            Wake::Ready
        );
        assert!(t.elapsed() >= Duration::from_millis(20));
        let h2 = h.clone();
        let th = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            h2.push_serial(b"x");
        });
        assert_eq!(h.wait(None, true), Wake::Ready);
        th.join().unwrap();
        h.request_stop();
        assert_eq!(h.wait(None, true), Wake::Stop);
    }

    #[test]
    fn frames_wake_the_wait_come_out_in_order_and_overflow_is_counted() {
        let h = HostInputs::new();
        let h2 = h.clone();
        let th = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            h2.push_frame(vec![1]);
        });
        assert_eq!(h.wait(None, true), Wake::Ready);
        th.join().unwrap();
        for i in 2..=FRAME_QUEUE_MAX {
            assert!(h.push_frame(vec![i as u8]));
        }
        assert!(!h.push_frame(vec![0]), "the queue is full");
        assert_eq!(h.frames_dropped(), 1);
        assert_eq!(h.take_frame(), Some(vec![1]));
        assert_eq!(h.take_frame(), Some(vec![2]));
        // A guest with no receive buffer is not woken by queued frames.
        let t = Instant::now();
        assert_eq!(
            h.wait(Some(t + Duration::from_millis(20)), false),
            Wake::Ready
        );
        assert!(t.elapsed() >= Duration::from_millis(20));
    }
}
