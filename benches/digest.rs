//! State digest and dirty-logging costs, before (`Blake3RegsRam`: all of RAM
//! hashed at every digest, no dirty logging) and after (`Blake3RegsPageTree`:
//! only the pages dirtied since the last digest), on a 64 MiB guest:
//!
//! 1. microseconds per digest, for a given number of dirty pages;
//! 2. the digest's share of the primary's CPU over a recorded run (exits
//!    backend, a digest every 200 ms as `ftvmm run --primary` logs them,
//!    the log encoded and discarded) for an idle, a busy (CPU-bound) and a
//!    memory-writing guest;
//! 3. what dirty logging itself costs the guest (KVM write-protects every
//!    page at each harvest; the first write to a page after it faults):
//!    guest speed with logging off, and on with a harvest every 200 ms.
//!
//! The process pins itself to cpu0 first (as `taskset -c 0` would: the
//! primary's CPU in docs/benchmarks.md), so its threads share one core.
//!
//! Run: `cargo bench --bench digest` (prints markdown for docs/benchmarks.md).

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ftlog::{DigestKind, ExecBackend, LogWriter};
use ftvmm::console::Capture;
use ftvmm::guest::GUEST_ELF;
use ftvmm::rr::{header_for, RecordOptions};
use ftvmm::testkit::{page_sweeper, Hooked};
use vm_memory::{Bytes, GuestAddress};
use vmm::dirty::DirtyCursor;
use vmm::memory::PAGE_SIZE;
use vmm::points::PointMode;
use vmm::record::Recorder;
use vmm::{Flow, Live, Machine, MachineConfig, Observer, RunEnd};

const MEM_MIB: u64 = 64;
const DIGEST_EVERY: Duration = Duration::from_millis(200);
const IDLE: &str = "hz=100 ticks=500 work=1000 digest_every=100";
const BUSY: &str = "hz=1000 ticks=4000 work=500000 digest_every=1000";
/// Sweeps of the page sweeper (a few seconds here).
const SWEEPS: u32 = 600;

fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it, and
    // sched_setaffinity reads it for the calling thread (pid 0).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(rc, 0, "cannot pin to cpu0");
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn steps(out: &Capture) -> f64 {
    out.text()
        .lines()
        .find_map(|l| l.strip_prefix("work steps "))
        .and_then(|n| n.parse().ok())
        .expect("guest printed its work count")
}

fn config(cmdline: &str, out: &Capture) -> MachineConfig {
    let mut c = MachineConfig::new(MEM_MIB, cmdline, Box::new(out.clone()));
    c.points = PointMode::Exits;
    c
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

/// Pause at the first point after `n` exits.
struct PauseAfter(u64);

impl Observer for PauseAfter {
    fn at_point(&mut self, m: &mut Machine) -> vmm::Result<Flow> {
        if m.exit_count() >= self.0 {
            return Ok(Flow::Pause);
        }
        Live.at_point(m)
    }
}

/// Fill `n` pages of the top half of RAM (unused by the guest) with
/// non-zero bytes the way the VMM would (through the tracked Bytes API).
fn dirty_pages(m: &Machine, n: usize, round: u8) {
    let base = (MEM_MIB << 20) / 2;
    let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i as u8) ^ round | 1).collect();
    for i in 0..n as u64 {
        m.memory()
            .write_slice(&page, GuestAddress(base + i * PAGE_SIZE))
            .unwrap();
    }
}

fn time_digests(m: &mut Machine, dirty: usize) -> Duration {
    let mut v = Vec::new();
    for round in 0..9u8 {
        dirty_pages(m, dirty, round);
        let before = m.digest_stats().cpu;
        m.digest().unwrap();
        v.push(m.digest_stats().cpu - before);
    }
    median(v)
}

