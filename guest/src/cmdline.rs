//! The kernel command line: space-separated `key=value` settings.

use crate::serial;

/// Offset of `hdr.cmd_line_ptr` (u32) in boot_params.
const CMD_LINE_PTR: usize = 0x228;
/// Offset of `hdr.cmdline_size` (u32) in boot_params.
const CMDLINE_SIZE: usize = 0x238;
/// Longest command line looked at.
const MAX_LEN: usize = 4096;

pub const DEFAULT_HZ: u32 = 100;
/// About 2.5 ms of native CPL3 time on the development host: a quarter of
/// a tick at the default 100 Hz.
pub const DEFAULT_WORK: u64 = 1_000_000;
/// The PIT divisor must be 2..=65535.
const HZ_RANGE: core::ops::RangeInclusive<u64> = 19..=100_000;

#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// PIT rate.
    pub hz: u32,
    /// Stop after this many ticks; 0 = never.
    pub ticks: u64,
    /// Hash iterations per slice.
    pub work: u64,
    /// Print a digest line every this many ticks; 0 = never.
    pub digest_every: u64,
    /// Run the workload at CPL3 (else CPL0).
    pub user: bool,
    /// `net=1`: run the virtio-net Redis server instead of the hash workload.
    pub net: bool,
    /// `ip=A.B.C.D/N`: the address (big-endian octets in a u32) and prefix.
    pub ip: u32,
    pub prefix: u8,
    /// `gw=A.B.C.D`: default IPv4 gateway; 0 = none.
    pub gw: u32,
    /// `port=N`: TCP port of the server.
    pub port: u16,
    /// `mode=NAME`: the hash workload (default) or one of the test modes
    /// (`crate::modes`).
    pub mode: Mode,
    /// `loops=N`: samples the `clockloop` mode takes.
    pub loops: u64,
}

/// What the guest runs after boot (`mode=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The hash workload (or the network service with `net=1`).
    Hash,
    /// `irqprint`: print the last digit of the tick count with interrupts on.
    IrqPrint,
    /// `irqclock`: the timer ISR reads ftclock as its first device access.
    IrqClock,
    /// `clockloop`: read ftclock (clock and entropy) and the PIT in a loop.
    ClockLoop,
    /// `ends`: power off a few ticks after boot, printing just before.
    Ends,
}

impl Mode {
    fn parse(s: &[u8]) -> Option<Mode> {
        Some(match s {
            b"hash" => Mode::Hash,
            b"irqprint" => Mode::IrqPrint,
            b"irqclock" => Mode::IrqClock,
            b"clockloop" => Mode::ClockLoop,
            b"ends" => Mode::Ends,
            _ => return None,
        })
    }
}

/// Samples `mode=clockloop` takes unless `loops=` says otherwise.
pub const DEFAULT_LOOPS: u64 = 100;

/// 10.99.0.2/24.
pub const DEFAULT_IP: u32 = 0x0a63_0002;
pub const DEFAULT_PREFIX: u8 = 24;
pub const DEFAULT_PORT: u16 = 6379;

/// The NUL-terminated command line the loader left in guest memory.
///
/// # Safety
/// `boot_params` must be the zero page from the platform's boot protocol,
/// and the command line it points to must stay unmodified.
pub unsafe fn from_boot_params(boot_params: usize) -> &'static [u8] {
    if boot_params == 0 {
        return &[];
    }
    // SAFETY: the zero page is readable, and these u32 fields may be unaligned.
    let (ptr, size) = unsafe {
        let bp = boot_params as *const u8;
        (
            bp.add(CMD_LINE_PTR).cast::<u32>().read_unaligned() as usize,
            bp.add(CMDLINE_SIZE).cast::<u32>().read_unaligned() as usize,
        )
    };
    if ptr == 0 {
        return &[];
    }
    // cmdline_size is the maximum; 0 means "not given".
    let max = if size == 0 {
        MAX_LEN
    } else {
        size.min(MAX_LEN)
    };
    let base = ptr as *const u8;
    let mut len = 0;
    // SAFETY: the command line lies in identity-mapped guest RAM, and reading
    // stops at its NUL or at the declared size.
    while len < max && unsafe { base.add(len).read() } != 0 {
        len += 1;
    }
    // SAFETY: as above; nothing writes the command line afterwards.
    unsafe { core::slice::from_raw_parts(base, len) }
}

