//! The ftvmm VMM: one KVM VM with one vCPU, guest RAM, a kernel loader,
//! userspace devices (no in-kernel irqchip, PIT or LAPIC, so every interrupt
//! is delivered when the VMM decides), a run loop that reports every exit to
//! an observer, and whole-VM snapshots.

pub mod arch;
pub mod clock;
pub mod devices;
pub mod digest;
pub mod dirty;
pub mod emulate;
mod error;
pub mod inputs;
pub mod kick;
pub mod link;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod output;
pub mod pmu;
pub mod points;
pub mod quirks;
pub mod rdtsc;
pub mod record;
pub mod replay;
pub mod run;
pub mod snapshot;

pub use error::{Error, Result};
pub use machine::{Machine, MachineConfig};
pub use run::{Access, Flow, Live, Observer, RunEnd};
pub use snapshot::VmSnapshot;
