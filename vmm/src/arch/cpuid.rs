//! The CPUID policy: hide every feature whose result KVM cannot intercept
//! or that would let the guest read host time or entropy behind our back.
//!
//! Hiding a feature in CPUID does not stop an instruction from executing
//! (RDRAND runs if the CPU has it); it tells a well-behaved guest not to use
//! it. docs/replay.md lists what a guest must avoid.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_FEATURES: u32 = 7;
const LEAF_KVM_BASE: u32 = 0x4000_0000;
const LEAF_KVM_END: u32 = 0x4000_00ff;
const LEAF_EXT_INFO: u32 = 0x8000_0001;

// Leaf 1 ECX.
const ECX_VMX: u32 = 1 << 5;
const ECX_MONITOR: u32 = 1 << 3;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_RDRAND: u32 = 1 << 30;
// Leaf 1 EDX.
const EDX_APIC: u32 = 1 << 9;
// Leaf 7.0 EBX / ECX.
const EBX7_TSC_ADJUST: u32 = 1 << 1;
const EBX7_RDSEED: u32 = 1 << 18;
const ECX7_WAITPKG: u32 = 1 << 5;
const ECX7_RDPID: u32 = 1 << 22;
// Leaf 0x8000_0001 EDX.
const EDX_EXT_RDTSCP: u32 = 1 << 27;

/// Apply the policy to one entry; returns false when the entry must go.
fn filter_entry(e: &mut kvm_cpuid_entry2) -> bool {
    match e.function {
        LEAF_FEATURES => {
            e.ecx &= !(ECX_VMX | ECX_MONITOR | ECX_X2APIC | ECX_TSC_DEADLINE | ECX_RDRAND);
            // No local APIC: interrupts come from the userspace 8259.
            e.edx &= !EDX_APIC;
            // One vCPU, APIC ID 0.
            e.ebx &= 0x0000_ffff;
        }
        LEAF_EXT_FEATURES if e.index == 0 => {
            e.ebx &= !(EBX7_TSC_ADJUST | EBX7_RDSEED);
            e.ecx &= !(ECX7_WAITPKG | ECX7_RDPID);
        }
        LEAF_EXT_INFO => e.edx &= !EDX_EXT_RDTSCP,
        // kvmclock, steal time, PV EOI and friends: all paravirtual clocks.
        LEAF_KVM_BASE..=LEAF_KVM_END => return false,
        _ => {}
    }
    true
}

/// The guest's CPUID, derived from what KVM supports on this host.
pub fn guest_cpuid(supported: &CpuId) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .copied()
        .filter_map(|mut e| filter_entry(&mut e).then_some(e))
        .collect();
    CpuId::from_entries(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    #[test]
    fn hides_rdrand_rdseed_rdtscp_rdpid_and_pv_clock() {
        let all = CpuId::from_entries(&[
            entry(1, 0),
            entry(7, 0),
            entry(0x8000_0001, 0),
            entry(0x4000_0001, 0),
            entry(2, 0),
        ])
        .unwrap();
        let out = guest_cpuid(&all).unwrap();
        let got = out.as_slice();
        assert_eq!(got.len(), 4, "the KVM paravirtual leaf is removed");
        assert_eq!(got[0].ecx & ECX_RDRAND, 0);
        assert_eq!(got[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(got[0].ecx & ECX_X2APIC, 0);
        assert_eq!(got[1].ebx & EBX7_RDSEED, 0);
        assert_eq!(got[1].ecx & ECX7_RDPID, 0);
        assert_eq!(got[2].edx & EDX_EXT_RDTSCP, 0);
        assert_eq!(got[3].ecx, !0, "unrelated leaves are untouched");
    }
}
