//! The FT control plane under failure, as `ftvmm` processes on loopback
//! (issue 9, findings 1, 4, 6, 7, 8, 11): every test keeps a console file
//! per side and compares what each side itself put out.

// Test code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;
mod ctl;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ctl::{assert_extends, assert_whole_console, contains, finish, wait_until, Pair, Relay, KEY};

const LIMIT: Duration = Duration::from_secs(30);

/// Block until the backup listens on its port.
fn wait_listening(port: u16) {
    assert!(
        wait_until(Duration::from_secs(10), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "the backup never listened"
    );
}

/// Block until the primary has released `line` (a prefix of a console
/// line).
fn released(pair: &Pair, line: &str) {
    assert!(
        wait_until(LIMIT, || contains(&pair.console("primary"), line)),
        "the primary never released {line:?}"
    );
}

/// Which side won the arbiter, from their stderr.
fn winner<'a>(p_err: &'a str, b_err: &'a str) -> Option<&'static str> {
    match (
        p_err.contains("primary won the arbiter"),
        b_err.contains("backup won the arbiter"),
    ) {
        (true, false) => Some("primary"),
        (false, true) => Some("backup"),
        (false, false) => None,
        (true, true) => panic!("both sides say they won the arbiter:\n{p_err}\n{b_err}"),
    }
}

#[test]
fn finding_1_a_guest_ending_with_the_channel_cut_leaves_one_stream() {
    if !common::kvm_or_skip() {
        return;
    }
    // Cut the channel near the guest's end: the last ticks and the final
    // lines are produced after the cut, so their entries (and the end of
    // the log) are never acknowledged.
    for (round, at) in ["tick 250 ", "tick 275 ", "tick 300 "].iter().enumerate() {
        let pair = Pair::new(&format!("end{round}"));
        let relay = Relay::start(pair.port);
        let backup = pair.backup();
        let primary = pair.primary_via(relay.port);
        let released = pair.console("primary");
        assert!(
            wait_until(LIMIT, || contains(&released, at)),
            "round {round}: the primary never released {at:?}"
        );
        relay.ctl.cut.store(true, Ordering::SeqCst);
        let (p_code, p_err) = finish(primary, LIMIT);
        let (b_code, b_err) = finish(backup, LIMIT);
        let (p_out, b_out) = (pair.output("primary"), pair.output("backup"));
        let ctx = format!("round {round}: primary {p_code}:\n{p_err}\nbackup {b_code}:\n{b_err}");
        eprintln!("cut after {at:?}: {:?} won", winner(&p_err, &b_err));
        match winner(&p_err, &b_err) {
            Some("primary") => {
                assert_eq!(p_code, 0, "{ctx}");
                assert_ne!(b_code, 0, "{ctx}");
                assert!(b_err.contains("already won the arbiter"), "{ctx}");
                assert_whole_console(&p_out, "primary");
                assert!(b_out.is_empty(), "the backup never went live: {ctx}");
            }
            Some(_) => {
                assert_eq!(b_code, 0, "{ctx}");
                assert!(
                    p_err.contains("already won the arbiter"),
                    "the primary asked the arbiter before releasing: {ctx}"
                );
                assert_ne!(p_code, 0, "{ctx}");
                assert_extends(&p_out, &b_out, &ctx);
                assert_whole_console(&b_out, "backup");
            }
            // The cut came after the end of the log was acknowledged: the
            // guest is over on both sides and nobody needs the arbiter.
            None => {
                assert_eq!((p_code, b_code), (0, 0), "{ctx}");
                assert!(!b_err.contains("going live"), "{ctx}");
                assert_whole_console(&p_out, "primary");
                assert!(b_out.is_empty(), "the backup never went live: {ctx}");
            }
        }
    }
}

#[test]
fn finding_4_a_partial_last_frame_ends_in_go_live() {
    if !common::kvm_or_skip() {
        return;
    }
    let pair = Pair::new("partial");
    let relay = Relay::start(pair.port);
    let backup = pair.backup();
    let mut primary = pair.primary_via(relay.port);
    released(&pair, "tick 100 ");
    // The primary dies in the middle of writing a frame: the backup gets
    // half of it, then the end of the stream.
    relay.ctl.truncate.store(true, Ordering::SeqCst);
    assert!(wait_until(LIMIT, || relay
        .ctl
        .truncated
        .load(Ordering::SeqCst)));
    primary.kill().unwrap();
    primary.wait().unwrap();
    let released = pair.output("primary");
    let (b_code, b_err) = finish(backup, LIMIT);
    assert_eq!(b_code, 0, "the backup goes live:\n{b_err}");
    assert!(b_err.contains("inside frame"), "{b_err}");
    assert!(b_err.contains("going live at"), "{b_err}");
    let live = pair.output("backup");
    assert_extends(&released, &live, "partial frame");
    assert_whole_console(&live, "backup");
}

#[test]
fn finding_6_a_backup_whose_replay_stalls_is_declared_dead_within_the_bound() {
    if !common::kvm_or_skip() {
        return;
    }
    let pair = Pair::new("stall");
    let relay = Relay::start(pair.port);
    let backup = pair.backup();
    // Lag bound 300 ms, peer timeout 500 ms: declared dead after 800 ms
    // stalled.
    let primary = pair
        .command("primary", relay.port)
        .args(["--lag-bound-ms", "300"])
        .spawn()
        .unwrap();
    released(&pair, "tick 50 ");
    // The backup keeps acknowledging receipt; its executed reports freeze.
    relay.ctl.stall_executed.store(true, Ordering::SeqCst);
    let stalled = unix_ms();
    let (p_code, p_err) = finish(primary, Duration::from_secs(20));
    if let Some(won) = claim_time(&pair) {
        eprintln!(
            "the primary won the arbiter {} ms after the executed acks froze \
             (lag bound 300 ms, then 300 + 500 ms stalled)",
            won.saturating_sub(stalled)
        );
    }
    let (b_code, b_err) = finish(backup, LIMIT);
    let ctx = format!("primary {p_code}:\n{p_err}\nbackup {b_code}:\n{b_err}");
    assert_eq!(p_code, 0, "the primary goes on alone: {ctx}");
    assert!(p_err.contains("declaring the backup dead"), "{ctx}");
    assert!(p_err.contains("primary won the arbiter"), "{ctx}");
    assert_ne!(b_code, 0, "{ctx}");
    assert!(b_err.contains("already won the arbiter"), "{ctx}");
    assert_whole_console(&pair.output("primary"), "primary");
    assert!(pair.output("backup").is_empty(), "{ctx}");
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// When the latest arbiter decision was made (its claim's `unix-ms`).
fn claim_time(pair: &Pair) -> Option<u64> {
    let arb = ftvmm::arbiter::Arbiter::new(&pair.arbiter(), "reader").ok()?;
    let (g, _) = arb.latest_decided().ok()??;
    let claim = std::fs::read_to_string(arb.lock_path(g)).ok()?;
    claim
        .lines()
        .find_map(|l| l.strip_prefix("unix-ms: "))
        .and_then(|v| v.parse().ok())
}

/// An HTTP request to `port`; the connection is closed without an answer.
fn http_stranger(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: backup\r\n\r\n")
        .unwrap();
    s
}

#[test]
fn finding_7_strangers_neither_stop_a_waiting_backup_nor_disturb_its_replay() {
    if !common::kvm_or_skip() {
        return;
    }
    let pair = Pair::new("strangers");
    let mut backup = pair.backup();
    wait_listening(pair.port);
    let mut http = http_stranger(pair.port);
    let mut answer = Vec::new();
    let _ = http.read_to_end(&mut answer); // closed by the backup
    let wrong_key = pair
        .command("primary", pair.port)
        .env("FTVMM_KEY", "not the key")
        .spawn()
        .unwrap();
    let (code, err) = finish(wrong_key, LIMIT);
    assert_ne!(code, 0);
    assert!(err.contains("wrong shared key"), "{err}");
    assert!(
        backup.try_wait().unwrap().is_none(),
        "the backup keeps waiting"
    );
    // The real primary is served; strangers during the replay are refused
    // without disturbing it.
    let primary = pair.primary_via(pair.port);
    released(&pair, "tick 100 ");
    let _late = http_stranger(pair.port);
    let mut intruder = pair.command("primary", pair.port);
    intruder
        .args(["--node-id", "intruder", "--console-file"])
        .arg(pair.dir.join("console-intruder.txt"));
    let (i_code, i_err) = finish(intruder.spawn().unwrap(), LIMIT);
    assert_ne!(i_code, 0);
    assert!(i_err.contains("busy"), "{i_err}");
    let (p_code, p_err) = finish(primary, LIMIT);
    let (b_code, b_err) = finish(backup, LIMIT);
    let ctx = format!("primary {p_code}:\n{p_err}\nbackup {b_code}:\n{b_err}");
    assert_eq!((p_code, b_code), (0, 0), "{ctx}");
    assert!(
        b_err.contains("refused a connection from 127.0.0.1:"),
        "{ctx}"
    );
    assert!(b_err.contains("not an ftvmm logging channel"), "{ctx}");
    assert!(b_err.contains("wrong shared key"), "{ctx}");
    assert!(b_err.contains("replay complete"), "{ctx}");
    assert!(!b_err.contains("going live"), "{ctx}");
    assert_whole_console(&pair.output("primary"), "primary");
}

#[test]
fn finding_8_a_second_pairing_in_the_same_arbiter_directory_fails_over() {
    if !common::kvm_or_skip() {
        return;
    }
    let pair = Pair::new("second");
    // First pairing: the primary dies, the backup takes over.
    let backup = pair.backup();
    let mut primary = pair.primary_via(pair.port);
    released(&pair, "tick 50 ");
    primary.kill().unwrap();
    primary.wait().unwrap();
    let (code, err) = finish(backup, LIMIT);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("backup won the arbiter"), "{err}");
    for role in ["primary", "backup"] {
        std::fs::remove_file(pair.console(role)).unwrap();
    }
    // Second pairing, same directory and node ids: the backup dies, and
    // the old lock does not decide the new failover.
    let mut backup = pair.backup();
    let primary = pair.primary_via(pair.port);
    released(&pair, "tick 50 ");
    backup.kill().unwrap();
    backup.wait().unwrap();
    let (code, err) = finish(primary, LIMIT);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("primary won the arbiter"), "{err}");
    assert_whole_console(&pair.output("primary"), "primary");
}

