//! The vCPU state one emulated instruction works on: registers, special
//! registers, the x87/SSE/extended state when the instruction needs it, and
//! guest memory reached through linear addresses (effective address,
//! FS/GS base, canonical check, page walk).

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::decode::{MemOperand, Seg};
use super::fault::Exception;
use super::features::Features;
use super::paging::{self, Access, PagingRegs, WalkError};
use super::xstate::FpuState;
use super::Unsupported;
use crate::memory::GuestRam;

/// RFLAGS bits the emulator uses.
pub mod rflags {
    /// Carry.
    pub const CF: u64 = 1 << 0;
    /// Parity.
    pub const PF: u64 = 1 << 2;
    /// Adjust.
    pub const AF: u64 = 1 << 4;
    /// Zero.
    pub const ZF: u64 = 1 << 6;
    /// Sign.
    pub const SF: u64 = 1 << 7;
    /// Trap (single step).
    pub const TF: u64 = 1 << 8;
    /// Overflow.
    pub const OF: u64 = 1 << 11;
    /// Resume.
    pub const RF: u64 = 1 << 16;
    /// Alignment check / SMAP override.
    pub const AC: u64 = 1 << 18;
}

/// CR0 bits.
pub mod cr0 {
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// x87 emulation.
    pub const EM: u64 = 1 << 2;
    /// Task switched.
    pub const TS: u64 = 1 << 3;
    /// Numeric error reporting.
    pub const NE: u64 = 1 << 5;
}

/// CR4 bits.
pub mod cr4 {
    /// FXSAVE/FXRSTOR and SSE enabled.
    pub const OSFXSR: u64 = 1 << 9;
    /// XSAVE and XCR0 enabled.
    pub const OSXSAVE: u64 = 1 << 18;
}

/// Why an instruction stopped before completing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The guest gets this exception.
    Fault(Exception),
    /// The VMM cannot emulate this.
    Unsupported(Unsupported),
}

impl From<Exception> for Stop {
    fn from(e: Exception) -> Self {
        Stop::Fault(e)
    }
}

impl From<Unsupported> for Stop {
    fn from(u: Unsupported) -> Self {
        Stop::Unsupported(u)
    }
}

impl From<WalkError> for Stop {
    fn from(w: WalkError) -> Self {
        match w {
            WalkError::Fault(e) => Stop::Fault(e),
            WalkError::Unsupported(u) => Stop::Unsupported(u),
        }
    }
}

/// Result of one step of emulation.
pub type Step<T> = std::result::Result<T, Stop>;

/// The state an instruction runs against.
pub struct Cpu<'a> {
    /// General registers; RIP is the instruction's own until it completes.
    pub regs: kvm_regs,
    /// Special registers (read only for the emulator).
    pub sregs: kvm_sregs,
    /// Extended state, loaded when the instruction needs it.
    pub fpu: Option<FpuState>,
    /// Whether `fpu` changed and must go back to KVM.
    pub fpu_dirty: bool,
    /// Guest RAM.
    pub mem: &'a GuestRam,
    /// What the guest's CPUID offers.
    pub features: &'a Features,
}

impl<'a> Cpu<'a> {
    /// State for one instruction.
    pub fn new(
        regs: kvm_regs,
        sregs: kvm_sregs,
        mem: &'a GuestRam,
        features: &'a Features,
    ) -> Self {
        Cpu {
            regs,
            sregs,
            fpu: None,
            fpu_dirty: false,
            mem,
            features,
        }
    }

    /// Current privilege level.
    pub fn cpl(&self) -> u8 {
        self.sregs.cs.selector as u8 & 3
    }

    /// Whether the vCPU is in 64-bit mode (EFER.LMA and CS.L).
    pub fn long_mode(&self) -> bool {
        self.sregs.efer & (1 << 10) != 0 && self.sregs.cs.l == 1
    }

    /// The paging registers.
    pub fn paging(&self) -> PagingRegs {
        PagingRegs::from_sregs(&self.sregs, self.features.maxphyaddr)
    }

    /// The extended state (the caller loaded it).
    pub fn fpu(&mut self) -> Step<&mut FpuState> {
        self.fpu
            .as_mut()
            .ok_or(Stop::Unsupported(Unsupported::StateNotLoaded))
    }

    /// General register `n` (0 = RAX .. 15 = R15), all 64 bits.
    pub fn reg(&self, n: u8) -> u64 {
        let r = &self.regs;
        [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ][usize::from(n & 15)]
    }

