//! virtio-net over virtio-mmio version 2 (modern), for smoltcp. Runs at CPL3.
//!
//! The device: virtio-mmio at guest-physical `BASE` (identity-mapped, so
//! guest-physical = virtual), IRQ5. Features accepted: VERSION_1 and MAC
//! (and STATUS when offered). Queue 0 = receiveq, queue 1 = transmitq, both
//! split virtqueues of `QSIZE` entries without EVENT_IDX or indirect
//! descriptors. Every frame is preceded by the 12-byte virtio_net_hdr_v1
//! (zero on transmit). Descriptor i always points at buffer i: rx buffers are
//! single device-writable 2048-byte descriptors, a tx frame is one
//! device-readable descriptor holding header + frame.
//!
//! Every MMIO access is a VM exit, so the data path only touches memory: it
//! polls the used rings and writes QueueNotify once per poll round per queue
//! that got new buffers (`flush`).

use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{fence, Ordering};

use smoltcp::phy::{self, DeviceCapabilities, Medium};

use super::mmio::{r32, r8, w32};
use smoltcp::time::Instant;

const MAGIC: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const INTERRUPT_STATUS: usize = 0x060;
const INTERRUPT_ACK: usize = 0x064;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
const CONFIG: usize = 0x100;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const NET_DEVICE: u32 = 1;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_FAILED: u32 = 128;

const F_MAC: u32 = 1 << 5; // low word
const F_STATUS: u32 = 1 << 16; // low word
const F_VERSION_1: u32 = 1 << 0; // high word (bit 32)

const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// Entries per virtqueue (both queues).
pub const QSIZE: usize = 32;
/// Bytes per packet buffer: the 12-byte header plus up to 1514 bytes of frame.
pub const BUF_LEN: usize = 2048;
/// virtio_net_hdr_v1.
pub const HDR_LEN: usize = 12;
/// Largest Ethernet frame (no FCS) smoltcp may hand us.
const MTU: usize = 1514;

const RXQ: u32 = 0;
const TXQ: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QSIZE],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C)]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QSIZE],
    avail_event: u16,
}

/// One split virtqueue in one page: descriptors at +0 (16-aligned), the
/// driver (avail) ring at +0x200, the device (used) ring at +0x248 (4-aligned).
#[repr(C, align(4096))]
pub struct QueueMem {
    desc: [Desc; QSIZE],
    avail: Avail,
    used: Used,
}

/// Device memory: queues and buffers. Must be zeroed before `init`.
#[repr(C, align(4096))]
pub struct NetDevMem {
    rxq: QueueMem,
    txq: QueueMem,
    rx_bufs: [[u8; BUF_LEN]; QSIZE],
    tx_bufs: [[u8; BUF_LEN]; QSIZE],
}

