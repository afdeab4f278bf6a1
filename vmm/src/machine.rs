//! One VM with one vCPU: KVM objects, guest RAM, devices, and the state the
//! run loop keeps between exits.

use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_guest_debug, kvm_regs, kvm_userspace_memory_region,
    KVM_CAP_X86_USER_SPACE_MSR, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MSR_EXIT_REASON_FILTER,
};
use kvm_ioctls::{
    Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::{boot, cpuid, msr};
use crate::clock::{Clock, ClockMode};
use crate::devices::ftclock::Entropy;
use crate::devices::Devices;
use crate::digest::{Digester, DEFAULT_KIND};
use crate::dirty::DirtyLog;
use crate::inputs::{HostInputs, Input};
use crate::kick::{self, Kicker, Ticker};
use crate::loader::{self, KernelKind};
use crate::memory::{self, GuestRam};
use crate::output::{OutputCounters, OutputSink};
use crate::pmu::PmuDrive;
use crate::points::{ExecPoint, PointMode};
use crate::{Error, Result};

vmm_sys_util::ioctl_iow_nr!(
    KVM_INTERRUPT,
    kvm_bindings::KVMIO,
    0x86,
    kvm_bindings::kvm_interrupt
);

/// What a VM is built from.
pub struct MachineConfig {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Kernel command line.
    pub cmdline: String,
    /// An initrd (initramfs) the kernel finds in memory: the PVH module
    /// list's first module, or `boot_params` ramdisk fields.
    pub initrd: Option<Vec<u8>>,
    /// Time source for devices.
    pub clock: ClockMode,
    /// Entropy for ftclock.
    pub entropy: Entropy,
    /// Which exits are execution points.
    pub points: PointMode,
    /// Where the guest's outputs (console bytes, network frames) go, each
    /// with its tag (the sequence number of its own log entry).
    pub outputs: Box<dyn OutputSink>,
    /// The guest's CPUID table, from a log header (a backup, a replay);
    /// None: this host's table under the CPUID policy.
    pub cpuid: Option<Vec<ftlog::CpuidEntry>>,
    /// Whether device timers fire from host time (false on a backup: its
    /// clocks are silent and every tick comes from the log).
    pub live_timers: bool,
    /// What counts points in [`PointMode::Pmu`].
    pub pmu_counter: PmuCounter,
}

/// What counts points in [`PointMode::Pmu`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmuCounter {
    /// The host's PMU: guest retired conditional branches.
    Hardware,
    /// Single steps ([`crate::pmu::StepCounter`]): exercises the landing
    /// loop on hosts without a PMU.
    Steps,
}

/// Landing margin in branches for the hardware counter: twice a generous
/// skid plus slack (docs/pmu.md; skid is measured in tens of branches).
const PMU_MARGIN: u64 = 2 * 128 + 16;

impl MachineConfig {
    /// Defaults for a quick live run sending the guest's outputs to `out`.
    pub fn new(mem_mib: u64, cmdline: &str, out: Box<dyn OutputSink>) -> Self {
        MachineConfig {
            mem_mib,
            cmdline: cmdline.to_string(),
            initrd: None,
            clock: ClockMode::Host,
            entropy: Entropy::Host,
            points: PointMode::AnyExit,
            outputs: out,
            cpuid: None,
            live_timers: true,
            pmu_counter: PmuCounter::Hardware,
        }
    }
}

/// The run-loop state that is part of a VM's observable behaviour, so it is
/// snapshotted along with the vCPU and devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoopState {
    /// Deterministic exits so far (the execution-point counter).
    pub count: u64,
    /// The vCPU stopped at an execution point that has not been processed.
    pub pending_point: bool,
    /// The guest executed HLT and waits for an interrupt.
    pub halted: bool,
    /// KVM said an interrupt can be injected now.
    pub ready_for_injection: bool,
    /// Guest IF at the last exit.
    pub if_flag: bool,
    /// An interrupt window was requested.
    pub request_window: bool,
    /// The point where the vCPU stopped (filled at the exit, before any
    /// pending I/O completes, so it names the same instant everywhere).
    pub point: Option<ExecPoint>,
    /// RIP at the previous exit while single-stepping (to recognise HLT).
    pub last_step_rip: Option<u64>,
    /// What each output stream has carried since boot.
    pub outputs: OutputCounters,
    /// The latest time (ns of the device clock) a device gave the guest:
    /// the clock never reads less once timers are live again.
    pub latest_time_ns: u64,
    /// RDTSC instructions the VMM answers (crate::rdtsc).
    #[serde(default)]
    pub rdtsc: crate::rdtsc::RdtscTraps,
}

