//! The VMM's emulation of instructions this host's KVM cannot emulate
//! (vmm::emulate): each instruction at CPL0 against its architectural
//! result, faults delivered into the guest, emulated XSAVE/XRSTOR against
//! the native instructions at CPL3, the unknown-instruction error, record
//! and replay across emulated instructions, and the SYSCALL quirk.
//!
//! The guests are assembled from tests/guests/*.s (tests/guests/assemble.sh).
#![allow(clippy::unwrap_used)]

mod common;

#[path = "guests/emulate_guests.rs"]
mod guests;

use common::kvm_or_skip;
use vm_memory::{Bytes, GuestAddress};
use vmm::emulate::Mnemonic;
use vmm::{Machine, MachineConfig, RunEnd};

const RESULT: u64 = 0x40_0000;
const R_TEST: u64 = RESULT + 0x100;
const AC: u64 = 1 << 18;

/// Run a test guest to its end; a guest still running after 60 s is
/// stopped (the test then fails on its RunEnd instead of hanging).
fn boot(code: &[u8]) -> (Result<RunEnd, vmm::Error>, Machine) {
    let cfg = MachineConfig::new(16, "", Box::new(std::io::sink()));
    let mut m = Machine::new(cfg, &vmm::loader::minimal_elf(code, None)).unwrap();
    let inputs = m.host_inputs();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if wait
            .recv_timeout(std::time::Duration::from_secs(60))
            .is_err()
        {
            inputs.request_stop();
        }
    });
    let end = m.run(&mut vmm::Live);
    drop(done);
    watchdog.join().unwrap();
    (end, m)
}

/// Whether this is the kvm_pvm host whose emulator gives up on these
/// instructions (elsewhere KVM may run them itself and the VMM's path is
/// never taken; the architectural results are checked either way).
fn kvm_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

fn at(m: &Machine, gpa: u64) -> u64 {
    m.memory().read_obj(GuestAddress(gpa)).unwrap()
}

fn test_word(m: &Machine, i: u64) -> u64 {
    at(m, R_TEST + 8 * i)
}

fn bytes(m: &Machine, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    m.memory().read_slice(&mut b, GuestAddress(gpa)).unwrap();
    b
}

#[test]
fn cpl0_instructions_give_their_architectural_results() {
    if !kvm_or_skip() {
        return;
    }
    let (end, m) = boot(guests::INSNS);
    assert_eq!(end.unwrap(), RunEnd::PowerOff(0));
    let (after_stac, after_clac) = (test_word(&m, 0), test_word(&m, 1));
    assert_ne!(after_stac & AC, 0, "STAC sets AC");
    assert_eq!(after_clac & AC, 0, "CLAC clears AC");
    assert_eq!(after_stac & !AC, after_clac, "nothing else changes");
    assert_eq!(test_word(&m, 2), 17, "popcnt rax, rcx");
    assert_eq!(
        test_word(&m, 3) & 0xfff,
        0x2,
        "CF (set before) and ZF clear"
    );
    assert_eq!(test_word(&m, 4), 9, "popcnt eax zero-extends");
    assert_eq!(
        test_word(&m, 5),
        0xffff_ffff_ffff_0009,
        "popcnt ax keeps bits 63:16"
    );
    assert_eq!(test_word(&m, 6), 0);
    assert_eq!(test_word(&m, 7) & 0xfff, 0x42, "zero source: ZF only");
    assert_eq!(test_word(&m, 8), 3, "popcnt r9, [rbx + r12*8]");
    assert_eq!(test_word(&m, 9), 3, "popcnt r10, fs:[0x48]");
    assert_eq!(test_word(&m, 10), 32, "popcnt r11, [rip + ones]");
    assert_eq!(test_word(&m, 11), 0x1fa0, "ldmxcsr then stmxcsr");
    // #BP: vector 3, the saved RIP is the instruction after INT3.
    assert_eq!(at(&m, RESULT), 3);
    assert_eq!(at(&m, RESULT + 0x10), test_word(&m, 12));
    assert_eq!(at(&m, RESULT + 0x28), 1, "exactly one exception");
    let s = m.emulation_stats();
    eprintln!("emulated: {s}");
    if !kvm_pvm() {
        return;
    }
    for (i, n) in [
        (Mnemonic::Stac, 1),
        (Mnemonic::Clac, 1),
        (Mnemonic::Popcnt, 7),
        (Mnemonic::Fwait, 1),
        (Mnemonic::Int3, 1),
        (Mnemonic::Ldmxcsr, 2),
        (Mnemonic::Stmxcsr, 1),
    ] {
        assert_eq!(s.get(i), n, "{i:?} emulated on this host");
    }
}

const UDATA: u64 = 0x22_0000;
const DATA: u64 = 0x40_1000;

/// The first offset where two areas differ, with both bytes.
fn diff(a: &[u8], b: &[u8]) -> Option<(usize, u8, u8)> {
    a.iter()
        .zip(b)
        .enumerate()
        .find(|(_, (x, y))| x != y)
        .map(|(i, (x, y))| (i, *x, *y))
}

#[test]
fn emulated_xsave_and_xrstor_match_the_native_instructions_byte_for_byte() {
    if !kvm_or_skip() {
        return;
    }
    let (end, m) = boot(guests::XSAVE_NATIVE);
    assert_eq!(end.unwrap(), RunEnd::PowerOff(0));
    let area = |base: u64, k: u64| bytes(&m, base + 0x1000 * k, 0x1000);
    // KVM's own emulator runs FXSAVE64 here and zeroes bytes 416..511,
    // which the processor leaves alone; ours (when it runs) does not.
    let fx_len = if m.emulation_stats().get(Mnemonic::Fxsave64) > 0 {
        0x1000
    } else {
        416
    };
    for (k, what, len) in [
        (0, "xsave64", 0x1000),
        (1, "xsavec64", 0x1000),
        (2, "fxsave64", fx_len),
        (3, "xsave64 after vzeroupper", 0x1000),
        (4, "xsavec64 after vzeroupper", 0x1000),
    ] {
        let native = &area(UDATA, k)[..len];
        let emulated = &area(DATA, k)[..len];
        assert!(
            native.iter().any(|&b| b != 0xa5),
            "{what}: native area written"
        );
        assert_eq!(diff(native, emulated), None, "{what}: native vs emulated");
    }
    let bv = |k: u64| at(&m, UDATA + 0x1000 * k + 512);
    let comp = |k: u64| at(&m, UDATA + 0x1000 * k + 520);
    eprintln!(
        "XSTATE_BV {:#x} / {:#x}, XCOMP_BV {:#x}",
        bv(0),
        bv(3),
        comp(1)
    );
    assert_ne!(comp(1) & (1 << 63), 0, "XSAVEC wrote the compacted form");
    assert_ne!(bv(0) & 0xe0, 0, "AVX-512 state was in use");
    // XRSTOR (emulated) of the standard area, then a native XSAVE: the same.
    assert_eq!(
        diff(&area(UDATA, 0), &area(UDATA, 5)),
        None,
        "standard XRSTOR"
    );
    // XRSTOR of round two's area, then of round one's compacted area.
    assert_eq!(
        diff(&area(UDATA, 0), &area(UDATA, 6)),
        None,
        "compacted XRSTOR"
    );
    let s = m.emulation_stats();
    eprintln!("emulated: {s}");
    if kvm_pvm() {
        assert_eq!(s.get(Mnemonic::Xsave64), 2);
        assert_eq!(s.get(Mnemonic::Xsavec64), 2);
        assert_eq!(s.get(Mnemonic::Xrstor64), 3);
    }
}

const HOLE: u64 = 0x60_0000;

#[test]
fn exceptions_from_emulated_instructions_reach_the_guest_handlers() {
    if !kvm_or_skip() {
        return;
    }
    let (end, m) = boot(guests::FAULTS);
    assert_eq!(end.unwrap(), RunEnd::PowerOff(0));
    // (vector, error code, CR2 or None when it does not apply)
    let case = |n: u64| {
        let w = |i: u64| at(&m, R_TEST + 32 * n + 8 * i);
        (w(0), w(1), w(2), w(3))
    };
    let (v, e, cr2, at_insn) = case(0);
    assert_eq!(
        (v, e, at_insn),
        (14, 0x2, 1),
        "XSAVEC64 into a missing page"
    );
    assert!(
        (HOLE + 0x40..HOLE + 0x40 + 576).contains(&cr2),
        "CR2 {cr2:#x}"
    );
    assert_eq!(
        case(1),
        (14, 0x0, HOLE + 0x1238, 1),
        "POPCNT from a missing page"
    );
    let (v, e, cr2, at_insn) = case(2);
    assert_eq!(
        (v, e, at_insn),
        (14, 0x2, 1),
        "XSAVEC64 crossing into a missing page"
    );
    assert!((HOLE..HOLE + 0x100 + 576).contains(&cr2), "CR2 {cr2:#x}");
    assert_eq!(
        (case(3).0, case(3).1, case(3).3),
        (13, 0, 1),
        "misaligned XRSTOR64: #GP(0)"
    );
    assert_eq!(
        (case(4).0, case(4).1, case(4).3),
        (13, 0, 1),
        "reserved XSTATE_BV bit: #GP(0)"
    );
    let (v, e, cr2, at_insn) = case(5);
    assert_eq!((v, e, at_insn), (14, 0x3, 1), "SMAP: present, write");
    assert!((UDATA..UDATA + 576).contains(&cr2), "CR2 {cr2:#x}");
    assert_eq!(
        case(6).0 >> 63,
        1,
        "with STAC the same XSAVEC64 wrote XCOMP_BV"
    );
    assert_eq!((case(7).0, case(7).3), (7, 1), "CR0.TS: #NM");
    assert_eq!((case(8).0, case(8).3), (6, 1), "CR4.OSXSAVE clear: #UD");
    eprintln!("emulated: {}", m.emulation_stats());
    if kvm_pvm() {
        assert!(m.emulation_stats().faults() >= 8);
    }
}

#[test]
fn an_instruction_nobody_emulates_is_a_typed_error_with_its_bytes_and_rip() {
    if !kvm_or_skip() {
        return;
    }
    let (end, mut m) = boot(guests::UNKNOWN);
    let rip_now = m.regs().unwrap().rip;
    match end {
        Err(vmm::Error::UnknownInstruction { rip, bytes }) => {
            assert_eq!(bytes.0, vec![0x66, 0x0f, 0xef, 0xc1], "pxor xmm0, xmm1");
            assert_eq!(rip, rip_now, "RIP still at the instruction");
            let msg = vmm::Error::UnknownInstruction { rip, bytes }.to_string();
            assert!(msg.contains("66 0f ef c1"), "{msg}");
            assert!(msg.contains(&format!("{rip:#x}")), "{msg}");
        }
        // A host whose KVM runs PXOR at CPL0 gets here.
        Ok(RunEnd::PowerOff(0)) if !kvm_pvm() => {}
        other => panic!("expected UnknownInstruction, got {other:?}"),
    }
}

mod replay {
    use super::*;
    use std::time::Duration;
    use vmm::points::PointMode;
    use vmm::record::{MemorySink, Recorder};
    use vmm::replay::{MemorySource, Replayer};

    const ROUNDS: u64 = 500; // as in tests/guests/replay.s

    struct Run {
        digest: [u8; 32],
        regs: kvm_bindings::kvm_regs,
        exits: u64,
        emulated: u64,
    }

    fn cfg(mode: PointMode, live: bool) -> MachineConfig {
        let mut c = MachineConfig::new(16, "", Box::new(std::io::sink()));
        c.points = mode;
        c.live_timers = live;
        c
    }

    fn done(m: &mut Machine) -> Run {
        Run {
            digest: m.digest().unwrap(),
            regs: m.regs().unwrap(),
            exits: m.exit_count(),
            emulated: m.emulation_stats().total(),
        }
    }

    fn record_and_replay(mode: PointMode) -> (Run, Run) {
        let image = vmm::loader::minimal_elf(guests::REPLAY, None);
        let mut m = Machine::new(cfg(mode, true), &image).unwrap();
        let mut rec = Recorder::new(MemorySink::default(), Some(Duration::from_millis(1)));
        let end = m.run(&mut rec).unwrap();
        assert_eq!(end, RunEnd::PowerOff(0));
        rec.finish(&mut m, end).unwrap();
        let recorded = done(&mut m);
        let entries = rec.into_sink().entries;

        let mut b = Machine::new(cfg(mode, false), &image).unwrap();
        let mut rep = Replayer::new(MemorySource::new(entries));
        let end = b.run(&mut rep).unwrap();
        rep.finish(&mut b, end).unwrap();
        assert!(rep.stats().digests_checked > 1);
        (recorded, done(&mut b))
    }

    fn assert_same(a: &Run, b: &Run) {
        assert_eq!(a.exits, b.exits, "points");
        assert_eq!(a.regs, b.regs, "registers");
        assert_eq!(a.digest, b.digest, "memory + register digest");
    }

    #[test]
    fn emulated_instructions_are_not_points_and_replay_exactly() {
        if !kvm_or_skip() {
            return;
        }
        let (rec, rep) = record_and_replay(PointMode::Exits);
        assert_same(&rec, &rep);
        // Two port exits a round and the power-off: nothing else counts.
        assert_eq!(rec.exits, 2 * ROUNDS + 1);
        if kvm_pvm() {
            assert_eq!(
                rec.emulated,
                5 * ROUNDS,
                "stac, clac, popcnt, xsavec64, xrstor64"
            );
            assert_eq!(rep.emulated, 5 * ROUNDS);
        }
    }

    #[test]
    fn singlestep_backend_steps_over_emulated_instructions_exactly() {
        if !kvm_or_skip() {
            return;
        }
        let (rec, rep) = record_and_replay(PointMode::SingleStep);
        assert_same(&rec, &rep);
        // Every instruction is one step: at least the 15 of each round.
        assert!(rec.exits > 15 * ROUNDS, "{} steps", rec.exits);
    }
}

#[test]
fn syscall_from_cpl3_reaches_its_entry_at_cpl0_with_rcx_and_r11() {
    if !kvm_or_skip() {
        return;
    }
    let (end, m) = boot(guests::SYSCALL_FIXUP);
    assert_eq!(end.unwrap(), RunEnd::PowerOff(0), "the entry ran, no #PF");
    let w = |i| test_word(&m, i);
    assert_eq!(w(0), w(6), "RCX = the instruction after SYSCALL");
    assert_eq!(w(1), 0x40a02, "R11 = RFLAGS before SYSCALL");
    assert_eq!(w(2), 0x21_0000 - 64, "RSP still the user stack");
    assert_eq!(w(3) & 0xffff, 0x08, "CS from STAR[47:32]");
    assert_eq!(w(4) & 0xffff, 0x10, "SS = CS + 8");
    assert_eq!(w(5), 0x802, "RFLAGS = R11 & !SFMASK (IF, DF, AC cleared)");
    let quirk = vmm::quirks::syscall_stays_at_cpl3();
    eprintln!(
        "SYSCALL from CPL3 broken here: {quirk}; {}",
        m.emulation_stats()
    );
    assert_eq!(m.emulation_stats().syscall_fixups(), u64::from(quirk));
    if kvm_pvm() {
        assert!(quirk, "the probe finds kvm_pvm's SYSCALL quirk");
    }
}

#[test]
fn single_step_trap_after_an_emulated_instruction() {
    if !kvm_or_skip() {
        return;
    }
    let (end, m) = boot(guests::SINGLE_STEP);
    eprintln!("emulated: {}", m.emulation_stats());
    assert_eq!(end.unwrap(), RunEnd::PowerOff(0), "a #DB arrived");
    assert_eq!(at(&m, RESULT), 1, "vector 1");
    assert_eq!(
        at(&m, RESULT + 0x10),
        test_word(&m, 0),
        "RIP after the CLAC"
    );
    assert_ne!(test_word(&m, 1) & (1 << 14), 0, "DR6.BS");
}