fn micro() {
    let out = Capture::new();
    let forever = "hz=100 ticks=0 work=1000";
    let mut m = Machine::new(config(forever, &out), GUEST_ELF).unwrap();
    assert_eq!(m.run(&mut PauseAfter(1000)).unwrap(), RunEnd::Paused);
    m.set_digest_kind(DigestKind::Blake3RegsRam);
    let full = time_digests(&mut m, 0);
    m.set_digest_kind(DigestKind::Blake3RegsPageTree);
    let before = m.digest_stats().cpu;
    m.digest().unwrap();
    let first = m.digest_stats().cpu - before;
    println!("| digest of a 64 MiB guest | CPU µs (median of 9) |");
    println!("|---|---|");
    println!("| `Blake3RegsRam` (all RAM, before) | {} |", us(full));
    println!(
        "| `Blake3RegsPageTree`, first digest (hashes every page, builds the cache) | {} |",
        us(first)
    );
    for n in [0usize, 16, 256, 1024, 4096] {
        let d = time_digests(&mut m, n);
        println!(
            "| `Blake3RegsPageTree`, {n} dirty pages ({} KiB) | {} |",
            n * 4,
            us(d)
        );
    }
    println!();
}

#[derive(Clone, Copy, PartialEq)]
enum Setup {
    /// Full digests, no dirty logging: how it was.
    Before,
    /// Incremental digests over the dirty log.
    After,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Before => "before (`Blake3RegsRam`, no dirty log)",
            Setup::After => "after (`Blake3RegsPageTree`)",
        }
    }

    fn apply(self, m: &mut Machine) {
        match self {
            Setup::Before => {
                m.set_digest_kind(DigestKind::Blake3RegsRam);
                m.set_dirty_logging(false).unwrap();
            }
            Setup::After => m.set_digest_kind(DigestKind::Blake3RegsPageTree),
        }
    }
}

struct Guest {
    name: &'static str,
    image: Vec<u8>,
    cmdline: &'static str,
    /// Guest work in the run: hash steps, or page writes.
    work: fn(&Capture) -> f64,
    unit: &'static str,
}

fn sweeper_pages() -> u64 {
    let area = ftvmm::testkit::page_sweeper_area(MEM_MIB);
    (area.end - area.start) / PAGE_SIZE
}

fn guests() -> Vec<Guest> {
    vec![
        Guest {
            name: "idle (bundled, `work=1000`)",
            image: GUEST_ELF.to_vec(),
            cmdline: IDLE,
            work: steps,
            unit: "steps/s",
        },
        Guest {
            name: "busy (bundled, CPU-bound)",
            image: GUEST_ELF.to_vec(),
            cmdline: BUSY,
            work: steps,
            unit: "steps/s",
        },
        Guest {
            name: "memory-writing (page sweeper, 60 MiB per sweep)",
            image: page_sweeper(MEM_MIB, SWEEPS),
            cmdline: "",
            work: |_| f64::from(SWEEPS) * sweeper_pages() as f64,
            unit: "page writes/s",
        },
    ]
}

