//! The networked guest under `redis-benchmark`, in one run: without FT (a
//! live VM on a TAP) and as an FT pair, then the failover time a client sees
//! (last reply from the old primary to the first from the new one).
//!
//! Pinned to approximate two hosts on this 2-core machine: the plain VM and
//! the primary on cpu0, the backup and the client on cpu1 (`taskset`).
//! Besides requests/s and latency it reports the CPU time each VM process
//! spent per 1000 requests (utime + stime from /proc/PID/stat, over the
//! benchmark of that row).
//!
//! Needs root, KVM, iproute2 and redis-tools. `cargo bench --bench net`.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ftvmm::netns::{TestNet, GUEST_IP};

const CMDLINE: &str = "net=1 ip=10.99.0.2/24 hz=100 digest_every=0";
const KEY: &str = "net bench key";
const REQUESTS: &str = "3000";
/// One client (pure latency), a few, and redis-benchmark's default 50.
const CLIENTS: [&str; 3] = ["1", "4", "50"];

type Row = (String, f64, f64, f64);

/// The rows of one client count, and the CPU ms per 1000 requests of each
/// VM process measured over them.
struct Measured {
    rows: Vec<Row>,
    cpu_per_1000: Vec<f64>,
}

/// The CPU `role` runs on: the plain VM and the primary on cpu0, the
/// backup on cpu1 (with the client).
fn cpu_of(role: Option<&str>) -> &'static str {
    match role {
        Some("backup") => "1",
        _ => "0",
    }
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at state.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn ftvmm(net: &TestNet, dir: &Path, role: Option<&str>) -> Child {
    let mut c = net.host_command("taskset");
    c.args(["-c", cpu_of(role), env!("CARGO_BIN_EXE_ftvmm")])
        .args(["run", "--no-stdin", "--cmdline", CMDLINE])
        .env("FTVMM_KEY", KEY)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout.txt")).unwrap())
        .stderr(Stdio::null());
    let common = |c: &mut std::process::Command, role: &str| {
        c.arg("--arbiter")
            .arg(dir.join("arbiter"))
            .arg("--console-file")
            .arg(dir.join("console.txt"))
            .args(["--node-id", role, "--peer-timeout-ms", "500"]);
    };
    match role {
        None => {
            c.args(["--tap", "tap-p"]);
        }
        Some("primary") => {
            common(&mut c, "primary");
            c.args(["--primary", "--peer", "127.0.0.1:7200", "--tap", "tap-p"]);
        }
        Some(_) => {
            common(&mut c, "backup");
            c.args(["--backup", "--listen", "127.0.0.1:7200", "--tap", "tap-b"]);
        }
    }
    c.spawn().unwrap()
}

fn wait_for(path: &Path, what: &str) {
    let start = Instant::now();
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(what)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no {what:?} in {path:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (test, requests/s, p50 ms, p99 ms) from redis-benchmark's CSV, for each
/// number of clients, with the CPU of the VM processes `pids`.
fn benchmark(net: &TestNet, pids: &[u32]) -> Vec<Measured> {
    CLIENTS
        .iter()
        .map(|c| {
            let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
            let rows = benchmark_with(net, c);
            let requests = rows.len() as f64 * REQUESTS.parse::<f64>().unwrap();
            let cpu_per_1000 = pids
                .iter()
                .zip(before)
                .map(|(p, b)| (cpu_seconds(*p) - b) * 1e3 / (requests / 1000.0))
                .collect();
            Measured { rows, cpu_per_1000 }
        })
        .collect()
}

fn benchmark_with(net: &TestNet, clients: &str) -> Vec<Row> {
    let out = net
        .client_command("taskset")
        .args(["-c", "1", "redis-benchmark"])
        .args(["-h", GUEST_IP, "-t", "ping,set,get,incr", "-n", REQUESTS])
        .args(["-c", clients, "--csv"])
        .stdin(Stdio::null())
        .output()
        .expect("redis-benchmark (redis-tools)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<String> = l
                .split(',')
                .map(|x| x.trim_matches('"').to_string())
                .collect();
            Some((
                f.first()?.clone(),
                f.get(1)?.parse().ok()?,
                f.get(4)?.parse().ok()?,
                f.get(6)?.parse().ok()?,
            ))
        })
        .collect()
}

fn kill(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ftvmm-netbench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("arbiter")).unwrap();
    d
}

