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
    select(source);
    read_selected()
}

/// Chooses what the next samples are of.
pub fn select(source: Source) {
    // SAFETY: ftclock's select register only chooses the source.
    unsafe { io::outb(SELECT, source as u8) };
}

/// A fresh sample of the selected source: the low half (which takes the
/// sample), then the high half of the same sample. No port write, so the
/// first exit is a logged read (the `irqclock` test mode relies on it).
pub fn read_selected() -> u64 {
    // SAFETY: ftclock's sample ports; reads have no effect but sampling.
    unsafe {
        let lo = io::inl(SAMPLE_LO);
        let hi = io::inl(SAMPLE_HI);
        (u64::from(hi) << 32) | u64::from(lo)
    }
}
