# An instruction neither this host's KVM (at CPL0) nor the VMM emulates.
        .include "common.inc"
main:
        pxor xmm0, xmm1
        POWEROFF 0
