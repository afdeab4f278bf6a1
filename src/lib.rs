//! ftvmm: fault-tolerant virtual machines on KVM.
//!
//! The binary's pieces live here so integration tests and benches can use
//! them: the bundled guest image and the console plumbing.

pub mod arbiter;
pub mod config;
pub mod console;
pub mod demo_net;
pub mod guest;
pub mod heartbeat;
pub mod net;
pub mod netns;
pub mod roles;
pub mod rr;
pub mod status;
pub mod testkit;
