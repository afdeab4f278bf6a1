//! virtio-net driven by a minimal driver written against the virtio 1.x
//! spec: registers, feature negotiation, transmit, receive, snapshots.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use netdev::virtio_net::{NET_HDR_LEN, RX_QUEUE, TX_QUEUE};
use netdev::VirtioNet;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::net::{NetDevice, NET_IRQ};
use vmm::devices::{BusDevice, DeviceCtx};
use vmm::memory::{create_ram, GuestRam};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
const QSIZE: u16 = 8;
/// Ring memory of queue q: descriptors, avail and used rings.
fn rings(q: usize) -> (u64, u64, u64) {
    let base = 0x10_0000 + q as u64 * 0x1_0000;
    (base, base + 0x1000, base + 0x2000)
}
/// Buffers of queue q, 4 KiB each.
fn buf(q: usize, i: u16) -> u64 {
    0x20_0000 + q as u64 * 0x10_0000 + u64::from(i) * 0x1000
}

type Sent = Arc<Mutex<Vec<Vec<u8>>>>;

struct Driver {
    mem: GuestRam,
    dev: VirtioNet,
    sent: Sent,
    avail_idx: [u16; 2],
}

fn rd(dev: &mut VirtioNet, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(off, &mut b, &mut DeviceCtx::default());
    u32::from_le_bytes(b)
}

fn wr(dev: &mut VirtioNet, off: u64, v: u32) -> DeviceCtx {
    let mut ctx = DeviceCtx::default();
    dev.write(off, &v.to_le_bytes(), &mut ctx);
    ctx
}

impl Driver {
    fn new() -> Driver {
        let mem = create_ram(16).unwrap();
        let sent: Sent = Arc::default();
        let s = sent.clone();
        let dev = VirtioNet::new(
            mem.clone(),
            MAC,
            Box::new(move |f| s.lock().unwrap().push(f)),
        )
        .unwrap();
        Driver {
            mem,
            dev,
            sent,
            avail_idx: [0; 2],
        }
    }

    fn negotiate(&mut self, features_hi: u32) -> u32 {
        let d = &mut self.dev;
        wr(d, 0x70, 0);
        wr(d, 0x70, 1);
        wr(d, 0x70, 1 | 2);
        wr(d, 0x14, 0);
        let lo = rd(d, 0x10);
        wr(d, 0x24, 0);
        wr(d, 0x20, lo);
        wr(d, 0x24, 1);
        wr(d, 0x20, features_hi);
        wr(d, 0x70, 1 | 2 | 8);
        rd(d, 0x70)
    }

    fn init(&mut self) {
        assert_eq!(self.negotiate(1) & 8, 8, "FEATURES_OK stays set");
        for q in [RX_QUEUE, TX_QUEUE] {
            let (desc, avail, used) = rings(q);
            let d = &mut self.dev;
            wr(d, 0x30, q as u32);
            assert_eq!(rd(d, 0x34), 256);
            wr(d, 0x38, u32::from(QSIZE));
            wr(d, 0x80, desc as u32);
            wr(d, 0x84, 0);
            wr(d, 0x90, avail as u32);
            wr(d, 0x94, 0);
            wr(d, 0xa0, used as u32);
            wr(d, 0xa4, 0);
            wr(d, 0x44, 1);
        }
        wr(&mut self.dev, 0x70, 1 | 2 | 8 | 4);
    }

