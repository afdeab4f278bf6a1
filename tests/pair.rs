//! Two `ftvmm run --pair` nodes with the same command line, restarted by a
//! supervisor whenever they exit (as systemd would), serve the networked
//! guest to a client streaming INCRs on one TCP connection. Ten times: wait
//! until the pair is in sync, kill -9 the current primary. The connection
//! survives all ten, every reply is the previous plus one, every
//! re-protection completes, and the consoles of all the nodes' lives
//! together are one stream without a gap or a contradiction.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pair::{check_union, free_port, winners};
use ftvmm::netns::{TestNet, GUEST_IP};

const KEY: &str = "pair test key";
const CMDLINE: &str = "net=1 ip=10.99.0.2/24 hz=100 digest_every=0";
const FAILOVERS: usize = 10;
const STEP_LIMIT: Duration = Duration::from_secs(60);

/// One life of a node.
struct Life {
    name: String,
    child: Child,
    console: PathBuf,
    stderr: PathBuf,
}

impl Life {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

/// A node: its port, TAP, and every life it had.
struct Node {
    tag: &'static str,
    port: u16,
    peer: u16,
    tap: &'static str,
    lives: Vec<Life>,
}

struct Pair {
    net: TestNet,
    dir: PathBuf,
    nodes: Mutex<[Node; 2]>,
}

impl Pair {
    fn start_life(&self, node: &mut Node) {
        let name = format!("{}-{}", node.tag, node.lives.len());
        let console = self.dir.join(format!("{name}.console"));
        let stderr = self.dir.join(format!("{name}.err"));
        let mut c = self.net.host_command(env!("CARGO_BIN_EXE_ftvmm"));
        c.args(["run", "--pair", "--no-stdin", "--cmdline", CMDLINE])
            .args(["--listen", &format!("127.0.0.1:{}", node.port)])
            .args(["--peer", &format!("127.0.0.1:{}", node.peer)])
            .args(["--tap", node.tap, "--peer-timeout-ms", "500"])
            .arg("--arbiter")
            .arg(self.dir.join("arbiter"))
            .arg("--console-file")
            .arg(&console)
            .env("FTVMM_KEY", KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let child = c.spawn().unwrap();
        node.lives.push(Life {
            name,
            child,
            console,
            stderr,
        });
    }

    /// The supervisor: a node whose process exited is started again.
    fn supervise(&self) {
        let mut nodes = self.nodes.lock().unwrap();
        for i in 0..2 {
            let exited = nodes[i]
                .lives
                .last_mut()
                .is_none_or(|l| l.child.try_wait().unwrap().is_some());
            if exited {
                let mut node = std::mem::replace(
                    &mut nodes[i],
                    Node {
                        tag: "",
                        port: 0,
                        peer: 0,
                        tap: "",
                        lives: Vec::new(),
                    },
                );
                self.start_life(&mut node);
                nodes[i] = node;
            }
        }
    }

    /// The node that won the latest arbiter decision (the live primary).
    fn primary(&self) -> Option<usize> {
        let w = winners(&self.dir.join("arbiter"));
        let (_, node) = w.iter().max_by_key(|(g, _)| *g)?;
        let nodes = self.nodes.lock().unwrap();
        (0..2).find(|&i| node.ends_with(&format!("-{}", nodes[i].port)))
    }

    fn report(&self) -> String {
        let nodes = self.nodes.lock().unwrap();
        let mut s = format!("arbiter: {:?}\n", winners(&self.dir.join("arbiter")));
        for n in nodes.iter() {
            for l in &n.lives {
                s.push_str(&format!("--- {}:\n{}", l.name, l.stderr()));
            }
        }
        s
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        for n in nodes.iter_mut() {
            for l in &mut n.lives {
                let _ = l.child.kill();
                let _ = l.child.wait();
            }
        }
        if std::env::var_os("FTVMM_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One RESP connection from the client namespace sending INCRs until told
/// to stop; every reply must be the previous plus one.
fn incr_stream(net: &TestNet, stop: &AtomicBool, last: &AtomicI64) -> Result<i64, String> {
    net.enter_client().map_err(|e| e.to_string())?;
    let s = TcpStream::connect_timeout(
        &format!("{GUEST_IP}:6379").parse().unwrap(),
        Duration::from_secs(20),
    )
    .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_nodelay(true).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut n = 0i64;
    while !stop.load(Ordering::Acquire) {
        w.write_all(b"*2\r\n$4\r\nINCR\r\n$7\r\ncounter\r\n")
            .map_err(|e| format!("the connection broke after reply {n}: {e}"))?;
        let mut l = String::new();
        r.read_line(&mut l)
            .map_err(|e| format!("no reply after {n}: {e}"))?;
        let got: i64 = l
            .trim_end()
            .strip_prefix(':')
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("bad reply {l:?} after {n}"))?;
        if got != n + 1 {
            return Err(format!(
                "reply {got} after {n}: an increment was lost or repeated"
            ));
        }
        n = got;
        last.store(n, Ordering::Release);
    }
    Ok(n)
}

#[test]
fn ten_alternating_failovers_keep_one_tcp_connection_and_heal_each_time() {
    if !common::net_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ftvmm-pair-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("arbiter")).unwrap();
    let (pa, pb) = (free_port(), free_port());
    let pair = Arc::new(Pair {
        net: TestNet::new("pair").expect("test network"),
        dir,
        nodes: Mutex::new([
            Node {
                tag: "a",
                port: pa,
                peer: pb,
                tap: "tap-p",
                lives: Vec::new(),
            },
            Node {
                tag: "b",
                port: pb,
                peer: pa,
                tap: "tap-b",
                lives: Vec::new(),
            },
        ]),
    });
    let done = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let (p, d) = (pair.clone(), done.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::Acquire) {
                p.supervise();
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Both nodes started together: one boots the guest, the other joins.
    // In sync: the other node's current life is running, has joined the
    // primary and replays (it has not gone live itself).
    let in_sync = |pair: &Pair| -> Option<usize> {
        let p = pair.primary()?;
        let mut nodes = pair.nodes.lock().unwrap();
        let other = nodes[1 - p].lives.last_mut()?;
        let running = other.child.try_wait().ok()?.is_none();
        let err = other.stderr();
        (running && err.contains("joined:") && !err.contains("going live")).then_some(p)
    };
    let wait_sync = |what: &str| -> usize {
        let start = Instant::now();
        loop {
            if let Some(p) = in_sync(&pair) {
                return p;
            }
            assert!(
                start.elapsed() < STEP_LIMIT,
                "{what}: the pair did not get in sync\n{}",
                pair.report()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_sync("start");
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicI64::new(0));
    let client = {
        let (p, s, l) = (pair.clone(), stop.clone(), last.clone());
        std::thread::spawn(move || incr_stream(&p.net, &s, &l))
    };
    let mut heal_times = Vec::new();
    for k in 0..FAILOVERS {
        let p = wait_sync(&format!("before failover {k}"));
        // Let the stream run protected for a moment.
        std::thread::sleep(Duration::from_millis(500));
        let before = last.load(Ordering::Acquire);
        {
            let mut nodes = pair.nodes.lock().unwrap();
            let life = nodes[p].lives.last_mut().unwrap();
            life.child.kill().unwrap();
            life.child.wait().unwrap();
        }
        let killed = Instant::now();
        // The other node goes live; the supervisor restarts the killed one,
        // which joins it.
        let start = Instant::now();
        while pair.primary() == Some(p) || in_sync(&pair).is_none() {
            assert!(
                start.elapsed() < STEP_LIMIT,
                "failover {k}: no re-protection\n{}",
                pair.report()
            );
            assert!(
                !client.is_finished(),
                "failover {k}: the client stopped\n{}",
                pair.report()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        heal_times.push(killed.elapsed());
        let after = last.load(Ordering::Acquire);
        eprintln!(
            "failover {k}: killed node {} at reply {before}, in sync again after {:?} (reply {after})",
            ["a", "b"][p],
            killed.elapsed()
        );
    }
    // The stream goes on after the last failover.
    let at_end = last.load(Ordering::Acquire);
    let start = Instant::now();
    while last.load(Ordering::Acquire) < at_end + 50 {
        assert!(
            start.elapsed() < STEP_LIMIT,
            "the stream stopped\n{}",
            pair.report()
        );
        assert!(
            !client.is_finished(),
            "the client stopped\n{}",
            pair.report()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Release);
    let replies = match client.join().unwrap() {
        Ok(n) => n,
        Err(e) => panic!("{e}\n{}", pair.report()),
    };
    done.store(true, Ordering::Release);
    supervisor.join().unwrap();
    // Every life's console: one stream, no gap, no contradiction.
    let consoles: Vec<(String, Vec<u8>)> = {
        let nodes = pair.nodes.lock().unwrap();
        nodes
            .iter()
            .flat_map(|n| n.lives.iter())
            .map(|l| {
                (
                    l.name.clone(),
                    std::fs::read(&l.console).unwrap_or_default(),
                )
            })
            .collect()
    };
    if let Err(e) = check_union(&consoles) {
        panic!("{e}\n{}", pair.report());
    }
    heal_times.sort();
    eprintln!(
        "{FAILOVERS} failovers on one connection, {replies} replies in order; \
         kill to in sync again: median {:?}, max {:?}",
        heal_times[heal_times.len() / 2],
        heal_times[heal_times.len() - 1]
    );
}
