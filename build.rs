//! Builds the bundled test guest (`guest/`, a `no_std` kernel) with a nested
//! cargo and leaves it at `$OUT_DIR/ftvmm-guest.elf` for `src/guest.rs`.
//!
//! The guest is its own workspace (excluded from ours) built for the host
//! triple with flags that make a freestanding, statically linked ELF at
//! 1 MiB; see docs/guest.md.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest = manifest_dir.join("guest");
    for p in ["src", "Cargo.toml", "Cargo.lock", "link.ld"] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    println!("cargo:rerun-if-changed=build.rs");

    let target_dir = out_dir.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        // The guest's own dependencies (smoltcp) come from its lock file.
        .arg("--locked")
        .arg("--manifest-path")
        .arg(guest.join("Cargo.toml"))
        .arg("--target")
        .arg(TARGET)
        .arg("--target-dir")
        .arg(&target_dir);
    // What the outer build sets for itself (flags, wrappers such as clippy's,
    // target and profile overrides) must not leak into the guest's build.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PROFILE_")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "CARGO_ENCODED_RUSTFLAGS"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "CARGO_BUILD_RUSTC_WRAPPER"
                    | "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER"
                    | "CARGO_TARGET_DIR"
                    | "CARGO_BUILD_TARGET_DIR"
                    | "CARGO_BUILD_TARGET"
                    | "CARGO_BUILD_RUSTFLAGS"
                    | "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS"
            )
        {
            cmd.env_remove(key);
        }
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        guest_rustflags(&guest.join("link.ld")).join("\x1f"),
    );

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the guest: {e}"));
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        panic!(
            "building the guest ({}) failed with {}; its cargo output is above",
            guest.display(),
            output.status
        );
    }
    let elf = target_dir.join(TARGET).join("release").join("ftvmm-guest");
    let dest = out_dir.join("ftvmm-guest.elf");
    std::fs::copy(&elf, &dest)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", elf.display(), dest.display()));
}

/// A freestanding static ELF at the addresses of `link.ld`.
fn guest_rustflags(link_ld: &Path) -> Vec<String> {
    let mut flags: Vec<String> = [
        "-Crelocation-model=static",
        // Interrupts at CPL0 push onto the current stack.
        "-Cno-redzone=yes",
        "-Clink-arg=-nostartfiles",
        "-Clink-arg=-static",
        "-Clink-arg=-no-pie",
        "-Clink-arg=-Wl,--build-id=none",
    ]
    .map(String::from)
    .to_vec();
    flags.push(format!("-Clink-arg=-T{}", link_ld.display()));
    flags
}
