//! `ftvmm demo`: record the bundled guest and replay it to the same state,
//! then fail over a primary/backup pair, then (as root) a networked pair
//! under a TCP client (`demo_net`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use ftlog::ExecBackend;
use vmm::points::PointMode;
use vmm::{MachineConfig, RunEnd};

use crate::console;
use crate::guest::GUEST_ELF;
use crate::rr::{self, RecordOptions};

/// Run the demo, starting `exe` for the FT parts. Returns whether the
/// replay matched the recording (the later parts run only then).
pub fn run(exe: &Path, backend: Option<ExecBackend>, seconds: u32) -> Result<bool> {
    let dir = std::env::temp_dir().join(format!("ftvmm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log = dir.join("demo.ftlog");
    let hz = 100;
    let cmdline = format!("hz={hz} ticks={} digest_every={hz}", seconds * hz);
    println!("== ftvmm demo: recording the bundled guest ({cmdline})");
    let opts = RecordOptions {
        backend: backend.unwrap_or_else(PointMode::best_available),
        digest_every: Some(Duration::from_millis(200)),
        net_mac: None,
    };
    let cfg = MachineConfig::new(32, &cmdline, Box::new(console::Stdout));
    rr::record_file(GUEST_ELF, cfg, &log, opts, false)?;
    println!(
        "\n== replaying {} on a fresh VM (its own timers and clock silent)",
        log.display()
    );
    let replayed = rr::replay_file(GUEST_ELF, None, &log, Box::new(console::Stdout))?;
    println!("\n== the replayed guest printed the same digests: it reached the same state");
    let matched = replayed.end == RunEnd::PowerOff(0);
    if matched {
        failover(&dir, exe, seconds)?;
        crate::demo_net::run(&dir, exe)?;
    }
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::debug!("cannot remove {}: {e}", dir.display());
    }
    Ok(matched)
}

/// Part two of the demo: a primary and a backup as two processes on
/// loopback; the primary is killed half way and the backup takes over.
fn failover(dir: &Path, exe: &Path, seconds: u32) -> Result<()> {
    use std::process::{Command, Stdio};
    let arbiter = dir.join("arbiter");
    std::fs::create_dir_all(&arbiter)
        .with_context(|| format!("cannot create {}", arbiter.display()))?;
    let console = dir.join("console.txt");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let cmdline = format!("hz=100 ticks={} digest_every=25", seconds * 100);
    println!("\n== fault tolerance: a backup and a primary on {addr}; the primary is killed after {:.1} s", seconds as f64 / 2.0);
    let spawn = |role: &str, flags: [&str; 3]| {
        Command::new(exe)
            .args([
                "run",
                "--no-stdin",
                "--cmdline",
                &cmdline,
                "--node-id",
                role,
            ])
            .arg("--arbiter")
            .arg(&arbiter)
            .arg("--console-file")
            .arg(&console)
            .args(["--peer-timeout-ms", "500"])
            .args(flags)
            .env("FTVMM_KEY", "demo key")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start the {role}"))
    };
    let mut backup = spawn("backup", ["--backup", "--listen", &addr])?;
    let mut primary = spawn("primary", ["--primary", "--peer", &addr])?;
    std::thread::sleep(Duration::from_millis(u64::from(seconds) * 500));
    let _ = primary.kill();
    let _ = primary.wait();
    let seen = std::fs::read(&console).unwrap_or_default().len();
    println!("== primary killed (kill -9); {seen} console bytes had been released");
    let status = backup.wait().context("the backup did not finish")?;
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    println!("== the console as an outside reader sees it:\n{text}");
    println!(
        "== backup {}: the stream goes on past the failover with no gap",
        if status.success() {
            "finished the guest"
        } else {
            "failed"
        }
    );
    Ok(())
}