#[test]
fn finding_8_a_primary_of_an_older_generation_is_refused_and_the_backup_waits_on() {
    if !common::kvm_or_skip() {
        return;
    }
    let pair = Pair::new("oldgen");
    // The backup's arbiter directory has seen five decided generations.
    let old = ftvmm::arbiter::Arbiter::new(&pair.arbiter(), "old-pairing").unwrap();
    for g in 1..=5 {
        old.try_win(g).unwrap();
    }
    let mut backup = pair.backup();
    wait_listening(pair.port);
    // A primary whose arbiter directory is another (empty) one offers
    // generation 2.
    let elsewhere = pair.dir.join("other-arbiter");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let mut stale = pair.command("primary", pair.port);
    stale.arg("--arbiter").arg(&elsewhere);
    let (code, err) = finish(stale.spawn().unwrap(), LIMIT);
    assert_ne!(code, 0);
    assert!(
        err.contains("offers generation 2") && err.contains("generation 5 is already decided"),
        "{err}"
    );
    assert!(
        backup.try_wait().unwrap().is_none(),
        "the backup keeps waiting"
    );
    let primary = pair.primary_via(pair.port);
    let (p_code, p_err) = finish(primary, LIMIT);
    let (b_code, b_err) = finish(backup, LIMIT);
    assert_eq!((p_code, b_code), (0, 0), "{p_err}\n{b_err}");
    assert!(p_err.contains("as generation 7"), "{p_err}");
    assert!(b_err.contains("generation mismatch"), "{b_err}");
}

