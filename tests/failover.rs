//! Primary and backup as two `ftvmm` processes on loopback: kill -9 of the
//! primary at random moments, kill of the backup, a cut channel, frozen
//! heartbeats and refused strangers. Each side writes its own console file:
//! the primary's is what the outside world was shown, the backup's is what
//! the backup produced itself, and the backup's must extend the primary's.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::pair::{check_extends, check_no_gap, PairDir, Proc, Side};
use ftvmm::testkit::relay::{Fault, Trigger};

const CMDLINE: &str = "hz=250 ticks=300 digest_every=25";

fn side() -> Side {
    Side::new(CMDLINE)
}

/// The whole console of the bundled guest with `CMDLINE`, every line in
/// order.
fn check_console(bytes: &[u8]) -> Result<(), String> {
    check_no_gap(bytes)?;
    let text = String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())?;
    let mut lines = text.lines();
    let expect = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(format!("expected {what} in\n{text}"))
        }
    };
    expect(
        lines.next() == Some("ftvmm-guest 0.1 booting"),
        "the banner",
    )?;
    expect(
        lines.next() == Some(format!("cmdline: {CMDLINE}").as_str()),
        "the command line",
    )?;
    expect(
        lines.next().is_some_and(|l| l.starts_with("clock ")),
        "the clock line",
    )?;
    for k in 1..=12 {
        let l = lines.next().unwrap_or_default();
        expect(
            l.starts_with(&format!("tick {} digest ", 25 * k)),
            &format!("tick {}", 25 * k),
        )?;
    }
    expect(
        lines.next().is_some_and(|l| l.starts_with("work steps ")),
        "work steps",
    )?;
    expect(
        lines
            .next()
            .is_some_and(|l| l.starts_with("done ticks 300 digest ")),
        "done",
    )?;
    expect(lines.next().is_none(), "the end")
}

/// After a kill of the primary: the primary's released output is whole.
/// If the backup went live, its own output extends the released output and
/// is the whole guest console; if it did not (the kill came after the
/// guest's end and the backup replayed the whole log), the primary released
/// the whole console itself and the backup put nothing out.
fn check_failover(primary: &Proc, backup: &Proc) -> Result<(), String> {
    let released = primary.console();
    check_no_gap(&released).map_err(|e| format!("primary: {e}"))?;
    let produced = backup.console();
    if !backup.went_live() {
        if !backup.stderr().contains("replay complete") {
            return Err("the backup neither went live nor completed the replay".into());
        }
        return check_console(&released).map_err(|e| format!("primary (guest ended): {e}"));
    }
    check_extends(&released, &produced).map_err(|e| format!("backup contradicts primary: {e}"))?;
    check_console(&produced).map_err(|e| format!("backup: {e}"))
}

#[test]
fn killing_the_primary_at_random_moments_loses_no_console_output() {
    if !common::kvm_or_skip() {
        return;
    }
    for (i, f) in common::random_fractions(20).into_iter().enumerate() {
        let dir = PairDir::new(&format!("kill{i}"));
        let (mut backup, mut primary) = dir.start(&side());
        // The guest runs 1.2 s; kill anywhere from boot to its end.
        let at = Duration::from_millis(100 + (f * 1200.0) as u64);
        primary.kill_after(at);
        let code = backup.finish(Duration::from_secs(60));
        let report = || format!("{}{}", primary.describe(), backup.describe());
        assert_eq!(
            code,
            0,
            "kill {i} after {at:?}: backup failed\n{}",
            report()
        );
        if let Err(e) = check_failover(&primary, &backup) {
            panic!("kill {i} after {at:?}: {e}\n{}", report());
        }
    }
}

#[test]
fn killing_the_backup_lets_the_primary_win_and_continue() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = PairDir::new("backupdies");
    let (mut backup, mut primary) = dir.start(&side());
    std::thread::sleep(Duration::from_millis(600));
    backup.kill();
    let code = primary.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{}", primary.describe());
    assert!(primary.won(), "{}", primary.describe());
    if let Err(e) = check_console(&primary.console()) {
        panic!("primary: {e}\n{}", primary.describe());
    }
}

#[test]
fn a_primary_with_the_wrong_key_is_refused() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = PairDir::new("badkey");
    let _backup = dir.backup(&side());
    let mut primary = dir.primary(&side().key("another key"), &dir.listen_addr());
    let code = primary.finish(Duration::from_secs(60));
    assert_ne!(code, 0);
    let err = primary.stderr();
    assert!(err.to_lowercase().contains("key"), "{err}");
}

#[test]
fn a_cut_logging_channel_leaves_exactly_one_side_live() {
    if !common::kvm_or_skip() {
        return;
    }
    for round in 0..3u64 {
        let dir = PairDir::new(&format!("cut{round}"));
        let relay = dir.relay();
        let (mut backup, mut primary) = dir.start_via(&side(), &relay);
        relay.arm(
            Trigger::After(Duration::from_millis(300 + 200 * round)),
            Fault::Cut,
        );
        let p_code = primary.finish(Duration::from_secs(60));
        let b_code = backup.finish(Duration::from_secs(60));
        let report = format!(
            "round {round}: {:?}\n{}{}",
            relay.counters(),
            primary.describe(),
            backup.describe()
        );
        let live = [p_code, b_code].iter().filter(|c| **c == 0).count();
        assert_eq!(live, 1, "{report}");
        let (winner, loser) = if p_code == 0 {
            (&primary, &backup)
        } else {
            (&backup, &primary)
        };
        assert!(
            loser.stderr().contains("already won the arbiter"),
            "{report}"
        );
        assert_eq!(
            dir.pairing_winners(&[&primary, &backup]).len(),
            1,
            "{report}"
        );
        let result = if p_code == 0 {
            check_console(&winner.console())
        } else {
            check_failover(&primary, &backup)
        };
        if let Err(e) = result {
            panic!("{e}\n{report}");
        }
    }
}

#[test]
fn a_primary_with_another_guest_image_is_refused() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = PairDir::new("image");
    let other = dir.dir.join("other.elf");
    std::fs::write(&other, ftvmm::testkit::pio_loop(1000, false)).unwrap();
    let _backup = dir.backup(&side());
    let mut primary = dir.primary(&Side::new("").kernel(&other), &dir.listen_addr());
    let code = primary.finish(Duration::from_secs(60));
    assert_ne!(code, 0);
    let err = primary.stderr();
    assert!(err.contains("image"), "{err}");
}

#[test]
fn a_frozen_backup_is_found_dead_by_its_heartbeats() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = PairDir::new("heartbeat");
    let beats = |local: u16, peer: u16| {
        side()
            .peer_timeout_ms(5000)
            .heartbeats(&dir.udp(local), &dir.udp(peer), 300)
    };
    let mut backup = dir.backup(&beats(1, 2));
    let mut primary = dir.primary(&beats(2, 1), &dir.listen_addr());
    std::thread::sleep(Duration::from_millis(400));
    // SIGSTOP: the backup's sockets stay open, it just stops answering.
    backup.signal(libc::SIGSTOP);
    let code = primary.finish(Duration::from_secs(60));
    backup.kill();
    let err = primary.stderr();
    assert_eq!(code, 0, "{}", primary.describe());
    assert!(err.contains("heartbeats stopped"), "{err}");
    assert!(primary.won(), "{err}");
    if let Err(e) = check_console(&primary.console()) {
        panic!("primary: {e}\n{}", primary.describe());
    }
}
