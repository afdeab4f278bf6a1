//! Dirty-page tracking and the incremental state digest: KVM's dirty log
//! plus the VMM's own writes report every page that changed (checked against
//! a full comparison of RAM after every exit), two cursors see the same
//! changes independently, the incremental digest always equals one computed
//! from scratch, it is a function of the state alone (the same state reached
//! with different write histories has the same digest), and a replay that
//! differs from its recording by one byte of RAM is caught at the next
//! digest.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{deterministic, kvm_or_skip};
use ftlog::{DigestKind, EntryKind, LogWriter};
use ftvmm::console::Capture;
use ftvmm::guest::GUEST_ELF;
use ftvmm::testkit::{page_sweeper, page_sweeper_area, page_writer, Hooked, PAGE_WRITER_AREA};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::digest::SCRUB_PAGES;
use vmm::dirty::{DirtyCursor, Tracking};
use vmm::memory::PAGE_SIZE;
use vmm::record::{MemorySink, Recorder};
use vmm::replay::{MemorySource, Replayer};
use vmm::{Error, Flow, Live, Machine, MachineConfig, Observer, RunEnd};

fn ram(m: &Machine) -> Vec<u8> {
    let mut b = vec![0u8; vmm::memory::ram_size(m.memory()) as usize];
    m.memory().read_slice(&mut b, GuestAddress(0)).unwrap();
    b
}

fn changed_pages(a: &[u8], b: &[u8]) -> Vec<usize> {
    let p = PAGE_SIZE as usize;
    a.chunks(p)
        .zip(b.chunks(p))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}

/// After every exit: every page whose content changed since the previous
/// exit is in the dirty log (checked for a cursor taken at every exit and
/// for one taken every seventh), and the incremental digest equals the one
/// computed from all of RAM.
struct Checker {
    every: DirtyCursor,
    every_prev: Vec<u8>,
    seventh: DirtyCursor,
    seventh_prev: Vec<u8>,
    exits: u64,
    changed: usize,
    most_dirty: usize,
}

impl Checker {
    fn new(m: &Machine) -> Self {
        let mut every = m.dirty_log().cursor();
        let mut seventh = m.dirty_log().cursor();
        // A new cursor has seen nothing: its first take is everything.
        assert!(every.take().pages.is_full());
        assert!(seventh.take().pages.is_full());
        Checker {
            every,
            every_prev: ram(m),
            seventh,
            seventh_prev: ram(m),
            exits: 0,
            changed: 0,
            most_dirty: 0,
        }
    }
}

fn check_cursor(c: &mut DirtyCursor, prev: &mut [u8], now: &[u8], at: u64) -> (usize, usize) {
    let dirty = c.take();
    assert!(dirty.exact, "tracking is {:?}", c.log().tracking());
    let changed = changed_pages(prev, now);
    for p in &changed {
        assert!(
            dirty.pages.contains(*p),
            "page {p} ({:#x}) changed by exit {at} but the dirty log does not have it \
             ({} pages changed, {} reported)",
            *p as u64 * PAGE_SIZE,
            changed.len(),
            dirty.pages.count()
        );
    }
    prev.copy_from_slice(now);
    (changed.len(), dirty.pages.count())
}

impl Observer for Checker {
    fn at_point(&mut self, m: &mut Machine) -> vmm::Result<Flow> {
        self.exits += 1;
        let now = ram(m);
        let (changed, dirty) =
            check_cursor(&mut self.every, &mut self.every_prev, &now, self.exits);
        self.changed += changed;
        self.most_dirty = self.most_dirty.max(dirty);
        if self.exits % 7 == 0 {
            check_cursor(&mut self.seventh, &mut self.seventh_prev, &now, self.exits);
        }
        assert_eq!(
            m.digest()?,
            m.rescan_digest()?,
            "incremental digest differs from a rescan at exit {}",
            self.exits
        );
        Live.at_point(m)
    }
}

fn run_checked(mem_mib: u64, image: &[u8]) -> Checker {
    let cfg = MachineConfig::new(mem_mib, "", Box::new(std::io::sink()));
    let mut m = Machine::new(cfg, image).unwrap();
    assert_eq!(m.dirty_log().tracking(), Tracking::Logged);
    let mut c = Checker::new(&m);
    assert_eq!(m.run(&mut c).unwrap(), RunEnd::PowerOff(0));
    // The writes after the last point, up to the power-off, too.
    let now = ram(&m);
    let (changed, _) = check_cursor(&mut c.every, &mut c.every_prev, &now, c.exits + 1);
    c.changed += changed;
    c
}

