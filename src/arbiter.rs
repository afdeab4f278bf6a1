//! Split-brain guard: an atomic test-and-set on shared storage.
//!
//! Before a side goes live alone (the backup taking over, or the primary
//! continuing without its backup) it must *win* the arbiter for the current
//! generation. A generation is one pairing of a primary with a backup; a new
//! backup joining later starts a new generation. For any generation at most
//! one node id ever wins, on a local filesystem and on NFS v2/v3/v4.
//!
//! The arbiter is a directory both hosts mount. Each decided generation is one
//! file, `generation-<20 digits>.lock`, holding the winner's claim. It is
//! published with the NFS-safe `link(2)` recipe:
//!
//! 1. write the claim to a unique temp file in the same directory
//!    (`.claim-<gen>-<host>-<pid>-<random>.tmp`), `fsync` it and close it;
//! 2. `link(2)` the temp file to the generation's lock name — the link either
//!    creates the name (we won) or fails because it exists (someone won);
//! 3. if the link reports an error but the temp file's link count is now 2,
//!    the server did the link and a retransmitted request reported `EEXIST`:
//!    we won;
//! 4. otherwise read the lock file to learn the winner; a claim carrying our
//!    own node id means we won earlier (idempotence);
//! 5. remove the temp file and `fsync` the directory.
//!
//! Only [`Arbiter::try_win`] is authoritative. [`Arbiter::winner`] reads the
//! lock file and, on NFS, may briefly miss a freshly created one (negative
//! lookup caching). See `docs/failover.md` for the full guarantee.

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// First line of every claim file.
const HEADER: &str = "ftvmm-arbiter-claim v1";
/// Last line of every claim file (detects truncation).
const TRAILER: &str = "end";
/// Claims are tiny; anything larger than this is not ours.
const MAX_CLAIM_BYTES: u64 = 4096;
/// Longest accepted node id.
pub const MAX_NODE_ID_LEN: usize = 64;
const LOCK_PREFIX: &str = "generation-";
const LOCK_SUFFIX: &str = ".lock";
/// How long to keep re-reading a lock file that `link` said exists but that
/// is not visible yet (NFS lookup caches), in steps of [`LOCK_RETRY_STEP`].
const LOCK_RETRIES: u32 = 40;
const LOCK_RETRY_STEP: Duration = Duration::from_millis(50);

