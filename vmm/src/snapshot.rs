//! Save and restore of a whole VM at an execution point.
//!
//! A snapshot holds guest RAM, the vCPU (registers, FPU/SSE, MSRs, pending
//! events), every device, the clock and the run-loop state. Restoring it into
//! a fresh VM and running on is indistinguishable from never having stopped.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, Msrs,
};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::msr;
use crate::clock::{Clock, ClockMode};
use crate::devices::{Devices, DevicesState};
use crate::machine::{LoopState, Machine, MachineConfig};
use crate::memory::ram_size;
use crate::{Error, Result};

/// Bumped whenever the layout below changes.
pub const SNAPSHOT_VERSION: u32 = 2;

/// The vCPU's architectural state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Full XSAVE area when KVM offers it.
    pub xsave: Option<kvm_xsave>,
    /// Legacy FPU/SSE state (used when XSAVE is not available).
    pub fpu: FpuState,
    /// Extended control registers.
    pub xcrs: Option<kvm_xcrs>,
    /// Pending exceptions/interrupts/NMIs and interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: Option<kvm_debugregs>,
    /// Running or halted.
    pub mp_state: kvm_mp_state,
    /// Saved MSRs as (index, value).
    pub msrs: Vec<(u32, u64)>,
}

/// `kvm_fpu` as plain fields (kvm-bindings has no serde for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// The raw bytes of `kvm_fpu`.
    #[serde(with = "serde_bytes")]
    pub raw: Vec<u8>,
}

/// A whole VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// [`SNAPSHOT_VERSION`] at the time of writing.
    pub version: u32,
    /// Guest RAM size.
    pub mem_mib: u64,
    /// Guest RAM contents.
    #[serde(with = "serde_bytes")]
    pub memory: Vec<u8>,
    /// The vCPU.
    pub vcpu: VcpuState,
    /// Devices.
    pub devices: DevicesState,
    /// Clock reading at the snapshot.
    pub clock_ns: u64,
    /// Clock mode.
    pub clock: ClockMode,
    /// Run-loop state.
    pub loop_state: LoopState,
}

fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let p = f as *const kvm_fpu as *const u8;
    // SAFETY: kvm_fpu is a plain-old-data C struct; reading its bytes is sound.
    unsafe { std::slice::from_raw_parts(p, std::mem::size_of::<kvm_fpu>()) }.to_vec()
}

fn fpu_from_bytes(b: &[u8]) -> Result<kvm_fpu> {
    if b.len() != std::mem::size_of::<kvm_fpu>() {
        return Err(Error::Snapshot(format!(
            "FPU state is {} bytes, expected {}",
            b.len(),
            std::mem::size_of::<kvm_fpu>()
        )));
    }
    let mut f = kvm_fpu::default();
    // SAFETY: sizes match (checked above) and every bit pattern is a valid kvm_fpu.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), &mut f as *mut kvm_fpu as *mut u8, b.len());
    }
    Ok(f)
}

impl Machine {
    /// Capture the VM. Call only while [`Machine::run`] is not running (after
    /// it returned [`crate::RunEnd::Paused`]): the vCPU is then at a point.
    pub fn snapshot(&mut self) -> Result<VmSnapshot> {
        let mut snap = self.snapshot_state()?;
        snap.memory = vec![0u8; ram_size(self.memory()) as usize];
        self.memory()
            .read_slice(&mut snap.memory, GuestAddress(0))
            .map_err(|e| Error::Snapshot(format!("reading guest memory: {e}")))?;
        Ok(snap)
    }

    /// Capture everything but guest RAM (`memory` is empty): a live
    /// snapshot's last step, whose RAM moved page by page while the guest
    /// ran. Like [`Machine::snapshot`] it finishes the pending I/O
    /// instruction, which may write guest memory: take the last dirty
    /// pages after this. Before [`Machine::restore`], fill `memory`.
    pub fn snapshot_state(&mut self) -> Result<VmSnapshot> {
        // Name the point before finishing the I/O instruction moves RIP.
        self.point()?;
        self.complete_pending_io()?;
        let vcpu = self.save_vcpu()?;
        let memory = Vec::new();
        let now = self.clock.now_ns();
        Ok(VmSnapshot {
            version: SNAPSHOT_VERSION,
            mem_mib: self.mem_mib(),
            memory,
            vcpu,
            devices: self.devices.state(now),
            clock_ns: now,
            clock: self.clock.mode(),
            loop_state: self.ls.clone(),
        })
    }

