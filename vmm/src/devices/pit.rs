//! The 8254 programmable interval timer at ports 0x40-0x43 (offsets 0-3),
//! clocked at 1 193 182 Hz. Channel 0's output drives IRQ0.
//!
//! The PIT keeps no thread and reads no clock: every access carries the host
//! time (`DeviceCtx::now_ns`), the current count is computed from the time the
//! count was loaded, and the VMM asks for channel 0 expiries with
//! [`Pit::next_deadline_ns`] and [`Pit::take_expired`]. Deadline k of a
//! periodic timer is computed from the load time (tick `k * N`, rounded up to
//! the next ns), so rounding never accumulates.
//!
//! Modelled: mode/command words, lobyte/hibyte/lohi access with the read and
//! write flip-flops, the counter latch command (a latched value is held until
//! fully read; a second latch before that is ignored), the read-back command
//! (count and status, with OUT and null-count), and modes 0 (interrupt on
//! terminal count), 2 (rate generator), 3 (square wave) and 4 (software
//! strobe). A new count written in mode 2 or 3 while counting takes effect at
//! the end of the current period, as on the chip; in modes 0 and 4 it
//! restarts counting. A count of 0 means 65536.
//!
//! Approximated or not modelled: counting starts on the write that completes
//! the count, not one clock later; in mode 0 the first byte of a lohi write
//! does not stop the count; mode 3 reloads at full periods only, and its
//! count reads are approximate for odd counts; BCD counting (the bit is kept
//! for status reads, counting stays binary). Gates are fixed high with no
//! rising edge (port 0x61 is not modelled), so the hardware-triggered modes
//! 1 and 5 never start. There is no BIOS: channel 0 is idle until programmed.
//! Only channel 0 interrupts; channels 1 and 2 can be programmed and read.

use serde::{Deserialize, Serialize};

use super::{BusDevice, DeviceCtx, SampleKind};

/// The 8254 input clock, in Hz.
pub const PIT_HZ: u64 = 1_193_182;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Ticks of the input clock from `from_ns` to `to_ns` (0 if not after).
fn ticks_between(from_ns: i128, to_ns: u64) -> u64 {
    let elapsed = u128::try_from(i128::from(to_ns) - from_ns).unwrap_or(0);
    let ticks = elapsed.saturating_mul(u128::from(PIT_HZ)) / u128::from(NS_PER_SEC);
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

/// The first ns at which `ticks` input clocks have elapsed since `origin_ns`,
/// or `None` past the end of the u64 time line.
fn tick_time(origin_ns: i128, ticks: u128) -> Option<u64> {
    let offset = ticks
        .saturating_mul(u128::from(NS_PER_SEC))
        .div_ceil(u128::from(PIT_HZ));
    let at = origin_ns.saturating_add(i128::try_from(offset).ok()?);
    u64::try_from(at.max(0)).ok()
}

/// Keeps a restored period in the range a count can give.
fn clamp_period(n: u32) -> u32 {
    n.clamp(1, 0x1_0000)
}

/// Decodes the mode bits of a control word: 6 and 7 alias 2 and 3.
fn decode_mode(bits: u8) -> u8 {
    match bits & 7 {
        m @ 6..=7 => m - 4,
        m => m,
    }
}

/// How the data port of a channel is read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Access {
    Lo,
    Hi,
    LoHi,
}

impl Access {
    /// Decodes the RW bits of a control word (1-3; 0 is the latch command).
    fn from_bits(bits: u8) -> Option<Access> {
        match bits {
            1 => Some(Access::Lo),
            2 => Some(Access::Hi),
            3 => Some(Access::LoHi),
            _ => None,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Access::Lo => 1,
            Access::Hi => 2,
            Access::LoHi => 3,
        }
    }
}

/// A count held by the latch or read-back command until fully read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct CountLatch {
    value: u16,
    hi_next: bool,
}

/// The programmable registers of a channel (everything but its timing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Regs {
    /// 0-5 (6 and 7 are stored as their aliases 2 and 3).
    mode: u8,
    access: Access,
    bcd: bool,
    /// Low byte of a lohi count waiting for its high byte.
    write_lo: Option<u8>,
    /// Read flip-flop for unlatched lohi reads.
    read_hi_next: bool,
    latch: Option<CountLatch>,
    status: Option<u8>,
    /// What the counter reads while not counting.
    idle_count: u16,
}

/// A new count that replaces the period at the end of period `at_k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Reload {
    at_k: u64,
    n: u32,
}

/// The timing of a counting channel. Ticks count from `origin_ns`; the
/// current segment (one count value) started at tick `seg_tick`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    /// May be negative after a restore onto a younger clock.
    origin_ns: i128,
    seg_tick: u64,
    /// Ticks per period, 1..=65536.
    n: u32,
    /// Interrupts already handed out in this segment.
    fired: u64,
    reload: Option<Reload>,
}

/// [`Run`] with the origin stored relative to the snapshot time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RunState {
    elapsed_ns: u64,
    seg_tick: u64,
    n: u32,
    fired: u64,
    reload: Option<Reload>,
}

