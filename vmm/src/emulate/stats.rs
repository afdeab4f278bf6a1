//! How many instructions of each kind the VMM emulated, and how many of
//! them ended in an exception for the guest.

use std::fmt;

use super::insn::Mnemonic;

/// Counts per instruction. Statistics only: not part of a snapshot, and not
/// guest-visible.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmulationStats {
    counts: [u64; Mnemonic::ALL.len()],
    faults: u64,
    syscall_fixups: u64,
}

fn index(m: Mnemonic) -> usize {
    Mnemonic::ALL.iter().position(|&x| x == m).unwrap_or(0)
}

impl EmulationStats {
    /// One `m` emulated.
    pub(crate) fn count(&mut self, m: Mnemonic) {
        self.counts[index(m)] += 1;
    }

    /// One emulated instruction raised an exception in the guest.
    pub(crate) fn count_fault(&mut self) {
        self.faults += 1;
    }

    /// One broken SYSCALL turned into a real one (see `crate::quirks`).
    pub(crate) fn count_syscall_fixup(&mut self) {
        self.syscall_fixups += 1;
    }

    /// How many `m` were emulated.
    pub fn get(&self, m: Mnemonic) -> u64 {
        self.counts[index(m)]
    }

    /// Every instruction emulated at least once, with its count.
    pub fn iter(&self) -> impl Iterator<Item = (Mnemonic, u64)> + '_ {
        Mnemonic::ALL
            .iter()
            .map(|&m| (m, self.get(m)))
            .filter(|&(_, n)| n > 0)
    }

    /// All emulated instructions.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Emulated instructions that raised an exception (#PF, #GP, ...).
    pub fn faults(&self) -> u64 {
        self.faults
    }

    /// SYSCALLs from CPL3 completed by the host-quirk workaround.
    pub fn syscall_fixups(&self) -> u64 {
        self.syscall_fixups
    }
}

/// `clac 15041, stac 2728, ... (faults 3)`, or `none`.
impl fmt::Display for EmulationStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total() == 0 && self.syscall_fixups == 0 {
            return f.write_str("none");
        }
        let mut first = true;
        for (m, n) in self.iter() {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{} {n}", m.name())?;
        }
        if self.faults > 0 {
            write!(f, " (faults {})", self.faults)?;
        }
        if self.syscall_fixups > 0 {
            if !first {
                f.write_str(", ")?;
            }
            write!(f, "syscall fix-ups {}", self.syscall_fixups)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_display() {
        let mut s = EmulationStats::default();
        assert_eq!(s.to_string(), "none");
        s.count(Mnemonic::Clac);
        s.count(Mnemonic::Clac);
        s.count(Mnemonic::Xsavec64);
        s.count_fault();
        assert_eq!(s.get(Mnemonic::Clac), 2);
        assert_eq!(s.total(), 3);
        assert_eq!(s.to_string(), "clac 2, xsavec64 1 (faults 1)");
    }
}
