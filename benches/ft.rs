//! Fault tolerance costs, side by side in one run: guest throughput with FT
//! (primary + backup on loopback) and without, the output delay the output
//! rule adds against the logging channel's round trip, log bandwidth, and
//! failover time (primary killed to first output of the new primary).
//!
//! Run: `cargo bench --bench ft` (prints markdown for docs/benchmarks.md).

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftlog::{BackupExpect, BackupListener, ChannelConfig, ExecBackend};
use ftvmm::console::Capture;
use ftvmm::ft_options::FtOptions;
use ftvmm::guest::GUEST_ELF;
use ftvmm::primary::run_primary;
use vmm::link::ChannelSource;
use vmm::points::PointMode;
use vmm::replay::Replayer;
use vmm::{Live, Machine, MachineConfig, RunEnd};

const CMDLINE: &str = "hz=1000 ticks=3000 work=500000 digest_every=20";
const KEY: &str = "bench key";

fn steps(text: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix("work steps "))
        .and_then(|n| n.parse().ok())
        .expect("work steps line")
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

fn without_ft() -> f64 {
    let out = Capture::new();
    let mut c = MachineConfig::new(32, CMDLINE, Box::new(out.clone()));
    c.points = PointMode::Exits;
    let mut m = Machine::new(c, GUEST_ELF).unwrap();
    let t = Instant::now();
    assert_eq!(m.run(&mut Live).unwrap(), RunEnd::PowerOff(0));
    steps(&out.text()) / t.elapsed().as_secs_f64()
}

fn ft_options(dir: &Path) -> FtOptions {
    FtOptions {
        key: KEY.as_bytes().to_vec(),
        arbiter: dir.join("arbiter"),
        node_id: "primary".into(),
        console: dir.join("console.txt"),
        peer_timeout: Duration::from_secs(2),
        digest_every: Duration::from_millis(200),
        lag_bound: None,
        heartbeat: None,
        heartbeat_timeout: Duration::from_secs(2),
        lag_time_bound: Duration::from_secs(1),
        net: None,
        backup_wait: Duration::from_secs(30),
        rejoin: None,
    }
}

struct FtRun {
    rate: f64,
    report: ftvmm::primary::PrimaryReport,
    secs: f64,
}

fn with_ft(dir: &Path) -> FtRun {
    let listener = BackupListener::bind(
        "127.0.0.1:0",
        &ChannelConfig::new(KEY.as_bytes().to_vec()),
        BackupExpect {
            backend: ExecBackend::Exits,
            image_digest: vmm::digest::image_digest(GUEST_ELF),
        },
    )
    .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let backup = std::thread::spawn(move || {
        let rx = Arc::new(listener.accept().unwrap());
        let mut c = MachineConfig::new(32, CMDLINE, Box::new(std::io::sink()));
        c.points = PointMode::Exits;
        c.live_timers = false;
        let mut m = Machine::new(c, GUEST_ELF).unwrap();
        let mut rep = Replayer::new(ChannelSource::new(rx));
        let end = m.run(&mut rep).unwrap();
        rep.finish(&mut m, end).unwrap();
    });
    let cfg = MachineConfig::new(32, CMDLINE, Box::new(std::io::sink()));
    let t = Instant::now();
    let report = run_primary(GUEST_ELF, cfg, &addr, &ft_options(dir)).unwrap();
    let secs = t.elapsed().as_secs_f64();
    backup.join().unwrap();
    let text = std::fs::read_to_string(dir.join("console.txt")).unwrap();
    FtRun {
        rate: steps(&text) / secs,
        report,
        secs,
    }
}

fn spawn(dir: &Path, role: &str, port: u16) -> Child {
    let addr = format!("127.0.0.1:{port}");
    let mut c = Command::new(env!("CARGO_BIN_EXE_ftvmm"));
    c.args([
        "run",
        "--no-stdin",
        "--cmdline",
        "hz=100 ticks=1000 digest_every=5",
    ])
    .args(["--node-id", role, "--peer-timeout-ms", "500"])
    .arg("--arbiter")
    .arg(dir.join("arbiter"))
    .arg("--console-file")
    .arg(dir.join("console.txt"))
    .env("FTVMM_KEY", KEY)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    match role {
        "primary" => c.args(["--primary", "--peer", &addr]),
        _ => c.args(["--backup", "--listen", &addr]),
    };
    c.spawn().unwrap()
}

/// Kill the primary mid-run; time until the console grows again.
fn failover_time(dir: &Path) -> Duration {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut backup = spawn(dir, "backup", port);
    let mut primary = spawn(dir, "primary", port);
    std::thread::sleep(Duration::from_millis(1500));
    let _ = primary.kill();
    let killed = Instant::now();
    let _ = primary.wait();
    let len = std::fs::metadata(dir.join("console.txt"))
        .map(|m| m.len())
        .unwrap_or(0);
    let mut t = Duration::ZERO;
    while killed.elapsed() < Duration::from_secs(10) {
        if std::fs::metadata(dir.join("console.txt"))
            .map(|m| m.len())
            .unwrap_or(0)
            > len
        {
            t = killed.elapsed();
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = backup.kill();
    let _ = backup.wait();
    t
}

fn main() {
    let base = std::env::temp_dir().join(format!("ftvmm-bench-ft-{}", std::process::id()));
    let fresh = |name: &str| {
        let d = base.join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("arbiter")).unwrap();
        d
    };
    let plain = without_ft();
    let mut ft = with_ft(&fresh("ft"));
    let mut failovers: Vec<Duration> = (0..5)
        .map(|i| failover_time(&fresh(&format!("fo{i}"))))
        .collect();
    let _ = std::fs::remove_dir_all(&base);

    let r = &mut ft.report;
    println!("| measure | value |");
    println!("|---|---|");
    println!("| guest command line | `{CMDLINE}` |");
    println!("| guest work/s without FT (exits backend, no log) | {plain:.3e} |");
    println!(
        "| guest work/s with FT (primary + backup on loopback) | {:.3e} |",
        ft.rate
    );
    println!("| with FT / without | {:.3} |", ft.rate / plain);
    println!(
        "| output delay by the output rule, p50 / p99 ({} writes) | {:?} / {:?} |",
        r.output_delays.len(),
        pct(&mut r.output_delays, 0.5),
        pct(&mut r.output_delays, 0.99)
    );
    println!(
        "| logging-channel round trip (write to ack), p50 / p99 ({} samples) | {:?} / {:?} |",
        r.ack_latencies.len(),
        pct(&mut r.ack_latencies, 0.5),
        pct(&mut r.ack_latencies, 0.99)
    );
    println!(
        "| log bandwidth | {:.0} bytes/s, {:.0} entries/s |",
        r.log_bytes as f64 / ft.secs,
        r.log_entries as f64 / ft.secs
    );
    println!("| failover: primary killed to first new console output, median of 5 (peer timeout 500 ms) | {:?} |",
        pct(&mut failovers, 0.5));
    println!(
        "| failover, min / max | {:?} / {:?} |",
        failovers[0],
        failovers[failovers.len() - 1]
    );
}
