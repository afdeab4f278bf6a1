# Interrupts off. 8 rounds of: an entropy sample (select, low, high), a
# clock sample (select, low, high), a PIT latch command and its two bytes,
# a PIT read-back (status + count) and its three bytes. Each round's values
# go to RECORDS + 32 * round:
#   +0 entropy (8)  +8 clock (8)  +16 latched count (2)
#   +18 read-back status (1)  +19 read-back count (2)
.include "common.inc"
start:
    outb 0x43, 0x34             # PIT channel 0, lohi, mode 2, count 65536
    outb 0x40, 0
    outb 0x40, 0
    mov rdi, RECORDS
    mov r12d, 8
1:  mov dx, 0xf100
    mov al, 1
    out dx, al
    mov dx, 0xf104
    in eax, dx
    mov [rdi], eax
    mov dx, 0xf108
    in eax, dx
    mov [rdi + 4], eax
    mov dx, 0xf100
    xor eax, eax
    out dx, al
    mov dx, 0xf104
    in eax, dx
    mov [rdi + 8], eax
    mov dx, 0xf108
    in eax, dx
    mov [rdi + 12], eax
    outb 0x43, 0x00             # latch channel 0
    in al, 0x40
    mov [rdi + 16], al
    in al, 0x40
    mov [rdi + 17], al
    outb 0x43, 0xc2             # read-back: count and status of channel 0
    in al, 0x40
    mov [rdi + 18], al
    in al, 0x40
    mov [rdi + 19], al
    in al, 0x40
    mov [rdi + 20], al
    add rdi, 32
    dec r12d
    jnz 1b
    mov dx, 0x3f8
    mov al, 'k'
    out dx, al
    power_off
