//! Record/replay costs per execution-point backend, measured side by side
//! in one run: guest work per second live vs recorded, log bytes per second
//! and per entry, and replay time relative to recording time.
//!
//! Run: `cargo bench --bench replay` (prints a markdown table for
//! docs/benchmarks.md).

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ftlog::{ExecBackend, LogReader, LogWriter};
use ftvmm::console::Capture;
use ftvmm::guest::GUEST_ELF;
use ftvmm::rr::{header_for, RecordOptions};
use vmm::points::PointMode;
use vmm::record::Recorder;
use vmm::replay::{ReaderSource, Replayer};
use vmm::{Live, Machine, MachineConfig, RunEnd};

/// Workload steps the guest reports at the end ("work steps N").
fn steps(out: &Capture) -> u64 {
    out.text()
        .lines()
        .find_map(|l| l.strip_prefix("work steps "))
        .and_then(|n| n.parse().ok())
        .expect("guest printed its work count")
}

fn config(cmdline: &str, out: &Capture, mode: PointMode, live: bool) -> MachineConfig {
    let mut c = MachineConfig::new(32, cmdline, Box::new(out.clone()));
    c.points = mode;
    c.live_timers = live;
    c
}

struct Row {
    backend: ExecBackend,
    live_rate: f64,
    same_rate: f64,
    rec_rate: f64,
    entries: u64,
    bytes: u64,
    rec_secs: f64,
    rep_secs: f64,
}

fn rate_not_recorded(cmdline: &str, mode: PointMode) -> f64 {
    let out = Capture::new();
    let mut m = Machine::new(config(cmdline, &out, mode, true), GUEST_ELF).unwrap();
    let t = Instant::now();
    assert_eq!(m.run(&mut Live).unwrap(), RunEnd::PowerOff(0));
    steps(&out) as f64 / t.elapsed().as_secs_f64()
}

fn measure(backend: ExecBackend, cmdline: &str) -> Row {
    let mode = PointMode::for_backend(backend).unwrap();
    // Not recorded, plain VM: every exit is a point, inputs apply at once.
    let live_rate = rate_not_recorded(cmdline, PointMode::AnyExit);
    // Not recorded, same points as the backend: isolates the recorder's cost.
    let same_rate = rate_not_recorded(cmdline, mode);

    // Recorded with this backend.
    let out = Capture::new();
    let c = config(cmdline, &out, mode, true);
    let opts = RecordOptions {
        backend,
        digest_every: Some(Duration::from_millis(200)),
        net_mac: None,
    };
    let writer = LogWriter::new(Vec::new(), &header_for(GUEST_ELF, &c, &opts)).unwrap();
    let mut rec = Recorder::new(writer, opts.digest_every);
    let mut m = Machine::new(c, GUEST_ELF).unwrap();
    let t = Instant::now();
    let end = m.run(&mut rec).unwrap();
    rec.finish(&mut m, end).unwrap();
    let rec_secs = t.elapsed().as_secs_f64();
    let rec_rate = steps(&out) as f64 / rec_secs;
    let entries = rec.stats().entries;
    let log = rec.into_sink().into_inner().unwrap();

    // Replayed from the log bytes.
    let reader = LogReader::new(log.as_slice()).unwrap();
    let out = Capture::new();
    let mut m = Machine::new(config(cmdline, &out, mode, false), GUEST_ELF).unwrap();
    let mut rep = Replayer::new(ReaderSource::new(reader));
    let t = Instant::now();
    let end = m.run(&mut rep).unwrap();
    rep.finish(&mut m, end).unwrap();
    let rep_secs = t.elapsed().as_secs_f64();
    Row {
        backend,
        live_rate,
        same_rate,
        rec_rate,
        entries,
        bytes: log.len() as u64,
        rec_secs,
        rep_secs,
    }
}

fn main() {
    let runs = [
        (
            ExecBackend::Exits,
            "hz=1000 ticks=3000 work=500000 digest_every=1000",
        ),
        (
            ExecBackend::Singlestep,
            "hz=1000 ticks=300 work=2000 digest_every=100",
        ),
    ];
    println!("| backend | guest command line | work/s plain VM | work/s same points, not recorded | work/s recorded | recorded / not recorded | entries | log bytes/s | bytes/entry | record s | replay s | replay speed vs record |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (backend, cmdline) in runs {
        let r = measure(backend, cmdline);
        println!(
            "| {} | `{cmdline}` | {:.3e} | {:.3e} | {:.3e} | {:.3} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2}× |",
            r.backend,
            r.live_rate,
            r.same_rate,
            r.rec_rate,
            r.rec_rate / r.same_rate,
            r.entries,
            r.bytes as f64 / r.rec_secs,
            r.bytes as f64 / r.entries as f64,
            r.rec_secs,
            r.rep_secs,
            r.rec_secs / r.rep_secs,
        );
    }
}
