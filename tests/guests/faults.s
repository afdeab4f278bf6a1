# Exceptions raised by emulated instructions at CPL0 reach the guest's
# handlers as the processor would raise them. Each case records, at
# R_TEST + 32 * case: vector, error code, CR2, and whether the saved RIP
# is the faulting instruction (1) or not (0).
        .include "common.inc"

        # Run `insn` expecting an exception; record it as case `n`.
        .macro EXPECT n, insn:vararg
        ON_EXCEPTION 9f
        lea rax, [rip + 8f]
        mov [R_TEST + 32 * \n + 24], rax
8:      \insn
        POWEROFF 0x80 + \n              # no exception
9:      mov rax, [R_VECTOR]
        mov [R_TEST + 32 * \n], rax
        mov rax, [R_ERROR]
        mov [R_TEST + 32 * \n + 8], rax
        mov rax, [R_CR2]
        mov [R_TEST + 32 * \n + 16], rax
        mov rax, [R_RIP]
        cmp rax, [R_TEST + 32 * \n + 24]
        sete al
        movzx eax, al
        mov [R_TEST + 32 * \n + 24], rax
        .endm

main:
        call user_page
        # HOLE's 2 MiB page not present.
        mov qword ptr [PD + 8 * (HOLE >> 21)], 0
        mov rax, cr3
        mov cr3, rax
        RFBM_ALL
        # 0: XSAVEC64 into a missing page: #PF, write, not present.
        EXPECT 0, xsavec64 [HOLE + 0x40]
        # 1: POPCNT reading a missing page: #PF, read.
        mov rbx, HOLE + 0x1238
        EXPECT 1, popcnt rcx, [rbx]
        # 2: an XSAVEC64 area crossing into the missing page: CR2 is the
        # first byte written there.
        RFBM_ALL
        EXPECT 2, xsavec64 [HOLE - 0x100]
        # 3: XRSTOR64 from a misaligned area: #GP(0).
        EXPECT 3, xrstor64 [DATA + 0x20]
        # 4: XRSTOR64 with a reserved XSTATE_BV bit: #GP(0).
        mov qword ptr [DATA + 0x200], 1 << 30
        EXPECT 4, xrstor64 [DATA]
        # 5: SMAP: XSAVEC64 into a user page with AC clear: #PF P|W.
        mov rax, cr4
        or rax, 1 << 21
        mov cr4, rax
        RFBM_ALL
        EXPECT 5, xsavec64 [UDATA]
        # 6: the same with AC set (STAC) succeeds, then CLAC.
        stac
        xsavec64 [UDATA]
        mov rax, [UDATA + 520]
        clac
        mov [R_TEST + 32 * 6], rax      # XCOMP_BV written
        # 7: CR0.TS: #NM.
        mov rax, cr0
        or rax, 1 << 3
        mov cr0, rax
        EXPECT 7, xsave64 [DATA]
        clts
        # 8: CR4.OSXSAVE clear: #UD.
        mov rax, cr4
        and rax, ~(1 << 18)
        mov cr4, rax
        EXPECT 8, xsave64 [DATA]
        POWEROFF 0
