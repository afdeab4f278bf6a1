//! The network service (`net=1`): a virtio-net driver, smoltcp and a small
//! Redis-protocol (RESP2) key-value server, all at CPL3.
//!
//! The kernel side is only `start` (CPL0: records the configuration,
//! unmasks IRQ5, switches the sleep syscall to net mode, enters CPL3), the
//! IRQ5 ISR (`kernel::net_irq`: sets a flag, EOI) and the control syscall
//! (console writes, power off). Everything else runs natively at CPL3:
//! CPL0 is emulated on the development host and cannot run SSE arithmetic.
//!
//! The server loop polls the interface (time = timer ticks converted to ms,
//! so it replays deterministically), serves the sockets, notifies the device
//! and makes the sleep syscall once there is nothing left to do; that returns
//! at the next timer tick or network interrupt.

mod mmio;
mod resp;
mod server;
mod store;
mod virtio;

use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU8, Ordering::Relaxed};

use smoltcp::iface::SocketStorage;
use smoltcp::time::Instant;

use crate::cmdline::Config;
use crate::{kernel, pic, workload};
use server::{Conn, NetConfig, Server, SOCKETS, SOCK_BUF};
use store::Store;

/// The configuration, handed from CPL0 (`start`) to CPL3.
static IP: AtomicU32 = AtomicU32::new(0);
static PREFIX: AtomicU8 = AtomicU8::new(0);
static GW: AtomicU32 = AtomicU32::new(0);
static PORT: AtomicU16 = AtomicU16::new(0);
static HZ: AtomicU32 = AtomicU32::new(100);

/// Server rounds without a sleep before one is forced (so digest lines and
/// the tick budget still get their syscall under constant load).
const MAX_SPINS: u32 = 1000;

/// Everything the service keeps, in `.netbss` (zeroed at CPL3 by
/// `user_main`; all-zero is a valid initial state of every field).
#[repr(C, align(4096))]
struct NetMem {
    dev: virtio::NetDevMem,
    sock_rx: [[u8; SOCK_BUF]; SOCKETS],
    sock_tx: [[u8; SOCK_BUF]; SOCKETS],
    conns: [Conn; SOCKETS],
    store: Store,
}

#[link_section = ".netbss"]
static mut NET_MEM: MaybeUninit<NetMem> = MaybeUninit::uninit();

extern "C" {
    static __netbss_start: u8;
    static __netbss_end: u8;
}

/// CPL0: records the configuration and enters the server at CPL3 (always
/// CPL3: `user=0` is ignored in net mode). Never returns.
pub fn start(cfg: &Config, seed: u64) -> ! {
    IP.store(cfg.ip, Relaxed);
    PREFIX.store(cfg.prefix, Relaxed);
    GW.store(cfg.gw, Relaxed);
    PORT.store(cfg.port, Relaxed);
    HZ.store(cfg.hz, Relaxed);
    kernel::set_net_mode();
    pic::unmask_net();
    workload::enter_user(user_main, seed, 0)
}

/// A console line under construction (CPL3: printed through the syscall).
pub struct Line {
    buf: [u8; 128],
    len: usize,
}

impl Line {
    pub fn new() -> Self {
        Line {
            buf: [0; 128],
            len: 0,
        }
    }

    pub fn bytes(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    pub fn dec(&mut self, v: u64) -> &mut Self {
        let mut div = 1;
        while v / div >= 10 {
            div *= 10;
        }
        loop {
            self.bytes(&[b'0' + (v / div % 10) as u8]);
            if div == 1 {
                return self;
            }
            div /= 10;
        }
    }

    fn hex8(&mut self, v: u8) -> &mut Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.bytes(&[HEX[usize::from(v >> 4)], HEX[usize::from(v & 0xf)]])
    }

    fn ipv4(&mut self, ip: u32) -> &mut Self {
        for (i, b) in ip.to_be_bytes().iter().enumerate() {
            if i > 0 {
                self.bytes(b".");
            }
            self.dec(u64::from(*b));
        }
        self
    }

    pub fn print(&self) {
        workload::user_write(&self.buf[..self.len]);
    }
}

fn now() -> Instant {
    // SAFETY: TICKS lives forever and is only written by the timer ISR.
    let ticks = unsafe { kernel::ticks_ptr().read_volatile() };
    let hz = u64::from(HZ.load(Relaxed).max(1));
    Instant::from_millis((ticks.saturating_mul(1000) / hz) as i64)
}

/// The CPL3 entry of the service.
extern "C" fn user_main(seed: u64, _: u64) -> ! {
    // SAFETY: `.netbss` is ours alone and nothing has used it yet; all-zero
    // is a valid value of NetMem, so assume_init is sound afterwards.
    let mem: &'static mut NetMem = unsafe {
        let start = (&raw const __netbss_start).cast_mut();
        let end = &raw const __netbss_end;
        core::ptr::write_bytes(start, 0, end as usize - start as usize);
        &mut *(&raw mut NET_MEM).cast::<NetMem>()
    };
    let NetMem {
        dev,
        sock_rx,
        sock_tx,
        conns,
        store,
    } = mem;

    let mut dev = match virtio::init(dev) {
        Ok(d) => d,
        Err(virtio::InitError::NoDevice) => {
            workload::user_write(b"net: no virtio-net device\n");
            workload::user_poweroff(3)
        }
        Err(virtio::InitError::Failed(why)) => {
            Line::new()
                .bytes(b"net: virtio-net init failed: ")
                .bytes(why.as_bytes())
                .bytes(b"\n")
                .print();
            workload::user_poweroff(3)
        }
    };

    let cfg = NetConfig {
        ip: IP.load(Relaxed),
        prefix: PREFIX.load(Relaxed),
        gw: GW.load(Relaxed),
        port: PORT.load(Relaxed),
    };
    let mut storage: [SocketStorage; SOCKETS] = [SocketStorage::EMPTY; SOCKETS];
    let mut srv = Server::new(
        &mut dev,
        &cfg,
        seed,
        now(),
        &mut storage,
        sock_rx,
        sock_tx,
        conns,
        store,
    );

    let mut line = Line::new();
    line.bytes(b"net mac ");
    for (i, b) in dev.mac.iter().enumerate() {
        if i > 0 {
            line.bytes(b":");
        }
        line.hex8(*b);
    }
    line.bytes(b" ip ")
        .ipv4(cfg.ip)
        .bytes(b"/")
        .dec(u64::from(cfg.prefix))
        .bytes(b" port ")
        .dec(u64::from(cfg.port))
        .bytes(b"\n")
        .print();

    let mut spins = 0u32;
    loop {
        spins += 1;
        if srv.round(now(), &mut dev) && spins < MAX_SPINS {
            continue;
        }
        spins = 0;
        let h = kernel::mix(srv.h, dev.rx_frames);
        if workload::user_sleep(h, srv.served) {
            dev.ack_interrupt();
        }
        srv.served = 0;
    }
}