/// Parses `line`, printing a `warning:` line for each unknown key or bad value.
pub fn parse(line: &[u8]) -> Config {
    let mut hz = DEFAULT_HZ;
    let mut ticks = 0;
    let mut work = DEFAULT_WORK;
    let mut digest_every = None;
    let mut user = true;
    let mut net = false;
    let mut ip = DEFAULT_IP;
    let mut prefix = DEFAULT_PREFIX;
    let mut gw = 0;
    let mut port = DEFAULT_PORT;
    let mut mode = Mode::Hash;
    let mut loops = DEFAULT_LOOPS;
    for word in line.split(|&b| b == b' ').filter(|w| !w.is_empty()) {
        let (key, value) = match word.iter().position(|&b| b == b'=') {
            Some(i) => (&word[..i], &word[i + 1..]),
            None => (word, &[][..]),
        };
        let n = parse_u64(value);
        let ok = match (key, n) {
            (b"hz", Some(v)) if HZ_RANGE.contains(&v) => {
                hz = v as u32;
                true
            }
            (b"ticks", Some(v)) => {
                ticks = v;
                true
            }
            (b"work", Some(v)) => {
                work = v;
                true
            }
            (b"digest_every", Some(v)) => {
                digest_every = Some(v);
                true
            }
            (b"user", Some(v @ (0 | 1))) => {
                user = v == 1;
                true
            }
            (b"net", Some(v @ (0 | 1))) => {
                net = v == 1;
                true
            }
            (b"port", Some(v @ 1..=65535)) => {
                port = v as u16;
                true
            }
            (b"ip", _) => match parse_cidr(value) {
                Some((a, n)) => {
                    ip = a;
                    prefix = n;
                    true
                }
                None => false,
            },
            (b"loops", Some(v)) => {
                loops = v;
                true
            }
            (b"mode", _) => match Mode::parse(value) {
                Some(m) => {
                    mode = m;
                    true
                }
                None => false,
            },
            (b"gw", _) => match parse_ipv4(value) {
                Some(a) => {
                    gw = a;
                    true
                }
                None => false,
            },
            (
                b"hz" | b"ticks" | b"work" | b"digest_every" | b"user" | b"net" | b"port"
                | b"loops",
                _,
            ) => false,
            _ => {
                warn("unknown key", word);
                continue;
            }
        };
        if !ok {
            warn("bad value", word);
        }
    }
    Config {
        hz,
        ticks,
        work,
        digest_every: digest_every.unwrap_or(u64::from(hz)),
        user,
        net,
        ip,
        prefix,
        gw,
        port,
        mode,
        loops,
    }
}

/// `A.B.C.D`, each part 0..=255, as a u32 with A in the top byte.
fn parse_ipv4(s: &[u8]) -> Option<u32> {
    let mut ip = 0u32;
    let mut parts = 0;
    for part in s.split(|&b| b == b'.') {
        if part.len() > 3 {
            return None;
        }
        let v = parse_u64(part).filter(|v| *v <= 255)?;
        ip = (ip << 8) | v as u32;
        parts += 1;
    }
    (parts == 4).then_some(ip)
}

/// `A.B.C.D/N` (N = 0..=32), or `A.B.C.D` meaning /24.
fn parse_cidr(s: &[u8]) -> Option<(u32, u8)> {
    match s.iter().position(|&b| b == b'/') {
        Some(i) => {
            let n = parse_u64(&s[i + 1..]).filter(|n| *n <= 32)?;
            Some((parse_ipv4(&s[..i])?, n as u8))
        }
        None => Some((parse_ipv4(s)?, DEFAULT_PREFIX)),
    }
}

fn warn(what: &str, word: &[u8]) {
    serial::puts("warning: ");
    serial::puts(what);
    serial::puts(", ignored: ");
    serial::put_bytes(word);
    serial::puts("\n");
}

/// Decimal digits only, no overflow.
fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        let d = b.checked_sub(b'0').filter(|d| *d < 10)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}