fn dirty_log_is_complete(user: bool) {
    let exits = 300;
    let c = run_checked(4, &page_writer(exits, user));
    assert!(c.exits > u64::from(exits), "only {} exits", c.exits);
    // The guest really wrote many pages, and the log reported about what it
    // wrote, not everything (32 qwords and a page-crossing store a round).
    let changed = c.changed;
    assert!(changed > 4 * exits as usize, "only {changed} page changes");
    assert!(c.most_dirty <= 40, "a take reported {} pages", c.most_dirty);
    let area = (PAGE_WRITER_AREA.end - PAGE_WRITER_AREA.start) / PAGE_SIZE;
    assert!((c.most_dirty as u64) < area);
}

#[test]
fn kvm_dirty_log_has_every_page_of_repeated_sweeps_at_cpl3() {
    if !kvm_or_skip() {
        return;
    }
    // Every page of 11 MiB rewritten five times, 512 pages between exits:
    // each page is write-protected again by every harvest in between.
    let sweeps = 5;
    let c = run_checked(16, &page_sweeper(16, sweeps));
    let area = page_sweeper_area(16);
    let pages = ((area.end - area.start) / PAGE_SIZE) as usize;
    let changed = c.changed;
    assert!(
        changed >= pages * sweeps as usize,
        "only {changed} page changes"
    );
    // At most a sweep's last 1 MiB and the next one's first 2 MiB.
    assert!(
        c.most_dirty <= 768 + 8,
        "a take reported {} pages",
        c.most_dirty
    );
}

#[test]
fn kvm_dirty_log_has_every_page_written_at_cpl0() {
    if !kvm_or_skip() {
        return;
    }
    dirty_log_is_complete(false);
}

#[test]
fn kvm_dirty_log_has_every_page_written_at_cpl3() {
    if !kvm_or_skip() {
        return;
    }
    dirty_log_is_complete(true);
}

#[test]
fn vmm_writes_are_tracked_and_the_digest_is_a_function_of_the_state() {
    if !kvm_or_skip() {
        return;
    }
    let cfg = MachineConfig::new(8, "", Box::new(std::io::sink()));
    let mut m = Machine::new(cfg, &page_writer(50, false)).unwrap();
    assert_eq!(m.run(&mut Live).unwrap(), RunEnd::PowerOff(0));
    let before = m.digest().unwrap();
    let mut cursor = m.dirty_log().cursor();
    cursor.take();
    let addr = GuestAddress(0x70_1234);
    let old: u8 = m.memory().read_obj(addr).unwrap();
    m.memory().write_obj(old ^ 1, addr).unwrap();
    let dirty = cursor.take().pages;
    assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![0x701]);
    let flipped = m.digest().unwrap();
    assert_ne!(flipped, before, "a one-byte change left the digest alone");
    assert_eq!(flipped, m.rescan_digest().unwrap());
    // Back to the old byte: back to the old digest, whatever the history.
    m.memory().write_obj(old, addr).unwrap();
    assert_eq!(m.digest().unwrap(), before);
    assert_eq!(m.digest_stats().stale_pages, 0);
}

fn untracked_write_is_found(addr: u64) {
    let cfg = MachineConfig::new(8, "", Box::new(std::io::sink()));
    let mut m = Machine::new(cfg, &page_writer(10, false)).unwrap();
    assert_eq!(m.run(&mut Live).unwrap(), RunEnd::PowerOff(0));
    let before = m.digest().unwrap();
    let host = m.memory().get_host_address(GuestAddress(addr)).unwrap();
    // SAFETY: the address is inside guest RAM, which stays mapped while `m`
    // lives; the vCPU is stopped. This write bypasses every tracker on purpose.
    unsafe { *host ^= 0x80 };
    let pages = (vmm::memory::ram_size(m.memory()) / PAGE_SIZE) as usize;
    let mut found = false;
    for _ in 0..=pages / SCRUB_PAGES {
        let d = m.digest().unwrap();
        if m.digest_stats().stale_pages > 0 {
            found = true;
            assert_ne!(d, before);
            break;
        }
        assert_eq!(
            d, before,
            "the stale cache should hide the write until found"
        );
    }
    assert!(
        found,
        "a full scrub cycle missed the untracked write at {addr:#x}"
    );
    assert_eq!(m.digest_stats().stale_pages, 1);
    assert_eq!(m.digest().unwrap(), m.rescan_digest().unwrap());
    let hashed = m.digest_stats().pages_hashed;
    m.digest().unwrap();
    assert_eq!(
        m.digest_stats().pages_hashed - hashed,
        pages as u64,
        "after a stale page every digest hashes all pages"
    );
}

