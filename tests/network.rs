//! The networked guest as an FT pair, on a test network built in network
//! namespaces (src/netns.rs): real `redis-cli` round trips, a
//! stream of INCRs on one TCP connection surviving kill -9 of the primary,
//! and the output rule on the wire.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ftvmm::netns::{TestNet, GUEST_IP};

const KEY: &str = "network test key";
const CMDLINE: &str = "net=1 ip=10.99.0.2/24 hz=100 digest_every=0";

struct Pair {
    net: TestNet,
    dir: PathBuf,
    /// Every process started, killed on drop so a failed test leaves none.
    pids: std::cell::RefCell<Vec<u32>>,
}

impl Pair {
    fn new(tag: &str) -> Pair {
        let dir = std::env::temp_dir().join(format!("ftvmm-net-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("arbiter")).unwrap();
        Pair {
            net: TestNet::new(tag).expect("test network"),
            dir,
            pids: Default::default(),
        }
    }

    /// Each side writes its own console file: the primary's is what it
    /// released, the backup's what it produced itself.
    fn console(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{role}.console"))
    }

    /// Start `role` in the host namespace; the primary gives up on a silent
    /// backup after `primary_timeout_ms`.
    fn spawn(&self, role: &str, primary_timeout_ms: u64) -> Child {
        let mut c = self.net.host_command(env!("CARGO_BIN_EXE_ftvmm"));
        c.args(["run", "--no-stdin", "--cmdline", CMDLINE, "--node-id", role])
            .arg("--arbiter")
            .arg(self.dir.join("arbiter"))
            .arg("--console-file")
            .arg(self.console(role))
            .env("FTVMM_KEY", KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("{role}.err"))).unwrap());
        match role {
            "primary" => c.args([
                "--primary",
                "--peer",
                "127.0.0.1:7100",
                "--tap",
                "tap-p",
                "--peer-timeout-ms",
                &primary_timeout_ms.to_string(),
            ]),
            _ => c.args([
                "--backup",
                "--listen",
                "127.0.0.1:7100",
                "--tap",
                "tap-b",
                "--peer-timeout-ms",
                "500",
            ]),
        };
        let child = c.spawn().unwrap();
        self.pids.borrow_mut().push(child.id());
        child
    }

    /// After a failover: what the backup produced extends what the primary
    /// released, without contradiction.
    fn check_consoles(&self) {
        let released = std::fs::read(self.console("primary")).unwrap_or_default();
        let produced = std::fs::read(self.console("backup")).unwrap_or_default();
        if let Err(e) = common::pair::check_extends(&released, &produced) {
            panic!(
                "the backup contradicts the primary's console: {e}\nprimary:\n{}\nbackup:\n{}",
                self.stderr("primary"),
                self.stderr("backup")
            );
        }
    }

    fn stderr(&self, role: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{role}.err"))).unwrap_or_default()
    }

    /// Start the pair and wait until the guest's service is up.
    fn start(&self, primary_timeout_ms: u64) -> (Child, Child) {
        let backup = self.spawn("backup", primary_timeout_ms);
        let primary = self.spawn("primary", primary_timeout_ms);
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(self.console("primary")).unwrap_or_default();
            if text.contains("\nnet mac ") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the guest's network did not come up:\n{text}\nprimary:\n{}\nbackup:\n{}",
                self.stderr("primary"),
                self.stderr("backup")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        (primary, backup)
    }

