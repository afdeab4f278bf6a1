//! Kernel state and the three things that touch it: the timer ISR, the UART
//! ISR and the sleep syscall.
//!
//! All handlers run with interrupts off (interrupt gates) except inside the
//! syscall's `sti; hlt`, where an ISR can nest; state lives in atomics so no
//! `static mut` is needed (a single CPU: relaxed loads/stores suffice).

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};

use crate::cmdline::Config;
use crate::idt::Frame;
use crate::{ftclock, pic, pit, power, serial, workload};

/// Timer ticks so far. The user loop reads it every iteration.
static TICKS: AtomicU64 = AtomicU64::new(0);
/// The user loop ends its slice early once TICKS reaches this (the next
/// digest or stop tick), so lines come out at the tick they name.
static BREAK_AT: AtomicU64 = AtomicU64::new(u64::MAX);
/// Digest of everything the ISRs saw: where each tick landed, received
/// bytes, clock/entropy/PIT reads.
static STATE: AtomicU64 = AtomicU64::new(0);

/// `ticks=`: power off at this tick (0 = never).
static STOP_AT: AtomicU64 = AtomicU64::new(0);
/// `digest_every=` (0 = never), and the tick the next digest line is for.
static DIGEST_EVERY: AtomicU64 = AtomicU64::new(0);
static NEXT_DIGEST: AtomicU64 = AtomicU64::new(u64::MAX);

/// `net=1`: the sleep syscall also wakes on the network IRQ.
static NET_MODE: AtomicBool = AtomicBool::new(false);
/// Set by the IRQ5 (virtio-net) ISR, cleared by the sleep syscall, which
/// reports it to the CPL3 server loop.
static NET_PENDING: AtomicBool = AtomicBool::new(false);

/// Received bytes waiting to be echoed by the syscall path.
const RX_LEN: usize = 64;
static RX: [AtomicU8; RX_LEN] = [const { AtomicU8::new(0) }; RX_LEN];
static RX_HEAD: AtomicUsize = AtomicUsize::new(0);
static RX_TAIL: AtomicUsize = AtomicUsize::new(0);

