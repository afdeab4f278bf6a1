//! A digest of guest state (RAM + registers), compared between the primary
//! and its replay to catch divergence.
//!
//! Two kinds (the log header names which, [`DigestKind`]):
//! - `Blake3RegsRam`: BLAKE3 over the registers, then all of RAM. Costs a
//!   pass over all of RAM at every digest.
//! - `Blake3RegsPageTree`: a hash tree over 4 KiB pages, of which only the
//!   pages written since the last digest ([`crate::dirty`]) are hashed
//!   again. Its value depends only on RAM and the registers, never on which
//!   pages were dirty, so a primary and a replayer with different write
//!   histories agree whenever their states do.
//!
//! The tree's leaves are XXH3-128 page hashes, not BLAKE3: BLAKE3 of a lone
//! 4 KiB page cannot use its SIMD width (it parallelises across 1 KiB
//! chunks) and runs at about 1 GB/s here, several times slower than XXH3.
//! A leaf only has to tell accidentally different pages apart (a replay
//! that diverged), which a 128-bit hash of XXH3's quality does; the groups
//! and the root are BLAKE3.
//!
//! The incremental digest trusts the dirty log. As a safety net every digest
//! also rehashes a rotating window of the pages the log called clean and
//! compares them with the cache; a mismatch (a write nothing tracked) is
//! logged as an error and the digest hashes all pages from then on.

use std::ops::Range;
use std::time::{Duration, Instant};

pub use ftlog::DigestKind;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::dirty::{DirtyCursor, DirtyLog, PageSet};
use crate::machine::Machine;
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::{Error, Result};

/// 32-byte BLAKE3 digest of guest state.
pub type StateDigest = [u8; 32];

/// The digest a new VM computes ([`Machine::set_digest_kind`] changes it).
pub const DEFAULT_KIND: DigestKind = DigestKind::Blake3RegsPageTree;

/// Pages per group in the page tree: 2 MiB of RAM, 8 KiB of page hashes.
pub const GROUP_PAGES: usize = 512;

/// One page's hash in the tree: XXH3-128, little-endian.
type Leaf = [u8; 16];

/// Pages the log called clean that each incremental digest rehashes to check
/// the cache: 1 MiB, so a 64 MiB guest is checked through every 64 digests.
pub const SCRUB_PAGES: usize = 256;

/// What digests have cost so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DigestStats {
    /// Digests computed.
    pub digests: u64,
    /// Pages hashed because they were dirty (or all pages, for a full digest).
    pub pages_hashed: u64,
    /// Clean pages rehashed to check the cache.
    pub pages_scrubbed: u64,
    /// Pages whose content changed although the dirty log called them clean.
    pub stale_pages: u64,
    /// Wall-clock time spent computing digests.
    pub time: Duration,
    /// CPU time of the computing thread spent on digests (what they cost
    /// the VM process, whatever else shares the core).
    pub cpu: Duration,
    /// Of `cpu`, the part spent harvesting the dirty log.
    pub harvest_cpu: Duration,
}

fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `t`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The page hashes of the tree digest.
struct PageTree {
    leaves: Vec<Leaf>,
    groups: Vec<[u8; 32]>,
}

/// The digest state a machine keeps: its kind, its cursor into the dirty
/// log, and the page-hash cache.
pub struct Digester {
    kind: DigestKind,
    cursor: DirtyCursor,
    tree: Option<PageTree>,
    scrub_at: usize,
    /// A scrub found a stale page: the dirty log cannot be trusted.
    distrust: bool,
    /// `/proc/self/pagemap`, so the scrub need not fault in untouched RAM.
    pagemap: Option<std::fs::File>,
    stats: DigestStats,
}

/// Guest RAM as host slices by page number.
struct RamView<'a> {
    regions: Vec<(usize, &'a [u8])>,
}

