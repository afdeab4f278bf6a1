//! Shared test data: proptest strategies and a small fixed log.
#![allow(dead_code)] // each test binary uses a different part

use ftlog::{
    CpuidEntry, DigestKind, EndReason, EntryKind, ExecBackend, ExecPoint, LogEntry, LogHeader,
    LogWriter, OutputStream,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Every entry kind, one each; `kind_index` keeps this list complete.
pub fn one_of_each_kind() -> Vec<EntryKind> {
    let kinds = vec![
        EntryKind::IrqRaise { irq: 0 },
        EntryKind::Inject { vector: 0x20 },
        EntryKind::PortIn {
            port: 0x3f8,
            data: vec![0x41],
        },
        EntryKind::MmioRead {
            addr: 0xfee0_0000,
            data: vec![1, 2, 3, 4],
        },
        EntryKind::MsrRead {
            index: 0x10,
            data: 1234u64.to_le_bytes().to_vec(),
        },
        EntryKind::ClockRead {
            port: 0x510,
            data: vec![9; 8],
        },
        EntryKind::EntropyRead {
            port: 0x518,
            data: vec![7; 8],
        },
        EntryKind::SerialInput {
            bytes: b"ls\n".to_vec(),
        },
        EntryKind::RxFrame {
            queue: 1,
            bytes: vec![0xff; 60],
        },
        EntryKind::DeviceCompletion {
            device: 2,
            data: vec![],
        },
        EntryKind::Digest { value: [0xab; 32] },
        EntryKind::SnapshotMarker {
            id: 3,
            digest: [0xcd; 32],
        },
        EntryKind::End {
            reason: EndReason::PowerOff { code: 0 },
        },
        EntryKind::Output {
            stream: OutputStream::Console,
            position: 1234,
            len: 1,
            hash: [0x5a; 8],
        },
    ];
    let mut seen: Vec<usize> = kinds.iter().map(kind_index).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, (0..KIND_COUNT).collect::<Vec<_>>());
    kinds
}

/// Number of `EntryKind` variants.
pub const KIND_COUNT: usize = 14;

/// A distinct number per variant; the exhaustive match fails to compile
/// when a variant is added, pointing here.
pub fn kind_index(k: &EntryKind) -> usize {
    match k {
        EntryKind::IrqRaise { .. } => 0,
        EntryKind::Inject { .. } => 1,
        EntryKind::PortIn { .. } => 2,
        EntryKind::MmioRead { .. } => 3,
        EntryKind::MsrRead { .. } => 4,
        EntryKind::ClockRead { .. } => 5,
        EntryKind::EntropyRead { .. } => 6,
        EntryKind::SerialInput { .. } => 7,
        EntryKind::RxFrame { .. } => 8,
        EntryKind::DeviceCompletion { .. } => 9,
        EntryKind::Digest { .. } => 10,
        EntryKind::SnapshotMarker { .. } => 11,
        EntryKind::End { .. } => 12,
        EntryKind::Output { .. } => 13,
    }
}

pub fn header() -> LogHeader {
    LogHeader {
        backend: ExecBackend::Exits,
        image_digest: [0x11; 32],
        mem_mib: 128,
        cmdline: "console=ttyS0".into(),
        state_digest: DigestKind::Blake3RegsPageTree,
        digest_interval_ms: Some(1000),
        net_mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        cpuid: vec![
            CpuidEntry {
                function: 0,
                index: 0,
                flags: 0,
                eax: 0xd,
                ebx: 0x756e_6547,
                ecx: 0x6c65_746e,
                edx: 0x4965_6e69,
            },
            CpuidEntry {
                function: 7,
                index: 0,
                flags: 1,
                eax: 0,
                ebx: 0x029c_67af,
                ecx: 0,
                edx: 0,
            },
        ],
        initrd_digest: Some([0x22; 32]),
    }
}

/// Entries numbered from 0 with non-decreasing counts.
pub fn number(kinds: Vec<(u64, u64, u64, EntryKind)>) -> Vec<LogEntry> {
    let mut count = 0u64;
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, (step, rip, rcx, kind))| {
            count = count.saturating_add(step);
            LogEntry {
                seq: i as u64,
                point: ExecPoint { count, rip, rcx },
                kind,
            }
        })
        .collect()
}

/// A whole log as bytes.
pub fn write_log(header: &LogHeader, entries: &[LogEntry]) -> Vec<u8> {
    let mut w = LogWriter::new(Vec::new(), header).unwrap();
    for e in entries {
        w.append(e).unwrap();
    }
    w.into_inner().unwrap()
}

