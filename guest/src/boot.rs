//! Entry, descriptor tables, page tables and interrupt stubs (assembly).
//!
//! `_start` runs with the platform's boot state (long mode, RSI = boot_params,
//! interrupts off). It sets up everything the Rust code relies on and calls
//! `kmain(boot_params)`:
//! - a stack of its own, `.bss` zeroed;
//! - identity page tables for the first 4 GiB with 2 MiB pages (0xc000_0000
//!   and up uncached: the MMIO hole), U/S set on
//!   every level so CPL3 code can touch everything (no isolation is wanted);
//! - a GDT: 0x08 kernel code, 0x10 kernel data, 0x18 user data, 0x20 user
//!   code (all 64-bit flat), 0x28 the TSS whose RSP0 is the interrupt stack;
//! - an IDT: vectors 0-31 (exceptions) and 0x20-0x2f (PIC IRQs) as DPL0
//!   interrupt gates. Interrupt gates clear IF, so kernel code only nests
//!   interrupts where it asks for them (`sti; hlt`). There is no `int 0x80`
//!   gate: the syscall is a `ud2` (see `workload`).
//!
//! Every vector enters `isr_common`, which saves the general registers and
//! the SSE state (fxsave64: compiled kernel code may move data through XMM
//! registers), calls
//! `idt::dispatch(&mut Frame)`, restores everything and returns with iretq.

use crate::idt::Frame;

/// User data/stack selector (RPL 3).
pub const USER_SS: u64 = 0x18 | 3;
/// User code selector (RPL 3).
pub const USER_CS: u64 = 0x20 | 3;

extern "C" {
    /// Top of the user-mode stack (defined below).
    static __ustack_top: u8;
}

/// The initial stack pointer for user mode (16-byte aligned minus 8, as if
/// the entry function had been called).
pub fn user_stack_top() -> u64 {
    (&raw const __ustack_top) as u64 - 8
}

/// Called by `isr_common` with the frame it built on the stack.
extern "C" fn isr_entry(frame: &mut Frame) {
    crate::idt::dispatch(frame);
}

core::arch::global_asm!(
    r#"
    .section .text._start, "ax"
    .global _start
_start:
    cli
    cld
    mov r15, rsi                        # boot_params, kept for kmain
    lea rsp, [rip + __kstack_top]

    # Zero .bss (statics, page tables, IDT, TSS).
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    shr rcx, 3
    xor eax, eax
    rep stosq

    # Identity-map 4 GiB with 2 MiB pages: the PDPT and its four page
    # directories are assembled into .data (below), so boot does no per-entry
    # work at (emulated) CPL0; only the PML4 entry is written here.
    lea rax, [rip + boot_pdpt]
    or rax, 7
    mov [rip + boot_pml4], rax
    lea rax, [rip + boot_pml4]
    mov cr3, rax

    # TSS: RSP0 = interrupt stack, no I/O bitmap.
    lea rax, [rip + __istack_top]
    mov [rip + boot_tss + 4], rax
    mov word ptr [rip + boot_tss + 102], 104

    # TSS descriptor (64-bit available TSS, limit 103).
    lea rax, [rip + boot_tss]
    lea rdx, [rip + gdt_tss]
    mov word ptr [rdx], 103
    mov [rdx + 2], ax
    shr rax, 16
    mov [rdx + 4], al
    mov byte ptr [rdx + 5], 0x89
    mov byte ptr [rdx + 6], 0
    mov [rdx + 7], ah
    shr rax, 16
    mov [rdx + 8], eax
    mov dword ptr [rdx + 12], 0

    lgdt [rip + gdt_ptr]
    push 0x08
    lea rax, [rip + .Lreloaded]
    push rax
    retfq
.Lreloaded:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov ax, 0x28
    ltr ax

    # IDT: vectors 0-47 from isr_table, DPL0 interrupt gates.
    lea rsi, [rip + isr_table]
    lea rdi, [rip + boot_idt]
    mov ecx, 48
    mov dl, 0x8e
.Lidt_loop:
    mov rax, [rsi]
    call set_gate
    add rsi, 8
    add rdi, 16
    dec ecx
    jnz .Lidt_loop
    lidt [rip + idt_ptr]

    mov rdi, r15
    call {kmain}
.Lstop:
    cli
    hlt
    jmp .Lstop

# Gate at [rdi] for handler rax, type/attributes dl. Clobbers rax.
set_gate:
    mov [rdi], ax
    mov word ptr [rdi + 2], 0x08
    mov byte ptr [rdi + 4], 0
    mov [rdi + 5], dl
    shr rax, 16
    mov [rdi + 6], ax
    shr rax, 16
    mov [rdi + 8], eax
    mov dword ptr [rdi + 12], 0
    ret

    .section .text.isr, "ax"
# Vectors without an error code push a 0 so every frame looks the same.
.irp vec, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
isr_\vec:
    push 0
    push \vec
    jmp isr_common
.endr
.irp vec, 8,10,11,12,13,14,17,21,29,30
isr_\vec:
    push \vec
    jmp isr_common
.endr

# Stack here: vector, error code, then the CPU's RIP, CS, RFLAGS, RSP, SS.
isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    cld
    mov rbx, rsp                        # the Frame; callee-saved
    sub rsp, 512
    and rsp, -16
    fxsave64 [rsp]
    mov rdi, rbx
    call {entry}
    fxrstor64 [rsp]
    mov rsp, rbx
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16                         # vector, error code
    iretq

    .section .rodata.isr_table, "a"
    .balign 8
isr_table:
.irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
    .quad isr_\vec
.endr

    .section .data.gdt, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff            # 0x08 kernel code, 64-bit
    .quad 0x00cf92000000ffff            # 0x10 kernel data
    .quad 0x00cff2000000ffff            # 0x18 user data (DPL3)
    .quad 0x00affa000000ffff            # 0x20 user code, 64-bit (DPL3)
gdt_tss:
    .quad 0                             # 0x28 TSS, filled in by _start
    .quad 0
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
idt_ptr:
    .word 256 * 16 - 1
    .quad boot_idt

    # Identity map of 4 GiB: 2048 entries of P | RW | US | PS (0x87) for
    # 2 MiB pages; from 0xc000_0000 up (the MMIO hole, e.g. virtio-net at
    # 0xd000_0000) also PCD | PWT (0x9f).
    .section .data.boot_pt, "aw"
    .balign 4096
boot_pd:
    .set .Lpa, 0
    .rept 1536
    .quad .Lpa + 0x87
    .set .Lpa, .Lpa + 0x200000
    .endr
    .rept 512
    .quad .Lpa + 0x9f
    .set .Lpa, .Lpa + 0x200000
    .endr
boot_pdpt:
    .quad boot_pd + 0x0007
    .quad boot_pd + 0x1007
    .quad boot_pd + 0x2007
    .quad boot_pd + 0x3007
    .balign 4096

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_idt:
    .skip 4096
boot_tss:
    .skip 104

    .section .stack, "aw", @nobits
    .balign 16
    .skip 65536
__kstack_top:                           # kmain (and user=0 workload)
    .skip 32768
__istack_top:                           # TSS.RSP0: interrupts from CPL3
    .skip 262144                        # (the network service keeps its socket set here)
    .global __ustack_top
__ustack_top:                           # user-mode workload
    .text
"#,
    kmain = sym crate::kmain,
    entry = sym isr_entry,
);