#[test]
fn an_untracked_write_is_found_by_the_scrub_and_digests_fall_back_to_all_pages() {
    if !kvm_or_skip() {
        return;
    }
    // In a page the guest wrote, and in one nobody had touched (which the
    // scrub otherwise knows to be zero from the host's page map).
    untracked_write_is_found(0x30_0000);
    untracked_write_is_found(0x70_0000);
}

#[test]
fn digests_agree_with_logging_off_and_after_a_snapshot_restore() {
    if !kvm_or_skip() {
        return;
    }
    let out = Capture::new();
    let cmd = "hz=500 ticks=200 digest_every=50";
    let mut a = Machine::new(deterministic(cmd, &out), GUEST_ELF).unwrap();
    struct PauseAfter(u64);
    impl Observer for PauseAfter {
        fn at_point(&mut self, m: &mut Machine) -> vmm::Result<Flow> {
            if m.exit_count() >= self.0 {
                return Ok(Flow::Pause);
            }
            // Digests along the way give the cache a history.
            if m.exit_count() % 97 == 0 {
                m.digest()?;
            }
            Live.at_point(m)
        }
    }
    assert_eq!(a.run(&mut PauseAfter(300)).unwrap(), RunEnd::Paused);
    let snap = a.snapshot().unwrap();
    let at_snapshot = a.digest().unwrap();
    assert_eq!(at_snapshot, a.rescan_digest().unwrap());
    // The restored VM wrote all of RAM through the VMM; its digest has no
    // history at all, and still agrees.
    let out_b = Capture::new();
    let mut b = Machine::restore(&snap, deterministic(cmd, &out_b)).unwrap();
    assert_eq!(b.digest().unwrap(), at_snapshot);
    // A third run without dirty logging (every digest hashes everything).
    let mut c = Machine::restore(&snap, deterministic(cmd, &Capture::new())).unwrap();
    c.set_dirty_logging(false).unwrap();
    assert_eq!(c.dirty_log().tracking(), Tracking::Off);
    let ends: Vec<_> = [&mut a, &mut b, &mut c]
        .into_iter()
        .map(|m| {
            let end = m.run(&mut PauseAfter(u64::MAX)).unwrap();
            (end, m.digest().unwrap(), m.rescan_digest().unwrap())
        })
        .collect();
    assert_eq!(ends[0].0, RunEnd::PowerOff(0));
    for e in &ends {
        assert_eq!(e.1, e.2, "incremental and rescanned digests differ");
        assert_eq!(e, &ends[0], "same state, other history, other digest");
    }
    c.set_dirty_logging(true).unwrap();
    assert_eq!(c.digest().unwrap(), ends[0].1);
}

#[test]
fn a_received_frame_is_tracked() {
    if !kvm_or_skip() {
        return;
    }
    let out = Capture::new();
    let cmd = "net=1 ip=10.99.0.2/24 hz=100 ticks=60 digest_every=0";
    let mut m = Machine::new(deterministic(cmd, &out), GUEST_ELF).unwrap();
    ftvmm::net::attach(&mut m, [0x52, 0x54, 0, 0x12, 0x34, 0x56]).unwrap();
    for n in 0..6u8 {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x88, 0xb5]); // local experimental type
        f.resize(60, n);
        m.host_inputs().push_frame(f);
    }
    /// Applies inputs like `Live`; after each frame, checks the digest.
    struct FrameChecker {
        frames: usize,
        cursor: DirtyCursor,
    }
    impl Observer for FrameChecker {
        fn at_point(&mut self, m: &mut Machine) -> vmm::Result<Flow> {
            for input in m.poll_host_inputs() {
                let frame = matches!(input, vmm::inputs::Input::Frame(_));
                self.cursor.take();
                let applied = m.apply(&input);
                if frame && applied != vmm::inputs::Input::Frame(Vec::new()) {
                    self.frames += 1;
                    // The device wrote the frame and the used ring: the
                    // VMM's writes, which KVM does not see.
                    assert!(!self.cursor.take().pages.is_empty());
                    assert_eq!(m.digest()?, m.rescan_digest()?);
                }
            }
            Ok(Flow::Continue)
        }
    }
    let mut obs = FrameChecker {
        frames: 0,
        cursor: m.dirty_log().cursor(),
    };
    assert_eq!(
        m.run(&mut obs).unwrap(),
        RunEnd::PowerOff(0),
        "{}",
        out.text()
    );
    assert!(obs.frames >= 3, "only {} frames delivered", obs.frames);
}

