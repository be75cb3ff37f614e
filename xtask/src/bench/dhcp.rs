//! `cargo xtask bench dhcp`: openshell-init's DHCP client (the `network` phase) against busybox
//! `udhcpc` with the old system's flags and lease script, both getting an address from the same
//! dnsmasq across a veth pair between two network namespaces made here. Each run starts from a
//! link with no address, and is timed from the client's spawn to the moment the kernel announces
//! the new address (an RTM_NEWADDR notification, heard by a netlink socket in the client's
//! namespace): the same observer for both clients. Clients are spawned straight into the
//! namespace (setns before exec). Our client's own report also says how much of its time is the
//! exchange itself (first DISCOVER sent to ACK received) and how much is ours.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::stats::stats;
use crate::error::{Error, Result};
use crate::paths::workspace;
use crate::process::run as exec;
use crate::tools;

const SERVER_NS: &str = "osh-bench-dhcp-s";
const CLIENT_NS: &str = "osh-bench-dhcp-c";

/// The old system's udhcpc lease script, the one the shell-init boots run in the
/// VM; here with `RESOLV_CONF` pointing into the lab, so the host's resolv.conf is left alone.
const UDHCPC_SCRIPT: &str = "rootfs/base/opt/bench/udhcpc.script";

/// The two namespaces and the server, torn down on drop.
struct Lab {
    server: Option<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in [SERVER_NS, CLIENT_NS] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    exec(Command::new("ip").args(args))
}

