//! The FT guarantee at the VMM level, under the failures of issue 9: a log
//! cut anywhere (the primary died there), a log write failing on the
//! primary, a backup on another host. Each test records a small guest in
//! memory, cuts or perturbs the log, replays it as a backup would, and
//! compares what each side itself produced.

// Test code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use ftlog::{EntryKind, OutputStream};
use vmm::clock::ClockMode;
use vmm::devices::ftclock::Entropy;
use vmm::inputs::Input;
use vmm::output::{Collector, Output, Stream};
use vmm::record::{LogSink, MemorySink, Recorder};
use vmm::replay::{MemorySource, Replayer};
use vmm::{Error, Live, RunEnd};

/// Console bytes by stream offset, from outputs.
fn console_by_offset(outs: &[(Output, Option<u64>)]) -> BTreeMap<u64, u8> {
    let mut m = BTreeMap::new();
    for (o, _) in outs {
        if o.stream == Stream::Console {
            for (i, b) in o.bytes.iter().enumerate() {
                m.insert(o.position + i as u64, *b);
            }
        }
    }
    m
}

/// Finding 2: every output has a log entry of its own, and a backup that
/// goes live at the end of a log cut anywhere never contradicts an output
/// the primary could have released (one whose entry the backup has). The
/// guest prints several digits a tick with interrupts enabled, so a tick
/// landing elsewhere changes the bytes.
#[test]
fn every_output_has_its_own_entry_and_no_cut_contradicts_a_released_output() {
    if !kvm_or_skip() {
        return;
    }
    let p = record(IRQPRINT, REAL);
    assert_eq!(p.end, RunEnd::PowerOff(0));
    let outs = p.out.all();
    assert_eq!(outs.len(), 150, "one console write per digit");
    for (o, tag) in &outs {
        let seq = tag.expect("every output is tagged with its own entry");
        let e = &p.entries[seq as usize];
        assert_eq!(e.kind, o.entry(), "entry #{seq} is this output's");
    }
    let printed = console_by_offset(&outs);
    let text = String::from_utf8_lossy(&p.out.console()).into_owned();
    let changes = text.as_bytes().windows(2).filter(|w| w[0] != w[1]).count();
    let repeats = text.as_bytes().windows(2).filter(|w| w[0] == w[1]).count();
    assert!(
        changes >= 5 && repeats >= 5,
        "the digits must depend on where ticks land: {text}"
    );

    // Cut right before and right after output entries, and at a few other
    // places: a tick between the last entry and the next output is exactly
    // where a backup could print something else.
    let mut cuts: Vec<usize> = Vec::new();
    for (_, tag) in outs.iter().step_by(2) {
        let i = tag.unwrap() as usize;
        cuts.extend([i, i + 1]);
    }
    cuts.extend((0..p.entries.len()).step_by(11));
    cuts.sort_unstable();
    cuts.dedup();
    for k in cuts {
        let released: Vec<&(Output, Option<u64>)> = outs
            .iter()
            .filter(|(_, t)| t.is_some_and(|s| (s as usize) < k))
            .collect();
        // Run the backup until it is one byte past what was released.
        let upto = released.last().map_or(0, |(o, _)| o.position as usize + 1);
        let b = replay_cut_then_go_live_until(IRQPRINT, &p.entries[..k], REAL, upto + 1);
        let mine = b.out.all();
        // The backup reproduced each released output, tagged with the same
        // entry, before doing anything of its own.
        for r in &released {
            assert!(mine.contains(r), "cut {k}: released {r:?} not reproduced");
        }
        let theirs = console_by_offset(&mine);
        for (o, _) in &released {
            let off = o.position;
            assert_eq!(theirs.get(&off), printed.get(&off), "cut {k}: offset {off}");
        }
    }
}

