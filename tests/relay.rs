//! The failure-injection relay (src/testkit/relay.rs) between a real
//! `PrimarySender` and `BackupListener` in this process: it forwards and
//! counts, and each fault does what it says. No KVM needed.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ftlog::channel::inspect::MsgKind;
use ftlog::{
    Acks, BackupExpect, BackupListener, BackupReceiver, ChannelConfig, EntryKind, ExecBackend,
    ExecPoint, PrimarySender,
};
use ftvmm::guest::GUEST_ELF;
use ftvmm::rr::{header_for, RecordOptions};
use ftvmm::testkit::relay::{Direction, Ending, Fault, Relay, Trigger};
use vmm::MachineConfig;

const KEY: &[u8] = b"relay test key";

fn config() -> ChannelConfig {
    let mut c = ChannelConfig::new(KEY);
    c.peer_timeout = Duration::from_millis(600);
    c
}

/// A backup listening on an ephemeral port, a relay in front of it, and a
/// primary connected through the relay.
fn pair() -> (Arc<PrimarySender>, BackupReceiver, Relay) {
    let expect = BackupExpect {
        backend: ExecBackend::Exits,
        image_digest: vmm::digest::image_digest(GUEST_ELF),
    };
    let listener = BackupListener::bind("127.0.0.1:0", &config(), expect).unwrap();
    let relay = Relay::start(listener.local_addr().unwrap()).unwrap();
    let accept = std::thread::spawn(move || listener.accept());
    let opts = RecordOptions {
        backend: ExecBackend::Exits,
        digest_every: None,
        net_mac: None,
    };
    let cfg = MachineConfig::new(32, "", Box::new(std::io::sink()));
    let header = header_for(GUEST_ELF, &cfg, &opts);
    let tx = PrimarySender::connect(&relay.addr(), &config(), &header).unwrap();
    let rx = accept.join().unwrap().unwrap();
    (Arc::new(tx), rx, relay)
}

/// Entry `i`: every fifth a timer tick (irq-raise of IRQ 0), else a clock read.
fn push(tx: &PrimarySender, i: u64) -> u64 {
    let point = ExecPoint {
        count: i,
        rip: 0x10_0000 + i,
        rcx: 0,
    };
    let kind = if i % 5 == 0 {
        EntryKind::IrqRaise { irq: 0 }
    } else {
        EntryKind::ClockRead {
            port: 0xf104,
            data: i.to_le_bytes()[..4].to_vec(),
        }
    };
    tx.push(point, kind).unwrap()
}

/// Everything the backup gets until its channel ends: (entries, how it ended).
fn drain(rx: &BackupReceiver, execute: bool) -> (Vec<u64>, String) {
    let mut seqs = Vec::new();
    loop {
        match rx.next() {
            Ok(Some(e)) => {
                if execute {
                    rx.report_executed(e.seq).unwrap();
                }
                seqs.push(e.seq);
            }
            Ok(None) => return (seqs, "clean close".into()),
            Err(e) => return (seqs, e.to_string()),
        }
    }
}

#[test]
fn the_relay_forwards_and_counts_entries_ticks_acks_and_bytes() {
    let (tx, rx, relay) = pair();
    for i in 0..100 {
        push(&tx, i);
    }
    let backup = std::thread::spawn(move || drain(&rx, true));
    assert!(tx.wait_received(99, Duration::from_secs(5)).unwrap());
    assert!(relay.wait_until(Duration::from_secs(5), |c| {
        c.primary_told.executed == Some(99)
    }));
    let tx = Arc::try_unwrap(tx).ok().unwrap();
    tx.close().unwrap();
    let (seqs, end) = backup.join().unwrap();
    assert_eq!(seqs, (0..100).collect::<Vec<_>>());
    assert_eq!(end, "clean close");
    let c = relay.counters();
    assert_eq!(c.connections, 1);
    assert_eq!(c.entries_seen, 100);
    assert_eq!(c.entries_forwarded, 100);
    assert_eq!(c.ticks_forwarded, 20);
    assert_eq!(c.last_seq_forwarded, Some(99));
    assert!(c.acks_seen > 0 && c.acks_rewritten == 0, "{c:?}");
    assert_eq!(c.backup_acks, c.primary_told);
    assert!(
        c.bytes_to_backup > 100 * 8 && c.bytes_to_primary > 0,
        "{c:?}"
    );
    assert_eq!(c.frames_of(Direction::ToBackup, MsgKind::Entry), 100);
    assert_eq!(c.frames_of(Direction::ToBackup, MsgKind::Hello), 1);
    assert_eq!(c.frames_of(Direction::ToBackup, MsgKind::Header), 1);
    assert_eq!(c.frames_of(Direction::ToBackup, MsgKind::Close), 1);
    assert_eq!(c.frames_of(Direction::ToPrimary, MsgKind::Close), 1);
}

#[test]
fn a_cut_at_an_entry_forwards_exactly_the_entries_before_it() {
    let (tx, rx, relay) = pair();
    relay.arm(Trigger::Entry(30), Fault::Cut);
    for i in 0..60 {
        push(&tx, i);
    }
    let (seqs, end) = drain(&rx, true);
    assert_eq!(seqs, (0..30).collect::<Vec<_>>());
    assert!(end.contains("timed out"), "{end}");
    let c = relay.counters();
    assert_eq!((c.entries_seen, c.entries_forwarded), (60, 30), "{c:?}");
    assert!(c.frames_dropped >= 30);
    assert_eq!(c.faults.len(), 1);
}

