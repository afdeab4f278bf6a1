# Prints one digit per spin with interrupts ENABLED: the digit is the tick
# count mod 8, so which byte lands at which console offset depends on where
# the timer interrupts land (several digits a tick). 150 digits, then power off.
.include "common.inc"
start:
    setup_idt isr
    setup_pic_pit 1193          # ~1 kHz
    sti
    mov r12d, 150
1:  mov rax, [TICKS]
    and al, 7
    add al, '0'
    mov dx, 0x3f8
    out dx, al
    mov ecx, 400                # a spin with no exits, a fraction of a tick
2:  dec ecx
    jnz 2b
    dec r12d
    jnz 1b
    power_off
isr:
    push rax
    tick_and_eoi
    pop rax
    iretq
