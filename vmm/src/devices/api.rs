//! The interface every emulated device implements.

/// What a device read returns, as far as replay is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReadClass {
    /// The value follows from what the guest wrote before: the backup's own
    /// device model reproduces it, so it is not logged.
    Deterministic,
    /// Depends on host time (clock sample, timer counter): logged.
    Clock,
    /// Random bits: logged.
    Entropy,
    /// Some other host-dependent value: logged.
    Other,
}

/// Side effects a device access may have beyond its return value.
#[derive(Debug, Default)]
pub struct DeviceCtx {
    /// Host monotonic time of the access, in ns since the VM started.
    pub now_ns: u64,
    /// Interrupt lines the device pulsed (ISA IRQ numbers, edge-triggered).
    pub irq_pulses: Vec<u8>,
    /// Set by a device that asks the VM to stop with this exit code.
    pub stop: Option<u8>,
}

impl DeviceCtx {
    /// A context for an access at `now_ns`.
    pub fn new(now_ns: u64) -> Self {
        DeviceCtx {
            now_ns,
            ..Default::default()
        }
    }
}

/// A device on the port-I/O or MMIO bus. `offset` is relative to the start
/// of the range the device was registered at.
pub trait BusDevice: Send {
    /// Fill `data` for a guest read.
    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx);
    /// Handle a guest write.
    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceCtx);
    /// Whether a read at `offset` must be logged.
    fn read_class(&self, _offset: u64) -> ReadClass {
        ReadClass::Deterministic
    }
}