/// The digest's mixing step (the workload's loop, in assembly, uses the
/// same multiply and shift).
pub fn mix(h: u64, x: u64) -> u64 {
    let v = (h ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    v ^ (v >> 29)
}

pub fn mix_state(x: u64) {
    STATE.store(mix(STATE.load(Relaxed), x), Relaxed);
}

/// The state digest so far.
pub fn state() -> u64 {
    STATE.load(Relaxed)
}

/// Timer ticks so far.
pub fn ticks() -> u64 {
    TICKS.load(Relaxed)
}

/// `mode=irqclock`: the timer ISR samples ftclock (already selected to the
/// clock) before anything else, and keeps the sample here.
static CLOCK_IN_ISR: AtomicBool = AtomicBool::new(false);
static ISR_CLOCK: AtomicU64 = AtomicU64::new(0);

/// Makes the timer ISR read the clock first (see `CLOCK_IN_ISR`).
pub fn set_clock_in_isr() {
    CLOCK_IN_ISR.store(true, Relaxed);
}

/// The clock sample the latest timer ISR took (`mode=irqclock`).
pub fn isr_clock() -> u64 {
    ISR_CLOCK.load(Relaxed)
}

/// Where the workload finds TICKS and BREAK_AT.
pub fn ticks_ptr() -> *const u64 {
    TICKS.as_ptr()
}

pub fn break_at_ptr() -> *const u64 {
    BREAK_AT.as_ptr()
}

/// Takes the configuration and the boot-time clock and entropy samples.
pub fn start(cfg: &Config, clock: u64, seed: u64) {
    mix_state(clock);
    mix_state(seed);
    STOP_AT.store(cfg.ticks, Relaxed);
    DIGEST_EVERY.store(cfg.digest_every, Relaxed);
    if cfg.digest_every != 0 {
        NEXT_DIGEST.store(cfg.digest_every, Relaxed);
    }
    update_break_at();
}

fn update_break_at() {
    let stop = match STOP_AT.load(Relaxed) {
        0 => u64::MAX,
        n => n,
    };
    BREAK_AT.store(stop.min(NEXT_DIGEST.load(Relaxed)), Relaxed);
}

/// IRQ0: count the tick and fold in exactly where it landed.
pub fn timer_irq(frame: &Frame) {
    if CLOCK_IN_ISR.load(Relaxed) {
        let c = ftclock::read_selected();
        ISR_CLOCK.store(c, Relaxed);
        mix_state(c);
    }
    let t = TICKS.load(Relaxed) + 1;
    TICKS.store(t, Relaxed);
    mix_state(frame.rip);
    mix_state(frame.rcx); // the workload's loop counter
    mix_state(t);
    pic::eoi(0);
}

/// Switches the sleep syscall to net mode (before entering CPL3).
pub fn set_net_mode() {
    NET_MODE.store(true, Relaxed);
}

/// IRQ5 (virtio-net): note it for the sleep syscall and fold in where it
/// landed. Deliberately tiny (CPL0 is emulated): the device's
/// InterruptStatus is read and acknowledged at CPL3 after the wake.
pub fn net_irq(frame: &Frame) {
    NET_PENDING.store(true, Relaxed);
    mix_state(0x500);
    mix_state(frame.rip);
    pic::eoi(5);
}

/// The control syscall (net mode, see `workload::sys_ctl`).
pub fn ctl_syscall(frame: &Frame) {
    match frame.rax {
        workload::CTL_WRITE => {
            // SAFETY: the CPL3 server passes a live slice; all memory is
            // identity-mapped.
            let s =
                unsafe { core::slice::from_raw_parts(frame.rdi as *const u8, frame.rsi as usize) };
            serial::put_bytes(s);
        }
        workload::CTL_POWEROFF => power::off(frame.rdi as u8),
        _ => {}
    }
}

/// IRQ4: take every received byte; the syscall path echoes them.
pub fn uart_irq() {
    drain_uart();
    pic::eoi(4);
}

/// Moves received bytes from the UART into the RX queue (also used at boot,
/// for bytes that arrived before the interrupt was enabled).
pub fn drain_uart() {
    while let Some(b) = serial::try_read() {
        mix_state(0x100 | u64::from(b));
        let head = RX_HEAD.load(Relaxed);
        if head.wrapping_sub(RX_TAIL.load(Relaxed)) < RX_LEN {
            RX[head % RX_LEN].store(b, Relaxed);
            RX_HEAD.store(head.wrapping_add(1), Relaxed);
        } else {
            mix_state(0x200); // dropped: still visible in the digest
        }
    }
}

/// Prints `rx <hex>` for each queued byte.
fn echo_rx() {
    let mut tail = RX_TAIL.load(Relaxed);
    while tail != RX_HEAD.load(Relaxed) {
        serial::puts("rx ");
        serial::put_hex8(RX[tail % RX_LEN].load(Relaxed));
        serial::puts("\n");
        tail = tail.wrapping_add(1);
        RX_TAIL.store(tail, Relaxed);
    }
}

/// Folds a PIT counter read into the state, then the state with `h`.
pub fn digest(h: u64) -> u64 {
    mix_state(u64::from(pit::read_counter()));
    mix(STATE.load(Relaxed), h)
}

/// Workload steps completed (RDX of each sleep syscall), for benchmarks.
static STEPS: AtomicU64 = AtomicU64::new(0);

/// The sleep syscall, RAX = the workload's hash, RDX = steps done: print what is due, stop if the
/// tick budget is spent, else sleep until the next timer tick (net mode: or
/// the next network interrupt; RAX returns 1 if one is pending, else 0).
pub fn sleep_syscall(frame: &mut Frame) {
    let h = frame.rax;
    STEPS.fetch_add(frame.rdx, Relaxed);
    echo_rx();
    let now = TICKS.load(Relaxed);
    let every = DIGEST_EVERY.load(Relaxed);
    let mut next = NEXT_DIGEST.load(Relaxed);
    while every != 0 && now >= next {
        serial::puts("tick ");
        serial::put_dec(next);
        serial::puts(" digest ");
        serial::put_hex64(digest(h));
        serial::puts("\n");
        next = next.saturating_add(every);
    }
    NEXT_DIGEST.store(next, Relaxed);
    let stop = STOP_AT.load(Relaxed);
    if stop != 0 && now >= stop {
        serial::puts("work steps ");
        serial::put_dec(STEPS.load(Relaxed));
        serial::puts("\n");
        serial::puts("done ticks ");
        serial::put_dec(stop);
        serial::puts(" digest ");
        serial::put_hex64(digest(h));
        serial::puts("\n");
        power::off(0);
    }
    update_break_at();
    if NET_MODE.load(Relaxed) {
        // Wake on the next tick or network interrupt, whichever comes first;
        // one that arrived since the server last looked returns at once.
        // Checked with IF clear, and `sti; hlt` leaves no window between.
        while TICKS.load(Relaxed) == now && !NET_PENDING.load(Relaxed) {
            // SAFETY: as below.
            unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
        }
        let net = NET_PENDING.load(Relaxed);
        NET_PENDING.store(false, Relaxed);
        frame.rax = u64::from(net);
        return;
    }
    // Nothing can change TICKS before the `hlt`: IF is clear, and `sti`
    // only takes effect after the next instruction.
    while TICKS.load(Relaxed) == now {
        // SAFETY: waits for an interrupt with IF set, then clears it again;
        // the ISRs that run in between preserve all state they interrupt.
        unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
    }
}
