//! Address ranges to device ids, for port I/O and MMIO alike.

/// A set of non-overlapping `[base, base + len)` ranges, each naming a device.
#[derive(Debug, Clone, Default)]
pub struct Bus<I: Copy> {
    ranges: Vec<(u64, u64, I)>,
}

/// Two devices claimed overlapping ranges.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps a device already registered")]
pub struct Overlap {
    /// Start of the rejected range.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

impl<I: Copy> Bus<I> {
    /// An empty bus.
    pub fn new() -> Self {
        Bus { ranges: Vec::new() }
    }

    /// Register `id` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, id: I) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        if len == 0 || self.ranges.iter().any(|(b, l, _)| base < b + l && *b < end) {
            return Err(Overlap { base, len });
        }
        let at = self.ranges.partition_point(|(b, _, _)| *b < base);
        self.ranges.insert(at, (base, len, id));
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` within its range.
    pub fn find(&self, addr: u64) -> Option<(I, u64)> {
        let i = self.ranges.partition_point(|(b, _, _)| *b <= addr);
        let (base, len, id) = *self.ranges.get(i.checked_sub(1)?)?;
        (addr - base < len).then_some((id, addr - base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_device_and_offset() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, 'S').unwrap();
        bus.insert(0x20, 2, 'P').unwrap();
        assert_eq!(bus.find(0x3f8), Some(('S', 0)));
        assert_eq!(bus.find(0x3ff), Some(('S', 7)));
        assert_eq!(bus.find(0x400), None);
        assert_eq!(bus.find(0x21), Some(('P', 1)));
        assert_eq!(bus.find(0x1f), None);
        assert_eq!(bus.find(0), None);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x40, 4, 1).unwrap();
        assert!(bus.insert(0x43, 1, 2).is_err());
        assert!(bus.insert(0x3c, 5, 2).is_err());
        assert!(bus.insert(0x50, 0, 2).is_err());
        assert!(bus.insert(u64::MAX, 2, 2).is_err());
        bus.insert(0x44, 1, 3).unwrap();
    }
}
