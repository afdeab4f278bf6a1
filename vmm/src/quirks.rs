//! Host quirks (placeholder).

use crate::emulate::cpu::Cpu;
use crate::Result;

/// Complete a broken SYSCALL, if this CLAC is where one lands.
pub(crate) fn complete_broken_syscall(_cpu: &mut Cpu<'_>) -> Result<bool> {
    Ok(false)
}