/// Finding 2: an output that contradicts its entry is a divergence.
#[test]
fn an_output_other_than_the_logged_one_is_a_divergence() {
    if !kvm_or_skip() {
        return;
    }
    let p = record(SAMPLES, REAL);
    let mut entries = p.entries.clone();
    let i = entries
        .iter()
        .position(|e| matches!(e.kind, EntryKind::Output { .. }))
        .unwrap();
    if let EntryKind::Output { hash, .. } = &mut entries[i].kind {
        hash[0] ^= 1;
    }
    let mut b = machine(SAMPLES, &Collector::new(), false, REAL);
    let mut rep = Replayer::new(MemorySource::new(entries));
    let err = b.run(&mut rep).unwrap_err().to_string();
    assert!(
        err.contains("console output of 1 bytes at offset 0") && err.contains(&format!("#{i}")),
        "{err}"
    );
}

/// Findings 3 and 13: a log cut between any two entries, inside an
/// injection and the reads its handler makes included, ends in a pause at
/// the last complete point; the backup goes live there and the guest runs
/// to its end. Every clock sample whose entry the backup had is the
/// primary's.
#[test]
fn a_log_cut_after_any_entry_ends_in_a_pause_never_a_divergence() {
    if !kvm_or_skip() {
        return;
    }
    let p = record(IRQCLOCK, REAL);
    assert_eq!(p.end, RunEnd::PowerOff(0));
    // The handler's first exit is a logged read right after the inject.
    let after_inject = p.entries.windows(2).any(|w| {
        matches!(w[0].kind, EntryKind::Inject { .. })
            && matches!(w[1].kind, EntryKind::ClockRead { .. })
    });
    assert!(after_inject, "the guest does not provoke finding 3");
    let primary_samples: Vec<u64> = (0..8).map(|t| read_u64(&p.m, RECORDS + 8 * t)).collect();
    let reads: Vec<usize> = p
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.kind, EntryKind::ClockRead { .. }))
        .map(|(i, _)| i)
        .collect();
    // The clock reads are the ISR's, one per tick, in order.
    assert_eq!(reads.len(), 8);
    for k in 0..=p.entries.len() {
        let b = replay_cut_then_go_live(IRQCLOCK, &p.entries[..k], REAL);
        assert_eq!(b.end, RunEnd::PowerOff(0), "cut {k}");
        // Cut before the guest's end, the replay pauses at the last
        // complete point; cut after its last point, it reaches the end.
        if k <= reads[7] {
            assert_eq!(b.replay_end, RunEnd::Paused, "cut {k}");
        }
        for (t, &at) in reads.iter().enumerate() {
            if at < k {
                assert_eq!(
                    read_u64(&b.m, RECORDS + 8 * t as u64),
                    primary_samples[t],
                    "cut {k}: tick {t}'s sample"
                );
            }
        }
    }
}

/// Finding 9: a 64-bit value read in two halves (ftclock's sample) and a
/// PIT latch or read-back never combine the primary's part with the
/// backup's: at every cut, each sample the log has is the primary's whole.
/// The backup's own clock and entropy differ from the primary's, so a torn
/// value would show.
#[test]
fn torn_reads_at_a_cut_give_the_primarys_sample() {
    if !kvm_or_skip() {
        return;
    }
    // Over 2^32 ns an exit, so every clock sample has its own high half.
    let primary = Host {
        clock: ClockMode::Virtual {
            ns_per_exit: (1 << 32) + 15,
        },
        entropy: Entropy::Seeded(1),
    };
    let backup = Host {
        clock: ClockMode::Virtual { ns_per_exit: 7 },
        entropy: Entropy::Seeded(2),
    };
    let p = record(SAMPLES, primary);
    assert_eq!(p.end, RunEnd::PowerOff(0));
    let round = |m: &vmm::Machine, r: u64| read_bytes(m, RECORDS + 32 * r, 21);
    // The backup alone would have read other values.
    let alone = Collector::new();
    let mut own = machine(SAMPLES, &alone, true, backup);
    own.run(&mut Live).unwrap();
    let (pr, br) = (round(&p.m, 0), round(&own, 0));
    assert_ne!(pr[4..8], br[4..8], "entropy high halves differ");
    assert_ne!(pr[12..16], br[12..16], "clock high halves differ");
    assert_ne!(pr[16..18], br[16..18], "latched counts differ");
    // The four logged samples of each round: entropy, clock, latch, read-back.
    let logged: Vec<usize> = p
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind.read_data().is_some())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        logged.len(),
        8 * 4,
        "high halves and latched bytes are not logged"
    );
    let parts: [(usize, std::ops::Range<usize>); 4] =
        [(0, 0..8), (1, 8..16), (2, 16..18), (3, 18..21)];
    for k in 0..=p.entries.len() {
        let b = replay_cut_then_go_live(SAMPLES, &p.entries[..k], backup);
        assert_eq!(b.end, RunEnd::PowerOff(0), "cut {k}");
        for r in 0..8u64 {
            let (want, got) = (round(&p.m, r), round(&b.m, r));
            for (n, range) in &parts {
                if logged[4 * r as usize + n] < k {
                    assert_eq!(
                        got[range.clone()],
                        want[range.clone()],
                        "cut {k}: round {r} part {n}"
                    );
                }
            }
        }
    }
}

