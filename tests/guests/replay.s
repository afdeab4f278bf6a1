# Emulated instructions between port exits, for record and replay: each
# round reads the host clock through ftclock (a logged input) and runs
# STAC, CLAC, POPCNT, XSAVEC64 and XRSTOR64 on it. Two port exits a round
# plus the power-off are the only deterministic exits.
        .include "common.inc"
        .set ROUNDS, 500
main:
        mov r15, ROUNDS
        xor r14, r14
1:      mov dx, 0xf100
        xor eax, eax
        out dx, al                      # select the clock
        mov dx, 0xf104
        in eax, dx                      # its low 32 bits (logged)
        mov r8d, eax
        stac
        clac
        popcnt r9, r8
        add r14, r9
        mov [DATA + 0x1000], r14
        RFBM_ALL
        xsavec64 [DATA]
        xrstor64 [DATA]
        dec r15
        jnz 1b
        POWEROFF 0
