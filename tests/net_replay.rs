//! Received frames are logged inputs: a networked guest recorded while
//! frames arrive from the host is replayed to the same state, sending the
//! same frames; a snapshot of a networked VM continues like the original.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::kvm_or_skip;
use ftlog::EntryKind;
use ftvmm::guest::GUEST_ELF;
use vmm::output::Collector;
use vmm::points::PointMode;
use vmm::record::{MemorySink, Recorder};
use vmm::replay::{MemorySource, Replayer};
use vmm::{Machine, MachineConfig, RunEnd};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const CMDLINE: &str = "net=1 ip=10.99.0.2/24 hz=100 ticks=60 digest_every=20";

/// An ARP request from 10.99.0.1 asking for 10.99.0.2.
fn arp_request(n: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[10, 99, 0, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 99, 0, 2]);
    f.resize(59, 0);
    f.push(n); // padding differs, so each frame is its own input
    f
}

/// A networked VM whose console and frames go to `out`.
fn machine(out: &Collector, live: bool) -> Machine {
    let mut c = MachineConfig::new(32, CMDLINE, Box::new(out.clone()));
    c.points = PointMode::Exits;
    c.live_timers = live;
    let mut m = Machine::new(c, GUEST_ELF).unwrap();
    ftvmm::net::attach(&mut m, MAC).unwrap();
    m
}

fn text(out: &Collector) -> String {
    String::from_utf8_lossy(&out.console()).into_owned()
}

fn is_arp_reply_to_client(f: &[u8]) -> bool {
    f.len() >= 42 && f[0..6] == CLIENT_MAC && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]
}

#[test]
fn a_networked_guest_replays_exactly_and_sends_the_same_frames() {
    if !kvm_or_skip() {
        return;
    }
    let out = Collector::new();
    let mut m = machine(&out, true);
    let inputs = m.host_inputs();
    // Frames arrive from another thread while the guest runs, as from a TAP.
    let feeder = std::thread::spawn(move || {
        for n in 0..20 {
            std::thread::sleep(Duration::from_millis(7));
            inputs.push_frame(arp_request(n));
        }
    });
    let mut rec = Recorder::new(MemorySink::default(), Some(Duration::from_millis(20)));
    let end = m.run(&mut rec).unwrap();
    feeder.join().unwrap();
    rec.finish(&mut m, end).unwrap();
    assert_eq!(end, RunEnd::PowerOff(0), "{}", text(&out));
    let entries = rec.into_sink().entries;
    let rx = entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::RxFrame { .. }))
        .count();
    assert!(rx >= 10, "only {rx} frames were delivered:\n{}", text(&out));
    let replies = out.frames();
    assert!(
        replies.iter().filter(|f| is_arp_reply_to_client(f)).count() >= rx.min(10),
        "the guest answered {} of {rx} ARP requests",
        replies.len()
    );
    let digest = m.digest().unwrap();

    let out2 = Collector::new();
    let mut b = machine(&out2, false);
    let mut rep = Replayer::new(MemorySource::new(entries));
    let end2 = b.run(&mut rep).unwrap();
    rep.finish(&mut b, end2).unwrap();
    assert_eq!(end2, end);
    assert_eq!(text(&out2), text(&out), "console differs");
    assert_eq!(b.digest().unwrap(), digest, "memory + registers differ");
    assert_eq!(out2.frames(), replies, "the replay sent other frames");
    // Every output, console byte or frame, has its own entry, and the
    // replay tagged each with the same entry as the recording.
    assert_eq!(out2.all(), out.all(), "outputs or their tags differ");
    assert!(out.all().iter().all(|(_, tag)| tag.is_some()));
}

#[test]
fn a_perturbed_frame_is_caught_by_divergence_detection() {
    if !kvm_or_skip() {
        return;
    }
    let out = Collector::new();
    let mut m = machine(&out, true);
    for n in 0..5 {
        m.host_inputs().push_frame(arp_request(n));
    }
    let mut rec = Recorder::new(MemorySink::default(), Some(Duration::from_millis(10)));
    let end = m.run(&mut rec).unwrap();
    rec.finish(&mut m, end).unwrap();
    let mut entries = rec.into_sink().entries;
    let i = entries
        .iter()
        .position(|e| matches!(e.kind, EntryKind::RxFrame { .. }))
        .expect("a frame was delivered");
    if let EntryKind::RxFrame { bytes, .. } = &mut entries[i].kind {
        bytes[38..42].copy_from_slice(&[10, 99, 0, 3]); // asks for another IP
    }
    let mut b = machine(&Collector::new(), false);
    let mut rep = Replayer::new(MemorySource::new(entries));
    let err = b
        .run(&mut rep)
        .and_then(|end| rep.finish(&mut b, end))
        .unwrap_err();
    // The guest does not answer an ARP request for another address: the
    // reply the primary sent is missing (its output entry), or the state
    // digest differs, whichever the replay meets first.
    let err = err.to_string();
    assert!(
        err.contains("digest") || err.contains("did not send that output"),
        "{err}"
    );
}

#[test]
fn a_snapshot_of_a_networked_vm_continues_like_the_original() {
    if !kvm_or_skip() {
        return;
    }
    // Virtual time and seeded entropy make the two runs comparable.
    let config = |out: &Collector| {
        let mut c = MachineConfig::new(32, CMDLINE, Box::new(out.clone()));
        c.clock = vmm::clock::ClockMode::Virtual {
            ns_per_exit: 20_000,
        };
        c.entropy = vmm::devices::ftclock::Entropy::Seeded(7);
        c
    };
    let feed = |m: &Machine| {
        for n in 0..8 {
            m.host_inputs().push_frame(arp_request(n));
        }
    };
    let out = Collector::new();
    let mut a = Machine::new(config(&out), GUEST_ELF).unwrap();
    ftvmm::net::attach(&mut a, MAC).unwrap();
    feed(&a);
    assert_eq!(a.run(&mut vmm::Live).unwrap(), RunEnd::PowerOff(0));
    let whole = out.all();
    let exits = a.exit_count();

    // Same run, paused after the network is up, snapshotted and restored.
    struct PauseAfter(u64);
    impl vmm::Observer for PauseAfter {
        fn at_point(&mut self, m: &mut Machine) -> vmm::Result<vmm::Flow> {
            if m.exit_count() >= self.0 {
                return Ok(vmm::Flow::Pause);
            }
            vmm::Live.at_point(m)
        }
    }
    let out1 = Collector::new();
    let mut b = Machine::new(config(&out1), GUEST_ELF).unwrap();
    ftvmm::net::attach(&mut b, MAC).unwrap();
    feed(&b);
    assert_eq!(b.run(&mut PauseAfter(exits / 2)).unwrap(), RunEnd::Paused);
    let snap = b.snapshot().unwrap();
    let net = snap
        .devices
        .net
        .as_ref()
        .expect("the snapshot holds the device");
    assert!(
        net.rx_frames > 0,
        "frames were delivered before the snapshot"
    );
    let mut c = Machine::restore(&snap, config(&out1)).unwrap();
    ftvmm::net::attach(&mut c, MAC).unwrap();
    // Frames still queued in the old VM's host queue move with it.
    while let Some(f) = b.host_inputs().take_frame() {
        c.host_inputs().push_frame(f);
    }
    assert_eq!(c.run(&mut vmm::Live).unwrap(), RunEnd::PowerOff(0));
    // Same outputs at the same positions: the restored VM goes on numbering
    // console bytes and frames where the original was.
    assert_eq!(out1.all(), whole);
}
