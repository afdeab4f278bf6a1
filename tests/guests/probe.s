        .include "common.inc"
main:
        # clac/stac, popcnt, fwait, int3 at CPL0: see what exits.
        stac
        clac
        mov rcx, 0xff
        popcnt rax, rcx
        mov [R_TEST], rax
        fwait
        ON_EXCEPTION after_bp
        int3
after_bp:
        POWEROFF 0
