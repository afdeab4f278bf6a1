//! The unmodified Linux guest (guest/linux/build.sh) behind an FT pair:
//! `ftvmm run --primary` and `--backup`, each with its own console file.
//! kill -9 of the primary while /init prints a counter, and the output rule
//! with a frozen backup. What the backup produced itself must extend what
//! the primary released.
//!
//! The image is built by `bash guest/linux/build.sh` into target/linux/.
//! Without it the tests say so and return, except in CI (`CI=true`).

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::linux::{cmdline, image_or_skip, Image};
use common::pair::{check_extends, check_no_gap, PairDir, Proc, Side};

/// The counter /init prints with `ftvmm=count` (guest/linux/init).
const COUNT: u32 = 30;

/// One pair at a time: each is two Linux VMs in emulated CPL0 code, and
/// the host has two cores.
static ONE_PAIR: Mutex<()> = Mutex::new(());

/// Both sides: the Linux kernel and initramfs, the counter workload.
fn side(img: &Image, peer_timeout_ms: u64) -> Side {
    Side::new(&cmdline("count"))
        .kernel(&img.kernel)
        .args(&["--initrd", img.initrd.to_str().unwrap(), "--mem", "128"])
        .peer_timeout_ms(peer_timeout_ms)
}

/// `text` has the line `line` (the serial console ends lines with CR LF).
fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim_end() == line)
}

/// Wait until `p`'s console has the line `line`; false if `p` exits or
/// `limit` passes first.
fn wait_console(p: &mut Proc, line: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if has_line(&p.console_text(), line) {
            return true;
        }
        if p.exited().is_some() {
            return has_line(&p.console_text(), line);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The backup's console after it went live: the whole guest run, /init
/// reached, every count once and in order, the end marker, the power-off.
fn check_whole_run(console: &[u8]) -> Result<(), String> {
    check_no_gap(console)?;
    let text = String::from_utf8_lossy(console);
    for line in [
        "Run /init as init process",
        "ftvmm-linux: init",
        "ftvmm-linux: count done",
        "ftvmm-linux: poweroff",
        "reboot: System halted",
    ] {
        if !text.contains(line) {
            return Err(format!("{line:?} missing"));
        }
    }
    let counts: Vec<u32> = text
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("ftvmm-linux: count "))
        .filter_map(|n| n.parse().ok())
        .collect();
    let want: Vec<u32> = (1..=COUNT).collect();
    if counts != want {
        return Err(format!("counts {counts:?}, expected 1..={COUNT}"));
    }
    Ok(())
}

#[test]
fn linux_backup_takes_over_after_kill_9_of_the_primary() {
    let Some(img) = image_or_skip() else {
        return;
    };
    let _one = ONE_PAIR.lock().unwrap_or_else(|e| e.into_inner());
    let dir = PairDir::new("linux-kill");
    let start = Instant::now();
    // kill -9 closes the channel: the backup notices at once, whatever
    // the timeout; a long one keeps a busy host from splitting the pair.
    let (mut backup, mut primary) = dir.start(&side(&img, 60_000));
    let reached = wait_console(
        &mut primary,
        "ftvmm-linux: count 5",
        Duration::from_secs(150),
    );
    assert!(
        reached,
        "the primary did not release count 5\n{}{}",
        primary.describe(),
        backup.describe()
    );
    let at = start.elapsed();
    primary.kill();
    let code = backup.finish(Duration::from_secs(150));
    let report = format!("{}{}", primary.describe(), backup.describe());
    eprintln!(
        "primary killed at {at:?} after releasing {} bytes; backup ended with {code} at {:?}",
        primary.console().len(),
        start.elapsed()
    );
    // Linux powers off by halting with interrupts off: `ftvmm run` ends
    // with status 2, the backup that went live as well.
    assert_eq!(code, 2, "{report}");
    assert!(backup.went_live(), "{report}");
    assert!(
        backup.stderr().contains("backup stopped: HaltedForever"),
        "{report}"
    );
    let released = primary.console();
    check_no_gap(&released).unwrap();
    assert!(
        has_line(&String::from_utf8_lossy(&released), "ftvmm-linux: count 5"),
        "{report}"
    );
    if let Err(e) = check_extends(&released, &backup.console()) {
        panic!("the backup contradicts the primary: {e}\n{report}");
    }
    if let Err(e) = check_whole_run(&backup.console()) {
        panic!("backup: {e}\n{report}");
    }
}

#[test]
fn linux_output_waits_for_the_frozen_backup() {
    let Some(img) = image_or_skip() else {
        return;
    };
    let _one = ONE_PAIR.lock().unwrap_or_else(|e| e.into_inner());
    let dir = PairDir::new("linux-gate");
    // The primary must not give up on the frozen backup during the test.
    let (mut backup, mut primary) = dir.start(&side(&img, 600_000));
    let reached = wait_console(
        &mut primary,
        "ftvmm-linux: count 3",
        Duration::from_secs(150),
    );
    assert!(
        reached,
        "the primary did not release count 3\n{}{}",
        primary.describe(),
        backup.describe()
    );
    // Freeze the backup: it stops acknowledging the log. Acks it sent
    // before the stop arrive within the pause below.
    backup.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(500));
    let at_stop = primary.console();
    // The guest goes on printing a line every 0.25 s (or is slowed by the
    // lag bound); none of it may be released while nothing is acknowledged.
    std::thread::sleep(Duration::from_secs(5));
    let later = primary.console();
    let report = |b: &Proc, p: &Proc| format!("{}{}", p.describe(), b.describe());
    assert_eq!(primary.exited(), None, "{}", report(&backup, &primary));
    assert!(!primary.won(), "{}", report(&backup, &primary));
    assert_eq!(
        later.len(),
        at_stop.len(),
        "the primary released output the frozen backup never acknowledged\n{}",
        report(&backup, &primary)
    );
    // The primary dies holding that output; the backup takes over and
    // produces it itself, consistent with what was released.
    primary.kill();
    backup.signal(libc::SIGCONT);
    let code = backup.finish(Duration::from_secs(150));
    let report = report(&backup, &primary);
    assert_eq!(code, 2, "{report}");
    assert!(backup.went_live(), "{report}");
    let released = primary.console();
    assert_eq!(released.len(), at_stop.len(), "{report}");
    if let Err(e) = check_extends(&released, &backup.console()) {
        panic!("the backup contradicts the primary: {e}\n{report}");
    }
    if let Err(e) = check_whole_run(&backup.console()) {
        panic!("backup: {e}\n{report}");
    }
    eprintln!(
        "released {} bytes while the backup was frozen; the backup produced {}",
        released.len(),
        backup.console().len()
    );
}
