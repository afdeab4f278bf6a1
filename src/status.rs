//! A periodic status line on stderr while a VM runs, so long runs show
//! progress.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counters the vCPU thread updates and the status thread reads.
#[derive(Debug, Default)]
pub struct Progress {
    /// Deterministic exits so far.
    pub exits: AtomicU64,
    /// Log entries written or replayed.
    pub entries: AtomicU64,
    /// Log bytes written or read.
    pub bytes: AtomicU64,
    done: AtomicBool,
}

impl Progress {
    /// Shared counters.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Stop the status thread.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }
}

/// Print `label: N exits, M entries (rate/s), K KiB` every `every` until
/// [`Progress::finish`].
pub fn spawn(label: &'static str, p: Arc<Progress>, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("ftvmm-status".into())
        .spawn(move || {
            let start = Instant::now();
            let mut last = (0u64, Instant::now());
            while !p.done.load(Ordering::Acquire) {
                std::thread::sleep(every.min(Duration::from_millis(100)));
                if last.1.elapsed() < every {
                    continue;
                }
                let entries = p.entries.load(Ordering::Relaxed);
                let rate = (entries - last.0) as f64 / last.1.elapsed().as_secs_f64();
                last = (entries, Instant::now());
                eprintln!(
                    "[{label} {:>6.1}s] {} exits, {} entries ({rate:.0}/s), {} KiB",
                    start.elapsed().as_secs_f64(),
                    p.exits.load(Ordering::Relaxed),
                    entries,
                    p.bytes.load(Ordering::Relaxed) / 1024,
                );
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no status line: {e}");
    }
}
