//! ftvmm-guest: the bundled test guest of ftvmm.
//!
//! A tiny kernel for the ftvmm platform (docs/platform.md): it runs a hash
//! chain at CPL3 in slices, takes PIT ticks and serial input, reads ftclock
//! and the PIT counter, and prints a running digest of all of it, so a
//! replay that lands one interrupt on a different instruction shows up as a
//! different digest. See docs/guest.md for the command line and output.
#![no_std]
#![no_main]

mod boot;
mod cmdline;
mod ftclock;
mod idt;
mod io;
mod kernel;
mod mem;
mod modes;
mod net;
mod pic;
mod pit;
mod power;
mod serial;
mod workload;

use ftclock::Source;

/// Called by `_start` with the platform's boot_params pointer.
extern "C" fn kmain(boot_params: usize) -> ! {
    serial::init();
    serial::puts("ftvmm-guest 0.1 booting\n");
    // SAFETY: `_start` passes RSI from the boot protocol unchanged, and
    // nothing writes the command line.
    let line = unsafe { cmdline::from_boot_params(boot_params) };
    serial::puts("cmdline: ");
    serial::put_bytes(line);
    serial::puts("\n");
    let cfg = cmdline::parse(line);

    pic::init();
    pit::init(cfg.hz);
    serial::enable_rx_irq();
    // Bytes received before IER was set raised no interrupt.
    kernel::drain_uart();

    let clock = ftclock::read(Source::Clock);
    let seed = ftclock::read(Source::Entropy);
    serial::puts("clock ");
    serial::put_dec(clock);
    serial::puts(" seed ");
    serial::put_hex64(seed);
    serial::puts("\n");

    kernel::start(&cfg, clock, seed);
    if cfg.mode != cmdline::Mode::Hash {
        modes::run(&cfg)
    }
    if cfg.net {
        net::start(&cfg, seed)
    }
    workload::run(cfg.user, cfg.work, seed)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    if workload::at_cpl3() {
        user_panic(info);
    }
    serial::puts("panic");
    if let Some(loc) = info.location() {
        serial::puts(" at ");
        serial::puts(loc.file());
        serial::puts(":");
        serial::put_dec(u64::from(loc.line()));
    }
    serial::puts("\n");
    power::off(0xef)
}

/// A panic at CPL3 (the network service): no port I/O there, so print and
/// power off through the control syscall. Kept out of `panic` so that the
/// CPL0 path stays free of SSE arithmetic.
#[inline(never)]
fn user_panic(info: &core::panic::PanicInfo) -> ! {
    let mut line = net::Line::new();
    line.bytes(b"panic");
    if let Some(loc) = info.location() {
        line.bytes(b" at ")
            .bytes(loc.file().as_bytes())
            .bytes(b":")
            .dec(u64::from(loc.line()));
    }
    line.bytes(b"\n").print();
    workload::user_poweroff(0xef)
}
