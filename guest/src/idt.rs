//! Interrupt dispatch: the frame the stubs build and where each vector goes.

use crate::{kernel, pic, power, serial, workload};

/// Vector of the first PIC IRQ (ICW2 of the master).
pub const IRQ_BASE: u64 = 0x20;
/// Invalid opcode: also the syscall (see `workload`).
const UD: u64 = 6;

/// The interrupted context, as `isr_common` leaves it on the stack.
#[repr(C)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Called with interrupts disabled for every vector in the IDT.
pub fn dispatch(frame: &mut Frame) {
    match frame.vector {
        UD if workload::is_syscall(frame.rip) => {
            kernel::sleep_syscall(frame);
            frame.rip += workload::SYSCALL_LEN;
        }
        UD if workload::is_ctl(frame.rip) => {
            kernel::ctl_syscall(frame);
            frame.rip += workload::SYSCALL_LEN;
        }
        0..=31 => exception(frame),
        v if (IRQ_BASE..IRQ_BASE + 16).contains(&v) => {
            let irq = (v - IRQ_BASE) as u8;
            match irq {
                0 => kernel::timer_irq(frame),
                4 => kernel::uart_irq(),
                5 => kernel::net_irq(frame),
                _ => pic::unexpected(irq),
            }
        }
        _ => exception(frame),
    }
}

/// Any CPU exception is fatal: report it and power off with 0xee.
fn exception(frame: &Frame) -> ! {
    serial::puts("exception ");
    serial::put_dec(frame.vector);
    serial::puts(" rip ");
    serial::put_hex64(frame.rip);
    serial::puts(" err ");
    serial::put_hex64(frame.error);
    serial::puts("\n");
    power::off(0xee)
}
