//! Which guest pages changed: KVM's dirty log for what the vCPU wrote, plus
//! vm-memory's bitmap for what the VMM wrote, harvested together and handed
//! to any number of consumers, each with its own cursor (the state digest:
//! pages changed since the last digest; a live snapshot's pre-copy: pages
//! changed since the last round).
//!
//! KVM only logs writes made through the guest's own mappings (and its own
//! writes into guest memory, such as instruction emulation); a write the VMM
//! makes through its host mapping is invisible to it. Every VMM write must
//! therefore go through [`GuestRam`]'s `Bytes` API (`write_slice`,
//! `write_obj`, `store`, ...), which marks the page in the region's
//! `AtomicBitmap`. A write through a raw host pointer (`get_host_address`,
//! `ptr_guard_mut`, `as_ptr`) is not seen by anything here: don't.
//!
//! `KVM_GET_DIRTY_LOG` returns and clears KVM's bitmap in one call (we do not
//! enable `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: see docs/architecture.md), so
//! only one harvester may exist per VM. [`DirtyLog`] is that harvester: each
//! harvest ORs what it found into every cursor's pending set, and a cursor's
//! [`DirtyCursor::take`] returns and clears only its own.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{kvm_dirty_log, kvm_dirty_log__bindgen_ty_1};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use crate::memory::{ram_size, GuestRam, PAGE_SIZE};
use crate::{Error, Result};

vmm_sys_util::ioctl_iow_nr!(
    KVM_GET_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0x42,
    kvm_bindings::kvm_dirty_log
);

/// A set of guest pages, one bit per 4 KiB page from guest-physical 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    pages: usize,
}

impl PageSet {
    /// No page of `pages`.
    pub fn empty(pages: usize) -> Self {
        PageSet {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    /// Every page of `pages`.
    pub fn full(pages: usize) -> Self {
        let mut s = PageSet::empty(pages);
        s.fill();
        s
    }

    /// How many pages the set ranges over.
    pub fn capacity(&self) -> usize {
        self.pages
    }

    /// How many pages are in the set.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Whether every page is in the set.
    pub fn is_full(&self) -> bool {
        self.count() == self.pages
    }

    /// Whether `page` is in the set.
    pub fn contains(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    /// Add `page` (ignored beyond the end).
    pub fn insert(&mut self, page: usize) {
        if page < self.pages {
            self.words[page / 64] |= 1 << (page % 64);
        }
    }

    /// Add every page.
    pub fn fill(&mut self) {
        self.words.fill(u64::MAX);
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last = (1 << tail) - 1;
            }
        }
    }

    /// Add every page of `other`.
    pub fn union_with(&mut self, other: &PageSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Add the pages of a bitmap whose bit 0 is page `first` (a KVM or
    /// vm-memory bitmap of one memory region).
    fn add_bitmap(&mut self, first: usize, bits: &[u64]) {
        if first % 64 == 0 {
            let at = (first / 64).min(self.words.len());
            for (a, b) in self.words[at..].iter_mut().zip(bits) {
                *a |= b;
            }
            return;
        }
        for (i, &w) in bits.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let bit = w.trailing_zeros() as usize;
                self.insert(first + i * 64 + bit);
                w &= w - 1;
            }
        }
    }

    /// The pages in the set, in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(i * 64 + bit)
            })
        })
    }
}

/// What a [`DirtyCursor::take`] found.
#[derive(Debug, Clone)]
pub struct Dirty {
    /// Pages that may have changed since the cursor's last take (a superset
    /// of those that did: a page written with the value it held is in it).
    pub pages: PageSet,
    /// False when tracking is off or failed: `pages` is then every page, and
    /// says nothing about what changed.
    pub exact: bool,
}

/// How pages are being tracked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracking {
    /// KVM's dirty log and the VMM's bitmap: a take returns what changed.
    Logged,
    /// Dirty logging is switched off ([`crate::Machine::set_dirty_logging`]):
    /// every take returns every page.
    Off,
    /// KVM refused to log or to report (the reason): every take returns
    /// every page, for the rest of this VM's life.
    Failed(String),
}

/// One memory slot as KVM knows it.
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u32,
    first_page: usize,
    bytes: u64,
}

struct Inner {
    tracking: Tracking,
    /// Pending pages per live cursor, by cursor id.
    cursors: Vec<(u64, PageSet)>,
    next_id: u64,
    /// Reused buffer for one slot's KVM bitmap.
    kvm_bits: Vec<u64>,
}

