//! Restarting redundancy (docs/failover.md, "Joining a running guest"): a
//! backup joins a primary whose guest already runs, by pre-copy; a join
//! interrupted at a random moment leaves one live side that the next
//! backup joins; a side of an older generation is refused. Each side (and
//! each life of a side) writes its own console file, and every file is
//! checked against the others: where two wrote a byte they agree, and
//! together they are the whole guest console.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::pair::{check_no_gap, check_union, free_port, PairDir, Proc, Side};
use ftvmm::testkit::relay::{Ending, Fault, Relay, Trigger};

/// 10 s of guest: long enough for a join, a fault and a second join, also
/// when the tests share two cores.
const CMDLINE: &str = "hz=250 ticks=2500 digest_every=25";
/// Silence that counts as death: generous, since a join moves 64 MiB while
/// the other tests' VMs compete for the same two cores.
const PEER_TIMEOUT_MS: u64 = 1000;

fn side() -> Side {
    Side::new(CMDLINE).peer_timeout_ms(PEER_TIMEOUT_MS)
}
const LIMIT: Duration = Duration::from_secs(60);

/// A primary that does not wait for a backup at boot, whose new backups
/// are at `peer`.
fn primary(dir: &PairDir, peer: &str) -> Proc {
    dir.primary(&side().args(&["--backup-wait-ms", "0"]), peer)
}

/// A backup on `port` that, once live, lets the next backup join at
/// `rejoin`.
fn backup(dir: &mut PairDir, port: u16, rejoin: Option<&str>) -> Proc {
    dir.port = port;
    let side = match rejoin {
        Some(p) => side().args(&["--peer", p]),
        None => side(),
    };
    dir.backup(&side)
}

/// Whether `ok` came true within `limit`.
fn wait_for(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn describe(procs: &[&Proc]) -> String {
    procs.iter().map(|p| p.describe()).collect()
}

/// The guest's whole console for `CMDLINE`, whoever wrote which part.
fn check_whole(procs: &[&Proc]) -> Result<(), String> {
    let consoles: Vec<(String, Vec<u8>)> = procs
        .iter()
        .map(|p| (p.name.clone(), p.console()))
        .collect();
    let union = check_union(&consoles)?;
    let text = String::from_utf8_lossy(&union);
    for k in 1..=100 {
        if !text.contains(&format!("tick {} digest ", 25 * k)) {
            return Err(format!("tick {} is missing from the console", 25 * k));
        }
    }
    if !text.contains("\ndone ticks 2500 digest ") {
        return Err("the guest's end is missing from the console".into());
    }
    Ok(())
}

#[test]
fn a_primary_started_alone_is_joined_and_a_kill_fails_over_with_nothing_lost() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut dir = PairDir::new("join-alone");
    let port = dir.port;
    let mut p = primary(&dir, &format!("127.0.0.1:{port}"));
    std::thread::sleep(Duration::from_secs(2));
    let mut b = backup(&mut dir, port, None);
    let ok = wait_for(LIMIT, || p.stderr().contains("protected again"));
    assert!(ok, "no join within {LIMIT:?}\n{}", describe(&[&p, &b]));
    assert!(p.stderr().contains("booting alone"), "{}", p.describe());
    // The backup compared the state digest at the join point (a difference
    // stops it with a divergence report).
    std::thread::sleep(Duration::from_millis(400));
    assert!(b.exited().is_none(), "{}", b.describe());
    p.kill();
    let code = b.finish(LIMIT);
    let why = describe(&[&p, &b]);
    assert_eq!(code, 0, "{why}");
    assert!(b.went_live(), "{why}");
    check_no_gap(&p.console()).unwrap();
    if let Err(e) = check_whole(&[&p, &b]) {
        panic!("{e}\n{why}");
    }
    // The backup's own output starts at the join point, not at boot.
    assert_eq!(b.console().first(), Some(&0), "{why}");
}

#[derive(Debug, Clone, Copy)]
enum Interrupt {
    KillBackup,
    KillPrimary,
    Cut,
}

