//! A digest of guest state (RAM + registers), compared between the primary
//! and its replay to catch divergence.
//!
//! Two kinds (the log header names which, [`DigestKind`]):
//! - `Blake3RegsRam`: BLAKE3 over the registers, then all of RAM. Costs a
//!   pass over all of RAM at every digest.
//! - `Blake3RegsPageTree`: a two-level hash tree over 4 KiB pages, of which
//!   only the pages written since the last digest ([`crate::dirty`]) are
//!   hashed again. Its value depends only on RAM and the registers, never on
//!   which pages were dirty, so a primary and a replayer with different
//!   write histories agree whenever their states do.
//!
//! The incremental digest trusts the dirty log. As a safety net every digest
//! also rehashes a rotating window of the pages the log called clean and
//! compares them with the cache; a mismatch (a write nothing tracked) is
//! logged as an error and the digest hashes all pages from then on.

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

/// Pages per group in the page tree: 2 MiB of RAM, 16 KiB of page hashes.
pub const GROUP_PAGES: usize = 512;

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
    /// Time spent computing digests.
    pub time: Duration,
}

/// The page hashes of the tree digest.
struct PageTree {
    leaves: Vec<[u8; 32]>,
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
}

fn hash_page(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

fn hash_group(leaves: &[[u8; 32]], g: usize) -> [u8; 32] {
    let end = ((g + 1) * GROUP_PAGES).min(leaves.len());
    let mut h = blake3::Hasher::new();
    for leaf in &leaves[g * GROUP_PAGES..end] {
        h.update(leaf);
    }
    *h.finalize().as_bytes()
}

impl PageTree {
    fn build(ram: &RamView<'_>, pages: usize) -> Self {
        let leaves: Vec<[u8; 32]> = (0..pages).map(|p| hash_page(ram.page(p))).collect();
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
    /// Digests of `kind` over the RAM `log` tracks.
    pub(crate) fn new(kind: DigestKind, log: &std::sync::Arc<DirtyLog>) -> Self {
        Digester {
            kind,
            cursor: log.cursor(),
            tree: None,
            scrub_at: 0,
            distrust: false,
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
        let mut dirty = self.cursor.take().pages;
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

    /// Rehash a window of clean pages and compare with the cache.
    fn scrub(&mut self, ram: &RamView<'_>, dirty: &PageSet) {
        let Some(tree) = &mut self.tree else { return };
        let pages = tree.leaves.len();
        let mut stale = PageSet::empty(pages);
        for i in 0..SCRUB_PAGES.min(pages) {
            let p = (self.scrub_at + i) % pages;
            if dirty.contains(p) {
                continue;
            }
            self.stats.pages_scrubbed += 1;
            if hash_page(ram.page(p)) != tree.leaves[p] {
                stale.insert(p);
            }
        }
        self.scrub_at = (self.scrub_at + SCRUB_PAGES) % pages.max(1);
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
        let t = Instant::now();
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
