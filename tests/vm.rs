//! The VMM core on the bundled guest: boot, timer, serial, snapshots, errors.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use common::{config, deterministic, digest_lines, kvm_or_skip};
use ftvmm::console::Capture;
use ftvmm::guest::GUEST_ELF;
use vmm::{Flow, Live, Machine, Observer, RunEnd, VmSnapshot};

#[test]
fn guest_boots_and_prints_banner() {
    if !kvm_or_skip() {
        return;
    }
    let out = Capture::new();
    let mut m = Machine::new(config("ticks=10", &out), GUEST_ELF).unwrap();
    assert_eq!(m.run(&mut Live).unwrap(), RunEnd::PowerOff(0));
    let text = out.text();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("ftvmm-guest 0.1 booting"));
    assert_eq!(lines.next(), Some("cmdline: ticks=10"));
    assert!(text.contains("\ndone ticks 10 digest "), "{text}");
}

#[test]
fn timer_interrupts_arrive_at_the_configured_rate() {
    if !kvm_or_skip() {
        return;
    }
    let (hz, ticks) = (200.0, 300);
    let out = Capture::new();
    let cmd = format!("hz={hz} ticks={ticks} work=1000");
    let mut m = Machine::new(config(&cmd, &out), GUEST_ELF).unwrap();
    let start = Instant::now();
    assert_eq!(m.run(&mut Live).unwrap(), RunEnd::PowerOff(0));
    let rate = f64::from(ticks) / start.elapsed().as_secs_f64();
    // Wide margin: the host is shared and boot time is included.
    assert!(
        (hz * 0.4..=hz * 1.5).contains(&rate),
        "{ticks} ticks at {hz} Hz came at {rate:.1} Hz"
    );
}

#[test]
fn serial_output_has_the_documented_format_and_is_reproducible() {
    if !kvm_or_skip() {
        return;
    }
    let cmd = "hz=100 ticks=60 digest_every=10";
    let run = || {
        let out = Capture::new();
        let mut m = Machine::new(deterministic(cmd, &out), GUEST_ELF).unwrap();
        assert_eq!(m.run(&mut Live).unwrap(), RunEnd::PowerOff(0));
        out.text()
    };
    let a = run();
    let lines = digest_lines(&a);
    assert_eq!(lines.len(), 7, "{a}");
    for (i, l) in lines[..6].iter().enumerate() {
        let want = format!("tick {} digest ", (i + 1) * 10);
        assert!(
            l.starts_with(&want),
            "line {l:?} should start with {want:?}"
        );
        let hex = &l[want.len()..];
        assert_eq!(hex.len(), 16);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }
    assert_eq!(
        a,
        run(),
        "a virtual-time run is a pure function of its inputs"
    );
}

#[test]
fn serial_input_reaches_the_guest() {
    if !kvm_or_skip() {
        return;
    }
    let out = Capture::new();
    let mut m = Machine::new(config("hz=100 ticks=50", &out), GUEST_ELF).unwrap();
    m.host_inputs().push_serial(b"Z");
    assert_eq!(m.run(&mut Live).unwrap(), RunEnd::PowerOff(0));
    assert!(out.text().contains("rx 5a"), "{}", out.text());
}

/// Pauses the first time the exit counter reaches `at`.
struct PauseAt {
    at: u64,
    paused: bool,
}

impl Observer for PauseAt {
    fn at_point(&mut self, m: &mut Machine) -> vmm::Result<Flow> {
        if !self.paused && m.exit_count() >= self.at {
            self.paused = true;
            return Ok(Flow::Pause);
        }
        Live.at_point(m)
    }
}

fn final_memory(m: &mut Machine) -> Vec<u8> {
    m.snapshot().unwrap().memory
}

#[test]
fn snapshot_restore_continues_exactly_like_an_uninterrupted_run() {
    if !kvm_or_skip() {
        return;
    }
    let cmd = "hz=100 ticks=120 digest_every=10";
    let whole = Capture::new();
    let mut a = Machine::new(deterministic(cmd, &whole), GUEST_ELF).unwrap();
    assert_eq!(a.run(&mut Live).unwrap(), RunEnd::PowerOff(0));
    let total = a.exit_count();
    let regs_a = a.regs().unwrap();
    let mem_a = final_memory(&mut a);

    for frac in [3, 2] {
        let first = Capture::new();
        let mut b = Machine::new(deterministic(cmd, &first), GUEST_ELF).unwrap();
        let mut pause = PauseAt {
            at: total / frac,
            paused: false,
        };
        assert_eq!(b.run(&mut pause).unwrap(), RunEnd::Paused);
        let snap = b.snapshot().unwrap();
        let bytes = vmm::snapshot::encode(&snap).unwrap();
        drop(b);
        let snap: VmSnapshot = vmm::snapshot::decode(&bytes).unwrap();

        let second = Capture::new();
        let mut c = Machine::restore(&snap, deterministic(cmd, &second)).unwrap();
        assert_eq!(c.run(&mut Live).unwrap(), RunEnd::PowerOff(0));
        let joined = first.text() + &second.text();
        assert_eq!(
            digest_lines(&joined),
            digest_lines(&whole.text()),
            "digest sequence after restore at exit {}",
            total / frac
        );
        assert_eq!(joined, whole.text());
        assert_eq!(c.exit_count(), total);
        assert_eq!(c.regs().unwrap(), regs_a);
        assert!(final_memory(&mut c) == mem_a, "final memory differs");
    }
}

