//! 16550 UART on COM1: polled output, interrupt-driven input (IRQ4).

use crate::io;

const COM1: u16 = 0x3f8;
const RBR_THR: u16 = COM1; // DLL when DLAB = 1
const IER: u16 = COM1 + 1; // DLM when DLAB = 1
const FCR: u16 = COM1 + 2;
const LCR: u16 = COM1 + 3;
const MCR: u16 = COM1 + 4;
const LSR: u16 = COM1 + 5;

const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// 115200 baud 8N1, FIFOs on, OUT2 (the IRQ line gate) set, no interrupts yet.
pub fn init() {
    // SAFETY: COM1 is the platform's UART; this is the usual init sequence.
    unsafe {
        io::outb(IER, 0x00);
        io::outb(LCR, 0x80); // DLAB
        io::outb(RBR_THR, 1); // divisor 1 = 115200
        io::outb(IER, 0x00);
        io::outb(LCR, 0x03); // 8N1
        io::outb(FCR, 0x07); // enable and clear FIFOs
        io::outb(MCR, 0x0b); // DTR | RTS | OUT2
    }
}

/// Enables the received-data interrupt (IER bit 0).
pub fn enable_rx_irq() {
    // SAFETY: COM1 is the platform's UART.
    unsafe { io::outb(IER, 0x01) };
}

/// The next received byte, if any (LSR bit 0, then RBR).
pub fn try_read() -> Option<u8> {
    // SAFETY: COM1 is the platform's UART; reading RBR consumes the byte.
    unsafe { (io::inb(LSR) & LSR_DATA_READY != 0).then(|| io::inb(RBR_THR)) }
}

/// Writes one byte once the transmit holding register is empty.
pub fn putc(b: u8) {
    // SAFETY: COM1 is the platform's UART.
    unsafe {
        while io::inb(LSR) & LSR_THR_EMPTY == 0 {}
        io::outb(RBR_THR, b);
    }
}

pub fn put_bytes(s: &[u8]) {
    for &b in s {
        putc(b);
    }
}

pub fn puts(s: &str) {
    put_bytes(s.as_bytes());
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Exactly 16 lowercase hex digits.
pub fn put_hex64(v: u64) {
    for i in (0..16).rev() {
        putc(HEX[((v >> (i * 4)) & 0xf) as usize]);
    }
}

/// Exactly 2 lowercase hex digits.
pub fn put_hex8(v: u8) {
    putc(HEX[usize::from(v >> 4)]);
    putc(HEX[usize::from(v & 0xf)]);
}

/// Decimal, no padding. No digit buffer: zeroing one takes SSE instructions
/// that this host's CPL0 emulator cannot run (see docs/guest.md).
pub fn put_dec(v: u64) {
    let mut div = 1;
    while v / div >= 10 {
        div *= 10;
    }
    loop {
        putc(b'0' + (v / div % 10) as u8);
        if div == 1 {
            break;
        }
        div /= 10;
    }
}
