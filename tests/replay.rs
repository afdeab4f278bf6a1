//! Record and replay on one host, in every backend this host has.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::kvm_or_skip;
use ftlog::{EntryKind, ExecBackend, LogReader, LogWriter};
use ftvmm::console::Capture;
use ftvmm::guest::GUEST_ELF;
use ftvmm::rr::{header_for, RecordOptions};
use vmm::points::PointMode;
use vmm::record::{MemorySink, Recorder};
use vmm::replay::{MemorySource, ReaderSource, Replayer};
use vmm::{Error, Machine, MachineConfig, RunEnd};

fn cfg(cmdline: &str, out: &Capture, mode: PointMode, live: bool) -> MachineConfig {
    let mut c = MachineConfig::new(32, cmdline, Box::new(out.clone()));
    c.points = mode;
    c.live_timers = live;
    c
}

struct Finished {
    end: RunEnd,
    serial: String,
    digest: [u8; 32],
    regs: kvm_bindings::kvm_regs,
    exits: u64,
}

fn finished(m: &mut Machine, end: RunEnd, out: &Capture) -> Finished {
    Finished {
        end,
        serial: out.text(),
        digest: m.digest().unwrap(),
        regs: m.regs().unwrap(),
        exits: m.exit_count(),
    }
}

/// Record `image` with host time into an in-memory log file.
fn record_to_bytes(image: &[u8], cmdline: &str, backend: ExecBackend) -> (Vec<u8>, Finished, u64) {
    let mode = PointMode::for_backend(backend).unwrap();
    let out = Capture::new();
    let c = cfg(cmdline, &out, mode, true);
    let opts = RecordOptions {
        backend,
        digest_every: Some(Duration::from_millis(50)),
        net_mac: None,
    };
    let writer = LogWriter::new(Vec::new(), &header_for(image, &c, &opts)).unwrap();
    let mut rec = Recorder::new(writer, opts.digest_every);
    let mut m = Machine::new(c, image).unwrap();
    let end = m.run(&mut rec).unwrap();
    rec.finish(&mut m, end).unwrap();
    let injections = rec.stats().injections;
    let log = rec.into_sink().into_inner().unwrap();
    (log, finished(&mut m, end, &out), injections)
}

fn replay_bytes(image: &[u8], log: &[u8]) -> Result<Finished, Error> {
    let reader = LogReader::new(log)?;
    let h = reader.header().clone();
    let out = Capture::new();
    let mode = PointMode::for_backend(h.backend)?;
    let mut m = Machine::new(cfg(&h.cmdline, &out, mode, false), image)?;
    let mut rep = Replayer::new(ReaderSource::new(reader));
    let end = m.run(&mut rep)?;
    rep.finish(&mut m, end)?;
    assert!(rep.stats().digests_checked > 1);
    Ok(finished(&mut m, end, &out))
}

fn assert_same(a: &Finished, b: &Finished) {
    assert_eq!(a.end, b.end);
    assert_eq!(a.serial, b.serial, "serial output differs");
    assert_eq!(a.exits, b.exits);
    assert_eq!(a.regs, b.regs, "registers differ");
    assert_eq!(a.digest, b.digest, "memory + register digest differs");
}

#[test]
fn exits_backend_replays_thousands_of_host_timed_interrupts_exactly() {
    if !kvm_or_skip() {
        return;
    }
    let (log, rec, injected) = record_to_bytes(
        GUEST_ELF,
        "hz=1000 ticks=2500 digest_every=250",
        ExecBackend::Exits,
    );
    assert!(injected >= 2500, "only {injected} interrupts injected");
    let rep = replay_bytes(GUEST_ELF, &log).unwrap();
    assert_same(&rec, &rep);
    assert!(rec.serial.contains("done ticks 2500"));
}