    /// Build a new VM from `snap`. `cfg` supplies what is not part of the
    /// guest (output sink, point mode, timers, CPUID); its memory size,
    /// command line and clock are ignored in favour of the snapshot's.
    pub fn restore(snap: &VmSnapshot, mut cfg: MachineConfig) -> Result<Self> {
        if snap.version != SNAPSHOT_VERSION {
            return Err(Error::Snapshot(format!(
                "snapshot format version {} is not supported (this build reads version {})",
                snap.version, SNAPSHOT_VERSION
            )));
        }
        if snap.memory.len() as u64 != snap.mem_mib << 20 {
            return Err(Error::Snapshot(format!(
                "memory image is {} bytes but the snapshot says {} MiB",
                snap.memory.len(),
                snap.mem_mib
            )));
        }
        cfg.mem_mib = snap.mem_mib;
        cfg.clock = snap.clock;
        let mut m = Machine::empty(cfg)?;
        m.memory()
            .write_slice(&snap.memory, GuestAddress(0))
            .map_err(|e| Error::Snapshot(format!("writing guest memory: {e}")))?;
        m.restore_vcpu(&snap.vcpu)?;
        m.clock = Clock::new(snap.clock, snap.clock_ns);
        m.devices = Devices::from_state(&snap.devices, snap.clock_ns).map_err(Error::Snapshot)?;
        m.ls = snap.loop_state.clone();
        m.apply_guest_debug()?;
        Ok(m)
    }

    fn save_vcpu(&mut self) -> Result<VcpuState> {
        let v = &self.vcpu;
        let xsave = v.get_xsave().ok();
        let fpu = v.get_fpu().map_err(Error::kvm("KVM_GET_FPU"))?;
        let mut msrs = Msrs::from_entries(
            &msr::SAVED
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|e| Error::Snapshot(format!("MSR list: {e:?}")))?;
        let n = v.get_msrs(&mut msrs).map_err(Error::kvm("KVM_GET_MSRS"))?;
        Ok(VcpuState {
            regs: v.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?,
            sregs: v.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?,
            xsave,
            fpu: FpuState {
                raw: fpu_bytes(&fpu),
            },
            xcrs: v.get_xcrs().ok(),
            events: v
                .get_vcpu_events()
                .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?,
            debugregs: v.get_debug_regs().ok(),
            mp_state: v.get_mp_state().map_err(Error::kvm("KVM_GET_MP_STATE"))?,
            msrs: msrs.as_slice()[..n]
                .iter()
                .map(|e| (e.index, e.data))
                .collect(),
        })
    }

    fn restore_vcpu(&mut self, s: &VcpuState) -> Result<()> {
        let v = &self.vcpu;
        v.set_sregs(&s.sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
        if let Some(x) = &s.xcrs {
            v.set_xcrs(x).map_err(Error::kvm("KVM_SET_XCRS"))?;
        }
        match &s.xsave {
            // SAFETY: the area came from KVM_GET_XSAVE of the same layout.
            Some(x) => unsafe { v.set_xsave(x) }.map_err(Error::kvm("KVM_SET_XSAVE"))?,
            None => v
                .set_fpu(&fpu_from_bytes(&s.fpu.raw)?)
                .map_err(Error::kvm("KVM_SET_FPU"))?,
        }
        v.set_regs(&s.regs).map_err(Error::kvm("KVM_SET_REGS"))?;
        let entries: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::Snapshot(format!("MSR list: {e:?}")))?;
        v.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
        if let Some(d) = &s.debugregs {
            v.set_debug_regs(d)
                .map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
        }
        v.set_mp_state(s.mp_state)
            .map_err(Error::kvm("KVM_SET_MP_STATE"))?;
        v.set_vcpu_events(&s.events)
            .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// The snapshot file format.
const FORMAT: ftlog::blob::BlobFormat = ftlog::blob::BlobFormat {
    kind: "ftvmm snapshot",
    magic: *b"FTVMSNAP",
    version: SNAPSHOT_VERSION,
};

/// Encode a snapshot for a file or the wire.
pub fn encode(snap: &VmSnapshot) -> Result<Vec<u8>> {
    FORMAT
        .encode(snap)
        .map_err(|e| Error::Snapshot(e.to_string()))
}

/// Decode a snapshot, checking magic, version and checksum.
pub fn decode(bytes: &[u8]) -> Result<VmSnapshot> {
    FORMAT
        .decode(bytes)
        .map_err(|e| Error::Snapshot(e.to_string()))
}