/// A VM: KVM handles, memory, devices, clock and loop state.
pub struct Machine {
    _kvm: Kvm,
    _vm: VmFd,
    pub(crate) vcpu: VcpuFd,
    mem: GuestRam,
    /// Emulated devices.
    pub devices: Devices,
    /// Where outputs go.
    pub(crate) outputs: Box<dyn OutputSink>,
    cpuid: Vec<ftlog::CpuidEntry>,
    /// Time for devices.
    pub clock: Clock,
    /// Loop state.
    pub(crate) ls: LoopState,
    points: PointMode,
    live_timers: bool,
    host: HostInputs,
    ticker: Option<Ticker>,
    kicker: Option<Kicker>,
    regs: Option<kvm_regs>,
    mem_mib: u64,
    kernel_kind: Option<KernelKind>,
    entropy: Entropy,
    pub(crate) pmu: Option<PmuDrive>,
    pub(crate) pmu_step_once: bool,
    stepping: bool,
    /// Pages written since each consumer last looked (crate::dirty).
    dirty: Arc<DirtyLog>,
    /// The state digest and its page-hash cache (crate::digest).
    digester: Digester,
    /// The VMM's instruction emulator (crate::emulate).
    pub(crate) emu: crate::emulate::EmuState,
}

fn open_kvm() -> Result<Kvm> {
    let kvm = Kvm::new().map_err(Error::KvmUnavailable)?;
    for (cap, name) in [
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCapability(name));
        }
    }
    Ok(kvm)
}

impl Machine {
    /// Create the VM with `kernel` loaded and the vCPU at its entry point.
    pub fn new(mut cfg: MachineConfig, kernel: &[u8]) -> Result<Self> {
        let cmdline = std::mem::take(&mut cfg.cmdline);
        let initrd = cfg.initrd.take();
        let mut m = Self::empty(cfg)?;
        let loaded = loader::load_kernel(&m.mem, kernel, &cmdline, initrd.as_deref())?;
        m.kernel_kind = Some(loaded.kind);
        m.trap_kernel_rdtsc(kernel)?;
        let sregs = m.vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        m.vcpu
            .set_sregs(&boot::boot_sregs(sregs, loaded.entry))
            .map_err(Error::kvm("KVM_SET_SREGS"))?;
        m.vcpu
            .set_regs(&boot::boot_regs(loaded.entry))
            .map_err(Error::kvm("KVM_SET_REGS"))?;
        m.vcpu
            .set_fpu(&boot::boot_fpu())
            .map_err(Error::kvm("KVM_SET_FPU"))?;
        // The first instruction is an execution point (count 0).
        m.ls.pending_point = true;
        tracing::debug!(kind = ?loaded.kind, entry = ?loaded.entry, "kernel loaded");
        Ok(m)
    }

