//! Emulated devices and the bus that routes port I/O and MMIO to them.
//!
//! Every device runs on the vCPU thread, inside the exit that touched it, so
//! device state only changes at points the VMM chose (no async paths into the
//! guest).

mod api;
pub mod bus;
pub mod ftclock;
pub mod i8042;
pub mod net;
pub mod pic;
pub mod pit;
pub mod rtc;
pub mod serial;

pub use api::{BusDevice, DeviceCtx, SampleKind};

use serde::{Deserialize, Serialize};

use bus::Bus;
use ftclock::{Entropy, FtClock, FtClockState, Power, FTCLOCK_LEN, FTCLOCK_PORT, POWER_PORT};
use i8042::{I8042, I8042_COMMAND_PORT, I8042_DATA_PORT};
use net::{NetDevice, NetState};
use pic::{Chip, Pic, PicState};
use pit::{Pit, PitState};
use rtc::{Rtc, RtcState, RTC_LEN, RTC_PORT};
use serial::{Uart, UartState};

/// PIT ports.
pub const PIT_PORT: u16 = 0x40;
/// COM1 ports.
pub const COM1_PORT: u16 = 0x3f8;
/// ISA IRQ of the PIT.
pub const PIT_IRQ: u8 = 0;

/// The port-I/O devices of the platform (docs/platform.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioDevice {
    /// 8259 master.
    PicMaster,
    /// 8259 slave.
    PicSlave,
    /// 8254.
    Pit,
    /// COM1.
    Serial,
    /// Paravirtual clock and entropy.
    FtClock,
    /// Power-off port.
    Power,
    /// CMOS real-time clock.
    Rtc,
    /// Keyboard controller ports (reset only).
    I8042,
}

/// The state of every device, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// PIC pair.
    pub pic: PicState,
    /// PIT, with times relative to the snapshot.
    pub pit: PitState,
    /// COM1.
    pub serial: UartState,
    /// ftclock.
    pub ftclock: FtClockState,
    /// The network device, if one is attached.
    #[serde(default)]
    pub net: Option<NetState>,
    /// The CMOS clock (None in snapshots from before it existed).
    #[serde(default)]
    pub rtc: Option<RtcState>,
}

/// All devices and their buses.
pub struct Devices {
    /// The interrupt controller.
    pub pic: Pic,
    /// The timer.
    pub pit: Pit,
    /// COM1.
    pub serial: Uart,
    /// ftclock.
    pub ftclock: FtClock,
    /// CMOS real-time clock.
    pub rtc: Rtc,
    power: Power,
    pio: Bus<PioDevice>,
    mmio: Bus<usize>,
    mmio_devices: Vec<Box<dyn BusDevice>>,
    net: Option<Box<dyn NetDevice>>,
    /// A snapshot's network state, applied when the device is attached.
    net_restore: Option<NetState>,
}

fn platform_bus() -> Bus<PioDevice> {
    let mut bus = Bus::new();
    let ranges = [
        (0x20, 2, PioDevice::PicMaster),
        (0xa0, 2, PioDevice::PicSlave),
        (u64::from(PIT_PORT), 4, PioDevice::Pit),
        (u64::from(COM1_PORT), 8, PioDevice::Serial),
        (u64::from(FTCLOCK_PORT), FTCLOCK_LEN, PioDevice::FtClock),
        (u64::from(POWER_PORT), 1, PioDevice::Power),
        (u64::from(RTC_PORT), RTC_LEN, PioDevice::Rtc),
        (u64::from(I8042_DATA_PORT), 1, PioDevice::I8042),
        (u64::from(I8042_COMMAND_PORT), 1, PioDevice::I8042),
    ];
    for (base, len, dev) in ranges {
        // The table above is fixed and non-overlapping.
        let inserted = bus.insert(base, len, dev);
        debug_assert!(inserted.is_ok());
    }
    bus
}

impl Devices {
    /// Devices in their reset state.
    pub fn new(entropy: Entropy) -> Self {
        Devices {
            pic: Pic::new(),
            pit: Pit::new(),
            serial: Uart::new(),
            ftclock: FtClock::new(entropy),
            rtc: Rtc::new(),
            power: Power,
            pio: platform_bus(),
            mmio: Bus::new(),
            mmio_devices: Vec::new(),
            net: None,
            net_restore: None,
        }
    }

    /// Rebuild from a snapshot taken at `now_ns` of the old clock, onto a
    /// clock that reads `now_ns` now.
    pub fn from_state(s: &DevicesState, now_ns: u64) -> Result<Self, String> {
        Ok(Devices {
            pic: Pic::from_state(&s.pic),
            pit: Pit::from_state(&s.pit, now_ns),
            serial: Uart::from_state(&s.serial)?,
            ftclock: FtClock::from_state(&s.ftclock),
            rtc: match &s.rtc {
                Some(r) => Rtc::from_state(r)?,
                None => Rtc::new(),
            },
            power: Power,
            pio: platform_bus(),
            mmio: Bus::new(),
            mmio_devices: Vec::new(),
            net: None,
            net_restore: s.net.clone(),
        })
    }

