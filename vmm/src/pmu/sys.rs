//! Raw perf_event ABI: the attribute struct, ioctl numbers, and thin
//! wrappers that turn return codes into `io::Result`. Nothing here knows
//! about branches or landing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `PERF_TYPE_HARDWARE`.
pub const TYPE_HARDWARE: u32 = 0;
/// `PERF_TYPE_RAW`.
pub const TYPE_RAW: u32 = 4;
/// `PERF_COUNT_HW_BRANCH_INSTRUCTIONS`.
pub const HW_BRANCH_INSTRUCTIONS: u64 = 4;

/// Bits of the attribute flag word (the C bitfield after `read_format`),
/// numbered from the least significant bit as on every little-endian ABI.
pub mod flag {
    pub const DISABLED: u64 = 1 << 0;
    pub const PINNED: u64 = 1 << 2;
    pub const EXCLUDE_KERNEL: u64 = 1 << 5;
    pub const EXCLUDE_HV: u64 = 1 << 6;
    pub const EXCLUDE_HOST: u64 = 1 << 19;
    pub const EXCLUDE_GUEST: u64 = 1 << 20;
}

/// `struct perf_event_attr` up to `config3` (`PERF_ATTR_SIZE_VER8`, 136
/// bytes). Older kernels accept the larger size as long as the fields they
/// do not know are zero, which they are here.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PerfEventAttr {
    pub type_: u32,
    pub size: u32,
    pub config: u64,
    /// Union with `sample_freq`; we never set `freq`.
    pub sample_period: u64,
    pub sample_type: u64,
    pub read_format: u64,
    /// The C bitfield; see [`flag`].
    pub flags: u64,
    /// Union with `wakeup_watermark`.
    pub wakeup_events: u32,
    pub bp_type: u32,
    /// Union with `bp_addr`.
    pub config1: u64,
    /// Union with `bp_len`.
    pub config2: u64,
    pub branch_sample_type: u64,
    pub sample_regs_user: u64,
    pub sample_stack_user: u32,
    pub clockid: i32,
    pub sample_regs_intr: u64,
    pub aux_watermark: u32,
    pub sample_max_stack: u16,
    pub reserved_2: u16,
    pub aux_sample_size: u32,
    pub reserved_3: u32,
    pub sig_data: u64,
    pub config3: u64,
}

/// `PERF_ATTR_SIZE_VER5`: the smallest layout with every field we use.
pub const ATTR_SIZE_VER5: usize = 112;
/// `PERF_ATTR_SIZE_VER8`, what we pass.
pub const ATTR_SIZE_VER8: usize = 136;
const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == ATTR_SIZE_VER8);
const _: () = assert!(std::mem::offset_of!(PerfEventAttr, aux_sample_size) == ATTR_SIZE_VER5);

/// `PERF_FLAG_FD_CLOEXEC`.
const FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;

// _IO('$', n) and _IOW('$', 4, __u64).
pub const IOC_ENABLE: libc::c_ulong = 0x2400;
pub const IOC_DISABLE: libc::c_ulong = 0x2401;
pub const IOC_REFRESH: libc::c_ulong = 0x2402;
pub const IOC_RESET: libc::c_ulong = 0x2403;
pub const IOC_PERIOD: libc::c_ulong = 0x4008_2404;

// fcntl commands libc does not export for x86_64 glibc.
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// `struct f_owner_ex`.
#[repr(C)]
struct FOwnerEx {
    type_: libc::c_int,
    pid: libc::pid_t,
}

impl PerfEventAttr {
    /// A zeroed attribute with `size` filled in.
    pub fn new(type_: u32, config: u64) -> Self {
        PerfEventAttr {
            type_,
            size: ATTR_SIZE_VER8 as u32,
            config,
            ..Default::default()
        }
    }
}

/// `perf_event_open(attr, tid, -1, -1, FD_CLOEXEC)`: count `tid` (0 = the
/// calling thread) on whatever CPU it runs.
pub fn perf_event_open(attr: &PerfEventAttr, tid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: `attr` points to a live, fully initialised struct whose `size`
    // field matches its real size; the other arguments are plain integers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr as *const PerfEventAttr,
            tid,
            -1 as libc::c_int,
            -1 as libc::c_int,
            FLAG_FD_CLOEXEC,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor to us; nobody else
    // owns it, so OwnedFd may close it on drop.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An ioctl whose argument is an integer (ENABLE, DISABLE, RESET, REFRESH).
pub fn ioctl_int(fd: &OwnedFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: `fd` is an open perf event; these requests take an integer
    // argument by value and touch no user memory.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    check(ret)
}

/// PERF_EVENT_IOC_PERIOD, whose argument is a pointer to a u64.
pub fn ioctl_period(fd: &OwnedFd, period: u64) -> io::Result<()> {
    // SAFETY: the kernel reads 8 bytes through the pointer, which points to
    // a live local u64 for the duration of the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), IOC_PERIOD as _, &period as *const u64) };
    check(ret)
}

/// Read the counter value (`read_format` = 0: one u64). `Ok(None)` means
/// end of file: a pinned event that lost its hardware counter.
pub fn read_u64(fd: &OwnedFd) -> io::Result<Option<u64>> {
    let mut value: u64 = 0;
    // SAFETY: the buffer is a live local u64 and the length passed is its
    // size, so the kernel cannot write past it.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut value as *mut u64).cast(),
            std::mem::size_of::<u64>(),
        )
    };
    match n {
        8 => Ok(Some(value)),
        0 => Ok(None),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
    }
}