#[test]
fn bad_kernel_and_bad_memory_sizes_are_clear_errors() {
    if !kvm_or_skip() {
        return;
    }
    let out = Capture::new();
    let err = Machine::new(config("", &out), b"this is not a kernel at all")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not an ELF file, and not a bzImage"), "{err}");

    let mut truncated = GUEST_ELF[..200].to_vec();
    truncated.truncate(200);
    let err = Machine::new(config("", &out), &truncated)
        .err()
        .unwrap()
        .to_string();
    assert!(err.starts_with("cannot load kernel"), "{err}");

    let mut cfg = config("", &out);
    cfg.mem_mib = 1;
    let err = Machine::new(cfg, GUEST_ELF).err().unwrap().to_string();
    assert!(err.contains("1 MiB is too small"), "{err}");

    let mut cfg = config("", &out);
    cfg.mem_mib = 1 << 20;
    let err = Machine::new(cfg, GUEST_ELF).err().unwrap().to_string();
    assert!(err.contains("too large"), "{err}");
}

#[test]
fn loader_boots_plain_elf_pvh_elf_and_bzimage() {
    if !kvm_or_skip() {
        return;
    }
    use ftvmm::testkit::{bzimage, pio_loop, pvh_elf, BOOT_CHECK_OK};
    use vmm::loader::KernelKind;
    let cases = [
        (pio_loop(3, false), KernelKind::Elf, 0),
        (pvh_elf(), KernelKind::ElfPvh, BOOT_CHECK_OK),
        (bzimage(), KernelKind::BzImage, BOOT_CHECK_OK),
    ];
    for (image, kind, code) in cases {
        let out = Capture::new();
        let mut m = Machine::new(config("console=ttyS0", &out), &image).unwrap();
        assert_eq!(m.kernel_kind(), Some(kind));
        // The kernels power off with 42 only if their boot information
        // (hvm_start_info magic in EBX, zero page in RSI) is right.
        assert_eq!(
            m.run(&mut Live).unwrap(),
            RunEnd::PowerOff(code),
            "{kind:?}"
        );
    }
}

/// Counts exits by kind through the observer's per-exit hook.
#[derive(Default)]
struct CountExits {
    io: u64,
    hlt: u64,
}

impl Observer for CountExits {
    fn at_point(&mut self, m: &mut Machine) -> vmm::Result<Flow> {
        Live.at_point(m)
    }
    fn on_exit(&mut self, _m: &mut Machine, kind: vmm::points::ExitKind) {
        match kind {
            vmm::points::ExitKind::Io => self.io += 1,
            vmm::points::ExitKind::Hlt => self.hlt += 1,
            _ => {}
        }
    }
}

#[test]
fn every_exit_reaches_the_observer_typed() {
    if !kvm_or_skip() {
        return;
    }
    let out = Capture::new();
    let mut m = Machine::new(config("hz=100 ticks=20", &out), GUEST_ELF).unwrap();
    let mut obs = CountExits::default();
    assert_eq!(m.run(&mut obs).unwrap(), RunEnd::PowerOff(0));
    // Every serial byte is at least two port accesses (LSR poll, THR write).
    assert!(
        obs.io >= 2 * out.bytes().len() as u64,
        "{} I/O exits",
        obs.io
    );
    assert!(
        obs.hlt >= 10,
        "the guest idles in HLT between ticks: {}",
        obs.hlt
    );
}

#[test]
fn another_thread_stops_a_running_vm_cleanly() {
    if !kvm_or_skip() {
        return;
    }
    for mode in [
        vmm::points::PointMode::AnyExit,
        vmm::points::PointMode::Exits,
    ] {
        let out = Capture::new();
        let mut cfg = config("hz=100", &out); // runs forever
        cfg.points = mode;
        let mut m = Machine::new(cfg, GUEST_ELF).unwrap();
        let inputs = m.host_inputs();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            inputs.request_stop();
        });
        assert_eq!(m.run(&mut Live).unwrap(), RunEnd::Stopped, "{mode:?}");
        stopper.join().unwrap();
        assert!(out.text().starts_with("ftvmm-guest 0.1 booting"));
    }
}
