//! The vCPU run loop. Every exit is emulated here and reported to an
//! [`Observer`], which is how the record/replay layer hooks in without any
//! device knowing about it: host values enter devices through
//! [`DeviceCtx::sample`], and outputs leave them through
//! [`DeviceCtx::emit`]; the loop hands both to the observer, and outputs
//! then to the VM's [`crate::output::OutputSink`].
//!
//! Every error path completes the guest's instruction first (a read's
//! result is written back, an output reaches the sink) and only then
//! returns the observer's error, so a primary that goes on alone after a
//! logging failure resumes a guest whose I/O is whole.

use kvm_ioctls::VcpuExit;
use vm_memory::Bytes;

use crate::devices::{DeviceCtx, SampleKind};
use crate::emulate::Emulated;
use crate::machine::Machine;
use crate::output::Output;
use crate::points::{ExitKind, PointMode};
use crate::{Error, Result};

/// Where a device access went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Port I/O.
    Port(u16),
    /// MMIO.
    Mmio(u64),
    /// An RDMSR of a filtered MSR.
    Msr(u32),
}

/// What the observer wants after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep running.
    Continue,
    /// Return from [`Machine::run`] with [`RunEnd::Paused`]; a later `run`
    /// resumes at the same point.
    Pause,
}

/// Why [`Machine::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The guest wrote its exit code to the power port.
    PowerOff(u8),
    /// The guest halted with interrupts disabled: nothing can wake it.
    HaltedForever,
    /// The guest triple-faulted.
    Shutdown,
    /// The observer paused the run.
    Paused,
    /// A stop was requested through the host-input queue.
    Stopped,
}

/// Hooks into the run loop.
pub trait Observer {
    /// The vCPU is stopped at an execution point that has not been processed.
    /// Apply due inputs here ([`Machine::poll_host_inputs`] / [`Machine::apply`]).
    /// May be called more than once at the same point (after a pause, or when
    /// an idle guest is woken): inputs applied in any of those calls take
    /// effect together.
    fn at_point(&mut self, m: &mut Machine) -> Result<Flow>;

    /// A device access at the current point is about to run: the host
    /// values it takes in, if this observer has them (a replayer: from the
    /// log). None: the device takes its own.
    fn logged_samples(&mut self, _m: &mut Machine, _at: Access) -> Result<Option<Vec<u64>>> {
        Ok(None)
    }

    /// A device access at the current point took host values (a time,
    /// random bits, a counter): its non-deterministic inputs, which the
    /// device has used. A recorder logs them. Called when the access took
    /// any, or when [`Observer::logged_samples`] gave some.
    fn on_sample(
        &mut self,
        _m: &mut Machine,
        _at: Access,
        _kind: Option<SampleKind>,
        _values: &[u64],
    ) -> Result<()> {
        Ok(())
    }

    /// The guest sent `out` at the current point. Returns the sequence
    /// number of the output's own log entry (its tag for the output sink):
    /// a recorder logs one, a replayer matches the logged one; None when
    /// there is none (nobody replays; past the end of a cut-short log).
    fn on_output(&mut self, _m: &mut Machine, _out: &Output) -> Result<Option<u64>> {
        Ok(None)
    }

    /// The next logged point this observer must land on (a replayer in the
    /// `pmu` backend); None where every stop is a point.
    fn next_target(&mut self) -> Result<Option<crate::points::ExecPoint>> {
        Ok(None)
    }

    /// Every VM exit, typed, before it is emulated (statistics, tracing).
    fn on_exit(&mut self, _m: &mut Machine, _kind: ExitKind) {}

    /// `vector` is about to be injected at the current point.
    fn on_inject(&mut self, _m: &mut Machine, _vector: u8) -> Result<()> {
        Ok(())
    }

    /// The guest is halted with interrupts enabled and nothing to deliver.
    /// Block until an input may be due; the point is then processed again.
    fn on_idle(&mut self, m: &mut Machine) -> Result<Flow> {
        Ok(if m.wait_for_input() {
            Flow::Continue
        } else {
            Flow::Pause
        })
    }
}

