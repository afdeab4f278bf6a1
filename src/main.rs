//! The `ftvmm` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ftlog::ExecBackend;
use ftvmm::rr::{self, RecordOptions};
use ftvmm::{console, guest};
use vmm::clock::ClockMode;
use vmm::devices::ftclock::Entropy;
use vmm::points::PointMode;
use vmm::{Live, Machine, MachineConfig, RunEnd};

/// Fault-tolerant virtual machines on KVM.
#[derive(Parser)]
#[command(version, about, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest (the bundled one unless --kernel is given) and show its
    /// serial console on stdout; stdin goes to the guest's serial port.
    Run(Box<RunArgs>),
    /// Boot a guest and record everything non-deterministic it sees into a
    /// log, showing its console as `run` does.
    Record(RecordArgs),
    /// Replay a log on the same kernel, checking state digests on the way;
    /// shows the replayed console. Exits 1 with a report on divergence.
    Replay(ReplayArgs),
    /// Record the bundled guest, replay the log, and show that both runs
    /// reach the same state; then fail over a primary/backup pair, and (as
    /// root) a networked pair under a TCP client.
    Demo(DemoArgs),
}

#[derive(Args)]
struct RecordArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// The log file to write.
    #[arg(long)]
    log: PathBuf,
    /// Execution-point backend: pmu (needs a hardware PMU), singlestep, or
    /// exits. Default: pmu where it works, else exits.
    #[arg(long)]
    backend: Option<ExecBackend>,
    /// Host milliseconds between state digests in the log (0: only at the end).
    #[arg(long, default_value_t = 200)]
    digest_ms: u64,
    /// Do not forward stdin to the guest's serial port.
    #[arg(long)]
    no_stdin: bool,
}

#[derive(Args)]
struct ReplayArgs {
    /// The log file to replay.
    #[arg(long)]
    log: PathBuf,
    /// The kernel the log was recorded with (default: the bundled guest).
    /// Memory size and command line come from the log.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The initrd the log was recorded with, if any.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Do not show the replayed console.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Execution-point backend for the recording.
    #[arg(long)]
    backend: Option<ExecBackend>,
    /// Seconds of guest run time to record.
    #[arg(long, default_value_t = 3)]
    seconds: u32,
}

/// What a VM is made of.
#[derive(Args, Clone)]
struct VmArgs {
    /// Kernel image: a 64-bit ELF (plain or PVH entry) or a bzImage.
    /// Default: the bundled test guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// An initrd (initramfs, e.g. an uncompressed cpio) for the kernel: the
    /// first PVH module, or the bzImage ramdisk. Its digest goes into a
    /// recording's log header.
    #[arg(long)]
    initrd: Option<PathBuf>,
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
    /// Read options from FILE: one `name = value` per line, named like the
    /// long options (`peer = "backup:7000"`, `primary = true`); `#` starts a
    /// comment. Options given after --config override the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    vm: VmArgs,
    /// Do not forward stdin to the guest's serial port.
    #[arg(long)]
    no_stdin: bool,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    ft: FtArgs,
}

/// The guest's network device.
#[derive(Args)]
struct NetArgs {
    /// Give the guest a virtio-net device (virtio-mmio at 0xd0000000, IRQ 5)
    /// backed by this host TAP interface. A primary uses it from the start, a
    /// backup only once it goes live.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// The guest's MAC address (a backup takes the primary's).
    #[arg(
        long,
        value_name = "MAC",
        default_value = "52:54:00:12:34:56",
        requires = "tap"
    )]
    mac: String,
}

impl NetArgs {
    fn options(&self) -> Result<Option<ftvmm::net::NetOptions>> {
        let Some(tap) = &self.tap else {
            return Ok(None);
        };
        Ok(Some(ftvmm::net::NetOptions {
            tap: tap.clone(),
            mac: netdev::parse_mac(&self.mac)?,
        }))
    }
}

