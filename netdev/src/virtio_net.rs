//! virtio-net over the virtio-mmio transport (version 2), on rust-vmm's
//! virtio-queue.
//!
//! Everything runs on the vCPU thread inside the exit that caused it: a
//! transmit notify is handled before the MMIO write returns (the frame is the
//! access's output, [`DeviceCtx::emit`], and the guest gets its buffer back at
//! once), and
//! a received frame is written into guest memory only when the run loop hands
//! it over at an execution point. Nothing here writes guest memory while the
//! guest runs, so a backup replaying the log reproduces the device exactly.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::net::{NetDevice, NetState, QueueSnap, NET_IRQ};
use vmm::devices::{BusDevice, DeviceCtx};
use vmm::memory::GuestRam;
use vmm::output::Stream;

use crate::NetError;

/// The 12-byte `virtio_net_hdr_v1` in front of every frame (VERSION_1).
pub const NET_HDR_LEN: usize = 12;
/// Largest queue the driver may choose.
pub const QUEUE_MAX: u16 = 256;
/// Receive and transmit queue indexes.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// Largest frame taken from the transmit queue (64 KiB plus the header, as
/// with TSO; without offloads the guest sends at most 1514).
const TX_MAX: usize = 65_536 + NET_HDR_LEN;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4654_564d; // "FTVM"
const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS;
/// Config space status: link up.
const LINK_UP: u16 = 1;

/// A virtio-net device.
pub struct VirtioNet {
    mem: GuestRam,
    queues: [Queue; 2],
    status: u32,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    mac: [u8; 6],
    rx_frames: u64,
    tx_frames: u64,
}

impl VirtioNet {
    /// A device with `mac`, reading and writing the guest's memory `mem`.
    /// Transmitted frames (without the virtio header) are the outputs of the
    /// MMIO write that notified the transmit queue.
    pub fn new(mem: GuestRam, mac: [u8; 6]) -> Result<Self, NetError> {
        let queue = || Queue::new(QUEUE_MAX).map_err(|e| NetError::Queue(format!("{e:?}")));
        Ok(VirtioNet {
            mem,
            queues: [queue()?, queue()?],
            status: 0,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            mac,
            rx_frames: 0,
            tx_frames: 0,
        })
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
    }

    fn driver_ok(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn usable(&self, i: usize) -> bool {
        self.driver_ok() && self.queues[i].ready() && self.queues[i].is_valid(&self.mem)
    }

    /// Signal used buffers on queue `i` unless the driver asked not to be.
    fn notify(&mut self, i: usize, ctx: &mut DeviceCtx) {
        let wanted = self.queues[i].needs_notification(&self.mem).unwrap_or(true);
        if wanted {
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
            ctx.irq_pulses.push(NET_IRQ);
        }
    }

    /// Take every frame the guest queued for transmission.
    fn transmit(&mut self, ctx: &mut DeviceCtx) {
        if !self.usable(TX_QUEUE) {
            return;
        }
        let mut sent = false;
        while let Some(chain) = self.queues[TX_QUEUE].pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let mut buf = Vec::new();
            for d in chain.readable() {
                let len = (d.len() as usize).min(TX_MAX.saturating_sub(buf.len()));
                let at = buf.len();
                buf.resize(at + len, 0);
                if self.mem.read_slice(&mut buf[at..], d.addr()).is_err() {
                    tracing::warn!("virtio-net: tx descriptor outside guest memory");
                    buf.truncate(at);
                    break;
                }
            }
            if self.queues[TX_QUEUE].add_used(&self.mem, head, 0).is_err() {
                tracing::warn!("virtio-net: tx used ring outside guest memory");
                return;
            }
            sent = true;
            if buf.len() > NET_HDR_LEN {
                self.tx_frames += 1;
                ctx.emit(Stream::Net, buf.split_off(NET_HDR_LEN));
            }
        }
        if sent {
            self.notify(TX_QUEUE, ctx);
        }
    }

