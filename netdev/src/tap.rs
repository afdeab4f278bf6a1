//! The TAP backend: frames between a host TAP interface and the guest.
//!
//! The reader thread never touches the device: it queues each frame in the
//! VM's [`HostInputs`] and kicks the vCPU, which hands it to the device at an
//! execution point (where the recorder logs it).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm::inputs::HostInputs;

use crate::NetError;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
// _IOW('T', 202, int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP interface.
#[derive(Debug, Clone)]
pub struct Tap {
    file: Arc<File>,
    name: String,
}

impl Tap {
    /// Attach to the TAP interface `name` (created if it does not exist; a
    /// persistent one made with `ip tuntap add NAME mode tap` keeps its
    /// bridge port when this process ends).
    pub fn open(name: &str) -> Result<Tap, NetError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(NetError::TapName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| NetError::Tap {
                name: name.to_string(),
                op: "open /dev/net/tun",
                source,
            })?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq`
        // lays out (40 bytes); the fd is the tun device we just opened.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(NetError::Tap {
                name: name.to_string(),
                op: "TUNSETIFF",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file: Arc::new(file),
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Put one Ethernet frame on the wire.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        (&*self.file).write_all(frame)
    }

    /// Send each frame, logging (not failing on) errors: a lost frame is
    /// what a real wire does, and TCP recovers.
    pub fn send_logged(&self, frame: &[u8]) {
        if let Err(e) = self.send(frame) {
            tracing::debug!(
                "tap {}: frame of {} bytes not sent: {e}",
                self.name,
                frame.len()
            );
        }
    }

    /// Start the thread that queues received frames into `inputs` until
    /// `stop` is set.
    pub fn spawn_reader(&self, inputs: HostInputs, stop: Arc<AtomicBool>) -> JoinHandle<()> {
        let tap = self.clone();
        std::thread::spawn(move || tap.read_loop(&inputs, &stop))
    }

    fn read_loop(&self, inputs: &HostInputs, stop: &AtomicBool) {
        let mut buf = vec![0u8; 65_536];
        let fd = self.file.as_raw_fd();
        while !stop.load(Ordering::Acquire) {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let n = unsafe { libc::poll(&mut p, 1, 100) };
            if n <= 0 {
                continue;
            }
            match (&*self.file).read(&mut buf) {
                Ok(0) => continue,
                Ok(len) => {
                    if !inputs.push_frame(buf[..len].to_vec()) {
                        tracing::debug!("tap {}: receive queue full, frame dropped", self.name);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("tap {}: read failed: {e}", self.name);
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
}

/// A RARP announcement of `mac` (what VMware FT and QEMU send after a
/// migration or failover): a broadcast from the guest's MAC, so every switch
/// and bridge on the way learns the port it now lives behind.
pub fn announce_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35]); // RARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]); // Ethernet/IPv4, reverse request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announce_is_a_broadcast_rarp_from_the_mac() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = announce_frame(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3], "opcode: reverse request");
        assert_eq!(&f[22..28], &mac, "sender hardware address");
        assert_eq!(&f[32..38], &mac, "target hardware address");
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for n in ["", "a-name-that-is-far-too-long", "nul\0"] {
            assert!(matches!(Tap::open(n), Err(NetError::TapName(_))), "{n:?}");
        }
    }
}