/// Errors from the arbiter. Every variant names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    /// The arbiter directory cannot be inspected (missing, no permission...).
    #[error("arbiter directory {path}: {source}")]
    Dir {
        /// The directory given to [`Arbiter::new`].
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The arbiter path exists but is not a directory.
    #[error("arbiter path {path} is not a directory (it must be a directory on storage both hosts mount)")]
    NotADirectory {
        /// The path given to [`Arbiter::new`].
        path: PathBuf,
    },
    /// The node id cannot be used in a claim.
    #[error("invalid arbiter node id {id:?}: {reason}")]
    InvalidNodeId {
        /// The rejected id.
        id: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A filesystem operation failed.
    #[error("arbiter: {op} {path}: {source}")]
    Io {
        /// What was being done ("create temp claim", "link", "read lock", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A lock file exists but does not hold a valid claim. The arbiter never
    /// writes a lock file in place, so this means outside interference or a
    /// storage fault; no side can be told it won until an operator inspects it.
    #[error("arbiter lock file {path} for generation {generation} is corrupt ({reason}); refusing to decide: inspect it, and remove it only if no side is live for that generation")]
    Corrupt {
        /// The lock file.
        path: PathBuf,
        /// The generation it decides.
        generation: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// [`Arbiter::start_generation`]: the latest decided generation was won by
    /// another node, so this node lost its place and must not start a pairing.
    #[error("generation {generation} was won by {winner:?}, not {node:?}: this node was superseded and may not start a new generation")]
    Superseded {
        /// The latest decided generation.
        generation: u64,
        /// Its winner.
        winner: String,
        /// This node.
        node: String,
    },
}

/// Result of [`Arbiter::try_win`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// This node holds the generation: it may go live alone.
    Won,
    /// Another node holds the generation: this node must stop its VM.
    Lost {
        /// The winner's node id.
        winner: String,
    },
}

/// A claim read back from a lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Claim {
    node: String,
}

/// Handle on an arbiter directory for one node.
#[derive(Debug, Clone)]
pub struct Arbiter {
    dir: PathBuf,
    node: String,
    host: String,
}

impl Arbiter {
    /// Use the arbiter directory `dir` as node `node_id`.
    ///
    /// `node_id` must be unique per side (two processes using the same id are
    /// the same side to the arbiter), 1 to [`MAX_NODE_ID_LEN`] bytes of
    /// `[A-Za-z0-9._:@-]`. `dir` must be an existing directory.
    pub fn new(dir: &Path, node_id: &str) -> Result<Arbiter, ArbiterError> {
        validate_node_id(node_id)?;
        let meta = fs::metadata(dir).map_err(|source| ArbiterError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(ArbiterError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        Ok(Arbiter {
            dir: dir.to_path_buf(),
            node: node_id.to_owned(),
            host: hostname(),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// The arbiter directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lock file deciding `generation`.
    pub fn lock_path(&self, generation: u64) -> PathBuf {
        self.dir.join(lock_name(generation))
    }

    /// Atomically claim `generation`. Exactly one node id ever gets
    /// [`Outcome::Won`] for a generation; calling again returns the same
    /// answer (the winner gets `Won` again, others `Lost` with its id).
    ///
    /// An error means nothing is known: the caller must not go live (it may
    /// retry; a later call returns the decided outcome).
    pub fn try_win(&self, generation: u64) -> Result<Outcome, ArbiterError> {
        // Already decided: answer without leaving a temp file behind. A miss
        // here may be stale on NFS; the link below is what decides.
        if let Some(claim) = self.read_claim(generation)? {
            self.sync_dir()?;
            return Ok(self.outcome(generation, claim));
        }
        let tmp = self.write_temp_claim(generation)?;
        let link_result = fs::hard_link(&tmp, self.lock_path(generation));
        let settled = self.settle(generation, &tmp, link_result);
        if let Err(e) = fs::remove_file(&tmp) {
            tracing::warn!(path = %tmp.display(), error = %e, "arbiter: cannot remove temp claim");
        }
        let outcome = settled?;
        self.sync_dir()?;
        Ok(outcome)
    }

    /// The winner of `generation`, if decided. Advisory: on NFS a lock file
    /// created by the other host moments ago may not be visible yet; only
    /// [`Arbiter::try_win`] decides.
    pub fn winner(&self, generation: u64) -> Result<Option<String>, ArbiterError> {
        Ok(self.read_claim(generation)?.map(|c| c.node))
    }

    /// The highest decided generation and its winner, if any.
    pub fn latest_decided(&self) -> Result<Option<(u64, String)>, ArbiterError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| ArbiterError::Dir {
            path: self.dir.clone(),
            source,
        })?;
        let mut highest: Option<u64> = None;
        for entry in entries {
            let entry = entry.map_err(|source| ArbiterError::Dir {
                path: self.dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            if let Some(g) = name.to_str().and_then(parse_lock_name) {
                highest = Some(highest.map_or(g, |h| h.max(g)));
            }
        }
        let Some(g) = highest else { return Ok(None) };
        match self.read_claim(g)? {
            Some(claim) => Ok(Some((g, claim.node))),
            // Listed a moment ago; lock files are never removed by the arbiter.
            None => Err(ArbiterError::Io {
                op: "read listed lock",
                path: self.lock_path(g),
                source: io::Error::from(io::ErrorKind::NotFound),
            }),
        }
    }

    /// The generation number for a new pairing started by this node: 1 if
    /// nothing was ever decided, else the latest decided generation + 1 —
    /// provided this node won it. If another node won the latest decided
    /// generation this node was superseded: [`ArbiterError::Superseded`].
    /// Nothing is written; the number travels in the pairing handshake.
    pub fn start_generation(&self) -> Result<u64, ArbiterError> {
        match self.latest_decided()? {
            None => Ok(1),
            Some((g, winner)) if winner == self.node => Ok(g.saturating_add(1)),
            Some((generation, winner)) => Err(ArbiterError::Superseded {
                generation,
                winner,
                node: self.node.clone(),
            }),
        }
    }

    fn outcome(&self, generation: u64, claim: Claim) -> Outcome {
        if claim.node == self.node {
            tracing::info!(generation, node = %self.node, "arbiter: won");
            Outcome::Won
        } else {
            tracing::info!(generation, node = %self.node, winner = %claim.node, "arbiter: lost");
            Outcome::Lost { winner: claim.node }
        }
    }

    /// Decide after the `link` attempt.
    fn settle(
        &self,
        generation: u64,
        tmp: &Path,
        link_result: io::Result<()>,
    ) -> Result<Outcome, ArbiterError> {
        let link_err = match link_result {
            Ok(()) => {
                tracing::info!(generation, node = %self.node, "arbiter: won (link created lock)");
                return Ok(Outcome::Won);
            }
            Err(e) => e,
        };
        // NFS: the LINK may have been done by the server and its reply lost;
        // the retransmitted request then fails with EEXIST. Our temp file is
        // unique, so a link count of 2 means the lock name points at it.
        match fs::metadata(tmp) {
            Ok(m) if m.nlink() >= 2 => {
                tracing::warn!(generation, node = %self.node, error = %link_err,
                    "arbiter: link reported an error but the claim has link count 2; won");
                return Ok(Outcome::Won);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(path = %tmp.display(), error = %e, "arbiter: cannot stat temp claim")
            }
        }
        let lock = self.lock_path(generation);
        if link_err.kind() != io::ErrorKind::AlreadyExists {
            // Some other failure (permissions, I/O): only a visible claim can
            // still give an answer.
            return match self.read_claim(generation)? {
                Some(claim) => Ok(self.outcome(generation, claim)),
                None => Err(ArbiterError::Io {
                    op: "link claim to",
                    path: lock,
                    source: link_err,
                }),
            };
        }
        for attempt in 0..LOCK_RETRIES {
            if let Some(claim) = self.read_claim(generation)? {
                return Ok(self.outcome(generation, claim));
            }
            tracing::debug!(
                generation,
                attempt,
                "arbiter: lock exists per link but is not visible yet"
            );
            std::thread::sleep(LOCK_RETRY_STEP);
        }
        Err(ArbiterError::Io {
            op: "link said the lock exists, but cannot find",
            path: lock,
            source: link_err,
        })
    }

    /// Read and validate the lock file for `generation`; `None` if absent.
    fn read_claim(&self, generation: u64) -> Result<Option<Claim>, ArbiterError> {
        let path = self.lock_path(generation);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ArbiterError::Io {
                    op: "open lock",
                    path,
                    source,
                })
            }
        };
        let mut bytes = Vec::new();
        if let Err(source) = file.take(MAX_CLAIM_BYTES + 1).read_to_end(&mut bytes) {
            return Err(ArbiterError::Io {
                op: "read lock",
                path,
                source,
            });
        }
        match parse_claim(&bytes, generation) {
            Ok(claim) => Ok(Some(claim)),
            Err(reason) => Err(ArbiterError::Corrupt {
                path,
                generation,
                reason,
            }),
        }
    }

    /// Create, fill, fsync and close a uniquely named temp claim.
    fn write_temp_claim(&self, generation: u64) -> Result<PathBuf, ArbiterError> {
        let pid = std::process::id();
        let nonce = random_u64();
        let tmp = self.dir.join(format!(
            ".claim-{generation}-{}-{pid}-{nonce:016x}.tmp",
            self.host
        ));
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let text = format!(
            "{HEADER}\ngeneration: {generation}\nnode: {}\nhost: {}\npid: {pid}\nnonce: {nonce:016x}\nunix-ms: {now_ms}\n{TRAILER}\n",
            self.node, self.host
        );
        let io_err = |op, source| ArbiterError::Io {
            op,
            path: tmp.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(|e| io_err("create temp claim", e))?;
        let written = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_all());
        drop(file);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("write temp claim", e));
        }
        Ok(tmp)
    }

    /// fsync the arbiter directory so the lock's name is durable.
    fn sync_dir(&self) -> Result<(), ArbiterError> {
        let result = File::open(&self.dir).and_then(|d| d.sync_all());
        match result {
            Ok(()) => Ok(()),
            // Some filesystems do not support fsync on directories; their
            // metadata operations are synchronous or the call is meaningless.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTSUP)) => {
                tracing::debug!(dir = %self.dir.display(), error = %e, "arbiter: directory fsync unsupported");
                Ok(())
            }
            Err(source) => Err(ArbiterError::Io {
                op: "fsync directory",
                path: self.dir.clone(),
                source,
            }),
        }
    }
}

