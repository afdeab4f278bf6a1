//! The test guests' flat binaries (`tests/guests/*.bin`, embedded by the
//! other tests) are what their sources assemble to. Rebuild them with
//! `vmm/tests/guests/assemble.sh` after editing a source.

// Test code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

#[test]
fn guest_binaries_match_their_sources() {
    if !(have("as") && have("objcopy")) {
        if std::env::var_os("CI").is_some() {
            panic!("GNU as and objcopy (binutils) are needed to check the test guests");
        }
        eprintln!("SKIPPED: GNU as / objcopy missing; the guest binaries are not checked");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
    let tmp = std::env::temp_dir().join(format!("vmm-guests-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for name in ["irqprint", "irqclock", "samples"] {
        let obj = tmp.join(format!("{name}.o"));
        let bin = tmp.join(format!("{name}.bin"));
        let ok = Command::new("as")
            .current_dir(&dir)
            .args(["--64", "-o"])
            .arg(&obj)
            .arg(format!("{name}.S"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "{name}.S does not assemble");
        let ok = Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin)
            .status()
            .unwrap()
            .success();
        assert!(ok, "objcopy failed on {name}");
        let want = std::fs::read(&bin).unwrap();
        let have = std::fs::read(dir.join(format!("{name}.bin"))).unwrap();
        assert!(
            want == have,
            "tests/guests/{name}.bin is stale: run vmm/tests/guests/assemble.sh"
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
