//! The CPUID policy: hide every feature whose result KVM cannot intercept
//! or that would let the guest read host time or entropy behind our back.
//!
//! Hiding a feature in CPUID does not stop an instruction from executing
//! (RDRAND runs if the CPU has it); it tells a well-behaved guest not to use
//! it. docs/replay.md lists what a guest must avoid.
//!
//! The primary's table travels in the log header ([`to_log`]); a backup
//! gives its guest that same table ([`from_log`]) after checking that its
//! own KVM supports every feature in it, so both guests see one CPU.

use ftlog::CpuidEntry;
use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use crate::{Error, Result};

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
pub fn guest_cpuid(supported: &CpuId) -> Result<CpuId> {
    let entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .copied()
        .filter_map(|mut e| filter_entry(&mut e).then_some(e))
        .collect();
    table(&entries)
}

fn table(entries: &[kvm_cpuid_entry2]) -> Result<CpuId> {
    CpuId::from_entries(entries).map_err(|e| Error::Cpuid(format!("{e:?}")))
}

fn host_supported() -> Result<CpuId> {
    let kvm = kvm_ioctls::Kvm::new().map_err(Error::KvmUnavailable)?;
    kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))
}

/// The guest table this host would give a new VM (for a log header
/// written before the VM exists).
pub fn host_guest_table() -> Result<Vec<CpuidEntry>> {
    Ok(to_log(&guest_cpuid(&host_supported()?)?))
}

/// Everything this host's KVM can give a guest (KVM_GET_SUPPORTED_CPUID).
pub fn supported_table() -> Result<Vec<CpuidEntry>> {
    Ok(to_log(&host_supported()?))
}

/// A table as the log header carries it.
pub fn to_log(c: &CpuId) -> Vec<CpuidEntry> {
    c.as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// The log's table as KVM takes it, refused when this host's KVM
/// (`supported`) lacks a feature in it or has another vendor.
pub fn from_log(log: &[CpuidEntry], supported: &CpuId) -> Result<CpuId> {
    check(log, &to_log(supported))?;
    let entries: Vec<kvm_cpuid_entry2> = log
        .iter()
        .map(|e| kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    table(&entries)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn name(self) -> &'static str {
        match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        }
    }

    fn of(self, e: &CpuidEntry) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }
}

/// Names of the feature bits a guest is likely to use, by bit number.
type BitNames = &'static [(u8, &'static str)];

/// The registers whose bits are features (a set bit: the CPU has it), by
/// (leaf, subleaf), and the names of their bits.
const FEATURE_REGS: &[(u32, u32, Reg, BitNames)] = &[
    (
        1,
        0,
        Reg::Ecx,
        &[
            (0, "SSE3"),
            (1, "PCLMULQDQ"),
            (9, "SSSE3"),
            (12, "FMA"),
            (13, "CMPXCHG16B"),
            (19, "SSE4.1"),
            (20, "SSE4.2"),
            (22, "MOVBE"),
            (23, "POPCNT"),
            (25, "AES"),
            (26, "XSAVE"),
            (28, "AVX"),
            (29, "F16C"),
            (31, "hypervisor"),
        ],
    ),
    (
        1,
        0,
        Reg::Edx,
        &[
            (0, "FPU"),
            (4, "TSC"),
            (6, "PAE"),
            (8, "CX8"),
            (15, "CMOV"),
            (19, "CLFLUSH"),
            (23, "MMX"),
            (24, "FXSR"),
            (25, "SSE"),
            (26, "SSE2"),
        ],
    ),
    (
        7,
        0,
        Reg::Ebx,
        &[
            (0, "FSGSBASE"),
            (3, "BMI1"),
            (5, "AVX2"),
            (7, "SMEP"),
            (8, "BMI2"),
            (9, "ERMS"),
            (10, "INVPCID"),
            (16, "AVX512F"),
            (19, "ADX"),
            (20, "SMAP"),
            (23, "CLFLUSHOPT"),
            (24, "CLWB"),
            (29, "SHA"),
        ],
    ),
    (
        7,
        0,
        Reg::Ecx,
        &[
            (1, "AVX512VBMI"),
            (2, "UMIP"),
            (3, "PKU"),
            (8, "GFNI"),
            (9, "VAES"),
            (10, "VPCLMULQDQ"),
        ],
    ),
    (7, 0, Reg::Edx, &[(4, "FSRM"), (10, "MD_CLEAR")]),
    (7, 1, Reg::Eax, &[]),
    (
        0xd,
        0,
        Reg::Eax,
        &[(0, "x87 state"), (1, "SSE state"), (2, "AVX state")],
    ),
    (0xd, 0, Reg::Edx, &[]),
    (
        0xd,
        1,
        Reg::Eax,
        &[
            (0, "XSAVEOPT"),
            (1, "XSAVEC"),
            (2, "XGETBV1"),
            (3, "XSAVES"),
        ],
    ),
    (
        0x8000_0001,
        0,
        Reg::Ecx,
        &[(0, "LAHF/SAHF"), (5, "LZCNT"), (8, "PREFETCHW")],
    ),
    (
        0x8000_0001,
        0,
        Reg::Edx,
        &[
            (11, "SYSCALL"),
            (20, "NX"),
            (26, "1 GiB pages"),
            (29, "long mode"),
        ],
    ),
    (0x8000_0007, 0, Reg::Edx, &[(8, "invariant TSC")]),
    (0x8000_0008, 0, Reg::Ebx, &[]),
];