    /// A VM with zeroed RAM and devices in reset state, vCPU not yet set up.
    pub(crate) fn empty(cfg: MachineConfig) -> Result<Self> {
        let kvm = open_kvm()?;
        let mem = memory::create_ram(cfg.mem_mib)?;
        let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        let logging = match register_memory(&vm, &mem, true) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("dirty logging of guest RAM refused ({e})");
                register_memory(&vm, &mem, false)?;
                false
            }
        };
        let dirty = DirtyLog::new(&vm, &mem, logging)?;
        // RAM is fresh from mmap: all zero, nothing written yet.
        let digester = Digester::for_zeroed_ram(DEFAULT_KIND, &dirty);
        // VMX needs these three pages even without real mode.
        vm.set_tss_address(0xfffb_d000)
            .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        install_msr_filter(&vm)?;
        let emu = crate::emulate::EmuState::new(&vm);
        let vcpu = vm.create_vcpu(0).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let guest = match &cfg.cpuid {
            Some(table) => cpuid::from_log(table, &supported)?,
            None => cpuid::guest_cpuid(&supported)?,
        };
        vcpu.set_cpuid2(&guest)
            .map_err(Error::kvm("KVM_SET_CPUID2"))?;
        let mut m = Machine {
            _kvm: kvm,
            _vm: vm,
            vcpu,
            mem,
            devices: Devices::new(cfg.entropy),
            outputs: cfg.outputs,
            cpuid: cpuid::to_log(&guest),
            clock: Clock::new(cfg.clock, 0),
            ls: LoopState::default(),
            points: cfg.points,
            live_timers: cfg.live_timers,
            host: HostInputs::new(),
            ticker: None,
            kicker: None,
            regs: None,
            mem_mib: cfg.mem_mib,
            kernel_kind: None,
            entropy: cfg.entropy,
            pmu: None,
            pmu_step_once: false,
            stepping: false,
            dirty,
            digester,
            emu,
        };
        if cfg.points == PointMode::Pmu {
            m.pmu = Some(open_pmu(cfg.pmu_counter)?);
        }
        m.set_point_mode(cfg.points)?;
        Ok(m)
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestRam {
        &self.mem
    }

    /// The dirty-page log of guest RAM: [`DirtyLog::cursor`] gives a
    /// consumer its own view of what changed (a live snapshot's pre-copy).
    pub fn dirty_log(&self) -> &Arc<DirtyLog> {
        &self.dirty
    }

    /// Switch KVM's dirty logging of guest RAM on or off. Off, every cursor
    /// sees every page as dirty and every digest hashes all of RAM (what
    /// logging itself costs the guest is measured this way).
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<()> {
        if matches!(self.dirty.tracking(), crate::dirty::Tracking::Failed(_)) {
            return Ok(());
        }
        register_memory(&self._vm, &self.mem, on)?;
        self.dirty.set_logging(on);
        Ok(())
    }

    pub(crate) fn digester(&self) -> &Digester {
        &self.digester
    }

    pub(crate) fn digester_mut(&mut self) -> &mut Digester {
        &mut self.digester
    }

    /// Guest RAM size in MiB.
    pub fn mem_mib(&self) -> u64 {
        self.mem_mib
    }

    /// The kind of kernel that was loaded (None for a restored VM).
    pub fn kernel_kind(&self) -> Option<KernelKind> {
        self.kernel_kind
    }

    /// The entropy source ftclock was created with.
    pub fn entropy(&self) -> Entropy {
        self.entropy
    }

    /// Which exits are execution points.
    pub fn point_mode(&self) -> PointMode {
        self.points
    }

    /// Change which exits are execution points (single-stepping on or off).
    pub fn set_point_mode(&mut self, mode: PointMode) -> Result<()> {
        if mode == PointMode::Pmu && self.pmu.is_none() {
            return Err(Error::Backend(
                "pmu: no counter was opened for this VM".into(),
            ));
        }
        self.set_stepping(mode == PointMode::SingleStep)?;
        self.points = mode;
        Ok(())
    }

    /// Whether host kicks help: only where a host-caused stop can be a
    /// point. A step counter would count the extra steps a kick causes
    /// inside an interrupt handler (which runs with TF clear), so it gets
    /// none, like the singlestep backend.
    fn wants_kicks(&self) -> bool {
        self.points.wants_kicks() && !self.pmu.as_ref().is_some_and(|d| d.counts_steps())
    }

    /// Whether the vCPU single-steps.
    pub fn is_stepping(&self) -> bool {
        self.stepping
    }

    /// Turn single-stepping on or off.
    pub(crate) fn set_stepping(&mut self, on: bool) -> Result<()> {
        self.stepping = on;
        self.apply_guest_debug()
    }

    /// Set up RDTSC traps for the kernel `image` (crate::rdtsc): its
    /// symbol table's RDTSCs in [`crate::rdtsc::KERNEL_FUNCTIONS`].
    fn trap_kernel_rdtsc(&mut self, image: &[u8]) -> Result<()> {
        use crate::rdtsc::{find_in_elf, KERNEL_FUNCTIONS, MAX_TRAPS};
        let addrs = find_in_elf(image, KERNEL_FUNCTIONS);
        if addrs.len() > MAX_TRAPS {
            return Err(Error::KernelFormat(format!(
                "the kernel has {} RDTSC instructions in {KERNEL_FUNCTIONS:?}, the VMM can trap \
                 {MAX_TRAPS} (build it with CONFIG_CC_OPTIMIZE_FOR_SIZE, docs/linux.md)",
                addrs.len()
            )));
        }
        if !addrs.is_empty() {
            tracing::info!(?addrs, "RDTSC in the kernel answered by the VMM");
        }
        self.ls.rdtsc.addrs = addrs;
        self.apply_guest_debug()
    }

    /// The RDTSC traps this VM has, and how many it answered.
    pub fn rdtsc_traps(&self) -> &crate::rdtsc::RdtscTraps {
        &self.ls.rdtsc
    }

    /// KVM's guest-debug state from single-stepping and the RDTSC traps.
    pub(crate) fn apply_guest_debug(&mut self) -> Result<()> {
        let traps = &self.ls.rdtsc.addrs;
        let mut dbg = kvm_guest_debug::default();
        if self.stepping {
            dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        }
        if !traps.is_empty() {
            dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            // DR7: bit 10 is reserved as one; L<i> enables DR<i> as an
            // instruction breakpoint (R/W and LEN bits zero).
            let mut dr7 = 1u64 << 10;
            for (i, a) in traps.iter().enumerate().take(crate::rdtsc::MAX_TRAPS) {
                dbg.arch.debugreg[i] = *a;
                dr7 |= 1 << (2 * i);
            }
            dbg.arch.debugreg[7] = dr7;
        }
        self.vcpu
            .set_guest_debug(&dbg)
            .map_err(Error::kvm("KVM_SET_GUEST_DEBUG"))
    }

    /// If the vCPU stopped on a trapped RDTSC, answer it (EDX:EAX) and step
    /// over it; false if it did not.
    pub(crate) fn answer_rdtsc(&mut self) -> Result<bool> {
        if self.ls.rdtsc.addrs.is_empty() {
            return Ok(false);
        }
        let mut r = self.vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        if !self.ls.rdtsc.addrs.contains(&r.rip) {
            return Ok(false);
        }
        let tsc = self.ls.rdtsc.next(self.ls.latest_time_ns);
        r.rax = tsc & 0xffff_ffff;
        r.rdx = tsc >> 32;
        r.rip += 2;
        self.vcpu.set_regs(&r).map_err(Error::kvm("KVM_SET_REGS"))?;
        self.regs = Some(r);
        Ok(true)
    }

    /// Whether device timers run from host time.
    pub fn live_timers(&self) -> bool {
        self.live_timers
    }

    /// Switch device timers on (a backup going live) or off. Switched on,
    /// they continue from the device state as the log left it, without a
    /// catch-up burst: the clock never reads less than the latest time the
    /// guest was given, and deadlines that passed while the timers were
    /// silent are rebased (`Pit::resume`), so no tick is due at once.
    pub fn set_live_timers(&mut self, on: bool) {
        if on && !self.live_timers {
            self.clock.advance_to(self.ls.latest_time_ns);
            self.devices.pit.resume(self.clock.now_ns());
        }
        self.live_timers = on;
    }

    /// Send the guest's outputs to `sink` from now on; returns the old sink.
    pub fn set_output_sink(&mut self, sink: Box<dyn OutputSink>) -> Box<dyn OutputSink> {
        std::mem::replace(&mut self.outputs, sink)
    }

    /// The CPUID table the guest sees (for a log header).
    pub fn cpuid(&self) -> &[ftlog::CpuidEntry] {
        &self.cpuid
    }

    /// Host-side input queue (serial input, stop requests). Clone it to feed
    /// the VM from another thread.
    pub fn host_inputs(&self) -> HostInputs {
        self.host.clone()
    }

    /// Deterministic exits so far.
    pub fn exit_count(&self) -> u64 {
        self.ls.count
    }

    /// The vCPU's general registers (cached until the next run).
    pub fn regs(&mut self) -> Result<kvm_regs> {
        if let Some(r) = self.regs {
            return Ok(r);
        }
        let r = self.vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        self.regs = Some(r);
        Ok(r)
    }

    /// The execution point the vCPU is stopped at.
    pub fn point(&mut self) -> Result<ExecPoint> {
        if let Some(p) = self.ls.point {
            return Ok(p);
        }
        let r = self.regs()?;
        let count = match &mut self.pmu {
            Some(d) => d.count().map_err(pmu_err)?,
            None => self.ls.count,
        };
        let p = ExecPoint {
            count,
            rip: r.rip,
            rcx: r.rcx,
        };
        self.ls.point = Some(p);
        Ok(p)
    }

    /// Inputs that host time and host threads have made due, without applying
    /// them. A backup never calls this while replaying.
    pub fn poll_host_inputs(&mut self) -> Vec<Input> {
        let mut inputs = Vec::new();
        if self.live_timers || self.clock.is_virtual() {
            let now = self.clock.now_ns();
            // Many missed periods still make one edge: the PIC latches edges.
            if self.devices.pit.take_expired(now) > 0 {
                inputs.push(Input::Irq(crate::devices::PIT_IRQ));
            }
        }
        let room = self.devices.serial.rx_room();
        if room > 0 {
            let bytes = self.host.take_serial(room);
            if !bytes.is_empty() {
                inputs.push(Input::Serial(bytes));
            }
        }
        // One frame per point: each is its own logged input, delivered only
        // when the guest has a buffer for it (a frame the guest cannot take
        // stays queued rather than being dropped at an arbitrary moment).
        if self.devices.net().is_some_and(|n| n.can_receive()) {
            if let Some(frame) = self.host.take_frame() {
                inputs.push(Input::Frame(frame));
            }
        }
        inputs
    }

    /// Apply one input now. Returns the input as it took effect (serial bytes
    /// beyond the FIFO's room are dropped, as a real UART would; a frame with
    /// no receive buffer comes back empty).
    pub fn apply(&mut self, input: &Input) -> Input {
        let mut ctx = crate::devices::DeviceCtx::new(self.clock.now_ns());
        let applied = match input {
            Input::Irq(irq) => {
                self.devices.pic.pulse_irq(*irq);
                input.clone()
            }
            Input::Serial(bytes) => {
                let n = self.devices.serial.receive(bytes, &mut ctx);
                Input::Serial(bytes[..n].to_vec())
            }
            Input::Frame(frame) => {
                if self.devices.receive_frame(frame, &mut ctx) {
                    input.clone()
                } else {
                    Input::Frame(Vec::new())
                }
            }
        };
        self.devices.route_irqs(&mut ctx);
        // Receiving takes no host value and sends nothing: samples and
        // outputs come only from the guest's own accesses, in the run loop.
        debug_assert!(ctx.outputs.is_empty() && ctx.taken().is_none());
        applied
    }

    /// Block while the guest idles in HLT until an input may be due.
    /// Returns false when a stop was requested or nothing can ever wake it.
    pub fn wait_for_input(&mut self) -> bool {
        let deadline = self.devices.pit.next_deadline_ns();
        if self.clock.is_virtual() {
            // Virtual time: idling takes no time at all.
            return match deadline {
                Some(d) => {
                    self.clock.skip_to(d);
                    true
                }
                None => false,
            };
        }
        let at = deadline
            .filter(|_| self.live_timers)
            .map(|d| self.clock.instant_at(d));
        // A frame the guest has no buffer for cannot wake it.
        let frames = self.devices.net().is_some_and(|n| n.can_receive());
        self.host.wait(at, frames) == crate::inputs::Wake::Ready
    }

    /// Ask KVM for an interrupt, or for an exit when one can be taken.
    /// Called only at execution points. Returns the vector injected.
    pub(crate) fn try_inject(&mut self) -> Result<Option<u8>> {
        if !self.devices.pic.has_pending() {
            self.ls.request_window = false;
            return Ok(None);
        }
        // Interrupt-window exits are not reliable on every host (kvm_pvm drops
        // some when the vCPU thread is preempted), so where a replay depends
        // on them the VMM never asks for one: it injects at the first point
        // where the guest can take the interrupt, judged from the vCPU state.
        let replayed = self.points != PointMode::AnyExit;
        let ready = if replayed {
            self.can_take_interrupt()?
        } else {
            self.ls.ready_for_injection && self.ls.if_flag
        };
        if !ready {
            self.ls.request_window = !replayed;
            return Ok(None);
        }
        let Some(vector) = self.devices.pic.acknowledge() else {
            return Ok(None);
        };
        let irq = kvm_bindings::kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the pointer,
        // which refers to a live local; the fd is our vCPU.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.vcpu, KVM_INTERRUPT(), &irq) };
        if rc != 0 {
            return Err(Error::Kvm {
                op: "KVM_INTERRUPT",
                source: kvm_ioctls::Error::last(),
            });
        }
        self.ls.ready_for_injection = false;
        self.ls.request_window = false;
        self.ls.halted = false;
        Ok(Some(vector))
    }

    /// IF set, no interrupt shadow, and no event already being injected.
    fn can_take_interrupt(&mut self) -> Result<bool> {
        const RFLAGS_IF: u64 = 1 << 9;
        if self.regs()?.rflags & RFLAGS_IF == 0 {
            return Ok(false);
        }
        let ev = self
            .vcpu
            .get_vcpu_events()
            .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(ev.interrupt.shadow == 0
            && ev.interrupt.injected == 0
            && ev.exception.injected == 0
            && ev.exception.pending == 0
            && ev.nmi.injected == 0)
    }

    /// Drop the cached registers and point (the vCPU moved).
    pub(crate) fn forget_point(&mut self) {
        self.regs = None;
        self.ls.point = None;
    }

    /// Before KVM_RUN: hand the window request to KVM and arm the timer kick.
    pub(crate) fn prepare_entry(&mut self) -> Result<()> {
        self.forget_point();
        let window = u8::from(self.ls.request_window);
        self.vcpu.get_kvm_run().request_interrupt_window = window;
        if self.kicker.is_none() {
            self.bind_to_current_thread()?;
        }
        // Kicks only help where any exit is a point. Elsewhere the input waits
        // for the next deterministic exit anyway, and a kick can make KVM drop
        // a requested interrupt-window exit (seen on kvm_pvm), which would
        // move the injection to another instruction than the backup's.
        if let Some(d) = &mut self.pmu {
            let step =
                d.before_entry().map_err(pmu_err)? || std::mem::take(&mut self.pmu_step_once);
            if step != self.stepping {
                self.set_stepping(step)?;
            }
        }
        if self.live_timers && !self.clock.is_virtual() && self.wants_kicks() {
            if let (Some(t), Some(k)) = (&self.ticker, self.kicker) {
                let d = self
                    .devices
                    .pit
                    .next_deadline_ns()
                    .map(|ns| self.clock.instant_at(ns));
                t.arm(d, k);
            }
        }
        Ok(())
    }

    /// After any KVM_RUN return: what KVM says about interrupt delivery.
    pub(crate) fn note_exit_flags(&mut self) {
        let run = self.vcpu.get_kvm_run();
        self.ls.ready_for_injection = run.ready_for_interrupt_injection != 0;
        self.ls.if_flag = run.if_flag != 0;
        run.immediate_exit = 0;
    }

    /// Make the calling thread the vCPU thread: kicks and timers target it.
    fn bind_to_current_thread(&mut self) -> Result<()> {
        kick::install_handler()?;
        let run = self.vcpu.get_kvm_run();
        kick::arm_current_thread(std::ptr::addr_of_mut!(run.immediate_exit));
        let k = Kicker::current();
        self.kicker = Some(k);
        if self.wants_kicks() {
            self.host.set_kicker(Some(k));
        }
        if self.ticker.is_none() {
            self.ticker = Some(Ticker::start()?);
        }
        Ok(())
    }

    /// Forget the vCPU thread (before the machine moves to another thread).
    pub fn unbind_thread(&mut self) {
        if self.kicker.take().is_some() {
            kick::disarm_current_thread();
            self.host.set_kicker(None);
            if let Some(t) = &self.ticker {
                t.arm(None, Kicker::current());
            }
        }
    }

    /// Finish an I/O instruction KVM is still holding (its result lives only
    /// inside KVM until the next KVM_RUN), without running guest code.
    pub(crate) fn complete_pending_io(&mut self) -> Result<()> {
        self.vcpu.set_kvm_immediate_exit(1);
        let r = match self.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Ok(_) => Ok(()),
            Err(source) => Err(Error::Kvm {
                op: "KVM_RUN (completing I/O)",
                source,
            }),
        };
        self.vcpu.set_kvm_immediate_exit(0);
        // Finishing the instruction moved the registers (an IN's result,
        // RIP); the point keeps naming where the vCPU stopped.
        self.regs = None;
        r
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.unbind_thread();
    }
}

