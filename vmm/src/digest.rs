//! A digest of guest state (RAM + registers), compared between the primary
//! and its replay to catch divergence.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::machine::Machine;
use crate::{Error, Result};

/// 32-byte BLAKE3 digest of guest state.
pub type StateDigest = [u8; 32];

impl Machine {
    /// Digest of RAM and the general and control registers, taken while the
    /// vCPU is stopped.
    pub fn digest(&mut self) -> Result<StateDigest> {
        let r = self.regs()?;
        let s = self.vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        let mut h = blake3::Hasher::new();
        for v in [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
        ] {
            h.update(&v.to_le_bytes());
        }
        for region in self.memory().iter() {
            let host = self
                .memory()
                .get_host_address(region.start_addr())
                .map_err(|e| Error::Memory(e.to_string()))?;
            let len = region.len() as usize;
            // SAFETY: the region is mapped for `len` bytes for the VM's
            // lifetime, and the only other writer (the vCPU) is stopped
            // while this runs on the vCPU thread.
            let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
            h.update(bytes);
        }
        Ok(*h.finalize().as_bytes())
    }
}

/// BLAKE3 of a kernel image, as a log header records it.
pub fn image_digest(image: &[u8]) -> StateDigest {
    *blake3::hash(image).as_bytes()
}
