//! Log entries: one non-deterministic event each, at an execution point.

use serde::{Deserialize, Serialize};

use crate::ExecPoint;

/// One logged event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Position in the log: 0 for the first entry, then +1 each.
    pub seq: u64,
    /// Where in the guest's instruction stream it happened.
    pub point: ExecPoint,
    /// What happened.
    pub kind: EntryKind,
}

/// What a [`LogEntry`] records.
///
/// The variant order is part of the wire format: add new variants at the
/// end, and bump [`crate::codec::FORMAT_VERSION`] (see docs/log-format.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// An interrupt request line was raised at this point (timer tick,
    /// serial receive): an asynchronous input.
    IrqRaise {
        /// The IRQ line (0-15 on the PIC pair).
        irq: u8,
    },
    /// The VMM injected this vector at this point. Not an input: the
    /// replayer checks that it injects the same vector at the same point.
    Inject {
        /// The interrupt vector.
        vector: u8,
    },
    /// A port read whose value depends on the host.
    PortIn {
        /// The I/O port.
        port: u16,
        /// The bytes the guest received.
        data: Vec<u8>,
    },
    /// An MMIO read whose value depends on the host.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// The bytes the guest received.
        data: Vec<u8>,
    },
    /// A read of a filtered MSR (the TSC and friends).
    MsrRead {
        /// The MSR index.
        index: u32,
        /// The value the guest received, little-endian.
        data: Vec<u8>,
    },
    /// A read of the paravirtual clock device.
    ClockRead {
        /// The I/O port.
        port: u16,
        /// The bytes the guest received.
        data: Vec<u8>,
    },
    /// A read of the paravirtual entropy source.
    EntropyRead {
        /// The I/O port.
        port: u16,
        /// The bytes the guest received.
        data: Vec<u8>,
    },
    /// Bytes from the host that arrived at the UART at this point.
    SerialInput {
        /// The bytes, in arrival order.
        bytes: Vec<u8>,
    },
    /// A network frame received at this point.
    RxFrame {
        /// The receive queue.
        queue: u16,
        /// The whole frame.
        bytes: Vec<u8>,
    },
    /// An asynchronous device operation completed at this point.
    DeviceCompletion {
        /// Which device (numbering is the VMM's).
        device: u16,
        /// Device-specific completion data.
        data: Vec<u8>,
    },
    /// A state digest the replayer must reproduce here; what it covers is
    /// named by [`crate::LogHeader::state_digest`].
    Digest {
        /// The digest.
        value: [u8; 32],
    },
    /// The primary took a snapshot at this point; a backup may start from
    /// it instead of from boot.
    SnapshotMarker {
        /// The snapshot's identifier.
        id: u64,
        /// The state digest at the snapshot.
        digest: [u8; 32],
    },
    /// The log ends here.
    End {
        /// Why.
        reason: EndReason,
    },
    /// The guest sent an output to the outside world at this point (console
    /// bytes, a network frame): the output rule's entry (format version 3).
    /// Not an input: the replayer checks that its guest sends the same
    /// output here. The primary releases the output only once the backup
    /// has acknowledged this entry, and a backup going live replays through
    /// every one it has.
    Output {
        /// Where it went.
        stream: OutputStream,
        /// Console: the stream offset of its first byte (bytes since boot);
        /// network: the frame's index since boot (0 for the first).
        position: u64,
        /// Its length in bytes.
        len: u32,
        /// The first 8 bytes of the BLAKE3 hash of its bytes.
        hash: [u8; 8],
    },
}

/// Which output stream an [`EntryKind::Output`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutputStream {
    /// The serial console (COM1), a byte stream addressed by offset.
    Console,
    /// The network device, a sequence of frames.
    Net,
}

/// Why a log ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// The guest powered off with this exit code.
    PowerOff {
        /// The code the guest wrote to the power port.
        code: u8,
    },
    /// The guest halted with interrupts disabled: it can never run again.
    Halted,
    /// The guest triple-faulted or asked for a reset.
    Shutdown,
    /// The recorder was stopped (by the operator, or on a pause).
    Stopped,
    /// The backup went live here: the primary was declared dead.
    GoLive,
}