/// A VM nobody replays: inputs are applied the moment they are due.
#[derive(Debug, Default)]
pub struct Live;

impl Observer for Live {
    fn at_point(&mut self, m: &mut Machine) -> Result<Flow> {
        for input in m.poll_host_inputs() {
            m.apply(&input);
        }
        Ok(Flow::Continue)
    }
}

/// Data of an I/O exit, copied out of `kvm_run` so the observer can look at
/// the machine while we hold it.
struct IoExit {
    port: u16,
    write: bool,
    size: usize,
    data: Vec<u8>,
}

const MSR_TSC_HZ: u64 = 1_000_000_000;

impl Machine {
    /// Run the vCPU until the guest stops or the observer pauses.
    pub fn run(&mut self, obs: &mut dyn Observer) -> Result<RunEnd> {
        loop {
            if self.ls.pending_point {
                if self.host_inputs().stop_requested() {
                    return Ok(RunEnd::Stopped);
                }
                if obs.at_point(self)? == Flow::Pause {
                    return Ok(RunEnd::Paused);
                }
                if let Some(v) = self.try_inject()? {
                    obs.on_inject(self, v)?;
                }
                if self.ls.halted {
                    if !self.ls.if_flag {
                        return Ok(RunEnd::HaltedForever);
                    }
                    if obs.on_idle(self)? == Flow::Pause {
                        return Ok(if self.host_inputs().stop_requested() {
                            RunEnd::Stopped
                        } else {
                            RunEnd::Paused
                        });
                    }
                    continue;
                }
                self.ls.pending_point = false;
            }
            if let Some(end) = self.run_once(obs)? {
                return Ok(end);
            }
        }
    }