/// The one harvester of a VM's dirty pages. Shared (`Arc`) by the machine
/// and by every cursor; usable from any thread, also while the vCPU runs
/// (pre-copy): a page written after a harvest read its bit is in the next.
pub struct DirtyLog {
    /// A duplicate of the VM fd, so the log outlives no one and needs no
    /// borrow of the machine.
    vm: OwnedFd,
    mem: GuestRam,
    slots: Vec<Slot>,
    pages: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog")
            .field("pages", &self.pages)
            .field("tracking", &self.tracking())
            .finish()
    }
}

/// The slot ids [`crate::machine`] registers `mem`'s regions under: the
/// region's index.
pub(crate) fn slot_id(index: usize) -> u32 {
    index as u32
}

impl DirtyLog {
    /// Track `mem` of the VM `vm`, whose regions are registered as slots
    /// [`slot_id`]`(index)`; `logging` says whether they were registered
    /// with `KVM_MEM_LOG_DIRTY_PAGES`.
    pub(crate) fn new(vm: &impl AsRawFd, mem: &GuestRam, logging: bool) -> Result<Arc<Self>> {
        // SAFETY: the fd belongs to the caller's VmFd, open for this call.
        let borrowed = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
        let vm = borrowed
            .try_clone_to_owned()
            .map_err(|source| Error::Host {
                what: "duplicating the VM fd for the dirty log",
                source,
            })?;
        let slots = mem
            .iter()
            .enumerate()
            .map(|(i, r)| Slot {
                id: slot_id(i),
                first_page: (r.start_addr().0 / PAGE_SIZE) as usize,
                bytes: r.len(),
            })
            .collect();
        let pages = (ram_size(mem) / PAGE_SIZE) as usize;
        // SAFETY: sysconf has no preconditions.
        let host_page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let tracking = if host_page != PAGE_SIZE as libc::c_long {
            // Both bitmaps count host pages; ours are 4 KiB.
            Tracking::Failed(format!("host page size is {host_page}, not {PAGE_SIZE}"))
        } else if logging {
            Tracking::Logged
        } else {
            Tracking::Failed("KVM refused KVM_MEM_LOG_DIRTY_PAGES on guest RAM".into())
        };
        if let Tracking::Failed(why) = &tracking {
            tracing::warn!("dirty-page tracking unavailable ({why}): every digest hashes all RAM");
        }
        Ok(Arc::new(DirtyLog {
            vm,
            mem: mem.clone(),
            slots,
            pages,
            inner: Mutex::new(Inner {
                tracking,
                cursors: Vec::new(),
                next_id: 0,
                kvm_bits: Vec::new(),
            }),
        }))
    }

    /// Guest pages tracked (RAM size / 4 KiB).
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The RAM this log tracks.
    pub fn memory(&self) -> &GuestRam {
        &self.mem
    }

    /// How pages are being tracked now.
    pub fn tracking(&self) -> Tracking {
        self.lock().tracking.clone()
    }

    /// A new consumer. Its first [`DirtyCursor::take`] returns every page:
    /// it has seen nothing yet.
    pub fn cursor(self: &Arc<Self>) -> DirtyCursor {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.cursors.push((id, PageSet::full(self.pages)));
        DirtyCursor {
            log: self.clone(),
            id,
        }
    }

