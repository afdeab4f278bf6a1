# The SYSCALL probe vmm::quirks runs: SYSCALL from CPL3 with LSTAR in a
# supervisor page. Powers off with
#   2 if the SYSCALL reached LSTAR at CPL0 (the processor is right),
#   1 if it stayed at CPL3 and page-faulted at LSTAR with RCX/R11 set
#     (the kvm_pvm quirk, checked in detail here),
#   3 for anything else.
        .include "common.inc"
main:
        call user_page
        mov ecx, 0xc0000081             # STAR: kernel CS 0x08, user base 0x10
        xor eax, eax
        mov edx, 0x00100008
        wrmsr
        mov ecx, 0xc0000082             # LSTAR
        lea rax, [rip + kernel_entry]
        mov rdx, rax
        shr rdx, 32
        wrmsr
        mov ecx, 0xc0000084             # SFMASK: IF
        mov eax, 0x200
        xor edx, edx
        wrmsr
        ON_EXCEPTION fault
        lea rsi, [rip + ucode]
        lea rdi, [rip + ucode_end]
        mov edx, 0x202
        jmp enter_user
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
