//! Helpers for the control-plane process tests: a pair of `ftvmm`
//! processes with a console file each, and a relay on the logging channel
//! that can cut it, truncate it in the middle of a frame, or freeze the
//! backup's executed acks.

// Test code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used, dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bundled guest: 300 ticks at 250 Hz (1.2 s), a digest line every 25.
pub const CMDLINE: &str = "hz=250 ticks=300 digest_every=25";
pub const KEY: &str = "control plane test key";

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A primary/backup pair's files: an arbiter directory they share and a
/// console file per side (what each side itself put out).
pub struct Pair {
    pub dir: PathBuf,
    pub port: u16,
}

impl Pair {
    pub fn new(tag: &str) -> Pair {
        let dir = std::env::temp_dir().join(format!("ftvmm-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("arbiter")).unwrap();
        Pair {
            dir,
            port: free_port(),
        }
    }

    pub fn arbiter(&self) -> PathBuf {
        self.dir.join("arbiter")
    }

    pub fn console(&self, role: &str) -> PathBuf {
        self.dir.join(format!("console-{role}.txt"))
    }

    /// What `role` has put out so far.
    pub fn output(&self, role: &str) -> Vec<u8> {
        std::fs::read(self.console(role)).unwrap_or_default()
    }

    /// `ftvmm run` as `role` ("primary" or "backup"); the primary connects
    /// to `port`, the backup listens on the pair's port.
    pub fn command(&self, role: &str, port: u16) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ftvmm"));
        c.args(["run", "--no-stdin", "--cmdline", CMDLINE, "--node-id", role])
            .arg("--arbiter")
            .arg(self.arbiter())
            .arg("--console-file")
            .arg(self.console(role))
            .args(["--peer-timeout-ms", "500"])
            .env("FTVMM_KEY", KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let addr = format!("127.0.0.1:{port}");
        match role {
            "primary" => c.args(["--primary", "--peer", &addr]),
            _ => c.args(["--backup", "--listen", &addr]),
        };
        c
    }

    pub fn backup(&self) -> Child {
        self.command("backup", self.port).spawn().unwrap()
    }

    pub fn primary_via(&self, port: u16) -> Child {
        self.command("primary", port).spawn().unwrap()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Exit code and stderr; a process still running after `limit` is killed
/// (and reported as code -1) so a hang fails the test instead of stalling
/// it.
pub fn finish(mut child: Child, limit: Duration) -> (i32, String) {
    let start = Instant::now();
    while child.try_wait().ok().flatten().is_none() && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Wait until `cond` holds, for at most `limit`.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// The bundled guest's whole console: no gap and every line in order.
pub fn assert_whole_console(bytes: &[u8], who: &str) {
    assert!(!bytes.contains(&0), "{who}: gap in the console stream");
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("ftvmm-guest 0.1 booting"),
        "{who}:\n{text}"
    );
    assert_eq!(
        lines.next(),
        Some(format!("cmdline: {CMDLINE}").as_str()),
        "{who}"
    );
    assert!(
        lines.next().unwrap_or_default().starts_with("clock "),
        "{who}:\n{text}"
    );
    for k in 1..=12 {
        let l = lines.next().unwrap_or_default();
        assert!(
            l.starts_with(&format!("tick {} digest ", 25 * k)),
            "{who}: {l:?} in\n{text}"
        );
    }
    assert!(
        lines.next().unwrap_or_default().starts_with("work steps "),
        "{who}:\n{text}"
    );
    assert!(
        lines
            .next()
            .unwrap_or_default()
            .starts_with("done ticks 300 digest "),
        "{who}:\n{text}"
    );
    assert_eq!(lines.next(), None, "{who}:\n{text}");
}

/// `released` (what one side put out) is a prefix of `live` (what the
/// side that went on wrote): the world saw one stream.
pub fn assert_extends(released: &[u8], live: &[u8], what: &str) {
    assert!(
        live.starts_with(released),
        "{what}: the live side contradicts released output\nreleased:\n{}\nlive:\n{}",
        String::from_utf8_lossy(released),
        String::from_utf8_lossy(live)
    );
}

/// What the relay does.
#[derive(Default)]
pub struct RelayCtl {
    /// Swallow everything both ways, connections left open (a cut link).
    pub cut: AtomicBool,
    /// Primary → backup: forward half of the next frame, then end the
    /// stream to the backup (the primary dying in the middle of a write).
    pub truncate: AtomicBool,
    /// Set by the relay once it truncated.
    pub truncated: AtomicBool,
    /// Backup → primary: freeze the executed field of every ack at its
    /// value when this was set (a backup whose replay stalls).
    pub stall_executed: AtomicBool,
}

/// A one-connection relay from a port to the backup's port.
pub struct Relay {
    pub port: u16,
    pub ctl: Arc<RelayCtl>,
}

impl Relay {
    pub fn start(to: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ctl = Arc::new(RelayCtl::default());
        let c = ctl.clone();
        std::thread::spawn(move || {
            let Ok((a, _)) = listener.accept() else {
                return;
            };
            let mut b = None;
            for _ in 0..400 {
                if let Ok(s) = TcpStream::connect(("127.0.0.1", to)) {
                    b = Some(s);
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let Some(b) = b else { return };
            let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let c2 = c.clone();
            std::thread::spawn(move || pump(b2, a2, &c2, Direction::ToPrimary));
            pump(a, b, &c, Direction::ToBackup);
        });
        Relay { port, ctl }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToBackup,
    ToPrimary,
}

/// Forward frame by frame (after the 12-byte preamble), applying `ctl`.
fn pump(mut from: TcpStream, mut to: TcpStream, ctl: &RelayCtl, dir: Direction) {
    let mut pending: Vec<u8> = Vec::new();
    let mut preamble_left = 12usize;
    let mut frozen: Option<Option<u64>> = None;
    let mut last_executed: Option<u64> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                // After a truncation the primary counts as dead: it must
                // not hear the backup hang up and race it to the arbiter.
                if !ctl.cut.load(Ordering::SeqCst) && !ctl.truncated.load(Ordering::SeqCst) {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => n,
        };
        if ctl.cut.load(Ordering::SeqCst) || ctl.truncated.load(Ordering::SeqCst) {
            continue; // swallowed
        }
        pending.extend_from_slice(&buf[..n]);
        let mut out = Vec::new();
        let skip = preamble_left.min(pending.len());
        out.extend(pending.drain(..skip));
        preamble_left -= skip;
        while pending.len() >= 8 {
            let len = u32::from_le_bytes(pending[..4].try_into().unwrap()) as usize;
            if dir == Direction::ToBackup && ctl.truncate.load(Ordering::SeqCst) {
                let cut = (8 + len / 2).min(pending.len());
                out.extend_from_slice(&pending[..cut]);
                let _ = to.write_all(&out);
                let _ = to.shutdown(Shutdown::Write);
                ctl.truncated.store(true, Ordering::SeqCst);
                return;
            }
            if pending.len() < 8 + len {
                break;
            }
            let frame: Vec<u8> = pending.drain(..8 + len).collect();
            let frame = match dir {
                Direction::ToPrimary => rewrite_ack(frame, ctl, &mut frozen, &mut last_executed),
                Direction::ToBackup => frame,
            };
            out.extend_from_slice(&frame);
        }
        if !out.is_empty() && to.write_all(&out).is_err() {
            return;
        }
    }
}

/// Channel message index of `Ack` (postcard variant index).
const ACK: u8 = 8;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// An `Option<u64>` in postcard at the start of `b`; returns it and its
/// length.
fn opt(b: &[u8]) -> Option<(Option<u64>, usize)> {
    match *b.first()? {
        0 => Some((None, 1)),
        1 => {
            let mut v = 0u64;
            for (i, x) in b[1..].iter().enumerate() {
                v |= u64::from(x & 0x7f) << (7 * i);
                if x & 0x80 == 0 {
                    return Some((Some(v), i + 2));
                }
            }
            None
        }
        _ => None,
    }
}

/// With `stall_executed` set, rewrite an ack's executed field to its value
/// at the moment the stall began.
fn rewrite_ack(
    frame: Vec<u8>,
    ctl: &RelayCtl,
    frozen: &mut Option<Option<u64>>,
    last: &mut Option<u64>,
) -> Vec<u8> {
    let payload = &frame[8..];
    if payload.first() != Some(&ACK) {
        return frame;
    }
    let Some((received, n)) = opt(&payload[1..]) else {
        return frame;
    };
    let Some((executed, _)) = opt(&payload[1 + n..]) else {
        return frame;
    };
    if !ctl.stall_executed.load(Ordering::SeqCst) {
        *last = executed;
        return frame;
    }
    let keep = *frozen.get_or_insert(*last);
    let mut p = vec![ACK];
    for v in [received, keep] {
        match v {
            None => p.push(0),
            Some(v) => {
                p.push(1);
                varint(v, &mut p);
            }
        }
    }
    let mut out = (p.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&crc32fast::hash(&p).to_le_bytes());
    out.extend_from_slice(&p);
    out
}

/// Whether `path` (a console file) contains `needle`.
pub fn contains(path: &Path, needle: &str) -> bool {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).contains(needle))
        .unwrap_or(false)
}
