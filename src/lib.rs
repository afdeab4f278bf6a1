//! ftvmm: fault-tolerant virtual machines on KVM.
//!
//! The binary's pieces live here so integration tests and benches can use
//! them: the bundled guest image and the console plumbing.

pub mod arbiter;
pub mod backup;
pub mod config;
pub mod console;
pub mod demo;
pub mod demo_net;
pub mod ft_options;
pub mod generation;
pub mod go_live;
pub mod guest;
pub mod heartbeat;
pub mod join;
pub mod net;
pub mod netns;
pub mod output;
pub mod pair;
pub mod primary;
pub mod release;
pub mod rr;
pub mod status;
pub mod testkit;
pub mod throttle;
