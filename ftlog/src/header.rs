//! The log header: what a replayer must know before the first entry.

use serde::{Deserialize, Serialize};

use crate::ExecBackend;

/// Describes the recorded session. It is the first frame of every log.
///
/// The format version is not here: it sits in the stream preamble, where a
/// reader can check it before decoding anything (see [`crate::codec`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHeader {
    /// What the entries' [`crate::ExecPoint::count`] counts.
    pub backend: ExecBackend,
    /// Hash of the guest kernel image the recording booted (32 bytes; ftvmm
    /// uses BLAKE3). A replayer refuses to start on another image.
    pub image_digest: [u8; 32],
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// The guest kernel command line.
    pub cmdline: String,
    /// What [`crate::EntryKind::Digest`] values are a hash of.
    pub state_digest: DigestKind,
    /// Host milliseconds between the primary's periodic state digests;
    /// None if only the final one is logged. Informational: a replayer
    /// checks digests wherever the log has them.
    pub digest_interval_ms: Option<u64>,
    /// The MAC address of the guest's network device, None if it has none
    /// (format version 2). The backup builds the same device from it.
    pub net_mac: Option<[u8; 6]>,
    /// The CPUID table the primary's guest sees (format version 3). A
    /// backup gives its guest the same table, or refuses to start when its
    /// host cannot provide a feature in it.
    pub cpuid: Vec<CpuidEntry>,
    /// Hash of the initrd the recording booted with (BLAKE3, like
    /// `image_digest`), None without one (format version 5). A replayer
    /// refuses to start with another initrd, or without it.
    pub initrd_digest: Option<[u8; 32]>,
}

/// One CPUID leaf as the guest sees it (the fields of KVM's
/// `kvm_cpuid_entry2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// EAX on input: the leaf.
    pub function: u32,
    /// ECX on input: the subleaf (meaningful when `flags` says so).
    pub index: u32,
    /// KVM's flags (`KVM_CPUID_FLAG_SIGNIFCANT_INDEX`, ...).
    pub flags: u32,
    /// EAX on output.
    pub eax: u32,
    /// EBX on output.
    pub ebx: u32,
    /// ECX on output.
    pub ecx: u32,
    /// EDX on output.
    pub edx: u32,
}

/// How state digests are computed, so a replayer can refuse a log whose
/// digests it cannot reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DigestKind {
    /// BLAKE3 over RAX..R15, RIP, RFLAGS, CR0, CR2, CR3, CR4 and EFER (each
    /// as a little-endian u64, in that order), then all of guest RAM by
    /// ascending guest-physical address (format version 2).
    Blake3RegsRam,
    /// BLAKE3 over the same registers, then the RAM size in 4 KiB pages (a
    /// little-endian u64), then one hash per group of 512 pages, each the
    /// BLAKE3 of its pages' XXH3-128 hashes (16 bytes little-endian each) in
    /// address order (the last group may be shorter). Computed incrementally from the pages written since
    /// the previous digest; the value depends only on the state (format
    /// version 3, docs/log-format.md).
    Blake3RegsPageTree,
}