impl Run {
    fn start(now_ns: u64, n: u32) -> Run {
        Run {
            origin_ns: i128::from(now_ns),
            seg_tick: 0,
            n,
            fired: 0,
            reload: None,
        }
    }

    fn to_state(&self, now_ns: u64) -> RunState {
        let elapsed = i128::from(now_ns) - self.origin_ns;
        RunState {
            elapsed_ns: u64::try_from(elapsed.max(0)).unwrap_or(u64::MAX),
            seg_tick: self.seg_tick,
            n: self.n,
            fired: self.fired,
            reload: self.reload,
        }
    }

    fn from_state(state: &RunState, now_ns: u64) -> Run {
        Run {
            origin_ns: i128::from(now_ns) - i128::from(state.elapsed_ns),
            seg_tick: state.seg_tick,
            n: clamp_period(state.n),
            fired: state.fired,
            reload: state.reload.map(|r| Reload {
                at_k: r.at_k,
                n: clamp_period(r.n),
            }),
        }
    }

    /// First tick of the segment after the pending reload.
    fn reload_tick(&self, reload: &Reload) -> u64 {
        self.seg_tick
            .saturating_add(reload.at_k.saturating_mul(u64::from(self.n)))
    }

    /// Segment start and period in force at `ticks` since the origin.
    fn segment_at(&self, ticks: u64) -> (u64, u32) {
        match &self.reload {
            Some(r) if ticks >= self.reload_tick(r) => (self.reload_tick(r), r.n),
            _ => (self.seg_tick, self.n),
        }
    }

    /// Ticks into the segment in force at `now_ns`, and its period.
    fn position(&self, now_ns: u64) -> (u64, u32) {
        let ticks = ticks_between(self.origin_ns, now_ns);
        let (start, n) = self.segment_at(ticks);
        (ticks.saturating_sub(start), n)
    }

    /// When period `k` of the current segment ends.
    fn period_end(&self, k: u64) -> Option<u64> {
        let tick = u128::from(self.seg_tick) + u128::from(k) * u128::from(self.n);
        tick_time(self.origin_ns, tick)
    }

    /// Periods completed by `now_ns` not yet handed out, and when the first
    /// of them ended. Crosses into the reload's segment if it is reached.
    fn collect_periodic(&mut self, now_ns: u64) -> (u64, Option<u64>) {
        let mut total = 0u64;
        let mut first = None;
        loop {
            let ticks = ticks_between(self.origin_ns, now_ns);
            let due = ticks.saturating_sub(self.seg_tick) / u64::from(self.n);
            let reload_due = self.reload.filter(|r| due >= r.at_k);
            let upto = reload_due.map_or(due, |r| r.at_k);
            if upto > self.fired {
                first = first.or_else(|| self.period_end(self.fired + 1));
                total = total.saturating_add(upto - self.fired);
                self.fired = upto;
            }
            if reload_due.is_none() {
                return (total, first);
            }
            self.promote();
        }
    }

    /// Moves into the segment of the pending reload.
    fn promote(&mut self) {
        if let Some(r) = self.reload.take() {
            self.seg_tick = self.reload_tick(&r);
            self.n = r.n;
            self.fired = 0;
        }
    }
}

/// One counter of the 8254.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Channel {
    regs: Regs,
    run: Option<Run>,
}

/// Snapshot of one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ChannelState {
    regs: Regs,
    run: Option<RunState>,
}

impl Channel {
    fn new() -> Channel {
        Channel {
            regs: Regs {
                mode: 0,
                access: Access::LoHi,
                bcd: false,
                write_lo: None,
                read_hi_next: false,
                latch: None,
                status: None,
                idle_count: 0,
            },
            run: None,
        }
    }

    fn is_periodic(&self) -> bool {
        matches!(self.regs.mode, 2 | 3)
    }

    /// The tick (since load) of a one-shot's interrupt: OUT rises at
    /// terminal count in mode 0, one clock after it in mode 4.
    fn one_shot_tick(&self, n: u32) -> u64 {
        u64::from(n) + u64::from(self.regs.mode == 4)
    }

    fn count_at(&self, now_ns: u64) -> u16 {
        let Some(run) = &self.run else {
            return self.regs.idle_count;
        };
        let (t, n) = run.position(now_ns);
        let n = u64::from(n);
        let count = match self.regs.mode {
            2 => n - t % n,
            3 => square_wave_count(n, t % n),
            // Modes 0 and 4 keep counting down past zero.
            _ => n.wrapping_sub(t),
        };
        (count & 0xffff) as u16
    }

    fn out_at(&self, now_ns: u64) -> bool {
        let Some(run) = &self.run else {
            return self.regs.mode != 0;
        };
        let (t, n) = run.position(now_ns);
        let n = u64::from(n);
        match self.regs.mode {
            0 => t >= n,
            2 => t % n != n - 1,
            3 => t % n < n.div_ceil(2),
            4 => t != n,
            _ => true,
        }
    }

    fn status_at(&self, now_ns: u64) -> u8 {
        let null_count = self.run.as_ref().is_none_or(|r| r.reload.is_some());
        (u8::from(self.out_at(now_ns)) << 7)
            | (u8::from(null_count) << 6)
            | (self.regs.access.bits() << 4)
            | (self.regs.mode << 1)
            | u8::from(self.regs.bcd)
    }

