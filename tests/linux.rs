//! An unmodified Linux 6.1 guest (guest/linux/build.sh): it boots to its
//! busybox /init under `ftvmm run --initrd` and powers off, and a recorded
//! boot plus a workload replays with every state digest equal.
//!
//! The image is built by `bash guest/linux/build.sh` (.ci/run does it before
//! the tests) into target/linux/. Without it the tests say so and return,
//! except in CI (`CI=true`), where that fails.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};
use std::time::Instant;

use common::linux::{cmdline, image_or_skip};

fn ftvmm(args: &[&str]) -> (Output, f64) {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ftvmm"))
        .args(args)
        // The RDTSC trap says where it is armed (an info message).
        .env("FTVMM_LOG", "info")
        .output()
        .expect("ftvmm runs");
    (out, start.elapsed().as_secs_f64())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The number before `label` in `s` ("40 state digests equal").
fn number_before(s: &str, label: &str) -> u64 {
    let at = s
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {s}"));
    let digits: String = s[..at]
        .trim_end()
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.chars().rev().collect::<String>().parse().unwrap()
}

#[test]
fn linux_boots_to_init_and_powers_off() {
    let Some(img) = image_or_skip() else {
        return;
    };
    let cmd = cmdline("boot");
    let (out, secs) = ftvmm(&[
        "run",
        "--no-stdin",
        "--mem",
        "128",
        "--kernel",
        img.kernel.to_str().unwrap(),
        "--initrd",
        img.initrd.to_str().unwrap(),
        "--cmdline",
        &cmd,
    ]);
    let (console, err) = (text(&out.stdout), text(&out.stderr));
    eprintln!("Linux booted and powered off in {secs:.1} s");
    assert!(console.contains("Run /init as init process"), "{console}");
    assert!(console.contains("ftvmm-linux: init"), "{console}");
    assert!(console.contains("ftvmm-linux: poweroff"), "{console}");
    // Linux without ACPI powers off by halting with interrupts disabled.
    assert!(console.contains("reboot: System halted"), "{console}");
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the guest halted (Linux: powered off)"),
        "{err}"
    );
    // random_get_entropy's RDTSC is trapped (vmm::rdtsc, docs/linux.md).
    assert!(
        err.contains("RDTSC in the kernel answered by the VMM"),
        "{err}"
    );
    assert!(!console.contains("Kernel panic"), "{console}");
}

#[test]
fn linux_reboot_ends_the_vm_as_a_reset() {
    let Some(img) = image_or_skip() else {
        return;
    };
    let cmd = cmdline("reboot");
    let (out, secs) = ftvmm(&[
        "run",
        "--no-stdin",
        "--mem",
        "128",
        "--kernel",
        img.kernel.to_str().unwrap(),
        "--initrd",
        img.initrd.to_str().unwrap(),
        "--cmdline",
        &cmd,
    ]);
    let (console, err) = (text(&out.stdout), text(&out.stderr));
    eprintln!("Linux booted and rebooted in {secs:.1} s");
    assert!(console.contains("ftvmm-linux: reboot"), "{console}");
    assert!(console.contains("reboot: Restarting system"), "{console}");
    // The keyboard controller's reset command, not a spin or a BIOS jump.
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("the guest reset the machine"), "{err}");
}

#[test]
fn linux_boot_and_workload_replay_with_every_digest_equal() {
    let Some(img) = image_or_skip() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ftvmm-linux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("linux.log");
    let (kernel, initrd) = (img.kernel.to_str().unwrap(), img.initrd.to_str().unwrap());
    let cmd = cmdline("replay");
    let (rec, secs) = ftvmm(&[
        "record",
        "--no-stdin",
        "--log",
        log.to_str().unwrap(),
        "--mem",
        "128",
        "--kernel",
        kernel,
        "--initrd",
        initrd,
        "--cmdline",
        &cmd,
    ]);
    let (console, err) = (text(&rec.stdout), text(&rec.stderr));
    eprintln!("recorded in {secs:.1} s");
    assert_eq!(rec.status.code(), Some(2), "{err}");
    // The workload ran: shell commands, floating point, a signal, timers.
    for line in [
        "ftvmm-linux: init",
        "ftvmm-linux: loop 20",
        "ftvmm-linux: float 3.288868384",
        "ftvmm-linux: got TERM",
        "ftvmm-linux: pipes 300 299 298",
        "ftvmm-linux: replay workload done",
    ] {
        assert!(console.contains(line), "{line:?} missing from\n{console}");
    }
    // Linux took the wall clock from the CMOS RTC: the host's date (the
    // recording runs for a minute; a run across midnight UTC may differ).
    let today = String::from_utf8(
        Command::new("date")
            .args(["-u", "+%Y-%m-%d"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        console.contains(&format!("ftvmm-linux: date {}", today.trim())),
        "{console}"
    );
    let recorded = number_before(&err, "digests)");
    assert!(recorded >= 5, "{err}");

    // Another initrd is refused before anything runs.
    let other = dir.join("other.cpio");
    let mut bytes = std::fs::read(&img.initrd).unwrap();
    bytes.extend_from_slice(&[0; 512]);
    std::fs::write(&other, bytes).unwrap();
    let (wrong, _) = ftvmm(&[
        "replay",
        "--quiet",
        "--log",
        log.to_str().unwrap(),
        "--kernel",
        kernel,
        "--initrd",
        other.to_str().unwrap(),
    ]);
    let err = text(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the log was recorded with another initrd"),
        "{err}"
    );

    let (rep, secs) = ftvmm(&[
        "replay",
        "--log",
        log.to_str().unwrap(),
        "--kernel",
        kernel,
        "--initrd",
        initrd,
    ]);
    let err = text(&rep.stderr);
    eprintln!("replayed in {secs:.1} s: {err}");
    assert_eq!(rep.status.code(), Some(0), "{err}");
    assert!(err.contains("replay matched the recording"), "{err}");
    assert_eq!(
        number_before(&err, "state digests equal"),
        recorded,
        "{err}"
    );
    // The replayed guest printed what the recorded one did.
    assert_eq!(text(&rep.stdout), console);
    std::fs::remove_dir_all(&dir).unwrap();
}
