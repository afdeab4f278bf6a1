//! Host quirks the VMM works around. There is one: on kvm_pvm, SYSCALL from
//! CPL3 is broken.
//!
//! # The quirk
//!
//! Measured with `tests/guests/syscall_probe.s`: SYSCALL executed at CPL3
//! saves RIP in RCX and RFLAGS in R11, masks RFLAGS with SFMASK and jumps
//! to LSTAR, but leaves CS, SS and the privilege level alone. The first
//! fetch at LSTAR (a supervisor page in any real kernel) then takes a #PF
//! at CPL3: error code P|U (fetch), CR2 = RIP = LSTAR, the user CS/SS and
//! RSP in the frame, RFLAGS = R11 & !SFMASK (plus RF).
//!
//! # The workaround
//!
//! That #PF is delivered through the guest's IDT to its page-fault handler
//! at CPL0. A Linux guest with SMAP begins that handler with CLAC, which
//! this host's KVM cannot emulate, so the VMM sees the handler's very first
//! instruction ([`crate::emulate`]). There, if the exception frame is
//! exactly what a broken SYSCALL leaves (below), the VMM completes the
//! SYSCALL as the processor should have: CS = STAR[47:32], SS = CS + 8
//! (flat, DPL0), RIP = LSTAR, RFLAGS = R11 & !SFMASK, RSP = the user RSP
//! from the frame; RCX and R11 already hold what SYSCALL put there. The
//! guest continues at its SYSCALL entry at CPL0, as if nothing had
//! happened. The frame must show: vector 14's handler at RIP, CPL0, a
//! CPL3 CS in the frame, RIP = CR2 = LSTAR, a user fetch error code, and
//! RFLAGS equal to R11 & !SFMASK with RF.
//!
//! # Limits
//!
//! - It works only if the guest's page-fault handler starts with an
//!   instruction that always exits to the VMM here (CLAC under SMAP, as in
//!   Linux). A guest without SMAP (or `nosmap`, or a CPU model without it)
//!   sees SYSCALL fail with a user #PF at LSTAR.
//! - CR2 keeps LSTAR, the value the spurious #PF wrote; the value before
//!   the SYSCALL is lost (Linux reads CR2 only at #PF entry).
//! - The spurious exception frame stays written below the TSS RSP0 stack
//!   top (memory the guest considers free).
//! - A user program that itself jumps to the address in LSTAR with
//!   R11 == its RFLAGS minus SFMASK would be mistaken for a SYSCALL; with
//!   Linux's SFMASK (which clears IF) that needs IF=0 at CPL3, which a user
//!   program cannot have.
//!
//! The workaround runs only where the probe shows the quirk: a tiny guest
//! ([`syscall_probe_guest`]) that makes a SYSCALL from CPL3, run once per
//! process on its own thread, the first time a frame that looks like a
//! broken SYSCALL is seen (so a host without the quirk, or a guest that
//! never gets there, never pays for it). [`syscall_stays_at_cpl3`] runs it
//! on demand.

mod syscall_probe_guest;

use std::sync::OnceLock;