impl EntryKind {
    /// A short, stable name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::IrqRaise { .. } => "irq-raise",
            EntryKind::Inject { .. } => "inject",
            EntryKind::PortIn { .. } => "port-in",
            EntryKind::MmioRead { .. } => "mmio-read",
            EntryKind::MsrRead { .. } => "msr-read",
            EntryKind::ClockRead { .. } => "clock-read",
            EntryKind::EntropyRead { .. } => "entropy-read",
            EntryKind::SerialInput { .. } => "serial-input",
            EntryKind::RxFrame { .. } => "rx-frame",
            EntryKind::DeviceCompletion { .. } => "device-completion",
            EntryKind::Digest { .. } => "digest",
            EntryKind::SnapshotMarker { .. } => "snapshot-marker",
            EntryKind::End { .. } => "end",
            EntryKind::Output { .. } => "output",
        }
    }

    /// The host values a device access took in (port, MMIO, MSR, clock,
    /// entropy: see docs/log-format.md); None for every other kind.
    pub fn read_data(&self) -> Option<&[u8]> {
        match self {
            EntryKind::PortIn { data, .. }
            | EntryKind::MmioRead { data, .. }
            | EntryKind::MsrRead { data, .. }
            | EntryKind::ClockRead { data, .. }
            | EntryKind::EntropyRead { data, .. } => Some(data),
            _ => None,
        }
    }

    /// Whether `self` and `other` are reads of the same kind from the same
    /// port, address or MSR (their data may differ).
    pub fn same_source(&self, other: &EntryKind) -> bool {
        use EntryKind::*;
        match (self, other) {
            (PortIn { port: a, .. }, PortIn { port: b, .. })
            | (ClockRead { port: a, .. }, ClockRead { port: b, .. })
            | (EntropyRead { port: a, .. }, EntropyRead { port: b, .. }) => a == b,
            (MmioRead { addr: a, .. }, MmioRead { addr: b, .. }) => a == b,
            (MsrRead { index: a, .. }, MsrRead { index: b, .. }) => a == b,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_data_is_only_for_guest_reads() {
        let d = vec![1, 2];
        let reads = [
            EntryKind::PortIn {
                port: 1,
                data: d.clone(),
            },
            EntryKind::MmioRead {
                addr: 1,
                data: d.clone(),
            },
            EntryKind::MsrRead {
                index: 1,
                data: d.clone(),
            },
            EntryKind::ClockRead {
                port: 1,
                data: d.clone(),
            },
            EntryKind::EntropyRead {
                port: 1,
                data: d.clone(),
            },
        ];
        for r in &reads {
            assert_eq!(r.read_data(), Some(&d[..]), "{}", r.name());
        }
        let others = [
            EntryKind::SerialInput { bytes: d.clone() },
            EntryKind::RxFrame {
                queue: 0,
                bytes: d.clone(),
            },
            EntryKind::DeviceCompletion {
                device: 0,
                data: d.clone(),
            },
            EntryKind::IrqRaise { irq: 4 },
        ];
        for o in &others {
            assert_eq!(o.read_data(), None, "{}", o.name());
        }
    }

    #[test]
    fn same_source_compares_kind_and_address_not_data() {
        let a = EntryKind::ClockRead {
            port: 0x510,
            data: vec![1],
        };
        assert!(a.same_source(&EntryKind::ClockRead {
            port: 0x510,
            data: vec![9, 9]
        }));
        assert!(!a.same_source(&EntryKind::ClockRead {
            port: 0x511,
            data: vec![1]
        }));
        assert!(!a.same_source(&EntryKind::EntropyRead {
            port: 0x510,
            data: vec![1]
        }));
        assert!(!a.same_source(&EntryKind::PortIn {
            port: 0x510,
            data: vec![1]
        }));
        let m = EntryKind::MsrRead {
            index: 0x10,
            data: vec![],
        };
        assert!(m.same_source(&EntryKind::MsrRead {
            index: 0x10,
            data: vec![1]
        }));
        assert!(!m.same_source(&EntryKind::MsrRead {
            index: 0x11,
            data: vec![]
        }));
        let i = EntryKind::Inject { vector: 0x20 };
        assert!(!i.same_source(&i.clone()), "only reads have a source");
    }
}
