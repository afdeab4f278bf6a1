//! The `ftvmm` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ftvmm::{console, guest};
use vmm::clock::ClockMode;
use vmm::devices::ftclock::Entropy;
use vmm::{Live, Machine, MachineConfig, RunEnd};

/// Fault-tolerant virtual machines on KVM.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest (the bundled one unless --kernel is given) and show its
    /// serial console on stdout; stdin goes to the guest's serial port.
    Run(RunArgs),
}

/// What a VM is made of.
#[derive(Args, Clone)]
struct VmArgs {
    /// Kernel image: a 64-bit ELF (plain or PVH entry) or a bzImage.
    /// Default: the bundled test guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest memory in MiB (4 to 3072).
    #[arg(long, default_value_t = 64)]
    mem: u64,
    /// Kernel command line. For the bundled guest: hz=N ticks=N work=N
    /// digest_every=N user=0|1 (see docs/guest.md).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Device time source: `host` (real time) or `virtual` (advances with the
    /// guest's own exits, so a run is reproducible).
    #[arg(long, value_enum, default_value_t = ClockArg::Host)]
    clock: ClockArg,
    /// Virtual clock only: nanoseconds of guest time per VM exit.
    #[arg(long, default_value_t = 20_000)]
    ns_per_exit: u64,
    /// Seed ftclock's entropy (default: host randomness).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum ClockArg {
    Host,
    Virtual,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Do not forward stdin to the guest's serial port.
    #[arg(long)]
    no_stdin: bool,
}

impl VmArgs {
    fn kernel_image(&self) -> Result<Vec<u8>> {
        match &self.kernel {
            Some(p) => {
                std::fs::read(p).with_context(|| format!("cannot read kernel {}", p.display()))
            }
            None => Ok(guest::GUEST_ELF.to_vec()),
        }
    }

    fn config(&self) -> MachineConfig {
        let mut cfg = MachineConfig::new(self.mem, &self.cmdline, Box::new(console::Stdout));
        cfg.clock = match self.clock {
            ClockArg::Host => ClockMode::Host,
            ClockArg::Virtual => ClockMode::Virtual {
                ns_per_exit: self.ns_per_exit,
            },
        };
        cfg.entropy = self.seed.map_or(Entropy::Host, Entropy::Seeded);
        cfg
    }
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let image = args.vm.kernel_image()?;
    let mut m = Machine::new(args.vm.config(), &image).context("cannot start the VM")?;
    if !args.no_stdin {
        console::forward_stdin(m.host_inputs());
    }
    let start = Instant::now();
    let end = m.run(&mut Live).context("the VM failed")?;
    let secs = start.elapsed().as_secs_f64();
    tracing::info!(exits = m.exit_count(), secs, "VM stopped: {end:?}");
    Ok(match end {
        RunEnd::PowerOff(code) => ExitCode::from(code),
        RunEnd::HaltedForever => {
            eprintln!("ftvmm: the guest halted with interrupts disabled");
            ExitCode::from(2)
        }
        RunEnd::Shutdown => {
            eprintln!("ftvmm: the guest triple-faulted (shutdown)");
            ExitCode::from(3)
        }
        RunEnd::Paused | RunEnd::Stopped => ExitCode::SUCCESS,
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ftvmm: {e:#}");
            ExitCode::from(1)
        }
    }
}
