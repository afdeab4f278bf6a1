# CLAC, STAC, POPCNT, FWAIT, INT3, LDMXCSR/STMXCSR at CPL0, where this
# host's KVM cannot emulate them. Results at R_TEST (see tests/emulate.rs).
        .include "common.inc"
main:
        stac
        pushfq
        pop qword ptr [R_TEST + 0x00]   # RFLAGS after STAC
        clac
        pushfq
        pop qword ptr [R_TEST + 0x08]   # RFLAGS after CLAC
        # POPCNT: 64-bit register, flags set beforehand.
        mov rcx, 0xf0f000000000ff01
        mov rax, -1
        stc
        popcnt rax, rcx
        mov [R_TEST + 0x10], rax
        pushfq
        pop qword ptr [R_TEST + 0x18]
        # 32-bit: zero-extends.
        mov rax, -1
        popcnt eax, ecx
        mov [R_TEST + 0x20], rax
        # 16-bit: keeps the upper bits.
        mov rax, -1
        popcnt ax, cx
        mov [R_TEST + 0x28], rax
        # Zero source: ZF.
        xor ecx, ecx
        popcnt rdx, rcx
        mov [R_TEST + 0x30], rdx
        pushfq
        pop qword ptr [R_TEST + 0x38]
        # Memory source with SIB and displacement, and an FS override.
        mov rbx, DATA
        mov rax, 0x8000000000000003
        mov [rbx + 0x48], rax
        mov r12, 9
        popcnt r9, [rbx + r12 * 8]
        mov [R_TEST + 0x40], r9
        mov ecx, 0xc0000100             # FS base = DATA
        mov eax, DATA
        xor edx, edx
        wrmsr
        popcnt r10, fs:[0x48]
        mov [R_TEST + 0x48], r10
        # RIP-relative source.
        popcnt r11, [rip + ones]
        mov [R_TEST + 0x50], r11
        fwait
        # LDMXCSR / STMXCSR.
        mov dword ptr [DATA], 0x1fa0
        ldmxcsr [DATA]
        stmxcsr [DATA + 4]
        mov eax, [DATA + 4]
        mov [R_TEST + 0x58], rax
        mov dword ptr [DATA], 0x1f80
        ldmxcsr [DATA]
        # INT3: #BP with the address after it.
        ON_EXCEPTION after_bp
        lea rax, [rip + after_bp]
        mov [R_TEST + 0x60], rax
        int3
after_bp:
        POWEROFF 0
        .balign 8
ones:   .quad 0x00000000ffffffff
