//! The interface every emulated device implements.

use std::collections::VecDeque;

use crate::output::Stream;

/// What kind of host value a device took in, as far as the log is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SampleKind {
    /// A time, in ns of the device clock (ftclock's clock, the TSC).
    Time,
    /// A value that follows host time (a timer's count or status).
    Counter,
    /// Random bits.
    Entropy,
    /// Some other host-dependent value.
    Other,
}

/// Host values an access takes in: the non-deterministic inputs of a device.
#[derive(Debug, Default)]
struct Samples {
    /// Values a replayer gave for this access, used in order.
    given: VecDeque<u64>,
    /// Values the access took, in order.
    taken: Vec<u64>,
    kind: Option<SampleKind>,
}

/// Side effects a device access may have beyond its return value.
#[derive(Debug, Default)]
pub struct DeviceCtx {
    /// Host monotonic time of the access, in ns since the VM started, for a
    /// device's own schedule. Anything derived from it that the guest can
    /// see must enter the device through [`DeviceCtx::sample`].
    pub now_ns: u64,
    /// Interrupt lines the device pulsed (ISA IRQ numbers, edge-triggered).
    pub irq_pulses: Vec<u8>,
    /// Set by a device that asks the VM to stop with this exit code.
    pub stop: Option<u8>,
    /// Set by a device that resets the machine (the VM ends as after a
    /// triple fault).
    pub reset: bool,
    /// What the guest sent to the outside world during the access.
    pub outputs: Vec<(Stream, Vec<u8>)>,
    samples: Samples,
}

impl DeviceCtx {
    /// A context for an access at `now_ns`.
    pub fn new(now_ns: u64) -> Self {
        DeviceCtx {
            now_ns,
            ..Default::default()
        }
    }

    /// A context for a replayed access, whose host values are `given` (from
    /// the log) instead of the host's.
    pub fn replayed(now_ns: u64, given: Vec<u64>) -> Self {
        let mut ctx = Self::new(now_ns);
        ctx.samples.given = given.into();
        ctx
    }

    /// A host value (a time, random bits, a counter) entering the device:
    /// the only way a device takes in something that is not a function of
    /// what the guest did. `host` is the device's own value; the access
    /// uses the one returned, which on a replay is the logged value, so the
    /// device's state holds what the log gave (a later read of latched or
    /// sampled state is then deterministic).
    pub fn sample(&mut self, kind: SampleKind, host: u64) -> u64 {
        let v = self.samples.given.pop_front().unwrap_or(host);
        self.samples.taken.push(v);
        self.samples.kind.get_or_insert(kind);
        v
    }

    /// The host values this access took and their kind (the first
    /// sample's): what is logged for it.
    pub fn taken(&self) -> Option<(SampleKind, &[u64])> {
        self.samples.kind.map(|k| (k, &self.samples.taken[..]))
    }

    /// Record that the guest sent `bytes` on `stream`.
    pub fn emit(&mut self, stream: Stream, bytes: Vec<u8>) {
        self.outputs.push((stream, bytes));
    }
}

/// A device on the port-I/O or MMIO bus. `offset` is relative to the start
/// of the range the device was registered at.
pub trait BusDevice: Send {
    /// Fill `data` for a guest read.
    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx);
    /// Handle a guest write.
    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceCtx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_access_uses_the_given_values_then_the_hosts() {
        let mut ctx = DeviceCtx::replayed(0, vec![7]);
        assert_eq!(ctx.sample(SampleKind::Counter, 1), 7);
        assert_eq!(ctx.sample(SampleKind::Time, 2), 2);
        assert_eq!(ctx.taken(), Some((SampleKind::Counter, &[7, 2][..])));
        assert_eq!(DeviceCtx::new(0).taken(), None);
    }
}
