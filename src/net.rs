//! The guest's network device on the host: attaching virtio-net to a VM and
//! connecting it to a TAP interface when the VM is live.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use netdev::{announce_frame, Tap, VirtioNet};
use vmm::devices::net::FrameOut;
use vmm::Machine;

/// How the guest is networked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    /// The host TAP interface the live side uses.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// Put a virtio-net device with `mac` on `m`, sending frames to `out`.
pub fn attach(m: &mut Machine, mac: [u8; 6], out: FrameOut) -> Result<()> {
    let dev = VirtioNet::new(m.memory().clone(), mac, out)?;
    m.devices
        .attach_net(Box::new(dev))
        .map_err(|e| anyhow::anyhow!("cannot attach the network device: {e}"))
}

/// Frames counted and dropped (a backup's own transmissions).
pub fn discard(count: Arc<AtomicU64>) -> FrameOut {
    Box::new(move |_| {
        count.fetch_add(1, Ordering::Relaxed);
    })
}

/// A TAP interface serving a live VM: received frames go to the VM's input
/// queue until this is dropped.
pub struct LiveTap {
    tap: Tap,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl LiveTap {
    /// Open `name` and start feeding `m` from it.
    pub fn open(name: &str, m: &Machine) -> Result<LiveTap> {
        let tap = Tap::open(name).with_context(|| format!("cannot use TAP interface {name}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let reader = Some(tap.spawn_reader(m.host_inputs(), stop.clone()));
        Ok(LiveTap { tap, stop, reader })
    }

    /// The interface.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// A frame output that sends straight to the wire.
    pub fn output(&self) -> FrameOut {
        let tap = self.tap.clone();
        Box::new(move |f| tap.send_logged(&f))
    }

    /// Tell every bridge and switch on the way where `mac` lives now.
    pub fn announce(&self, mac: [u8; 6]) {
        let frame = announce_frame(mac);
        for _ in 0..3 {
            self.tap.send_logged(&frame);
        }
    }
}

impl Drop for LiveTap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Make `m` a live networked VM on `opts.tap`: frames go straight out.
pub fn go_live(m: &mut Machine, opts: &NetOptions) -> Result<LiveTap> {
    let live = LiveTap::open(&opts.tap, m)?;
    if let Some(dev) = m.devices.net() {
        drop(dev.set_output(live.output()));
    }
    live.announce(opts.mac);
    Ok(live)
}
