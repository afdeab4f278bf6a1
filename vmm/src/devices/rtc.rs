//! The PC's CMOS real-time clock (MC146818): index port 0x70, data port
//! 0x71. The wall-clock time is a host value, so a read of the seconds
//! register takes a new sample (Unix seconds) through
//! [`DeviceCtx::sample`], which logs it; the other date and time registers
//! read that held sample, which is device state. Linux's readout (seconds,
//! the update flag, seconds again, then minutes to year, and seconds once
//! more to check) therefore sees one consistent time, on a backup too.
//!
//! No update-in-progress phase, no alarm or periodic interrupt (IRQ 8 is
//! never raised); the guest cannot set the clock (writes to the time
//! registers are ignored). The rest of the 128 bytes is plain CMOS RAM.

use serde::{Deserialize, Serialize};

use super::{BusDevice, DeviceCtx, SampleKind};

/// Index port; the data port follows it.
pub const RTC_PORT: u16 = 0x70;
/// Ports covered.
pub const RTC_LEN: u64 = 2;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const DAY_OF_WEEK: u8 = 0x06;
const DAY_OF_MONTH: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
/// Register B: binary (not BCD) values.
const B_BINARY: u8 = 1 << 2;
/// Register B: 24-hour mode.
const B_24H: u8 = 1 << 1;
/// Register D: valid RAM and time (the battery is fine).
const D_VRT: u8 = 1 << 7;

/// Register state, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    index: u8,
    /// The last time sample, in seconds since the Unix epoch.
    sample: Option<u64>,
    /// CMOS RAM, registers A and B included.
    ram: Vec<u8>,
}

/// The device.
#[derive(Debug, Clone)]
pub struct Rtc {
    state: RtcState,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// A clock in BCD, 24-hour mode.
    pub fn new() -> Self {
        let mut ram = vec![0u8; 128];
        ram[usize::from(REG_A)] = 0x26; // 32.768 kHz divider, 1024 Hz rate
        ram[usize::from(REG_B)] = B_24H;
        Rtc {
            state: RtcState {
                index: 0,
                sample: None,
                ram,
            },
        }
    }

    /// Rebuild from a snapshot.
    pub fn from_state(state: &RtcState) -> Result<Self, String> {
        if state.ram.len() != 128 {
            return Err(format!("rtc state: {} bytes of CMOS RAM", state.ram.len()));
        }
        Ok(Rtc {
            state: state.clone(),
        })
    }

    /// Snapshot.
    pub fn state(&self) -> RtcState {
        self.state.clone()
    }

    fn sample(&mut self, ctx: &mut DeviceCtx) -> u64 {
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let v = ctx.sample(SampleKind::Other, host);
        self.state.sample = Some(v);
        v
    }

