//! Primary and backup as two `ftvmm` processes on loopback: kill -9 of the
//! primary at random moments, kill of the backup, and a refused stranger.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CMDLINE: &str = "hz=250 ticks=300 digest_every=25";
const KEY: &str = "failover test key";

struct Pair {
    dir: PathBuf,
    port: u16,
}

impl Pair {
    fn new(tag: &str) -> Pair {
        let dir = std::env::temp_dir().join(format!("ftvmm-failover-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("arbiter")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Pair { dir, port }
    }

    fn console(&self) -> PathBuf {
        self.dir.join("console.txt")
    }

    fn spawn(&self, role: &str, key: &str) -> Child {
        self.spawn_at(role, key, self.port)
    }

    fn spawn_at(&self, role: &str, key: &str, port: u16) -> Child {
        let addr = format!("127.0.0.1:{port}");
        let mut c = Command::new(env!("CARGO_BIN_EXE_ftvmm"));
        c.args(["run", "--no-stdin", "--cmdline", CMDLINE, "--node-id", role])
            .arg("--arbiter")
            .arg(self.dir.join("arbiter"))
            .arg("--console-file")
            .arg(self.console())
            .args(["--peer-timeout-ms", "500"])
            .env("FTVMM_KEY", key)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match role {
            "primary" => c.args(["--primary", "--peer", &addr]),
            _ => c.args(["--backup", "--listen", &addr]),
        };
        c.spawn().unwrap()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Exit code and stderr; a process still running after a minute is killed
/// (and reported as code -1) so a hang fails the test instead of stalling it.
fn stderr_of(mut child: Child) -> (i32, String) {
    let start = Instant::now();
    while child.try_wait().ok().flatten().is_none() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The console stream is whole: no gap (a gap in a file written at offsets
/// reads as NUL bytes) and every line in order.
fn check_console(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    assert!(!bytes.contains(&0), "gap in the console stream");
    let text = String::from_utf8(bytes).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("ftvmm-guest 0.1 booting"));
    assert_eq!(lines.next(), Some(format!("cmdline: {CMDLINE}").as_str()));
    assert!(lines.next().unwrap().starts_with("clock "));
    for k in 1..=12 {
        let l = lines.next().unwrap_or_default();
        assert!(
            l.starts_with(&format!("tick {} digest ", 25 * k)),
            "{l:?} in\n{text}"
        );
    }
    assert!(lines.next().unwrap().starts_with("work steps "));
    assert!(lines.next().unwrap().starts_with("done ticks 300 digest "));
    assert_eq!(lines.next(), None);
}

#[test]
fn killing_the_primary_at_random_moments_loses_no_console_output() {
    if !common::kvm_or_skip() {
        return;
    }
    for (i, f) in common::random_fractions(20).into_iter().enumerate() {
        let pair = Pair::new(&format!("kill{i}"));
        let backup = pair.spawn("backup", KEY);
        let mut primary = pair.spawn("primary", KEY);
        // The guest runs 1.2 s; kill anywhere from boot to its end.
        let at = Duration::from_millis(100 + (f * 1200.0) as u64);
        let start = Instant::now();
        while start.elapsed() < at && primary.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = primary.kill();
        let _ = primary.wait();
        // What the outside world had seen when the primary died.
        let released = std::fs::read(pair.console()).unwrap_or_default();
        let (code, err) = stderr_of(backup);
        assert_eq!(code, 0, "kill {i} after {at:?}: backup failed:\n{err}");
        let full = std::fs::read(pair.console()).unwrap();
        assert!(
            full.starts_with(&released),
            "kill {i}: the new primary contradicted released output"
        );
        check_console(&pair.console());
    }
}

#[test]
fn killing_the_backup_lets_the_primary_win_and_continue() {
    if !common::kvm_or_skip() {
        return;
    }
    let pair = Pair::new("backupdies");
    let mut backup = pair.spawn("backup", KEY);
    let primary = pair.spawn("primary", KEY);
    std::thread::sleep(Duration::from_millis(600));
    let _ = backup.kill();
    let _ = backup.wait();
    let (code, err) = stderr_of(primary);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("primary won the arbiter"), "{err}");
    check_console(&pair.console());
}

#[test]
fn a_primary_with_the_wrong_key_is_refused() {
    if !common::kvm_or_skip() {
        return;
    }
    let pair = Pair::new("badkey");
    let mut backup = pair.spawn("backup", KEY);
    let primary = pair.spawn("primary", "another key");
    let (code, err) = stderr_of(primary);
    let _ = backup.kill();
    let _ = backup.wait();
    assert_ne!(code, 0);
    assert!(err.to_lowercase().contains("key"), "{err}");
}

/// A TCP relay between primary and backup that can stop forwarding in both
/// directions while keeping both connections open: a cut network link.
struct Relay {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn start(to: u16) -> Relay {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = cut.clone();
        std::thread::spawn(move || {
            let Ok((a, _)) = listener.accept() else {
                return;
            };
            // The backup process may still be starting up.
            let mut b = None;
            for _ in 0..200 {
                if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", to)) {
                    b = Some(s);
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let Some(b) = b else { return };
            for (mut from, mut into) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) if !c.load(Ordering::Acquire) => {
                                if into.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {} // cut: swallow
                        }
                    }
                });
            }
        });
        Relay { port, cut }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Release);
    }
}