/// `program`, started in the client namespace by setns(2) between fork and exec.
fn in_client(program: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(program);
    let ns = format!("/run/netns/{CLIENT_NS}");
    // SAFETY: open and setns are async-signal-safe; nothing else runs in the child.
    unsafe {
        c.pre_exec(move || {
            let f = std::fs::File::open(&ns)?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    c
}

/// A netlink socket in the client namespace subscribed to IPv4 address changes.
struct AddrWatch(std::os::fd::OwnedFd);

impl AddrWatch {
    /// Opened on a short-lived thread that joins the namespace: sockets stay in the namespace
    /// they were made in.
    fn open() -> Result<Self> {
        std::thread::spawn(|| -> std::io::Result<std::os::fd::OwnedFd> {
            use std::os::fd::FromRawFd;
            let f = std::fs::File::open(format!("/run/netns/{CLIENT_NS}"))?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
            // SAFETY: plain socket(2); owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_ROUTE,
                )
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd is fresh and ours.
            let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            // SAFETY: zeroed sockaddr_nl is valid; family and groups set below.
            let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            addr.nl_family = libc::AF_NETLINK as u16;
            addr.nl_groups = libc::RTMGRP_IPV4_IFADDR as u32;
            // SAFETY: addr is a sockaddr_nl of the right size.
            let rc = unsafe {
                libc::bind(
                    fd,
                    (&addr as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as u32,
                )
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(owned)
        })
        .join()
        .map_err(|_| Error::msg("address watcher thread panicked"))?
        .map(AddrWatch)
        .map_err(|e| Error::msg(format!("netlink watch in {CLIENT_NS}: {e}")))
    }

    /// Drops notifications left from earlier runs.
    fn drain(&self) {
        let mut buf = [0u8; 8192];
        use std::os::fd::AsRawFd;
        // SAFETY: reads into a local buffer; MSG_DONTWAIT never blocks.
        while unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
    }

    /// Waits (up to `timeout`) for an RTM_NEWADDR and returns when it arrived.
    fn new_address(&self, timeout: Duration) -> Option<Instant> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 8192];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            let at = Instant::now();
            // SAFETY: reads into a local buffer.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            // The first message's type: bytes 4..6 of the netlink header.
            if n >= 16 && u16::from_ne_bytes([buf[4], buf[5]]) == libc::RTM_NEWADDR {
                return Some(at);
            }
        }
        None
    }
}

fn lab() -> Result<Lab> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::msg(
            "bench dhcp needs root (network namespaces and a DHCP server)",
        ));
    }
    for ns in [SERVER_NS, CLIENT_NS] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    let dir = tempfile::tempdir().map_err(|e| Error::io("create", &std::env::temp_dir(), e))?;
    let mut lab = Lab { server: None, dir };
    ip(&["netns", "add", SERVER_NS])?;
    ip(&["netns", "add", CLIENT_NS])?;
    ip(&[
        "-n", SERVER_NS, "link", "add", "srv0", "type", "veth", "peer", "name", "eth0", "netns",
        CLIENT_NS,
    ])?;
    ip(&[
        "-n",
        SERVER_NS,
        "addr",
        "add",
        "10.78.0.1/24",
        "dev",
        "srv0",
    ])?;
    ip(&["-n", SERVER_NS, "link", "set", "srv0", "up"])?;
    ip(&["-n", CLIENT_NS, "link", "set", "lo", "up"])?;
    ip(&["-n", CLIENT_NS, "link", "set", "eth0", "up"])?;
    let leases = lab.dir.path().join("leases");
    let server = Command::new("ip")
        .args(["netns", "exec", SERVER_NS, "dnsmasq", "--no-daemon"])
        .args(["--conf-file=/dev/null", "--port=0", "--user=root"])
        .args(["--interface=srv0", "--bind-interfaces", "--no-ping"])
        .arg("--dhcp-range=10.78.0.50,10.78.0.60,255.255.255.0,1h")
        .arg("--dhcp-option=option:router,10.78.0.1")
        .arg("--dhcp-option=option:dns-server,10.78.0.1")
        .arg(format!("--dhcp-leasefile={}", leases.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            Error::msg(format!(
                "cannot start dnsmasq (apt-get install dnsmasq-base): {e}"
            ))
        })?;
    lab.server = Some(server);
    // Until port 67 is bound in the server's namespace.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", SERVER_NS, "cat", "/proc/net/udp"])
            .output()
            .map_err(|e| Error::msg(format!("ip netns exec: {e}")))?;
        if String::from_utf8_lossy(&out.stdout).contains(":0043 ") {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::msg("dnsmasq did not start listening"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(lab)
}

/// Back to a link without an address or route, as at boot.
fn reset_link() -> Result<()> {
    ip(&["-n", CLIENT_NS, "addr", "flush", "dev", "eth0"])
}

fn has_address() -> bool {
    Command::new("ip")
        .args(["-n", CLIENT_NS, "-4", "addr", "show", "dev", "eth0"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("inet 10.78.0."))
        .unwrap_or(false)
}

/// One of our runs: (spawn to address announced, configured-in and exchange from the report).
fn ours(watch: &AddrWatch, init: &Path, root: &Path, rapid: bool) -> Result<(f64, f64, f64)> {
    reset_link()?;
    watch.drain();
    let start = Instant::now();
    let child = in_client(&init.display().to_string())
        .args(["phase", "network", "--in-place", "--root"])
        .arg(root)
        .arg("--cmdline")
        .arg(format!(
            "openshell.dhcp_timeout_ms=3000 openshell.rapid_commit={rapid}"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| Error::msg(format!("cannot run {}: {e}", init.display())))?;
    let seen = watch.new_address(Duration::from_secs(5));
    let out = child
        .wait_with_output()
        .map_err(|e| Error::msg(format!("{}: {e}", init.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(seen) = seen else {
        return Err(Error::msg(format!("no address announced:\n{text}")));
    };
    let line = text
        .lines()
        .find(|l| l.contains("DHCP from 10.78.0.1 in "))
        .ok_or_else(|| Error::msg(format!("no lease from our client:\n{text}")))?;
    let number_after = |key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split(" ms").next()?.trim().parse().ok()
    };
    match (number_after(" in "), number_after("(exchange ")) {
        (Some(configured), Some(exchange)) => {
            Ok(((seen - start).as_secs_f64() * 1000.0, configured, exchange))
        }
        _ => Err(Error::msg(format!("unexpected report: {line}"))),
    }
}

/// One udhcpc run: spawn to address announced. The lease script writes the nameservers to
/// `resolv`.
fn udhcpc(watch: &AddrWatch, script: &Path, resolv: &Path) -> Result<f64> {
    reset_link()?;
    watch.drain();
    let start = Instant::now();
    let child = in_client("busybox")
        .args([
            "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-T", "1", "-t", "3", "-A", "1",
        ])
        .arg("-s")
        .arg(script)
        .env("RESOLV_CONF", resolv)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::msg(format!("cannot run busybox udhcpc: {e}")))?;
    let seen = watch.new_address(Duration::from_secs(5));
    let status = child
        .wait_with_output()
        .map_err(|e| Error::msg(format!("busybox udhcpc: {e}")))?
        .status;
    match seen {
        Some(at) if status.success() && has_address() => Ok((at - start).as_secs_f64() * 1000.0),
        _ => Err(Error::msg(format!("udhcpc got no lease ({status})"))),
    }
}

/// The lease script in the checkout; udhcpc runs it, so it must be executable.
fn lease_script() -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let script = workspace().join(UDHCPC_SCRIPT);
    let mode = std::fs::metadata(&script)
        .map_err(|e| Error::io("stat", &script, e))?
        .permissions()
        .mode();
    if mode & 0o111 == 0 {
        return Err(Error::msg(format!(
            "{} is not executable (mode {mode:o}): udhcpc could not run it",
            script.display()
        )));
    }
    Ok(script)
}

fn line(name: &str, v: &[f64]) {
    let (min, med, max) = stats(v);
    println!("{name:<50} {min:>9.2} {med:>9.2} {max:>9.2}");
}

pub fn run(runs: usize) -> Result<()> {
    let init = tools::init_native()?;
    let script = lease_script()?;
    let lab = lab()?;
    let root = lab.dir.path().join("root");
    std::fs::create_dir_all(&root).map_err(|e| Error::io("create", &root, e))?;
    let resolv = lab.dir.path().join("resolv.conf");
    let watch = AddrWatch::open()?;
    // One of each first, not counted: the server has then leased to this MAC once, as in a VM
    // that boots again.
    ours(&watch, &init, &root, false)?;
    udhcpc(&watch, &script, &resolv)?;
    let (mut spawn, mut conf, mut exch) = (Vec::new(), Vec::new(), Vec::new());
    let (mut spawn_rc, mut conf_rc) = (Vec::new(), Vec::new());
    let mut old = Vec::new();
    for _ in 0..runs {
        let (w, c, e) = ours(&watch, &init, &root, false)?;
        spawn.push(w);
        conf.push(c);
        exch.push(e);
        let (w, c, _) = ours(&watch, &init, &root, true)?;
        spawn_rc.push(w);
        conf_rc.push(c);
        old.push(udhcpc(&watch, &script, &resolv)?);
    }
    println!(
        "bench dhcp: {runs} runs against dnsmasq over a veth pair (full exchange unless noted)"
    );
    println!("{:<50} {:>9} {:>9} {:>9}", "ms", "min", "median", "max");
    line("ours: exchange (DISCOVER sent to ACK)", &exch);
    line("ours: link to configured address (in process)", &conf);
    line("ours: spawn to address announced", &spawn);
    line("ours, rapid commit: configured (in process)", &conf_rc);
    line("ours, rapid commit: spawn to address announced", &spawn_rc);
    line("udhcpc -T 1 -t 3 -A 1: spawn to address announced", &old);
    let (_, ours_wall, _) = stats(&spawn);
    let (_, ours_conf, _) = stats(&conf);
    let (_, ours_exch, _) = stats(&exch);
    let (_, udhcpc_wall, _) = stats(&old);
    let speedup = udhcpc_wall / ours_wall;
    let overhead = ours_conf / ours_exch;
    println!(
        "target: >= 10x faster than udhcpc (spawn to address, full exchange): {speedup:.1}x {}",
        if speedup >= 10.0 { "met" } else { "NOT met" }
    );
    println!(
        "target: configured within 2x of the exchange itself: {overhead:.2}x {}",
        if overhead <= 2.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
