//! Debug aid: record and replay the bundled guest with exit tracing on.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]
use ftvmm::console::Capture;
use std::time::Duration;
use vmm::points::PointMode;
use vmm::record::{MemorySink, Recorder};
use vmm::replay::{MemorySource, Replayer};
use vmm::{Machine, MachineConfig};
fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .init();
    let cmd = std::env::args()
        .nth(1)
        .unwrap_or("hz=1000 ticks=2500 digest_every=250".into());
    let role = std::env::args().nth(2).unwrap_or_default();
    let out = Capture::new();
    let mut c = MachineConfig::new(32, &cmd, Box::new(out.clone()));
    c.points = if std::env::var("STEP").is_ok() {
        PointMode::SingleStep
    } else {
        PointMode::Exits
    };
    let mut m = Machine::new(c, ftvmm::guest::GUEST_ELF).unwrap();
    let mut rec = Recorder::new(MemorySink::default(), Some(Duration::from_millis(50)));
    eprintln!("=== RECORD");
    let end = m.run(&mut rec).unwrap();
    eprintln!("=== REC END {end:?} exits {}", m.exit_count());
    rec.finish(&mut m, end).unwrap();
    let entries = rec.into_sink().entries;
    for e in &entries {
        if !matches!(e.kind, ftlog::EntryKind::Digest { .. }) {
            eprintln!("ENTRY {} {} {:?}", e.seq, e.point, e.kind.name());
        }
    }
    let _ = role;
    eprintln!("=== REPLAY");
    let out2 = Capture::new();
    let mut c = MachineConfig::new(32, &cmd, Box::new(out2.clone()));
    c.points = if std::env::var("STEP").is_ok() {
        PointMode::SingleStep
    } else {
        PointMode::Exits
    };
    c.live_timers = false;
    let mut b = Machine::new(c, ftvmm::guest::GUEST_ELF).unwrap();
    let mut rep = Replayer::new(MemorySource::new(entries));
    let r = b.run(&mut rep);
    eprintln!("=== RESULT {r:?}");
    print!("{}", out.text());
}