    /// Write register `n` with an operand of `size` bytes, as the processor
    /// does: 4-byte writes zero the upper half, 2- and 1-byte writes keep it.
    pub fn set_reg(&mut self, n: u8, size: usize, v: u64) {
        let old = self.reg(n);
        let new = match size {
            8 => v,
            4 => v & 0xffff_ffff,
            2 => (old & !0xffff) | (v & 0xffff),
            _ => (old & !0xff) | (v & 0xff),
        };
        let r = &mut self.regs;
        let slot = match n & 15 {
            0 => &mut r.rax,
            1 => &mut r.rcx,
            2 => &mut r.rdx,
            3 => &mut r.rbx,
            4 => &mut r.rsp,
            5 => &mut r.rbp,
            6 => &mut r.rsi,
            7 => &mut r.rdi,
            8 => &mut r.r8,
            9 => &mut r.r9,
            10 => &mut r.r10,
            11 => &mut r.r11,
            12 => &mut r.r12,
            13 => &mut r.r13,
            14 => &mut r.r14,
            _ => &mut r.r15,
        };
        *slot = new;
    }

    /// EDX:EAX, the instruction mask of the XSAVE family.
    pub fn edx_eax(&self) -> u64 {
        (self.regs.rdx << 32) | (self.regs.rax & 0xffff_ffff)
    }

    /// The linear address of a memory operand of an instruction `len` bytes
    /// long, checked to be canonical over `size` bytes.
    pub fn linear(&self, m: &MemOperand, len: usize, size: usize) -> Step<u64> {
        let mut ea = m.disp as u64;
        if m.rip_relative {
            ea = ea.wrapping_add(self.regs.rip.wrapping_add(len as u64));
        }
        if let Some(b) = m.base {
            ea = ea.wrapping_add(self.reg(b));
        }
        if let Some((i, s)) = m.index {
            ea = ea.wrapping_add(self.reg(i).wrapping_mul(u64::from(s)));
        }
        if m.addr32 {
            ea &= 0xffff_ffff;
        }
        // In 64-bit mode only FS and GS have a base.
        let base = match m.seg {
            Some(Seg::Fs) => self.sregs.fs.base,
            Some(Seg::Gs) => self.sregs.gs.base,
            _ => 0,
        };
        let la = ea.wrapping_add(base);
        let last = la.wrapping_add(size.saturating_sub(1) as u64);
        if !canonical(la) || !canonical(last) {
            return Err(if m.stack_based() {
                Exception::StackFault(0)
            } else {
                Exception::gp0()
            }
            .into());
        }
        Ok(la)
    }

    /// An explicit data access at the current privilege level.
    pub fn data_access(&self, write: bool) -> Access {
        Access {
            write,
            user: self.cpl() == 3,
            ac: self.regs.rflags & rflags::AC != 0,
            ..Default::default()
        }
    }

    /// Read `buf.len()` bytes at linear `la` (explicit data read).
    pub fn read(&self, la: u64, buf: &mut [u8]) -> Step<()> {
        self.read_as(la, buf, self.data_access(false))
    }

    /// Read with a given kind of access (instruction fetch, implicit).
    pub fn read_as(&self, la: u64, buf: &mut [u8], acc: Access) -> Step<()> {
        let pieces = paging::translate_range(self.mem, &self.paging(), la, buf.len(), acc)?;
        let mut done = 0;
        for (t, n) in pieces {
            self.mem
                .read_slice(&mut buf[done..done + n], GuestAddress(t.gpa))
                .map_err(|_| Unsupported::OutsideRam(t.gpa))?;
            paging::mark_used(self.mem, &t)?;
            done += n;
        }
        Ok(())
    }

    /// A little-endian value of `size` bytes (1, 2, 4, 8) at `la`.
    pub fn read_uint(&self, la: u64, size: usize) -> Step<u64> {
        let mut b = [0u8; 8];
        self.read(la, &mut b[..size])?;
        Ok(u64::from_le_bytes(b))
    }

    /// Write every `(offset, bytes)` piece relative to `base`, all or
    /// nothing: every page is checked, lowest address first (so a #PF names
    /// the lowest byte that cannot be written), before anything is written.
    pub fn write_pieces(&self, base: u64, pieces: &[(usize, Vec<u8>)]) -> Step<()> {
        let acc = self.data_access(true);
        let pg = self.paging();
        let mut sorted: Vec<&(usize, Vec<u8>)> = pieces.iter().collect();
        sorted.sort_by_key(|(off, _)| *off);
        let mut plan = Vec::new();
        for (off, bytes) in sorted {
            let la = base.wrapping_add(*off as u64);
            plan.push((
                paging::translate_range(self.mem, &pg, la, bytes.len(), acc)?,
                bytes,
            ));
        }
        for (trs, bytes) in plan {
            let mut done = 0;
            for (t, n) in trs {
                self.mem
                    .write_slice(&bytes[done..done + n], GuestAddress(t.gpa))
                    .map_err(|_| Unsupported::OutsideRam(t.gpa))?;
                paging::mark_used(self.mem, &t)?;
                done += n;
            }
        }
        Ok(())
    }
}

/// Whether bits 63:47 of `la` are all equal (4-level paging).
pub fn canonical(la: u64) -> bool {
    ((la as i64) << 16 >> 16) as u64 == la
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::decode::decode;

    fn features() -> Features {
        Features::for_tests()
    }

    #[test]
    fn effective_addresses_with_sib_rip_and_fs_gs() {
        let mem = crate::memory::create_ram(4).unwrap();
        let f = features();
        let mut c = Cpu::new(Default::default(), Default::default(), &mem, &f);
        c.regs.rip = 0x1000;
        c.regs.r12 = 0x10_0000;
        c.regs.r13 = 3;
        c.sregs.fs.base = 0x7000_0000;
        c.sregs.gs.base = 0xffff_8880_0000_0000;
        // xrstor64 [r12 + r13*8 - 0x100]
        let d = decode(&[0x4b, 0x0f, 0xae, 0xac, 0xec, 0x00, 0xff, 0xff, 0xff]).unwrap();
        assert_eq!(
            c.linear(&d.mem.unwrap(), d.len, 8).unwrap(),
            0x10_0000 + 24 - 0x100
        );
        // xsaveopt gs:[rip + 0x10]: next RIP + 0x10 + GS base.
        let d = decode(&[0x65, 0x0f, 0xae, 0x35, 0x10, 0, 0, 0]).unwrap();
        assert_eq!(
            c.linear(&d.mem.unwrap(), d.len, 8).unwrap(),
            0xffff_8880_0000_0000 + 0x1008 + 0x10
        );
        // popcnt rax, fs:[rbx]
        c.regs.rbx = 0x40;
        let d = decode(&[0x64, 0xf3, 0x48, 0x0f, 0xb8, 0x03]).unwrap();
        assert_eq!(c.linear(&d.mem.unwrap(), d.len, 8).unwrap(), 0x7000_0040);
        // 67: 32-bit address arithmetic wraps.
        c.regs.rbp = 0x1_0000_0004;
        let d = decode(&[0x67, 0x0f, 0xae, 0x65, 0xf8]).unwrap();
        assert_eq!(c.linear(&d.mem.unwrap(), d.len, 8).unwrap(), 0xffff_fffc);
    }

    #[test]
    fn non_canonical_is_gp_or_ss() {
        let mem = crate::memory::create_ram(4).unwrap();
        let f = features();
        let mut c = Cpu::new(Default::default(), Default::default(), &mem, &f);
        c.regs.rdi = 0x0000_8000_0000_0000;
        let d = decode(&[0x48, 0x0f, 0xae, 0x27]).unwrap(); // xsave64 [rdi]
        assert_eq!(
            c.linear(&d.mem.unwrap(), d.len, 8),
            Err(Stop::Fault(Exception::gp0()))
        );
        c.regs.rsp = 0x0000_8000_0000_0000;
        let d = decode(&[0x48, 0x0f, 0xae, 0x04, 0x24]).unwrap(); // fxsave64 [rsp]
        assert_eq!(
            c.linear(&d.mem.unwrap(), d.len, 8),
            Err(Stop::Fault(Exception::StackFault(0)))
        );
        // The last byte crossing into non-canonical space counts too.
        c.regs.rdi = 0x0000_7fff_ffff_fff0;
        let d = decode(&[0x48, 0x0f, 0xae, 0x27]).unwrap();
        assert!(c.linear(&d.mem.unwrap(), d.len, 0x20).is_err());
    }

    #[test]
    fn register_writes_by_size() {
        let mem = crate::memory::create_ram(4).unwrap();
        let f = features();
        let mut c = Cpu::new(Default::default(), Default::default(), &mem, &f);
        c.regs.r9 = u64::MAX;
        c.set_reg(9, 2, 0x1234);
        assert_eq!(c.regs.r9, 0xffff_ffff_ffff_1234);
        c.set_reg(9, 4, 0x1234);
        assert_eq!(c.regs.r9, 0x1234);
        c.set_reg(0, 8, 7);
        assert_eq!(c.reg(0), 7);
    }
}