    /// Interrupts due by `now_ns` not yet handed out, and when the first
    /// of them was due.
    fn collect(&mut self, now_ns: u64) -> (u64, Option<u64>) {
        match self.regs.mode {
            0 | 4 => self.collect_one_shot(now_ns),
            2 | 3 => self
                .run
                .as_mut()
                .map_or((0, None), |run| run.collect_periodic(now_ns)),
            _ => (0, None),
        }
    }

    fn collect_one_shot(&mut self, now_ns: u64) -> (u64, Option<u64>) {
        let Some(tick) = self.run.as_ref().map(|r| self.one_shot_tick(r.n)) else {
            return (0, None);
        };
        match self.run.as_mut() {
            Some(run) if run.fired == 0 && ticks_between(run.origin_ns, now_ns) >= tick => {
                run.fired = 1;
                (1, tick_time(run.origin_ns, u128::from(tick)))
            }
            _ => (0, None),
        }
    }

    /// When the next interrupt not yet handed out is due.
    fn next_deadline(&self) -> Option<u64> {
        let run = self.run.as_ref()?;
        match self.regs.mode {
            2 | 3 => run.period_end(run.fired.saturating_add(1)),
            0 | 4 if run.fired == 0 => {
                tick_time(run.origin_ns, u128::from(self.one_shot_tick(run.n)))
            }
            _ => None,
        }
    }

    fn period_ns(&self) -> Option<u64> {
        let run = self.run.as_ref().filter(|_| self.is_periodic())?;
        let ns = (u64::from(run.n) * NS_PER_SEC + PIT_HZ / 2) / PIT_HZ;
        Some(ns)
    }

    /// A control word for this channel: reset its logic and stop counting.
    fn program(&mut self, access: Access, mode: u8, bcd: bool, now_ns: u64) {
        if bcd {
            tracing::debug!("pit: BCD counting not modelled, counting in binary");
        }
        self.regs = Regs {
            mode,
            access,
            bcd,
            write_lo: None,
            read_hi_next: false,
            latch: None,
            status: None,
            idle_count: self.count_at(now_ns),
        };
        self.run = None;
    }

    /// The count now, as the host value it is (logged; replayed from the log).
    fn sample_count(&self, ctx: &mut DeviceCtx) -> u16 {
        let host = self.count_at(ctx.now_ns);
        (ctx.sample(SampleKind::Counter, u64::from(host)) & 0xffff) as u16
    }

    fn latch_count(&mut self, ctx: &mut DeviceCtx) {
        if self.regs.latch.is_none() {
            self.regs.latch = Some(CountLatch {
                value: self.sample_count(ctx),
                hi_next: false,
            });
        }
    }

    fn latch_status(&mut self, ctx: &mut DeviceCtx) {
        if self.regs.status.is_none() {
            let host = self.status_at(ctx.now_ns);
            let status = ctx.sample(SampleKind::Counter, u64::from(host));
            self.regs.status = Some((status & 0xff) as u8);
        }
    }

    fn write_data(&mut self, value: u8, now_ns: u64) {
        let count = match self.regs.access {
            Access::Lo => u16::from(value),
            Access::Hi => u16::from(value) << 8,
            Access::LoHi => match self.regs.write_lo.take() {
                Some(lo) => u16::from_le_bytes([lo, value]),
                None => {
                    self.regs.write_lo = Some(value);
                    return;
                }
            },
        };
        self.load(count, now_ns);
    }

    /// A complete count was written.
    fn load(&mut self, count: u16, now_ns: u64) {
        let n = if count == 0 {
            0x1_0000
        } else {
            u32::from(count)
        };
        match (self.regs.mode, &mut self.run) {
            (2 | 3, Some(run)) => {
                // Takes effect when the current period ends.
                let (t, _) = run.position(now_ns);
                let at_k = (t / u64::from(run.n)).saturating_add(1);
                run.reload = Some(Reload { at_k, n });
            }
            (0 | 2 | 3 | 4, _) => self.run = Some(Run::start(now_ns, n)),
            // Modes 1 and 5 wait for a gate edge that never comes.
            _ => self.regs.idle_count = count,
        }
    }

