//! ftclock, the paravirtual clock and entropy device at 0xf100.

use crate::io;

const SELECT: u16 = 0xf100;
const SAMPLE_LO: u16 = 0xf104;
const SAMPLE_HI: u16 = 0xf108;

#[derive(Clone, Copy)]
#[repr(u8)]
pub enum Source {
    /// Host monotonic clock, ns since VM start.
    Clock = 0,
    /// 64 random bits.
    Entropy = 1,
}

/// One fresh 64-bit sample (non-deterministic: the VMM logs it).
pub fn read(source: Source) -> u64 {
    // SAFETY: ftclock's ports: select, then low half (takes the sample),
    // then the high half of the same sample.
    unsafe {
        io::outb(SELECT, source as u8);
        let lo = io::inl(SAMPLE_LO);
        let hi = io::inl(SAMPLE_HI);
        (u64::from(hi) << 32) | u64::from(lo)
    }
}