#[test]
fn a_tick_trigger_fires_before_that_tick_is_forwarded() {
    let (tx, rx, relay) = pair();
    // Ticks are entries 0, 5, 10, ...: the third is entry 10.
    relay.arm(Trigger::Tick(3), Fault::End(Ending::Close));
    for i in 0..40 {
        push(&tx, i);
    }
    let (seqs, end) = drain(&rx, true);
    assert_eq!(seqs, (0..10).collect::<Vec<_>>(), "{end}");
    assert_eq!(relay.counters().ticks_forwarded, 2);
}

#[test]
fn a_truncated_frame_reaches_the_backup_in_part_and_then_the_connection_ends() {
    for then in [Ending::Close, Ending::Reset] {
        let (tx, rx, relay) = pair();
        relay.arm(Trigger::Entry(50), Fault::Truncate { keep: None, then });
        for i in 0..80 {
            // The primary notices the end sooner or later; that is fine.
            let _ = tx.push(
                ExecPoint {
                    count: i,
                    rip: 0,
                    rcx: 0,
                },
                EntryKind::IrqRaise { irq: 0 },
            );
        }
        let (seqs, end) = drain(&rx, true);
        // A reset may discard what the backup had not read yet.
        let want = match then {
            Ending::Close => 50,
            Ending::Reset => seqs.len().min(50),
        };
        assert_eq!(
            seqs,
            (0..want as u64).collect::<Vec<_>>(),
            "{then:?}: {end}"
        );
        let c = relay.counters();
        let (len, kept) = c.truncated.unwrap();
        assert!(kept > 8 && kept < len, "{then:?}: {c:?}");
        assert_eq!(c.entries_forwarded, 50);
        eprintln!("{then:?}: the backup saw: {end}");
    }
}

#[test]
fn frozen_executed_acks_let_received_advance() {
    let (tx, rx, relay) = pair();
    for i in 0..10 {
        push(&tx, i);
    }
    let rx = Arc::new(rx);
    let r = rx.clone();
    let backup = std::thread::spawn(move || {
        let mut n = 0;
        while n < 60 {
            if let Ok(Some(e)) = r.next() {
                r.report_executed(e.seq).unwrap();
                n += 1;
            }
        }
    });
    assert!(relay.wait_until(Duration::from_secs(5), |c| {
        c.primary_told.executed == Some(9)
    }));
    relay.arm(Trigger::Now, Fault::FreezeExecuted);
    for i in 10..60 {
        push(&tx, i);
    }
    assert!(tx.wait_received(59, Duration::from_secs(5)).unwrap());
    backup.join().unwrap();
    assert!(relay.wait_until(Duration::from_secs(5), |c| {
        c.backup_acks.executed == Some(59)
    }));
    std::thread::sleep(Duration::from_millis(100));
    let acks = tx.acks();
    assert_eq!(
        acks,
        Acks {
            received: Some(59),
            executed: Some(9)
        }
    );
    assert!(relay.counters().acks_rewritten > 0);
    relay.arm(Trigger::Now, Fault::Heal);
    rx.report_executed(59).unwrap();
    assert!(relay.wait_until(Duration::from_secs(5), |c| {
        c.primary_told.executed == Some(59)
    }));
}

#[test]
fn frozen_acks_hold_both_fields() {
    let (tx, rx, relay) = pair();
    push(&tx, 0);
    let rx = Arc::new(rx);
    let e = rx.next().unwrap().unwrap();
    rx.report_executed(e.seq).unwrap();
    assert!(relay.wait_until(Duration::from_secs(5), |c| {
        c.primary_told.executed == Some(0)
    }));
    relay.arm(Trigger::Now, Fault::FreezeAcks);
    for i in 1..20 {
        push(&tx, i);
    }
    for _ in 1..20 {
        let e = rx.next().unwrap().unwrap();
        rx.report_executed(e.seq).unwrap();
    }
    assert!(relay.wait_until(Duration::from_secs(5), |c| {
        c.backup_acks.received == Some(19)
    }));
    assert_eq!(
        tx.acks(),
        Acks {
            received: Some(0),
            executed: Some(0)
        }
    );
}

#[test]
fn a_delay_holds_every_frame_back() {
    let (tx, rx, relay) = pair();
    let backup = std::thread::spawn(move || drain(&rx, true));
    push(&tx, 0);
    assert!(tx.wait_received(0, Duration::from_secs(5)).unwrap());
    relay.arm(Trigger::Now, Fault::Delay(Duration::from_millis(150)));
    let start = Instant::now();
    push(&tx, 1);
    assert!(tx.wait_received(1, Duration::from_secs(5)).unwrap());
    // One way to the backup and one back, each held 150 ms.
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    drop(tx);
    let (seqs, _) = backup.join().unwrap();
    assert_eq!(seqs, vec![0, 1]);
}

#[test]
fn a_rewrite_hook_sees_every_frame() {
    let (tx, rx, relay) = pair();
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s = seen.clone();
    relay.rewrite(
        Direction::ToBackup,
        Box::new(move |_frame| {
            s.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            None
        }),
    );
    for i in 0..10 {
        push(&tx, i);
    }
    for _ in 0..10 {
        rx.next().unwrap().unwrap();
    }
    assert!(seen.load(std::sync::atomic::Ordering::Relaxed) >= 10);
}