/// The entry for (leaf, subleaf) in `entries`: the subleaf counts only
/// where KVM says it is significant.
fn find(entries: &[CpuidEntry], leaf: u32, subleaf: u32) -> Option<&CpuidEntry> {
    entries.iter().find(|e| {
        e.function == leaf && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == subleaf)
    })
}

fn vendor(ebx: u32, ecx: u32, edx: u32) -> String {
    let mut b = Vec::with_capacity(12);
    for r in [ebx, edx, ecx] {
        b.extend_from_slice(&r.to_le_bytes());
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// Refuse a log table this host cannot give: another vendor, or a feature
/// bit the host's KVM does not support.
fn check(log: &[CpuidEntry], host: &[CpuidEntry]) -> Result<()> {
    if let (Some(l), Some(h)) = (find(log, 0, 0), find(host, 0, 0)) {
        let (lv, hv) = (vendor(l.ebx, l.ecx, l.edx), vendor(h.ebx, h.ecx, h.edx));
        if lv != hv {
            return Err(Error::CpuidUnsupported {
                leaf: 0,
                subleaf: 0,
                register: "EBX/EDX/ECX",
                detail: format!("names the vendor {lv:?}, this host is {hv:?}"),
            });
        }
    }
    for &(leaf, subleaf, reg, names) in FEATURE_REGS {
        let Some(l) = find(log, leaf, subleaf) else {
            continue;
        };
        let have = find(host, leaf, subleaf).map_or(0, |h| reg.of(h));
        let missing = reg.of(l) & !have;
        if missing == 0 {
            continue;
        }
        let bits: Vec<String> = (0..32u8)
            .filter(|b| missing & (1 << b) != 0)
            .map(|b| match names.iter().find(|(n, _)| *n == b) {
                Some((_, name)) => format!("{b} ({name})"),
                None => b.to_string(),
            })
            .collect();
        let (noun, verb) = if bits.len() == 1 {
            ("bit", "is")
        } else {
            ("bits", "are")
        };
        return Err(Error::CpuidUnsupported {
            leaf,
            subleaf,
            register: reg.name(),
            detail: format!(
                "{noun} {} {verb} set in the log and not supported here",
                bits.join(", ")
            ),
        });
    }
    Ok(())
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

    fn log_entry(function: u32, index: u32, ebx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            flags: if function == 7 {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: 0,
            ebx,
            ecx: 0,
            edx: 0,
        }
    }

    #[test]
    fn a_feature_the_host_lacks_is_refused_naming_leaf_register_and_feature() {
        let mut host = entry(7, 0);
        host.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        host.ebx = !(1 << 5); // no AVX2 here
        let log = [log_entry(7, 0, (1 << 5) | (1 << 3))];
        let host_table = |h: kvm_cpuid_entry2| to_log(&CpuId::from_entries(&[h]).unwrap());
        let e = check(&log, &host_table(host)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("leaf 0x7.0 EBX bit 5 (AVX2) is set in the log"),
            "{msg}"
        );
        host.ebx = !0;
        assert!(check(&log, &host_table(host)).is_ok());
        // A leaf the host does not have at all supports nothing.
        let log = [log_entry(7, 0, 1 << 3), log_entry(1, 0, 0)];
        let msg = check(&log, &host_table(entry(1, 0)))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("bit 3 (BMI1)"), "{msg}");
    }

    #[test]
    fn another_vendor_is_refused() {
        let intel = |e: &mut kvm_cpuid_entry2| {
            e.ebx = u32::from_le_bytes(*b"Genu");
            e.edx = u32::from_le_bytes(*b"ineI");
            e.ecx = u32::from_le_bytes(*b"ntel");
        };
        let mut h = entry(0, 0);
        intel(&mut h);
        let host = to_log(&CpuId::from_entries(&[h]).unwrap());
        let mut l = host.clone();
        assert!(check(&l, &host).is_ok());
        l[0].ebx = u32::from_le_bytes(*b"Auth");
        let msg = check(&l, &host).unwrap_err().to_string();
        assert!(msg.contains("GenuineIntel"), "{msg}");
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
