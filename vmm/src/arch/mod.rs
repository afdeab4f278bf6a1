//! x86-64 specifics: the boot CPU state, the CPUID policy, the MSR filter.

pub mod boot;
pub mod cpuid;
pub mod msr;
