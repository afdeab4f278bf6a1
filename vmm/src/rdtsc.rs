//! RDTSC answered by the VMM at chosen kernel addresses.
//!
//! KVM gives userspace no RDTSC exit, and an x86-64 Linux executes RDTSC in
//! `random_get_entropy()` on every interrupt whatever its configuration
//! (`CONFIG_X86_TSC` is forced on for 64-bit, and that function then reads
//! the TSC unconditionally). Its value lands in the entropy pool, so a
//! backup diverges. Without touching guest code, the VMM sets a hardware
//! instruction breakpoint (one of the four debug registers, through
//! `KVM_SET_GUEST_DEBUG`) on each RDTSC of the functions named in
//! [`KERNEL_FUNCTIONS`], found in the kernel ELF's symbol table; when one is
//! hit, the VMM writes a deterministic time stamp into EDX:EAX and steps
//! over the instruction. The breakpoint fires at a fixed address because
//! of the guest's own instruction, so (unlike an emulated instruction) the
//! exit is an execution point in the `exits` backend: a kernel loop whose
//! only exit it is can take its timer interrupt there (docs/linux.md).

use serde::{Deserialize, Serialize};

/// Debug registers available for instruction breakpoints.
pub const MAX_TRAPS: usize = 4;

/// The functions whose RDTSC instructions are trapped. With the guest's
/// size-optimised configuration `random_get_entropy` is one out-of-line
/// function, and with `clearcpuid=tsc` it is the only RDTSC the kernel
/// reaches (docs/linux.md lists the others and why they are not reached).
pub const KERNEL_FUNCTIONS: &[&str] = &["random_get_entropy"];

/// The traps a VM has and the last value it handed out (part of the
/// run-loop state, so snapshots and a backup going live keep them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdtscTraps {
    /// Guest-virtual addresses of trapped RDTSC instructions.
    pub addrs: Vec<u64>,
    /// The last time stamp given to the guest.
    pub last: u64,
    /// RDTSCs answered so far.
    pub answered: u64,
}

impl RdtscTraps {
    /// The time stamp for the next trapped RDTSC: the latest device time the
    /// guest was given (ns, a TSC "at 1 GHz"), and always more than the
    /// previous one. Both inputs are replayed state, so a backup computes
    /// the same value at the same instruction.
    pub fn next(&mut self, latest_time_ns: u64) -> u64 {
        self.last = latest_time_ns.max(self.last.wrapping_add(1));
        self.answered += 1;
        self.last
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// A section header's fields we use.
struct Section {
    kind: u32,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
    entsize: u64,
}

fn sections(elf: &[u8]) -> Option<Vec<Section>> {
    let shoff = usize::try_from(u64_at(elf, 0x28)?).ok()?;
    let shentsize = usize::from(u16_at(elf, 0x3a)?);
    let shnum = usize::from(u16_at(elf, 0x3c)?);
    (0..shnum)
        .map(|i| {
            let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
            Some(Section {
                kind: u32_at(elf, h + 4)?,
                addr: u64_at(elf, h + 16)?,
                offset: u64_at(elf, h + 24)?,
                size: u64_at(elf, h + 32)?,
                link: u32_at(elf, h + 40)?,
                entsize: u64_at(elf, h + 56)?,
            })
        })
        .collect()
}

fn slice(elf: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(off).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    elf.get(start..end)
}

/// The addresses of RDTSC (`0f 31`) byte pairs in the functions named `functions` of a 64-bit ELF's symbol table, in
/// ascending order. A match that is not an instruction boundary is
/// harmless: an instruction breakpoint there never fires. Empty for an
/// image without a symbol table (a bzImage, a stripped kernel).
pub fn find_in_elf(elf: &[u8], functions: &[&str]) -> Vec<u64> {
    let mut found = find(elf, functions).unwrap_or_default();
    found.sort_unstable();
    found.dedup();
    found
}

fn find(elf: &[u8], functions: &[&str]) -> Option<Vec<u64>> {
    const SHT_SYMTAB: u32 = 2;
    const STT_FUNC: u8 = 2;
    if !elf.starts_with(b"\x7fELF\x02") {
        return None;
    }
    let secs = sections(elf)?;
    let symtab = secs.iter().find(|s| s.kind == SHT_SYMTAB)?;
    let strtab = secs.get(usize::try_from(symtab.link).ok()?)?;
    let strings = slice(elf, strtab.offset, strtab.size)?;
    let syms = slice(elf, symtab.offset, symtab.size)?;
    let entsize = usize::try_from(symtab.entsize).ok().filter(|&e| e >= 24)?;
    let mut out = Vec::new();
    for sym in syms.chunks_exact(entsize) {
        if sym.get(4).map(|i| i & 0xf) != Some(STT_FUNC) {
            continue;
        }
        let name_off = usize::try_from(u32_at(sym, 0)?).ok()?;
        let name = strings.get(name_off..)?.split(|&b| b == 0).next()?;
        if !functions.iter().any(|f| f.as_bytes() == name) {
            continue;
        }
        let (shndx, value, size) = (u16_at(sym, 6)?, u64_at(sym, 8)?, u64_at(sym, 16)?);
        let Some(sec) = secs.get(usize::from(shndx)) else {
            continue;
        };
        let Some(code) = value
            .checked_sub(sec.addr)
            .and_then(|rel| slice(elf, sec.offset.checked_add(rel)?, size))
        else {
            continue;
        };
        for (i, w) in code.windows(2).enumerate() {
            if w == [0x0f, 0x31] {
                out.push(value + i as u64);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_stamps_follow_device_time_and_always_grow() {
        let mut t = RdtscTraps::default();
        assert_eq!(t.next(0), 1);
        assert_eq!(t.next(0), 2);
        assert_eq!(t.next(1000), 1000);
        assert_eq!(t.next(500), 1001);
        assert_eq!(t.answered, 4);
    }

    #[test]
    fn no_symbols_no_traps() {
        let image = crate::loader::minimal_elf(&[0x0f, 0x31, 0xf4], None);
        assert!(find_in_elf(&image, KERNEL_FUNCTIONS).is_empty());
        assert!(find_in_elf(b"not an elf", KERNEL_FUNCTIONS).is_empty());
    }
}
