//! The bundled test guest: a small `no_std` kernel (`guest/`) that `build.rs`
//! builds with a nested cargo. It runs a hash-chain workload at CPL3, takes
//! PIT ticks and serial input and prints a digest of where every interrupt
//! landed; see docs/guest.md for its command line and output.

/// The guest's ELF image (64-bit, loaded at 1 MiB).
pub const GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ftvmm-guest.elf"));