#[test]
fn singlestep_backend_replays_interrupts_inside_user_code_exactly() {
    if !kvm_or_skip() {
        return;
    }
    // Every instruction is a point here, so ticks land inside the CPL3 loop
    // (its RIP and RCX go into the guest's digest). Small work: ~8 µs a step.
    let (log, rec, injected) = record_to_bytes(
        GUEST_ELF,
        "hz=500 ticks=1200 work=30 digest_every=200",
        ExecBackend::Singlestep,
    );
    assert!(injected >= 1200, "only {injected} interrupts injected");
    let rep = replay_bytes(GUEST_ELF, &log).unwrap();
    assert_same(&rec, &rep);
}

#[test]
fn pmu_backend_absence_is_a_clear_error() {
    match PointMode::for_backend(ExecBackend::Pmu) {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("pmu"), "{msg}");
            assert!(msg.contains("--backend exits"), "{msg}");
        }
        // A host with a working PMU would get here; this project's hosts have none.
        Ok(_) => panic!("pmu backend reported available"),
    }
}

/// The pmu backend's landing loop, driven by a counter of single steps
/// instead of hardware branches (this host has no PMU): the primary names
/// points by count at any stop, host kicks included; the backup lands on
/// each one through `PmuDrive`.
#[test]
fn pmu_landing_loop_replays_exactly_with_a_step_counter() {
    if !kvm_or_skip() {
        return;
    }
    let cmd = "hz=500 ticks=300 work=30 digest_every=100";
    let pmu_cfg = |out: &Capture, live: bool| {
        let mut c = cfg(cmd, out, PointMode::Pmu, live);
        c.pmu_counter = vmm::machine::PmuCounter::Steps;
        c
    };
    let out = Capture::new();
    let mut m = Machine::new(pmu_cfg(&out, true), GUEST_ELF).unwrap();
    let mut rec = Recorder::new(MemorySink::default(), Some(Duration::from_millis(50)));
    let end = m.run(&mut rec).unwrap();
    rec.finish(&mut m, end).unwrap();
    assert!(rec.stats().injections >= 300);
    let recorded = finished(&mut m, end, &out);
    let entries = rec.into_sink().entries;

    let out = Capture::new();
    let mut b = Machine::new(pmu_cfg(&out, false), GUEST_ELF).unwrap();
    let mut rep = Replayer::new(MemorySource::new(entries));
    let end = b.run(&mut rep).unwrap();
    rep.finish(&mut b, end).unwrap();
    assert_same(&recorded, &finished(&mut b, end, &out));
}

fn record_in_memory(image: &[u8], cmdline: &str) -> Vec<ftlog::LogEntry> {
    let out = Capture::new();
    let mut m = Machine::new(cfg(cmdline, &out, PointMode::Exits, true), image).unwrap();
    let mut rec = Recorder::new(MemorySink::default(), Some(Duration::from_millis(20)));
    let end = m.run(&mut rec).unwrap();
    rec.finish(&mut m, end).unwrap();
    rec.into_sink().entries
}

fn replay_entries(image: &[u8], cmdline: &str, entries: Vec<ftlog::LogEntry>) -> Result<(), Error> {
    let out = Capture::new();
    let mut m = Machine::new(cfg(cmdline, &out, PointMode::Exits, false), image)?;
    let mut rep = Replayer::new(MemorySource::new(entries));
    let end = m.run(&mut rep)?;
    rep.finish(&mut m, end)
}

#[test]
fn perturbed_read_value_is_caught_at_the_next_digest() {
    if !kvm_or_skip() {
        return;
    }
    let cmd = "hz=200 ticks=100 digest_every=20";
    let mut entries = record_in_memory(GUEST_ELF, cmd);
    // The boot-time clock read: change one bit of the value the guest saw.
    let k = entries
        .iter()
        .position(|e| matches!(e.kind, EntryKind::ClockRead { .. }))
        .unwrap();
    if let EntryKind::ClockRead { data, .. } = &mut entries[k].kind {
        data[0] ^= 1;
    }
    let first_digest_after = entries[k..]
        .iter()
        .find(|e| matches!(e.kind, EntryKind::Digest { .. }))
        .unwrap()
        .seq;
    let err = replay_entries(GUEST_ELF, cmd, entries)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("replay diverged"), "{err}");
    // The changed value reaches the guest's registers at once, so the next
    // entry's point (RCX included) or at the latest the next digest differs.
    let named: u64 = err
        .split("entry #")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no entry named in {err}"));
    let k = k as u64;
    assert!(
        named > k && named <= first_digest_after,
        "divergence reported at entry #{named}, expected after #{k} and by #{first_digest_after}: {err}"
    );
}

