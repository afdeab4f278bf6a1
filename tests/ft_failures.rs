//! Issue 9, the findings a primary/backup pair of `ftvmm` processes shows:
//! split brain when the guest ends (finding 1), the output rule with a
//! guest printing with interrupts on (2), a truncated last frame (4), a
//! backup that acks receipt but never executes and heartbeats while
//! throttled (6), stray connections (7), generations and node ids (8), the
//! clean close and a stranger's oversized frame (11). Faults come from the
//! relay (src/testkit/relay.rs) and the test guests (docs/guest.md); each
//! side writes its own console file, and the checks compare what the
//! primary released with what the backup produced itself.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::pair::{check_extends, check_no_gap, NodeId, PairDir, Proc, Side};
use ftlog::channel::inspect::{self, MsgKind};
use ftvmm::testkit::relay::{Direction, Ending, Fault, RelayCounters, Trigger};

/// The bundled guest: 1.2 s, a digest line every 100 ms.
const BUNDLED: &str = "hz=250 ticks=300 digest_every=25";

/// Wait until `p`'s stderr contains `text` (true) or `limit` passes.
fn wait_for(p: &mut Proc, text: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if p.stderr().contains(text) {
            return true;
        }
        if p.exited().is_some() {
            return p.stderr().contains(text);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn report(procs: &[&Proc], relay: Option<&RelayCounters>, winners: &[(u64, String)]) -> String {
    let mut s = format!("arbiter: {winners:?}\n");
    if let Some(c) = relay {
        s.push_str(&format!("relay: {c:?}\n"));
    }
    for p in procs {
        s.push_str(&p.describe());
    }
    s
}

/// The bundled guest's whole console ends with its `done` line.
fn finished_bundled(console: &[u8]) -> bool {
    String::from_utf8_lossy(console).contains("\ndone ticks 300 digest ")
}

/// Finding 1: with the channel cut shortly before the guest powers off, the
/// primary must not exit 0 having released output the backup never
/// acknowledged without winning the arbiter (roles.rs ignored the final
/// ack wait and exited 0, while the backup went live and wrote other bytes
/// at the same offsets). A side that goes live has won the arbiter, the
/// backup's own output extends what the primary released, and one side
/// finishes the guest.
#[test]
fn finding_1_a_cut_just_before_the_guest_ends_leaves_one_primary() {
    if !common::kvm_or_skip() {
        return;
    }
    let cmd = "mode=ends hz=100 ticks=60 work=200";
    let dir = PairDir::new("f1");
    let relay = dir.relay();
    relay.arm(Trigger::Tick(50), Fault::Cut);
    let (mut backup, mut primary) = dir.start_via(&Side::new(cmd), &relay);
    let p_code = primary.finish(Duration::from_secs(60));
    let b_code = backup.finish(Duration::from_secs(60));
    let winners = dir.pairing_winners(&[&primary, &backup]);
    let counters = relay.counters();
    let why = report(&[&primary, &backup], Some(&counters), &winners);
    assert!(!counters.faults.is_empty(), "the cut never happened\n{why}");
    let won = |node: &str| winners.iter().any(|(_, w)| w == node);
    assert!(winners.len() <= 1, "two decisions for one pairing\n{why}");
    if p_code == 0 {
        assert!(
            won("primary"),
            "the primary exited 0 after the cut without winning the arbiter\n{why}"
        );
    }
    if backup.went_live() {
        assert!(won("backup"), "the backup went live without winning\n{why}");
        if let Err(e) = check_extends(&primary.console(), &backup.console()) {
            panic!("the backup contradicts what the primary released: {e}\n{why}");
        }
    }
    let finished = |p: &Proc, code: i32| code == 0 && p.console_text().contains("\nend ticks 60 ");
    assert!(
        finished(&primary, p_code) || finished(&backup, b_code),
        "the VM was lost\n{why}"
    );
}

/// Finding 2: a guest printing with interrupts on (`irqprint`: the last
/// digit of the tick count), the primary killed at random moments: every
/// byte the primary released must be what the backup itself produced at that
/// offset. Tagging an output with the entry logged before it let the backup
/// go live at that entry, take its own tick at once, and print `…8889000…`
/// where the primary had released `…8889999…`.
#[test]
fn finding_2_output_released_by_the_primary_is_never_contradicted() {
    if !common::kvm_or_skip() {
        return;
    }
    let cmd = "mode=irqprint hz=100 ticks=150 work=200";
    let mut failures = Vec::new();
    let fractions = common::random_fractions(8);
    for (i, f) in fractions.iter().enumerate() {
        let dir = PairDir::new(&format!("f2-{i}"));
        let (mut backup, mut primary) = dir.start(&Side::new(cmd));
        let at = Duration::from_millis(300 + (f * 1000.0) as u64);
        primary.kill_after(at);
        let b_code = backup.finish(Duration::from_secs(60));
        let released = primary.console();
        let produced = backup.console();
        let why = || report(&[&primary, &backup], None, &dir.winners());
        assert_eq!(
            b_code,
            0,
            "kill {i} after {at:?}: the backup failed\n{}",
            why()
        );
        assert!(
            backup.console_text().contains("\ndone ticks 150\n"),
            "kill {i}: the backup did not finish the guest\n{}",
            why()
        );
        if let Err(e) = check_no_gap(&released).and_then(|_| check_extends(&released, &produced)) {
            failures.push(format!(
                "kill {i} after {at:?} ({} bytes released): {e}",
                released.len()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} kills contradicted released output:\n{}",
        failures.len(),
        fractions.len(),
        failures.join("\n")
    );
}

/// Finding 4: a primary killed in the middle of writing a frame leaves a
/// partial last frame, then the end of the stream (a FIN). That is the end
/// of the log, not a damaged stream: the backup must go on to the arbiter
/// (and go live if it wins), not exit 1 with `Log(Truncated)`.
#[test]
fn finding_4_a_truncated_last_frame_is_the_end_of_the_log() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = PairDir::new("f4");
    let relay = dir.relay();
    relay.arm(
        Trigger::Entry(200),
        Fault::Truncate {
            keep: None,
            then: Ending::Close,
        },
    );
    let (mut backup, mut primary) = dir.start_via(&Side::new(BUNDLED), &relay);
    // The primary dies with its frame half written.
    relay.wait_until(Duration::from_secs(30), |c| c.truncated.is_some());
    primary.kill();
    let b_code = backup.finish(Duration::from_secs(60));
    let winners = dir.pairing_winners(&[&primary, &backup]);
    let counters = relay.counters();
    let why = report(&[&primary, &backup], Some(&counters), &winners);
    assert!(
        counters.truncated.is_some(),
        "no frame was truncated\n{why}"
    );
    let err = backup.stderr();
    assert!(
        !err.to_lowercase().contains("truncated"),
        "the backup took the partial frame for a damaged log\n{why}"
    );
    if winners.iter().any(|(_, w)| w == "primary") {
        // The primary noticed first and won before it was killed: the
        // backup must have lost the arbiter, not died of the frame.
        assert!(err.contains("already won the arbiter"), "{why}");
    } else {
        assert_eq!(b_code, 0, "the backup did not go on alone\n{why}");
        assert!(backup.went_live(), "{why}");
        if let Err(e) = check_extends(&primary.console(), &backup.console()) {
            panic!("{e}\n{why}");
        }
        assert!(finished_bundled(&backup.console()), "{why}");
    }
}

/// Finding 6: a backup whose `received` acks advance but whose `executed`
/// never does (the relay freezes it) froze the primary forever in the lag
/// throttle. The lag bound must end, in bounded time, in declaring the
/// backup dead: the primary wins the arbiter and finishes the guest alone.
#[test]
fn finding_6_a_backup_that_never_executes_is_declared_dead() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = PairDir::new("f6");
    let relay = dir.relay();
    relay.arm(Trigger::Entry(100), Fault::FreezeExecuted);
    let side = Side::new(BUNDLED).args(&["--lag-bound-ms", "300"]);
    let (mut backup, mut primary) = dir.start_via(&side, &relay);
    // 1.2 s of guest, a lag bound of 300 ms and a peer timeout of 500 ms:
    // 30 s is far more than any bounded detection needs.
    let p_code = primary.finish(Duration::from_secs(30));
    let b_code = backup.finish(Duration::from_secs(30));
    let winners = dir.pairing_winners(&[&primary, &backup]);
    let counters = relay.counters();
    let why = report(&[&primary, &backup], Some(&counters), &winners);
    assert!(
        counters.acks_rewritten > 0,
        "the relay froze nothing\n{why}"
    );
    assert_eq!(
        p_code, 0,
        "the primary did not go on alone within 30 s (-2: still running)\n{why}"
    );
    assert!(primary.won(), "{why}");
    assert!(finished_bundled(&primary.console()), "{why}");
    assert_eq!(winners.len(), 1, "{why}");
    assert!(
        !(b_code == 0 && backup.went_live()),
        "both sides went on\n{why}"
    );
}

/// Finding 6, heartbeats: once the primary is throttled by the lag bound,
/// it must still notice the backup's heartbeats stopping (the throttle loop
/// never looked at them; only the channel's 60 s timeout would have ended
/// it).
#[test]
fn finding_6_heartbeat_death_is_noticed_while_throttled() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = PairDir::new("f6hb");
    let side = |local: u16, peer: u16| {
        Side::new(BUNDLED)
            .peer_timeout_ms(60_000)
            .heartbeats(&dir.udp(local), &dir.udp(peer), 300)
            .args(&["--lag-bound-ms", "100"])
    };
    let mut backup = dir.backup(&side(1, 2));
    let mut primary = dir.primary(&side(2, 1), &dir.listen_addr());
    std::thread::sleep(Duration::from_millis(400));
    // Frozen: no acks (the primary throttles after 100 ms), no heartbeats
    // (dead after 300 ms), the TCP connection still open.
    backup.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let noticed = wait_for(&mut primary, "won the arbiter", Duration::from_secs(10));
    let after = stopped.elapsed();
    let p_code = primary.finish(Duration::from_secs(30));
    backup.kill();
    let why = report(&[&primary, &backup], None, &dir.winners());
    assert!(
        noticed,
        "the throttled primary did not notice the dead backup within 10 s\n{why}"
    );
    eprintln!("noticed {after:?} after SIGSTOP");
    assert_eq!(p_code, 0, "{why}");
    assert!(finished_bundled(&primary.console()), "{why}");
}

/// A waiting backup, its real primary started after `stray`, and the
/// checks that the backup survived the stray and then replayed the whole
/// guest with a clean end.
fn survives(tag: &str, stray: impl FnOnce(&PairDir)) {
    let dir = PairDir::new(tag);
    let mut backup = dir.backup(&Side::new(BUNDLED));
    assert!(
        wait_for(
            &mut backup,
            "waiting for the primary",
            Duration::from_secs(30)
        ),
        "{}",
        backup.describe()
    );
    stray(&dir);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        backup.exited(),
        None,
        "a stranger made the waiting backup exit\n{}",
        backup.describe()
    );
    let mut primary = dir.primary(&Side::new(BUNDLED), &dir.listen_addr());
    let p_code = primary.finish(Duration::from_secs(60));
    let b_code = backup.finish(Duration::from_secs(60));
    let why = report(&[&primary, &backup], None, &dir.winners());
    assert_eq!((p_code, b_code), (0, 0), "{why}");
    assert!(finished_bundled(&primary.console()), "{why}");
    assert!(!primary.won() && !backup.went_live(), "{why}");
}

