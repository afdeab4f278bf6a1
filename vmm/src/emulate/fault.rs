//! Exceptions an emulated instruction raises, and their delivery to the
//! guest through KVM_SET_VCPU_EVENTS, as the hardware would deliver them.

use kvm_bindings::{kvm_vcpu_events, KVM_VCPUEVENT_VALID_PAYLOAD};
use kvm_ioctls::VcpuFd;

use crate::{Error, Result};

/// #PF error code: the page was present (a protection violation).
pub const PF_PRESENT: u32 = 1 << 0;
/// #PF error code: a write.
pub const PF_WRITE: u32 = 1 << 1;
/// #PF error code: a CPL3 access.
pub const PF_USER: u32 = 1 << 2;
/// #PF error code: a reserved bit was set in a paging-structure entry.
pub const PF_RSVD: u32 = 1 << 3;
/// #PF error code: an instruction fetch.
pub const PF_FETCH: u32 = 1 << 4;

/// An exception for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exception {
    /// #DB as a trap after the instruction (RFLAGS.TF was set): DR6.BS.
    SingleStep,
    /// #BP, a trap: the saved RIP is the next instruction's.
    Breakpoint,
    /// #UD.
    InvalidOpcode,
    /// #NM.
    DeviceNotAvailable,
    /// #SS with an error code.
    StackFault(u32),
    /// #GP with an error code.
    GeneralProtection(u32),
    /// #PF with the faulting linear address (CR2) and error code.
    PageFault {
        /// Linear address that faulted.
        addr: u64,
        /// Error code.
        code: u32,
    },
    /// #MF (x87 floating-point error pending at FWAIT).
    MathFault,
}

/// DR6.BS: the single-step trap bit.
const DR6_BS: u64 = 1 << 14;

impl Exception {
    /// The vector.
    pub fn vector(self) -> u8 {
        match self {
            Exception::SingleStep => 1,
            Exception::Breakpoint => 3,
            Exception::InvalidOpcode => 6,
            Exception::DeviceNotAvailable => 7,
            Exception::StackFault(_) => 12,
            Exception::GeneralProtection(_) => 13,
            Exception::PageFault { .. } => 14,
            Exception::MathFault => 16,
        }
    }

    /// The error code pushed with it, if any.
    pub fn error_code(self) -> Option<u32> {
        match self {
            Exception::StackFault(c) | Exception::GeneralProtection(c) => Some(c),
            Exception::PageFault { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether it is a trap (delivered after the instruction completes, with
    /// RIP past it) rather than a fault (RIP at the instruction).
    pub fn is_trap(self) -> bool {
        matches!(self, Exception::SingleStep | Exception::Breakpoint)
    }

    /// #GP(0).
    pub fn gp0() -> Self {
        Exception::GeneralProtection(0)
    }
}

/// Queue `e` for delivery at the next KVM_RUN. With KVM_CAP_EXCEPTION_PAYLOAD
/// enabled KVM itself writes CR2 (or DR6) as the exception is delivered;
/// without it CR2 is set through the special registers first, as QEMU does.
pub(crate) fn inject(vcpu: &VcpuFd, e: Exception, payload: bool) -> Result<()> {
    let mut ev: kvm_vcpu_events = vcpu
        .get_vcpu_events()
        .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?;
    let extra = match e {
        Exception::PageFault { addr, .. } => Some(addr),
        Exception::SingleStep => Some(DR6_BS),
        _ => None,
    };
    ev.exception.nr = e.vector();
    ev.exception.has_error_code = u8::from(e.error_code().is_some());
    ev.exception.error_code = e.error_code().unwrap_or(0);
    if payload {
        ev.flags |= KVM_VCPUEVENT_VALID_PAYLOAD;
        ev.exception.pending = 1;
        ev.exception.injected = 0;
        ev.exception_has_payload = u8::from(extra.is_some());
        ev.exception_payload = extra.unwrap_or(0);
    } else {
        match e {
            Exception::PageFault { addr, .. } => {
                let mut s = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
                s.cr2 = addr;
                vcpu.set_sregs(&s).map_err(Error::kvm("KVM_SET_SREGS"))?;
            }
            Exception::SingleStep => {
                let mut d = vcpu
                    .get_debug_regs()
                    .map_err(Error::kvm("KVM_GET_DEBUGREGS"))?;
                d.dr6 |= DR6_BS;
                vcpu.set_debug_regs(&d)
                    .map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
            }
            _ => {}
        }
        ev.exception.injected = 1;
        ev.exception.pending = 0;
    }
    vcpu.set_vcpu_events(&ev)
        .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))
}

/// End an interrupt shadow (STI, MOV SS) that covered the instruction just
/// emulated: had KVM executed it, the shadow would be over now.
pub(crate) fn end_interrupt_shadow(vcpu: &VcpuFd) -> Result<()> {
    let mut ev = vcpu
        .get_vcpu_events()
        .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?;
    if ev.interrupt.shadow == 0 {
        return Ok(());
    }
    ev.interrupt.shadow = 0;
    ev.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW;
    vcpu.set_vcpu_events(&ev)
        .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_error_codes_and_kinds() {
        let pf = Exception::PageFault {
            addr: 0x1000,
            code: PF_WRITE,
        };
        assert_eq!((pf.vector(), pf.error_code()), (14, Some(PF_WRITE)));
        assert_eq!(Exception::gp0().error_code(), Some(0));
        assert_eq!(Exception::InvalidOpcode.error_code(), None);
        assert!(Exception::Breakpoint.is_trap());
        assert!(!pf.is_trap());
        assert_eq!(Exception::DeviceNotAvailable.vector(), 7);
    }
}