    /// Record that dirty logging was switched on or off for every slot.
    /// Whatever was written while it was off is unknown, so every cursor
    /// sees every page as dirty at its next take.
    pub(crate) fn set_logging(&self, on: bool) {
        let mut inner = self.lock();
        if matches!(inner.tracking, Tracking::Failed(_)) {
            return;
        }
        inner.tracking = if on { Tracking::Logged } else { Tracking::Off };
        for (_, pending) in &mut inner.cursors {
            pending.fill();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the sets merely too large
        // or too small by one harvest; too small would be a missed page, so
        // a poisoned lock marks every page dirty.
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                for (_, p) in &mut g.cursors {
                    p.fill();
                }
                self.inner.clear_poison();
                g
            }
        }
    }

    /// Collect KVM's and the VMM's dirty bits since the last harvest into
    /// every cursor's pending set.
    fn harvest(&self, inner: &mut Inner) {
        // The VMM's bitmap is cleared even when KVM's log is not used, so
        // that it does not report stale writes once logging is back on.
        let mut fresh = PageSet::empty(self.pages);
        for region in self.mem.iter() {
            let mapping: &MmapRegion<_> = region;
            let bits = mapping.bitmap().get_and_reset();
            fresh.add_bitmap((region.start_addr().0 / PAGE_SIZE) as usize, &bits);
        }
        if inner.tracking == Tracking::Logged {
            if let Err(e) = self.harvest_kvm(inner, &mut fresh) {
                tracing::error!(
                    "KVM_GET_DIRTY_LOG failed ({e}): dirty-page tracking is off for this VM, \
                     every digest now hashes all RAM"
                );
                inner.tracking = Tracking::Failed(format!("KVM_GET_DIRTY_LOG: {e}"));
            }
        }
        if inner.tracking != Tracking::Logged {
            fresh.fill();
        }
        for (_, pending) in &mut inner.cursors {
            pending.union_with(&fresh);
        }
    }

    fn harvest_kvm(&self, inner: &mut Inner, into: &mut PageSet) -> std::io::Result<()> {
        for slot in &self.slots {
            let words = (slot.bytes / PAGE_SIZE).div_ceil(64) as usize;
            inner.kvm_bits.clear();
            inner.kvm_bits.resize(words, 0);
            let log = kvm_dirty_log {
                slot: slot.id,
                padding1: 0,
                __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: inner.kvm_bits.as_mut_ptr().cast(),
                },
            };
            // SAFETY: KVM_GET_DIRTY_LOG writes one bit per page of the slot
            // into `dirty_bitmap`, which has room for that (rounded up to
            // whole u64s, as KVM writes); the fd is our VM's.
            let rc =
                unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.vm, KVM_GET_DIRTY_LOG(), &log) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            into.add_bitmap(slot.first_page, &inner.kvm_bits);
        }
        Ok(())
    }
}

/// One consumer's view of the dirty log: what changed since its own last
/// [`take`](DirtyCursor::take), independent of every other cursor. Dropping
/// it unregisters it.
pub struct DirtyCursor {
    log: Arc<DirtyLog>,
    id: u64,
}

impl std::fmt::Debug for DirtyCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyCursor").field("id", &self.id).finish()
    }
}

impl DirtyCursor {
    /// Pages written since this cursor's last take (every page at its
    /// first), by the vCPU or the VMM, and clear them for this cursor only.
    pub fn take(&mut self) -> Dirty {
        let mut inner = self.log.lock();
        self.log.harvest(&mut inner);
        let exact = inner.tracking == Tracking::Logged;
        let pages = self.log.pages;
        let taken = inner
            .cursors
            .iter_mut()
            .find(|(id, _)| *id == self.id)
            .map(|(_, p)| std::mem::replace(p, PageSet::empty(pages)))
            // Unreachable: a live cursor is registered. Everything is the
            // safe answer.
            .unwrap_or_else(|| PageSet::full(pages));
        Dirty {
            pages: taken,
            exact,
        }
    }

    /// Mark every page dirty for this cursor (its consumer lost track, or
    /// wants to start over).
    pub fn reset(&mut self) {
        let mut inner = self.log.lock();
        if let Some((_, p)) = inner.cursors.iter_mut().find(|(id, _)| *id == self.id) {
            p.fill();
        }
    }

    /// The log this cursor reads.
    pub fn log(&self) -> &Arc<DirtyLog> {
        &self.log
    }
}

impl Drop for DirtyCursor {
    fn drop(&mut self) {
        let mut inner = self.log.lock();
        inner.cursors.retain(|(id, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sets_iterate_union_and_fill() {
        let mut a = PageSet::empty(130);
        assert!(a.is_empty());
        a.insert(0);
        a.insert(64);
        a.insert(129);
        a.insert(130); // beyond the end: ignored
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        let mut b = PageSet::empty(130);
        b.insert(1);
        b.union_with(&a);
        assert_eq!(b.count(), 4);
        assert!(b.contains(1) && b.contains(129) && !b.contains(2));
        let f = PageSet::full(130);
        assert_eq!(f.count(), 130);
        assert!(f.is_full());
        assert_eq!(f.iter().last(), Some(129));
    }

    #[test]
    fn bitmaps_of_unaligned_regions_land_on_their_pages() {
        let mut s = PageSet::empty(200);
        s.add_bitmap(3, &[0b101, 1]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 5, 67]);
        let mut t = PageSet::empty(200);
        t.add_bitmap(64, &[0b11]);
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![64, 65]);
    }
}
