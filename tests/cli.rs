//! The `ftvmm` command's errors, as a user sees them.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

fn ftvmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvmm"))
}

fn stderr_of(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("ftvmm runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_kernel_file_is_named() {
    let (code, err) = stderr_of(ftvmm().args(["run", "--kernel", "/nonexistent/vmlinux"]));
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read kernel /nonexistent/vmlinux"),
        "{err}"
    );
}

#[test]
fn too_little_memory_is_refused() {
    if !common::kvm_or_skip() {
        return;
    }
    let (code, err) = stderr_of(ftvmm().args(["run", "--mem", "2", "--no-stdin"]));
    assert_eq!(code, 1);
    assert!(err.contains("guest memory of 2 MiB is too small"), "{err}");
}

#[test]
fn missing_dev_kvm_is_a_clear_error() {
    // Hide /dev/kvm in a private mount namespace (needs root and unshare).
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --no-stdin",
        env!("CARGO_BIN_EXE_ftvmm")
    );
    let (code, err) = stderr_of(Command::new("unshare").args(["--mount", "sh", "-c", &script]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot open /dev/kvm"), "{err}");
}

#[test]
fn run_help_documents_the_options() {
    let out = ftvmm().args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--kernel",
        "--mem",
        "--cmdline",
        "--clock",
        "--seed",
        "--no-stdin",
    ] {
        assert!(text.contains(opt), "run --help lacks {opt}:\n{text}");
    }
}

#[test]
fn a_config_file_supplies_options_and_later_flags_override_it() {
    if !common::kvm_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ftvmm-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("vm.conf");
    std::fs::write(
        &f,
        "# a small guest\nmem = 2\ncmdline = \"ticks=3 hz=100\"\nno_stdin = true\n",
    )
    .unwrap();
    let out = ftvmm()
        .args(["run", "--config"])
        .arg(&f)
        .args(["--mem", "16"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("cmdline: ticks=3 hz=100"), "{text}");

    std::fs::write(&f, "mem 16\n").unwrap();
    let (code, err) = stderr_of(ftvmm().args(["run", "--config"]).arg(&f));
    assert_eq!(code, 1);
    assert!(err.contains("vm.conf line 1"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