/// A log sink that fails on the first entry `fail` picks (the channel died
/// while the primary logged it).
struct FailOn {
    inner: MemorySink,
    fail: fn(&EntryKind) -> bool,
    failed: bool,
}

impl LogSink for FailOn {
    fn append(&mut self, point: vmm::points::ExecPoint, kind: EntryKind) -> vmm::Result<u64> {
        if !self.failed && (self.fail)(&kind) {
            self.failed = true;
            return Err(Error::Observer("logging channel: connection reset".into()));
        }
        self.inner.append(point, kind)
    }
}

/// Record until `fail` picks an entry whose log write fails, then go on
/// alone (the primary won the arbiter); returns the machine at the end.
fn fail_then_go_on(
    code: &[u8],
    host: Host,
    fail: fn(&EntryKind) -> bool,
) -> (vmm::Machine, Collector) {
    let out = Collector::new();
    let mut m = machine(code, &out, true, host);
    let sink = FailOn {
        inner: MemorySink::default(),
        fail,
        failed: false,
    };
    let mut rec = Recorder::new(sink, None);
    let err = m.run(&mut rec).unwrap_err();
    assert!(err.to_string().contains("connection reset"), "{err}");
    assert_eq!(m.run(&mut Live).unwrap(), RunEnd::PowerOff(0));
    (m, out)
}

/// Finding 5: a log write that fails during a device read (port or MSR)
/// or an output still completes the guest's instruction: after going on
/// alone, the guest has the values an uninterrupted run reads, and every
/// output exactly once.
#[test]
fn a_failed_log_write_still_completes_the_guests_instruction() {
    if !kvm_or_skip() {
        return;
    }
    let host = Host {
        clock: ClockMode::Virtual {
            ns_per_exit: 1_000_003,
        },
        entropy: Entropy::Seeded(5),
    };
    let whole = Collector::new();
    let mut reference = machine(SAMPLES, &whole, true, host);
    assert_eq!(reference.run(&mut Live).unwrap(), RunEnd::PowerOff(0));
    let want = read_bytes(&reference, RECORDS, 8 * 32);
    assert_ne!(
        want[8..16],
        [0; 8],
        "the clock sample is not trivially zero"
    );
    for (name, fail) in [
        (
            "clock read",
            (|k: &EntryKind| matches!(k, EntryKind::ClockRead { port: 0xf104, .. }))
                as fn(&EntryKind) -> bool,
        ),
        ("latch", |k| {
            matches!(k, EntryKind::ClockRead { port: 0x43, .. })
        }),
        ("entropy read", |k| {
            matches!(k, EntryKind::EntropyRead { .. })
        }),
        ("output", |k| matches!(k, EntryKind::Output { .. })),
    ] {
        let (m, out) = fail_then_go_on(SAMPLES, host, fail);
        assert_eq!(
            read_bytes(&m, RECORDS, 8 * 32),
            want,
            "after a failed {name}"
        );
        assert_eq!(out.console(), b"k", "after a failed {name}");
    }
    // RDMSR of the TSC: its value reaches the guest too.
    let tsc = [
        0xb9, 0x10, 0x00, 0x00, 0x00, // mov ecx, IA32_TSC
        0x0f, 0x32, // rdmsr
        0x89, 0x04, 0x25, 0x08, 0x00, 0x20, 0x00, // mov [RECORDS], eax
        0x66, 0xba, 0x00, 0xf0, 0x31, 0xc0, 0xee, 0xf4, // power off
    ];
    let mut reference = machine(&tsc, &Collector::new(), true, host);
    reference.run(&mut Live).unwrap();
    let (m, _) = fail_then_go_on(&tsc, host, |k| matches!(k, EntryKind::MsrRead { .. }));
    let got = read_u64(&m, RECORDS) & 0xffff_ffff;
    assert_eq!(got, read_u64(&reference, RECORDS) & 0xffff_ffff);
    assert_ne!(got, 0);
}

