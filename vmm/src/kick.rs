//! Getting the vCPU out of `KVM_RUN` from another thread.
//!
//! A real-time signal interrupts the ioctl. If it lands just before the vCPU
//! enters the guest, the handler sets `immediate_exit` in that vCPU's
//! `kvm_run`, so the next `KVM_RUN` returns at once instead of losing the kick.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::{Error, Result};

thread_local! {
    // The vCPU thread's `kvm_run.immediate_exit` byte, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer is the calling thread's own mapped kvm_run,
            // set by `arm_current_thread` and valid until `disarm`.
            unsafe { std::ptr::write_volatile(p, 1) };
        }
    });
}

/// Install the kick handler (once per process).
pub fn install_handler() -> Result<()> {
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    register_signal_handler(kick_signal(), on_kick).map_err(|e| Error::Host {
        what: "installing the vCPU kick signal handler",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })
}

/// Point the handler of the calling thread at its `kvm_run.immediate_exit`.
pub fn arm_current_thread(immediate_exit: *mut u8) {
    IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
}

/// Stop the handler of the calling thread from touching `kvm_run`.
pub fn disarm_current_thread() {
    IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
}

/// A handle that kicks one vCPU thread; cheap to clone and send.
#[derive(Debug, Clone, Copy)]
pub struct Kicker {
    thread: libc::pthread_t,
}

impl Kicker {
    /// A kicker for the calling thread.
    pub fn current() -> Self {
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        Kicker { thread }
    }

    /// Interrupt the vCPU.
    pub fn kick(&self) {
        // SAFETY: the thread id came from pthread_self of a live vCPU thread;
        // the owner stops using kickers before that thread exits.
        let rc = unsafe { libc::pthread_kill(self.thread, kick_signal()) };
        if rc != 0 {
            tracing::debug!("kick failed: errno {rc}");
        }
    }
}

#[derive(Debug, Default)]
struct TimerSlot {
    deadline: Option<Instant>,
    kicker: Option<Kicker>,
    quit: bool,
}

/// A thread that kicks the vCPU when the next device timer is due, so a
/// guest that never exits still sees its timer interrupts.
#[derive(Debug)]
pub struct Ticker {
    slot: Arc<(Mutex<TimerSlot>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    /// Start the thread.
    pub fn start() -> Result<Self> {
        let slot: Arc<(Mutex<TimerSlot>, Condvar)> = Arc::default();
        let s = slot.clone();
        let thread = std::thread::Builder::new()
            .name("ftvmm-ticker".into())
            .spawn(move || ticker_loop(&s))
            .map_err(|source| Error::Host {
                what: "starting the timer thread",
                source,
            })?;
        Ok(Ticker {
            slot,
            thread: Some(thread),
        })
    }

    /// Kick `kicker` at `deadline` (replacing any earlier request); None disarms.
    pub fn arm(&self, deadline: Option<Instant>, kicker: Kicker) {
        let (m, cv) = &*self.slot;
        if let Ok(mut s) = m.lock() {
            if s.deadline != deadline {
                s.deadline = deadline;
                s.kicker = Some(kicker);
                cv.notify_one();
            }
        }
    }
}

fn ticker_loop(slot: &(Mutex<TimerSlot>, Condvar)) {
    let (m, cv) = slot;
    let Ok(mut s) = m.lock() else { return };
    loop {
        if s.quit {
            return;
        }
        match s.deadline {
            None => match cv.wait(s) {
                Ok(g) => s = g,
                Err(_) => return,
            },
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    s.deadline = None;
                    if let Some(k) = s.kicker {
                        k.kick();
                    }
                } else {
                    match cv.wait_timeout(s, d - now) {
                        Ok((g, _)) => s = g,
                        Err(_) => return,
                    }
                }
            }
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let (m, cv) = &*self.slot;
        if let Ok(mut s) = m.lock() {
            s.quit = true;
            cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
