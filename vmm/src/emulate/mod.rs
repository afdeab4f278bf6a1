//! Instructions the host's KVM cannot emulate, emulated by the VMM.
//!
//! On a host whose KVM runs guest CPL0 code in its instruction emulator
//! (kvm_pvm), a few instructions that emulator does not implement (CLAC,
//! STAC, the XSAVE family, POPCNT, FWAIT, INT3 outside real mode) come back
//! as `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_EMULATION`, with the
//! instruction bytes. The run loop hands that exit here: the instruction is
//! decoded ([`decode`]), its operand reached through the guest's page
//! tables ([`paging`]), executed ([`insn`], [`xsave`], [`fxsave`]) on the
//! vCPU's registers and extended state, and RIP advanced, or an exception
//! queued for the guest exactly as the processor would raise it
//! ([`fault`]). On a host whose KVM handles these instructions this code is
//! never reached.
//!
//! These exits are not execution points (docs/replay.md): whether KVM's
//! emulator gives up on an instruction is a property of the host, not of
//! the guest, and it is not even stable from run to run, so the recorder and
//! the replayer must see the same points whichever way each instruction
//! went. The run loop therefore neither counts these exits nor stops at
//! them; while single-stepping, an emulated instruction ends in the step a
//! KVM-executed one would have produced.

pub mod cpu;
pub mod decode;
pub mod fault;
pub mod features;
pub mod fxsave;
pub mod insn;
pub mod paging;
pub mod stats;
pub mod xsave;
pub mod xstate;

use kvm_bindings::{
    kvm_xsave, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};

use self::cpu::{Cpu, Stop};
use self::decode::{DecodeError, MAX_LEN};
use self::fault::Exception;
use self::features::Features;
use self::insn::Completion;
use self::paging::Access;
use self::xstate::FpuState;
use crate::machine::Machine;
use crate::{Error, Result};

pub use self::decode::InsnBytes;
pub use self::insn::Mnemonic;
pub use self::stats::EmulationStats;

/// Why the VMM cannot emulate an instruction it recognised (or could not
/// even read): a limit of the emulator, reported as a VMM error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    /// 5-level paging.
    #[error("5-level paging (CR4.LA57) is not supported by the instruction emulator")]
    La57,
    /// Protection keys.
    #[error("protection keys (CR4.PKE) are not supported by the instruction emulator")]
    ProtectionKeys,
    /// Outside 64-bit mode.
    #[error("the instruction emulator works in 64-bit mode only")]
    NotLongMode,
    /// A page table or operand outside guest RAM (MMIO).
    #[error("guest-physical address {0:#x} is not RAM")]
    OutsideRam(u64),
    /// Internal: the extended state was not loaded for an instruction that
    /// needs it.
    #[error("internal: extended state not loaded")]
    StateNotLoaded,
    /// KVM_GET_XSAVE gave an area smaller than XCR0's components need.
    #[error("the XSAVE area from KVM is smaller than XCR0 requires")]
    ShortXsave,
}

/// How an emulated instruction ended for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulated {
    /// It retired (RIP advanced), perhaps with a trap queued after it.
    Retired,
    /// It raised an exception; RIP still names it.
    Faulted,
}

/// What the emulator keeps per VM.
#[derive(Debug)]
pub(crate) struct EmuState {
    features: Option<Features>,
    /// KVM_CAP_EXCEPTION_PAYLOAD is enabled on this VM.
    payload: bool,
    /// Bytes of the KVM_GET_XSAVE2 area (4096 where there is no XSAVE2).
    xsave_size: usize,
    pub(crate) stats: EmulationStats,
}

impl EmuState {
    /// Set up for a new VM: enable exception payloads where KVM has them
    /// (KVM then writes CR2 as it delivers a #PF) and size the XSAVE area.
    pub(crate) fn new(vm: &VmFd) -> Self {
        let payload =
            vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_EXCEPTION_PAYLOAD)) > 0 && {
                let cap = kvm_bindings::kvm_enable_cap {
                    cap: kvm_bindings::KVM_CAP_EXCEPTION_PAYLOAD,
                    args: [1, 0, 0, 0],
                    ..Default::default()
                };
                vm.enable_cap(&cap).is_ok()
            };
        let xsave_size = usize::try_from(vm.check_extension_int(Cap::Xsave2))
            .unwrap_or(0)
            .max(std::mem::size_of::<kvm_xsave>());
        EmuState {
            features: None,
            payload,
            xsave_size,
            stats: EmulationStats::default(),
        }
    }
}