fn plain() -> Vec<Measured> {
    let net = TestNet::new("bp").unwrap();
    let dir = tmp("plain");
    let mut vm = ftvmm(&net, &dir, None);
    wait_for(&dir.join("stdout.txt"), "net mac ");
    let r = benchmark(&net, &[vm.id()]);
    kill(&mut vm);
    r
}

fn pair(net: &TestNet, dir: &Path) -> (Child, Child) {
    let b = ftvmm(net, dir, Some("backup"));
    let p = ftvmm(net, dir, Some("primary"));
    wait_for(&dir.join("console.txt"), "net mac ");
    (p, b)
}

fn with_ft() -> Vec<Measured> {
    let net = TestNet::new("bf").unwrap();
    let dir = tmp("ft");
    let (mut p, mut b) = pair(&net, &dir);
    let r = benchmark(&net, &[p.id(), b.id()]);
    kill(&mut p);
    kill(&mut b);
    r
}

/// Client-seen failover: PINGs back to back on one connection; the gap
/// around the kill of the primary.
fn failover() -> Duration {
    let net = TestNet::new("bk").unwrap();
    let dir = tmp("kill");
    let (mut p, mut b) = pair(&net, &dir);
    let s = std::thread::scope(|sc| {
        sc.spawn(|| {
            net.enter_client().unwrap();
            TcpStream::connect(format!("{GUEST_IP}:6379")).unwrap()
        })
        .join()
        .unwrap()
    });
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut ping = || -> Instant {
        w.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert_eq!(l, "+PONG\r\n");
        Instant::now()
    };
    let start = Instant::now();
    let mut before = ping();
    while start.elapsed() < Duration::from_millis(500) {
        before = ping();
    }
    kill(&mut p);
    let gap = ping() - before;
    kill(&mut b);
    gap
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let base = plain();
    let ft = with_ft();
    println!(
        "redis-benchmark -t ping,set,get,incr -n {REQUESTS} -c N, guest `{CMDLINE}`; \
         plain VM and primary on cpu0, backup and client on cpu1\n"
    );
    println!("| clients | test | req/s without FT | req/s with FT | with / without | p50 ms without / with | p99 ms without / with |");
    println!("|---|---|---|---|---|---|---|");
    for ((c, base), ft) in CLIENTS.iter().zip(&base).zip(&ft) {
        for (a, b) in base.rows.iter().zip(&ft.rows) {
            println!(
                "| {c} | {} | {:.0} | {:.0} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} |",
                a.0,
                a.1,
                b.1,
                b.1 / a.1,
                a.2,
                b.2,
                a.3,
                b.3
            );
        }
    }
    println!("\nCPU seconds per 1000 requests of each VM process (all four tests of the row):\n");
    println!(
        "| clients | plain VM | FT primary | FT backup | primary / plain | backup / primary |"
    );
    println!("|---|---|---|---|---|---|");
    for ((c, base), ft) in CLIENTS.iter().zip(&base).zip(&ft) {
        let (plain, primary, backup) =
            (base.cpu_per_1000[0], ft.cpu_per_1000[0], ft.cpu_per_1000[1]);
        println!(
            "| {c} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} |",
            plain / 1e3,
            primary / 1e3,
            backup / 1e3,
            primary / plain,
            backup / primary
        );
    }
    let mut gaps: Vec<Duration> = (0..3).map(|_| failover()).collect();
    gaps.sort();
    println!(
        "\nfailover seen by a client (longest gap between PING replies around kill -9 of the primary): median {:?}, min {:?}, max {:?}",
        gaps[1], gaps[0], gaps[2]
    );
}