#[test]
fn finding_11_a_guest_end_closes_the_channel_cleanly() {
    if !common::kvm_or_skip() {
        return;
    }
    let pair = Pair::new("clean");
    let backup = pair.backup();
    let primary = pair.primary_via(pair.port);
    let (p_code, p_err) = finish(primary, LIMIT);
    let (b_code, b_err) = finish(backup, LIMIT);
    let ctx = format!("primary {p_code}:\n{p_err}\nbackup {b_code}:\n{b_err}");
    assert_eq!((p_code, b_code), (0, 0), "{ctx}");
    assert!(p_err.contains("logging channel closed"), "{ctx}");
    assert!(
        b_err.contains("closed the logging channel cleanly; replay complete"),
        "{ctx}"
    );
    assert!(
        !b_err.contains("going live") && !p_err.contains("arbiter"),
        "{ctx}"
    );
    assert_whole_console(&pair.output("primary"), "primary");
    assert!(
        pair.output("backup").is_empty(),
        "the backup never went live"
    );
}

#[test]
fn finding_8_default_node_ids_are_role_at_host_pid() {
    if !common::kvm_or_skip() {
        return;
    }
    let help = Command::new(env!("CARGO_BIN_EXE_ftvmm"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("role@hostname-pid"));
    let pair = Pair::new("nodeid");
    let strip = |c: Command| {
        // The pair's commands name the nodes; these use the defaults.
        let args: Vec<_> = c.get_args().map(|a| a.to_owned()).collect();
        let mut d = Command::new(c.get_program());
        let mut skip = false;
        for a in args {
            if skip {
                skip = false;
                continue;
            }
            if a == "--node-id" {
                skip = true;
                continue;
            }
            d.arg(a);
        }
        c.get_envs().for_each(|(k, v)| {
            if let Some(v) = v {
                d.env(k, v);
            }
        });
        d.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        d
    };
    let mut backup = strip(pair.command("backup", pair.port)).spawn().unwrap();
    let primary = strip(pair.command("primary", pair.port)).spawn().unwrap();
    let pid = primary.id();
    released(&pair, "tick 50 ");
    backup.kill().unwrap();
    backup.wait().unwrap();
    let (code, err) = finish(primary, LIMIT);
    assert_eq!(code, 0, "{err}");
    let arb = ftvmm::arbiter::Arbiter::new(&pair.arbiter(), "reader").unwrap();
    let (_, node) = arb.latest_decided().unwrap().unwrap();
    assert!(
        node.starts_with("primary@") && node.ends_with(&format!("-{pid}")),
        "{node}"
    );
}

#[test]
fn a_stopped_primary_finds_the_backup_live_and_stops() {
    if !common::kvm_or_skip() {
        return;
    }
    let pair = Pair::new("sigstop");
    let backup = pair.backup();
    let primary = pair.primary_via(pair.port);
    released(&pair, "tick 100 ");
    let pid = primary.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    // The backup goes live after the peer timeout and writes its console.
    assert!(wait_until(LIMIT, || contains(
        &pair.console("backup"),
        "tick "
    )));
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let (p_code, p_err) = finish(primary, LIMIT);
    let (b_code, b_err) = finish(backup, LIMIT);
    let ctx = format!("primary {p_code}:\n{p_err}\nbackup {b_code}:\n{b_err}");
    assert_eq!(b_code, 0, "{ctx}");
    assert_ne!(p_code, 0, "{ctx}");
    assert!(p_err.contains("already won the arbiter"), "{ctx}");
    // Resumed, the primary may still put out what the backup acknowledged
    // before it went live (those acks were in flight), nothing else.
    assert_extends(&pair.output("primary"), &pair.output("backup"), &ctx);
    assert_whole_console(&pair.output("backup"), "backup");
}

#[test]
fn ctl_relay_passes_a_pair_through_unharmed() {
    if !common::kvm_or_skip() {
        return;
    }
    // The relay itself (frame parsing, ack rewriting off) must not disturb
    // a pair: the fault tests above depend on it.
    let pair = Pair::new("relay");
    let relay = Relay::start(pair.port);
    let backup = pair.backup();
    let primary = pair.primary_via(relay.port);
    let (p_code, p_err) = finish(primary, LIMIT);
    let (b_code, b_err) = finish(backup, LIMIT);
    assert_eq!((p_code, b_code), (0, 0), "{p_err}\n{b_err}");
    assert_whole_console(&pair.output("primary"), "primary");
    let _ = KEY;
}
