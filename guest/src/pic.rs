//! The 8259 PIC pair: vectors 0x20-0x2f, only IRQ0 (PIT), IRQ2 (cascade)
//! and IRQ4 (COM1) unmasked.

use crate::io;

const MASTER_CMD: u16 = 0x20;
const MASTER_DATA: u16 = 0x21;
const SLAVE_CMD: u16 = 0xa0;
const SLAVE_DATA: u16 = 0xa1;
const EOI: u8 = 0x20;
const READ_ISR: u8 = 0x0b; // OCW3

pub fn init() {
    // SAFETY: the PIC ports; ICW1-ICW4 then OCW1, as on a PC.
    unsafe {
        io::outb(MASTER_CMD, 0x11); // ICW1: edge, cascade, ICW4 follows
        io::outb(SLAVE_CMD, 0x11);
        io::outb(MASTER_DATA, 0x20); // ICW2: vector base
        io::outb(SLAVE_DATA, 0x28);
        io::outb(MASTER_DATA, 0x04); // ICW3: slave on IRQ2
        io::outb(SLAVE_DATA, 0x02); // ICW3: slave identity
        io::outb(MASTER_DATA, 0x01); // ICW4: 8086 mode
        io::outb(SLAVE_DATA, 0x01);
        io::outb(MASTER_DATA, !((1 << 0) | (1 << 2) | (1 << 4)));
        io::outb(SLAVE_DATA, 0xff);
    }
}

/// Also unmasks IRQ5 (virtio-net, net mode only).
pub fn unmask_net() {
    // SAFETY: OCW1 on the master: the mask `init` set, minus IRQ5.
    unsafe { io::outb(MASTER_DATA, !((1 << 0) | (1 << 2) | (1 << 4) | (1 << 5))) };
}

/// Non-specific EOI for `irq` (both chips for slave IRQs).
pub fn eoi(irq: u8) {
    // SAFETY: the PIC command ports; OCW2 non-specific EOI.
    unsafe {
        if irq >= 8 {
            io::outb(SLAVE_CMD, EOI);
        }
        io::outb(MASTER_CMD, EOI);
    }
}

/// A masked or spurious IRQ: acknowledge it unless it is spurious (IRQ7/15
/// with no in-service bit), which must not get an EOI.
pub fn unexpected(irq: u8) {
    let (cmd, bit) = if irq >= 8 {
        (SLAVE_CMD, irq - 8)
    } else {
        (MASTER_CMD, irq)
    };
    if bit == 7 {
        // SAFETY: OCW3 then a read of the in-service register.
        let isr = unsafe {
            io::outb(cmd, READ_ISR);
            io::inb(cmd)
        };
        if isr & 0x80 == 0 {
            if irq >= 8 {
                eoi(0); // the master did see the cascade
            }
            return;
        }
    }
    eoi(irq);
}
