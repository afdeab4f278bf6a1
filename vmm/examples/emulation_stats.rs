//! Boot a kernel live and report what the VMM emulated for it.
//!
//! `cargo run --release -p vmm --example emulation_stats -- KERNEL [CMDLINE]`
//!
//! The serial console goes to stdout. The run ends when the guest powers
//! off, or when the console shows `STOP_AT` (default: the end of a kernel
//! panic, which is where a kernel without an initrd ends up); then the time
//! to each milestone and the emulation statistics are printed to stderr.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm::{Machine, MachineConfig};

/// Console bytes to stdout, watching for milestones.
struct Watch {
    line: Vec<u8>,
    start: Instant,
    marks: Arc<Mutex<Vec<(f64, String)>>>,
    inputs: Arc<Mutex<Option<vmm::inputs::HostInputs>>>,
    stop_at: String,
}

const MILESTONES: [&str; 4] = [
    "printk: console",
    "Freeing unused kernel",
    "Run /",
    "Kernel panic",
];

impl Write for Watch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().write_all(buf)?;
        for &b in buf {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let l = String::from_utf8_lossy(&self.line).to_string();
            self.line.clear();
            let t = self.start.elapsed().as_secs_f64();
            if MILESTONES.iter().any(|m| l.contains(m)) {
                self.marks.lock().expect("lock").push((t, l.clone()));
            }
            if l.contains(&self.stop_at) {
                if let Some(i) = self.inputs.lock().expect("lock").as_ref() {
                    i.request_stop();
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(kernel) = args.next() else {
        eprintln!("usage: emulation_stats KERNEL [CMDLINE]");
        std::process::exit(2);
    };
    let cmdline = args.next().unwrap_or_else(|| {
        "console=ttyS0 noapic nolapic notsc lpj=1000000 clearcpuid=rdrand,rdseed".into()
    });
    let stop_at = std::env::var("STOP_AT").unwrap_or_else(|_| "end Kernel panic".into());
    let image = std::fs::read(&kernel).expect("read kernel");
    let marks = Arc::new(Mutex::new(Vec::new()));
    let inputs = Arc::new(Mutex::new(None));
    let start = Instant::now();
    let watch = Watch {
        line: Vec::new(),
        start,
        marks: marks.clone(),
        inputs: inputs.clone(),
        stop_at,
    };
    let cfg = MachineConfig::new(256, &cmdline, Box::new(vmm::output::ConsoleWriter(watch)));
    let mut m = Machine::new(cfg, &image).expect("create VM");
    *inputs.lock().expect("lock") = Some(m.host_inputs());
    let end = m.run(&mut vmm::Live);
    let secs = start.elapsed().as_secs_f64();
    eprintln!();
    eprintln!("run ended after {secs:.1} s: {end:?}");
    for (t, l) in marks.lock().expect("lock").iter() {
        eprintln!("  {t:6.1} s  {l}");
    }
    eprintln!("emulated: {}", m.emulation_stats());
    eprintln!("deterministic exits: {}", m.exit_count());
}
