//! A join point anywhere: the state a joining backup builds from
//! `snapshot_state` plus RAM is the primary's, also at an I/O exit whose
//! instruction `snapshot_state` must finish first (an IN's result, a string
//! I/O with elements left): the primary's own view of its registers
//! afterwards (its digest at the join point) must be the finished one.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use common::deterministic;
use ftvmm::console::Capture;
use ftvmm::guest::GUEST_ELF;
use vm_memory::{Bytes, GuestAddress};
use vmm::{Flow, Live, Machine, Observer, RunEnd};

/// Pauses at the first point after `after` exits where RCX is above 1
/// (a string I/O with elements left, or the guest's own polling loop).
struct PauseInRep {
    after: u64,
}

impl Observer for PauseInRep {
    fn at_point(&mut self, m: &mut Machine) -> vmm::Result<Flow> {
        if m.exit_count() >= self.after && m.point()?.rcx > 1 {
            return Ok(Flow::Pause);
        }
        Live.at_point(m)
    }
}

#[test]
fn a_join_point_at_an_io_exit_gives_the_same_state_on_both_sides() {
    if !common::kvm_or_skip() {
        return;
    }
    let cmd = "hz=250 ticks=100 digest_every=25";
    for after in [200, 400, 650] {
        let out = Capture::new();
        let mut a = Machine::new(deterministic(cmd, &out), GUEST_ELF).unwrap();
        assert_eq!(a.run(&mut PauseInRep { after }).unwrap(), RunEnd::Paused);
        let point = a.point().unwrap();
        let mut snap = a.snapshot_state().unwrap();
        let mut ram = vec![0u8; (snap.mem_mib << 20) as usize];
        a.memory().read_slice(&mut ram, GuestAddress(0)).unwrap();
        snap.memory = ram;
        let primary = a.digest().unwrap();
        let mut b = Machine::restore(&snap, deterministic(cmd, &Capture::new())).unwrap();
        assert_eq!(b.point().unwrap(), point);
        assert_eq!(b.regs().unwrap(), a.regs().unwrap(), "registers at {point}");
        assert_eq!(b.digest().unwrap(), primary, "digest at {point}");
    }
}