fn lock_name(generation: u64) -> String {
    format!("{LOCK_PREFIX}{generation:020}{LOCK_SUFFIX}")
}

fn parse_lock_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(LOCK_PREFIX)?.strip_suffix(LOCK_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn validate_node_id(id: &str) -> Result<(), ArbiterError> {
    let reason = if id.is_empty() {
        Some("empty")
    } else if id.len() > MAX_NODE_ID_LEN {
        Some("longer than 64 bytes")
    } else if !id.bytes().all(node_id_byte_ok) {
        Some("only A-Z a-z 0-9 . _ : @ - are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ArbiterError::InvalidNodeId {
            id: id.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn node_id_byte_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-')
}

/// Parse a claim; the error is a human-readable reason.
fn parse_claim(bytes: &[u8], generation: u64) -> Result<Claim, String> {
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    if bytes.len() as u64 > MAX_CLAIM_BYTES {
        return Err(format!("larger than {MAX_CLAIM_BYTES} bytes"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let body = text
        .strip_suffix('\n')
        .ok_or_else(|| "truncated (no final newline)".to_string())?;
    let mut lines = body.split('\n');
    if lines.next() != Some(HEADER) {
        return Err(format!("first line is not {HEADER:?}"));
    }
    let mut gen_seen = None;
    let mut node = None;
    let mut ended = false;
    for line in lines {
        if ended {
            return Err("data after the end line".into());
        }
        if line == TRAILER {
            ended = true;
            continue;
        }
        let (key, value) = line
            .split_once(": ")
            .ok_or_else(|| format!("malformed line {line:?}"))?;
        match key {
            "generation" => {
                gen_seen = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| format!("bad generation {value:?}"))?,
                )
            }
            "node" => node = Some(value.to_owned()),
            _ => {}
        }
    }
    if !ended {
        return Err("truncated (no end line)".into());
    }
    match gen_seen {
        Some(g) if g == generation => {}
        Some(g) => return Err(format!("claims generation {g}")),
        None => return Err("no generation line".into()),
    }
    let node = node.ok_or_else(|| "no node line".to_string())?;
    if validate_node_id(&node).is_err() {
        return Err(format!("invalid node id {node:?}"));
    }
    Ok(Claim { node })
}

/// The node id a side gets unless given one: `role@hostname-pid`, unique
/// per process and telling an operator reading a lock file where the winner
/// ran (the host name is shortened to fit [`MAX_NODE_ID_LEN`]).
pub fn default_node_id(role: &str) -> String {
    let pid = std::process::id();
    let room = MAX_NODE_ID_LEN.saturating_sub(role.len() + 2 + pid.to_string().len());
    let host: String = hostname().chars().take(room).collect();
    format!("{role}@{host}-{pid}")
}

/// A node id that stays the same when the process restarts: `role@host-`
/// and the node's channel address (its port tells two nodes on one host
/// apart). For `--pair`, whose nodes must be recognised as the latest
/// winner after a restart.
pub fn stable_node_id(role: &str, listen: &str) -> String {
    let addr: String = listen
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let room = MAX_NODE_ID_LEN.saturating_sub(role.len() + 2 + addr.len());
    let host: String = hostname().chars().take(room).collect();
    format!("{role}@{host}-{addr}")
}

/// This host's name, restricted to characters safe in a file name.
fn hostname() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if clean.is_empty() {
        "unknown-host".into()
    } else {
        clean
    }
}

/// 64 unpredictable bits without a rand dependency: std's per-process random
/// hash keys mixed with a counter, the pid and the time.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Barrier};

    /// Env var that turns the ignored `child_race_entry` test into a racer.
    const CHILD_ENV: &str = "FTVMM_ARBITER_RACE_CHILD";
    const ROUNDS: u64 = 100;

    fn scratch_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ftvmm-arbiter-{tag}-{}-{:016x}",
            std::process::id(),
            random_u64()
        ));
        fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    }

    fn leftover_temps(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .expect("list dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn the_default_node_id_is_role_at_host_pid_and_valid() {
        let id = default_node_id("backup");
        let pid = std::process::id().to_string();
        assert!(id.starts_with("backup@"), "{id}");
        assert!(id.ends_with(&format!("-{pid}")), "{id}");
        assert!(validate_node_id(&id).is_ok(), "{id}");
        assert!(id.contains(&hostname()[..hostname().len().min(8)]), "{id}");
    }

    #[test]
    fn single_winner_is_idempotent() {
        let dir = scratch_dir("idem");
        let a = Arbiter::new(&dir, "primary-a").expect("new a");
        let b = Arbiter::new(&dir, "backup-b").expect("new b");
        assert_eq!(a.winner(7).expect("winner"), None);
        assert_eq!(a.try_win(7).expect("a"), Outcome::Won);
        assert_eq!(a.try_win(7).expect("a again"), Outcome::Won);
        let lost = Outcome::Lost {
            winner: "primary-a".into(),
        };
        assert_eq!(b.try_win(7).expect("b"), lost);
        assert_eq!(b.try_win(7).expect("b again"), lost);
        // A fresh handle with the winner's id (e.g. a restarted daemon).
        let a2 = Arbiter::new(&dir, "primary-a").expect("new a2");
        assert_eq!(a2.try_win(7).expect("a2"), Outcome::Won);
        assert_eq!(b.winner(7).expect("winner"), Some("primary-a".into()));
        // Another generation is independent.
        assert_eq!(b.try_win(8).expect("b 8"), Outcome::Won);
        assert_eq!(
            a.try_win(8).expect("a 8"),
            Outcome::Lost {
                winner: "backup-b".into()
            }
        );
        assert!(leftover_temps(&dir).is_empty());
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn start_generation_follows_the_winner() {
        let dir = scratch_dir("startgen");
        let a = Arbiter::new(&dir, "a").expect("a");
        let b = Arbiter::new(&dir, "b").expect("b");
        assert_eq!(a.latest_decided().expect("latest"), None);
        assert_eq!(a.start_generation().expect("start"), 1);
        assert_eq!(b.try_win(1).expect("b wins 1"), Outcome::Won);
        assert_eq!(b.start_generation().expect("b next"), 2);
        let err = a.start_generation().expect_err("a superseded");
        assert!(matches!(
            err,
            ArbiterError::Superseded { generation: 1, .. }
        ));
        assert!(err.to_string().contains("\"b\""), "{err}");
        assert_eq!(b.try_win(12).expect("b wins 12"), Outcome::Won);
        assert_eq!(
            a.latest_decided().expect("latest"),
            Some((12, "b".to_string()))
        );
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn retransmitted_link_counts_as_won() {
        // Simulate NFS: the server performed LINK, the reply was lost and the
        // retransmission failed with EEXIST.
        let dir = scratch_dir("retrans");
        let a = Arbiter::new(&dir, "a").expect("a");
        let tmp = a.write_temp_claim(3).expect("temp");
        fs::hard_link(&tmp, a.lock_path(3)).expect("link");
        let eexist = io::Error::from(io::ErrorKind::AlreadyExists);
        assert_eq!(
            a.settle(3, &tmp, Err(eexist)).expect("settle"),
            Outcome::Won
        );
        fs::remove_file(&tmp).expect("rm tmp");
        // And a loser in the same situation reads the winner.
        let b = Arbiter::new(&dir, "b").expect("b");
        let tmp_b = b.write_temp_claim(3).expect("temp b");
        let eexist = io::Error::from(io::ErrorKind::AlreadyExists);
        assert_eq!(
            b.settle(3, &tmp_b, Err(eexist)).expect("settle b"),
            Outcome::Lost { winner: "a".into() }
        );
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn corrupt_lock_file_is_a_clear_error() {
        let dir = scratch_dir("corrupt");
        let a = Arbiter::new(&dir, "a").expect("a");
        let cases: [(&[u8], &str); 5] = [
            (b"", "empty file"),
            (b"hello world\n", "first line"),
            (
                b"ftvmm-arbiter-claim v1\ngeneration: 5\nnode: x\n",
                "no end line",
            ),
            (
                b"ftvmm-arbiter-claim v1\ngeneration: 6\nnode: x\nend\n",
                "claims generation 6",
            ),
            (b"\xff\xfe\x00", "not UTF-8"),
        ];
        for (bytes, reason) in cases {
            fs::write(a.lock_path(5), bytes).expect("write corrupt");
            for err in [
                a.try_win(5).expect_err("try_win on corrupt"),
                a.winner(5).expect_err("winner on corrupt"),
            ] {
                let msg = err.to_string();
                assert!(
                    matches!(err, ArbiterError::Corrupt { generation: 5, .. }),
                    "{msg}"
                );
                assert!(msg.contains(reason), "{msg} lacks {reason}");
                assert!(msg.contains(&a.lock_path(5).display().to_string()), "{msg}");
            }
        }
        assert!(leftover_temps(&dir).is_empty());
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn unreadable_lock_file_is_a_clear_error() {
        let dir = scratch_dir("unreadable");
        let a = Arbiter::new(&dir, "a").expect("a");
        // A directory where the lock file should be: open succeeds, read
        // fails with EISDIR (works even when the tests run as root).
        fs::create_dir(a.lock_path(9)).expect("mkdir lock");
        let err = a.try_win(9).expect_err("unreadable");
        let msg = err.to_string();
        assert!(matches!(err, ArbiterError::Io { .. }), "{msg}");
        assert!(msg.contains(&a.lock_path(9).display().to_string()), "{msg}");
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("ftvmm-arbiter-missing-{:016x}", random_u64()));
        let err = Arbiter::new(&dir, "a").expect_err("missing dir");
        let msg = err.to_string();
        assert!(matches!(err, ArbiterError::Dir { .. }), "{msg}");
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");

        // Directory vanishing after new(): the error still names a path in it.
        let dir = scratch_dir("vanish");
        let a = Arbiter::new(&dir, "a").expect("a");
        fs::remove_dir_all(&dir).expect("rm");
        let msg = a.try_win(1).expect_err("vanished").to_string();
        assert!(msg.contains(&dir.display().to_string()), "{msg}");

        // A regular file is not an arbiter directory.
        let file = std::env::temp_dir().join(format!("ftvmm-arbiter-file-{:016x}", random_u64()));
        fs::write(&file, b"x").expect("file");
        let err = Arbiter::new(&file, "a").expect_err("file");
        assert!(matches!(err, ArbiterError::NotADirectory { .. }), "{err}");
        fs::remove_file(&file).ok();
    }

    #[test]
    fn node_ids_are_validated() {
        let dir = std::env::temp_dir();
        for bad in ["", "has space", "new\nline", "slash/es", &"x".repeat(65)] {
            let err = Arbiter::new(&dir, bad).expect_err("bad id");
            assert!(matches!(err, ArbiterError::InvalidNodeId { .. }), "{err}");
        }
        Arbiter::new(&dir, "host-1.example:backup@2_b").expect("good id");
    }

    #[test]
    fn two_threads_race_one_winner_each_generation() {
        let dir = scratch_dir("threads");
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = ["left", "right"]
            .into_iter()
            .map(|id| {
                let arb = Arbiter::new(&dir, id).expect("new");
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    (1..=ROUNDS)
                        .map(|g| {
                            barrier.wait();
                            arb.try_win(g).expect("try_win")
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<Vec<Outcome>> = handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect();
        let check = Arbiter::new(&dir, "observer").expect("observer");
        let mut wins = [0u32; 2];
        for g in 1..=ROUNDS {
            let i = (g - 1) as usize;
            let winner = check.winner(g).expect("winner").expect("decided");
            match (&results[0][i], &results[1][i]) {
                (Outcome::Won, Outcome::Lost { winner: w }) => {
                    assert_eq!((w.as_str(), winner.as_str()), ("left", "left"));
                    wins[0] += 1;
                }
                (Outcome::Lost { winner: w }, Outcome::Won) => {
                    assert_eq!((w.as_str(), winner.as_str()), ("right", "right"));
                    wins[1] += 1;
                }
                other => panic!("generation {g}: not exactly one winner: {other:?}"),
            }
        }
        assert_eq!(wins[0] + wins[1], ROUNDS as u32);
        assert!(leftover_temps(&dir).is_empty());
        fs::remove_dir_all(&dir).ok();
    }

    /// Runs only as a child of `eight_processes_race`: races `ROUNDS`
    /// generations, each at an agreed wall-clock instant, and writes one line
    /// per generation to a result file.
    #[test]
    #[ignore = "helper process for eight_processes_race"]
    fn child_race_entry() {
        let Ok(spec) = std::env::var(CHILD_ENV) else {
            return;
        };
        let parts: Vec<&str> = spec.split('|').collect();
        let [dir, out, id, start_ms] = parts[..] else {
            panic!("bad {CHILD_ENV}: {spec:?}");
        };
        let arb = Arbiter::new(Path::new(dir), id).expect("new");
        let start_ms: u128 = start_ms.parse().expect("start");
        let mut report = String::new();
        for g in 1..=ROUNDS {
            // Spin until this round's start so all processes collide.
            let at = start_ms + u128::from(g) * 10;
            loop {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("clock")
                    .as_millis();
                if now >= at {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            let line = match arb.try_win(g).expect("try_win") {
                Outcome::Won => format!("{g} won {id}\n"),
                Outcome::Lost { winner } => format!("{g} lost {winner}\n"),
            };
            report.push_str(&line);
        }
        fs::write(out, report).expect("write report");
    }

    #[test]
    fn eight_processes_race() {
        const PROCS: usize = 8;
        let dir = scratch_dir("procs");
        let out_dir = scratch_dir("procs-out");
        let exe = std::env::current_exe().expect("current_exe");
        let start_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis()
            + 1500;
        let children: Vec<_> = (0..PROCS)
            .map(|i| {
                let id = format!("node-{i}");
                let out = out_dir.join(format!("{id}.txt"));
                let spec = format!("{}|{}|{id}|{start_ms}", dir.display(), out.display());
                let child = std::process::Command::new(&exe)
                    .args(["child_race_entry", "--ignored", "--test-threads=1"])
                    .env(CHILD_ENV, spec)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn child");
                (id, out, child)
            })
            .collect();
        let mut reports = Vec::new();
        for (id, out, child) in children {
            let output = child.wait_with_output().expect("wait child");
            assert!(
                output.status.success(),
                "{id} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            reports.push((id, fs::read_to_string(&out).expect("read report")));
        }
        // generation -> (winners that said Won, winners named by losers)
        let mut seen: BTreeMap<u64, (Vec<String>, Vec<String>)> = BTreeMap::new();
        for (id, report) in &reports {
            assert_eq!(report.lines().count() as u64, ROUNDS, "{id}");
            for line in report.lines() {
                let f: Vec<&str> = line.split(' ').collect();
                let g: u64 = f[0].parse().expect("gen");
                let entry = seen.entry(g).or_default();
                match f[1] {
                    "won" => entry.0.push(f[2].to_string()),
                    "lost" => entry.1.push(f[2].to_string()),
                    other => panic!("bad line {other}"),
                }
            }
        }
        let check = Arbiter::new(&dir, "observer").expect("observer");
        let mut distinct_winners = std::collections::BTreeSet::new();
        assert_eq!(seen.len() as u64, ROUNDS);
        for (g, (won, lost)) in &seen {
            assert_eq!(won.len(), 1, "generation {g}: winners {won:?}");
            assert_eq!(lost.len(), PROCS - 1, "generation {g}");
            assert!(
                lost.iter().all(|w| w == &won[0]),
                "generation {g}: {won:?} vs {lost:?}"
            );
            assert_eq!(check.winner(*g).expect("winner"), Some(won[0].clone()));
            distinct_winners.insert(won[0].clone());
        }
        // Not a correctness requirement, but shows the race was real.
        eprintln!(
            "eight_processes_race: {} distinct winners",
            distinct_winners.len()
        );
        assert!(leftover_temps(&dir).is_empty());
        fs::remove_dir_all(&dir).ok();
        fs::remove_dir_all(&out_dir).ok();
    }
}
