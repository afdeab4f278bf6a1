//! Register access to the virtio-mmio window (32-bit accesses, 8-bit for
//! config space). Each access is a VM exit (about 10 us), so callers keep
//! them out of loops.
//!
//! Inline assembly pins each access to one plain `mov` (the compiler could
//! otherwise fold a volatile read into `test`/`cmp` with a memory operand),
//! which is the simplest thing for the MMIO emulation path to decode.

use core::arch::asm;

/// Guest-physical base of the device's registers (identity-mapped).
pub const BASE: usize = 0xd000_0000;

pub fn r32(off: usize) -> u32 {
    let v: u32;
    // SAFETY: a register of the virtio-mmio window (identity-mapped MMIO);
    // the asm may read memory (no `nomem`), so it orders with ring accesses.
    unsafe {
        asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) BASE + off, v = out(reg) v, options(nostack, preserves_flags))
    };
    v
}

pub fn w32(off: usize, v: u32) {
    // SAFETY: as for `r32`; also a compiler barrier for the rings.
    unsafe {
        asm!("mov dword ptr [{a}], {v:e}", a = in(reg) BASE + off, v = in(reg) v, options(nostack, preserves_flags))
    };
}

pub fn r8(off: usize) -> u8 {
    let v: u8;
    // SAFETY: as for `r32`; config space is read byte by byte.
    unsafe {
        asm!("mov {v}, byte ptr [{a}]", a = in(reg) BASE + off, v = out(reg_byte) v, options(nostack, preserves_flags))
    };
    v
}
