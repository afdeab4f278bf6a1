//! The 8254 PIT: channel 0 in mode 2 drives IRQ0.

use crate::io;

const CH0: u16 = 0x40;
const CMD: u16 = 0x43;
/// Input clock of the PIT in Hz.
pub const BASE_HZ: u32 = 1_193_182;

/// Channel 0, lobyte/hibyte, mode 2 (rate generator), binary, at `hz`.
/// `hz` must give a divisor in 2..=65535 (cmdline checks it).
pub fn init(hz: u32) {
    let div = BASE_HZ / hz;
    // SAFETY: the PIT ports; mode command then the two divisor bytes.
    unsafe {
        io::outb(CMD, 0x34);
        io::outb(CH0, div as u8);
        io::outb(CH0, (div >> 8) as u8);
    }
}

/// Latches and reads channel 0's current count (non-deterministic: it
/// depends on host time; the VMM logs it).
pub fn read_counter() -> u16 {
    // SAFETY: the PIT ports; counter-latch command for channel 0, then the
    // latched value low byte first.
    unsafe {
        io::outb(CMD, 0x00);
        let lo = io::inb(CH0);
        let hi = io::inb(CH0);
        u16::from_le_bytes([lo, hi])
    }
}