pub(crate) fn pmu_err(e: crate::pmu::PmuError) -> Error {
    Error::Backend(format!("pmu: {e}"))
}

/// Open the counter for the `pmu` backend on the calling (vCPU) thread.
fn open_pmu(kind: PmuCounter) -> Result<PmuDrive> {
    match kind {
        PmuCounter::Steps => PmuDrive::stepping().map_err(pmu_err),
        PmuCounter::Hardware => {
            let info = crate::pmu::probe().map_err(pmu_err)?;
            let target = crate::pmu::SignalTarget::current_thread(kick::kick_signal());
            let mut counter =
                crate::pmu::PerfCounter::open(info.event, crate::pmu::Scope::GuestOnly, target)
                    .map_err(pmu_err)?;
            calibrate(&mut counter)?;
            PmuDrive::hardware(Box::new(counter), PMU_MARGIN).map_err(pmu_err)
        }
    }
}

/// Trust no PMU blindly: count a guest loop with a known number of
/// conditional branches several times; any other count refuses the backend.
fn calibrate(counter: &mut dyn crate::pmu::BranchCounter) -> Result<()> {
    use crate::pmu::validate::{CALIBRATION_BRANCHES, CALIBRATION_RUNS};
    let code = crate::pmu::calibration_loop(CALIBRATION_BRANCHES).map_err(pmu_err)?;
    let image = loader::minimal_elf(&code, None);
    let mut measured = Vec::with_capacity(CALIBRATION_RUNS);
    for _ in 0..CALIBRATION_RUNS {
        let cfg = MachineConfig::new(memory::MIN_MEM_MIB, "", Box::new(std::io::sink()));
        let mut m = Machine::new(cfg, &image)?;
        let before = counter.read().map_err(pmu_err)?;
        // The loop ends in HLT with interrupts off.
        m.run(&mut crate::run::Live)?;
        measured.push(counter.read().map_err(pmu_err)?.saturating_sub(before));
    }
    crate::pmu::check_counter(u64::from(CALIBRATION_BRANCHES), &measured).map_err(pmu_err)
}

/// Register guest RAM with KVM, with dirty logging (crate::dirty) if `log_dirty`.
fn register_memory(vm: &VmFd, mem: &GuestRam, log_dirty: bool) -> Result<()> {
    let flags = if log_dirty {
        KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    for (index, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: crate::dirty::slot_id(index),
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags,
        };
        // SAFETY: the region stays mapped for the VM's lifetime: `mem` is
        // owned by the Machine that owns `vm`.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Make accesses to time-related MSRs exit to userspace.
fn install_msr_filter(vm: &VmFd) -> Result<()> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    if let Err(e) = vm.enable_cap(&cap) {
        tracing::warn!(
            "KVM_CAP_X86_USER_SPACE_MSR unavailable ({e}); TSC MSR accesses stay in KVM"
        );
        return Ok(());
    }
    // One bit per MSR; a clear bit denies, and denied accesses exit.
    let deny = [0u8; 1];
    let ranges: Vec<MsrFilterRange<'_>> = msr::FILTERED
        .iter()
        .map(|&base| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base,
            msr_count: 1,
            bitmap: &deny,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(Error::kvm("KVM_X86_SET_MSR_FILTER"))
}
