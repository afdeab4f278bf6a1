//! ftclock: a paravirtual device that hands the guest host time and random
//! bits. A read of the sample's low half takes a new 64-bit sample, the
//! guest's clock or entropy input, through [`DeviceCtx::sample`] (so it is
//! logged whole); the high half reads the held sample, which is device
//! state, so a low/high pair never mixes two samples, even across a
//! failover.

use serde::{Deserialize, Serialize};

use super::{BusDevice, DeviceCtx, SampleKind};

/// First port.
pub const FTCLOCK_PORT: u16 = 0xf100;
/// Ports covered.
pub const FTCLOCK_LEN: u64 = 0x10;

const REG_SELECT: u64 = 0;
const REG_SAMPLE_LO: u64 = 4;
const REG_SAMPLE_HI: u64 = 8;
const SOURCE_CLOCK: u8 = 0;
const SOURCE_ENTROPY: u8 = 1;

/// Where random bits come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entropy {
    /// The host's getrandom(2).
    Host,
    /// A seeded generator (deterministic runs and tests).
    Seeded(u64),
}

/// Register state, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FtClockState {
    source: u8,
    sample: u64,
    entropy: Entropy,
}

/// The device.
#[derive(Debug, Clone)]
pub struct FtClock {
    state: FtClockState,
}

impl FtClock {
    /// A device drawing entropy from `entropy`.
    pub fn new(entropy: Entropy) -> Self {
        FtClock {
            state: FtClockState {
                source: SOURCE_CLOCK,
                sample: 0,
                entropy,
            },
        }
    }

    /// Rebuild from a snapshot.
    pub fn from_state(state: &FtClockState) -> Self {
        FtClock {
            state: state.clone(),
        }
    }

    /// Snapshot.
    pub fn state(&self) -> FtClockState {
        self.state.clone()
    }

    fn random(&mut self) -> u64 {
        match &mut self.state.entropy {
            Entropy::Host => host_random(),
            Entropy::Seeded(s) => splitmix64(s),
        }
    }

    /// Take a new sample from the selected source.
    fn take_sample(&mut self, ctx: &mut DeviceCtx) -> u64 {
        let (kind, host) = if self.state.source == SOURCE_ENTROPY {
            (SampleKind::Entropy, self.random())
        } else {
            (SampleKind::Time, ctx.now_ns)
        };
        ctx.sample(kind, host)
    }
}

/// The splitmix64 step: small, fast, full-period.
fn splitmix64(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn host_random() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        tracing::warn!("getrandom failed; ftclock entropy falls back to the clock");
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return splitmix64(&mut t.clone());
    }
    u64::from_le_bytes(b)
}

fn put(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    for (d, s) in data.iter_mut().zip(b.iter()) {
        *d = *s;
    }
}

impl BusDevice for FtClock {
    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx) {
        match offset {
            REG_SAMPLE_LO => {
                self.state.sample = self.take_sample(ctx);
                put(data, self.state.sample as u32);
            }
            REG_SAMPLE_HI => put(data, (self.state.sample >> 32) as u32),
            REG_SELECT => put(data, u32::from(self.state.source)),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8], _ctx: &mut DeviceCtx) {
        if offset == REG_SELECT {
            if let Some(&s) = data.first() {
                self.state.source = if s == SOURCE_ENTROPY {
                    SOURCE_ENTROPY
                } else {
                    SOURCE_CLOCK
                };
            }
        }
    }
}

/// The power-off port: a write stops the VM with the written exit code.
#[derive(Debug, Default, Clone)]
pub struct Power;

/// Its port.
pub const POWER_PORT: u16 = 0xf000;

impl BusDevice for Power {
    fn read(&mut self, _offset: u64, data: &mut [u8], _ctx: &mut DeviceCtx) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8], ctx: &mut DeviceCtx) {
        ctx.stop = Some(data.first().copied().unwrap_or(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dev: &mut FtClock, now: u64) -> u64 {
        let mut ctx = DeviceCtx::new(now);
        let (mut lo, mut hi) = ([0u8; 4], [0u8; 4]);
        dev.read(REG_SAMPLE_LO, &mut lo, &mut ctx);
        dev.read(REG_SAMPLE_HI, &mut hi, &mut ctx);
        u64::from(u32::from_le_bytes(lo)) | (u64::from(u32::from_le_bytes(hi)) << 32)
    }

    #[test]
    fn clock_samples_now_once_per_low_read() {
        let mut d = FtClock::new(Entropy::Seeded(1));
        assert_eq!(sample(&mut d, 0x1_2345_6789), 0x1_2345_6789);
        let mut ctx = DeviceCtx::new(5);
        let mut b = [0u8; 4];
        d.read(REG_SAMPLE_LO, &mut b, &mut ctx);
        assert_eq!(ctx.taken(), Some((SampleKind::Time, &[5][..])));
        let mut ctx = DeviceCtx::new(6);
        d.read(REG_SAMPLE_HI, &mut b, &mut ctx);
        d.read(REG_SELECT, &mut b, &mut ctx);
        assert_eq!(ctx.taken(), None, "the high half and select are state");
    }

    #[test]
    fn a_replayed_sample_is_held_whole_so_the_high_half_follows_the_log() {
        let mut d = FtClock::new(Entropy::Host);
        let mut lo = [0u8; 4];
        let mut hi = [0u8; 4];
        let logged = 0x0000_0002_ffff_fff0u64;
        d.read(
            REG_SAMPLE_LO,
            &mut lo,
            &mut DeviceCtx::replayed(9, vec![logged]),
        );
        // The high half is read later, on the device's own clock (after a
        // failover, say): it still belongs to the logged sample.
        d.read(REG_SAMPLE_HI, &mut hi, &mut DeviceCtx::new(0x7_0000_0000));
        let got = u64::from(u32::from_le_bytes(lo)) | (u64::from(u32::from_le_bytes(hi)) << 32);
        assert_eq!(got, logged);
    }

    #[test]
    fn seeded_entropy_is_reproducible_and_classified() {
        let mut a = FtClock::new(Entropy::Seeded(7));
        let mut b = FtClock::new(Entropy::Seeded(7));
        let mut ctx = DeviceCtx::default();
        a.write(REG_SELECT, &[SOURCE_ENTROPY], &mut ctx);
        b.write(REG_SELECT, &[SOURCE_ENTROPY], &mut ctx);
        let x = sample(&mut a, 0);
        assert_eq!(x, sample(&mut b, 99));
        assert_ne!(x, sample(&mut a, 0));
    }

    #[test]
    fn power_write_requests_stop() {
        let mut ctx = DeviceCtx::default();
        Power.write(0, &[3], &mut ctx);
        assert_eq!(ctx.stop, Some(3));
    }
}
