//! The guest's network: a virtio-net device (virtio-mmio transport), its TAP
//! backend, and the output gate that enforces the output rule for every
//! output to the outside world (network frames and console bytes).

mod error;
pub mod gate;
pub mod tap;
pub mod virtio_net;

pub use error::{parse_mac, NetError};
pub use gate::{OutputGate, Released, Tag};
pub use tap::{announce_frame, Tap};
pub use virtio_net::VirtioNet;

/// The guest's MAC address unless `--mac` says otherwise.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