fn record(cmd: &str, kind: DigestKind) -> (Vec<ftlog::LogEntry>, MachineConfig) {
    let mut m = Machine::new(deterministic(cmd, &Capture::new()), GUEST_ELF).unwrap();
    m.set_digest_kind(kind);
    let mut rec = Recorder::new(MemorySink::default(), Some(Duration::from_millis(5)));
    let end = m.run(&mut rec).unwrap();
    rec.finish(&mut m, end).unwrap();
    (rec.into_sink().entries, deterministic(cmd, &Capture::new()))
}

fn one_byte_flip_is_caught_at_the_next_digest(kind: DigestKind) {
    let cmd = "hz=500 ticks=150 digest_every=50";
    let (entries, cfg) = record(cmd, kind);
    let digests: Vec<&ftlog::LogEntry> = entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Digest { .. }))
        .collect();
    assert!(digests.len() >= 4, "only {} digests logged", digests.len());
    // Flip between the second and third digest, in RAM the guest never
    // touches (the top of its 32 MiB): only the digest can notice.
    let at = digests[1].point.count + 1;
    let expected = entries
        .iter()
        .find(|e| matches!(e.kind, EntryKind::Digest { .. }) && e.point.count >= at)
        .unwrap()
        .seq;
    let mut m = Machine::new(cfg, GUEST_ELF).unwrap();
    m.set_digest_kind(kind);
    let addr = GuestAddress(0x1f0_0abc);
    let mut flipped = false;
    let mut obs = Hooked {
        inner: Replayer::new(MemorySource::new(entries)),
        hook: |m: &mut Machine| {
            if !flipped && m.exit_count() >= at {
                let b: u8 = m.memory().read_obj(addr).unwrap();
                m.memory().write_obj(b ^ 0x01, addr).unwrap();
                flipped = true;
            }
            Ok(())
        },
    };
    let err = m
        .run(&mut obs)
        .and_then(|end| obs.inner.finish(&mut m, end))
        .unwrap_err();
    let stats = obs.inner.stats();
    drop(obs);
    assert!(flipped);
    let msg = err.to_string();
    assert!(matches!(err, Error::Divergence(_)), "{msg}");
    assert!(
        msg.contains("state digest differs") && msg.contains(&format!("entry #{expected} ")),
        "expected a digest mismatch at entry #{expected}: {msg}"
    );
    assert_eq!(stats.digests_checked, 2, "{msg}");
}

#[test]
fn a_one_byte_flip_in_replayed_ram_is_caught_at_the_next_digest() {
    if !kvm_or_skip() {
        return;
    }
    one_byte_flip_is_caught_at_the_next_digest(DigestKind::Blake3RegsPageTree);
    one_byte_flip_is_caught_at_the_next_digest(DigestKind::Blake3RegsRam);
}

/// A log whose digests are of all RAM (the digest version 2 logs had)
/// still replays. (Logs of format version 2 and 3 themselves are refused
/// since format 4: their reads are not whole host samples.)
#[test]
fn a_log_with_full_ram_digests_still_replays() {
    if !kvm_or_skip() {
        return;
    }
    let cmd = "hz=500 ticks=100 digest_every=50";
    let (entries, cfg) = record(cmd, DigestKind::Blake3RegsRam);
    let header = ftlog::LogHeader {
        backend: ftlog::ExecBackend::Exits,
        image_digest: vmm::digest::image_digest(GUEST_ELF),
        mem_mib: cfg.mem_mib as u32,
        cmdline: cmd.into(),
        state_digest: DigestKind::Blake3RegsRam,
        digest_interval_ms: Some(5),
        net_mac: None,
        cpuid: vmm::arch::cpuid::host_guest_table().unwrap(),
        initrd_digest: None,
    };
    let mut w = LogWriter::new(Vec::new(), &header).unwrap();
    for e in &entries {
        w.push(e.point, e.kind.clone()).unwrap();
    }
    let bytes = w.into_inner().unwrap();
    // ftvmm replay uses wall-clock devices; this guest's inputs all come
    // from the log, so the replay matches.
    let done = ftvmm::rr::replay(GUEST_ELF, &bytes[..], Box::new(std::io::sink())).unwrap();
    assert!(done.stats.digests_checked >= 2);
}