    /// A data-port read: latched status or count (device state), else the
    /// live count, sampled.
    fn read_data(&mut self, ctx: &mut DeviceCtx) -> u8 {
        if let Some(status) = self.regs.status.take() {
            return status;
        }
        if let Some(latch) = self.regs.latch.as_mut() {
            let [lo, hi] = latch.value.to_le_bytes();
            let byte = match self.regs.access {
                Access::LoHi if !latch.hi_next => {
                    latch.hi_next = true;
                    return lo;
                }
                Access::Lo => lo,
                _ => hi,
            };
            self.regs.latch = None;
            return byte;
        }
        let [lo, hi] = self.sample_count(ctx).to_le_bytes();
        match self.regs.access {
            Access::Lo => lo,
            Access::Hi => hi,
            Access::LoHi => {
                self.regs.read_hi_next = !self.regs.read_hi_next;
                if self.regs.read_hi_next {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    fn to_state(&self, now_ns: u64) -> ChannelState {
        ChannelState {
            regs: self.regs.clone(),
            run: self.run.as_ref().map(|r| r.to_state(now_ns)),
        }
    }

    fn from_state(state: &ChannelState, now_ns: u64) -> Channel {
        let mut regs = state.regs.clone();
        regs.mode = decode_mode(regs.mode);
        Channel {
            regs,
            run: state.run.as_ref().map(|r| Run::from_state(r, now_ns)),
        }
    }
}

/// Mode 3 decrements by two and reloads at each half period; `t` is the
/// tick within the period of `n` ticks. Odd counts are approximate.
fn square_wave_count(n: u64, t: u64) -> u64 {
    let high = n.div_ceil(2);
    let half_t = if t < high { t } else { t - high };
    (n & !1).saturating_sub(2 * half_t)
}

/// The 8254 timer: three channels, channel 0 on IRQ0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pit {
    channels: [Channel; 3],
    /// Channel-0 interrupts that fell due before a reprogramming and have
    /// not been taken yet, and when the first of them was due.
    owed: u64,
    owed_due_ns: i128,
}

/// A snapshot of the [`Pit`], with times relative to when it was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    channels: [ChannelState; 3],
    owed: u64,
    owed_due_ago_ns: u64,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// A PIT with every channel idle.
    pub fn new() -> Pit {
        Pit {
            channels: [Channel::new(), Channel::new(), Channel::new()],
            owed: 0,
            owed_due_ns: 0,
        }
    }

    /// Snapshot at host time `now_ns`.
    pub fn state(&self, now_ns: u64) -> PitState {
        let owed_ago = (i128::from(now_ns) - self.owed_due_ns).max(0);
        PitState {
            channels: self.channels.each_ref().map(|c| c.to_state(now_ns)),
            owed: self.owed,
            owed_due_ago_ns: u64::try_from(owed_ago).unwrap_or(u64::MAX),
        }
    }

    /// Restores `state` so that host time `now_ns` corresponds to the
    /// moment the snapshot was taken.
    pub fn from_state(state: &PitState, now_ns: u64) -> Pit {
        Pit {
            channels: state
                .channels
                .each_ref()
                .map(|c| Channel::from_state(c, now_ns)),
            owed: state.owed,
            owed_due_ns: i128::from(now_ns) - i128::from(state.owed_due_ago_ns),
        }
    }

    /// When channel 0's next interrupt is due (host ns since VM start; may
    /// be in the past), or `None` when it will not fire.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        if self.owed > 0 {
            return u64::try_from(self.owed_due_ns.max(0)).ok();
        }
        self.channels[0].next_deadline()
    }

    /// How many channel-0 interrupts fell due since the last call.
    pub fn take_expired(&mut self, now_ns: u64) -> u64 {
        let (due, _) = self.channels[0].collect(now_ns);
        let total = self.owed.saturating_add(due);
        self.owed = 0;
        total
    }

    /// Timers switch on at `now_ns` after being silent (a backup going live):
    /// continue from the device state without a catch-up burst. While
    /// silent, the log delivered the primary's ticks, so periods of a
    /// periodic channel 0 that ended meanwhile, and interrupts banked
    /// across a reprogramming, count as delivered: the next interrupt is at
    /// the next period boundary of the programmed schedule (period and
    /// phase kept). A one-shot that has not fired keeps its deadline, and
    /// fires at once if that has passed: the log cannot tell whether the
    /// primary delivered it, and an interrupt a guest waits for must never
    /// be lost (one spurious timer interrupt is harmless).
    pub fn resume(&mut self, now_ns: u64) {
        self.owed = 0;
        let ch = &mut self.channels[0];
        if ch.is_periodic() {
            if let Some(run) = ch.run.as_mut() {
                run.collect_periodic(now_ns);
            }
        }
    }

    /// Channel 0's period when it runs in a periodic mode, rounded to ns.
    pub fn period_ns(&self) -> Option<u64> {
        self.channels[0].period_ns()
    }

    /// Keeps channel-0 interrupts already due across a reprogramming.
    fn bank_channel0(&mut self, now_ns: u64) {
        let (due, first) = self.channels[0].collect(now_ns);
        if due == 0 {
            return;
        }
        if self.owed == 0 {
            self.owed_due_ns = first.map_or(i128::from(now_ns), i128::from);
        }
        self.owed = self.owed.saturating_add(due);
    }

    fn write_control(&mut self, value: u8, ctx: &mut DeviceCtx) {
        let select = usize::from(value >> 6);
        let Some(channel) = self.channels.get_mut(select) else {
            self.read_back(value, ctx);
            return;
        };
        match Access::from_bits((value >> 4) & 3) {
            None => channel.latch_count(ctx),
            Some(access) => {
                channel.program(access, decode_mode(value >> 1), value & 1 != 0, ctx.now_ns);
            }
        }
    }