    /// One KVM_RUN and the emulation of its exit.
    fn run_once(&mut self, obs: &mut dyn Observer) -> Result<Option<RunEnd>> {
        self.prepare_entry()?;
        let mut exit = match self.vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => Exit::Io(IoExit {
                port,
                write: false,
                size: 0,
                data: data.to_vec(),
            }),
            Ok(VcpuExit::IoOut(port, data)) => Exit::Io(IoExit {
                port,
                write: true,
                size: 0,
                data: data.to_vec(),
            }),
            Ok(VcpuExit::MmioRead(addr, data)) => Exit::Mmio(addr, false, data.to_vec()),
            Ok(VcpuExit::MmioWrite(addr, data)) => Exit::Mmio(addr, true, data.to_vec()),
            Ok(VcpuExit::Hlt) => Exit::Kind(ExitKind::Hlt),
            Ok(VcpuExit::IrqWindowOpen) => Exit::Kind(ExitKind::IrqWindow),
            Ok(VcpuExit::Debug(_)) => Exit::Kind(ExitKind::Debug),
            Ok(VcpuExit::X86Rdmsr(m)) => Exit::Msr(m.index, None),
            Ok(VcpuExit::X86Wrmsr(m)) => Exit::Msr(m.index, Some(m.data)),
            Ok(VcpuExit::Intr) => Exit::Kind(ExitKind::Interrupted),
            Ok(VcpuExit::Shutdown) => Exit::End(RunEnd::Shutdown),
            Ok(VcpuExit::FailEntry(reason, _)) => {
                return Err(Error::GuestFault(format!(
                    "VM entry failed, reason {reason:#x}"
                )))
            }
            Ok(VcpuExit::InternalError) => {
                // An instruction KVM could not emulate: the VMM does it. Not
                // a point, not counted (crate::emulate says why); while
                // stepping, it ends in the step KVM would have reported.
                obs.on_exit(self, ExitKind::Emulated);
                match self.emulate_failed_instruction()? {
                    Emulated::Retired if self.is_stepping() => Exit::Kind(ExitKind::Debug),
                    _ => return Ok(None),
                }
            }
            Ok(other) => return Err(Error::GuestFault(format!("unexpected VM exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Exit::Kind(ExitKind::Interrupted)
            }
            Err(source) => {
                return Err(Error::Kvm {
                    op: "KVM_RUN",
                    source,
                })
            }
        };
        if matches!(exit, Exit::Kind(ExitKind::Debug)) && self.answer_rdtsc()? {
            // A trapped RDTSC (crate::rdtsc). Without stepping it is a
            // point: a kernel loop whose only exit it is (Linux waiting
            // for entropy, timer tick by timer tick) must be able to take
            // an interrupt there. While stepping it is part of the step
            // that reached it; the pmu backend does not count it.
            if self.is_stepping() {
                obs.on_exit(self, ExitKind::Emulated);
            } else if self.point_mode() == PointMode::Pmu {
                obs.on_exit(self, ExitKind::Emulated);
                return Ok(None);
            } else {
                exit = Exit::Kind(ExitKind::Rdtsc);
            }
        }
        self.note_exit_flags();
        if let Exit::Io(io) = &mut exit {
            io.size = self.io_elem_size();
        }
        if self.is_stepping() {
            if let Exit::Kind(k @ (ExitKind::Hlt | ExitKind::Debug)) = &mut exit {
                // A stepped HLT comes back as a HLT exit or as a plain step,
                // and a step over some emulated CPL0 instructions (fxsave64)
                // as a HLT exit (kvm_pvm). Decide from the instruction itself.
                *k = if self.stepped_over_hlt()? {
                    ExitKind::Hlt
                } else {
                    ExitKind::Debug
                };
            }
            self.ls.last_step_rip = Some(self.regs()?.rip);
        }
        let kind = match &exit {
            Exit::Io(_) => ExitKind::Io,
            Exit::Mmio(..) => ExitKind::Mmio,
            Exit::Msr(..) => ExitKind::Msr,
            Exit::Kind(k) => *k,
            Exit::End(end) => return Ok(Some(*end)),
        };
        obs.on_exit(self, kind);
        let mode = self.point_mode();
        if tracing::enabled!(tracing::Level::TRACE) {
            let rip = self.regs().map(|r| r.rip).unwrap_or(0);
            tracing::trace!(
                count = self.ls.count,
                ?kind,
                rip = format_args!("{rip:#x}"),
                "exit"
            );
        }
        if mode.counts(kind) {
            self.ls.count += 1;
            self.clock.on_exit();
        }
        if mode.is_point(kind) && mode != PointMode::Pmu {
            self.ls.pending_point = true;
        }
        match exit {
            Exit::Io(io) => {
                if let Some(end) = self.emulate_io(io, obs)? {
                    return Ok(Some(end));
                }
            }
            Exit::Mmio(addr, write, data) => self.emulate_mmio(addr, write, data, obs)?,
            Exit::Msr(index, value) => self.emulate_msr(index, value, obs)?,
            Exit::Kind(ExitKind::Hlt) => self.ls.halted = true,
            Exit::Kind(ExitKind::IrqWindow) => self.ls.request_window = false,
            Exit::Kind(_) | Exit::End(_) => {}
        }
        if mode == PointMode::AnyExit {
            self.ls.pending_point = true;
        }
        if mode == PointMode::Pmu {
            self.pmu_stop(kind, obs)?;
        }
        Ok(None)
    }

    /// In the `pmu` backend: is this stop a point (the primary: always; the
    /// backup: when it has landed on the next logged point)?
    fn pmu_stop(&mut self, kind: ExitKind, obs: &mut dyn Observer) -> Result<()> {
        if matches!(kind, ExitKind::Debug | ExitKind::Hlt) {
            // A stepped HLT sometimes comes back as a step, sometimes as a
            // HLT exit (kvm_pvm): either way one instruction retired.
            if let Some(d) = &mut self.pmu {
                d.on_step();
            }
        }
        if matches!(kind, ExitKind::Io | ExitKind::Mmio | ExitKind::Msr) {
            // "At this exit" and "before the next instruction" must be one
            // point, as they are to a stepping backup: finish the
            // instruction first (its read, if any, was logged above).
            self.complete_pending_io()?;
            self.note_exit_flags();
            self.forget_point();
        }
        let target = obs.next_target()?;
        if kind == ExitKind::Interrupted && target.is_none() {
            // A host kick can stop the vCPU where single-stepping never does
            // (right after IRET, inside an interrupt shadow), so a backup could
            // not land there. Step one instruction and make that the point.
            self.pmu_step_once = true;
            return Ok(());
        }
        let now = self.point()?;
        if let Some(d) = &mut self.pmu {
            self.ls.pending_point = d
                .at_stop(now, target)
                .map_err(|e| Error::Divergence(format!("pmu landing: {e}")))?;
        }
        Ok(())
    }

    /// Run one device access at the current point: the observer may give its
    /// host values first; afterwards the values it took and the outputs it
    /// produced are reported. `access` does the device work; the guest's
    /// instruction is completed by the caller before it returns the error
    /// this gives back.
    fn device_access<R>(
        &mut self,
        at: Access,
        obs: &mut dyn Observer,
        access: impl FnOnce(&mut Self, &mut DeviceCtx) -> R,
    ) -> (R, DeviceCtx, Result<()>) {
        let mut first_err = Ok(());
        let given = match obs.logged_samples(self, at) {
            Ok(g) => g,
            Err(e) => {
                first_err = Err(e);
                None
            }
        };
        let now = self.clock.now_ns();
        let had_given = given.is_some();
        let mut ctx = match given {
            Some(values) => DeviceCtx::replayed(now, values),
            None => DeviceCtx::new(now),
        };
        let r = access(self, &mut ctx);
        let (kind, values) = match ctx.taken() {
            Some((k, v)) => (Some(k), v.to_vec()),
            None => (None, Vec::new()),
        };
        if kind == Some(SampleKind::Time) {
            self.ls.latest_time_ns = values
                .iter()
                .copied()
                .fold(self.ls.latest_time_ns, u64::max);
        }
        if had_given || !values.is_empty() {
            let reported = self
                .point()
                .and_then(|_| obs.on_sample(self, at, kind, &values));
            if first_err.is_ok() {
                first_err = reported;
            }
        }
        let delivered = self.deliver_outputs(&mut ctx, obs);
        if first_err.is_ok() {
            first_err = delivered;
        }
        (r, ctx, first_err)
    }

    /// Hand every output of an access to the observer (for its tag) and then
    /// to the sink. An output whose entry could not be logged still reaches
    /// the sink, untagged; the first error is returned after all of them.
    fn deliver_outputs(&mut self, ctx: &mut DeviceCtx, obs: &mut dyn Observer) -> Result<()> {
        let mut first_err = Ok(());
        for (stream, bytes) in ctx.outputs.drain(..) {
            let out = self.ls.outputs.number(stream, bytes);
            let tag = match self.point().and_then(|_| obs.on_output(self, &out)) {
                Ok(tag) => tag,
                Err(e) => {
                    if first_err.is_ok() {
                        first_err = Err(e);
                    }
                    None
                }
            };
            self.outputs.put(out, tag);
        }
        first_err
    }

    fn emulate_io(&mut self, mut io: IoExit, obs: &mut dyn Observer) -> Result<Option<RunEnd>> {
        let size = io.size;
        let write = io.write;
        let (data, ctx, result) = self.device_access(Access::Port(io.port), obs, |m, ctx| {
            for chunk in io.data.chunks_mut(size) {
                if write {
                    m.devices.pio_write(io.port, chunk, ctx);
                } else {
                    m.devices.pio_read(io.port, chunk, ctx);
                }
            }
            std::mem::take(&mut io.data)
        });
        if !write {
            self.write_io_result(&data);
        }
        result?;
        if ctx.reset {
            return Ok(Some(RunEnd::Shutdown));
        }
        Ok(ctx.stop.map(RunEnd::PowerOff))
    }

    fn emulate_mmio(
        &mut self,
        addr: u64,
        write: bool,
        mut data: Vec<u8>,
        obs: &mut dyn Observer,
    ) -> Result<()> {
        let (data, _, result) = self.device_access(Access::Mmio(addr), obs, |m, ctx| {
            if write {
                m.devices.mmio_write(addr, &data, ctx);
            } else {
                m.devices.mmio_read(addr, &mut data, ctx);
            }
            data
        });
        if !write {
            let run = self.vcpu.get_kvm_run();
            // SAFETY: the last exit was KVM_EXIT_MMIO, so `mmio` is the live
            // union member; we write at most its 8 data bytes.
            let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
            let n = data.len().min(mmio.data.len());
            mmio.data[..n].copy_from_slice(&data[..n]);
        }
        result
    }

    fn emulate_msr(
        &mut self,
        index: u32,
        value: Option<u64>,
        obs: &mut dyn Observer,
    ) -> Result<()> {
        let mut result: (Option<u64>, Result<()>) = (None, Ok(()));
        if value.is_none() && index == crate::arch::msr::IA32_TSC {
            // A 1 GHz TSC derived from the device clock: a logged clock read.
            let (v, _, r) = self.device_access(Access::Msr(index), obs, |_, ctx| {
                let ns = ctx.now_ns;
                ctx.sample(
                    SampleKind::Time,
                    ns.saturating_mul(MSR_TSC_HZ / 1_000_000_000),
                )
            });
            result = (Some(v), r);
        }
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_X86_RDMSR/WRMSR, so `msr` is the
        // live union member.
        let msr = unsafe { &mut run.__bindgen_anon_1.msr };
        match (value, result.0) {
            (None, Some(v)) => {
                msr.data = v;
                msr.error = 0;
            }
            // TSC writes are ignored; everything else filtered raises #GP.
            (Some(_), _) if index == crate::arch::msr::IA32_TSC => msr.error = 0,
            _ => msr.error = 1,
        }
        result.1
    }

    /// Whether the instruction the last step executed was a HLT: it sat at
    /// the previous stop's RIP, was one byte long, and that byte is 0xf4.
    fn stepped_over_hlt(&mut self) -> Result<bool> {
        let rip = self.regs()?.rip;
        let Some(prev) = self.ls.last_step_rip else {
            return Ok(false);
        };
        if prev.wrapping_add(1) != rip {
            return Ok(false);
        }
        let t = self
            .vcpu
            .translate_gva(prev)
            .map_err(Error::kvm("KVM_TRANSLATE"))?;
        if t.valid == 0 {
            return Ok(false);
        }
        let byte: u8 = self
            .memory()
            .read_obj(vm_memory::GuestAddress(t.physical_address))
            .unwrap_or(0);
        Ok(byte == 0xf4)
    }

    /// Element size of the last port access (REP string I/O moves several).
    fn io_elem_size(&mut self) -> usize {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: called right after a KVM_EXIT_IO, so `io` is the live member.
        let size = unsafe { run.__bindgen_anon_1.io.size };
        usize::from(size).max(1)
    }

    /// Put the (possibly replaced) result of a port read back into kvm_run.
    fn write_io_result(&mut self, data: &[u8]) {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO, so `io` is the live member.
        let io = unsafe { run.__bindgen_anon_1.io };
        let len = (io.size as usize) * (io.count as usize);
        let base = run as *mut kvm_bindings::kvm_run as *mut u8;
        // SAFETY: KVM guarantees `data_offset .. data_offset + size*count`
        // lies inside the kvm_run mapping, and `len` bytes is what it holds.
        let dst = unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len) };
        let n = len.min(data.len());
        dst[..n].copy_from_slice(&data[..n]);
    }
}

enum Exit {
    Io(IoExit),
    Mmio(u64, bool, Vec<u8>),
    Msr(u32, Option<u64>),
    Kind(ExitKind),
    End(RunEnd),
}
