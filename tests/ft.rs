//! A primary and a backup on loopback: the backup replays what the logging
//! channel delivers while the primary runs, and reaches the same states.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::kvm_or_skip;
use ftlog::{BackupExpect, BackupListener, ChannelConfig, ExecBackend, PrimarySender};
use ftvmm::console::Capture;
use ftvmm::guest::GUEST_ELF;
use ftvmm::rr::{header_for, RecordOptions};
use vmm::link::ChannelSource;
use vmm::points::PointMode;
use vmm::record::Recorder;
use vmm::replay::Replayer;
use vmm::{Machine, MachineConfig, RunEnd};

fn config(cmdline: &str, out: &Capture, live: bool) -> MachineConfig {
    let mut c = MachineConfig::new(32, cmdline, Box::new(out.clone()));
    c.points = PointMode::Exits;
    c.live_timers = live;
    c
}

#[test]
fn backup_replays_the_live_channel_and_matches_every_digest() {
    if !kvm_or_skip() {
        return;
    }
    let cmd = "hz=500 ticks=1000 digest_every=100";
    let key = b"test key, not a secret".to_vec();
    let opts = RecordOptions {
        backend: ExecBackend::Exits,
        digest_every: Some(Duration::from_millis(25)),
        net_mac: None,
    };
    let header = header_for(GUEST_ELF, &config(cmd, &Capture::new(), true), &opts);
    let listener = BackupListener::bind(
        "127.0.0.1:0",
        &ChannelConfig::new(key.clone()),
        BackupExpect {
            backend: ExecBackend::Exits,
            image_digest: header.image_digest,
        },
    )
    .unwrap();
    let addr = listener.local_addr().unwrap().to_string();

    let backup = std::thread::spawn(move || {
        let rx = Arc::new(listener.accept().unwrap());
        let out = Capture::new();
        let mut m = Machine::new(config(cmd, &out, false), GUEST_ELF).unwrap();
        let mut rep = Replayer::new(ChannelSource::new(rx));
        let end = m.run(&mut rep).unwrap();
        rep.finish(&mut m, end).unwrap();
        (end, out.text(), m.digest().unwrap(), rep.stats())
    });

    let tx = Arc::new(PrimarySender::connect(&addr, &ChannelConfig::new(key), &header).unwrap());
    let out = Capture::new();
    let mut m = Machine::new(config(cmd, &out, true), GUEST_ELF).unwrap();
    let mut rec = Recorder::new(tx.clone(), opts.digest_every);
    let end = m.run(&mut rec).unwrap();
    rec.finish(&mut m, end).unwrap();
    let digests = rec.stats().digests;
    drop(rec);
    let primary_digest = m.digest().unwrap();
    let last = tx.next_seq() - 1;
    assert!(tx.wait_received(last, Duration::from_secs(10)).unwrap());
    Arc::try_unwrap(tx).ok().unwrap().close().unwrap();

    let (b_end, b_out, b_digest, stats) = backup.join().unwrap();
    assert_eq!(end, RunEnd::PowerOff(0));
    assert_eq!(b_end, end);
    assert_eq!(
        b_out,
        out.text(),
        "the backup's console equals the primary's"
    );
    assert_eq!(b_digest, primary_digest);
    assert_eq!(
        stats.digests_checked, digests,
        "every logged digest was checked"
    );
    assert!(digests >= 10, "only {digests} digests compared");
}
