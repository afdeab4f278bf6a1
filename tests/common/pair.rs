//! `ftvmm run --primary` / `--backup` as child processes on loopback, each
//! with its own console file and stderr file, killed when dropped; and the
//! checks the fault-tolerance tests make on what each side itself wrote.
#![allow(dead_code)]

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ftvmm::testkit::relay::Relay;

/// The shared key the tests use.
pub const KEY: &str = "failover test key";

/// A directory for one pairing: the arbiter directory, console and stderr
/// files, and the backup's port.
pub struct PairDir {
    pub dir: PathBuf,
    pub arbiter: PathBuf,
    pub port: u16,
    /// Files are named `<role>-<n>.*`, n counting processes started.
    started: Cell<u32>,
    keep: bool,
}

/// A free TCP port on 127.0.0.1 (free when asked; tests are few at a time).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PairDir {
    pub fn new(tag: &str) -> PairDir {
        let dir = std::env::temp_dir().join(format!("ftvmm-ft-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let arbiter = dir.join("arbiter");
        std::fs::create_dir_all(&arbiter).unwrap();
        PairDir {
            dir,
            arbiter,
            port: free_port(),
            started: Cell::new(0),
            keep: std::env::var_os("FTVMM_KEEP_TEST_DIRS").is_some(),
        }
    }

    /// A fresh backup port (a second pairing in the same directory).
    pub fn new_port(&mut self) {
        self.port = free_port();
    }

    /// The backup's address.
    pub fn listen_addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A failure-injection relay in front of this pairing's backup.
    pub fn relay(&self) -> Relay {
        Relay::start(self.listen_addr().parse().unwrap()).unwrap()
    }

    /// Start a backup, then a primary connected to it directly:
    /// (backup, primary).
    pub fn start(&self, side: &Side) -> (Proc, Proc) {
        (self.backup(side), self.primary(side, &self.listen_addr()))
    }

    /// Start a backup, then a primary connected to it through `relay`:
    /// (backup, primary).
    pub fn start_via(&self, side: &Side, relay: &Relay) -> (Proc, Proc) {
        (self.backup(side), self.primary(side, &relay.addr()))
    }

    /// A UDP address near the backup's port, for heartbeats.
    pub fn udp(&self, offset: u16) -> String {
        format!("127.0.0.1:{}", self.port.wrapping_add(offset))
    }

    /// Start a backup listening on `self.port`.
    pub fn backup(&self, side: &Side) -> Proc {
        self.spawn(
            "backup",
            side,
            &["--backup", "--listen", &self.listen_addr()],
        )
    }

    /// Start a primary whose backup is at `peer` (the backup's port, or a
    /// relay's).
    pub fn primary(&self, side: &Side, peer: &str) -> Proc {
        self.spawn("primary", side, &["--primary", "--peer", peer])
    }

    fn spawn(&self, role: &'static str, side: &Side, role_args: &[&str]) -> Proc {
        let n = self.started.get();
        self.started.set(n + 1);
        let name = format!("{role}-{n}");
        let console = self.dir.join(format!("{name}.console"));
        let stderr = self.dir.join(format!("{name}.err"));
        let mut c = Command::new(env!("CARGO_BIN_EXE_ftvmm"));
        c.args(["run", "--no-stdin", "--cmdline", &side.cmdline])
            .arg("--arbiter")
            .arg(&self.arbiter)
            .arg("--console-file")
            .arg(&console)
            .args(["--peer-timeout-ms", &side.peer_timeout_ms.to_string()])
            .args(role_args)
            .args(&side.extra)
            .env("FTVMM_KEY", &side.key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        if let Some(kernel) = &side.kernel {
            c.arg("--kernel").arg(kernel);
        }
        let node_id = match &side.node_id {
            NodeId::Role => Some(role.to_string()),
            NodeId::Named(s) => Some(s.clone()),
            NodeId::Default => None,
        };
        if let Some(id) = &node_id {
            c.args(["--node-id", id]);
        }
        let child = c.spawn().unwrap();
        Proc {
            role,
            name,
            pid: child.id(),
            child: Some(child),
            console,
            stderr,
            node_id,
            code: None,
            started: Instant::now(),
        }
    }

    /// The arbiter's decisions: (generation, winner) for every lock file,
    /// the primaries' boot claims included.
    pub fn winners(&self) -> Vec<(u64, String)> {
        winners(&self.arbiter)
    }

    /// The failover decisions of the pairings `procs` took part in: the
    /// decisions for the generations their stderr says they paired as. A
    /// booting primary also claims the generation before its pairing
    /// (docs/failover.md, "Generations"); that claim decides no failover.
    pub fn pairing_winners(&self, procs: &[&Proc]) -> Vec<(u64, String)> {
        let gens: Vec<u64> = procs.iter().filter_map(|p| p.generation()).collect();
        self.winners()
            .into_iter()
            .filter(|(g, _)| gens.contains(g))
            .collect()
    }
}

impl Drop for PairDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The arbiter's decisions in `dir`, by generation: each `generation-N.lock`
/// names its winner on a `node:` line (docs/failover.md).
pub fn winners(dir: &Path) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(g) = name
            .strip_prefix("generation-")
            .and_then(|s| s.strip_suffix(".lock"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let node = text
            .lines()
            .find_map(|l| l.strip_prefix("node: "))
            .unwrap_or("<unreadable>")
            .to_string();
        out.push((g, node));
    }
    out.sort();
    out
}

/// How a side names itself to the arbiter.
#[derive(Debug, Clone)]
pub enum NodeId {
    /// `--node-id primary` / `--node-id backup`.
    Role,
    /// `--node-id NAME`.
    Named(String),
    /// No `--node-id`: ftvmm's default.
    Default,
}

/// Options of one side.
#[derive(Debug, Clone)]
pub struct Side {
    pub cmdline: String,
    pub key: String,
    pub peer_timeout_ms: u64,
    pub node_id: NodeId,
    pub kernel: Option<PathBuf>,
    pub extra: Vec<String>,
}

impl Side {
    pub fn new(cmdline: &str) -> Side {
        Side {
            cmdline: cmdline.into(),
            key: KEY.into(),
            peer_timeout_ms: 500,
            node_id: NodeId::Role,
            kernel: None,
            extra: Vec::new(),
        }
    }

    pub fn key(mut self, key: &str) -> Side {
        self.key = key.into();
        self
    }

    pub fn peer_timeout_ms(mut self, ms: u64) -> Side {
        self.peer_timeout_ms = ms;
        self
    }

    pub fn node_id(mut self, id: NodeId) -> Side {
        self.node_id = id;
        self
    }

    pub fn kernel(mut self, path: &Path) -> Side {
        self.kernel = Some(path.to_path_buf());
        self
    }

    pub fn arg(mut self, a: &str) -> Side {
        self.extra.push(a.into());
        self
    }

    /// UDP heartbeats from `local` to `peer`, dead after `timeout_ms`.
    pub fn heartbeats(self, local: &str, peer: &str, timeout_ms: u64) -> Side {
        self.args(&["--heartbeat-local", local, "--heartbeat-peer", peer])
            .args(&["--heartbeat-timeout-ms", &timeout_ms.to_string()])
    }

    pub fn args(mut self, a: &[&str]) -> Side {
        self.extra.extend(a.iter().map(|s| s.to_string()));
        self
    }
}

/// One `ftvmm` process. Dropping it kills it (SIGKILL) if it still runs.
pub struct Proc {
    pub role: &'static str,
    /// `<role>-<n>`: the stem of its console and stderr files.
    pub name: String,
    pub pid: u32,
    child: Option<Child>,
    pub console: PathBuf,
    pub stderr: PathBuf,
    pub node_id: Option<String>,
    /// The exit code once known (-1: killed by a signal).
    code: Option<i32>,
    pub started: Instant,
}

impl Proc {
    /// Send `sig` (SIGSTOP, SIGCONT, SIGKILL...).
    pub fn signal(&self, sig: libc::c_int) {
        if self.code.is_none() {
            // SAFETY: a signal to our own child, by pid; it has not been
            // reaped (no exit code yet), so the pid is still ours.
            unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        }
    }

    /// kill -9 and reap.
    pub fn kill(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGKILL);
        self.wait(Duration::from_secs(10));
    }

    /// kill -9 once it has run for `at` (at once if it already exited).
    pub fn kill_after(&mut self, at: Duration) {
        self.wait(at.saturating_sub(self.started.elapsed()));
        self.kill();
    }

    /// Whether it has exited (reaping it if so).
    pub fn exited(&mut self) -> Option<i32> {
        if self.code.is_none() {
            if let Some(c) = &mut self.child {
                if let Ok(Some(st)) = c.try_wait() {
                    self.code = Some(st.code().unwrap_or(-1));
                }
            }
        }
        self.code
    }

    /// Wait up to `limit` for it to exit; its code, or None if it still
    /// runs (it is left running).
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(c) = self.exited() {
                return Some(c);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait up to `limit`; a process still running then is killed and
    /// reported as code -2, so a hang fails the test instead of stalling it.
    pub fn finish(&mut self, limit: Duration) -> i32 {
        match self.wait(limit) {
            Some(c) => c,
            None => {
                self.kill();
                -2
            }
        }
    }

    /// Its stderr so far.
    /// The pairing generation this side says it paired as.
    pub fn generation(&self) -> Option<u64> {
        let err = self.stderr();
        ["as generation ", "(generation "].iter().find_map(|m| {
            let at = err.find(m)? + m.len();
            let digits: String = err[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// What it wrote into its console file so far.
    pub fn console(&self) -> Vec<u8> {
        std::fs::read(&self.console).unwrap_or_default()
    }

    /// Its console as text (lossy).
    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&self.console()).into_owned()
    }

    /// It said it won the arbiter ("NODE won the arbiter"; a loser names
    /// the winner before "already won").
    pub fn won(&self) -> bool {
        let err = self.stderr();
        match &self.node_id {
            Some(id) => err.contains(&format!("{id} won the arbiter")),
            None => err.contains(" won the arbiter and goes on"),
        }
    }

    /// It went live as the backup: it said so, or it wrote console output
    /// (a backup writes its console only once it is live).
    pub fn went_live(&self) -> bool {
        self.stderr().contains("going live")
            || (self.role == "backup" && !self.console().is_empty())
    }

    /// A block for failure messages: name, exit code, stderr, console tail.
    pub fn describe(&self) -> String {
        let console = self.console();
        let tail = &console[console.len().saturating_sub(600)..];
        format!(
            "--- {} (pid {}, exit {:?}), stderr:\n{}--- {} console ({} bytes), last bytes:\n{}\n",
            self.name,
            self.pid,
            self.code,
            self.stderr(),
            self.name,
            console.len(),
            String::from_utf8_lossy(tail)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill();
        }
    }
}

/// `later` extends `earlier` without contradicting it: `earlier` is a
/// prefix of `later`. The error names the first differing offset and shows
/// both streams around it.
pub fn check_extends(earlier: &[u8], later: &[u8]) -> Result<(), String> {
    let n = earlier.len().min(later.len());
    let first_diff = (0..n).find(|&i| earlier[i] != later[i]);
    match first_diff {
        None if later.len() >= earlier.len() => Ok(()),
        None => Err(format!(
            "the later stream ({} bytes) is shorter than the earlier one ({} bytes): it ends at {:?}",
            later.len(),
            earlier.len(),
            around(earlier, later.len())
        )),
        Some(i) => Err(format!(
            "the streams differ at byte {i}: earlier {:?}, later {:?}",
            around(earlier, i),
            around(later, i)
        )),
    }
}

fn around(b: &[u8], i: usize) -> String {
    let from = i.saturating_sub(60);
    let to = (i + 60).min(b.len());
    format!(
        "…{}[{}]{}…",
        String::from_utf8_lossy(&b[from..i.min(b.len())]),
        b.get(i)
            .map_or(String::from("end"), |c| format!("{:?}", *c as char)),
        String::from_utf8_lossy(b.get(i + 1..to).unwrap_or_default())
    )
}

/// A console written at offsets has no gap: a gap reads as NUL bytes.
pub fn check_no_gap(console: &[u8]) -> Result<(), String> {
    match console.iter().position(|b| *b == 0) {
        None => Ok(()),
        Some(i) => Err(format!("gap (NUL) at byte {i} of {}", console.len())),
    }
}

/// Consoles written at offsets by several sides (or several lives of one
/// side), where a side that joined a running guest wrote nothing before
/// its join point (NUL bytes there): wherever two of them both wrote a
/// byte, they agree; and together they leave no gap. Returns the union.
pub fn check_union(consoles: &[(String, Vec<u8>)]) -> Result<Vec<u8>, String> {
    let len = consoles.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
    let mut union = vec![0u8; len];
    let mut by = vec![usize::MAX; len];
    for (k, (_, c)) in consoles.iter().enumerate() {
        for (i, &b) in c.iter().enumerate() {
            if b == 0 {
                continue;
            }
            if union[i] != 0 && union[i] != b {
                return Err(format!(
                    "{} and {} differ at byte {i}: {:?} vs {:?}",
                    consoles[by[i]].0,
                    consoles[k].0,
                    around(&union, i),
                    around(c, i)
                ));
            }
            union[i] = b;
            by[i] = k;
        }
    }
    check_no_gap(&union).map_err(|e| format!("together the consoles have a {e}"))?;
    Ok(union)
}
