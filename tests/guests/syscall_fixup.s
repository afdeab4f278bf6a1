# A SYSCALL from CPL3 into an entry at LSTAR, with a Linux-like page-fault
# handler that begins with CLAC (SMAP on). Where SYSCALL is broken (kvm_pvm)
# the VMM must complete it. The entry records CS, SS, RCX, R11, RSP and
# RFLAGS at R_TEST and powers off with 0; a page fault powers off with 1.
        .include "common.inc"
main:
        call user_page
        SET_GATE 14, pf_entry
        lea rsi, [rip + ucode]
        lea rdi, [rip + ucode_end]
        call copy_user
        mov rax, cr4
        or rax, 1 << 21                 # SMAP
        mov cr4, rax
        SYSCALL_MSRS syscall_entry, 0x40600
        mov edx, 0x40a02                # IF, DF, AC at CPL3
        jmp go_user
pf_entry:
        clac
        mov rax, cr2
        mov [R_CR2], rax
        POWEROFF 1
syscall_entry:
        mov [R_TEST + 0x10], rsp
        mov rsp, KSTACK
        mov [R_TEST + 0x00], rcx
        mov [R_TEST + 0x08], r11
        mov ax, cs
        mov [R_TEST + 0x18], ax
        mov ax, ss
        mov [R_TEST + 0x20], ax
        pushfq
        pop rax
        mov [R_TEST + 0x28], rax
        mov qword ptr [R_TEST + 0x30], USER + (ret_addr - ucode)
        POWEROFF 0
ucode:
        mov rsp, USTACK - 64
        syscall
ret_addr:
        ud2
ucode_end:
