//! The guest CPUID features the emulated instructions depend on: an
//! instruction the guest's CPUID does not offer raises #UD, as it would on
//! a processor without it.

use kvm_bindings::kvm_cpuid_entry2;

use super::xstate::XstateLayout;

/// What the guest's CPUID table offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    /// CPUID.1:ECX.POPCNT.
    pub popcnt: bool,
    /// CPUID.1:ECX.XSAVE.
    pub xsave: bool,
    /// CPUID.1:EDX.FXSR.
    pub fxsr: bool,
    /// CPUID.7.0:EBX.SMAP (CLAC/STAC).
    pub smap: bool,
    /// MAXPHYADDR.
    pub maxphyaddr: u8,
    /// CPUID leaf 0xD.
    pub xstate: XstateLayout,
}

impl Features {
    /// From the guest's CPUID entries.
    pub fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Self {
        let find = |f: u32, i: u32| {
            entries
                .iter()
                .find(|e| e.function == f && e.index == i)
                .copied()
                .unwrap_or_default()
        };
        let l1 = find(1, 0);
        let l7 = find(7, 0);
        let phys = find(0x8000_0008, 0).eax as u8;
        Features {
            popcnt: l1.ecx & (1 << 23) != 0,
            xsave: l1.ecx & (1 << 26) != 0,
            fxsr: l1.edx & (1 << 24) != 0,
            smap: l7.ebx & (1 << 20) != 0,
            maxphyaddr: if phys == 0 { 36 } else { phys },
            xstate: XstateLayout::from_cpuid(entries),
        }
    }

    /// Everything on, with the AVX-512 layout (unit tests).
    #[cfg(test)]
    pub fn for_tests() -> Self {
        Features {
            popcnt: true,
            xsave: true,
            fxsr: true,
            smap: true,
            maxphyaddr: 46,
            xstate: XstateLayout::from_cpuid(&super::xstate::tests::avx512_cpuid()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_come_from_their_leaves() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: 1 << 23,
                edx: 1 << 24,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: 1 << 20,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0008,
                eax: 0x3028,
                ..Default::default()
            },
        ];
        let f = Features::from_cpuid(&entries);
        assert!(f.popcnt && f.fxsr && f.smap && !f.xsave);
        assert_eq!(f.maxphyaddr, 0x28);
    }
}