    fn read_reg(&self, off: u32) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match off {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => VIRTIO_ID_NET,
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => FEATURES as u32,
                1 => (FEATURES >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, off: u32, v: u32, ctx: &mut DeviceCtx) {
        match off {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.driver_features =
                    (self.driver_features & !mask) | ((u64::from(v) << shift) & FEATURES);
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.with_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.with_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.with_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            // Receive buffers are picked up when the next frame is due; only
            // a transmit notify has work to do now.
            VIRTIO_MMIO_QUEUE_NOTIFY if v as usize == TX_QUEUE => self.transmit(ctx),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => {
                if v == 0 {
                    self.reset();
                    return;
                }
                let mut v = v;
                // Only a modern driver may proceed (no legacy layout here).
                if v & VIRTIO_CONFIG_S_FEATURES_OK != 0
                    && self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
                {
                    v &= !VIRTIO_CONFIG_S_FEATURES_OK;
                }
                self.status = v;
            }
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected() {
            f(q);
        }
    }

    fn config_byte(&self, i: u64) -> u8 {
        let status = LINK_UP.to_le_bytes();
        match i {
            0..=5 => self.mac[i as usize],
            6 | 7 => status[(i - 6) as usize],
            _ => 0,
        }
    }
}

impl BusDevice for VirtioNet {
    fn read(&mut self, offset: u64, data: &mut [u8], _ctx: &mut DeviceCtx) {
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config_byte(offset - config + i as u64);
            }
            return;
        }
        let v = self.read_reg(offset as u32).to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&v[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceCtx) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            return; // the MAC is read-only here
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        self.write_reg(offset as u32, u32::from_le_bytes(b), ctx);
    }
}

impl NetDevice for VirtioNet {
    fn can_receive(&mut self) -> bool {
        if !self.usable(RX_QUEUE) {
            return false;
        }
        let q = &self.queues[RX_QUEUE];
        q.avail_idx(&self.mem, Ordering::Acquire)
            .is_ok_and(|avail| avail != Wrapping(q.next_avail()))
    }

    fn receive(&mut self, frame: &[u8], ctx: &mut DeviceCtx) -> bool {
        if !self.can_receive() {
            return false;
        }
        let Some(chain) = self.queues[RX_QUEUE].pop_descriptor_chain(&self.mem) else {
            return false;
        };
        let head = chain.head_index();
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[10] = 1; // num_buffers
        let mut rest: &[u8] = &[];
        let mut parts = [&hdr[..], frame].into_iter();
        let mut written = 0u32;
        for d in chain.writable() {
            let mut at = d.addr();
            let mut room = d.len() as usize;
            while room > 0 {
                if rest.is_empty() {
                    match parts.next() {
                        Some(p) => rest = p,
                        None => break,
                    }
                    continue;
                }
                let n = room.min(rest.len());
                if self.mem.write_slice(&rest[..n], at).is_err() {
                    tracing::warn!("virtio-net: rx descriptor outside guest memory");
                    break;
                }
                rest = &rest[n..];
                room -= n;
                written += n as u32;
                at = GuestAddress(at.0 + n as u64);
            }
        }
        if !rest.is_empty() || parts.next().is_some() {
            tracing::warn!(
                "virtio-net: a {}-byte frame did not fit the guest's receive buffer; truncated",
                frame.len()
            );
        }
        if self.queues[RX_QUEUE]
            .add_used(&self.mem, head, written)
            .is_err()
        {
            tracing::warn!("virtio-net: rx used ring outside guest memory");
            return false;
        }
        self.rx_frames += 1;
        self.notify(RX_QUEUE, ctx);
        true
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn state(&self) -> NetState {
        NetState {
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnap {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect(),
            mac: self.mac,
            rx_frames: self.rx_frames,
            tx_frames: self.tx_frames,
        }
    }

    fn restore(&mut self, s: &NetState) -> Result<(), String> {
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "virtio-net snapshot has {} queues, the device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        for (q, snap) in self.queues.iter_mut().zip(&s.queues) {
            let state = virtio_queue::QueueState {
                max_size: QUEUE_MAX,
                next_avail: snap.next_avail,
                next_used: snap.next_used,
                event_idx_enabled: false,
                size: snap.size,
                ready: snap.ready,
                desc_table: snap.desc_table,
                avail_ring: snap.avail_ring,
                used_ring: snap.used_ring,
            };
            *q = Queue::try_from(state).map_err(|e| format!("virtio-net queue: {e:?}"))?;
        }
        self.status = s.status;
        self.driver_features = s.driver_features;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.mac = s.mac;
        self.rx_frames = s.rx_frames;
        self.tx_frames = s.tx_frames;
        Ok(())
    }
}