/// Fault tolerance: run as a primary or a backup.
#[derive(Args)]
struct FtArgs {
    /// Run as the primary, streaming the log to the backup at --peer.
    #[arg(long, conflicts_with = "backup", requires_all = ["peer", "arbiter", "console_file"])]
    primary: bool,
    /// Run as the backup, replaying the log received on --listen.
    #[arg(long, requires_all = ["listen", "arbiter", "console_file"])]
    backup: bool,
    /// Run as one node of a pair, with the same command line on both hosts
    /// (each with its own --listen and the other's --peer): join the live
    /// peer as its backup, or boot the guest after winning a new
    /// generation; after every failover the survivor accepts the other
    /// node back (docs/failover.md).
    #[arg(long, conflicts_with_all = ["primary", "backup"], requires_all = ["listen", "peer", "arbiter", "console_file"])]
    pair: bool,
    /// The backup's logging-channel address. A primary pairs with the
    /// backup there; a side running alone (a primary whose backup is gone,
    /// a backup that went live) lets a new backup there join the running
    /// guest, so redundancy comes back after every failure.
    #[arg(long, value_name = "HOST:PORT")]
    peer: Option<String>,
    /// Milliseconds a booting primary waits for its backup to listen
    /// before it boots alone (the backup may then join at any time).
    #[arg(long, default_value_t = 5000)]
    backup_wait_ms: u64,
    /// Where to accept the primary (backup).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Shared key of the logging channel (both sides); prefer FTVMM_KEY.
    #[arg(long, env = "FTVMM_KEY", default_value = "", hide_env_values = true)]
    key: String,
    /// Directory on storage both hosts share: the split-brain guard.
    #[arg(long, value_name = "DIR")]
    arbiter: Option<PathBuf>,
    /// This node's name for the arbiter (default: role@hostname-pid).
    #[arg(long)]
    node_id: Option<String>,
    /// Console output file, written at stream offsets by whichever side is
    /// live (an outside reader sees one continuous stream).
    #[arg(long, value_name = "PATH")]
    console_file: Option<PathBuf>,
    /// Milliseconds of silence after which the peer counts as dead.
    #[arg(long, default_value_t = 1000)]
    peer_timeout_ms: u64,
    /// UDP heartbeats: this side's address (needs --heartbeat-peer).
    #[arg(long, value_name = "HOST:PORT", requires = "heartbeat_peer")]
    heartbeat_local: Option<String>,
    /// UDP heartbeats: the peer's heartbeat address.
    #[arg(long, value_name = "HOST:PORT", requires = "heartbeat_local")]
    heartbeat_peer: Option<String>,
    /// Milliseconds without heartbeats after which the peer counts as dead
    /// (default: --peer-timeout-ms).
    #[arg(long)]
    heartbeat_timeout_ms: Option<u64>,
    /// Milliseconds the backup's replay may fall behind the primary before
    /// the primary is slowed; a backup that keeps it slowed for this plus
    /// --peer-timeout-ms is declared dead (arbiter, then alone).
    #[arg(long, default_value_t = 1000)]
    lag_bound_ms: u64,
    /// A cap in log entries on the same lag (default 10000).
    #[arg(long)]
    lag_bound_entries: Option<u64>,
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

    fn config(&self) -> Result<MachineConfig> {
        let mut cfg = MachineConfig::new(self.mem, &self.cmdline, Box::new(console::Stdout));
        cfg.initrd = read_initrd(self.initrd.as_deref())?;
        cfg.clock = match self.clock {
            ClockArg::Host => ClockMode::Host,
            ClockArg::Virtual => ClockMode::Virtual {
                ns_per_exit: self.ns_per_exit,
            },
        };
        cfg.entropy = self.seed.map_or(Entropy::Host, Entropy::Seeded);
        Ok(cfg)
    }
}

fn read_initrd(path: Option<&std::path::Path>) -> Result<Option<Vec<u8>>> {
    path.map(|p| std::fs::read(p).with_context(|| format!("cannot read initrd {}", p.display())))
        .transpose()
}