fn recorded(g: &Guest, setup: Setup) {
    let out = Capture::new();
    let cfg = config(g.cmdline, &out);
    let opts = RecordOptions {
        backend: ExecBackend::Exits,
        digest_every: Some(DIGEST_EVERY),
        net_mac: None,
    };
    let mut header = header_for(&g.image, &cfg, &opts).unwrap();
    let mut m = Machine::new(cfg, &g.image).unwrap();
    setup.apply(&mut m);
    header.state_digest = m.digest_kind();
    let writer = LogWriter::new(std::io::sink(), &header).unwrap();
    // The digest stats and process CPU at the first point after the first
    // digest (which hashes what the loader wrote), so steady state can be
    // told apart.
    let mut first = None;
    let mut obs = Hooked {
        inner: Recorder::new(writer, opts.digest_every),
        hook: |m: &mut Machine| {
            if first.is_none() && m.digest_stats().digests == 1 {
                first = Some((m.digest_stats(), cpu_time()));
            }
            Ok(())
        },
    };
    let cpu0 = cpu_time();
    let end = m.run(&mut obs).unwrap();
    obs.inner.finish(&mut m, end).unwrap();
    drop(obs);
    let cpu = cpu_time() - cpu0;
    assert_eq!(end, RunEnd::PowerOff(0), "{}", out.text());
    let s = m.digest_stats();
    let (f, cpu_at_first) = first.expect("a digest was taken");
    let n = (s.digests - 1).max(1);
    let steady = s.cpu - f.cpu;
    println!(
        "| {} | {} | {:.2} | {} | {} | {} | {} | {:.0} | {:.2}% | {:.2}% | {:.3e} {} |",
        g.name,
        setup.name(),
        cpu.as_secs_f64(),
        s.digests,
        us(f.cpu),
        us(steady / n as u32),
        us((s.harvest_cpu - f.harvest_cpu) / n as u32),
        (s.pages_hashed - f.pages_hashed) as f64 / n as f64,
        100.0 * s.cpu.as_secs_f64() / cpu.as_secs_f64(),
        100.0 * steady.as_secs_f64() / (cpu0 + cpu - cpu_at_first).as_secs_f64(),
        (g.work)(&out) / cpu.as_secs_f64(),
        g.unit,
    );
}

/// Applies inputs like `Live` and harvests the dirty log every 200 ms, as
/// the digest does, without hashing anything.
struct Harvest {
    cursor: Option<DirtyCursor>,
    last: Instant,
    harvests: u64,
    pages: u64,
}

impl Observer for Harvest {
    fn at_point(&mut self, m: &mut Machine) -> vmm::Result<Flow> {
        if let Some(c) = &mut self.cursor {
            if self.last.elapsed() >= DIGEST_EVERY {
                self.pages += c.take().pages.count() as u64;
                self.harvests += 1;
                self.last = Instant::now();
            }
        }
        Live.at_point(m)
    }
}

fn logging_cost(g: &Guest) {
    // Off and on alternate, three times each: the host is shared.
    let mut rate: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut per = Vec::new();
    for _ in 0..3 {
        for on in [false, true] {
            let out = Capture::new();
            let mut m = Machine::new(config(g.cmdline, &out), &g.image).unwrap();
            m.set_dirty_logging(on).unwrap();
            let mut obs = Harvest {
                // A new cursor's first take is every page: not a harvest.
                cursor: on.then(|| {
                    let mut c = m.dirty_log().cursor();
                    c.take();
                    c
                }),
                last: Instant::now(),
                harvests: 0,
                pages: 0,
            };
            let cpu = cpu_time();
            assert_eq!(m.run(&mut obs).unwrap(), RunEnd::PowerOff(0));
            rate[usize::from(on)].push((g.work)(&out) / (cpu_time() - cpu).as_secs_f64());
            if on {
                per.push(obs.pages as f64 / obs.harvests.max(1) as f64);
            }
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, on) = (med(&mut rate[0]), med(&mut rate[1]));
    println!(
        "| {} | {:.3e} | {:.3e} | {:.3} | {:.0} |",
        g.name,
        off,
        on,
        on / off,
        med(&mut per)
    );
}

fn main() {
    pin_to_cpu0();
    println!("Pinned to cpu0; guest RAM {MEM_MIB} MiB; digests every 200 ms.\n");
    micro();
    let guests = guests();
    println!(
        "| guest | digest | CPU s | digests | first digest CPU µs | then CPU µs/digest | of which harvest | then pages hashed/digest | digest share of CPU, whole run | after the first digest | guest work per CPU s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for g in &guests {
        for setup in [Setup::Before, Setup::After] {
            recorded(g, setup);
        }
    }
    println!();
    println!("| guest | work per CPU s, dirty logging off | on, harvested every 200 ms | on / off | dirty pages per harvest |");
    println!("|---|---|---|---|---|");
    for g in guests.iter().skip(1) {
        logging_cost(g);
    }
}
