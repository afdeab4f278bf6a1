//! VMM core costs: VM-exit round trips (port I/O exits per second), the
//! cost of an instruction the VMM emulates, and the bundled guest's boot
//! time. Prints a markdown table for docs/benchmarks.md.
//!
//! Run: `cargo bench --bench vmm`

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvmm::guest::GUEST_ELF;
use ftvmm::testkit::pio_loop;
use vmm::{Live, Machine, MachineConfig, RunEnd};

const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn exits_per_sec(n: u32, read: bool) -> f64 {
    let image = pio_loop(n, read);
    median(
        (0..ROUNDS)
            .map(|_| {
                let cfg = MachineConfig::new(16, "", Box::new(std::io::sink()));
                let mut m = Machine::new(cfg, &image).expect("VM");
                let t = Instant::now();
                assert_eq!(m.run(&mut Live).expect("run"), RunEnd::PowerOff(0));
                f64::from(n) / t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// `n` times `insn` in a loop at CPL0, then power off.
fn cpl0_loop(n: u32, insn: &[u8]) -> Vec<u8> {
    let mut c = vec![0xb9];
    c.extend_from_slice(&n.to_le_bytes()); // mov ecx, n
    c.extend_from_slice(insn);
    c.extend_from_slice(&[0xff, 0xc9, 0x75]); // dec ecx; jnz loop
    c.push((-(insn.len() as i8) - 4) as u8);
    c.extend_from_slice(&[0x66, 0xba, 0x00, 0xf0, 0x31, 0xc0, 0xee, 0xf4]); // power off
    vmm::loader::minimal_elf(&c, None)
}

/// Seconds per loop iteration of `insn` at CPL0 (median of ROUNDS), and
/// how many the VMM emulated in the last run.
fn cpl0_time(n: u32, insn: &[u8]) -> (f64, u64) {
    let image = cpl0_loop(n, insn);
    let mut emulated = 0;
    let t = median(
        (0..ROUNDS)
            .map(|_| {
                let cfg = MachineConfig::new(16, "", Box::new(std::io::sink()));
                let mut m = Machine::new(cfg, &image).expect("VM");
                let t = Instant::now();
                assert_eq!(m.run(&mut Live).expect("run"), RunEnd::PowerOff(0));
                emulated = m.emulation_stats().total();
                t.elapsed().as_secs_f64() / f64::from(n)
            })
            .collect(),
    );
    (t, emulated)
}

/// Records when the first byte of serial output arrived.
#[derive(Clone, Default)]
struct FirstByte(Arc<Mutex<Option<Instant>>>);

impl Write for FirstByte {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut t) = self.0.lock() {
            t.get_or_insert_with(Instant::now);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn boot_times() -> (Duration, Duration, Duration) {
    let mut create = Vec::new();
    let mut banner = Vec::new();
    let mut whole = Vec::new();
    for _ in 0..ROUNDS {
        let first = FirstByte::default();
        let t = Instant::now();
        let cfg = MachineConfig::new(
            64,
            "ticks=1",
            Box::new(vmm::output::ConsoleWriter(first.clone())),
        );
        let mut m = Machine::new(cfg, GUEST_ELF).expect("VM");
        create.push(t.elapsed().as_secs_f64());
        assert_eq!(m.run(&mut Live).expect("run"), RunEnd::PowerOff(0));
        whole.push(t.elapsed().as_secs_f64());
        let at = first
            .0
            .lock()
            .ok()
            .and_then(|g| *g)
            .expect("banner printed");
        banner.push((at - t).as_secs_f64());
    }
    let d = |v| Duration::from_secs_f64(median(v));
    (d(create), d(banner), d(whole))
}

fn main() {
    let n = 200_000;
    let out = exits_per_sec(n, false);
    let inp = exits_per_sec(n, true);
    let (create, banner, whole) = boot_times();
    let e = 20_000;
    let (nop, _) = cpl0_time(e, &[0x90]);
    let (clac, emulated) = cpl0_time(e, &[0x0f, 0x01, 0xca]);
    println!("| measure | value |");
    println!("|---|---|");
    println!("| port-write exits/s (OUT, {n} per run, median of {ROUNDS}) | {out:.0} |");
    println!("| port-read exits/s (IN, {n} per run, median of {ROUNDS}) | {inp:.0} |");
    println!("| exit round trip (OUT) | {:.2} µs |", 1e6 / out);
    println!(
        "| emulated CLAC at CPL0 ({e} per run, {emulated} emulated by the VMM), less a NOP | {:.2} µs |",
        (clac - nop) * 1e6
    );
    println!(
        "| VM creation + kernel load (64 MiB) | {:.2} ms |",
        create.as_secs_f64() * 1e3
    );
    println!(
        "| start to first serial byte (banner) | {:.2} ms |",
        banner.as_secs_f64() * 1e3
    );
    println!(
        "| start to power-off with ticks=1 | {:.2} ms |",
        whole.as_secs_f64() * 1e3
    );
}
