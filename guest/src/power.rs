//! The platform's power port: a write stops the VM with an exit code.

use crate::io;

const POWER_PORT: u16 = 0xf000;

/// Stops the VM with `code` (0 = success, 0xee = exception, 0xef = panic).
pub fn off(code: u8) -> ! {
    // SAFETY: the power port is write-only and only stops the VM.
    unsafe { io::outb(POWER_PORT, code) };
    // Not reached on ftvmm; park the CPU if a platform ignores the write.
    loop {
        // SAFETY: cli/hlt only stop this CPU.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
