//! Part three of `ftvmm demo`: the networked guest behind an FT pair, with
//! a client streaming INCRs on one TCP connection while the primary is
//! killed. It builds a test network in namespaces, so it needs root and
//! iproute2; without them it says so and is skipped.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::{TestNet, GUEST_IP};

const CMDLINE: &str = "net=1 ip=10.99.0.2/24 hz=100 digest_every=0";

fn spawn(net: &TestNet, exe: &Path, dir: &Path, role: &str) -> Result<Child> {
    let (flags, tap): ([&str; 3], &str) = match role {
        "primary" => (["--primary", "--peer", "127.0.0.1:7300"], "tap-p"),
        _ => (["--backup", "--listen", "127.0.0.1:7300"], "tap-b"),
    };
    net.host_command(&exe.to_string_lossy())
        .args(["run", "--no-stdin", "--cmdline", CMDLINE, "--node-id", role])
        .arg("--arbiter")
        .arg(dir.join("net-arbiter"))
        .arg("--console-file")
        .arg(dir.join("net-console.txt"))
        .args(["--peer-timeout-ms", "500", "--tap", tap])
        .args(flags)
        .env("FTVMM_KEY", "demo key")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start the {role}"))
}

fn incr(w: &mut TcpStream, r: &mut BufReader<TcpStream>) -> Result<i64> {
    w.write_all(b"*2\r\n$4\r\nINCR\r\n$4\r\ndemo\r\n")?;
    let mut l = String::new();
    r.read_line(&mut l)?;
    l.trim_end()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected reply {l:?}"))
}

/// Run part three in `dir`, starting `exe` for both roles.
pub fn run(dir: &Path, exe: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("\n== network part skipped: it builds network namespaces, which needs root");
        return Ok(());
    }
    let net = match TestNet::new("demo") {
        Ok(n) => n,
        Err(e) => {
            println!("\n== network part skipped: cannot build the test network ({e:#})");
            return Ok(());
        }
    };
    std::fs::create_dir_all(dir.join("net-arbiter"))?;
    println!(
        "\n== network: the guest serves the Redis protocol on {GUEST_IP}:6379, behind a primary (tap-p) and a backup (tap-b) on one bridge"
    );
    let mut backup = spawn(&net, exe, dir, "backup")?;
    let mut primary = spawn(&net, exe, dir, "primary")?;
    let result = stream(&net, dir, &mut primary);
    for c in [&mut primary, &mut backup] {
        let _ = c.kill();
        let _ = c.wait();
    }
    result
}

fn stream(net: &TestNet, dir: &Path, primary: &mut Child) -> Result<()> {
    let console = dir.join("net-console.txt");
    let start = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("\nnet mac ")
    {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the guest's network did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = std::thread::scope(|sc| {
        sc.spawn(|| -> Result<TcpStream> {
            net.enter_client()?;
            Ok(TcpStream::connect((GUEST_IP, 6379))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
    })
    .context("cannot connect to the guest")?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    println!("== a client sends INCR demo back to back on one TCP connection; the primary is killed after 1 s");
    let (mut n, mut last, mut gap) = (0i64, Instant::now(), Duration::ZERO);
    let t = Instant::now();
    let mut killed_at = None;
    while killed_at.is_none_or(|k: i64| n < k + 2000) && t.elapsed() < Duration::from_secs(20) {
        let got = incr(&mut w, &mut r)?;
        if got != n + 1 {
            bail!("INCR returned {got} after {n}: an increment was lost or applied twice");
        }
        n = got;
        gap = gap.max(last.elapsed());
        last = Instant::now();
        if killed_at.is_none() && t.elapsed() >= Duration::from_secs(1) {
            let _ = primary.kill();
            let _ = primary.wait();
            println!("== primary killed (kill -9) after reply {n}");
            killed_at = Some(n);
        }
    }
    println!(
        "== the same connection went on to reply {n} from the new primary: every reply was the previous plus one (longest wait {:.0} ms, the client's TCP retransmission)",
        gap.as_secs_f64() * 1000.0
    );
    Ok(())
}
