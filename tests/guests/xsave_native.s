# Emulated XSAVE64/XSAVEC64/FXSAVE64/XRSTOR64 at CPL0 against the native
# instructions at CPL3 (which this host runs in hardware). CPL3 loads
# x87, SSE, AVX, AVX-512 and opmask state and saves it natively into
# UDATA + 0x0000 (XSAVE64), + 0x1000 (XSAVEC64), + 0x2000 (FXSAVE64); the
# kernel then saves the same state by the emulated path into DATA + the
# same offsets. Round two does the same after VZEROUPPER (components in
# their initial state) into + 0x3000 / + 0x4000. Then the kernel restores
# (emulated) the round-one standard area and CPL3 saves natively into
# UDATA + 0x5000; and after restoring round two's area and then round
# one's compacted area, into UDATA + 0x6000. Every area starts as 0xa5
# with XSTATE_BV zero;
# the restores read copies whose reserved header bytes are zero.
        .include "common.inc"
        .set PATTERN, UDATA + 0x8000
main:
        call user_page
        # Fill the areas with 0xa5 and the pattern with bytes 37*i + 11.
        mov rdi, UDATA
        mov al, 0xa5
        mov ecx, 0x7000
        rep stosb
        mov rdi, DATA
        mov ecx, 0x5000
        rep stosb
        # XSTATE_BV starts at zero: XSAVE keeps the bits outside RFBM.
        .irp k, 0,1,2,3,4,5,6
        mov qword ptr [UDATA + 0x1000 * \k + 512], 0
        .endr
        .irp k, 0,1,2,3,4
        mov qword ptr [DATA + 0x1000 * \k + 512], 0
        .endr
        mov rdi, PATTERN
        xor ecx, ecx
1:      mov eax, ecx
        imul eax, eax, 37
        add eax, 11
        mov [rdi + rcx], al
        inc ecx
        cmp ecx, 0x1000
        jne 1b
        ON_EXCEPTION back1
        USER_MODE ucode1, ucode1_end, 0x2
back1:
        RFBM_ALL
        xsave64 [DATA]
        xsavec64 [DATA + 0x1000]
        fxsave64 [DATA + 0x2000]
        ON_EXCEPTION back2
        USER_MODE ucode2, ucode2_end, 0x2
back2:
        RFBM_ALL
        xsave64 [DATA + 0x3000]
        xsavec64 [DATA + 0x4000]
        # Restorable copies (reserved header bytes zero): round one standard
        # at UDATA + 0x7000, round two standard at DATA + 0x5000, round one
        # compacted at DATA + 0x6000.
        mov rsi, UDATA
        mov rdi, UDATA + 0x7000
        mov edx, 520
        call copy_area
        mov rsi, UDATA + 0x3000
        mov rdi, DATA + 0x5000
        mov edx, 520
        call copy_area
        mov rsi, UDATA + 0x1000
        mov rdi, DATA + 0x6000
        mov edx, 528
        call copy_area
        RFBM_ALL
        xrstor64 [UDATA + 0x7000]
        ON_EXCEPTION back3
        USER_MODE ucode3, ucode3_end, 0x2
back3:
        RFBM_ALL
        xrstor64 [DATA + 0x5000]
        xrstor64 [DATA + 0x6000]
        ON_EXCEPTION back4
        USER_MODE ucode4, ucode4_end, 0x2
back4:
        POWEROFF 0

ucode1:
        .irp r, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        vmovdqu64 zmm\r, [PATTERN + 64 * \r]
        .endr
        kmovq k1, [PATTERN + 0x900]
        kmovq k2, [PATTERN + 0x908]
        kmovq k7, [PATTERN + 0x938]
        fldpi
        fld1
        mov dword ptr [PATTERN + 0xf00], 0x1fa0
        ldmxcsr [PATTERN + 0xf00]
        RFBM_ALL
        xsave64 [UDATA]
        xsavec64 [UDATA + 0x1000]
        fxsave64 [UDATA + 0x2000]
        ud2
ucode1_end:
ucode2:
        vzeroupper
        RFBM_ALL
        xsave64 [UDATA + 0x3000]
        xsavec64 [UDATA + 0x4000]
        ud2
ucode2_end:
ucode3:
        RFBM_ALL
        xsave64 [UDATA + 0x5000]
        ud2
ucode3_end:
ucode4:
        RFBM_ALL
        xsave64 [UDATA + 0x6000]
        ud2
ucode4_end:
