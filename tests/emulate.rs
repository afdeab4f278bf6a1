//! The VMM's emulation of instructions this host's KVM cannot emulate
//! (vmm::emulate): each instruction at CPL0 against its architectural
//! result, faults delivered into the guest, emulated XSAVE/XRSTOR against
//! the native instructions at CPL3, the unknown-instruction error, record
//! and replay across emulated instructions, and the SYSCALL quirk.
//!
//! The guests are assembled from tests/guests/*.s (tests/guests/assemble.sh).

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
