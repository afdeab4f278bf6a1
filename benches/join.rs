//! Restarting redundancy, measured with `ftvmm` processes on loopback, the
//! primary pinned to cpu0 and the backup to cpu1 (`taskset`), 64 MiB
//! guests:
//!
//! 1. a backup joining a primary that runs alone: the guest's pause at the
//!    join point, the whole join (backup start to the join point) and the
//!    pre-copy rounds, for an idle guest and a memory-writing one (every
//!    page of 59 MiB written over and over at CPL3);
//! 2. re-protection after a failure: two `--pair` nodes, a supervisor that
//!    restarts the killed one; time from kill -9 of the primary until the
//!    restarted node has joined the new primary.
//!
//! Run: `cargo bench --bench join` (prints markdown for docs/benchmarks.md).

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "join bench key";
const RUNS: usize = 5;
const IDLE: &str = "hz=100 ticks=100000 work=1000 digest_every=0";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Run {
    dir: PathBuf,
}

impl Run {
    fn new(tag: &str) -> Run {
        let dir =
            std::env::temp_dir().join(format!("ftvmm-bench-join-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("arbiter")).unwrap();
        Run { dir }
    }

    /// `ftvmm run` pinned to `cpu`, stderr into `name.err`.
    fn spawn(
        &self,
        cpu: u32,
        name: &str,
        kernel: Option<&Path>,
        cmdline: &str,
        args: &[&str],
    ) -> Child {
        let mut c = Command::new("taskset");
        c.args([
            "-c",
            &cpu.to_string(),
            env!("CARGO_BIN_EXE_ftvmm"),
            "run",
            "--no-stdin",
        ])
        .args(["--cmdline", cmdline, "--peer-timeout-ms", "500"])
        .arg("--arbiter")
        .arg(self.dir.join("arbiter"))
        .arg("--console-file")
        .arg(self.dir.join(format!("{name}.console")))
        .args(args)
        .env("FTVMM_KEY", KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(self.dir.join(format!("{name}.err"))).unwrap());
        if let Some(k) = kernel {
            c.arg("--kernel").arg(k);
        }
        c.spawn().unwrap()
    }

    fn stderr(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.err"))).unwrap_or_default()
    }

    fn wait_for(&self, name: &str, what: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        while !self.stderr(name).contains(what) {
            assert!(
                start.elapsed() < limit,
                "{name}: no {what:?}\n{}",
                self.stderr(name)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        start.elapsed()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn kill(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// The number after `key` in `text`'s last line containing it.
fn number_after(text: &str, key: &str) -> f64 {
    let line = text.lines().rev().find(|l| l.contains(key)).unwrap();
    let at = line.find(key).unwrap() + key.len();
    line[at..]
        .trim_start()
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

struct Join {
    pause_ms: f64,
    total: Duration,
    rounds: Vec<u64>,
}

fn one_join(tag: &str, kernel: Option<&Path>, cmdline: &str) -> Join {
    let run = Run::new(tag);
    let port = free_port();
    let peer = format!("127.0.0.1:{port}");
    let mut p = run.spawn(
        0,
        "primary",
        kernel,
        cmdline,
        &["--primary", "--peer", &peer, "--backup-wait-ms", "0"],
    );
    run.wait_for("primary", "booting alone", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1000));
    let mut b = run.spawn(
        1,
        "backup",
        kernel,
        cmdline,
        &["--backup", "--listen", &peer],
    );
    let total = run.wait_for("primary", "protected again", Duration::from_secs(60));
    let err = run.stderr("primary");
    let pause_ms = number_after(&err, "guest paused");
    let rounds = err
        .lines()
        .filter(|l| l.contains("pre-copy round"))
        .filter_map(|l| {
            let after = l.split("pre-copy round ").nth(1)?;
            after.split(": ").nth(1)?.split(' ').next()?.parse().ok()
        })
        .collect();
    kill(&mut b);
    kill(&mut p);
    Join {
        pause_ms,
        total,
        rounds,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn joins(label: &str, kernel: Option<&Path>, cmdline: &str) {
    let runs: Vec<Join> = (0..RUNS)
        .map(|i| one_join(&format!("{label}{i}"), kernel, cmdline))
        .collect();
    let pauses: Vec<f64> = runs.iter().map(|r| r.pause_ms).collect();
    let totals: Vec<f64> = runs.iter().map(|r| r.total.as_secs_f64() * 1e3).collect();
    let max_pause = pauses.iter().copied().fold(0.0, f64::max);
    println!(
        "| {label} | {:.1} ms | {max_pause:.1} ms | {:.0} ms | {} |",
        median(pauses),
        median(totals),
        runs.iter()
            .map(|r| format!("{:?}", r.rounds))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// Kill the primary of a `--pair` pair `RUNS` times; time until the
/// restarted node has joined the survivor.
fn reprotection() {
    let run = Run::new("pair");
    let ports = [free_port(), free_port()];
    let mut lives = [0usize; 2];
    let start_node = |i: usize, life: usize| -> Child {
        let name = format!("n{i}-{life}");
        run.spawn(
            i as u32,
            &name,
            None,
            IDLE,
            &[
                "--pair",
                "--listen",
                &format!("127.0.0.1:{}", ports[i]),
                "--peer",
                &format!("127.0.0.1:{}", ports[1 - i]),
            ],
        )
    };
    let mut nodes = [start_node(0, 0), start_node(1, 0)];
    // Whoever did not boot joins.
    let limit = Duration::from_secs(60);
    let t = Instant::now();
    let primary = loop {
        if run.stderr("n0-0").contains("joined:") {
            break 1;
        }
        if run.stderr("n1-0").contains("joined:") {
            break 0;
        }
        assert!(t.elapsed() < limit, "the pair never got in sync");
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut primary = primary;
    let mut times = Vec::new();
    for _ in 0..RUNS {
        std::thread::sleep(Duration::from_millis(500));
        kill(&mut nodes[primary]);
        let killed = Instant::now();
        lives[primary] += 1;
        nodes[primary] = start_node(primary, lives[primary]);
        let name = format!("n{primary}-{}", lives[primary]);
        run.wait_for(&name, "joined:", limit);
        times.push(killed.elapsed().as_secs_f64() * 1e3);
        primary = 1 - primary;
    }
    for n in &mut nodes {
        kill(n);
    }
    let max = times.iter().copied().fold(0.0, f64::max);
    println!(
        "| re-protection after kill -9 of the primary (`--pair`, restart at once) | {:.0} ms | {max:.0} ms |",
        median(times)
    );
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("no /dev/kvm: nothing to measure");
        return;
    }
    let sweeper = std::env::temp_dir().join(format!("ftvmm-bench-sweeper-{}", std::process::id()));
    std::fs::write(&sweeper, ftvmm::testkit::page_sweeper(64, 1_000_000)).unwrap();
    println!(
        "Join of a running 64 MiB guest ({RUNS} runs each; primary on cpu0, backup on cpu1):\n"
    );
    println!("| guest | pause (median) | pause (max) | whole join (median) | pages per pre-copy round, each run |");
    println!("|---|---|---|---|---|");
    joins("idle (bundled guest, 100 Hz)", None, IDLE);
    joins(
        "memory-writing (page sweeper, every page at CPL3)",
        Some(&sweeper),
        "",
    );
    println!("\n| | median | max |\n|---|---|---|");
    reprotection();
    let _ = std::fs::remove_file(&sweeper);
}
