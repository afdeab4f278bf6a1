//! Shared helpers for the vmm integration tests: the test guests (flat
//! binaries assembled from `tests/guests/*.S`), machines, recording and
//! replaying in memory.
#![allow(dead_code)]

use std::time::Duration;

use ftlog::LogEntry;
use vm_memory::{Bytes, GuestAddress};
use vmm::clock::ClockMode;
use vmm::devices::ftclock::Entropy;
use vmm::output::Collector;
use vmm::points::PointMode;
use vmm::record::{MemorySink, Recorder};
use vmm::replay::{MemorySource, Replayer};
use vmm::{Live, Machine, MachineConfig, RunEnd};

/// Prints a digit (ticks mod 8) per spin with interrupts on (irqprint.S).
pub const IRQPRINT: &[u8] = include_bytes!("../guests/irqprint.bin");
/// Sleeps tick by tick; the ISR's first access is an ftclock read
/// (irqclock.S).
pub const IRQCLOCK: &[u8] = include_bytes!("../guests/irqclock.bin");
/// Entropy, clock, PIT latch and read-back samples, interrupts off
/// (samples.S).
pub const SAMPLES: &[u8] = include_bytes!("../guests/samples.bin");

/// Where the guests keep their tick count and records.
pub const TICKS: u64 = 0x20_0000;
/// Records start here.
pub const RECORDS: u64 = 0x20_0008;

/// Tests need KVM. In CI its absence is a failure; elsewhere the test says
/// so loudly and returns early.
pub fn kvm_or_skip() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("/dev/kvm is missing: KVM is required in CI");
    }
    eprintln!("SKIPPED: /dev/kvm is missing on this machine");
    false
}

/// A kernel image around a flat test guest.
pub fn image(code: &[u8]) -> Vec<u8> {
    vmm::loader::minimal_elf(code, None)
}

/// How a side's clock and entropy behave.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    /// Device time.
    pub clock: ClockMode,
    /// ftclock's entropy.
    pub entropy: Entropy,
}

/// Host time and host entropy.
pub const REAL: Host = Host {
    clock: ClockMode::Host,
    entropy: Entropy::Host,
};

/// A VM in the `exits` backend, outputs to `out`.
pub fn machine(code: &[u8], out: &Collector, live_timers: bool, host: Host) -> Machine {
    let mut c = MachineConfig::new(32, "", Box::new(out.clone()));
    c.points = PointMode::Exits;
    c.live_timers = live_timers;
    c.clock = host.clock;
    c.entropy = host.entropy;
    Machine::new(c, &image(code)).unwrap()
}

/// A recorded run: its log, its outputs and how it ended.
pub struct Recording {
    /// The log.
    pub entries: Vec<LogEntry>,
    /// What the primary produced, with tags.
    pub out: Collector,
    /// The primary after the run.
    pub m: Machine,
    /// How it ended.
    pub end: RunEnd,
}

/// Record `code` to the end.
pub fn record(code: &[u8], host: Host) -> Recording {
    let out = Collector::new();
    let mut m = machine(code, &out, true, host);
    let mut rec = Recorder::new(MemorySink::default(), Some(Duration::from_millis(20)));
    let end = m.run(&mut rec).unwrap();
    rec.finish(&mut m, end).unwrap();
    Recording {
        entries: rec.into_sink().entries,
        out,
        m,
        end,
    }
}

/// A backup that replayed a log cut after `entries` and then went live, as
/// `ftvmm run --backup` does.
pub struct Backup {
    /// How the replay of the cut log ended.
    pub replay_end: RunEnd,
    /// How the live run ended.
    pub end: RunEnd,
    /// Everything the backup produced (replay, then live), with tags.
    pub out: Collector,
    /// The backup after the run.
    pub m: Machine,
}

/// Live, until the guest has written `n` console bytes.
struct Until(Collector, usize);

impl vmm::Observer for Until {
    fn at_point(&mut self, m: &mut Machine) -> vmm::Result<vmm::Flow> {
        if self.0.console().len() >= self.1 {
            return Ok(vmm::Flow::Pause);
        }
        Live.at_point(m)
    }
}

/// Replay `entries` (a log cut there), go live and run on until the guest
/// ends or has written `console` bytes.
pub fn replay_cut_then_go_live_until(
    code: &[u8],
    entries: &[LogEntry],
    host: Host,
    console: usize,
) -> Backup {
    let out = Collector::new();
    let mut m = machine(code, &out, false, host);
    let mut rep = Replayer::new(MemorySource::cut(entries.to_vec()));
    let replay_end = m
        .run(&mut rep)
        .unwrap_or_else(|e| panic!("cut after {} entries: {e}", entries.len()));
    rep.finish(&mut m, replay_end)
        .unwrap_or_else(|e| panic!("cut after {} entries: {e}", entries.len()));
    m.set_live_timers(true);
    let end = if replay_end == RunEnd::Paused {
        m.run(&mut Until(out.clone(), console)).unwrap()
    } else {
        replay_end
    };
    Backup {
        replay_end,
        end,
        out,
        m,
    }
}

/// Replay `entries` (a log cut there), go live and run to the guest's end.
pub fn replay_cut_then_go_live(code: &[u8], entries: &[LogEntry], host: Host) -> Backup {
    replay_cut_then_go_live_until(code, entries, host, usize::MAX)
}

/// A u64 of guest memory.
pub fn read_u64(m: &Machine, addr: u64) -> u64 {
    m.memory().read_obj(GuestAddress(addr)).unwrap()
}

/// Guest memory bytes.
pub fn read_bytes(m: &Machine, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    m.memory().read_slice(&mut b, GuestAddress(addr)).unwrap();
    b
}
