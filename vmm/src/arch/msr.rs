//! MSRs: which ones exit to userspace, and which ones a snapshot saves.

/// Time-stamp counter.
pub const IA32_TSC: u32 = 0x10;
/// TSC adjust.
pub const IA32_TSC_ADJUST: u32 = 0x3b;
/// TSC deadline (LAPIC timer).
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
/// TSC_AUX (what RDTSCP/RDPID return).
pub const IA32_TSC_AUX: u32 = 0xc000_0103;
/// Old kvmclock MSRs.
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
/// Old kvmclock MSRs.
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
/// First of the KVM paravirtual MSRs.
pub const MSR_KVM_BASE: u32 = 0x4b56_4d00;

/// MSRs whose accesses must reach userspace: each is a host clock (or
/// configures one) the guest could otherwise read without a log entry.
pub const FILTERED: &[u32] = &[
    IA32_TSC,
    IA32_TSC_ADJUST,
    IA32_TSC_DEADLINE,
    IA32_TSC_AUX,
    MSR_KVM_WALL_CLOCK,
    MSR_KVM_SYSTEM_TIME,
];

/// MSRs saved and restored with the vCPU (the architectural state a
/// 64-bit guest changes; the TSC is deliberately absent).
pub const SAVED: &[u32] = &[
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
    0x1a0,       // MISC_ENABLE
];
