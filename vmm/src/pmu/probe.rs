//! Is a guest branch counter available on this host, and which event?
//!
//! The probe opens the same counters the backend will use (a counting one
//! and an overflow-sampling one, both guest-only) on the calling thread and
//! closes them again. It does not prove the counter is *exact*; that needs a
//! guest loop (see [`super::validate`]).

use std::io;
use std::path::Path;

use super::counter::{open_event, Scope};
use super::sys;
use super::PmuError;

/// Intel `BR_INST_RETIRED.CONDITIONAL` (event 0xC4, umask 0x01). The upper
/// byte (USR, INT, EN) is what rr writes too; the kernel rebuilds those bits
/// from the `exclude_*` flags anyway.
pub const INTEL_COND_BRANCHES: u64 = 0x51_01c4;
/// AMD Zen "retired conditional branch instructions" (event 0xD1).
pub const AMD_COND_BRANCHES: u64 = 0x51_00d1;

/// Whose CPU this is, from /proc/cpuinfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD (or HygonGenuine).
    Amd,
    /// Anything else.
    Other,
}

/// The hardware event the counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchEvent {
    /// Intel retired conditional branches (raw 0x5101c4): exact on Intel
    /// cores since Nehalem, the event rr relies on.
    IntelConditional,
    /// AMD Zen retired conditional branches (raw 0x5100d1): counts are
    /// exact but the overflow skid can be large, so needs a wide margin.
    AmdConditional,
    /// `PERF_COUNT_HW_BRANCH_INSTRUCTIONS`, the kernel's generic "branches":
    /// all retired branches, conditional or not. Usable only if the start-up
    /// calibration accepts it; on some CPUs it includes far branches
    /// (interrupts, VM transitions) and is then not deterministic.
    Generic,
}

impl BranchEvent {
    /// The preferred event for a vendor.
    pub fn for_vendor(vendor: CpuVendor) -> Self {
        match vendor {
            CpuVendor::Intel => BranchEvent::IntelConditional,
            CpuVendor::Amd => BranchEvent::AmdConditional,
            CpuVendor::Other => BranchEvent::Generic,
        }
    }

    /// `(perf type, config)` for perf_event_open.
    pub fn type_config(self) -> (u32, u64) {
        match self {
            BranchEvent::IntelConditional => (sys::TYPE_RAW, INTEL_COND_BRANCHES),
            BranchEvent::AmdConditional => (sys::TYPE_RAW, AMD_COND_BRANCHES),
            BranchEvent::Generic => (sys::TYPE_HARDWARE, sys::HW_BRANCH_INSTRUCTIONS),
        }
    }

    /// A human-readable name for messages.
    pub fn name(self) -> &'static str {
        match self {
            BranchEvent::IntelConditional => "BR_INST_RETIRED.CONDITIONAL (raw 0x5101c4)",
            BranchEvent::AmdConditional => "retired conditional branches (raw 0x5100d1)",
            BranchEvent::Generic => "PERF_COUNT_HW_BRANCH_INSTRUCTIONS",
        }
    }
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PmuInfo {
    /// The event that opened.
    pub event: BranchEvent,
    /// The CPU vendor.
    pub vendor: CpuVendor,
    /// Facts about the host, for logs.
    pub host: HostFacts,
}

/// Host facts that explain why the counter is or is not there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// CPU vendor.
    pub vendor: CpuVendor,
    /// CPUID's hypervisor bit: we are ourselves a guest.
    pub in_vm: bool,
    /// /proc/sys/kernel/perf_event_paranoid.
    pub paranoid: Option<i32>,
    /// /sys/module/kvm/parameters/enable_pmu.
    pub kvm_enable_pmu: Option<bool>,
    /// Whether a core PMU (`cpu`, or `cpu_core` on hybrid parts) is
    /// registered under /sys/bus/event_source/devices; `None` when that
    /// directory cannot be read (sysfs not mounted, as in some containers).
    pub core_pmu: Option<bool>,
}

