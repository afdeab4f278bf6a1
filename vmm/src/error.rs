//! The `vmm` crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while building, running or restoring a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available here, and may this user open /dev/kvm?)")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// The host KVM lacks a capability ftvmm relies on.
    #[error("this host's KVM lacks {0}, which ftvmm needs")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM call {op} failed: {source}")]
    Kvm {
        /// Which call.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The configured guest memory is too small.
    #[error("guest memory of {got_mib} MiB is too small: ftvmm needs at least {min_mib} MiB")]
    MemoryTooSmall {
        /// What was asked for.
        got_mib: u64,
        /// The minimum.
        min_mib: u64,
    },
    /// The configured guest memory is too large.
    #[error("guest memory of {got_mib} MiB is too large: at most {max_mib} MiB is supported")]
    MemoryTooLarge {
        /// What was asked for.
        got_mib: u64,
        /// The maximum.
        max_mib: u64,
    },
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The kernel file could not be read.
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is not something we can boot.
    #[error("cannot load kernel: {0}")]
    KernelFormat(String),
    /// The initrd cannot be loaded.
    #[error("cannot load the initrd: {0}")]
    Initrd(String),
    /// The command line is not acceptable.
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    /// A snapshot could not be taken or restored.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The guest did something the VMM cannot continue from.
    #[error("guest stopped the VM: {0}")]
    GuestFault(String),
    /// An I/O error on a host resource (signals, threads).
    #[error("{what}: {source}")]
    Host {
        /// What we were doing.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The chosen execution-point backend cannot run here.
    #[error("execution-point backend unavailable: {0}")]
    Backend(String),
    /// A replay left the recorded execution.
    #[error("replay diverged: {0}")]
    Divergence(String),
    /// The log could not be read or written.
    #[error("log: {0}")]
    Log(#[from] ftlog::LogError),
    /// The guest CPUID a log asks for is one this host cannot give.
    #[error(
        "this host cannot give the guest the log's CPUID: leaf {leaf:#x}.{subleaf} {register} {detail} \
         (a backup needs a CPU with at least the primary's features)"
    )]
    CpuidUnsupported {
        /// The leaf (EAX on input).
        leaf: u32,
        /// The subleaf (ECX on input).
        subleaf: u32,
        /// EAX, EBX, ECX or EDX.
        register: &'static str,
        /// Which bits or values, and their names.
        detail: String,
    },
    /// A CPUID table could not be built.
    #[error("CPUID table: {0}")]
    Cpuid(String),
    /// The guest executed an instruction that neither KVM nor the VMM's
    /// instruction emulator implements.
    #[error("guest instruction at RIP {rip:#x} cannot be emulated (bytes {bytes}): neither KVM nor ftvmm's emulator knows it")]
    UnknownInstruction {
        /// Where.
        rip: u64,
        /// Its bytes (as many as KVM gave or the VMM could read).
        bytes: crate::emulate::InsnBytes,
    },
    /// The VMM's instruction emulator knows the instruction but not the
    /// situation it was executed in.
    #[error("guest instruction at RIP {rip:#x} (bytes {bytes}) cannot be emulated: {reason}")]
    CannotEmulate {
        /// Where.
        rip: u64,
        /// Its bytes.
        bytes: crate::emulate::InsnBytes,
        /// What the emulator lacks.
        reason: crate::emulate::Unsupported,
    },
    /// The exit observer stopped the run with an error of its own.
    #[error("{0}")]
    Observer(String),
}

impl Error {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}

/// Result alias for the crate.
pub type Result<T> = std::result::Result<T, Error>;
