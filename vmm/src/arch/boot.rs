//! The CPU state a kernel starts in: flat GDT, identity page tables, long
//! mode (or 32-bit protected mode for PVH entry).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestRam, BOOT_GDT, BOOT_IDT, BOOT_STACK, PD, PDPT, PML4};
use crate::{Error, Result};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT selectors of the boot GDT.
pub const SEL_CODE64: u16 = 0x08;
/// Flat data segment.
pub const SEL_DATA: u16 = 0x10;
/// A TSS descriptor (VMX wants a usable TR).
pub const SEL_TSS: u16 = 0x18;
/// Flat 32-bit code segment (PVH entry).
pub const SEL_CODE32: u16 = 0x20;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode, RSI = zero page (Linux 64-bit boot protocol).
    Long64 {
        /// Entry point.
        entry: u64,
        /// `boot_params` address.
        zero_page: u64,
    },
    /// 32-bit protected mode, paging off, EBX = `hvm_start_info` (PVH).
    Pvh32 {
        /// Entry point.
        entry: u64,
        /// `hvm_start_info` address.
        start_info: u64,
    },
}

/// A GDT entry from its parts (the packed layout the CPU reads).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The `kvm_segment` matching a GDT entry.
fn segment(selector: u16, entry: u64) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn boot_gdt() -> [u64; 5] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x008b, 0, 0x67),    // TSS (busy)
        gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
    ]
}

fn write_u64(mem: &GuestRam, addr: u64, val: u64) -> Result<()> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|e| Error::Memory(format!("boot structures at {addr:#x}: {e}")))
}

/// Write the boot GDT, an empty IDT and (for long mode) the identity page
/// tables into guest memory.
pub fn write_boot_tables(mem: &GuestRam) -> Result<()> {
    for (i, e) in boot_gdt().iter().enumerate() {
        write_u64(mem, BOOT_GDT + 8 * i as u64, *e)?;
    }
    write_u64(mem, BOOT_IDT, 0)?;
    write_u64(mem, PML4, PDPT | 0x3)?;
    write_u64(mem, PDPT, PD | 0x3)?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        write_u64(mem, PD + 8 * i, (i << 21) | 0x83)?;
    }
    Ok(())
}

/// Special registers for the entry mode, starting from what KVM reported.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let gdt = boot_gdt();
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    let code = match mode {
        EntryMode::Long64 { .. } => segment(SEL_CODE64, gdt[1]),
        EntryMode::Pvh32 { .. } => segment(SEL_CODE32, gdt[4]),
    };
    let data = segment(SEL_DATA, gdt[2]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(SEL_TSS, gdt[3]);
    match mode {
        EntryMode::Long64 { .. } => {
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
            sregs.cr3 = PML4;
            sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
            sregs.efer = EFER_LME | EFER_LMA | EFER_SCE;
        }
        EntryMode::Pvh32 { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// General registers for the entry mode.
pub fn boot_regs(mode: EntryMode) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        ..Default::default()
    };
    match mode {
        EntryMode::Long64 { entry, zero_page } => {
            regs.rip = entry;
            regs.rsi = zero_page;
        }
        EntryMode::Pvh32 { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
    }
    regs
}

/// x87/SSE state after reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_is_long_mode() {
        let s = segment(SEL_CODE64, boot_gdt()[1]);
        assert_eq!((s.l, s.db, s.type_, s.present, s.g), (1, 0, 0xb, 1, 1));
        assert_eq!(s.limit, 0xffff_ffff);
    }

    #[test]
    fn data_segment_is_flat_writable() {
        let s = segment(SEL_DATA, boot_gdt()[2]);
        assert_eq!(
            (s.base, s.limit, s.type_, s.db, s.s),
            (0, 0xffff_ffff, 3, 1, 1)
        );
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = crate::memory::create_ram(8).unwrap();
        write_boot_tables(&mem).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PD + 8 * 3)).unwrap();
        assert_eq!(pde, (3 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT);
    }
}