impl HostFacts {
    /// Read the facts from /proc and /sys; missing files read as unknown.
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let sources = Path::new("/sys/bus/event_source/devices");
        HostFacts {
            vendor: vendor_of(&cpuinfo),
            in_vm: has_hypervisor_flag(&cpuinfo),
            paranoid: read_trimmed("/proc/sys/kernel/perf_event_paranoid")
                .and_then(|s| s.parse().ok()),
            kvm_enable_pmu: read_trimmed("/sys/module/kvm/parameters/enable_pmu")
                .map(|s| s == "Y" || s == "1"),
            core_pmu: sources
                .is_dir()
                .then(|| sources.join("cpu").exists() || sources.join("cpu_core").exists()),
        }
    }

    /// The paranoid level as text for messages.
    pub fn paranoid_text(&self) -> String {
        self.paranoid
            .map_or_else(|| "unknown".to_owned(), |p| p.to_string())
    }

    /// Why there is no PMU, in words.
    pub fn no_pmu_detail(&self) -> String {
        let mut s = String::from(
            "the kernel registered no core PMU (no `cpu` under /sys/bus/event_source/devices)",
        );
        if self.in_vm {
            s.push_str("; this host is itself a virtual machine (CPUID hypervisor bit) without a virtual PMU");
        }
        if self.kvm_enable_pmu == Some(false) {
            s.push_str("; kvm.enable_pmu=N");
        }
        s
    }
}

/// Find a usable guest branch counter on the calling thread.
pub fn probe() -> Result<PmuInfo, PmuError> {
    let host = HostFacts::read();
    probe_with(&host, |event| {
        open_event(event, Scope::GuestOnly, 0, false)?;
        open_event(event, Scope::GuestOnly, 0, true)?;
        Ok(())
    })
}

/// The probe's decisions, with the opening of an event injectable for tests.
pub fn probe_with(
    host: &HostFacts,
    mut try_open: impl FnMut(BranchEvent) -> io::Result<()>,
) -> Result<PmuInfo, PmuError> {
    if host.core_pmu == Some(false) {
        return Err(PmuError::NoPmu {
            detail: host.no_pmu_detail(),
        });
    }
    let mut last = None;
    for event in candidates(host.vendor) {
        match try_open(event) {
            Ok(()) => {
                tracing::info!(event = event.name(), "pmu: guest branch counter available");
                return Ok(PmuInfo {
                    event,
                    vendor: host.vendor,
                    host: host.clone(),
                });
            }
            Err(e) if is_unsupported(&e) => {
                tracing::debug!(event = event.name(), error = %e, "pmu: event refused");
                last = Some((event, e));
            }
            Err(e) => return Err(open_error(e, event, host)),
        }
    }
    Err(match last {
        Some((event, e)) => open_error(e, event, host),
        None => PmuError::Invalid("no candidate event".to_owned()),
    })
}

/// Events to try, best first.
fn candidates(vendor: CpuVendor) -> Vec<BranchEvent> {
    match vendor {
        CpuVendor::Other => vec![BranchEvent::Generic],
        v => vec![BranchEvent::for_vendor(v), BranchEvent::Generic],
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENODEV | libc::EOPNOTSUPP | libc::EINVAL)
    )
}

/// Turn a failed perf_event_open into the error the user should see.
pub fn open_error(e: io::Error, event: BranchEvent, host: &HostFacts) -> PmuError {
    let errno_name = sys::errno_name(&e);
    match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => PmuError::NotPermitted {
            errno_name,
            paranoid: host.paranoid_text(),
        },
        Some(libc::ENOENT | libc::ENODEV) if host.core_pmu == Some(false) => PmuError::NoPmu {
            detail: host.no_pmu_detail(),
        },
        Some(libc::ENOENT | libc::ENODEV | libc::EOPNOTSUPP | libc::EINVAL) => {
            PmuError::Unsupported {
                what: unsupported_what(event, host),
                errno_name,
                source: e,
            }
        }
        _ => PmuError::Sys {
            op: "perf_event_open",
            source: e,
        },
    }
}

fn unsupported_what(event: BranchEvent, host: &HostFacts) -> String {
    let mut s = format!(
        "a guest-only (exclude_host) overflow-sampling counter of {}",
        event.name()
    );
    if host.in_vm {
        s.push_str(" (this host is a virtual machine: its virtual PMU lacks the event, guest/host filtering or overflow interrupts)");
    }
    s
}

