//! Test modes (`mode=NAME`): small programs that provoke what the hash
//! workload never does, for the failure-injection tests (docs/failover.md).
//! They all run at CPL0 and do port I/O directly.
//!
//! - `irqprint`: prints the last digit of the tick count in a loop with
//!   interrupts enabled ("…8889999000…"), so output bytes depend on the
//!   exact instruction each tick landed at.
//! - `irqclock`: the timer ISR reads ftclock as its first device access; the
//!   main loop sleeps in `sti; hlt` and prints the clock the ISR saw.
//! - `clockloop`: reads the clock and entropy through ftclock (low, then high
//!   half) and the PIT counter (latch, then two byte reads), with interrupts
//!   off, and prints each combined value.
//! - `ends`: powers off a few ticks after boot, printing a line that depends
//!   on where the ticks landed just before.
//!
//! `ticks=N` ends `irqprint`, `irqclock` and `ends` after N ticks (for
//! `ends`, 0 means 5); `loops=N` is the number of `clockloop` samples.

use core::arch::asm;

use crate::cmdline::{Config, Mode};
use crate::ftclock::{self, Source};
use crate::{kernel, pit, power, serial};

/// Runs `cfg.mode` (not `Mode::Hash`, which is the workload's).
pub fn run(cfg: &Config) -> ! {
    match cfg.mode {
        Mode::IrqPrint => irq_print(cfg.ticks, cfg.work),
        Mode::IrqClock => irq_clock(cfg.ticks, cfg.digest_every),
        Mode::ClockLoop => clock_loop(cfg.loops),
        Mode::Ends => ends(if cfg.ticks == 0 { 5 } else { cfg.ticks }, cfg.work),
        Mode::Hash => power::off(0xef),
    }
}

/// About `n` × 2 instructions that make no VM exit.
fn spin(n: u64) {
    if n == 0 {
        return;
    }
    // SAFETY: a register-only countdown loop.
    unsafe { asm!("2:", "dec {n}", "jnz 2b", n = inout(reg) n => _, options(nomem, nostack)) };
}

fn enable_interrupts() {
    // SAFETY: the IDT, PIC and PIT are set up; the ISRs preserve what they
    // interrupt.
    unsafe { asm!("sti", options(nomem, nostack)) };
}

fn disable_interrupts() {
    // SAFETY: only clears IF.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Waits with IF clear until TICKS moves past `now` (no wake-up is lost:
/// `sti` takes effect after the `hlt`).
fn sleep_past(now: u64) {
    while kernel::ticks() == now {
        // SAFETY: waits for an interrupt with IF set, then clears it again.
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
}

/// `irqprint`: one digit (TICKS mod 10) per `work` spin, 64 to a line,
/// with interrupts on; at tick `stop` (0: never) `\ndone ticks N\n`.
fn irq_print(stop: u64, work: u64) -> ! {
    enable_interrupts();
    let mut col = 0;
    loop {
        let t = kernel::ticks();
        if stop != 0 && t >= stop {
            disable_interrupts();
            serial::puts("\ndone ticks ");
            serial::put_dec(stop);
            serial::puts("\n");
            power::off(0);
        }
        serial::putc(b'0' + (t % 10) as u8);
        col += 1;
        if col == 64 {
            serial::putc(b'\n');
            col = 0;
        }
        spin(work);
    }
}

/// `irqclock`: sleep tick by tick; every `every` ticks print
/// `tick N clock C state S` (C: the clock the ISR read first thing); at
/// tick `stop` (0: never) `done ticks N state S`.
fn irq_clock(stop: u64, every: u64) -> ! {
    // The boot code left ftclock on entropy; the ISR reads without selecting.
    ftclock::select(Source::Clock);
    kernel::set_clock_in_isr();
    loop {
        let now = kernel::ticks();
        if every != 0 && now != 0 && now % every == 0 {
            serial::puts("tick ");
            serial::put_dec(now);
            serial::puts(" clock ");
            serial::put_dec(kernel::isr_clock());
            serial::puts(" state ");
            serial::put_hex64(kernel::state());
            serial::puts("\n");
        }
        if stop != 0 && now >= stop {
            serial::puts("done ticks ");
            serial::put_dec(stop);
            serial::puts(" state ");
            serial::put_hex64(kernel::state());
            serial::puts("\n");
            power::off(0);
        }
        sleep_past(now);
    }
}

/// `clockloop`: `loops` lines of `sample I clock C entropy E pit P`, then
/// `done samples N`. Interrupts stay off.
fn clock_loop(loops: u64) -> ! {
    for i in 0..loops {
        let clock = ftclock::read(Source::Clock);
        let entropy = ftclock::read(Source::Entropy);
        let count = pit::read_counter();
        serial::puts("sample ");
        serial::put_dec(i);
        serial::puts(" clock ");
        serial::put_dec(clock);
        serial::puts(" entropy ");
        serial::put_hex64(entropy);
        serial::puts(" pit ");
        serial::put_dec(u64::from(count));
        serial::puts("\n");
    }
    serial::puts("done samples ");
    serial::put_dec(loops);
    serial::puts("\n");
    power::off(0)
}

/// `ends`: count `work` spins with interrupts on until tick `stop`, then
/// print `end ticks N spins K state S` and power off.
fn ends(stop: u64, work: u64) -> ! {
    enable_interrupts();
    let mut spins = 0u64;
    while kernel::ticks() < stop {
        spin(work);
        spins += 1;
        // A port access: a point where the next tick can land.
        serial::putc(b'.');
    }
    disable_interrupts();
    serial::puts("\nend ticks ");
    serial::put_dec(stop);
    serial::puts(" spins ");
    serial::put_dec(spins);
    serial::puts(" state ");
    serial::put_hex64(kernel::mix(kernel::state(), spins));
    serial::puts("\n");
    power::off(0)
}
