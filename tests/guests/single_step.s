# RFLAGS.TF set over an emulated instruction: #DB (single-step trap, DR6.BS)
# with the saved RIP after it. Records that RIP's expected value, DR6.
        .include "common.inc"
main:
        ON_EXCEPTION after
        lea rax, [rip + after_clac]
        mov [R_TEST], rax
        pushfq
        or qword ptr [rsp], 0x100       # TF
        popfq
        clac
after_clac:
        nop
        POWEROFF 1                      # no trap
after:
        mov rax, dr6
        mov [R_TEST + 8], rax
        POWEROFF 0
