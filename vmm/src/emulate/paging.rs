//! The guest's 4-level page walk (4 KiB, 2 MiB and 1 GiB pages), with the
//! permission checks of the SDM (vol. 3, 4.6: U/S, R/W with CR0.WP, XD,
//! SMEP, SMAP with RFLAGS.AC and implicit supervisor accesses), reserved-bit
//! checks, and accessed/dirty bits set as the processor sets them.

use vm_memory::{Bytes, GuestAddress};

use super::fault::{Exception, PF_FETCH, PF_PRESENT, PF_RSVD, PF_USER, PF_WRITE};
use super::Unsupported;
use crate::memory::GuestRam;

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
const CR4_PKE: u64 = 1 << 22;
const EFER_NXE: u64 = 1 << 11;
const EFER_LMA: u64 = 1 << 10;

/// The control registers a walk depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingRegs {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// MAXPHYADDR (CPUID 0x8000_0008 EAX[7:0]).
    pub maxphyaddr: u8,
}

impl PagingRegs {
    /// From the vCPU's special registers.
    pub fn from_sregs(s: &kvm_bindings::kvm_sregs, maxphyaddr: u8) -> Self {
        PagingRegs {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            maxphyaddr,
        }
    }

    /// Whether supervisor-mode access prevention is on.
    pub fn smap(&self) -> bool {
        self.cr4 & CR4_SMAP != 0
    }

    fn addr_mask(&self) -> u64 {
        let top = u32::from(self.maxphyaddr.clamp(32, 52));
        ((1u64 << top) - 1) & !0xfff
    }

    /// Bits that must be zero in every entry: above MAXPHYADDR, and XD
    /// without EFER.NXE.
    fn reserved(&self) -> u64 {
        let high = ((1u64 << 52) - 1) & !((1u64 << self.maxphyaddr.clamp(32, 52)) - 1);
        if self.efer & EFER_NXE != 0 {
            high
        } else {
            high | XD
        }
    }
}

/// What kind of access is being translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// A write.
    pub write: bool,
    /// An instruction fetch.
    pub fetch: bool,
    /// At CPL3 (a user-mode access).
    pub user: bool,
    /// An implicit supervisor access (descriptor tables, the IDT): SMAP
    /// applies regardless of RFLAGS.AC.
    pub implicit: bool,
    /// RFLAGS.AC.
    pub ac: bool,
}

/// A successful translation, with the entries it used (to set their
/// accessed and dirty bits once the whole access is known to succeed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address of the byte.
    pub gpa: u64,
    /// Bytes from `gpa` to the end of its page.
    pub page_left: u64,
    entries: [u64; 4],
    levels: usize,
    write: bool,
}

/// Why a walk stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The guest gets a #PF.
    Fault(Exception),
    /// The VMM cannot do this walk.
    Unsupported(Unsupported),
}

impl From<Unsupported> for WalkError {
    fn from(u: Unsupported) -> Self {
        WalkError::Unsupported(u)
    }
}

fn read_entry(mem: &GuestRam, gpa: u64) -> Result<u64, Unsupported> {
    mem.read_obj(GuestAddress(gpa))
        .map_err(|_| Unsupported::OutsideRam(gpa))
}