#[test]
fn a_join_interrupted_at_random_moments_leaves_a_live_side_that_the_next_backup_joins() {
    if !common::kvm_or_skip() {
        return;
    }
    let kinds = [
        Interrupt::KillBackup,
        Interrupt::Cut,
        Interrupt::KillPrimary,
        Interrupt::KillBackup,
        Interrupt::Cut,
    ];
    for (trial, (kind, f)) in kinds
        .iter()
        .zip(common::random_fractions(kinds.len()))
        .enumerate()
    {
        let mut dir = PairDir::new(&format!("join-cut{trial}"));
        let (x, y) = (dir.port, free_port());
        let relay = Relay::start(format!("127.0.0.1:{x}").parse().unwrap()).unwrap();
        // The primary's backups come through the relay to port x; the first
        // backup, once live, takes its next backup at port y.
        // The primary boots alone (the relay turns its boot pairing away),
        // then the relay passes connections again.
        relay.arm(Trigger::Now, Fault::End(Ending::Reset));
        let mut p = primary(&dir, &relay.addr());
        let ok = wait_for(LIMIT, || p.stderr().contains("booting alone"));
        assert!(ok, "the primary did not boot alone\n{}", p.describe());
        relay.arm(Trigger::Now, Fault::Heal);
        std::thread::sleep(Duration::from_millis(300));
        // The join (64 MiB, then the pause) takes a few hundred ms here:
        // interrupt anywhere from the pairing to just after the join point.
        let at = Duration::from_millis((f * 500.0) as u64);
        let mut b1 = backup(&mut dir, x, Some(&format!("127.0.0.1:{y}")));
        let what = format!("trial {trial}: {kind:?} {at:?} after the pairing");
        let paired = wait_for(LIMIT, || b1.stderr().contains("paired with the primary"));
        assert!(paired, "{what}: no pairing\n{}", describe(&[&p, &b1]));
        std::thread::sleep(at);
        match kind {
            Interrupt::KillBackup => b1.kill(),
            Interrupt::KillPrimary => p.kill(),
            Interrupt::Cut => relay.arm(Trigger::Now, Fault::Cut),
        }
        // One side goes on: the primary (the join failed, or it won the
        // arbiter) or the first backup (it had the state and won).
        let report = |ps: &[&Proc]| format!("{what}\n{}", describe(ps));
        // The backup decides: it goes live (it had the state and won) or
        // it stops (killed, no state, or it lost the arbiter).
        let ok = wait_for(LIMIT, || b1.exited().is_some() || b1.went_live());
        assert!(
            ok,
            "no settled pair within {LIMIT:?}\n{}",
            report(&[&p, &b1])
        );
        relay.arm(Trigger::Now, Fault::Heal);
        let joined = b1.stderr().contains("joined:");
        let mut b2 = if b1.went_live() {
            assert!(joined, "{}", report(&[&p, &b1]));
            backup(&mut dir, y, None)
        } else if p.exited().is_none() {
            // The first backup never had a state to run, or lost: it stops.
            assert_ne!(b1.finish(LIMIT), 0, "{}", report(&[&p, &b1]));
            backup(&mut dir, x, None)
        } else {
            // The primary died before the join point: the guest was only
            // there, the backup had nothing to go on with.
            assert!(!joined || !b1.went_live(), "{}", report(&[&p, &b1]));
            let code = b1.finish(LIMIT);
            assert_ne!(code, 0, "{}", report(&[&p, &b1]));
            assert!(
                b1.stderr().contains("during the join"),
                "the backup names the cause\n{}",
                report(&[&p, &b1])
            );
            eprintln!("{what}: the primary died before the join point; nothing to join");
            continue;
        };
        let live_is_backup = b1.went_live();
        let live = if live_is_backup { &mut b1 } else { &mut p };
        // The next backup joins the live side, and takes over when it dies.
        let ok = wait_for(LIMIT, || b2.stderr().contains("joined:"));
        assert!(
            ok,
            "no second join within {LIMIT:?}\n{what}\n{}{}",
            live.describe(),
            b2.describe()
        );
        std::thread::sleep(Duration::from_millis(300));
        live.kill();
        let code = b2.finish(LIMIT);
        let why = report(&[&p, &b1, &b2]);
        assert_eq!(code, 0, "{why}");
        assert!(b2.went_live(), "{why}");
        if let Err(e) = check_whole(&[&p, &b1, &b2]) {
            panic!("{e}\n{why}");
        }
        eprintln!(
            "{what}: {} went on, the next backup joined it and took over",
            if live_is_backup {
                "the first backup"
            } else {
                "the primary"
            }
        );
    }
}

#[test]
fn a_join_offering_an_older_generation_is_refused_and_the_primary_runs_on() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = PairDir::new("join-old");
    // The backup's arbiter directory has seen generation 9 decided: a
    // primary offering less belongs to a pairing that is over (or to
    // another directory).
    let backup_arbiter = dir.dir.join("backup-arbiter");
    std::fs::create_dir_all(&backup_arbiter).unwrap();
    let seen = ftvmm::arbiter::Arbiter::new(&backup_arbiter, "elsewhere").unwrap();
    assert_eq!(seen.try_win(9).unwrap(), ftvmm::arbiter::Outcome::Won);
    let port = dir.port;
    let mut p = primary(&dir, &format!("127.0.0.1:{port}"));
    // After the primary booted alone: it offers a join, not a boot pairing
    // (a refused boot pairing is a misconfiguration, and an error).
    std::thread::sleep(Duration::from_secs(1));
    let side = side().args(&["--arbiter", backup_arbiter.to_str().unwrap()]);
    let mut b = dir.backup(&side);
    let ok = wait_for(LIMIT, || p.stderr().contains("refused the join"));
    assert!(ok, "no refusal within {LIMIT:?}\n{}", describe(&[&p, &b]));
    let why = describe(&[&p, &b]);
    assert!(p.stderr().contains("generation"), "{why}");
    assert!(
        b.stderr().contains("generation 2") || b.stderr().contains("generation"),
        "{why}"
    );
    assert!(b.exited().is_none(), "the backup keeps waiting\n{why}");
    assert_eq!(
        p.finish(LIMIT),
        0,
        "the primary runs its guest to the end alone\n{why}"
    );
    assert!(!p.stderr().contains("protected again"), "{why}");
    b.kill();
}