fn vendor_of(cpuinfo: &str) -> CpuVendor {
    let id = cpuinfo
        .lines()
        .find(|l| l.starts_with("vendor_id"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("");
    match id {
        "GenuineIntel" => CpuVendor::Intel,
        "AuthenticAMD" | "HygonGenuine" => CpuVendor::Amd,
        _ => CpuVendor::Other,
    }
}

fn has_hypervisor_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "hypervisor"))
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pmu::{BranchCounter, PerfCounter, SignalTarget};

    fn host(core_pmu: Option<bool>) -> HostFacts {
        HostFacts {
            vendor: CpuVendor::Intel,
            in_vm: true,
            paranoid: Some(2),
            kvm_enable_pmu: Some(false),
            core_pmu,
        }
    }

    fn assert_advises_fallback(msg: &str) {
        assert!(msg.contains("--backend exits"), "{msg}");
        assert!(msg.contains("--backend singlestep"), "{msg}");
    }

    /// The probe on the real host. The development and CI hosts have no
    /// PMU, so this checks the refusal is the clear one; on a host with a
    /// PMU it checks that the same event counts on the host side.
    #[test]
    fn probe_on_this_host_is_clear_or_counts() {
        match probe() {
            Err(e) => {
                let msg = e.to_string();
                eprintln!("probe refused: {msg}");
                assert_advises_fallback(&msg);
                assert!(
                    matches!(
                        e,
                        PmuError::NoPmu { .. }
                            | PmuError::Unsupported { .. }
                            | PmuError::NotPermitted { .. }
                    ),
                    "unexpected kind: {e:?}"
                );
            }
            Ok(info) => {
                eprintln!("probe found {:?}", info.event);
                let target = SignalTarget::current_thread(libc::SIGRTMIN() + 2);
                let mut c = PerfCounter::open(info.event, Scope::HostThread, target)
                    .expect("host counter opens");
                let before = c.read().expect("read");
                let mut x = 0u64;
                for i in 0..100_000u64 {
                    if std::hint::black_box(i) % 3 == 0 {
                        x += 1;
                    }
                }
                std::hint::black_box(x);
                let after = c.read().expect("read");
                assert!(
                    after - before >= 100_000,
                    "counted {} branches",
                    after - before
                );
            }
        }
    }

    #[test]
    fn no_core_pmu_names_the_vm_and_the_fallback() {
        let e = probe_with(&host(Some(false)), |_| Ok(())).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("no core PMU"), "{msg}");
        assert!(msg.contains("virtual machine"), "{msg}");
        assert!(msg.contains("enable_pmu=N"), "{msg}");
        assert_advises_fallback(&msg);
    }

    #[test]
    fn permission_error_names_paranoid() {
        let e = probe_with(&host(Some(true)), |_| {
            Err(io::Error::from_raw_os_error(libc::EACCES))
        })
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("perf_event_paranoid is 2"), "{msg}");
        assert!(msg.contains("EACCES"), "{msg}");
        assert_advises_fallback(&msg);
    }

    #[test]
    fn unsupported_raw_event_falls_back_to_generic() {
        let mut tried = vec![];
        let info = probe_with(&host(Some(true)), |ev| {
            tried.push(ev);
            match ev {
                BranchEvent::Generic => Ok(()),
                _ => Err(io::Error::from_raw_os_error(libc::ENOENT)),
            }
        })
        .unwrap();
        assert_eq!(info.event, BranchEvent::Generic);
        assert_eq!(
            tried,
            vec![BranchEvent::IntelConditional, BranchEvent::Generic]
        );
    }

    #[test]
    fn all_unsupported_reports_the_errno() {
        let e = probe_with(&host(Some(true)), |_| {
            Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
        })
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("EOPNOTSUPP"), "{msg}");
        assert!(msg.contains("exclude_host"), "{msg}");
        assert_advises_fallback(&msg);
    }

    #[test]
    fn unknown_sysfs_still_tries_to_open() {
        let info = probe_with(&host(None), |_| Ok(())).unwrap();
        assert_eq!(info.event, BranchEvent::IntelConditional);
    }

    #[test]
    fn cpuinfo_parsing() {
        let info = "vendor_id\t: GenuineIntel\nflags\t\t: fpu vme hypervisor lahf_lm\n";
        assert_eq!(vendor_of(info), CpuVendor::Intel);
        assert!(has_hypervisor_flag(info));
        assert_eq!(vendor_of("vendor_id : AuthenticAMD\n"), CpuVendor::Amd);
        assert!(!has_hypervisor_flag("flags : fpu vme\n"));
        assert_eq!(vendor_of(""), CpuVendor::Other);
    }
}
