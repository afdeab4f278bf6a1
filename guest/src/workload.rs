//! The workload: slices of a hash chain, each ended by the sleep syscall.
//!
//! It normally runs at CPL3, where this host's nested KVM runs it natively
//! (CPL0 code is emulated there). The code below must not use anything
//! privileged: it only reads kernel memory (all pages are user-accessible)
//! and makes the syscall.
//!
//! The syscall is a `ud2` at one known address (`sys_sleep`): the #UD
//! handler recognises it by RIP and resumes after it. `int 0x80` would be
//! the usual choice, but on this host `int n` raises #UD at CPL3 and is an
//! emulation failure at CPL0, and `int3` fails at CPL0; #UD is delivered
//! at both levels (see docs/guest.md).

use core::arch::asm;

use crate::{boot, kernel};

/// Length of the `ud2` the #UD handler skips.
pub const SYSCALL_LEN: u64 = 2;

extern "C" {
    /// The syscall stub: `ud2; ret`, RAX = the hash. Preserves all registers.
    fn sys_sleep();
    /// The control syscall (net mode): `ud2; ret`, RAX = operation
    /// (`CTL_WRITE`: print RSI bytes at RDI; `CTL_POWEROFF`: power off with
    /// exit code DIL). Preserves all registers.
    fn sys_ctl();
}

core::arch::global_asm!(
    r#"
    .pushsection .text.sys_sleep, "ax"
sys_sleep:
    ud2
    ret
sys_ctl:
    ud2
    ret
    .popsection
"#
);

/// `sys_ctl` operations.
pub const CTL_WRITE: u64 = 1;
pub const CTL_POWEROFF: u64 = 2;

/// Whether a #UD at `rip` is the syscall.
pub fn is_syscall(rip: u64) -> bool {
    rip == sys_sleep as unsafe extern "C" fn() as usize as u64
}

/// Whether a #UD at `rip` is the control syscall.
pub fn is_ctl(rip: u64) -> bool {
    rip == sys_ctl as unsafe extern "C" fn() as usize as u64
}

/// CPL3 side of the sleep syscall in net mode: RAX = hash, RDX = count for
/// `work steps`. Returns whether a network interrupt was pending or arrived
/// (the syscall returns at the next timer tick or network interrupt).
pub fn user_sleep(h: u64, steps: u64) -> bool {
    let r: u64;
    // SAFETY: the #UD handler preserves every register but RAX (the result)
    // and the SSE state; no red zone, so `call` on our stack is fine.
    unsafe { asm!("call {f}", f = sym sys_sleep, inlateout("rax") h => r, in("rdx") steps) };
    r & 1 != 0
}

/// CPL3: prints `s` on the console (COM1) through the kernel.
pub fn user_write(s: &[u8]) {
    // SAFETY: the kernel only reads `s`; all registers are preserved.
    unsafe {
        asm!("call {f}", f = sym sys_ctl, in("rax") CTL_WRITE, in("rdi") s.as_ptr(),
             in("rsi") s.len(), options(readonly))
    };
}

/// CPL3: powers the VM off with `code`.
pub fn user_poweroff(code: u8) -> ! {
    // SAFETY: the syscall does not return.
    unsafe {
        asm!("call {f}", f = sym sys_ctl, in("rax") CTL_POWEROFF, in("rdi") u64::from(code));
    }
    loop {
        core::hint::spin_loop();
    }
}

/// Whether the CPU runs at CPL3 (CS.RPL; `mov r, cs` works at any level).
pub fn at_cpl3() -> bool {
    let cs: u64;
    // SAFETY: reads the CS selector only.
    unsafe { asm!("mov {0:r}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3 == 3
}

/// Enters the workload and never comes back (the syscall powers off).
pub fn run(user: bool, work: u64, seed: u64) -> ! {
    if !user {
        // SAFETY: the IDT, PIC and PIT are set up; from here interrupts may
        // land anywhere in the workload.
        unsafe { asm!("sti", options(nomem, nostack)) };
        user_main(work, seed);
    }
    enter_user(user_main, work, seed)
}

/// Enters `entry(a0, a1)` at CPL3 on the user stack with interrupts on.
pub fn enter_user(entry: extern "C" fn(u64, u64) -> !, a0: u64, a1: u64) -> ! {
    // SAFETY: an iretq frame for CPL3: the user stack, IF set (0x202), and
    // `entry` with its two arguments in RDI/RSI per the C ABI. The GDT has
    // the user selectors and the TSS gives interrupts a kernel stack.
    unsafe {
        asm!(
            "push {ss}",
            "push {rsp}",
            "push 0x202",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) boot::USER_SS,
            rsp = in(reg) boot::user_stack_top(),
            cs = in(reg) boot::USER_CS,
            rip = in(reg) entry as usize,
            in("rdi") a0,
            in("rsi") a1,
            options(noreturn),
        )
    }
}

extern "C" fn user_main(work: u64, seed: u64) -> ! {
    let mut h = seed;
    loop {
        let (next, steps) = slice(h, work);
        h = next;
        // SAFETY: the #UD handler preserves every register and the SSE
        // state; the stack is ours (no red zone, so `call` is fine).
        unsafe { asm!("call {f}", f = sym sys_sleep, in("rax") h, in("rdx") steps) };
    }
}

/// Up to `work` steps of `h = f((h ^ i) + TICKS)` with f(v) = m ^ (m >> 29),
/// m = v * 0x9e3779b97f4a7c15, where TICKS is re-read from kernel memory
/// every step. RCX holds the step number i, so the timer ISR folds the
/// RIP and RCX of the interrupted step into its digest. The slice ends
/// early once TICKS reaches BREAK_AT (a tick that is due a digest or stop).
/// Returns the new hash and the number of steps done.
fn slice(mut h: u64, work: u64) -> (u64, u64) {
    let steps: u64;
    // SAFETY: only reads two kernel counters that live forever; every
    // register used is declared.
    unsafe {
        asm!(
            "2:",
            "cmp rcx, rdx",
            "jae 3f",
            "mov r8, qword ptr [rdi]",
            "cmp r8, qword ptr [rsi]",
            "jae 3f",
            "xor rax, rcx",
            "add rax, r8",
            "imul rax, r9",
            "mov r8, rax",
            "shr r8, 29",
            "xor rax, r8",
            "inc rcx",
            "jmp 2b",
            "3:",
            inout("rax") h,
            inout("rcx") 0u64 => steps,
            in("rdx") work,
            in("rdi") kernel::ticks_ptr(),
            in("rsi") kernel::break_at_ptr(),
            in("r9") 0x9e37_79b9_7f4a_7c15u64,
            out("r8") _,
            options(nostack, readonly),
        );
    }
    (h, steps)
}