    fn held(&mut self, ctx: &mut DeviceCtx) -> u64 {
        match self.state.sample {
            Some(v) => v,
            None => self.sample(ctx),
        }
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.state.ram[usize::from(REG_B)] & B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn read_reg(&mut self, reg: u8, ctx: &mut DeviceCtx) -> u8 {
        let time = match reg {
            SECONDS => Some(self.sample(ctx)),
            MINUTES | HOURS | DAY_OF_WEEK | DAY_OF_MONTH | MONTH | YEAR | CENTURY => {
                Some(self.held(ctx))
            }
            _ => None,
        };
        if let Some(t) = time {
            let c = Civil::from_unix(t);
            let v = match reg {
                SECONDS => c.second,
                MINUTES => c.minute,
                HOURS => c.hour,
                DAY_OF_WEEK => c.weekday + 1,
                DAY_OF_MONTH => c.day,
                MONTH => c.month,
                YEAR => c.year % 100,
                _ => c.year / 100,
            };
            return self.encode(v);
        }
        match reg {
            REG_A => self.state.ram[usize::from(REG_A)] & 0x7f, // never updating
            REG_C => 0,                                         // no interrupt flags
            REG_D => D_VRT,
            r => self.state.ram[usize::from(r & 0x7f)],
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx) {
        let v = if offset == 0 {
            0xff // the index port is write-only
        } else {
            self.read_reg(self.state.index, ctx)
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8], _ctx: &mut DeviceCtx) {
        let Some(&v) = data.first() else {
            return;
        };
        if offset == 0 {
            // Bit 7 masks NMIs on a PC; there are none here.
            self.state.index = v & 0x7f;
            return;
        }
        match self.state.index {
            SECONDS | MINUTES | HOURS | DAY_OF_WEEK | DAY_OF_MONTH | MONTH | YEAR | CENTURY => {}
            REG_C | REG_D => {}
            r => self.state.ram[usize::from(r)] = v,
        }
    }
}

/// A UTC date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Civil {
    year: u32,
    month: u32,
    day: u32,
    weekday: u32, // 0 = Sunday
    hour: u32,
    minute: u32,
    second: u32,
}

impl Civil {
    /// From seconds since 1970-01-01 (the days-to-civil algorithm of
    /// H. Hinnant's "chrono-compatible low-level date algorithms").
    fn from_unix(t: u64) -> Self {
        let days = t / 86_400;
        let rem = t % 86_400;
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        Civil {
            year: year as u32,
            month: month as u32,
            day: day as u32,
            weekday: ((days + 4) % 7) as u32, // 1970-01-01 was a Thursday
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(rtc: &mut Rtc, reg: u8, ctx: &mut DeviceCtx) -> u8 {
        rtc.write(0, &[reg], ctx);
        let mut b = [0u8];
        rtc.read(1, &mut b, ctx);
        b[0]
    }

    #[test]
    fn civil_dates() {
        let c = Civil::from_unix(0);
        assert_eq!((c.year, c.month, c.day, c.weekday), (1970, 1, 1, 4));
        // 2026-12-08 01:23:45 UTC, a Tuesday.
        let c = Civil::from_unix(1_796_693_025);
        assert_eq!(
            (c.year, c.month, c.day, c.weekday, c.hour, c.minute, c.second),
            (2026, 12, 8, 2, 1, 23, 45)
        );
        // 2024-02-29 (leap day) 23:59:59.
        let c = Civil::from_unix(1_709_251_199);
        assert_eq!((c.year, c.month, c.day), (2024, 2, 29));
    }

    #[test]
    fn the_seconds_read_is_the_logged_sample_and_the_rest_is_state() {
        let mut rtc = Rtc::new();
        let mut ctx = DeviceCtx::replayed(0, vec![1_796_693_025]);
        assert_eq!(read(&mut rtc, SECONDS, &mut ctx), 0x45);
        assert_eq!(
            ctx.taken().map(|(_, v)| v.to_vec()),
            Some(vec![1_796_693_025])
        );
        // Minutes to century: the held sample, BCD, nothing more taken.
        let mut ctx = DeviceCtx::new(0);
        let regs = [
            MINUTES,
            HOURS,
            DAY_OF_MONTH,
            MONTH,
            YEAR,
            CENTURY,
            DAY_OF_WEEK,
        ];
        let got: Vec<u8> = regs.iter().map(|&r| read(&mut rtc, r, &mut ctx)).collect();
        assert_eq!(got, vec![0x23, 0x01, 0x08, 0x12, 0x26, 0x20, 3]);
        assert!(ctx.taken().is_none());
        assert_eq!(read(&mut rtc, REG_A, &mut ctx) & 0x80, 0, "never updating");
        assert_eq!(read(&mut rtc, REG_D, &mut ctx), D_VRT);
    }

    #[test]
    fn binary_mode_and_cmos_ram() {
        let mut rtc = Rtc::new();
        let mut ctx = DeviceCtx::replayed(0, vec![1_796_693_025]);
        rtc.write(0, &[REG_B], &mut ctx);
        rtc.write(1, &[B_24H | B_BINARY], &mut ctx);
        assert_eq!(read(&mut rtc, SECONDS, &mut ctx), 45);
        rtc.write(0, &[0x40], &mut ctx);
        rtc.write(1, &[0x5a], &mut ctx);
        assert_eq!(read(&mut rtc, 0x40, &mut ctx), 0x5a);
        let back = Rtc::from_state(&rtc.state()).unwrap();
        assert_eq!(back.state(), rtc.state());
    }
}
