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
}

#[derive(Debug, Default)]
struct Queue {
    serial: VecDeque<u8>,
    stop: bool,
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

    /// Queue bytes for COM1 and wake the vCPU.
    pub fn push_serial(&self, bytes: &[u8]) {
        let k = self.with(|q| {
            q.serial.extend(bytes);
            q.kicker
        });
        if let Some(Some(k)) = k {
            k.kick();
        }
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

    /// Block until serial input is queued, a stop is requested, or `deadline`.
    pub fn wait(&self, deadline: Option<Instant>) -> Wake {
        let (m, cv) = &*self.inner;
        let Ok(mut q) = m.lock() else {
            return Wake::Stop;
        };
        loop {
            if q.stop {
                return Wake::Stop;
            }
            if !q.serial.is_empty() {
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
    fn wait_returns_on_deadline_input_and_stop() {
        let h = HostInputs::new();
        let t = Instant::now();
        assert_eq!(h.wait(Some(t + Duration::from_millis(20))), Wake::Ready);
        assert!(t.elapsed() >= Duration::from_millis(20));
        let h2 = h.clone();
        let th = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            h2.push_serial(b"x");
        });
        assert_eq!(h.wait(None), Wake::Ready);
        th.join().unwrap();
        h.request_stop();
        assert_eq!(h.wait(None), Wake::Stop);
    }
}