impl<'a> RamView<'a> {
    fn new(mem: &'a GuestRam) -> Result<Self> {
        let mut regions = Vec::new();
        for r in mem.iter() {
            let host = mem
                .get_host_address(r.start_addr())
                .map_err(|e| Error::Memory(e.to_string()))?;
            // SAFETY: the region is mapped for `len` bytes for the VM's
            // lifetime (the view borrows `mem`, which keeps it mapped), and
            // every writer of guest RAM (the vCPU, and the VMM on the vCPU
            // thread) is stopped while a digest runs on the vCPU thread.
            let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, r.len() as usize) };
            regions.push(((r.start_addr().0 / PAGE_SIZE) as usize, bytes));
        }
        Ok(RamView { regions })
    }

    fn page(&self, page: usize) -> &'a [u8] {
        let p = PAGE_SIZE as usize;
        self.regions
            .iter()
            .find(|(first, b)| page >= *first && page < first + b.len() / p)
            .map(|(first, b)| &b[(page - first) * p..(page - first + 1) * p])
            .unwrap_or(&[])
    }

    fn all(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.regions.iter().map(|(_, b)| *b)
    }

    /// Which of `pages` the host never gave a page frame to, from
    /// `/proc/self/pagemap`: neither present nor swapped out, so still
    /// zero-fill-on-demand and certainly all zero, and reading them would
    /// only fault each in. None where the pagemap cannot be read.
    fn untouched(&self, pagemap: &std::fs::File, pages: Range<usize>) -> Option<PageSet> {
        use std::os::unix::fs::FileExt;
        const PRESENT_OR_SWAPPED: u64 = 3 << 62;
        let p = PAGE_SIZE as usize;
        let mut set = PageSet::empty(pages.end);
        for (first, bytes) in &self.regions {
            let from = pages.start.max(*first);
            let to = pages.end.min(first + bytes.len() / p);
            if from >= to {
                continue;
            }
            let vpage = (bytes.as_ptr() as usize + (from - first) * p) / p;
            let mut entries = vec![0u8; (to - from) * 8];
            pagemap.read_exact_at(&mut entries, vpage as u64 * 8).ok()?;
            for (i, e) in entries.chunks_exact(8).enumerate() {
                let mut v = [0u8; 8];
                v.copy_from_slice(e);
                if u64::from_le_bytes(v) & PRESENT_OR_SWAPPED == 0 {
                    set.insert(from + i);
                }
            }
        }
        Some(set)
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    // Whole 64-byte blocks OR-ed together vectorise; most non-zero pages
    // differ from zero within their first block.
    bytes
        .chunks(64)
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// The leaf of a zero page.
fn zero_leaf() -> Leaf {
    static ZERO: std::sync::OnceLock<Leaf> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| xxhash_rust::xxh3::xxh3_128(&[0u8; PAGE_SIZE as usize]).to_le_bytes())
}

fn hash_page(bytes: &[u8]) -> Leaf {
    // Fresh RAM is mostly zero pages: their hash is known.
    if is_zero(bytes) {
        return zero_leaf();
    }
    xxhash_rust::xxh3::xxh3_128(bytes).to_le_bytes()
}

fn hash_group(leaves: &[Leaf], g: usize) -> [u8; 32] {
    let end = ((g + 1) * GROUP_PAGES).min(leaves.len());
    let mut h = blake3::Hasher::new();
    for leaf in &leaves[g * GROUP_PAGES..end] {
        h.update(leaf);
    }
    *h.finalize().as_bytes()
}

impl PageTree {
    /// The tree of `pages` zero pages, without reading any RAM.
    fn zero(pages: usize) -> Self {
        let leaves = vec![zero_leaf(); pages];
        let full = hash_group(&leaves, 0);
        let groups = (0..pages.div_ceil(GROUP_PAGES))
            .map(|g| {
                if (g + 1) * GROUP_PAGES <= pages {
                    full
                } else {
                    hash_group(&leaves, g)
                }
            })
            .collect();
        PageTree { leaves, groups }
    }

    fn build(ram: &RamView<'_>, pages: usize) -> Self {
        let leaves: Vec<Leaf> = (0..pages).map(|p| hash_page(ram.page(p))).collect();
        let groups = (0..pages.div_ceil(GROUP_PAGES))
            .map(|g| hash_group(&leaves, g))
            .collect();
        PageTree { leaves, groups }
    }

    /// Rehash `pages` and the groups holding them.
    fn update(&mut self, ram: &RamView<'_>, pages: &PageSet) {
        let mut touched = PageSet::empty(self.groups.len());
        for p in pages.iter() {
            self.leaves[p] = hash_page(ram.page(p));
            touched.insert(p / GROUP_PAGES);
        }
        for g in touched.iter() {
            self.groups[g] = hash_group(&self.leaves, g);
        }
    }

    fn root(&self, regs: &[u64]) -> StateDigest {
        let mut h = blake3::Hasher::new();
        for v in regs {
            h.update(&v.to_le_bytes());
        }
        h.update(&(self.leaves.len() as u64).to_le_bytes());
        for g in &self.groups {
            h.update(g);
        }
        *h.finalize().as_bytes()
    }
}

impl Digester {
    /// Digests of `kind` over the RAM `log` tracks, which must still be all
    /// zero, as a new VM's is: the cache then starts as the all-zero tree
    /// and the first digest hashes only what was written since (the kernel,
    /// a restored snapshot), without reading (and so faulting in) the RAM
    /// nobody touched. Were RAM not zero, the scrub would find the pages.
    pub(crate) fn for_zeroed_ram(kind: DigestKind, log: &std::sync::Arc<DirtyLog>) -> Self {
        let mut cursor = log.cursor();
        cursor.take();
        Digester {
            kind,
            cursor,
            tree: Some(PageTree::zero(log.pages())),
            scrub_at: 0,
            distrust: false,
            pagemap: std::fs::File::open("/proc/self/pagemap").ok(),
            stats: DigestStats::default(),
        }
    }

