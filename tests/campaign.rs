//! A randomized failure campaign (issue 9): at least 100 primary/backup
//! pairs of `ftvmm` processes, two at a time, each hit by one fault at a
//! random moment: kill -9 of either side, SIGSTOP/SIGCONT of either side, a
//! cut channel, a frame truncated in the middle (then FIN or RST), acks
//! frozen (both fields, or only `executed`), across the bundled guest and
//! the test guests (docs/guest.md). Every run checks the guarantee:
//!
//! - at most one side live: at most one arbiter decision, a side that went
//!   on alone is the decision's winner, and the primary does not finish
//!   (exit 0) once the backup went live;
//! - what the outside world received (the primary's console file) is one
//!   stream (no gap) that the surviving side's own output extends without
//!   contradiction (a backup writes its console only once live, from
//!   offset 0);
//! - the VM is never lost: one side finishes the guest (only one side is
//!   ever hit, so one is always alive).
//!
//! The counts (runs, faults of each kind, failovers, violations) are
//! printed at the end. `FTVMM_TEST_SEED` reruns a campaign,
//! `FTVMM_CAMPAIGN_RUNS` changes its length (default 105).

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::pair::{check_extends, check_no_gap, PairDir, Proc, Side};
use ftvmm::testkit::relay::{Ending, Fault, Trigger};

/// A guest of the campaign: its command line, about how long it runs, and
/// the line its complete console contains.
struct Guest {
    name: &'static str,
    cmdline: &'static str,
    runs_ms: u64,
    end: &'static str,
}