/// Why `init` failed.
pub enum InitError {
    /// MagicValue, Version or DeviceID do not match.
    NoDevice,
    /// FEATURES_OK did not stick, a queue is missing or too small, ...
    Failed(&'static str),
}

struct RxQueue {
    q: *mut QueueMem,
    bufs: *mut [[u8; BUF_LEN]; QSIZE],
    last_used: u16,
    avail_idx: u16,
    notify: bool,
}

struct TxQueue {
    q: *mut QueueMem,
    bufs: *mut [[u8; BUF_LEN]; QSIZE],
    last_used: u16,
    avail_idx: u16,
    free: [u16; QSIZE],
    nfree: usize,
    notify: bool,
}

pub struct VirtioNet {
    rx: RxQueue,
    tx: TxQueue,
    pub mac: [u8; 6],
    /// Frames received, for the digest.
    pub rx_frames: u64,
}

fn setup_queue(index: u32, q: *mut QueueMem) -> Result<(), InitError> {
    w32(QUEUE_SEL, index);
    if r32(QUEUE_READY) != 0 {
        return Err(InitError::Failed("queue already ready"));
    }
    let max = r32(QUEUE_NUM_MAX);
    if (max as usize) < QSIZE {
        return Err(InitError::Failed("queue too small or missing"));
    }
    w32(QUEUE_NUM, QSIZE as u32);
    // SAFETY: only addresses are taken.
    let (desc, avail, used) = unsafe {
        (
            addr_of!((*q).desc) as u64,
            addr_of!((*q).avail) as u64,
            addr_of!((*q).used) as u64,
        )
    };
    w32(QUEUE_DESC_LOW, desc as u32);
    w32(QUEUE_DESC_HIGH, (desc >> 32) as u32);
    w32(QUEUE_DRIVER_LOW, avail as u32);
    w32(QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
    w32(QUEUE_DEVICE_LOW, used as u32);
    w32(QUEUE_DEVICE_HIGH, (used >> 32) as u32);
    w32(QUEUE_READY, 1);
    Ok(())
}

/// Probes and initialises the device (standard sequence, virtio 1.x 3.1.1),
/// gives the receive queue all its buffers and notifies it.
pub fn init(mem: &'static mut NetDevMem) -> Result<VirtioNet, InitError> {
    if r32(MAGIC) != MAGIC_VALUE || r32(VERSION) != 2 || r32(DEVICE_ID) != NET_DEVICE {
        return Err(InitError::NoDevice);
    }
    w32(STATUS, 0);
    w32(STATUS, S_ACKNOWLEDGE);
    w32(STATUS, S_ACKNOWLEDGE | S_DRIVER);

    w32(DEVICE_FEATURES_SEL, 0);
    let lo = r32(DEVICE_FEATURES);
    w32(DEVICE_FEATURES_SEL, 1);
    let hi = r32(DEVICE_FEATURES);
    if hi & F_VERSION_1 == 0 || lo & F_MAC == 0 {
        w32(STATUS, S_FAILED);
        return Err(InitError::Failed("device lacks VERSION_1 or MAC"));
    }
    w32(DRIVER_FEATURES_SEL, 0);
    w32(DRIVER_FEATURES, lo & (F_MAC | F_STATUS));
    w32(DRIVER_FEATURES_SEL, 1);
    w32(DRIVER_FEATURES, F_VERSION_1);
    w32(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if r32(STATUS) & S_FEATURES_OK == 0 {
        w32(STATUS, S_FAILED);
        return Err(InitError::Failed("FEATURES_OK not accepted"));
    }

    let rxq: *mut QueueMem = &raw mut mem.rxq;
    let txq: *mut QueueMem = &raw mut mem.txq;
    let rx_bufs: *mut [[u8; BUF_LEN]; QSIZE] = &raw mut mem.rx_bufs;
    let tx_bufs: *mut [[u8; BUF_LEN]; QSIZE] = &raw mut mem.tx_bufs;
    // Descriptor i <-> buffer i, for good. The device sees none of this
    // before QueueReady/DRIVER_OK.
    for i in 0..QSIZE {
        mem.rxq.desc[i] = Desc {
            addr: mem.rx_bufs[i].as_ptr() as u64,
            len: BUF_LEN as u32,
            flags: DESC_F_WRITE,
            next: 0,
        };
        mem.rxq.avail.ring[i] = i as u16;
        mem.txq.desc[i] = Desc {
            addr: mem.tx_bufs[i].as_ptr() as u64,
            len: 0,
            flags: 0,
            next: 0,
        };
    }
    mem.rxq.avail.flags = 0;
    mem.rxq.avail.idx = QSIZE as u16;
    // Transmit completes synchronously in the notify: no interrupt needed
    // (a hint; the device may still interrupt).
    mem.txq.avail.flags = AVAIL_F_NO_INTERRUPT;
    mem.txq.avail.idx = 0;
    fence(Ordering::SeqCst);

    if let Err(e) = setup_queue(RXQ, rxq).and_then(|()| setup_queue(TXQ, txq)) {
        w32(STATUS, S_FAILED);
        return Err(e);
    }
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = r8(CONFIG + i);
    }
    w32(
        STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    w32(QUEUE_NOTIFY, RXQ);

    let mut free = [0u16; QSIZE];
    for (i, f) in free.iter_mut().enumerate() {
        *f = i as u16;
    }
    Ok(VirtioNet {
        rx: RxQueue {
            q: rxq,
            bufs: rx_bufs,
            last_used: 0,
            avail_idx: QSIZE as u16,
            notify: false,
        },
        tx: TxQueue {
            q: txq,
            bufs: tx_bufs,
            last_used: 0,
            avail_idx: 0,
            free,
            nfree: QSIZE,
            notify: false,
        },
        mac,
        rx_frames: 0,
    })
}

/// The device's used index (written by the device at any time).
fn used_idx(q: *mut QueueMem) -> u16 {
    // SAFETY: q points at a live queue; the read is volatile.
    let idx = unsafe { addr_of!((*q).used.idx).read_volatile() };
    // Entries up to idx are complete before idx is published.
    fence(Ordering::Acquire);
    idx
}

fn used_elem(q: *mut QueueMem, slot: u16) -> UsedElem {
    // SAFETY: as above; slot is reduced modulo the ring size.
    unsafe { addr_of!((*q).used.ring[usize::from(slot) % QSIZE]).read_volatile() }
}

fn no_notify(q: *mut QueueMem) -> bool {
    // SAFETY: as above.
    unsafe { addr_of!((*q).used.flags).read_volatile() & USED_F_NO_NOTIFY != 0 }
}

/// Makes descriptor `id` available: ring entry, then (after a fence) the index.
fn push_avail(q: *mut QueueMem, avail_idx: &mut u16, id: u16) {
    // SAFETY: q points at a live queue; the device only reads the avail ring.
    unsafe {
        addr_of_mut!((*q).avail.ring[usize::from(*avail_idx) % QSIZE]).write_volatile(id);
        fence(Ordering::SeqCst);
        *avail_idx = avail_idx.wrapping_add(1);
        addr_of_mut!((*q).avail.idx).write_volatile(*avail_idx);
    }
}

impl TxQueue {
    /// Takes back every descriptor the device has used.
    fn reclaim(&mut self) {
        let idx = used_idx(self.q);
        while self.last_used != idx {
            let e = used_elem(self.q, self.last_used);
            self.last_used = self.last_used.wrapping_add(1);
            if (e.id as usize) < QSIZE && self.nfree < QSIZE {
                self.free[self.nfree] = e.id as u16;
                self.nfree += 1;
            }
        }
    }

    fn kick(&mut self) {
        if self.notify {
            self.notify = false;
            fence(Ordering::SeqCst);
            if !no_notify(self.q) {
                w32(QUEUE_NOTIFY, TXQ);
            }
        }
    }

    /// A free descriptor, notifying the device first if none is left.
    fn has_free(&mut self) -> bool {
        if self.nfree == 0 {
            self.reclaim();
        }
        if self.nfree == 0 && self.notify {
            self.kick();
            self.reclaim();
        }
        self.nfree != 0
    }
}

impl RxQueue {
    fn kick(&mut self) {
        if self.notify {
            self.notify = false;
            fence(Ordering::SeqCst);
            if !no_notify(self.q) {
                w32(QUEUE_NOTIFY, RXQ);
            }
        }
    }
}

impl VirtioNet {
    /// Whether received frames are waiting in the used ring.
    pub fn rx_pending(&self) -> bool {
        used_idx(self.rx.q) != self.rx.last_used
    }

    /// Notifies the queues that got new buffers since the last flush (one
    /// MMIO write each) and reclaims finished transmissions.
    pub fn flush(&mut self) {
        self.rx.kick();
        self.tx.kick();
        self.tx.reclaim();
    }

    /// After a network interrupt: read and acknowledge InterruptStatus.
    pub fn ack_interrupt(&mut self) {
        let isr = r32(INTERRUPT_STATUS);
        if isr != 0 {
            w32(INTERRUPT_ACK, isr);
        }
    }
}

pub struct RxToken<'a> {
    rx: &'a mut RxQueue,
    id: u16,
    len: usize,
}

pub struct TxToken<'a> {
    tx: &'a mut TxQueue,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        // SAFETY: the device has returned this buffer (it is in the used
        // ring) and gets it back only in `drop`.
        let buf = unsafe { &(*self.rx.bufs)[usize::from(self.id)] };
        let frame = if self.len > HDR_LEN {
            &buf[HDR_LEN..self.len]
        } else {
            &buf[..0]
        };
        f(frame)
        // `drop` gives the buffer back.
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        push_avail(self.rx.q, &mut self.rx.avail_idx, self.id);
        self.rx.notify = true;
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let tx = self.tx;
        let len = len.min(BUF_LEN - HDR_LEN);
        // `transmit`/`receive` only hand out a token when one is free.
        if !tx.has_free() {
            let mut scratch = [0u8; MTU];
            return f(&mut scratch[..len.min(MTU)]);
        }
        tx.nfree -= 1;
        let id = tx.free[tx.nfree];
        // SAFETY: descriptor `id` is free, so the device does not use its buffer.
        let buf = unsafe { &mut (*tx.bufs)[usize::from(id)] };
        buf[..HDR_LEN].fill(0);
        let r = f(&mut buf[HDR_LEN..HDR_LEN + len]);
        // SAFETY: the descriptor is ours until it is made available.
        unsafe {
            addr_of_mut!((*tx.q).desc[usize::from(id)].len).write_volatile((HDR_LEN + len) as u32);
        }
        push_avail(tx.q, &mut tx.avail_idx, id);
        tx.notify = true;
        r
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if used_idx(self.rx.q) == self.rx.last_used || !self.tx.has_free() {
            return None;
        }
        let e = used_elem(self.rx.q, self.rx.last_used);
        self.rx.last_used = self.rx.last_used.wrapping_add(1);
        self.rx_frames += 1;
        let id = (e.id as usize % QSIZE) as u16;
        Some((
            RxToken {
                rx: &mut self.rx,
                id,
                len: (e.len as usize).min(BUF_LEN),
            },
            TxToken { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.has_free() {
            Some(TxToken { tx: &mut self.tx })
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps
    }
}
