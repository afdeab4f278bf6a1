//! The output rule's lifecycle on the primary: outputs wait in the gate
//! and go out when the backup has acknowledged their log entries; output
//! the backup never acknowledged goes out only with proof that this side
//! won the arbiter ([`Alone`]), and is otherwise dropped.
//!
//! Two threads do the work: the ack pump feeds the backup's acks into the
//! gate, and the releaser puts released outputs into the console file and
//! onto the TAP, then reports the release watermark to the backup
//! ([`PrimarySender::set_released_through`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ftlog::PrimarySender;
use netdev::OutputGate;

use crate::go_live::Alone;
use crate::output::{ack_pump, releaser, ConsoleFile, Output, ReleaseReport};

/// The primary's output release, from the first output to the last.
pub struct OutputRelease {
    gate: OutputGate<Output>,
    done: Arc<AtomicBool>,
    releaser: JoinHandle<ReleaseReport>,
    pump: JoinHandle<Vec<Duration>>,
}

/// What the release measured.
#[derive(Debug, Default)]
pub struct ReleaseStats {
    /// How long the output rule held each output.
    pub report: ReleaseReport,
    /// Channel round trips sampled by the ack pump.
    pub ack_latencies: Vec<Duration>,
    /// Outputs never acknowledged and never released (dropped at the end).
    pub dropped: usize,
}

impl OutputRelease {
    /// Release `gate`'s outputs into `console` and `tap` as `tx`'s backup
    /// acknowledges them.
    pub fn start(
        gate: OutputGate<Output>,
        tx: Arc<PrimarySender>,
        console: ConsoleFile,
        tap: Option<netdev::Tap>,
    ) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let releaser = {
            let (g, d, t) = (gate.clone(), done.clone(), tx.clone());
            std::thread::spawn(move || {
                releaser(g, console, tap, d, |seq| t.set_released_through(seq))
            })
        };
        let pump = {
            let (g, d) = (gate.clone(), done.clone());
            std::thread::spawn(move || ack_pump(g, tx, d))
        };
        OutputRelease {
            gate,
            done,
            releaser,
            pump,
        }
    }

    /// The backup acknowledged every entry up to `seq` (the final ack, so
    /// it reaches the gate even if the ack pump has stopped).
    pub fn acknowledged(&self, seq: u64) {
        self.gate.ack(seq);
    }

    /// This side runs alone: release everything held, acknowledged or
    /// not, and everything from now on at once.
    pub fn go_alone(&self, _won: &Alone) {
        self.gate.open();
    }

    /// Stop: put out what is releasable, drop what is not (output the
    /// backup never acknowledged, on a side that has not won the arbiter).
    pub fn finish(self) -> ReleaseStats {
        self.done.store(true, Ordering::Release);
        let report = self.releaser.join().unwrap_or_default();
        let ack_latencies = self.pump.join().unwrap_or_default();
        let dropped = self.gate.discard();
        if dropped > 0 {
            tracing::info!(
                dropped,
                "outputs never acknowledged by the backup were not released"
            );
        }
        ReleaseStats {
            report,
            ack_latencies,
            dropped,
        }
    }
}