/// Translate the linear address `la` for `acc`.
pub fn translate(
    mem: &GuestRam,
    r: &PagingRegs,
    la: u64,
    acc: Access,
) -> Result<Translation, WalkError> {
    if r.cr0 & CR0_PG == 0 || r.cr4 & CR4_PAE == 0 || r.efer & EFER_LMA == 0 {
        return Err(Unsupported::NotLongMode.into());
    }
    if r.cr4 & CR4_LA57 != 0 {
        return Err(Unsupported::La57.into());
    }
    if r.cr4 & CR4_PKE != 0 {
        return Err(Unsupported::ProtectionKeys.into());
    }
    let base_code = if acc.write { PF_WRITE } else { 0 }
        | if acc.user { PF_USER } else { 0 }
        | if acc.fetch && (r.efer & EFER_NXE != 0 || r.cr4 & CR4_SMEP != 0) {
            PF_FETCH
        } else {
            0
        };
    let fault = |code| WalkError::Fault(Exception::PageFault { addr: la, code });
    let mask = r.addr_mask();
    let rsvd = r.reserved();
    let mut table = r.cr3 & mask;
    let mut entries = [0u64; 4];
    let (mut user_ok, mut write_ok, mut nx) = (true, true, false);
    let mut level = 4;
    let mut n = 0;
    let (frame, page_size) = loop {
        let idx = (la >> (12 + 9 * (level - 1))) & 0x1ff;
        let gpa = table + idx * 8;
        let e = read_entry(mem, gpa)?;
        entries[n] = gpa;
        n += 1;
        if e & P == 0 {
            return Err(fault(base_code));
        }
        let leaf = level == 1 || (level <= 3 && e & PS != 0);
        let mut bad = e & rsvd;
        if level == 4 {
            bad |= e & PS;
        } else if leaf && level == 3 {
            bad |= e & 0x3fff_e000; // bits 29:13
        } else if leaf && level == 2 {
            bad |= e & 0x001f_e000; // bits 20:13
        }
        if bad != 0 {
            return Err(fault(base_code | PF_PRESENT | PF_RSVD));
        }
        user_ok &= e & US != 0;
        write_ok &= e & RW != 0;
        nx |= e & XD != 0 && r.efer & EFER_NXE != 0;
        if leaf {
            let size = 1u64 << (12 + 9 * (level - 1));
            break (e & mask & !(size - 1), size);
        }
        table = e & mask;
        level -= 1;
    };
    let denied = if acc.user {
        !user_ok || (acc.write && !write_ok) || (acc.fetch && nx)
    } else if acc.fetch {
        nx || (user_ok && r.cr4 & CR4_SMEP != 0)
    } else {
        (user_ok && r.smap() && (acc.implicit || !acc.ac))
            || (acc.write && !write_ok && r.cr0 & CR0_WP != 0)
    };
    if denied {
        return Err(fault(base_code | PF_PRESENT));
    }
    let off = la & (page_size - 1);
    Ok(Translation {
        gpa: frame | off,
        page_left: page_size - off,
        entries,
        levels: n,
        write: acc.write,
    })
}

/// Set the accessed bit of every entry the translation used, and the dirty
/// bit of its leaf for a write, as the processor does on a successful access.
pub fn mark_used(mem: &GuestRam, t: &Translation) -> Result<(), Unsupported> {
    for (i, &gpa) in t.entries[..t.levels].iter().enumerate() {
        let e = read_entry(mem, gpa)?;
        let mut want = e | A;
        if t.write && i == t.levels - 1 {
            want |= D;
        }
        if want != e {
            mem.write_obj(want, GuestAddress(gpa))
                .map_err(|_| Unsupported::OutsideRam(gpa))?;
        }
    }
    Ok(())
}