/// Finding 2 (timers): a backup going live long after its log ended has no
/// tick due at once (its PIT deadlines passed while its timers were
/// silent), and its timer then keeps the guest's period.
#[test]
fn no_tick_is_due_at_once_after_go_live() {
    if !kvm_or_skip() {
        return;
    }
    let p = record(IRQCLOCK, REAL);
    let half = p.entries.len() / 2;
    let out = Collector::new();
    let mut b = machine(IRQCLOCK, &out, false, REAL);
    let mut rep = Replayer::new(MemorySource::cut(p.entries[..half].to_vec()));
    assert_eq!(b.run(&mut rep).unwrap(), RunEnd::Paused);
    // Failure detection takes a while: many 10 ms periods pass.
    std::thread::sleep(Duration::from_millis(150));
    b.set_live_timers(true);
    let now = b.poll_host_inputs();
    assert!(
        !now.contains(&Input::Irq(0)),
        "a catch-up tick at go-live: {now:?}"
    );
    std::thread::sleep(Duration::from_millis(12));
    assert!(
        b.poll_host_inputs().contains(&Input::Irq(0)),
        "the timer goes on with its period"
    );
}

/// Finding 10: the primary's CPUID table travels in the log header; a
/// backup sets exactly that table, or refuses with an error naming the
/// leaf, register and bit its host cannot provide.
#[test]
fn the_logs_cpuid_is_applied_or_refused_naming_the_feature() {
    if !kvm_or_skip() {
        return;
    }
    let table = vmm::arch::cpuid::host_guest_table().unwrap();
    let with = |t: Vec<ftlog::CpuidEntry>| {
        let mut c = vmm::MachineConfig::new(32, "", Box::new(std::io::sink()));
        c.cpuid = Some(t);
        vmm::Machine::new(c, &image(SAMPLES))
    };
    let mut m = with(table.clone()).unwrap();
    assert_eq!(m.cpuid(), &table[..]);
    assert_eq!(m.run(&mut Live).unwrap(), RunEnd::PowerOff(0));

    // Claim a feature this host's KVM does not support.
    let supported = vmm::arch::cpuid::supported_table().unwrap();
    let leaf7 = |t: &[ftlog::CpuidEntry]| t.iter().position(|e| e.function == 7 && e.index == 0);
    let have = leaf7(&supported).map_or(0, |i| supported[i].ebx);
    let bit = (0..32)
        .find(|b| have & (1 << b) == 0)
        .expect("a bit KVM lacks");
    let mut bad = table.clone();
    let i = leaf7(&bad).expect("the guest table has leaf 7");
    bad[i].ebx |= 1 << bit;
    let err = with(bad).err().expect("refused").to_string();
    assert!(
        err.contains(&format!("leaf 0x7.0 EBX bit {bit}")) && err.contains("not supported here"),
        "{err}"
    );
}

/// Output entries carry the stream, position, length and hash the replayer
/// checks.
#[test]
fn output_entries_name_stream_and_position() {
    if !kvm_or_skip() {
        return;
    }
    let p = record(SAMPLES, REAL);
    let outputs: Vec<&EntryKind> = p
        .entries
        .iter()
        .map(|e| &e.kind)
        .filter(|k| matches!(k, EntryKind::Output { .. }))
        .collect();
    assert!(matches!(
        outputs[..],
        [EntryKind::Output {
            stream: OutputStream::Console,
            position: 0,
            len: 1,
            ..
        }]
    ));
}