#[test]
fn perturbed_interrupt_point_is_caught_at_that_entry() {
    if !kvm_or_skip() {
        return;
    }
    let cmd = "hz=200 ticks=100 digest_every=20";
    let mut entries = record_in_memory(GUEST_ELF, cmd);
    let k = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.kind, EntryKind::IrqRaise { irq: 0 }))
        .map(|(i, _)| i)
        .nth(10)
        .unwrap();
    entries[k].point.count += 1;
    let seq = entries[k].seq;
    let moved_to = entries[k].point;
    let err = replay_entries(GUEST_ELF, cmd, entries)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("replay diverged"), "{err}");
    // Either that entry is never reached, or (in the guest's idle loop,
    // where consecutive exits share a RIP) the injections around it no
    // longer line up with the log: then the report is at the moved point or
    // the exit before it.
    let named = err.contains(&format!("entry #{seq} (irq"));
    let injected_at: Option<u64> = err
        .split("injected vector 0x20 at count=")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok());
    let near = injected_at.is_some_and(|c| c + 1 >= moved_to.count && c <= moved_to.count);
    assert!(named || near, "moved entry #{seq} to {moved_to}: {err}");
}

#[test]
fn tsc_msr_reads_exit_to_the_vmm_and_replay() {
    if !kvm_or_skip() {
        return;
    }
    let image = ftvmm::testkit::rdmsr_tsc_guest();
    let entries = record_in_memory(&image, "");
    assert!(
        entries
            .iter()
            .any(|e| matches!(e.kind, EntryKind::MsrRead { index: 0x10, .. })),
        "RDMSR of IA32_TSC was not logged: {entries:?}"
    );
    replay_entries(&image, "", entries).unwrap();
}

#[test]
fn a_guest_using_rdtsc_is_caught_by_divergence_detection() {
    if !kvm_or_skip() {
        return;
    }
    let image = ftvmm::testkit::rdtsc_guest();
    let entries = record_in_memory(&image, "");
    let err = replay_entries(&image, "", entries).unwrap_err().to_string();
    assert!(err.contains("state digest differs"), "{err}");
}

#[test]
fn corrupt_truncated_and_foreign_logs_are_refused_with_clear_errors() {
    if !kvm_or_skip() {
        return;
    }
    let (log, _, _) = record_to_bytes(GUEST_ELF, "hz=100 ticks=20", ExecBackend::Exits);
    let replay = |bytes: &[u8], image: &[u8]| {
        let r = ftvmm::rr::replay(image, bytes, Box::new(std::io::sink()));
        format!("{:#}", r.expect_err("replay must fail"))
    };

    // A flipped payload byte (the last byte is payload of the last frame).
    let mut corrupt = log.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x40;
    let err = replay(&corrupt, GUEST_ELF);
    assert!(err.contains("checksum mismatch"), "{err}");

    // A flipped byte anywhere else: a checksum, length or decode error.
    let mut corrupt = log.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x40;
    let err = replay(&corrupt, GUEST_ELF);
    assert!(
        [
            "checksum mismatch",
            "undecodable",
            "truncated",
            "frame limit"
        ]
        .iter()
        .any(|w| err.contains(w)),
        "{err}"
    );

    let err = replay(&log[..log.len() - 7], GUEST_ELF);
    assert!(err.contains("truncated"), "{err}");

    let err = replay(b"#!/bin/sh\necho not a log\n", GUEST_ELF);
    assert!(err.contains("not an ftvmm log"), "{err}");

    let mut newer = log.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    let err = replay(&newer, GUEST_ELF);
    assert!(err.contains("unsupported log format version 99"), "{err}");

    let other = ftvmm::testkit::pio_loop(10, false);
    let err = replay(&log, &other);
    assert!(err.contains("another guest image"), "{err}");
}