/// The pieces of guest-physical memory a linear range maps to, each within
/// one page, checked for `acc` before anything is touched.
pub fn translate_range(
    mem: &GuestRam,
    r: &PagingRegs,
    la: u64,
    len: usize,
    acc: Access,
) -> Result<Vec<(Translation, usize)>, WalkError> {
    let mut out = Vec::new();
    let mut done = 0usize;
    while done < len {
        let t = translate(mem, r, la.wrapping_add(done as u64), acc)?;
        let n = (t.page_left as usize).min(len - done);
        out.push((t, n));
        done += n;
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Hand-built tables in an 8 MiB guest: PML4 at 0x1000, PDPT at 0x2000,
    /// PD at 0x3000, PT at 0x4000.
    pub(crate) struct Tables {
        pub mem: GuestRam,
        pub regs: PagingRegs,
    }

    pub(crate) const PML4: u64 = 0x1000;
    pub(crate) const PDPT: u64 = 0x2000;
    pub(crate) const PD: u64 = 0x3000;
    pub(crate) const PT: u64 = 0x4000;

    impl Tables {
        pub(crate) fn new() -> Self {
            let mem = crate::memory::create_ram(8).unwrap();
            let t = Tables {
                mem,
                regs: PagingRegs {
                    cr0: CR0_PG | CR0_WP | 1,
                    cr3: PML4,
                    cr4: CR4_PAE,
                    efer: EFER_LMA | EFER_NXE | (1 << 8),
                    maxphyaddr: 46,
                },
            };
            t.set(PML4, PDPT | P | RW | US);
            t.set(PDPT, PD | P | RW | US);
            t.set(PD, PT | P | RW | US);
            t
        }

        pub(crate) fn set(&self, gpa: u64, v: u64) {
            self.mem.write_obj(v, GuestAddress(gpa)).unwrap();
        }

        pub(crate) fn get(&self, gpa: u64) -> u64 {
            self.mem.read_obj(GuestAddress(gpa)).unwrap()
        }

        /// Special registers for these tables, in 64-bit mode.
        pub(crate) fn sregs(&self) -> kvm_bindings::kvm_sregs {
            let cs = kvm_bindings::kvm_segment {
                l: 1,
                ..Default::default()
            };
            kvm_bindings::kvm_sregs {
                cr0: self.regs.cr0,
                cr3: self.regs.cr3,
                cr4: self.regs.cr4,
                efer: self.regs.efer,
                cs,
                ..Default::default()
            }
        }

        /// Map the 4 KiB page at linear `page * 4096` (page < 512) to `frame`.
        pub(crate) fn map4k(&self, page: u64, frame: u64, flags: u64) {
            self.set(PT + 8 * page, frame | flags);
        }
    }

    fn sup(write: bool) -> Access {
        Access {
            write,
            ..Default::default()
        }
    }

    #[test]
    fn four_k_page_translates_and_sets_accessed_and_dirty() {
        let t = Tables::new();
        t.map4k(5, 0x40_0000, P | RW);
        let tr = translate(&t.mem, &t.regs, 5 * 4096 + 0x123, sup(false)).unwrap();
        assert_eq!(tr.gpa, 0x40_0123);
        assert_eq!(tr.page_left, 4096 - 0x123);
        // Nothing is marked until the access is committed.
        assert_eq!(t.get(PT + 40) & (A | D), 0);
        mark_used(&t.mem, &tr).unwrap();
        assert_eq!(t.get(PT + 40) & (A | D), A, "a read sets A, not D");
        for e in [PML4, PDPT, PD] {
            assert_ne!(t.get(e) & A, 0);
            assert_eq!(t.get(e) & D, 0, "D only on the leaf");
        }
        let tr = translate(&t.mem, &t.regs, 5 * 4096, sup(true)).unwrap();
        mark_used(&t.mem, &tr).unwrap();
        assert_eq!(t.get(PT + 40) & (A | D), A | D);
    }

    #[test]
    fn large_pages() {
        let t = Tables::new();
        // PDE 1: a 2 MiB page at 0x60_0000 for linear 2..4 MiB.
        t.set(PD + 8, 0x60_0000 | P | RW | PS);
        let tr = translate(&t.mem, &t.regs, 0x20_1234, sup(true)).unwrap();
        assert_eq!(tr.gpa, 0x60_1234);
        assert_eq!(tr.page_left, 0x20_0000 - 0x1234);
        mark_used(&t.mem, &tr).unwrap();
        assert_eq!(t.get(PD + 8) & (A | D), A | D);
        // PDPTE 1: a 1 GiB page at 0 for linear 1..2 GiB.
        t.set(PDPT + 8, P | RW | PS);
        let tr = translate(&t.mem, &t.regs, (1 << 30) + 0x5_0000, sup(false)).unwrap();
        assert_eq!(tr.gpa, 0x5_0000);
    }

    #[test]
    fn not_present_and_reserved_bits() {
        let t = Tables::new();
        let e = translate(&t.mem, &t.regs, 7 * 4096 + 8, sup(true)).unwrap_err();
        assert_eq!(
            e,
            WalkError::Fault(Exception::PageFault {
                addr: 7 * 4096 + 8,
                code: PF_WRITE
            })
        );
        // A frame bit above MAXPHYADDR (46).
        t.map4k(7, (1 << 47) | P | RW, 0);
        let e = translate(&t.mem, &t.regs, 7 * 4096, sup(false)).unwrap_err();
        assert_eq!(
            e,
            WalkError::Fault(Exception::PageFault {
                addr: 7 * 4096,
                code: PF_PRESENT | PF_RSVD
            })
        );
        // Reserved bits 20:13 of a 2 MiB PDE.
        t.set(PD + 16, 0x40_0000 | (1 << 13) | P | PS);
        let e = translate(&t.mem, &t.regs, 0x40_0000, sup(false)).unwrap_err();
        assert!(
            matches!(e, WalkError::Fault(Exception::PageFault { code, .. }) if code & PF_RSVD != 0)
        );
    }

    #[test]
    fn user_supervisor_and_write_protect() {
        let mut t = Tables::new();
        t.map4k(1, 0x10_0000, P); // supervisor, read-only
        t.map4k(2, 0x11_0000, P | US); // user, read-only
        let user = Access {
            user: true,
            ..Default::default()
        };
        let e = translate(&t.mem, &t.regs, 4096, user).unwrap_err();
        assert_eq!(
            e,
            WalkError::Fault(Exception::PageFault {
                addr: 4096,
                code: PF_PRESENT | PF_USER
            })
        );
        assert!(translate(&t.mem, &t.regs, 2 * 4096, user).is_ok());
        let uw = Access {
            write: true,
            ..user
        };
        let e = translate(&t.mem, &t.regs, 2 * 4096, uw).unwrap_err();
        assert_eq!(
            e,
            WalkError::Fault(Exception::PageFault {
                addr: 2 * 4096,
                code: PF_PRESENT | PF_WRITE | PF_USER
            })
        );
        // Supervisor write to a read-only page: #PF with CR0.WP, allowed without.
        let e = translate(&t.mem, &t.regs, 4096, sup(true)).unwrap_err();
        assert_eq!(
            e,
            WalkError::Fault(Exception::PageFault {
                addr: 4096,
                code: PF_PRESENT | PF_WRITE
            })
        );
        t.regs.cr0 &= !CR0_WP;
        assert!(translate(&t.mem, &t.regs, 4096, sup(true)).is_ok());
        // R/W is the AND of all levels: a read-only PD entry protects its pages.
        t.regs.cr0 |= CR0_WP;
        t.map4k(3, 0x12_0000, P | RW);
        assert!(translate(&t.mem, &t.regs, 3 * 4096, sup(true)).is_ok());
        t.set(PD, PT | P | US);
        assert!(translate(&t.mem, &t.regs, 3 * 4096, sup(true)).is_err());
    }

    #[test]
    fn smap_with_ac_and_implicit_accesses() {
        let mut t = Tables::new();
        t.regs.cr4 |= CR4_SMAP;
        t.map4k(2, 0x11_0000, P | RW | US);
        let code = PF_PRESENT | PF_WRITE;
        let e = translate(&t.mem, &t.regs, 2 * 4096, sup(true)).unwrap_err();
        assert_eq!(
            e,
            WalkError::Fault(Exception::PageFault {
                addr: 2 * 4096,
                code
            })
        );
        let ac = Access {
            write: true,
            ac: true,
            ..Default::default()
        };
        assert!(translate(&t.mem, &t.regs, 2 * 4096, ac).is_ok());
        let implicit = Access {
            implicit: true,
            ..ac
        };
        assert!(
            translate(&t.mem, &t.regs, 2 * 4096, implicit).is_err(),
            "AC does not cover implicit accesses"
        );
        // A page is user-mode only if U/S is set at every level.
        t.set(PD, PT | P | RW);
        assert!(translate(&t.mem, &t.regs, 2 * 4096, sup(true)).is_ok());
    }

    #[test]
    fn fetch_from_xd_page_and_smep() {
        let mut t = Tables::new();
        t.map4k(1, 0x10_0000, P | XD);
        t.map4k(2, 0x11_0000, P | US);
        let fetch = Access {
            fetch: true,
            ..Default::default()
        };
        let e = translate(&t.mem, &t.regs, 4096, fetch).unwrap_err();
        assert_eq!(
            e,
            WalkError::Fault(Exception::PageFault {
                addr: 4096,
                code: PF_PRESENT | PF_FETCH
            })
        );
        assert!(translate(&t.mem, &t.regs, 2 * 4096, fetch).is_ok());
        t.regs.cr4 |= CR4_SMEP;
        assert!(translate(&t.mem, &t.regs, 2 * 4096, fetch).is_err());
    }

    #[test]
    fn range_across_pages_is_checked_page_by_page() {
        let t = Tables::new();
        t.map4k(1, 0x10_0000, P | RW);
        t.map4k(2, 0x20_0000, P | RW);
        let r = translate_range(&t.mem, &t.regs, 4096 + 4000, 200, sup(true)).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].0.gpa, r[0].1), (0x10_0000 + 4000, 96));
        assert_eq!((r[1].0.gpa, r[1].1), (0x20_0000, 104));
        // The second page missing: the fault names its first byte.
        let e = translate_range(&t.mem, &t.regs, 2 * 4096 + 4000, 200, sup(true)).unwrap_err();
        assert_eq!(
            e,
            WalkError::Fault(Exception::PageFault {
                addr: 3 * 4096,
                code: PF_WRITE
            })
        );
    }

    #[test]
    fn la57_and_tables_outside_ram_are_refused() {
        let mut t = Tables::new();
        t.regs.cr4 |= CR4_LA57;
        assert_eq!(
            translate(&t.mem, &t.regs, 0, sup(false)),
            Err(WalkError::Unsupported(Unsupported::La57))
        );
        t.regs.cr4 &= !CR4_LA57;
        t.regs.cr3 = 1 << 40;
        assert!(matches!(
            translate(&t.mem, &t.regs, 0, sup(false)),
            Err(WalkError::Unsupported(Unsupported::OutsideRam(_)))
        ));
    }
}
