//! Guest output to the outside world: the output gate that enforces the
//! output rule (and, later, virtio-net with its TAP backend).

pub mod gate;

pub use gate::{OutputGate, Released, Tag};
