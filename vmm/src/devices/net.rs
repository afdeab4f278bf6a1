//! The slot for a network device (virtio-net, in the `netdev` crate).
//!
//! The VMM only needs three things from it: MMIO accesses (as any bus
//! device), a way to hand it a received frame while the vCPU is stopped at an
//! execution point, and its state for snapshots. Frames the guest transmits
//! are the access's output ([`DeviceCtx::emit`] on [`crate::output::Stream::Net`]),
//! which the run loop logs and hands to the VM's output sink, in one order
//! with the console.

use serde::{Deserialize, Serialize};

use super::api::{BusDevice, DeviceCtx};

/// Guest-physical base of the network device's MMIO window.
pub const NET_MMIO_BASE: u64 = 0xd000_0000;
/// Size of that window.
pub const NET_MMIO_LEN: u64 = 0x1000;
/// ISA IRQ the network device pulses.
pub const NET_IRQ: u8 = 5;

/// A network device on the MMIO bus.
pub trait NetDevice: BusDevice {
    /// Whether the guest has posted a receive buffer (a frame applied now
    /// would be delivered, not dropped). Reads guest memory: call only at a
    /// point.
    fn can_receive(&mut self) -> bool;
    /// Copy `frame` into the guest's next receive buffer and raise the
    /// interrupt. Returns false if there was no buffer (nothing changed).
    fn receive(&mut self, frame: &[u8], ctx: &mut DeviceCtx) -> bool;
    /// The device's MAC address.
    fn mac(&self) -> [u8; 6];
    /// State for a snapshot.
    fn state(&self) -> NetState;
    /// Take the state of a snapshot.
    fn restore(&mut self, s: &NetState) -> Result<(), String>;
}

/// One virtqueue's transport state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnap {
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// The device's next available index.
    pub next_avail: u16,
    /// The device's next used index.
    pub next_used: u16,
}

/// A virtio-mmio network device's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The queues (receive, transmit).
    pub queues: Vec<QueueSnap>,
    /// MAC address.
    pub mac: [u8; 6],
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames the guest sent.
    pub tx_frames: u64,
}

/// The offset of `addr` in the network device's window, if it is there.
pub(crate) fn in_window(addr: u64) -> Option<u64> {
    addr.checked_sub(NET_MMIO_BASE)
        .filter(|off| *off < NET_MMIO_LEN)
}