use kvm_bindings::{kvm_msr_entry, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;

use crate::emulate::cpu::{rflags, Cpu, Stop};
use crate::emulate::paging::Access;
use crate::{Error, Result};

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SFMASK: u32 = 0xc000_0084;
const PF_VECTOR: u64 = 14;
/// #PF error-code bits of a user instruction fetch from a present page
/// (P|U, with I/D when NX or SMEP is on).
const PF_USER_FETCH: [u64; 4] = [0x4, 0x5, 0x14, 0x15];

static SYSCALL_QUIRK: OnceLock<bool> = OnceLock::new();

/// Whether SYSCALL from CPL3 stays at CPL3 on this host (kvm_pvm). Runs
/// the probe guest once per process; later calls return the cached answer.
pub fn syscall_stays_at_cpl3() -> bool {
    *SYSCALL_QUIRK.get_or_init(|| match probe() {
        Ok(q) => {
            tracing::info!(
                quirk = q,
                "SYSCALL probe: SYSCALL from CPL3 {}",
                if q {
                    "stays at CPL3 (working around it)"
                } else {
                    "works"
                }
            );
            q
        }
        Err(e) => {
            tracing::warn!("SYSCALL probe failed ({e}); assuming SYSCALL works");
            false
        }
    })
}

/// Run the probe guest on a thread of its own (a VM binds its thread for
/// kicks, and the caller may be another VM's vCPU thread).
fn probe() -> Result<bool> {
    let worker = std::thread::Builder::new()
        .name("syscall-probe".into())
        .spawn(|| -> Result<crate::RunEnd> {
            let image = crate::loader::minimal_elf(syscall_probe_guest::SYSCALL_PROBE, None);
            let cfg = crate::MachineConfig::new(8, "", Box::new(std::io::sink()));
            let mut m = crate::Machine::new(cfg, &image)?;
            m.run(&mut crate::Live)
        })
        .map_err(|source| Error::Host {
            what: "starting the SYSCALL probe thread",
            source,
        })?;
    let end = worker
        .join()
        .map_err(|_| Error::GuestFault("the SYSCALL probe panicked".into()))??;
    match end {
        crate::RunEnd::PowerOff(1) => Ok(true),
        crate::RunEnd::PowerOff(2) => Ok(false),
        other => Err(Error::GuestFault(format!(
            "SYSCALL probe ended unexpectedly: {other:?}"
        ))),
    }
}

fn msrs(vcpu: &VcpuFd) -> Result<[u64; 3]> {
    let idx = [MSR_STAR, MSR_LSTAR, MSR_SFMASK];
    let entries: Vec<kvm_msr_entry> = idx
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut m =
        Msrs::from_entries(&entries).map_err(|e| Error::GuestFault(format!("MSR list: {e:?}")))?;
    let n = vcpu.get_msrs(&mut m).map_err(Error::kvm("KVM_GET_MSRS"))?;
    if n != idx.len() {
        return Err(Error::GuestFault(
            "KVM_GET_MSRS: STAR/LSTAR/SFMASK missing".into(),
        ));
    }
    let s = m.as_slice();
    Ok([s[0].data, s[1].data, s[2].data])
}

/// A flat 64-bit code (or data) segment at DPL0.
fn flat(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// At a CLAC the VMM is about to emulate: if it is the first instruction
/// of the page-fault handler entered by a broken SYSCALL, complete the
/// SYSCALL instead (the CLAC is then not executed: the handler never
/// ran). Returns whether it did.
pub(crate) fn complete_broken_syscall(vcpu: &VcpuFd, cpu: &mut Cpu<'_>) -> Result<bool> {
    if cpu.cpl() != 0 {
        return Ok(false);
    }
    let Some(frame) = pf_frame(cpu) else {
        return Ok(false);
    };
    let [error, rip, cs, rfl, rsp] = frame;
    if cs & 3 != 3 || rip != cpu.sregs.cr2 || !PF_USER_FETCH.contains(&error) {
        return Ok(false);
    }
    let [star, lstar, sfmask] = msrs(vcpu)?;
    let r11 = cpu.regs.r11;
    if rip != lstar || rfl & !rflags::RF != r11 & !sfmask & !rflags::RF {
        return Ok(false);
    }
    if !syscall_stays_at_cpl3() {
        return Ok(false);
    }
    let kcs = ((star >> 32) & 0xfffc) as u16;
    cpu.sregs.cs = flat(kcs, true);
    cpu.sregs.ss = flat(kcs + 8, false);
    cpu.regs.rip = lstar;
    cpu.regs.rflags = (r11 & !sfmask & !rflags::RF) | 0x2;
    cpu.regs.rsp = rsp;
    tracing::trace!(
        lstar = format_args!("{lstar:#x}"),
        rcx = format_args!("{:#x}", cpu.regs.rcx),
        "broken SYSCALL completed"
    );
    Ok(true)
}

/// If RIP is the entry of vector 14 and the stack holds its frame:
/// error code, RIP, CS, RFLAGS, RSP.
fn pf_frame(cpu: &Cpu<'_>) -> Option<[u64; 5]> {
    let implicit = Access {
        implicit: true,
        ..Default::default()
    };
    let mut gate = [0u8; 16];
    let at = cpu.sregs.idt.base.wrapping_add(PF_VECTOR * 16);
    if u64::from(cpu.sregs.idt.limit) < PF_VECTOR * 16 + 15 {
        return None;
    }
    cpu.read_as(at, &mut gate, implicit).ok()?;
    let w = |b: &[u8]| b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x));
    let handler = w(&gate[0..2]) | (w(&gate[6..8]) << 16) | (w(&gate[8..12]) << 32);
    if handler != cpu.regs.rip {
        return None;
    }
    let mut f = [0u8; 40];
    let read: std::result::Result<(), Stop> = cpu.read_as(cpu.regs.rsp, &mut f, implicit);
    read.ok()?;
    let q = |i: usize| w(&f[8 * i..8 * i + 8]);
    Some([q(0), q(1), q(2), q(3), q(4)])
}
