//! The server proper: smoltcp interface and sockets, per-connection RESP
//! state, one poll round at a time. Free of kernel and MMIO dependencies
//! other than the driver (so it can also be exercised on a host).

use smoltcp::iface::{
    Config as IfaceConfig, Interface, PollResult, SocketHandle, SocketSet, SocketStorage,
};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

use super::resp::{self, After, Args, Out, Parsed, MAX_ARGS, MAX_REPLY};
use super::store::Store;
use super::virtio::VirtioNet;

/// TCP sockets, one connection each. smoltcp has no listen backlog: a SYN
/// that finds no listening socket is refused. redis-benchmark (50 clients
/// by default) closes one test's connections and opens the next test's at
/// once, so two waves must fit while the first one's sockets close.
pub const SOCKETS: usize = 128;
/// smoltcp socket buffer size, each way.
pub const SOCK_BUF: usize = 2048;
/// Per-connection request bytes not yet parsed (a command must fit).
const IN_CAP: usize = 2048;
/// Per-connection reply bytes not yet taken by the socket.
const OUT_CAP: usize = 2048;

/// Per-connection state; all-zero is the initial state.
#[repr(C)]
pub struct Conn {
    inb: [u8; IN_CAP],
    outb: [u8; OUT_CAP],
    in_len: usize,
    out_start: usize,
    out_end: usize,
    /// QUIT or a protocol error: close once the replies are out.
    closing: bool,
}

impl Conn {
    fn reset(&mut self) {
        self.in_len = 0;
        self.out_start = 0;
        self.out_end = 0;
        self.closing = false;
    }

    /// Hands queued reply bytes to the socket, as many as it takes.
    fn flush(&mut self, s: &mut tcp::Socket) -> bool {
        if self.out_start == self.out_end || !s.can_send() {
            return false;
        }
        match s.send_slice(&self.outb[self.out_start..self.out_end]) {
            Ok(n) if n > 0 => {
                self.out_start += n;
                if self.out_start == self.out_end {
                    self.out_start = 0;
                    self.out_end = 0;
                }
                true
            }
            _ => false,
        }
    }

    /// Runs every complete command in the input while the output buffer has
    /// room for another reply.
    fn process(&mut self, store: &mut Store, h: &mut u64, served: &mut u64) -> bool {
        let mut args: Args = [(0, 0); MAX_ARGS];
        let mut pos = 0;
        let mut any = false;
        while !self.closing {
            if OUT_CAP - self.out_end < MAX_REPLY && self.out_start > 0 {
                self.outb.copy_within(self.out_start..self.out_end, 0);
                self.out_end -= self.out_start;
                self.out_start = 0;
            }
            if OUT_CAP - self.out_end < MAX_REPLY {
                break;
            }
            let input = &self.inb[pos..self.in_len];
            let full = pos == 0 && self.in_len == IN_CAP;
            let mut out = Out {
                buf: &mut self.outb,
                end: self.out_end,
            };
            match resp::parse(input, &mut args, full) {
                Parsed::Incomplete => break,
                Parsed::Error(msg) => {
                    out.error_parts(b"ERR ", msg.as_bytes());
                    self.out_end = out.end;
                    self.closing = true;
                    any = true;
                }
                Parsed::Command { consumed, argc } => {
                    if argc > 0 {
                        if let After::Close = resp::execute(input, &args, argc, store, &mut out) {
                            self.closing = true;
                        }
                        self.out_end = out.end;
                        *served += 1;
                        *h = crate::kernel::mix(*h, consumed as u64);
                    }
                    pos += consumed;
                    any = true;
                }
            }
        }
        if pos > 0 {
            self.inb.copy_within(pos..self.in_len, 0);
            self.in_len -= pos;
        }
        any
    }
}