    fn redis_cli(&self, args: &[&str]) -> String {
        let out = self
            .net
            .client_command("redis-cli")
            .args(["-h", GUEST_IP, "-p", "6379"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli (Debian package redis-tools) must be installed");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for pid in self.pids.borrow().iter() {
            // SAFETY: a signal to a process this test started (already
            // reaped ones fail harmlessly with ESRCH).
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: sending a signal to our own child process by pid.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(r, 0);
}

/// A RESP client on one TCP connection, opened from the client namespace.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect() -> Client {
        let s = TcpStream::connect_timeout(
            &format!("{GUEST_IP}:6379").parse().unwrap(),
            Duration::from_secs(10),
        )
        .expect("connect to the guest");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn send(&mut self, args: &[&str]) {
        let mut m = format!("*{}\r\n", args.len());
        for a in args {
            m.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.w.write_all(m.as_bytes()).unwrap();
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).expect("reply");
        assert!(l.ends_with("\r\n"), "connection closed or bad reply {l:?}");
        l.trim_end().to_string()
    }

    fn incr(&mut self, key: &str) -> i64 {
        self.send(&["INCR", key]);
        let l = self.line();
        l.strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("INCR reply {l:?}"))
    }
}

/// Run `f` on a thread inside the client namespace (a socket belongs to
/// the namespace it was made in, whichever thread uses it later).
fn in_client<T: Send>(net: &TestNet, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            net.enter_client().expect("client namespace");
            f()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn redis_cli_round_trips_through_the_ft_pair_and_the_new_primary() {
    if !common::net_or_skip() {
        return;
    }
    let pair = Pair::new("cli");
    let (mut primary, mut backup) = pair.start(2000);
    assert_eq!(pair.redis_cli(&["PING"]), "PONG");
    assert_eq!(pair.redis_cli(&["SET", "greeting", "hello world"]), "OK");
    assert_eq!(pair.redis_cli(&["GET", "greeting"]), "hello world");
    assert_eq!(pair.redis_cli(&["INCR", "n"]), "1");
    assert_eq!(pair.redis_cli(&["INCR", "n"]), "2");
    assert_eq!(pair.redis_cli(&["GET", "missing"]), "");
    assert_eq!(pair.redis_cli(&["SET", "gone", "x"]), "OK");
    assert_eq!(pair.redis_cli(&["DEL", "gone", "missing"]), "1");
    assert!(pair
        .redis_cli(&["INCR", "greeting"])
        .contains("not an integer"));
    // The backup replayed all of that with every state digest matching
    // (it stops with a divergence report otherwise).
    assert!(
        backup.try_wait().unwrap().is_none(),
        "{}",
        pair.stderr("backup")
    );
    kill(&mut primary);
    // The new primary has the same data and serves the same address.
    assert_eq!(pair.redis_cli(&["GET", "greeting"]), "hello world");
    assert_eq!(pair.redis_cli(&["INCR", "n"]), "3");
    let err = pair.stderr("backup");
    assert!(
        err.contains("going live") && err.contains("network live on tap-b"),
        "{err}"
    );
    pair.check_consoles();
    kill(&mut backup);
}

#[test]
fn an_incr_stream_on_one_connection_survives_primary_kills() {
    if !common::net_or_skip() {
        return;
    }
    for (trial, f) in common::random_fractions(4).into_iter().enumerate() {
        let pair = Pair::new(&format!("incr{trial}"));
        let (primary, mut backup) = pair.start(2000);
        let kill_after = Duration::from_millis(200 + (f * 1500.0) as u64);
        let mut c = in_client(&pair.net, Client::connect);
        // The kill lands while INCRs are in flight on this connection.
        let killer = std::thread::spawn(move || {
            let mut primary = primary;
            std::thread::sleep(kill_after);
            kill(&mut primary);
            Instant::now()
        });
        let mut n = 0i64;
        let mut at_kill = None;
        let mut killed: Option<Instant> = None;
        while killed.is_none_or(|k| k.elapsed() < Duration::from_secs(2)) {
            let got = c.incr("counter");
            assert_eq!(
                got,
                n + 1,
                "trial {trial}: an increment was lost or applied twice"
            );
            n = got;
            if killed.is_none() && killer.is_finished() {
                killed = Some(Instant::now());
                at_kill = Some(n);
            }
        }
        let _ = killer.join();
        let err = pair.stderr("backup");
        assert!(err.contains("going live"), "trial {trial}: {err}");
        assert_eq!(pair.redis_cli(&["GET", "counter"]), n.to_string());
        pair.check_consoles();
        eprintln!(
            "trial {trial}: primary killed after {kill_after:?} (reply {at_kill:?}), same connection reached {n}"
        );
        kill(&mut backup);
    }
}

#[test]
fn replies_the_backup_has_not_acknowledged_never_reach_the_client() {
    if !common::net_or_skip() {
        return;
    }
    let pair = Pair::new("gate");
    // The primary must not give up on the frozen backup during the test.
    let (mut primary, mut backup) = pair.start(60_000);
    let net = &pair.net;
    let mut c = in_client(net, Client::connect);
    assert_eq!(c.incr("k"), 1);
    // Freeze the backup: it stops acknowledging the log.
    signal(&backup, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(200));
    let wire_before = net.host_counter("tap-p", "rx_packets").unwrap();
    c.send(&["INCR", "k"]);
    std::thread::sleep(Duration::from_millis(1500));
    c.w.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let early = c.r.get_mut().read(&mut buf);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a reply arrived before the backup acknowledged its input: {early:?}"
    );
    c.w.set_nonblocking(false).unwrap();
    assert_eq!(
        net.host_counter("tap-p", "rx_packets").unwrap(),
        wire_before,
        "the primary put frames on the wire while the backup acknowledged nothing"
    );
    // The primary dies holding the reply; the backup takes over and the
    // connection still gets exactly one reply to that INCR.
    kill(&mut primary);
    signal(&backup, libc::SIGCONT);
    let got = (c.line(), c.incr("k"));
    assert_eq!(got, (":2".to_string(), 3), "{}", pair.stderr("backup"));
    kill(&mut backup);
}
