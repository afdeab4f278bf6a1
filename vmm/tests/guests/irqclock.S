# Sleeps tick by tick; the timer ISR's FIRST device access is an ftclock
# sample read (the clock source is selected once, before the loop), so a
# log cut right after an inject is followed by a logged read. Stores each
# sample at RECORDS + 8 * tick; prints '.' per tick; powers off after 8.
.include "common.inc"
start:
    setup_idt isr
    setup_pic_pit 5966          # ~200 Hz
    mov dx, 0xf100
    xor eax, eax
    out dx, al                  # ftclock: clock source
1:  sti
    hlt
    cmp qword ptr [TICKS], 8
    jb 1b
    power_off
isr:
    push rax
    push rdx
    push rdi
    mov dx, 0xf104
    in eax, dx                  # sample, low half (takes the sample)
    mov rdi, [TICKS]
    mov [RECORDS + rdi * 8], eax
    mov dx, 0xf108
    in eax, dx                  # high half (device state)
    mov [RECORDS + 4 + rdi * 8], eax
    mov al, '.'
    mov dx, 0x3f8
    out dx, al
    tick_and_eoi
    pop rdi
    pop rdx
    pop rax
    iretq