/// One round for one connection; true if anything moved.
fn serve(
    s: &mut tcp::Socket,
    c: &mut Conn,
    store: &mut Store,
    port: u16,
    h: &mut u64,
    served: &mut u64,
) -> bool {
    use tcp::State;
    match s.state() {
        State::Closed => {
            c.reset();
            // Cannot fail: the socket is closed and the port is not 0.
            let _ = s.listen(port);
            return false;
        }
        State::Listen | State::SynReceived => {
            c.reset();
            return false;
        }
        State::TimeWait => {
            // Only after our own close (QUIT, protocol error). smoltcp would
            // hold the socket for 10 s; with 8 sockets that refuses clients
            // that QUIT in a loop, so drop it now (this sends an RST, which
            // the peer, already closed, ignores) and re-listen next round.
            s.abort();
            return true;
        }
        _ => {}
    }
    let mut busy = c.flush(s);
    if !c.closing && c.in_len < IN_CAP && s.can_recv() {
        if let Ok(n) = s.recv_slice(&mut c.inb[c.in_len..]) {
            c.in_len += n;
            busy |= n > 0;
        }
    }
    busy |= c.process(store, h, served);
    busy |= c.flush(s);
    let state = s.state();
    if c.out_start == c.out_end
        && (state == State::Established || state == State::CloseWait)
        && (c.closing || (state == State::CloseWait && !s.can_recv()))
    {
        // QUIT, a protocol error, or the peer is done sending and every
        // reply is out: our FIN. (A partial command left over is dropped.)
        s.close();
        busy = true;
    }
    busy
}

/// Network settings.
pub struct NetConfig {
    pub ip: u32,
    pub prefix: u8,
    /// 0 = no default route.
    pub gw: u32,
    pub port: u16,
}

pub struct Server<'a> {
    iface: Interface,
    sockets: SocketSet<'a>,
    handles: [SocketHandle; SOCKETS],
    conns: &'a mut [Conn; SOCKETS],
    store: &'a mut Store,
    port: u16,
    /// Running hash of the requests served (for the digest lines).
    pub h: u64,
    /// Commands served since the caller last reset it.
    pub served: u64,
}

impl<'a> Server<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dev: &mut VirtioNet,
        cfg: &NetConfig,
        seed: u64,
        now: Instant,
        storage: &'a mut [SocketStorage<'a>; SOCKETS],
        sock_rx: &'a mut [[u8; SOCK_BUF]; SOCKETS],
        sock_tx: &'a mut [[u8; SOCK_BUF]; SOCKETS],
        conns: &'a mut [Conn; SOCKETS],
        store: &'a mut Store,
    ) -> Self {
        let mut config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(dev.mac)));
        config.random_seed = seed;
        let mut iface = Interface::new(config, dev, now);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(
                IpAddress::Ipv4(Ipv4Address::from(cfg.ip)),
                cfg.prefix,
            ));
        });
        if cfg.gw != 0 {
            let _ = iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::from(cfg.gw));
        }
        let mut sockets = SocketSet::new(&mut storage[..]);
        let mut bufs = sock_rx.iter_mut().zip(sock_tx.iter_mut());
        let handles: [SocketHandle; SOCKETS] = core::array::from_fn(|_| {
            let (rx, tx) = bufs.next().expect("one buffer pair per socket");
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(&mut rx[..]),
                tcp::SocketBuffer::new(&mut tx[..]),
            );
            s.set_nagle_enabled(false);
            let _ = s.listen(cfg.port);
            sockets.add(s)
        });
        Server {
            iface,
            sockets,
            handles,
            conns,
            store,
            port: cfg.port,
            h: seed,
            served: 0,
        }
    }

    /// One round: receive and send what the interface has, serve every
    /// connection, notify the device. Returns whether another round should
    /// follow right away (something moved, frames are waiting, or a timer
    /// is due now) instead of sleeping.
    pub fn round(&mut self, now: Instant, dev: &mut VirtioNet) -> bool {
        let mut busy = matches!(
            self.iface.poll(now, dev, &mut self.sockets),
            PollResult::SocketStateChanged
        );
        for (handle, conn) in self.handles.iter().zip(self.conns.iter_mut()) {
            let s = self.sockets.get_mut::<tcp::Socket>(*handle);
            busy |= serve(
                s,
                conn,
                self.store,
                self.port,
                &mut self.h,
                &mut self.served,
            );
        }
        dev.flush();
        busy |= dev.rx_pending();
        busy |= self.iface.poll_delay(now, &self.sockets) == Some(Duration::ZERO);
        busy
    }
}