/// Finding 7: an HTTP request on a waiting backup's port made it exit 1
/// (docs/channel.md: a refused connection does not consume the listener).
#[test]
fn finding_7_an_http_request_does_not_kill_a_waiting_backup() {
    if !common::kvm_or_skip() {
        return;
    }
    survives("f7http", |dir| {
        let mut s = TcpStream::connect(dir.listen_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: backup\r\n\r\n")
            .unwrap();
        // Whatever it answers, it closes.
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
}

/// Finding 7: a primary with the wrong key is refused, and the backup goes
/// on waiting for the real one.
#[test]
fn finding_7_a_refused_primary_does_not_kill_a_waiting_backup() {
    if !common::kvm_or_skip() {
        return;
    }
    survives("f7key", |dir| {
        let mut wrong = dir.primary(&Side::new(BUNDLED).key("not the key"), &dir.listen_addr());
        let code = wrong.finish(Duration::from_secs(30));
        assert_ne!(code, 0, "{}", wrong.describe());
        assert!(wrong.stderr().contains("key"), "{}", wrong.describe());
    });
}

/// Kill `who` after `after`; then the other side must finish the guest,
/// alone. Returns (primary, backup).
fn pairing(
    dir: &PairDir,
    primary_id: &str,
    backup_id: &str,
    kill_primary: bool,
) -> (Proc, Proc, i32) {
    let id = |s: &str| NodeId::Named(s.to_string());
    let mut backup = dir.backup(&Side::new(BUNDLED).node_id(id(backup_id)));
    let mut primary = dir.primary(
        &Side::new(BUNDLED).node_id(id(primary_id)),
        &dir.listen_addr(),
    );
    std::thread::sleep(Duration::from_millis(600));
    let survivor = if kill_primary {
        primary.kill();
        &mut backup
    } else {
        backup.kill();
        &mut primary
    };
    let code = survivor.finish(Duration::from_secs(60));
    (primary, backup, code)
}

/// Finding 8: every pairing starts a new generation. Node a is primary and
/// node b backup; a dies and b wins. Then b is primary and a (restarted)
/// its backup, in the same arbiter directory; b dies: a must win this
/// pairing's generation and go live. With the generation always 1, the
/// first pairing's lock (won by b) decided the second failover too, and
/// the VM was lost.
#[test]
fn finding_8_a_lock_from_an_earlier_pairing_does_not_decide_a_later_one() {
    if !common::kvm_or_skip() {
        return;
    }
    let mut dir = PairDir::new("f8gen");
    let (p1, b1, code) = pairing(&dir, "node-a", "node-b", true);
    let why = report(&[&p1, &b1], None, &dir.winners());
    assert_eq!(code, 0, "first pairing: node-b did not take over\n{why}");
    assert!(b1.won(), "{why}");
    dir.new_port();
    let (p2, b2, code) = pairing(&dir, "node-b", "node-a", true);
    let winners = dir.pairing_winners(&[&p1, &b1, &p2, &b2]);
    let why = report(&[&p1, &b1, &p2, &b2], None, &winners);
    assert_eq!(
        code, 0,
        "second pairing: node-a did not take over from node-b\n{why}"
    );
    assert!(b2.went_live(), "{why}");
    if let Err(e) = check_extends(&p2.console(), &b2.console()) {
        panic!("{e}\n{why}");
    }
    assert!(finished_bundled(&b2.console()), "{why}");
    assert_eq!(winners.len(), 2, "one decision per pairing\n{why}");
    let g: Vec<&String> = winners.iter().map(|(_, w)| w).collect();
    assert_eq!(g, ["node-b", "node-a"], "{why}");
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into our buffer.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(r, 0);
    let n = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Finding 8: without `--node-id` a side is `role@hostname-pid`, as
/// `--help` says (it was `role-pid`).
#[test]
fn finding_8_the_default_node_id_is_role_at_hostname_pid() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = PairDir::new("f8id");
    let side = Side::new(BUNDLED).node_id(NodeId::Default);
    let (mut backup, mut primary) = dir.start(&side);
    std::thread::sleep(Duration::from_millis(600));
    backup.kill();
    let code = primary.finish(Duration::from_secs(60));
    let winners = dir.pairing_winners(&[&primary, &backup]);
    let why = report(&[&primary, &backup], None, &winners);
    assert_eq!(code, 0, "{why}");
    let want = format!("primary@{}-{}", hostname(), primary.pid);
    assert_eq!(
        winners.iter().map(|(_, w)| w.clone()).collect::<Vec<_>>(),
        vec![want],
        "{why}"
    );
}

/// Finding 11: a guest that powers off ends the channel cleanly: the
/// primary sends `Close` and the backup answers with its own (the relay
/// sees both), and neither side reports the channel failing or the peer
/// gone. `Arc::try_unwrap(tx)` in roles.rs always failed, so the primary
/// never closed, and the backup just dropped its end.
#[test]
fn finding_11_a_guest_that_powers_off_closes_the_channel_cleanly() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = PairDir::new("f11close");
    let relay = dir.relay();
    let (mut backup, mut primary) = dir.start_via(&Side::new(BUNDLED), &relay);
    let p_code = primary.finish(Duration::from_secs(60));
    let b_code = backup.finish(Duration::from_secs(60));
    let counters = relay.counters();
    let why = report(&[&primary, &backup], Some(&counters), &dir.winners());
    assert_eq!((p_code, b_code), (0, 0), "{why}");
    assert!(finished_bundled(&primary.console()), "{why}");
    assert_eq!(
        (
            counters.frames_of(Direction::ToBackup, MsgKind::Close),
            counters.frames_of(Direction::ToPrimary, MsgKind::Close)
        ),
        (1, 1),
        "Close frames (primary → backup, backup → primary)\n{why}"
    );
    for p in [&primary, &backup] {
        let err = p.stderr();
        for bad in [
            "without closing it properly",
            "the primary is gone",
            "going live",
            "won the arbiter",
        ] {
            assert!(
                !err.contains(bad),
                "{}: {bad:?} at a clean end\n{why}",
                p.name
            );
        }
    }
}

/// Finding 11: a stranger that sends the preamble and a frame head
/// announcing 16 MiB must be dropped at once, before authentication,
/// without the backup waiting for (and buffering) the payload; and the
/// backup goes on waiting for its primary.
#[test]
fn finding_11_a_strangers_huge_frame_is_dropped_at_once() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = PairDir::new("f11huge");
    let mut backup = dir.backup(&Side::new(BUNDLED));
    assert!(
        wait_for(
            &mut backup,
            "waiting for the primary",
            Duration::from_secs(30)
        ),
        "{}",
        backup.describe()
    );
    let mut s = TcpStream::connect(dir.listen_addr()).unwrap();
    let mut hello = ftlog::channel::CHANNEL_MAGIC.to_vec();
    hello.extend_from_slice(&ftlog::channel::PROTOCOL_VERSION.to_le_bytes());
    hello.extend_from_slice(&inspect::frame_head(16 << 20));
    s.write_all(&hello).unwrap();
    let sent = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The backup's preamble may come back; then the connection must end.
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e.kind() != std::io::ErrorKind::WouldBlock,
        }
    };
    let waited = sent.elapsed();
    let why = backup.describe();
    assert!(closed, "the backup held the connection for 10 s\n{why}");
    assert!(
        waited < Duration::from_secs(2),
        "the backup waited {waited:?} for the 16 MiB payload of an unauthenticated \
         stranger ({} bytes sent) before dropping it\n{why}",
        hello.len()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        backup.exited(),
        None,
        "the stranger made the backup exit\n{why}"
    );
}