    /// Snapshot of every device.
    pub fn state(&self, now_ns: u64) -> DevicesState {
        DevicesState {
            pic: self.pic.state(),
            pit: self.pit.state(now_ns),
            serial: self.serial.state(),
            ftclock: self.ftclock.state(),
            rtc: Some(self.rtc.state()),
            net: self.net.as_ref().map(|n| n.state()),
        }
    }

    /// Attach the network device at [`net::NET_MMIO_BASE`]. After a restore
    /// it takes the snapshot's network state.
    pub fn attach_net(&mut self, mut dev: Box<dyn NetDevice>) -> Result<(), String> {
        if let Some(s) = self.net_restore.take() {
            dev.restore(&s)?;
        }
        self.net = Some(dev);
        Ok(())
    }

    /// The network device, if attached.
    pub fn net(&mut self) -> Option<&mut (dyn NetDevice + 'static)> {
        self.net.as_deref_mut()
    }

    /// Deliver a received frame (at a point). False: no receive buffer, or
    /// no device; nothing changed.
    pub fn receive_frame(&mut self, frame: &[u8], ctx: &mut DeviceCtx) -> bool {
        let Some(dev) = self.net.as_deref_mut() else {
            return false;
        };
        let done = dev.receive(frame, ctx);
        self.route_irqs(ctx);
        done
    }

    /// A guest port read. Host values it takes in are in `ctx`.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8], ctx: &mut DeviceCtx) {
        let Some((dev, off)) = self.pio.find(u64::from(port)) else {
            // Nothing there: the bus floats high, as on a PC.
            data.fill(0xff);
            return;
        };
        match dev {
            PioDevice::PicMaster => self.pic.read(Chip::Master, off, data),
            PioDevice::PicSlave => self.pic.read(Chip::Slave, off, data),
            PioDevice::Pit => self.pit.read(off, data, ctx),
            PioDevice::Serial => self.serial.read(off, data, ctx),
            PioDevice::FtClock => self.ftclock.read(off, data, ctx),
            PioDevice::Power => self.power.read(off, data, ctx),
            PioDevice::Rtc => self.rtc.read(off, data, ctx),
            PioDevice::I8042 => I8042.read(off, data, ctx),
        }
        self.route_irqs(ctx);
    }

    /// A guest port write.
    pub fn pio_write(&mut self, port: u16, data: &[u8], ctx: &mut DeviceCtx) {
        let Some((dev, off)) = self.pio.find(u64::from(port)) else {
            return;
        };
        match dev {
            PioDevice::PicMaster => self.pic.write(Chip::Master, off, data),
            PioDevice::PicSlave => self.pic.write(Chip::Slave, off, data),
            PioDevice::Pit => self.pit.write(off, data, ctx),
            PioDevice::Serial => self.serial.write(off, data, ctx),
            PioDevice::FtClock => self.ftclock.write(off, data, ctx),
            PioDevice::Power => self.power.write(off, data, ctx),
            PioDevice::Rtc => self.rtc.write(off, data, ctx),
            // Only the command port takes the reset command.
            PioDevice::I8042 if port == I8042_COMMAND_PORT => I8042.write(off, data, ctx),
            PioDevice::I8042 => {}
        }
        self.route_irqs(ctx);
    }

    /// Put an MMIO device at `[base, base + len)`.
    pub fn add_mmio(
        &mut self,
        base: u64,
        len: u64,
        dev: Box<dyn BusDevice>,
    ) -> Result<(), bus::Overlap> {
        self.mmio.insert(base, len, self.mmio_devices.len())?;
        self.mmio_devices.push(dev);
        Ok(())
    }

    /// A guest MMIO read. Host values it takes in are in `ctx`.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8], ctx: &mut DeviceCtx) {
        if let (Some(off), Some(dev)) = (net::in_window(addr), self.net.as_deref_mut()) {
            dev.read(off, data, ctx);
        } else if let Some((i, off)) = self.mmio.find(addr) {
            if let Some(dev) = self.mmio_devices.get_mut(i) {
                dev.read(off, data, ctx);
            }
        } else {
            data.fill(0xff);
        }
        self.route_irqs(ctx);
    }

    /// A guest MMIO write.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8], ctx: &mut DeviceCtx) {
        if let (Some(off), Some(dev)) = (net::in_window(addr), self.net.as_deref_mut()) {
            dev.write(off, data, ctx);
        } else if let Some((i, off)) = self.mmio.find(addr) {
            if let Some(dev) = self.mmio_devices.get_mut(i) {
                dev.write(off, data, ctx);
            }
        }
        self.route_irqs(ctx);
    }

    /// Pulse the IRQ lines devices raised during an access.
    pub fn route_irqs(&mut self, ctx: &mut DeviceCtx) {
        for irq in ctx.irq_pulses.drain(..) {
            self.pic.pulse_irq(irq);
        }
    }
}