const GUESTS: [Guest; 5] = [
    Guest {
        name: "bundled",
        cmdline: "hz=250 ticks=150 digest_every=25",
        runs_ms: 600,
        end: "\ndone ticks 150 digest ",
    },
    Guest {
        name: "irqprint",
        cmdline: "mode=irqprint hz=100 ticks=70 work=200",
        runs_ms: 700,
        end: "\ndone ticks 70\n",
    },
    Guest {
        name: "irqclock",
        cmdline: "mode=irqclock hz=200 ticks=140 digest_every=20",
        runs_ms: 700,
        end: "\ndone ticks 140 state ",
    },
    Guest {
        name: "clockloop",
        cmdline: "mode=clockloop loops=150",
        runs_ms: 600,
        end: "\ndone samples 150\n",
    },
    Guest {
        name: "ends",
        cmdline: "mode=ends hz=100 ticks=60 work=200",
        runs_ms: 600,
        end: "\nend ticks 60 ",
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FaultKind {
    KillPrimary,
    KillBackup,
    StopPrimary,
    StopBackup,
    Cut,
    /// Truncated, then a FIN.
    TruncateClose,
    /// Truncated, then a RST.
    TruncateReset,
    FreezeAcks,
    FreezeExecuted,
}

const FAULTS: [FaultKind; 9] = [
    FaultKind::KillPrimary,
    FaultKind::KillBackup,
    FaultKind::StopPrimary,
    FaultKind::StopBackup,
    FaultKind::Cut,
    FaultKind::TruncateClose,
    FaultKind::TruncateReset,
    FaultKind::FreezeAcks,
    FaultKind::FreezeExecuted,
];

/// What became of one run.
#[derive(Debug, Default)]
struct Outcome {
    line: String,
    /// The backup went live.
    failover: bool,
    /// The primary won the arbiter and went on alone.
    primary_alone: bool,
    /// The relay's fault took effect (signals always do).
    applied: bool,
    violations: Vec<String>,
    /// Both sides' stderr and console tails, for a failed run.
    details: String,
}

const PEER_TIMEOUT_MS: u64 = 300;
/// Longest a run may take from its start until both processes exited.
const RUN_LIMIT: Duration = Duration::from_secs(12);

fn one_run(i: usize, guest: &Guest, fault: FaultKind, r: [f64; 3]) -> Outcome {
    let dir = PairDir::new(&format!("campaign{i}"));
    let relay = dir.relay();
    let side = Side::new(guest.cmdline)
        .peer_timeout_ms(PEER_TIMEOUT_MS)
        .args(&["--lag-bound-ms", "300"]);
    let start = Instant::now();
    let (mut backup, mut primary) = dir.start_via(&side, &relay);
    // The fault lands while the guest runs: after its first entries.
    relay.wait_until(Duration::from_secs(10), |c| c.entries_forwarded > 0);
    let at = Duration::from_millis(20 + (r[0] * guest.runs_ms as f64) as u64);
    let mut applied = true;
    let mut what = format!("{fault:?} at {at:?}");
    match fault {
        FaultKind::KillPrimary | FaultKind::KillBackup => {
            std::thread::sleep(at);
            if fault == FaultKind::KillPrimary {
                primary.kill();
            } else {
                backup.kill();
            }
        }
        FaultKind::StopPrimary | FaultKind::StopBackup => {
            let d = Duration::from_millis(50 + (r[1] * 6.0 * PEER_TIMEOUT_MS as f64) as u64);
            what = format!("{fault:?} at {at:?} for {d:?}");
            std::thread::sleep(at);
            let p = if fault == FaultKind::StopPrimary {
                &primary
            } else {
                &backup
            };
            p.signal(libc::SIGSTOP);
            std::thread::sleep(d);
            p.signal(libc::SIGCONT);
        }
        _ => {
            let f = match fault {
                FaultKind::Cut => Fault::Cut,
                FaultKind::TruncateClose => Fault::Truncate {
                    keep: None,
                    then: Ending::Close,
                },
                FaultKind::TruncateReset => Fault::Truncate {
                    keep: None,
                    then: Ending::Reset,
                },
                FaultKind::FreezeAcks => Fault::FreezeAcks,
                _ => Fault::FreezeExecuted,
            };
            what = format!("{f:?} at {at:?}");
            relay.arm(Trigger::After(at), f);
        }
    }
    let left = |s: Instant| RUN_LIMIT.saturating_sub(s.elapsed());
    let p_code = primary.finish(left(start));
    let b_code = backup.finish(left(start));
    let counters = relay.counters();
    let truncates = matches!(fault, FaultKind::TruncateClose | FaultKind::TruncateReset);
    if truncates
        || matches!(
            fault,
            FaultKind::Cut | FaultKind::FreezeAcks | FaultKind::FreezeExecuted
        )
    {
        applied = !counters.faults.is_empty() && (!truncates || counters.truncated.is_some());
    }
    let winners = dir.pairing_winners(&[&primary, &backup]);
    let mut o = Outcome {
        failover: backup.went_live(),
        primary_alone: winners.iter().any(|(_, w)| w == "primary"),
        applied,
        ..Outcome::default()
    };
    check(guest, &primary, p_code, &backup, b_code, &winners, &mut o);
    o.line = format!(
        "run {i:3} {:9} {what}: primary {p_code}, backup {b_code}, {}{}",
        guest.name,
        match (o.failover, o.primary_alone) {
            (true, _) => "backup went live",
            (_, true) => "primary went on alone",
            _ => "no failover",
        },
        if o.violations.is_empty() {
            String::new()
        } else {
            format!(" — VIOLATION: {}", o.violations.join("; "))
        }
    );
    if !o.violations.is_empty() {
        o.details = format!(
            "{}\narbiter: {winners:?}\nrelay: {counters:?}\n{}{}",
            o.line,
            primary.describe(),
            backup.describe()
        );
    }
    o
}

/// The guarantee, for one run.
fn check(
    guest: &Guest,
    primary: &Proc,
    p_code: i32,
    backup: &Proc,
    b_code: i32,
    winners: &[(u64, String)],
    o: &mut Outcome,
) {
    let v = &mut o.violations;
    let won = |node: &str| winners.iter().any(|(_, w)| w == node);
    if winners.len() > 1 {
        v.push(format!(
            "{} arbiter decisions for one pairing",
            winners.len()
        ));
    }
    if o.failover && !won("backup") {
        v.push("the backup went live (or wrote output) without winning the arbiter".into());
    }
    if o.failover && p_code == 0 {
        v.push("two primaries: the primary finished the guest after the backup went live".into());
    }
    if p_code == 0 && !o.primary_alone && winners.iter().any(|(_, w)| w != "primary") {
        v.push("the primary finished although another side won the arbiter".into());
    }
    if p_code == -2 || b_code == -2 {
        v.push(format!(
            "a side hung (still running after {RUN_LIMIT:?}; primary {p_code}, backup {b_code})"
        ));
    }
    let released = primary.console();
    let produced = backup.console();
    if let Err(e) = check_no_gap(&released) {
        v.push(format!("the primary's released stream has a {e}"));
    }
    // A backup writes console output only once live (from offset 0), and
    // going live needs the arbiter (checked above).
    if o.failover {
        if let Err(e) = check_extends(&released, &produced) {
            v.push(format!("the backup contradicts released output: {e}"));
        }
    }
    // The outside world saw the guest's whole run, or the live backup
    // finished it.
    let has_end = |b: &[u8]| String::from_utf8_lossy(b).contains(guest.end);
    let finished = has_end(&released) || (o.failover && b_code == 0 && has_end(&produced));
    if !finished {
        v.push("the VM was lost with a side alive (no side finished the guest)".into());
    }
}

#[test]
fn campaign_of_random_failures_keeps_the_ft_guarantee() {
    if !common::kvm_or_skip() {
        return;
    }
    let runs: usize = std::env::var("FTVMM_CAMPAIGN_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(105);
    let r = common::random_fractions(5 * runs);
    // Every fault kind and every guest about equally often, each pairing of
    // the two and the order random.
    let mut faults: Vec<FaultKind> = (0..runs).map(|i| FAULTS[i % FAULTS.len()]).collect();
    let mut guests: Vec<&Guest> = (0..runs).map(|i| &GUESTS[i % GUESTS.len()]).collect();
    for i in (1..runs).rev() {
        faults.swap(i, (r[5 * i] * (i + 1) as f64) as usize % (i + 1));
        guests.swap(i, (r[5 * i + 1] * (i + 1) as f64) as usize % (i + 1));
    }
    let plan: Vec<(usize, &Guest, FaultKind, [f64; 3])> = (0..runs)
        .map(|i| {
            (
                i,
                guests[i],
                faults[i],
                [r[5 * i + 2], r[5 * i + 3], r[5 * i + 4]],
            )
        })
        .collect();
    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some((i, g, f, r)) = plan.get(k) else {
                    return;
                };
                let o = one_run(*i, g, *f, *r);
                eprintln!("{}", o.line);
                outcomes.lock().unwrap().push((g.name, *f, o));
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap();
    let mut by_fault: BTreeMap<FaultKind, (u64, u64)> = BTreeMap::new();
    let mut by_guest: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut failovers, mut alone, mut violations) = (0, 0, Vec::new());
    for (g, f, o) in &outcomes {
        let e = by_fault.entry(*f).or_default();
        e.0 += 1;
        e.1 += u64::from(o.applied);
        *by_guest.entry(g).or_default() += 1;
        failovers += u64::from(o.failover);
        alone += u64::from(o.primary_alone);
        if !o.violations.is_empty() {
            violations.push(o);
        }
    }
    eprintln!(
        "\n== campaign: {} runs in {:.0?}",
        outcomes.len(),
        start.elapsed()
    );
    for (f, (n, applied)) in &by_fault {
        eprintln!("   {f:?}: {n} runs, {applied} took effect");
    }
    eprintln!("   guests: {by_guest:?}");
    eprintln!(
        "   failovers to the backup: {failovers}, primary alone: {alone}, violations: {} runs",
        violations.len()
    );
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for o in &violations {
        for v in &o.violations {
            let key = v.split(':').next().unwrap_or(v).to_string();
            *kinds.entry(key).or_default() += 1;
        }
    }
    for (k, n) in &kinds {
        eprintln!("   violation {n}× {k}");
    }
    assert!(outcomes.len() >= 100);
    if !violations.is_empty() {
        for o in violations.iter().take(3) {
            eprintln!("\n{}", o.details);
        }
        panic!(
            "{} of {} runs broke the FT guarantee (the first 3 are above):\n{}",
            violations.len(),
            outcomes.len(),
            violations
                .iter()
                .map(|o| o.line.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