/// A small log with one entry of each kind.
pub fn small_log() -> (Vec<LogEntry>, Vec<u8>) {
    let entries = number(
        one_of_each_kind()
            .into_iter()
            .enumerate()
            .map(|(i, k)| (i as u64 % 2, 0x1000 + i as u64, 0, k))
            .collect(),
    );
    let bytes = write_log(&header(), &entries);
    (entries, bytes)
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

pub fn point() -> impl Strategy<Value = ExecPoint> {
    (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(count, rip, rcx)| ExecPoint {
        count,
        rip,
        rcx,
    })
}

pub fn end_reason() -> impl Strategy<Value = EndReason> {
    prop_oneof![
        any::<u8>().prop_map(|code| EndReason::PowerOff { code }),
        Just(EndReason::Halted),
        Just(EndReason::Shutdown),
        Just(EndReason::Stopped),
        Just(EndReason::GoLive),
    ]
}

pub fn entry_kind() -> impl Strategy<Value = EntryKind> {
    prop_oneof![
        any::<u8>().prop_map(|irq| EntryKind::IrqRaise { irq }),
        any::<u8>().prop_map(|vector| EntryKind::Inject { vector }),
        (any::<u16>(), bytes(8)).prop_map(|(port, data)| EntryKind::PortIn { port, data }),
        (any::<u64>(), bytes(8)).prop_map(|(addr, data)| EntryKind::MmioRead { addr, data }),
        (any::<u32>(), bytes(8)).prop_map(|(index, data)| EntryKind::MsrRead { index, data }),
        (any::<u16>(), bytes(8)).prop_map(|(port, data)| EntryKind::ClockRead { port, data }),
        (any::<u16>(), bytes(8)).prop_map(|(port, data)| EntryKind::EntropyRead { port, data }),
        bytes(64).prop_map(|bytes| EntryKind::SerialInput { bytes }),
        (any::<u16>(), bytes(1600)).prop_map(|(queue, bytes)| EntryKind::RxFrame { queue, bytes }),
        (any::<u16>(), bytes(64))
            .prop_map(|(device, data)| EntryKind::DeviceCompletion { device, data }),
        any::<[u8; 32]>().prop_map(|value| EntryKind::Digest { value }),
        (any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(id, digest)| EntryKind::SnapshotMarker { id, digest }),
        end_reason().prop_map(|reason| EntryKind::End { reason }),
        (
            output_stream(),
            any::<u64>(),
            any::<u32>(),
            any::<[u8; 8]>()
        )
            .prop_map(|(stream, position, len, hash)| EntryKind::Output {
                stream,
                position,
                len,
                hash
            }),
    ]
}

pub fn output_stream() -> impl Strategy<Value = OutputStream> {
    prop_oneof![Just(OutputStream::Console), Just(OutputStream::Net)]
}

pub fn cpuid_entry() -> impl Strategy<Value = CpuidEntry> {
    any::<[u32; 7]>().prop_map(|[function, index, flags, eax, ebx, ecx, edx]| CpuidEntry {
        function,
        index,
        flags,
        eax,
        ebx,
        ecx,
        edx,
    })
}

pub fn entry() -> impl Strategy<Value = LogEntry> {
    (any::<u64>(), point(), entry_kind()).prop_map(|(seq, point, kind)| LogEntry {
        seq,
        point,
        kind,
    })
}

pub fn backend() -> impl Strategy<Value = ExecBackend> {
    prop_oneof![
        Just(ExecBackend::Pmu),
        Just(ExecBackend::Singlestep),
        Just(ExecBackend::Exits),
    ]
}

pub fn log_header() -> impl Strategy<Value = LogHeader> {
    (
        backend(),
        any::<[u8; 32]>(),
        any::<u32>(),
        ".{0,80}",
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<[u8; 6]>()),
        prop_oneof![
            Just(DigestKind::Blake3RegsRam),
            Just(DigestKind::Blake3RegsPageTree)
        ],
        vec(cpuid_entry(), 0..40),
        proptest::option::of(any::<[u8; 32]>()),
    )
        .prop_map(
            |(
                backend,
                image_digest,
                mem_mib,
                cmdline,
                digest_interval_ms,
                net_mac,
                state_digest,
                cpuid,
                initrd_digest,
            )| LogHeader {
                backend,
                image_digest,
                mem_mib,
                cmdline,
                state_digest,
                digest_interval_ms,
                net_mac,
                cpuid,
                initrd_digest,
            },
        )
}

/// A valid log's entries: seq from 0, counts non-decreasing.
pub fn entries(max: usize) -> impl Strategy<Value = Vec<LogEntry>> {
    vec((0u64..3, any::<u64>(), any::<u64>(), entry_kind()), 0..max).prop_map(number)
}