    /// Make a chain of (addr, len, write-only) descriptors starting at slot
    /// `first` available on queue q.
    fn post(&mut self, q: usize, first: u16, parts: &[(u64, u32, bool)]) {
        let (desc, avail, _) = rings(q);
        for (i, (addr, len, write)) in parts.iter().enumerate() {
            let slot = first + i as u16;
            let mut flags = if *write { 2u16 } else { 0 };
            if i + 1 < parts.len() {
                flags |= 1;
            }
            let at = GuestAddress(desc + u64::from(slot) * 16);
            self.mem.write_obj(*addr, at).unwrap();
            self.mem.write_obj(*len, GuestAddress(at.0 + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            self.mem
                .write_obj(slot + 1, GuestAddress(at.0 + 14))
                .unwrap();
        }
        let idx = self.avail_idx[q];
        let ring = GuestAddress(avail + 4 + u64::from(idx % QSIZE) * 2);
        self.mem.write_obj(first, ring).unwrap();
        self.avail_idx[q] = idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
    }

    fn used(&self, q: usize) -> (u16, Vec<(u32, u32)>) {
        let (_, _, used) = rings(q);
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let entries = (0..idx)
            .map(|i| {
                let e = used + 4 + u64::from(i % QSIZE) * 8;
                (
                    self.mem.read_obj(GuestAddress(e)).unwrap(),
                    self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
                )
            })
            .collect();
        (idx, entries)
    }
}

#[test]
fn registers_identify_a_modern_net_device_with_its_mac() {
    let mut d = Driver::new();
    assert_eq!(rd(&mut d.dev, 0x00), 0x7472_6976, "magic");
    assert_eq!(rd(&mut d.dev, 0x04), 2, "virtio-mmio version 2");
    assert_eq!(rd(&mut d.dev, 0x08), 1, "device id: net");
    wr(&mut d.dev, 0x14, 1);
    assert_eq!(rd(&mut d.dev, 0x10) & 1, 1, "VIRTIO_F_VERSION_1");
    wr(&mut d.dev, 0x14, 0);
    let lo = rd(&mut d.dev, 0x10);
    assert_ne!(lo & (1 << 5), 0, "VIRTIO_NET_F_MAC");
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        let mut x = [0u8; 1];
        d.dev
            .read(0x100 + i as u64, &mut x, &mut DeviceCtx::default());
        *b = x[0];
    }
    assert_eq!(mac, MAC);
    assert_eq!(d.dev.mac(), MAC);
}

#[test]
fn a_legacy_driver_cannot_set_features_ok() {
    let mut d = Driver::new();
    assert_eq!(d.negotiate(0) & 8, 0);
}

#[test]
fn transmit_strips_the_header_completes_at_once_and_interrupts() {
    let mut d = Driver::new();
    d.init();
    let frame: Vec<u8> = (0..100u8).collect();
    // Header and the first bytes in one descriptor, the rest in another.
    let mut first = vec![0u8; NET_HDR_LEN];
    first.extend_from_slice(&frame[..30]);
    d.mem
        .write_slice(&first, GuestAddress(buf(TX_QUEUE, 0)))
        .unwrap();
    d.mem
        .write_slice(&frame[30..], GuestAddress(buf(TX_QUEUE, 1)))
        .unwrap();
    d.post(
        TX_QUEUE,
        0,
        &[
            (buf(TX_QUEUE, 0), first.len() as u32, false),
            (buf(TX_QUEUE, 1), 70, false),
        ],
    );
    assert!(
        d.sent.lock().unwrap().is_empty(),
        "nothing before the notify"
    );
    let ctx = wr(&mut d.dev, 0x50, TX_QUEUE as u32);
    assert_eq!(*d.sent.lock().unwrap(), vec![frame]);
    assert_eq!(d.used(TX_QUEUE), (1, vec![(0, 0)]));
    assert_eq!(ctx.irq_pulses, vec![NET_IRQ]);
    assert_eq!(rd(&mut d.dev, 0x60), 1, "used-buffer interrupt");
    wr(&mut d.dev, 0x64, 1);
    assert_eq!(rd(&mut d.dev, 0x60), 0, "acknowledged");
}

#[test]
fn receive_waits_for_a_buffer_and_writes_header_and_frame() {
    let mut d = Driver::new();
    d.init();
    let frame: Vec<u8> = (0..200).map(|i| (i * 7) as u8).collect();
    let mut ctx = DeviceCtx::default();
    assert!(!d.dev.can_receive(), "no buffer posted yet");
    assert!(!d.dev.receive(&frame, &mut ctx));
    assert!(ctx.irq_pulses.is_empty());
    d.post(RX_QUEUE, 0, &[(buf(RX_QUEUE, 0), 2048, true)]);
    assert!(d.dev.can_receive());
    assert!(d.dev.receive(&frame, &mut ctx));
    assert_eq!(ctx.irq_pulses, vec![NET_IRQ]);
    let total = (NET_HDR_LEN + frame.len()) as u32;
    assert_eq!(d.used(RX_QUEUE), (1, vec![(0, total)]));
    let mut got = vec![0u8; total as usize];
    d.mem
        .read_slice(&mut got, GuestAddress(buf(RX_QUEUE, 0)))
        .unwrap();
    assert_eq!(&got[..10], &[0; 10], "header flags/gso zero");
    assert_eq!(&got[10..12], &[1, 0], "num_buffers = 1");
    assert_eq!(&got[NET_HDR_LEN..], &frame[..]);
    assert!(!d.dev.can_receive(), "the only buffer is used");
    assert!(!d.dev.receive(&frame, &mut ctx));
}

#[test]
fn nothing_moves_before_driver_ok_and_reset_forgets_the_queues() {
    let mut d = Driver::new();
    d.negotiate(1);
    d.post(RX_QUEUE, 0, &[(buf(RX_QUEUE, 0), 2048, true)]);
    assert!(!d.dev.can_receive(), "queues not set up");
    d.init();
    d.post(RX_QUEUE, 0, &[(buf(RX_QUEUE, 0), 2048, true)]);
    assert!(d.dev.can_receive());
    wr(&mut d.dev, 0x70, 0);
    assert!(!d.dev.can_receive(), "reset");
    assert_eq!(rd(&mut d.dev, 0x70), 0);
}

#[test]
fn a_restored_device_continues_exactly_where_the_original_was() {
    let mut d = Driver::new();
    d.init();
    for i in 0..3 {
        d.post(RX_QUEUE, i, &[(buf(RX_QUEUE, i), 2048, true)]);
    }
    assert!(d.dev.receive(b"first frame", &mut DeviceCtx::default()));
    let state = d.dev.state();
    let mut copy = VirtioNet::new(d.mem.clone(), [0; 6], Box::new(|_| {})).unwrap();
    copy.restore(&state).unwrap();
    assert_eq!(copy.state(), state);
    assert_eq!(copy.mac(), MAC);
    // The copy delivers the next frame into the second buffer, as the
    // original would have.
    assert!(copy.receive(b"second frame", &mut DeviceCtx::default()));
    assert_eq!(d.used(RX_QUEUE).1[1], (1, (NET_HDR_LEN + 12) as u32));
    let mut bad = state.clone();
    bad.queues.pop();
    assert!(copy.restore(&bad).unwrap_err().contains("queues"));
}