/// Deliver overflow notifications of `fd` as signal `sig` to thread `tid`.
pub fn route_signal(fd: &OwnedFd, tid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    let owner = FOwnerEx {
        type_: F_OWNER_TID,
        pid: tid,
    };
    // SAFETY: F_SETOWN_EX reads a `struct f_owner_ex`, which `owner` is
    // (same layout), alive for the call.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), F_SETOWN_EX, &owner as *const FOwnerEx) })?;
    // SAFETY: F_SETSIG takes the signal number by value.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), F_SETSIG, sig) })?;
    // SAFETY: F_GETFL takes no argument.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    check(fl)?;
    // SAFETY: F_SETFL takes the flag word by value.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_ASYNC) })
}

/// The calling thread's kernel thread id.
pub fn gettid() -> libc::pid_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    // Thread ids always fit in pid_t; 0 ("calling thread") is a safe default.
    libc::pid_t::try_from(tid).unwrap_or(0)
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Symbolic name of the errno values the probe distinguishes.
pub fn errno_name(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
        Some(libc::ENODEV) => "ENODEV",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::EACCES) => "EACCES",
        Some(libc::EPERM) => "EPERM",
        Some(libc::EBUSY) => "EBUSY",
        Some(libc::E2BIG) => "E2BIG",
        Some(libc::EMFILE) => "EMFILE",
        Some(libc::ENOSYS) => "ENOSYS",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn attr_layout_matches_the_uapi_header() {
        assert_eq!(offset_of!(PerfEventAttr, config), 8);
        assert_eq!(offset_of!(PerfEventAttr, sample_period), 16);
        assert_eq!(offset_of!(PerfEventAttr, read_format), 32);
        assert_eq!(offset_of!(PerfEventAttr, flags), 40);
        assert_eq!(offset_of!(PerfEventAttr, wakeup_events), 48);
        assert_eq!(offset_of!(PerfEventAttr, config1), 56);
        assert_eq!(offset_of!(PerfEventAttr, config2), 64);
        assert_eq!(offset_of!(PerfEventAttr, sample_regs_user), 80);
        assert_eq!(offset_of!(PerfEventAttr, clockid), 92);
        assert_eq!(offset_of!(PerfEventAttr, aux_watermark), 104);
        assert_eq!(offset_of!(PerfEventAttr, aux_sample_size), ATTR_SIZE_VER5);
        assert_eq!(offset_of!(PerfEventAttr, sig_data), 120);
        assert_eq!(offset_of!(PerfEventAttr, config3), 128);
        assert_eq!(
            PerfEventAttr::new(TYPE_RAW, 1).size as usize,
            ATTR_SIZE_VER8
        );
    }

    #[test]
    fn flag_bits_follow_the_bitfield_order() {
        // disabled:1 inherit:1 pinned:1 exclusive:1 exclude_user:1
        // exclude_kernel:1 exclude_hv:1 exclude_idle:1 mmap:1 comm:1 freq:1
        // inherit_stat:1 enable_on_exec:1 task:1 watermark:1 precise_ip:2
        // mmap_data:1 sample_id_all:1 exclude_host:1 exclude_guest:1
        assert_eq!(flag::DISABLED.trailing_zeros(), 0);
        assert_eq!(flag::PINNED.trailing_zeros(), 2);
        assert_eq!(flag::EXCLUDE_KERNEL.trailing_zeros(), 5);
        assert_eq!(flag::EXCLUDE_HV.trailing_zeros(), 6);
        assert_eq!(flag::EXCLUDE_HOST.trailing_zeros(), 15 + 2 + 2);
        assert_eq!(flag::EXCLUDE_GUEST.trailing_zeros(), 20);
    }

    #[test]
    fn ioctl_numbers_match_the_encoding() {
        // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr
        let ioc = |dir: u64, nr: u64, size: u64| {
            (dir << 30 | size << 16 | 0x24 << 8 | nr) as libc::c_ulong
        };
        assert_eq!(IOC_ENABLE, ioc(0, 0, 0));
        assert_eq!(IOC_REFRESH, ioc(0, 2, 0));
        assert_eq!(IOC_RESET, ioc(0, 3, 0));
        assert_eq!(IOC_PERIOD, ioc(1, 4, 8));
    }

    #[test]
    fn gettid_is_this_thread() {
        assert!(gettid() > 0);
    }
}
