//! The guest's network device on the host: attaching virtio-net to a VM and
//! connecting it to a TAP interface when the VM is live.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use netdev::{announce_frame, Tap, VirtioNet};
use vmm::Machine;

/// How the guest is networked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    /// The host TAP interface the live side uses.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// Put a virtio-net device with `mac` on `m`. The frames it sends are the
/// VM's outputs, which go wherever the VM's output sink puts them.
pub fn attach(m: &mut Machine, mac: [u8; 6]) -> Result<()> {
    let dev = VirtioNet::new(m.memory().clone(), mac)?;
    m.devices
        .attach_net(Box::new(dev))
        .map_err(|e| anyhow::anyhow!("cannot attach the network device: {e}"))
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