#[test]
fn a_cut_logging_channel_leaves_exactly_one_side_live() {
    if !common::kvm_or_skip() {
        return;
    }
    for round in 0..3 {
        let pair = Pair::new(&format!("cut{round}"));
        let relay = Relay::start(pair.port);
        let backup = pair.spawn("backup", KEY);
        let primary = pair.spawn_at("primary", KEY, relay.port);
        std::thread::sleep(Duration::from_millis(300 + 200 * round));
        relay.cut();
        let (p_code, p_err) = stderr_of(primary);
        let (b_code, b_err) = stderr_of(backup);
        let live = [p_code, b_code].iter().filter(|c| **c == 0).count();
        assert_eq!(
            live, 1,
            "round {round}: primary {p_code}:\n{p_err}\nbackup {b_code}:\n{b_err}"
        );
        let loser = if p_code == 0 { &b_err } else { &p_err };
        assert!(loser.contains("already won the arbiter"), "{loser}");
        check_console(&pair.console());
    }
}

#[test]
fn a_primary_with_another_guest_image_is_refused() {
    if !common::kvm_or_skip() {
        return;
    }
    let pair = Pair::new("image");
    let other = pair.dir.join("other.elf");
    std::fs::write(&other, ftvmm::testkit::pio_loop(1000, false)).unwrap();
    let mut backup = pair.spawn("backup", KEY);
    let addr = format!("127.0.0.1:{}", pair.port);
    let primary = Command::new(env!("CARGO_BIN_EXE_ftvmm"))
        .args([
            "run",
            "--no-stdin",
            "--node-id",
            "primary",
            "--primary",
            "--peer",
            &addr,
        ])
        .arg("--kernel")
        .arg(&other)
        .arg("--arbiter")
        .arg(pair.dir.join("arbiter"))
        .arg("--console-file")
        .arg(pair.console())
        .env("FTVMM_KEY", KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, err) = stderr_of(primary);
    let _ = backup.kill();
    let _ = backup.wait();
    assert_ne!(code, 0);
    assert!(err.contains("image"), "{err}");
}

#[test]
fn a_frozen_backup_is_found_dead_by_its_heartbeats() {
    if !common::kvm_or_skip() {
        return;
    }
    let pair = Pair::new("heartbeat");
    let udp = |off: u16| format!("127.0.0.1:{}", pair.port.wrapping_add(off));
    let with_heartbeats = |c: &mut Command, local: String, peer: String| {
        c.args(["--heartbeat-local", &local, "--heartbeat-peer", &peer])
            .args(["--heartbeat-timeout-ms", "300", "--peer-timeout-ms", "5000"]);
    };
    let spawn = |role: &str, local: String, peer: String| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ftvmm"));
        let addr = format!("127.0.0.1:{}", pair.port);
        c.args(["run", "--no-stdin", "--cmdline", CMDLINE, "--node-id", role])
            .arg("--arbiter")
            .arg(pair.dir.join("arbiter"))
            .arg("--console-file")
            .arg(pair.console())
            .env("FTVMM_KEY", KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        with_heartbeats(&mut c, local, peer);
        match role {
            "primary" => c.args(["--primary", "--peer", &addr]),
            _ => c.args(["--backup", "--listen", &addr]),
        };
        c.spawn().unwrap()
    };
    let mut backup = spawn("backup", udp(1), udp(2));
    let primary = spawn("primary", udp(2), udp(1));
    std::thread::sleep(Duration::from_millis(400));
    // SIGSTOP: the backup's sockets stay open, it just stops answering.
    let stopped = Command::new("kill")
        .args(["-STOP", &backup.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let (code, err) = stderr_of(primary);
    let _ = backup.kill();
    let _ = backup.wait();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("heartbeats stopped"), "{err}");
    assert!(err.contains("primary won the arbiter"), "{err}");
    check_console(&pair.console());
}
