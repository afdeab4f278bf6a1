//! A test network on one machine, in network namespaces:
//!
//! ```text
//!  client ns                 host ns (both ftvmm processes run here)
//!  veth-c 10.99.0.1 ─── veth-h ─┐
//!                              br0 ── tap-p (primary's guest)
//!                                 └── tap-b (backup's guest, once live)
//! ```
//!
//! The guest answers at 10.99.0.2. Everything is removed on drop, also when
//! a test fails (deleting a namespace deletes the interfaces in it). Used by
//! the network tests, the network bench and the demo; needs root and
//! iproute2.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicU32, Ordering};

/// The guest's address on the test network.
pub const GUEST_IP: &str = "10.99.0.2";
/// The client's address.
pub const CLIENT_IP: &str = "10.99.0.1";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The two namespaces and their links.
pub struct TestNet {
    /// Where the VMs and the bridge live.
    pub host: String,
    /// Where clients run.
    pub client: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    ip(&a)
}

impl TestNet {
    /// Build the network; `tag` keeps parallel tests apart.
    pub fn new(tag: &str) -> Result<TestNet> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{}-{n}", tag, std::process::id());
        let net = TestNet {
            host: format!("ftvmm-h-{id}"),
            client: format!("ftvmm-c-{id}"),
        };
        // Drop cleans up whatever part of this was made.
        ip(&["netns", "add", &net.host])?;
        ip(&["netns", "add", &net.client])?;
        let h = net.host.as_str();
        let c = net.client.as_str();
        in_ns(h, &["link", "set", "lo", "up"])?;
        in_ns(c, &["link", "set", "lo", "up"])?;
        in_ns(h, &["link", "add", "br0", "type", "bridge"])?;
        for tap in ["tap-p", "tap-b"] {
            in_ns(h, &["tuntap", "add", tap, "mode", "tap"])?;
            in_ns(h, &["link", "set", tap, "master", "br0", "up"])?;
        }
        in_ns(
            h,
            &[
                "link", "add", "veth-h", "type", "veth", "peer", "name", "veth-c", "netns", c,
            ],
        )?;
        in_ns(h, &["link", "set", "veth-h", "master", "br0", "up"])?;
        in_ns(h, &["link", "set", "br0", "up"])?;
        in_ns(
            c,
            &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "veth-c"],
        )?;
        in_ns(c, &["link", "set", "veth-c", "up"])?;
        Ok(net)
    }

    /// `prog args...` run inside the host namespace.
    pub fn host_command(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host, prog]);
        c
    }

    /// `prog args...` run inside the client namespace.
    pub fn client_command(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.client, prog]);
        c
    }

    /// Move the calling thread into the client namespace: sockets it opens
    /// from then on are on the test network.
    pub fn enter_client(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{}", self.client);
        let f = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
        // SAFETY: setns on a namespace fd we hold open; it changes only the
        // calling thread's network namespace.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// A counter of an interface in the host namespace (`rx_packets` of a
    /// TAP counts the frames its VMM put on the wire).
    pub fn host_counter(&self, dev: &str, counter: &str) -> Result<u64> {
        let out = self
            .host_command("cat")
            .arg(format!("/sys/class/net/{dev}/statistics/{counter}"))
            .output()
            .context("cannot run cat")?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("no counter {counter} for {dev}"))
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for ns in [&self.client, &self.host] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}