fn run_ft(args: &RunArgs, image: &[u8]) -> Result<ExitCode> {
    let f = &args.ft;
    let role = if f.primary {
        "primary"
    } else if f.pair {
        "pair"
    } else {
        "backup"
    };
    if f.key.is_empty() {
        anyhow::bail!("the logging channel needs a shared key: set FTVMM_KEY or pass --key");
    }
    let ft = ftvmm::ft_options::FtOptions {
        key: f.key.as_bytes().to_vec(),
        arbiter: f.arbiter.clone().context("--arbiter is required")?,
        node_id: match (&f.node_id, &f.listen) {
            (Some(id), _) => id.clone(),
            // A pair's node keeps its id across restarts: the arbiter lets
            // the latest winner, and only it, start the next generation.
            (None, Some(listen)) if f.pair => ftvmm::arbiter::stable_node_id(role, listen),
            _ => ftvmm::arbiter::default_node_id(role),
        },
        console: f
            .console_file
            .clone()
            .context("--console-file is required")?,
        peer_timeout: Duration::from_millis(f.peer_timeout_ms),
        digest_every: Duration::from_millis(200),
        lag_bound: f.lag_bound_entries,
        lag_time_bound: Duration::from_millis(f.lag_bound_ms),
        heartbeat: f.heartbeat_local.clone().zip(f.heartbeat_peer.clone()),
        heartbeat_timeout: Duration::from_millis(
            f.heartbeat_timeout_ms.unwrap_or(f.peer_timeout_ms),
        ),
        net: args.net.options()?,
        backup_wait: Duration::from_millis(f.backup_wait_ms),
        rejoin: f.peer.clone().filter(|_| f.backup || f.pair),
    };
    let cfg = args.vm.config()?;
    let end = if f.pair {
        let listen = f.listen.as_deref().context("--listen is required")?;
        let peer = f.peer.as_deref().context("--peer is required")?;
        ftvmm::pair::run_pair(image, cfg, listen, peer, &ft)?
    } else if f.primary {
        let peer = f.peer.as_deref().context("--peer is required")?;
        ftvmm::primary::run_primary(image, cfg, peer, &ft)?
            .end
            .unwrap_or(RunEnd::Stopped)
    } else {
        let listen = f.listen.as_deref().context("--listen is required")?;
        ftvmm::backup::run_backup(image, cfg, listen, &ft)?
    };
    eprintln!("ftvmm: {role} stopped: {end:?}");
    Ok(end_code(end))
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let image = args.vm.kernel_image()?;
    if args.ft.primary || args.ft.backup || args.ft.pair {
        return run_ft(&args, &image);
    }
    let mut m = Machine::new(args.vm.config()?, &image).context("cannot start the VM")?;
    if !args.no_stdin {
        console::forward_stdin(m.host_inputs());
    }
    let _tap = match args.net.options()? {
        Some(n) => {
            ftvmm::net::attach(&mut m, n.mac)?;
            let live = ftvmm::net::LiveTap::open(&n.tap, &m)?;
            live.announce(n.mac);
            m.set_output_sink(Box::new(ftvmm::output::Direct::new(
                ftvmm::output::ConsoleTarget::Stream(Box::new(console::Stdout)),
                Some(live.tap().clone()),
            )));
            Some(live)
        }
        None => None,
    };
    let start = Instant::now();
    let end = m.run(&mut Live).context("the VM failed")?;
    let secs = start.elapsed().as_secs_f64();
    tracing::info!(
        exits = m.exit_count(),
        secs,
        rdtsc = m.rdtsc_traps().answered,
        "VM stopped: {end:?}"
    );
    Ok(match end {
        RunEnd::PowerOff(code) => ExitCode::from(code),
        RunEnd::HaltedForever => {
            // How Linux without ACPI ends `poweroff` and `halt`
            // (docs/linux.md); for other guests, a halt nothing can wake.
            eprintln!("ftvmm: the guest halted (Linux: powered off): HLT with interrupts disabled");
            ExitCode::from(2)
        }
        RunEnd::Shutdown => {
            eprintln!("ftvmm: the guest reset the machine (a triple fault, or Linux rebooting)");
            ExitCode::from(3)
        }
        RunEnd::Paused | RunEnd::Stopped => ExitCode::SUCCESS,
    })
}

fn end_code(end: RunEnd) -> ExitCode {
    match end {
        RunEnd::PowerOff(code) => ExitCode::from(code),
        RunEnd::HaltedForever => ExitCode::from(2),
        RunEnd::Shutdown => ExitCode::from(3),
        RunEnd::Paused | RunEnd::Stopped => ExitCode::SUCCESS,
    }
}

fn record(args: RecordArgs) -> Result<ExitCode> {
    let image = args.vm.kernel_image()?;
    let opts = RecordOptions {
        backend: args.backend.unwrap_or_else(PointMode::best_available),
        digest_every: (args.digest_ms > 0).then(|| Duration::from_millis(args.digest_ms)),
        net_mac: None,
    };
    let done = rr::record_file(&image, args.vm.config()?, &args.log, opts, !args.no_stdin)?;
    Ok(end_code(done.end))
}

fn replay(args: ReplayArgs) -> Result<ExitCode> {
    let image = match &args.kernel {
        Some(p) => {
            std::fs::read(p).with_context(|| format!("cannot read kernel {}", p.display()))?
        }
        None => guest::GUEST_ELF.to_vec(),
    };
    let out: Box<dyn vmm::output::OutputSink> = if args.quiet {
        Box::new(std::io::sink())
    } else {
        Box::new(console::Stdout)
    };
    let initrd = read_initrd(args.initrd.as_deref())?;
    let done = rr::replay_file(&image, initrd.as_deref(), &args.log, out)?;
    Ok(end_code(done.end))
}

fn demo(args: DemoArgs) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the ftvmm executable")?;
    let matched = ftvmm::demo::run(&exe, args.backend, args.seconds)?;
    Ok(if matched {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
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
    let args = match ftvmm::config::expand(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ftvmm: {e}");
            return ExitCode::from(1);
        }
    };
    let cli = Cli::parse_from(args);
    let result = match cli.command {
        Command::Run(a) => run(*a),
        Command::Record(a) => record(a),
        Command::Replay(a) => replay(a),
        Command::Demo(a) => demo(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ftvmm: {e:#}");
            ExitCode::from(1)
        }
    }
}
