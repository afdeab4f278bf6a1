//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod linux;
pub mod pair;

use ftvmm::console::Capture;
use vmm::clock::ClockMode;
use vmm::devices::ftclock::Entropy;
use vmm::MachineConfig;

/// Tests need KVM. In CI its absence is a failure; elsewhere the test says
/// so loudly and returns early.
pub fn kvm_or_skip() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("/dev/kvm is missing: KVM is required in CI");
    }
    eprintln!("SKIPPED: /dev/kvm is missing on this machine");
    false
}

/// The network tests need KVM, root (for network namespaces), iproute2,
/// TAP devices and redis-cli. In CI a missing one is a failure; elsewhere
/// the test says which is missing and returns early.
pub fn net_or_skip() -> bool {
    if !kvm_or_skip() {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // Only whether the program starts matters, not its exit code.
    let have = |cmd: &str| {
        std::process::Command::new(cmd)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok()
    };
    let missing = [
        (!root).then_some("root (network namespaces)"),
        (!have("ip")).then_some("ip (iproute2)"),
        (!have("redis-cli")).then_some("redis-cli (redis-tools)"),
        (!std::path::Path::new("/dev/net/tun").exists()).then_some("/dev/net/tun"),
    ];
    let missing: Vec<&str> = missing.into_iter().flatten().collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("the network tests need {}", missing.join(", "));
    }
    eprintln!("SKIPPED: the network tests need {}", missing.join(", "));
    false
}

/// A config for the bundled guest writing into `out`.
pub fn config(cmdline: &str, out: &Capture) -> MachineConfig {
    MachineConfig::new(32, cmdline, Box::new(out.clone()))
}

/// A reproducible config: virtual time and seeded entropy.
pub fn deterministic(cmdline: &str, out: &Capture) -> MachineConfig {
    let mut c = config(cmdline, out);
    c.clock = ClockMode::Virtual {
        ns_per_exit: 20_000,
    };
    c.entropy = Entropy::Seeded(42);
    c.points = vmm::points::PointMode::Exits;
    c
}

/// The `tick N digest X` lines of a console transcript.
pub fn digest_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("tick ") || l.starts_with("done "))
        .map(str::to_string)
        .collect()
}

/// 0..1 from a small generator seeded by the clock (printed for reruns).
pub fn random_fractions(n: usize) -> Vec<f64> {
    let mut s = std::env::var("FTVMM_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("FTVMM_TEST_SEED={s}");
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}
