# The SYSCALL probe vmm::quirks runs: SYSCALL from CPL3 with LSTAR in a
# supervisor page. Powers off with
#   2 if the SYSCALL reached LSTAR at CPL0 (the processor is right),
#   1 if it stayed at CPL3 and page-faulted at LSTAR with RCX/R11 set
#     (the kvm_pvm quirk, checked in detail here),
#   3 for anything else.
        .include "common.inc"
main:
        call user_page
        SYSCALL_MSRS kernel_entry, 0x200
        ON_EXCEPTION fault
        USER_MODE ucode, ucode_end, 0x202
fault:
        lea rax, [rip + kernel_entry]
        cmp qword ptr [R_VECTOR], 14
        jne other
        cmp [R_RIP], rax
        jne other
        cmp [R_CR2], rax
        jne other
        cmp qword ptr [R_CS], 0x23
        jne other
        cmp qword ptr [R_RCX], USER + (ret_addr - ucode)
        jne other
        cmp qword ptr [R_R11], 0x202
        jne other
        POWEROFF 1
other:
        POWEROFF 3
kernel_entry:
        mov ax, cs
        cmp ax, 0x08
        jne other
        POWEROFF 2
ucode:
        syscall
ret_addr:
        ud2
ucode_end:
