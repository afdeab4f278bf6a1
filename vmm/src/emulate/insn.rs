//! Which instruction a decoded byte sequence is, what it needs, and what it
//! does: the dispatch to each instruction's semantics, with the #UD / #NM
//! checks that come before any memory access.

use super::cpu::{cr0, cr4, rflags, Cpu, Step};
use super::decode::{Decoded, Map};
use super::fault::Exception;
use super::xsave::SaveForm;
use super::{fxsave, xsave, xstate};

/// The instructions the emulator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mnemonic {
    /// CLAC.
    Clac,
    /// STAC.
    Stac,
    /// XSAVE.
    Xsave,
    /// XSAVE64.
    Xsave64,
    /// XSAVEOPT.
    Xsaveopt,
    /// XSAVEOPT64.
    Xsaveopt64,
    /// XSAVEC.
    Xsavec,
    /// XSAVEC64.
    Xsavec64,
    /// XRSTOR.
    Xrstor,
    /// XRSTOR64.
    Xrstor64,
    /// FXSAVE.
    Fxsave,
    /// FXSAVE64.
    Fxsave64,
    /// FXRSTOR.
    Fxrstor,
    /// FXRSTOR64.
    Fxrstor64,
    /// LDMXCSR.
    Ldmxcsr,
    /// STMXCSR.
    Stmxcsr,
    /// FWAIT.
    Fwait,
    /// POPCNT.
    Popcnt,
    /// INT3.
    Int3,
}

impl Mnemonic {
    /// Every instruction, in a fixed order.
    pub const ALL: [Mnemonic; 19] = [
        Mnemonic::Clac,
        Mnemonic::Stac,
        Mnemonic::Xsave,
        Mnemonic::Xsave64,
        Mnemonic::Xsaveopt,
        Mnemonic::Xsaveopt64,
        Mnemonic::Xsavec,
        Mnemonic::Xsavec64,
        Mnemonic::Xrstor,
        Mnemonic::Xrstor64,
        Mnemonic::Fxsave,
        Mnemonic::Fxsave64,
        Mnemonic::Fxrstor,
        Mnemonic::Fxrstor64,
        Mnemonic::Ldmxcsr,
        Mnemonic::Stmxcsr,
        Mnemonic::Fwait,
        Mnemonic::Popcnt,
        Mnemonic::Int3,
    ];

    /// Lower-case assembler name.
    pub fn name(self) -> &'static str {
        match self {
            Mnemonic::Clac => "clac",
            Mnemonic::Stac => "stac",
            Mnemonic::Xsave => "xsave",
            Mnemonic::Xsave64 => "xsave64",
            Mnemonic::Xsaveopt => "xsaveopt",
            Mnemonic::Xsaveopt64 => "xsaveopt64",
            Mnemonic::Xsavec => "xsavec",
            Mnemonic::Xsavec64 => "xsavec64",
            Mnemonic::Xrstor => "xrstor",
            Mnemonic::Xrstor64 => "xrstor64",
            Mnemonic::Fxsave => "fxsave",
            Mnemonic::Fxsave64 => "fxsave64",
            Mnemonic::Fxrstor => "fxrstor",
            Mnemonic::Fxrstor64 => "fxrstor64",
            Mnemonic::Ldmxcsr => "ldmxcsr",
            Mnemonic::Stmxcsr => "stmxcsr",
            Mnemonic::Fwait => "fwait",
            Mnemonic::Popcnt => "popcnt",
            Mnemonic::Int3 => "int3",
        }
    }

    /// Whether it reads or writes the x87/SSE/extended state.
    pub fn needs_fpu(self) -> bool {
        !matches!(
            self,
            Mnemonic::Clac | Mnemonic::Stac | Mnemonic::Popcnt | Mnemonic::Int3
        )
    }
}

/// Name the instruction, or None if the emulator does not know it.
pub fn identify(d: &Decoded) -> Option<Mnemonic> {
    let w = d.rex_w();
    let pick = |a, b| Some(if w { b } else { a });
    let sse_prefix = d.opsize || d.rep || d.repne;
    match (d.map, d.opcode, d.modrm) {
        (Map::Primary, 0x9b, None) => Some(Mnemonic::Fwait),
        (Map::Primary, 0xcc, None) => Some(Mnemonic::Int3),
        (Map::Secondary, 0x01, Some(m)) if m.md == 3 && m.ext == 1 && !sse_prefix => {
            match m.raw_rm {
                2 => Some(Mnemonic::Clac),
                3 => Some(Mnemonic::Stac),
                _ => None,
            }
        }
        (Map::Secondary, 0xb8, Some(_)) if d.rep && !d.repne => Some(Mnemonic::Popcnt),
        (Map::Secondary, 0xae, Some(m)) if m.md != 3 && !sse_prefix => match m.ext {
            0 => pick(Mnemonic::Fxsave, Mnemonic::Fxsave64),
            1 => pick(Mnemonic::Fxrstor, Mnemonic::Fxrstor64),
            2 => Some(Mnemonic::Ldmxcsr),
            3 => Some(Mnemonic::Stmxcsr),
            4 => pick(Mnemonic::Xsave, Mnemonic::Xsave64),
            5 => pick(Mnemonic::Xrstor, Mnemonic::Xrstor64),
            6 => pick(Mnemonic::Xsaveopt, Mnemonic::Xsaveopt64),
            _ => None,
        },
        (Map::Secondary, 0xc7, Some(m)) if m.md != 3 && m.ext == 4 && !sse_prefix => {
            pick(Mnemonic::Xsavec, Mnemonic::Xsavec64)
        }
        _ => None,
    }
}

/// How an instruction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// It retired; RIP is past it.
    Retired,
    /// It retired and a trap follows (RIP is past it).
    Trap(Exception),
}

/// Execute `m` (decoded as `d`) against `cpu`. On success RIP is advanced;
/// on a fault nothing architectural has changed.
pub fn execute(cpu: &mut Cpu<'_>, d: &Decoded, m: Mnemonic) -> Step<Completion> {
    if d.lock {
        return Err(Exception::InvalidOpcode.into());
    }
    let tf = cpu.regs.rflags & rflags::TF != 0;
    run(cpu, d, m)?;
    cpu.regs.rip = cpu.regs.rip.wrapping_add(d.len as u64);
    cpu.regs.rflags &= !rflags::RF;
    if m == Mnemonic::Int3 {
        return Ok(Completion::Trap(Exception::Breakpoint));
    }
    Ok(if tf {
        Completion::Trap(Exception::SingleStep)
    } else {
        Completion::Retired
    })
}

fn run(cpu: &mut Cpu<'_>, d: &Decoded, m: Mnemonic) -> Step<()> {
    let f = cpu.features;
    let (c0, c4) = (cpu.sregs.cr0, cpu.sregs.cr4);
    let ud = || Err(Exception::InvalidOpcode.into());
    let nm = || Err(Exception::DeviceNotAvailable.into());
    match m {
        Mnemonic::Clac | Mnemonic::Stac => {
            if !f.smap || cpu.cpl() != 0 {
                return ud();
            }
            if m == Mnemonic::Clac {
                cpu.regs.rflags &= !rflags::AC;
            } else {
                cpu.regs.rflags |= rflags::AC;
            }
            Ok(())
        }
        Mnemonic::Popcnt => {
            if !f.popcnt {
                return ud();
            }
            popcnt(cpu, d)
        }
        Mnemonic::Int3 => Ok(()),
        Mnemonic::Fwait => {
            if c0 & cr0::MP != 0 && c0 & cr0::TS != 0 {
                return nm();
            }
            // An unmasked x87 exception pending (FSW.ES) is reported here.
            if cpu.fpu()?.fsw() & 0x80 != 0 && c0 & cr0::NE != 0 {
                return Err(Exception::MathFault.into());
            }
            Ok(())
        }
        Mnemonic::Fxsave | Mnemonic::Fxsave64 | Mnemonic::Fxrstor | Mnemonic::Fxrstor64 => {
            if !f.fxsr {
                return ud();
            }
            if c0 & (cr0::TS | cr0::EM) != 0 {
                return nm();
            }
            let la = operand(cpu, d, 512)?;
            match m {
                Mnemonic::Fxsave => fxsave::fxsave(cpu, la, false),
                Mnemonic::Fxsave64 => fxsave::fxsave(cpu, la, true),
                Mnemonic::Fxrstor => fxsave::fxrstor(cpu, la, false),
                _ => fxsave::fxrstor(cpu, la, true),
            }
        }
        Mnemonic::Ldmxcsr | Mnemonic::Stmxcsr => {
            if c0 & cr0::EM != 0 || c4 & cr4::OSFXSR == 0 {
                return ud();
            }
            if c0 & cr0::TS != 0 {
                return nm();
            }
            let la = operand(cpu, d, 4)?;
            if m == Mnemonic::Ldmxcsr {
                fxsave::ldmxcsr(cpu, la)
            } else {
                fxsave::stmxcsr(cpu, la)
            }
        }
        _ => {
            let offered = match m {
                Mnemonic::Xsaveopt | Mnemonic::Xsaveopt64 => f.xstate.xsaveopt,
                Mnemonic::Xsavec | Mnemonic::Xsavec64 => f.xstate.xsavec,
                _ => true,
            };
            if !f.xsave || !offered || c4 & cr4::OSXSAVE == 0 {
                return ud();
            }
            if c0 & cr0::TS != 0 {
                return nm();
            }
            let la = operand(cpu, d, xstate::EXTENDED)?;
            match m {
                Mnemonic::Xsave | Mnemonic::Xsaveopt => {
                    xsave::save(cpu, la, SaveForm::Standard, false)
                }
                Mnemonic::Xsave64 | Mnemonic::Xsaveopt64 => {
                    xsave::save(cpu, la, SaveForm::Standard, true)
                }
                Mnemonic::Xsavec => xsave::save(cpu, la, SaveForm::Compacted, false),
                Mnemonic::Xsavec64 => xsave::save(cpu, la, SaveForm::Compacted, true),
                Mnemonic::Xrstor => xsave::restore(cpu, la, false),
                _ => xsave::restore(cpu, la, true),
            }
        }
    }
}

/// The linear address of the memory operand (#UD for a register operand),
/// checked canonical over `size` bytes.
fn operand(cpu: &Cpu<'_>, d: &Decoded, size: usize) -> Step<u64> {
    let m = d.mem.ok_or(Exception::InvalidOpcode)?;
    cpu.linear(&m, d.len, size)
}