/// The instruction bytes KVM reported with an emulation failure, or an
/// error for every other kind of internal error.
fn failure_bytes(vcpu: &mut VcpuFd) -> Result<Vec<u8>> {
    let run = vcpu.get_kvm_run();
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, whose union members
    // `internal` and `emulation_failure` share the suberror/ndata header;
    // `emulation_failure` is only read further when the suberror says so.
    let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
    if ef.suberror != KVM_INTERNAL_ERROR_EMULATION {
        // SAFETY: as above; `internal` is the member for other suberrors.
        let int = unsafe { run.__bindgen_anon_1.internal };
        let n = (int.ndata as usize).min(int.data.len());
        return Err(Error::GuestFault(format!(
            "KVM internal error, suberror {}, data {:x?}",
            int.suberror,
            &int.data[..n]
        )));
    }
    // ndata counts the u64 words after it: flags, then 16 bytes of size and bytes.
    if ef.ndata < 3
        || ef.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0
    {
        return Ok(Vec::new());
    }
    // SAFETY: the flag says the instruction-bytes member is filled in.
    let b = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
    let n = usize::from(b.insn_size).min(b.insn_bytes.len());
    Ok(b.insn_bytes[..n].to_vec())
}

fn read_fpu(vcpu: &VcpuFd, size: usize) -> Result<FpuState> {
    let xcrs = vcpu.get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))?;
    let n = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
    let xcr0 = xcrs.xcrs[..n]
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(xstate::X87, |x| x.value);
    let words: Vec<u32> = if size <= std::mem::size_of::<kvm_xsave>() {
        vcpu.get_xsave()
            .map_err(Error::kvm("KVM_GET_XSAVE"))?
            .region
            .to_vec()
    } else {
        let mut x = xsave2_buffer(size)?;
        // SAFETY: `x` holds `size` bytes, the size KVM_CAP_XSAVE2 reported.
        unsafe { vcpu.get_xsave2(&mut x) }.map_err(Error::kvm("KVM_GET_XSAVE2"))?;
        let mut w = x.as_fam_struct_ref().xsave.region.to_vec();
        w.extend_from_slice(x.as_slice());
        w
    };
    let area = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    Ok(FpuState { area, xcr0 })
}