    fn full(&self, regs: &[u64]) -> Result<StateDigest> {
        let ram = RamView::new(self.cursor.log().memory())?;
        let mut h = blake3::Hasher::new();
        for v in regs {
            h.update(&v.to_le_bytes());
        }
        for bytes in ram.all() {
            h.update(bytes);
        }
        Ok(*h.finalize().as_bytes())
    }

    fn incremental(&mut self, regs: &[u64]) -> Result<StateDigest> {
        let log = self.cursor.log().clone();
        let ram = RamView::new(log.memory())?;
        let pages = log.pages();
        let t = thread_cpu();
        let mut dirty = self.cursor.take().pages;
        self.stats.harvest_cpu += thread_cpu().saturating_sub(t);
        if self.distrust {
            dirty.fill();
        }
        match &mut self.tree {
            Some(tree) => tree.update(&ram, &dirty),
            None => self.tree = Some(PageTree::build(&ram, pages)),
        }
        self.stats.pages_hashed += dirty.count() as u64;
        if !dirty.is_full() {
            self.scrub(&ram, &dirty);
        }
        let tree = self
            .tree
            .as_ref()
            .ok_or_else(|| Error::Memory("the page-hash cache was not built".into()))?;
        Ok(tree.root(regs))
    }

    /// Rehash the next window of clean pages and compare with the cache.
    fn scrub(&mut self, ram: &RamView<'_>, dirty: &PageSet) {
        let Some(tree) = &mut self.tree else { return };
        let pages = tree.leaves.len();
        let window = self.scrub_at..(self.scrub_at + SCRUB_PAGES).min(pages);
        self.scrub_at = window.end % pages.max(1);
        let untouched = self
            .pagemap
            .as_ref()
            .and_then(|f| ram.untouched(f, window.clone()));
        let mut stale = PageSet::empty(pages);
        for p in window {
            if dirty.contains(p) {
                continue;
            }
            self.stats.pages_scrubbed += 1;
            let now = match &untouched {
                Some(u) if u.contains(p) => zero_leaf(),
                _ => hash_page(ram.page(p)),
            };
            if now != tree.leaves[p] {
                stale.insert(p);
            }
        }
        if stale.is_empty() {
            return;
        }
        let n = stale.count();
        self.stats.stale_pages += n as u64;
        tracing::error!(
            pages = ?stale.iter().take(8).collect::<Vec<_>>(),
            "{n} guest page(s) changed without being marked dirty (a write that bypassed \
             the dirty log): digests hash all RAM from now on"
        );
        tree.update(ram, &stale);
        self.distrust = true;
    }
}

/// The registers a digest covers, in digest order.
fn digest_regs(m: &mut Machine) -> Result<[u64; 23]> {
    let r = m.regs()?;
    let s = m.vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    Ok([
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
    ])
}

impl Machine {
    /// Digest of RAM and the general and control registers, of this VM's
    /// [`DigestKind`], taken while the vCPU is stopped.
    pub fn digest(&mut self) -> Result<StateDigest> {
        let regs = digest_regs(self)?;
        let (t, cpu) = (Instant::now(), thread_cpu());
        let d = self.digester_mut();
        let value = match d.kind {
            DigestKind::Blake3RegsRam => {
                d.stats.pages_hashed += d.cursor.log().pages() as u64;
                d.full(&regs)?
            }
            DigestKind::Blake3RegsPageTree => d.incremental(&regs)?,
        };
        d.stats.digests += 1;
        d.stats.time += t.elapsed();
        d.stats.cpu += thread_cpu().saturating_sub(cpu);
        Ok(value)
    }

    /// The value [`Machine::digest`] must have, computed from all of RAM
    /// without the page-hash cache or the dirty log (for checks and tests).
    pub fn rescan_digest(&mut self) -> Result<StateDigest> {
        let regs = digest_regs(self)?;
        let d = self.digester();
        let log = d.cursor.log();
        match d.kind {
            DigestKind::Blake3RegsRam => d.full(&regs),
            DigestKind::Blake3RegsPageTree => {
                let ram = RamView::new(log.memory())?;
                Ok(PageTree::build(&ram, log.pages()).root(&regs))
            }
        }
    }

    /// The `Blake3RegsRam` digest whatever this VM's kind (a snapshot's
    /// digest, a log of format version 2).
    pub fn full_digest(&mut self) -> Result<StateDigest> {
        let regs = digest_regs(self)?;
        self.digester().full(&regs)
    }

    /// The kind [`Machine::digest`] computes.
    pub fn digest_kind(&self) -> DigestKind {
        self.digester().kind
    }

    /// Compute digests of `kind` from now on (a replayer follows its log's
    /// header).
    pub fn set_digest_kind(&mut self, kind: DigestKind) {
        self.digester_mut().kind = kind;
    }

    /// What digests have cost so far.
    pub fn digest_stats(&self) -> DigestStats {
        self.digester().stats
    }
}

/// BLAKE3 of a kernel image, as a log header records it.
pub fn image_digest(image: &[u8]) -> StateDigest {
    *blake3::hash(image).as_bytes()
}