/// POPCNT r, r/m (16, 32 or 64 bits): ZF when the source is zero, every
/// other arithmetic flag cleared.
fn popcnt(cpu: &mut Cpu<'_>, d: &Decoded) -> Step<()> {
    let m = d.modrm.ok_or(Exception::InvalidOpcode)?;
    let size = if d.rex_w() {
        8
    } else if d.opsize {
        2
    } else {
        4
    };
    let src = match d.mem {
        Some(mem) => {
            let la = cpu.linear(&mem, d.len, size)?;
            cpu.read_uint(la, size)?
        }
        None => cpu.reg(m.rm),
    };
    let src = if size == 8 {
        src
    } else {
        src & ((1u64 << (8 * size)) - 1)
    };
    cpu.set_reg(m.reg, size, u64::from(src.count_ones()));
    let f = &mut cpu.regs.rflags;
    *f &= !(rflags::CF | rflags::PF | rflags::AF | rflags::ZF | rflags::SF | rflags::OF);
    if src == 0 {
        *f |= rflags::ZF;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::cpu::Stop;
    use crate::emulate::decode::decode;
    use crate::emulate::features::Features;
    use crate::emulate::paging::tests::Tables;
    use vm_memory::{Bytes, GuestAddress};

    fn cpu<'a>(t: &'a Tables, f: &'a Features) -> Cpu<'a> {
        t.map4k(16, 16 * 4096, 0x3);
        let mut s = t.sregs();
        s.cr4 |= cr4::OSXSAVE | cr4::OSFXSR;
        let mut c = Cpu::new(Default::default(), s, &t.mem, f);
        c.regs.rip = 0x1000;
        c.regs.rflags = 0x2;
        c
    }

    fn exec(c: &mut Cpu<'_>, bytes: &[u8]) -> Step<Completion> {
        let d = decode(bytes).unwrap();
        let m = identify(&d).expect("known instruction");
        execute(c, &d, m)
    }

    #[test]
    fn identifies_the_emulated_instructions_and_nothing_near_them() {
        let id = |b: &[u8]| identify(&decode(b).unwrap());
        assert_eq!(id(&[0x0f, 0x01, 0xca]), Some(Mnemonic::Clac));
        assert_eq!(id(&[0x0f, 0x01, 0xcb]), Some(Mnemonic::Stac));
        assert_eq!(id(&[0x48, 0x0f, 0xc7, 0x27]), Some(Mnemonic::Xsavec64));
        assert_eq!(id(&[0x48, 0x0f, 0xae, 0x2f]), Some(Mnemonic::Xrstor64));
        assert_eq!(id(&[0x0f, 0xae, 0x37]), Some(Mnemonic::Xsaveopt));
        assert_eq!(id(&[0x48, 0x0f, 0xae, 0x07]), Some(Mnemonic::Fxsave64));
        assert_eq!(id(&[0x0f, 0xae, 0x17]), Some(Mnemonic::Ldmxcsr));
        assert_eq!(id(&[0x9b]), Some(Mnemonic::Fwait));
        assert_eq!(id(&[0xf3, 0x0f, 0xb8, 0xc1]), Some(Mnemonic::Popcnt));
        assert_eq!(id(&[0xcc]), Some(Mnemonic::Int3));
        assert_eq!(id(&[0x0f, 0xae, 0xe8]), None, "lfence");
        assert_eq!(id(&[0x66, 0x0f, 0xae, 0x37]), None, "clwb");
        assert_eq!(id(&[0x0f, 0xb8, 0xc1]), None, "jmpe, not popcnt");
        assert_eq!(id(&[0x0f, 0x01, 0xd0]), None, "xgetbv");
        assert_eq!(id(&[0x0f, 0xc7, 0x2f]), None, "xsaves is not emulated");
    }

    #[test]
    fn clac_stac_flip_ac_and_advance_rip() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = cpu(&t, &f);
        assert_eq!(exec(&mut c, &[0x0f, 0x01, 0xcb]), Ok(Completion::Retired));
        assert_eq!(
            (c.regs.rip, c.regs.rflags & rflags::AC),
            (0x1003, rflags::AC)
        );
        exec(&mut c, &[0x0f, 0x01, 0xca]).unwrap();
        assert_eq!((c.regs.rip, c.regs.rflags & rflags::AC), (0x1006, 0));
        // At CPL3 or without SMAP in CPUID: #UD, RIP unchanged.
        c.sregs.cs.selector = 0x33;
        assert_eq!(
            exec(&mut c, &[0x0f, 0x01, 0xca]),
            Err(Stop::Fault(Exception::InvalidOpcode))
        );
        assert_eq!(c.regs.rip, 0x1006);
        let mut nosmap = Features::for_tests();
        nosmap.smap = false;
        let mut c = cpu(&t, &nosmap);
        assert!(exec(&mut c, &[0x0f, 0x01, 0xcb]).is_err());
        // A LOCK prefix is #UD.
        let mut c = cpu(&t, &f);
        assert!(exec(&mut c, &[0xf0, 0x0f, 0x01, 0xcb]).is_err());
    }

    #[test]
    fn popcnt_counts_at_each_size_and_sets_flags() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = cpu(&t, &f);
        let all = rflags::CF | rflags::PF | rflags::AF | rflags::SF | rflags::OF;
        c.regs.rflags = 0x2 | all;
        c.regs.rcx = 0xf0f0_0000_0000_00ff;
        c.regs.rax = u64::MAX;
        exec(&mut c, &[0xf3, 0x48, 0x0f, 0xb8, 0xc1]).unwrap(); // popcnt rax, rcx
        assert_eq!(c.regs.rax, 16);
        assert_eq!(c.regs.rflags, 0x2, "all arithmetic flags cleared, ZF clear");
        c.regs.rax = u64::MAX;
        exec(&mut c, &[0xf3, 0x0f, 0xb8, 0xc1]).unwrap(); // popcnt eax, ecx
        assert_eq!(c.regs.rax, 8, "32-bit result zero-extends");
        c.regs.rax = u64::MAX;
        exec(&mut c, &[0x66, 0xf3, 0x0f, 0xb8, 0xc1]).unwrap(); // popcnt ax, cx
        assert_eq!(
            c.regs.rax, 0xffff_ffff_ffff_0008,
            "16-bit result keeps the rest"
        );
        c.regs.rcx = 0xffff_ffff_0000_0000;
        exec(&mut c, &[0xf3, 0x0f, 0xb8, 0xc1]).unwrap();
        assert_eq!(c.regs.rax, 0);
        assert_eq!(c.regs.rflags, 0x2 | rflags::ZF);
        // Memory source through the page walk: popcnt r9, [rbx + 8]
        t.mem
            .write_obj(0x8000_0000_0000_0001u64, GuestAddress(16 * 4096 + 8))
            .unwrap();
        c.regs.rbx = 16 * 4096;
        exec(&mut c, &[0xf3, 0x4c, 0x0f, 0xb8, 0x4b, 0x08]).unwrap();
        assert_eq!(c.regs.r9, 2);
        // Unmapped source: #PF, nothing changed.
        c.regs.rbx = 40 * 4096;
        let before = c.regs;
        let e = exec(&mut c, &[0xf3, 0x4c, 0x0f, 0xb8, 0x4b, 0x08]).unwrap_err();
        assert!(matches!(
            e,
            Stop::Fault(Exception::PageFault { addr, code: 0 }) if addr == 40 * 4096 + 8
        ));
        assert_eq!(c.regs, before);
        let mut nopop = Features::for_tests();
        nopop.popcnt = false;
        let mut c = cpu(&t, &nopop);
        assert!(exec(&mut c, &[0xf3, 0x0f, 0xb8, 0xc1]).is_err());
    }

    #[test]
    fn int3_is_a_trap_after_the_instruction_and_tf_gives_a_step_trap() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = cpu(&t, &f);
        assert_eq!(
            exec(&mut c, &[0xcc]),
            Ok(Completion::Trap(Exception::Breakpoint))
        );
        assert_eq!(c.regs.rip, 0x1001);
        c.regs.rflags |= rflags::TF;
        assert_eq!(
            exec(&mut c, &[0x0f, 0x01, 0xcb]),
            Ok(Completion::Trap(Exception::SingleStep))
        );
    }

    #[test]
    fn xsave_family_checks_osxsave_then_ts_before_memory() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = cpu(&t, &f);
        c.regs.rdi = 0x7_0000_0000; // unmapped: a memory access would #PF
        c.sregs.cr4 &= !cr4::OSXSAVE;
        assert_eq!(
            exec(&mut c, &[0x48, 0x0f, 0xae, 0x27]),
            Err(Stop::Fault(Exception::InvalidOpcode))
        );
        c.sregs.cr4 |= cr4::OSXSAVE;
        c.sregs.cr0 |= cr0::TS;
        assert_eq!(
            exec(&mut c, &[0x48, 0x0f, 0xae, 0x27]),
            Err(Stop::Fault(Exception::DeviceNotAvailable))
        );
        assert_eq!(
            exec(&mut c, &[0x48, 0x0f, 0xae, 0x07]),
            Err(Stop::Fault(Exception::DeviceNotAvailable)),
            "fxsave64 with TS"
        );
        // FWAIT: #NM only with MP and TS.
        c.fpu = Some(crate::emulate::xsave::tests::busy_state());
        c.fpu.as_mut().unwrap().area[2] = 0;
        assert_eq!(exec(&mut c, &[0x9b]), Ok(Completion::Retired));
        c.sregs.cr0 |= cr0::MP;
        assert_eq!(
            exec(&mut c, &[0x9b]),
            Err(Stop::Fault(Exception::DeviceNotAvailable))
        );
        c.sregs.cr0 &= !cr0::TS;
        c.sregs.cr0 |= cr0::NE;
        c.fpu.as_mut().unwrap().area[2] = 0x80; // FSW.ES
        assert_eq!(
            exec(&mut c, &[0x9b]),
            Err(Stop::Fault(Exception::MathFault))
        );
        // XSAVEC absent from CPUID: #UD.
        let mut noc = Features::for_tests();
        noc.xstate.xsavec = false;
        let mut c = cpu(&t, &noc);
        assert_eq!(
            exec(&mut c, &[0x48, 0x0f, 0xc7, 0x27]),
            Err(Stop::Fault(Exception::InvalidOpcode))
        );
    }
}