fn xsave2_buffer(size: usize) -> Result<kvm_bindings::Xsave> {
    let extra = (size - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
    kvm_bindings::Xsave::new(extra).map_err(|e| Error::GuestFault(format!("XSAVE2 buffer: {e:?}")))
}

fn write_fpu(vcpu: &VcpuFd, f: &FpuState, size: usize) -> Result<()> {
    let words: Vec<u32> = f
        .area
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if size <= std::mem::size_of::<kvm_xsave>() {
        let mut x = kvm_xsave::default();
        let n = x.region.len().min(words.len());
        x.region[..n].copy_from_slice(&words[..n]);
        // SAFETY: a plain 4096-byte kvm_xsave, and KVM_CAP_XSAVE2 (if any)
        // said the state fits in it, so KVM reads nothing beyond it.
        return unsafe { vcpu.set_xsave(&x) }.map_err(Error::kvm("KVM_SET_XSAVE"));
    }
    let mut x = xsave2_buffer(size)?;
    let base = x.as_fam_struct_ref().xsave.region.len();
    // SAFETY: we only write POD words into the wrapper's own storage.
    unsafe {
        x.as_mut_fam_struct()
            .xsave
            .region
            .copy_from_slice(&words[..base]);
    }
    let rest = x.as_mut_slice();
    let n = rest.len().min(words.len().saturating_sub(base));
    rest[..n].copy_from_slice(&words[base..base + n]);
    // SAFETY: the buffer holds the size KVM_CAP_XSAVE2 reported.
    unsafe { vcpu.set_xsave2(&x) }.map_err(Error::kvm("KVM_SET_XSAVE2"))
}

impl Machine {
    /// Emulate the instruction KVM just failed to emulate. Not an execution
    /// point: nothing here touches the point counter or the observer.
    pub(crate) fn emulate_failed_instruction(&mut self) -> Result<Emulated> {
        let mut bytes = failure_bytes(&mut self.vcpu)?;
        // KVM says an interrupt could be injected now only without an
        // interrupt shadow: then there is none to end (one ioctl saved).
        let no_shadow = self.vcpu.get_kvm_run().ready_for_interrupt_injection != 0;
        let regs = self.vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        let sregs = self.vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        if self.emu.features.is_none() {
            let cpuid = self
                .vcpu
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(Error::kvm("KVM_GET_CPUID2"))?;
            self.emu.features = Some(Features::from_cpuid(cpuid.as_slice()));
        }
        let features = self.emu.features.clone().unwrap_or_else(|| unreachable!());
        let mem = self.memory().clone();
        let mut cpu = Cpu::new(regs, sregs, &mem, &features);
        let cannot = |bytes: &[u8], reason| Error::CannotEmulate {
            rip: regs.rip,
            bytes: InsnBytes(bytes.to_vec()),
            reason,
        };
        if !cpu.long_mode() {
            return Err(cannot(&bytes, Unsupported::NotLongMode));
        }
        let decoded = loop {
            match decode::decode(&bytes) {
                Ok(d) => break d,
                Err(DecodeError::Truncated) if bytes.len() < MAX_LEN => {
                    match fetch(&cpu, &mut bytes) {
                        Ok(()) => {}
                        Err(Stop::Fault(e)) => return self.deliver(e, None),
                        Err(Stop::Unsupported(u)) => return Err(cannot(&bytes, u)),
                    }
                }
                Err(_) => {
                    return Err(Error::UnknownInstruction {
                        rip: regs.rip,
                        bytes: InsnBytes(bytes),
                    })
                }
            }
        };
        bytes.truncate(decoded.len);
        let Some(m) = insn::identify(&decoded) else {
            return Err(Error::UnknownInstruction {
                rip: regs.rip,
                bytes: InsnBytes(bytes),
            });
        };
        if m == Mnemonic::Clac && crate::quirks::complete_broken_syscall(&self.vcpu, &mut cpu)? {
            return self.finish_syscall_fixup(&cpu);
        }
        if m.needs_fpu() {
            cpu.fpu = Some(read_fpu(&self.vcpu, self.emu.xsave_size)?);
            let need = features
                .xstate
                .standard_size(cpu.fpu.as_ref().map_or(0, |f| f.xcr0));
            if cpu.fpu.as_ref().is_some_and(|f| f.area.len() < need) {
                return Err(cannot(&bytes, Unsupported::ShortXsave));
            }
        }
        match insn::execute(&mut cpu, &decoded, m) {
            Ok(done) => {
                self.emu.stats.count(m);
                if cpu.fpu_dirty {
                    if let Some(f) = &cpu.fpu {
                        write_fpu(&self.vcpu, f, self.emu.xsave_size)?;
                    }
                }
                self.vcpu
                    .set_regs(&cpu.regs)
                    .map_err(Error::kvm("KVM_SET_REGS"))?;
                if !no_shadow {
                    fault::end_interrupt_shadow(&self.vcpu)?;
                }
                self.forget_point();
                tracing::trace!(
                    insn = m.name(),
                    rip = format_args!("{:#x}", regs.rip),
                    "emulated"
                );
                match done {
                    Completion::Retired => Ok(Emulated::Retired),
                    Completion::Trap(e) => self.deliver(e, Some(Emulated::Retired)),
                }
            }
            Err(Stop::Fault(e)) => {
                self.emu.stats.count(m);
                self.deliver(e, None)
            }
            Err(Stop::Unsupported(u)) => Err(cannot(&bytes, u)),
        }
    }

    /// Queue `e` for the guest; `after` is what the instruction did first.
    fn deliver(&mut self, e: Exception, after: Option<Emulated>) -> Result<Emulated> {
        if !e.is_trap() {
            self.emu.stats.count_fault();
        }
        tracing::debug!(?e, "emulated instruction raised an exception");
        fault::inject(&self.vcpu, e, self.emu.payload)?;
        Ok(after.unwrap_or(Emulated::Faulted))
    }

    fn finish_syscall_fixup(&mut self, cpu: &Cpu<'_>) -> Result<Emulated> {
        self.vcpu
            .set_sregs(&cpu.sregs)
            .map_err(Error::kvm("KVM_SET_SREGS"))?;
        self.vcpu
            .set_regs(&cpu.regs)
            .map_err(Error::kvm("KVM_SET_REGS"))?;
        self.emu.stats.count_syscall_fixup();
        self.forget_point();
        Ok(Emulated::Retired)
    }

    /// What the VMM emulated so far.
    pub fn emulation_stats(&self) -> &EmulationStats {
        &self.emu.stats
    }
}

/// Read more instruction bytes at RIP (the bytes KVM gave, if any, were too
/// few): an instruction fetch at the current privilege level, stopping at
/// the first page that cannot be fetched.
fn fetch(cpu: &Cpu<'_>, bytes: &mut Vec<u8>) -> cpu::Step<()> {
    let acc = Access {
        fetch: true,
        user: cpu.cpl() == 3,
        ..Default::default()
    };
    let at = cpu.regs.rip.wrapping_add(bytes.len() as u64);
    // Up to the end of the page, then one more page if still short.
    let in_page = (4096 - (at & 0xfff)) as usize;
    let n = (MAX_LEN - bytes.len()).min(in_page);
    let mut buf = vec![0u8; n];
    cpu.read_as(at, &mut buf, acc)?;
    bytes.extend_from_slice(&buf);
    Ok(())
}