    /// The read-back command: bit 5 clear latches counts, bit 4 clear
    /// latches statuses, bits 1-3 select channels 0-2.
    fn read_back(&mut self, value: u8, ctx: &mut DeviceCtx) {
        for (i, channel) in self.channels.iter_mut().enumerate() {
            if value & (2 << i) == 0 {
                continue;
            }
            if value & 0x10 == 0 {
                channel.latch_status(ctx);
            }
            if value & 0x20 == 0 {
                channel.latch_count(ctx);
            }
        }
    }

    fn write_byte(&mut self, offset: u64, value: u8, ctx: &mut DeviceCtx) {
        self.bank_channel0(ctx.now_ns);
        match offset {
            0..=2 => self.channels[offset as usize].write_data(value, ctx.now_ns),
            3 => self.write_control(value, ctx),
            _ => tracing::debug!(offset, value, "pit: write outside the device ignored"),
        }
    }

    fn read_byte(&mut self, offset: u64, ctx: &mut DeviceCtx) -> u8 {
        match offset {
            0..=2 => self.channels[offset as usize].read_data(ctx),
            _ => {
                tracing::trace!(offset, "pit: read of control port or beyond");
                0xff
            }
        }
    }
}

impl BusDevice for Pit {
    /// A wider access reads consecutive ports, as on ISA.
    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx) {
        for (i, byte) in (0u64..).zip(data.iter_mut()) {
            *byte = self.read_byte(offset.saturating_add(i), ctx);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceCtx) {
        for (i, &byte) in (0u64..).zip(data.iter()) {
            self.write_byte(offset.saturating_add(i), byte, ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn out(pit: &mut Pit, offset: u64, value: u8, now_ns: u64) {
        pit.write(offset, &[value], &mut DeviceCtx::new(now_ns));
    }

    fn inb(pit: &mut Pit, offset: u64, now_ns: u64) -> u8 {
        let mut b = [0u8];
        pit.read(offset, &mut b, &mut DeviceCtx::new(now_ns));
        b[0]
    }

    /// Programs channel 0 with lohi access, `mode` and `count` at `now_ns`.
    fn program0(pit: &mut Pit, mode: u8, count: u16, now_ns: u64) {
        out(pit, 3, 0x30 | (mode << 1), now_ns);
        let [lo, hi] = count.to_le_bytes();
        out(pit, 0, lo, now_ns);
        out(pit, 0, hi, now_ns);
    }

    /// Reads channel `ch`'s count via the latch command (lohi access).
    fn latched_count(pit: &mut Pit, ch: u8, now_ns: u64) -> u16 {
        out(pit, 3, ch << 6, now_ns);
        let lo = inb(pit, u64::from(ch), now_ns);
        let hi = inb(pit, u64::from(ch), now_ns);
        u16::from_le_bytes([lo, hi])
    }

    /// ns offset of tick `t` from the load time, rounded up.
    fn tick_ns(t: u64) -> u64 {
        (u128::from(t) * 1_000_000_000).div_ceil(1_193_182) as u64
    }

    #[test]
    fn idle_pit_never_fires() {
        let mut pit = Pit::new();
        assert_eq!(pit.next_deadline_ns(), None);
        assert_eq!(pit.take_expired(u64::MAX), 0);
        assert_eq!(pit.period_ns(), None);
    }

    #[test]
    fn hundred_hz_deadlines_are_exact_and_drift_free() {
        let mut pit = Pit::new();
        let t0 = 5 * MS + 123;
        program0(&mut pit, 2, 11932, t0);
        assert_eq!(pit.period_ns(), Some(10_000_151));
        for k in 1..=1000u64 {
            let deadline = pit.next_deadline_ns().unwrap();
            assert_eq!(deadline, t0 + tick_ns(11932 * k));
            assert_eq!(pit.take_expired(deadline - 1), 0);
            assert_eq!(pit.take_expired(deadline), 1);
        }
        // 1000 periods of 11932 ticks: 10.000150858 s, no accumulated error.
        assert_eq!(pit.next_deadline_ns(), Some(t0 + tick_ns(11932 * 1001)));
        assert_eq!(tick_ns(11932 * 1000), 10_000_150_858);
    }

    #[test]
    fn square_wave_fires_every_period() {
        let mut pit = Pit::new();
        program0(&mut pit, 3, 11932, 0);
        assert_eq!(pit.next_deadline_ns(), Some(tick_ns(11932)));
        assert_eq!(pit.take_expired(tick_ns(11932 * 3)), 3);
        assert_eq!(pit.next_deadline_ns(), Some(tick_ns(11932 * 4)));
    }

    #[test]
    fn take_expired_counts_missed_periods() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 1193, 0); // ~1 kHz
        assert_eq!(pit.take_expired(tick_ns(1193 * 250) + 10), 250);
        assert_eq!(pit.take_expired(tick_ns(1193 * 250) + 10), 0);
        assert_eq!(pit.next_deadline_ns(), Some(tick_ns(1193 * 251)));
    }

    #[test]
    fn far_behind_timer_does_not_overflow() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 1, 0);
        let n = pit.take_expired(u64::MAX);
        assert_eq!(n, ticks_between(0, u64::MAX));
        assert_eq!(pit.next_deadline_ns(), None); // beyond u64 time
        assert_eq!(pit.take_expired(u64::MAX), 0);
    }

    #[test]
    fn count_zero_means_65536() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 0, 0);
        assert_eq!(pit.next_deadline_ns(), Some(tick_ns(65536)));
        assert_eq!(latched_count(&mut pit, 0, 0), 0);
        assert_eq!(latched_count(&mut pit, 0, tick_ns(1)), 65535);
    }

    #[test]
    fn one_shot_fires_once() {
        let mut pit = Pit::new();
        program0(&mut pit, 0, 1000, 100);
        let deadline = 100 + tick_ns(1000);
        assert_eq!(pit.next_deadline_ns(), Some(deadline));
        assert_eq!(pit.period_ns(), None);
        assert_eq!(pit.take_expired(deadline - 1), 0);
        assert_eq!(pit.take_expired(deadline + 100 * MS), 1);
        assert_eq!(pit.next_deadline_ns(), None);
        assert_eq!(pit.take_expired(u64::MAX), 0);
    }

    #[test]
    fn mode4_fires_one_clock_after_terminal_count() {
        let mut pit = Pit::new();
        program0(&mut pit, 4, 1000, 0);
        assert_eq!(pit.next_deadline_ns(), Some(tick_ns(1001)));
        // Linux rearms with a new count only: it restarts the one-shot.
        out(&mut pit, 0, 0xd0, 2 * MS);
        out(&mut pit, 0, 0x07, 2 * MS);
        assert_eq!(pit.take_expired(2 * MS), 1);
        assert_eq!(pit.next_deadline_ns(), Some(2 * MS + tick_ns(2001)));
    }

    #[test]
    fn rewriting_mode0_count_restarts_it() {
        let mut pit = Pit::new();
        program0(&mut pit, 0, 10000, 0);
        out(&mut pit, 0, 0x10, MS);
        out(&mut pit, 0, 0x27, MS);
        assert_eq!(pit.next_deadline_ns(), Some(MS + tick_ns(10000)));
        assert_eq!(latched_count(&mut pit, 0, MS), 10000);
    }

    #[test]
    fn new_count_in_rate_generator_applies_at_period_end() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 1000, 0);
        let mid = tick_ns(2500);
        out(&mut pit, 0, 0xf4, mid); // 500
        out(&mut pit, 0, 0x01, mid);
        assert_eq!(pit.take_expired(mid), 2);
        assert_eq!(pit.next_deadline_ns(), Some(tick_ns(3000)));
        // The current period (ticks 2000-3000) runs out with the old count.
        assert_eq!(latched_count(&mut pit, 0, mid), 500);
        assert_eq!(latched_count(&mut pit, 0, tick_ns(2999)), 1);
        assert_eq!(latched_count(&mut pit, 0, tick_ns(3000)), 500);
        assert_eq!(pit.take_expired(tick_ns(3000)), 1);
        assert_eq!(pit.next_deadline_ns(), Some(tick_ns(3500)));
        assert_eq!(pit.take_expired(tick_ns(5000)), 4);
        assert_eq!(pit.period_ns(), Some(419_048));
    }

    #[test]
    fn control_word_restarts_at_once_without_losing_due_interrupts() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 1000, 0);
        let t = tick_ns(3500);
        program0(&mut pit, 2, 100, t);
        assert_eq!(pit.next_deadline_ns(), Some(tick_ns(1000)));
        assert_eq!(pit.take_expired(t), 3);
        assert_eq!(pit.next_deadline_ns(), Some(t + tick_ns(100)));
    }

    #[test]
    fn control_word_stops_counting_until_count_written() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 1000, 0);
        out(&mut pit, 3, 0x34, tick_ns(10));
        assert_eq!(pit.next_deadline_ns(), None);
        assert_eq!(latched_count(&mut pit, 0, MS), 990);
        out(&mut pit, 0, 0xe8, MS);
        assert_eq!(pit.next_deadline_ns(), None); // half a count
        out(&mut pit, 0, 0x03, MS);
        assert_eq!(pit.next_deadline_ns(), Some(MS + tick_ns(1000)));
    }

    #[test]
    fn counter_reads_decrease_over_time() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 50000, 0);
        let mut last = u16::MAX;
        for i in 0..40 {
            let now = i * MS;
            let count = latched_count(&mut pit, 0, now);
            assert!(count < last, "count {count} at {now} not below {last}");
            assert_eq!(u64::from(count), 50000 - ticks_between(0, now));
            last = count;
        }
        // The rate generator wrapped around after 50000 ticks.
        assert!(latched_count(&mut pit, 0, 42 * MS) > 49000);
    }

    #[test]
    fn mode0_counts_through_zero() {
        let mut pit = Pit::new();
        program0(&mut pit, 0, 10, 0);
        assert_eq!(latched_count(&mut pit, 0, tick_ns(12)), 0xfffe);
    }

    #[test]
    fn square_wave_counts_down_by_two() {
        let mut pit = Pit::new();
        program0(&mut pit, 3, 100, 0);
        assert_eq!(latched_count(&mut pit, 0, 0), 100);
        assert_eq!(latched_count(&mut pit, 0, tick_ns(10)), 80);
        assert_eq!(latched_count(&mut pit, 0, tick_ns(60)), 80); // low half
    }

    #[test]
    fn latch_holds_value_until_fully_read() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 40000, 0);
        out(&mut pit, 3, 0x00, tick_ns(1000)); // latch: 39000
        out(&mut pit, 3, 0x00, tick_ns(2000)); // ignored, still latched
        assert_eq!(inb(&mut pit, 0, tick_ns(5000)), 39000u16.to_le_bytes()[0]);
        assert_eq!(inb(&mut pit, 0, tick_ns(9000)), 39000u16.to_le_bytes()[1]);
        // Released: live again.
        assert_eq!(latched_count(&mut pit, 0, tick_ns(10000)), 30000);
    }

    #[test]
    fn unlatched_lohi_reads_alternate() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 0x1234, 0);
        assert_eq!(inb(&mut pit, 0, 0), 0x34);
        assert_eq!(inb(&mut pit, 0, 0), 0x12);
        assert_eq!(inb(&mut pit, 0, 0), 0x34);
        // The second byte comes from the count at the time it is read.
        assert_eq!(inb(&mut pit, 0, tick_ns(0x200)), 0x10);
    }

    #[test]
    fn lobyte_and_hibyte_access() {
        let mut pit = Pit::new();
        out(&mut pit, 3, 0x14, 0); // channel 0, lobyte, mode 2
        out(&mut pit, 0, 0x80, 0);
        assert_eq!(pit.next_deadline_ns(), Some(tick_ns(0x80)));
        assert_eq!(inb(&mut pit, 0, 0), 0x80);
        assert_eq!(inb(&mut pit, 0, 0), 0x80);

        out(&mut pit, 3, 0x24, 0); // channel 0, hibyte, mode 2
        out(&mut pit, 0, 0x02, 0);
        assert_eq!(pit.next_deadline_ns(), Some(tick_ns(0x200)));
        assert_eq!(inb(&mut pit, 0, tick_ns(0x80)), 0x01);
    }

    #[test]
    fn read_back_latches_status_then_count() {
        let mut pit = Pit::new();
        out(&mut pit, 3, 0xb6, 0); // channel 2, lohi, mode 3
        out(&mut pit, 2, 0x00, 0);
        out(&mut pit, 2, 0x10, 0);
        out(&mut pit, 3, 0xc8, tick_ns(100)); // read-back count+status, ch 2
        assert_eq!(inb(&mut pit, 2, tick_ns(500)), 0x80 | 0x30 | 0x06);
        // Mode 3 counts down by two: 0x1000 - 2 * 100.
        assert_eq!(inb(&mut pit, 2, tick_ns(500)), 0x38);
        assert_eq!(inb(&mut pit, 2, tick_ns(500)), 0x0f);
        // Status alone: a fresh control word shows OUT low, null count.
        out(&mut pit, 3, 0x30, tick_ns(600));
        out(&mut pit, 3, 0xe2, tick_ns(600));
        assert_eq!(inb(&mut pit, 0, tick_ns(600)), 0x40 | 0x30);
    }

    #[test]
    fn hardware_triggered_modes_never_start() {
        let mut pit = Pit::new();
        program0(&mut pit, 1, 100, 0);
        assert_eq!(pit.next_deadline_ns(), None);
        assert_eq!(pit.take_expired(MS), 0);
        assert_eq!(latched_count(&mut pit, 0, MS), 100);
    }

    #[test]
    fn other_channels_do_not_interrupt() {
        let mut pit = Pit::new();
        out(&mut pit, 3, 0x74, 0); // channel 1, lohi, mode 2
        out(&mut pit, 1, 0x10, 0);
        out(&mut pit, 1, 0x00, 0);
        assert_eq!(pit.next_deadline_ns(), None);
        assert_eq!(latched_count(&mut pit, 1, tick_ns(3)), 13);
    }

    /// The host values an access took in.
    fn taken(pit: &mut Pit, offset: u64, write: Option<u8>, now_ns: u64) -> Vec<u64> {
        let mut ctx = DeviceCtx::new(now_ns);
        match write {
            Some(v) => pit.write(offset, &[v], &mut ctx),
            None => pit.read(offset, &mut [0u8], &mut ctx),
        }
        ctx.taken().map(|(_, v)| v.to_vec()).unwrap_or_default()
    }

    #[test]
    fn live_counts_and_latches_are_sampled_latched_reads_are_state() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 1000, 0);
        // An unlatched read samples the count; so does the latch command.
        assert_eq!(taken(&mut pit, 0, None, tick_ns(10)), [990]);
        assert_eq!(taken(&mut pit, 0, None, tick_ns(10)), [990]);
        assert_eq!(taken(&mut pit, 3, Some(0x00), tick_ns(20)), [980]);
        // Reading the latch is deterministic: nothing sampled.
        assert!(taken(&mut pit, 0, None, tick_ns(30)).is_empty());
        assert!(taken(&mut pit, 0, None, tick_ns(40)).is_empty());
        // Read-back of channel 0's status and count: two values.
        assert_eq!(taken(&mut pit, 3, Some(0xc2), tick_ns(50)).len(), 2);
        // Programming takes no host value the guest can see.
        assert!(taken(&mut pit, 3, Some(0x34), tick_ns(60)).is_empty());
    }

    #[test]
    fn a_latch_replayed_from_the_log_holds_the_logged_count() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 40000, 0);
        // The latch command gets the primary's count from the log ...
        pit.write(
            3,
            &[0x00],
            &mut DeviceCtx::replayed(tick_ns(5), vec![12345]),
        );
        // ... and both bytes read back from it, whatever the clock says now.
        let lo = inb(&mut pit, 0, tick_ns(39000));
        let hi = inb(&mut pit, 0, tick_ns(39001));
        assert_eq!(u16::from_le_bytes([lo, hi]), 12345);
    }

    #[test]
    fn resume_skips_periods_that_passed_while_silent_without_moving_the_phase() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 1000, 0);
        // Silent for 7.5 periods: no interrupt is taken.
        let now = tick_ns(7500);
        pit.resume(now);
        assert_eq!(pit.take_expired(now), 0, "no catch-up tick");
        assert_eq!(pit.next_deadline_ns(), Some(tick_ns(8000)));
        assert_eq!(pit.take_expired(tick_ns(8000)), 1);
    }

    #[test]
    fn resume_drops_banked_interrupts_but_keeps_an_unfired_one_shot() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 100, 0);
        program0(&mut pit, 0, 5000, tick_ns(350)); // 3 periods banked
        let now = tick_ns(1000);
        pit.resume(now);
        assert_eq!(pit.take_expired(now), 0, "the banked ones are gone");
        assert_eq!(pit.next_deadline_ns(), Some(tick_ns(350) + tick_ns(5000)));
        // A one-shot whose deadline passed while silent still fires once.
        let late = tick_ns(350) + tick_ns(6000);
        pit.resume(late);
        assert_eq!(pit.take_expired(late), 1);
    }

    #[test]
    fn stray_accesses_are_harmless() {
        let mut pit = Pit::new();
        out(&mut pit, 7, 0x34, 0);
        assert_eq!(inb(&mut pit, 3, 0), 0xff);
        assert_eq!(inb(&mut pit, 9, 0), 0xff);
        let mut wide = [0u8; 4];
        pit.read(u64::MAX, &mut wide, &mut DeviceCtx::new(0));
        assert_eq!(pit, Pit::new());
    }

    #[test]
    fn restore_continues_as_if_not_stopped() {
        let mut pit = Pit::new();
        program0(&mut pit, 2, 1000, 0);
        let mid = tick_ns(2500);
        out(&mut pit, 0, 0xf4, mid);
        out(&mut pit, 0, 0x01, mid); // pending reload
        out(&mut pit, 3, 0x00, mid); // latched, unread
        let saved = pit.state(mid);

        let mut same = Pit::from_state(&saved, mid);
        assert_eq!(same, pit);
        for now in [mid, tick_ns(3100), tick_ns(9000)] {
            assert_eq!(same.take_expired(now), pit.take_expired(now));
            assert_eq!(same.next_deadline_ns(), pit.next_deadline_ns());
            assert_eq!(inb(&mut same, 0, now), inb(&mut pit, 0, now));
        }
    }

    #[test]
    fn restore_on_another_clock_shifts_by_base_difference() {
        let mut pit = Pit::new();
        let t0 = 40 * MS;
        program0(&mut pit, 2, 11932, t0);
        let saved_at = t0 + 25 * MS;
        pit.take_expired(saved_at);
        let saved = pit.state(saved_at);
        assert_eq!(saved, pit.state(saved_at));

        // Onto a younger clock: the load time becomes negative.
        for base in [3 * MS, 500 * MS] {
            let mut moved = Pit::from_state(&saved, base);
            let shift = |t: u64| t - saved_at + base;
            assert_eq!(moved.next_deadline_ns(), pit.next_deadline_ns().map(shift));
            assert_eq!(moved.period_ns(), pit.period_ns());
            let mut orig = pit.clone();
            for dt in [0, 3 * MS, 17 * MS, 95 * MS] {
                assert_eq!(
                    latched_count(&mut moved, 0, base + dt),
                    latched_count(&mut orig, 0, saved_at + dt)
                );
                assert_eq!(
                    moved.take_expired(base + dt),
                    orig.take_expired(saved_at + dt)
                );
            }
            assert_eq!(moved.state(base + 95 * MS), orig.state(saved_at + 95 * MS));
        }
    }

    #[test]
    fn owed_interrupts_survive_snapshot() {
        let mut pit = Pit::new();
        program0(&mut pit, 0, 100, 0);
        let late = tick_ns(500);
        program0(&mut pit, 0, 5000, late); // the first one-shot fired unseen
        assert_eq!(pit.next_deadline_ns(), Some(tick_ns(100)));
        let mut moved = Pit::from_state(&pit.state(late), late + 7);
        assert_eq!(moved.next_deadline_ns(), Some(tick_ns(100) + 7));
        assert_eq!(moved.take_expired(late + 7), 1);
        assert_eq!(moved.next_deadline_ns(), Some(late + 7 + tick_ns(5000)));
    }
}
