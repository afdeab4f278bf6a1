//! The Linux guest image the Linux tests use (guest/linux/build.sh), and
//! its kernel command line.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The command line the guest needs on this platform (docs/linux.md).
pub const CMDLINE: &str = include_str!("../../guest/linux/cmdline");

pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The built image; None (after saying why) when it is missing outside CI.
pub fn image_or_skip() -> Option<Image> {
    if !super::kvm_or_skip() {
        return None;
    }
    let dir = std::env::var_os("FTVMM_LINUX_OUT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/linux"),
        PathBuf::from,
    );
    let img = Image {
        kernel: dir.join("vmlinux"),
        initrd: dir.join("initramfs.cpio"),
    };
    if img.kernel.exists() && img.initrd.exists() {
        return Some(img);
    }
    let msg = format!(
        "the Linux guest image is not built ({} or {} missing): run `bash guest/linux/build.sh`",
        img.kernel.display(),
        img.initrd.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// The platform's command line with `ftvmm=WORKLOAD` for /init.
pub fn cmdline(workload: &str) -> String {
    format!("{} ftvmm={workload}", CMDLINE.trim())
}
