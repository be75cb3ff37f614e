//! The `network` phase: the guest's address, default route, MTU and DNS. DHCP on the configured
//! interface (our client, `crate::dhcp`); no lease in time means the configured static plan, said
//! out loud, because k3s needs a default route; no network device at all means a dummy interface
//! with an address and a default route, so k3s still finds a node IP.
//!
//! `/etc/resolv.conf` is replaced atomically (left alone when it already says the same) and holds
//! only nameservers k3s accepts (no loopback, multicast or link-local ones, which make k3s fall
//! back to 8.8.8.8).
//!
//! A DHCP lease is then kept for as long as the VM runs by [`lease`], on its own thread.

pub mod lease;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use netlink_packet_route::link::InfoKind;
use openshell_shared::config::{Network, StaticPlan};
use openshell_shared::Level;

use crate::clock::Stopwatch;
use crate::context::Ctx;
use crate::dhcp;
use crate::engine::phase::{Done, Phase, PhaseResult};
use crate::netlink::{self, NetlinkError};

pub const PHASE: Phase = Phase {
    name: "network",
    after: &["config"],
    fatal: false,
    waits: true,
    purpose:
        "address, route, MTU and DNS by DHCP (static plan when no lease, dummy without a device)",
    run,
};

const DUMMY: &str = "dummy0";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("interface {ifname}: {what}: {source}")]
    Link {
        ifname: String,
        what: &'static str,
        source: NetlinkError,
    },
    #[error("cannot list interfaces: {0}")]
    List(NetlinkError),
    #[error("cannot write {path}: {source}")]
    Resolv {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What the phase configured, for the report and for k3s (`--node-ip`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    pub ifname: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub how: String,
    /// The lease behind this configuration, when DHCP gave one: the keeper renews it.
    pub lease: Option<lease::Bound>,
}

fn run(ctx: &Ctx) -> PhaseResult {
    let cfg = &ctx.config().network;
    let mut done = configure(cfg, |level, text| ctx.reporter.log(level, text))?;
    let _ = ctx.node_ip.set(done.address);
    let dns = usable_dns(&done.dns, &cfg.fallback_dns, |level, text| {
        ctx.reporter.log(level, text)
    });
    let resolv = ctx.path("/etc/resolv.conf");
    let _ = write_resolv_conf(&resolv, &dns)?;
    let denied = deny(&cfg.blocked_tcp, |level, text| {
        ctx.reporter.log(level, text)
    });
    if let Some(bound) = done.lease.take() {
        let reporter = std::sync::Arc::clone(&ctx.reporter);
        let keeper = lease::Keeper {
            bound,
            cfg: cfg.clone(),
            resolv,
            log: Box::new(move |level, text| reporter.log(level, text)),
        };
        if let Err(e) = keeper.spawn() {
            ctx.reporter.log(
                Level::Warn,
                format!("cannot start the DHCP lease keeper: {e}"),
            );
        }
    }
    Ok(Done::Ok(Some(format!(
        "{} {}/{} via {} dns {} ({}){denied}",
        done.ifname,
        done.address,
        done.prefix,
        done.router
            .map(|r| r.to_string())
            .unwrap_or_else(|| "dev".into()),
        dns.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(","),
        done.how
    ))))
}

/// Refuses TCP to `blocked` for pods and the guest; a kernel without nf_tables is reported, not
/// fatal (the block protects the host, k3s runs without it). Returns a note for the phase's line.
fn deny(blocked: &[std::net::SocketAddrV4], mut log: impl FnMut(Level, String)) -> String {
    if blocked.is_empty() {
        return String::new();
    }
    let list: Vec<String> = blocked.iter().map(|d| d.to_string()).collect();
    match crate::nftables::deny_tcp(blocked) {
        Ok(_) => format!("; TCP to {} refused", list.join(", ")),
        Err(e) => {
            log(
                Level::Warn,
                format!("cannot refuse TCP to {}: {e}", list.join(", ")),
            );
            String::new()
        }
    }
}

/// Maps a netlink failure on `ifname` doing `what` to the phase's error.
fn link_err(ifname: &str, what: &'static str) -> impl FnOnce(NetlinkError) -> NetworkError {
    let ifname = ifname.to_string();
    move |source| NetworkError::Link {
        ifname,
        what,
        source,
    }
}

/// One DHCP exchange on `ifname` under the configured deadline: requests through a UDP socket,
/// replies through a packet socket (see [`dhcp::PacketSocket`]).
pub fn exchange(
    ifname: &str,
    index: u32,
    mac: &[u8; 6],
    cfg: &Network,
) -> Result<dhcp::Exchange, dhcp::DhcpError> {
    let sock = dhcp::socket(ifname)?;
    let replies = dhcp::PacketSocket::open(index).map_err(|source| dhcp::DhcpError::Socket {
        ifname: ifname.to_string(),
        source,
    })?;
    dhcp::obtain(
        &sock,
        &replies,
        ifname,
        mac,
        cfg.rapid_commit,
        Duration::from_millis(cfg.dhcp_timeout_ms),
    )
}

/// Puts `lease` on the link: MTU, address, default route.
pub fn apply_lease(ifname: &str, index: u32, lease: &dhcp::Lease) -> Result<(), NetworkError> {
    let err = |what| link_err(ifname, what);
    if let Some(mtu) = lease.mtu {
        netlink::set_up_with_mtu(ifname, Some(mtu)).map_err(err("set MTU"))?;
    }
    netlink::add_address(index, lease.address, lease.prefix).map_err(err("add address"))?;
    netlink::set_default_route(index, lease.router).map_err(err("add default route"))
}

/// Configures the calling thread's network namespace per `cfg`. `log` hears about fallbacks.
pub fn configure(
    cfg: &Network,
    mut log: impl FnMut(Level, String),
) -> Result<Configured, NetworkError> {
    let links = netlink::links().map_err(NetworkError::List)?;
    let Some(link) = links.iter().find(|l| l.name == cfg.interface) else {
        log(
            Level::Warn,
            format!(
                "no {} device: using {DUMMY} {}/{}",
                cfg.interface, cfg.no_device.address, cfg.no_device.prefix
            ),
        );
        let _ = netlink::delete_link(DUMMY);
        netlink::create_link(DUMMY, InfoKind::Dummy, None).map_err(link_err(DUMMY, "create"))?;
        let dummy = netlink::links()
            .map_err(NetworkError::List)?
            .into_iter()
            .find(|l| l.name == DUMMY)
            .ok_or_else(|| NetworkError::Link {
                ifname: DUMMY.into(),
                what: "find after create",
                source: NetlinkError::BadReply("not listed".into()),
            })?;
        return apply_static(
            DUMMY,
            dummy.index,
            &cfg.no_device,
            "no network device".into(),
        );
    };
    netlink::set_up_with_mtu(&link.name, None).map_err(link_err(&link.name, "bring up"))?;
    let mac = link.mac.unwrap_or_default();
    let watch = Stopwatch::start();
    match exchange(&link.name, link.index, &mac, cfg) {
        Ok(ex) => {
            let lease = &ex.lease;
            apply_lease(&link.name, link.index, lease)?;
            Ok(Configured {
                ifname: link.name.clone(),
                address: lease.address,
                prefix: lease.prefix,
                router: lease.router,
                dns: lease.dns.clone(),
                how: format!(
                    "DHCP from {} in {:.2} ms (exchange {:.2} ms, first answer after {:.2} ms), {} DISCOVER(s){}, lease {}{}",
                    lease.server,
                    watch.elapsed_us() as f64 / 1000.0,
                    ex.elapsed.as_secs_f64() * 1000.0,
                    ex.first_answer.unwrap_or_default().as_secs_f64() * 1000.0,
                    ex.discovers,
                    if ex.rapid { " (rapid commit)" } else { "" },
                    lease::describe_time(lease.lease_secs),
                    lease.mtu.map(|m| format!(", MTU {m}")).unwrap_or_default()
                ),
                lease: Some(lease::Bound {
                    ifname: link.name.clone(),
                    index: link.index,
                    mac,
                    since: Instant::now() - ex.elapsed,
                    lease: ex.lease,
                }),
            })
        }
        Err(e) => {
            log(
                Level::Warn,
                format!(
                    "{e}: falling back to the static plan {}/{} via {}",
                    cfg.fallback.address,
                    cfg.fallback.prefix,
                    cfg.fallback
                        .gateway
                        .map(|g| g.to_string())
                        .unwrap_or_else(|| "dev".into())
                ),
            );
            apply_static(
                &link.name,
                link.index,
                &cfg.fallback,
                format!("static fallback: {e}"),
            )
        }
    }
}

pub fn apply_static(
    ifname: &str,
    index: u32,
    plan: &StaticPlan,
    how: String,
) -> Result<Configured, NetworkError> {
    let err = |what| link_err(ifname, what);
    netlink::set_up_with_mtu(ifname, None).map_err(err("bring up"))?;
    netlink::add_address(index, plan.address, plan.prefix).map_err(err("add address"))?;
    netlink::set_default_route(index, plan.gateway).map_err(err("add default route"))?;
    Ok(Configured {
        ifname: ifname.to_string(),
        address: plan.address,
        prefix: plan.prefix,
        router: plan.gateway,
        dns: plan.dns.clone(),
        how,
        lease: None,
    })
}

/// Nameservers k3s accepts: no loopback, multicast, link-local, unspecified or broadcast.
pub fn acceptable(ns: &Ipv4Addr) -> bool {
    !(ns.is_loopback()
        || ns.is_multicast()
        || ns.is_link_local()
        || ns.is_unspecified()
        || ns.is_broadcast())
}

/// The lease's acceptable nameservers, or the fallback ones (reported) when none is.
pub fn usable_dns(
    offered: &[Ipv4Addr],
    fallback: &[Ipv4Addr],
    mut log: impl FnMut(Level, String),
) -> Vec<Ipv4Addr> {
    let good: Vec<Ipv4Addr> = offered.iter().copied().filter(acceptable).collect();
    let dropped: Vec<String> = offered
        .iter()
        .filter(|n| !acceptable(n))
        .map(|n| n.to_string())
        .collect();
    if !dropped.is_empty() {
        log(
            Level::Warn,
            format!(
                "nameservers k3s would reject, left out: {}",
                dropped.join(" ")
            ),
        );
    }
    if good.is_empty() {
        log(
            Level::Warn,
            format!(
                "no usable nameserver offered: using {}",
                fallback
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
        return fallback.iter().copied().filter(acceptable).collect();
    }
    good
}

/// Replaces `path` atomically (write, rename; not synced: every boot and renewal rewrites it).
/// Returns whether the file was written: one that already says exactly this (the same lease as
/// the boot before) is left alone, which on virtio-fs spares the boot half a dozen round trips
/// to the host.
pub fn write_resolv_conf(path: &Path, servers: &[Ipv4Addr]) -> Result<bool, NetworkError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| NetworkError::Resolv {
        path: path.to_path_buf(),
        source,
    };
    let mut text = String::from("# written by openshell-init\n");
    for s in servers {
        text.push_str(&format!("nameserver {s}\n"));
    }
    // O_NOFOLLOW: what a symlink points at is never taken for the file.
    let mut current = Vec::new();
    let same = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|mut f| f.read_to_end(&mut current))
        .is_ok_and(|_| current == text.as_bytes());
    if same {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A dangling /etc/resolv.conf link (to a resolver's /run file) is replaced, not followed.
    openshell_shared::fsutil::write_atomic_unsynced(path, text.as_bytes()).map_err(err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k3s_rejected_nameservers_are_dropped_and_reported() {
        let mut said = Vec::new();
        let got = usable_dns(
            &[
                "127.0.0.53".parse().expect("ip"),
                "169.254.1.1".parse().expect("ip"),
                "192.168.127.1".parse().expect("ip"),
                "224.0.0.1".parse().expect("ip"),
            ],
            &["8.8.8.8".parse().expect("ip")],
            |_, t| said.push(t),
        );
        assert_eq!(got, vec!["192.168.127.1".parse::<Ipv4Addr>().expect("ip")]);
        assert!(
            said[0].contains("127.0.0.53") && said[0].contains("169.254.1.1"),
            "{said:?}"
        );
    }

    #[test]
    fn no_usable_nameserver_means_the_fallback_said_out_loud() {
        let mut said = Vec::new();
        let got = usable_dns(
            &["127.0.0.1".parse().expect("ip")],
            &["192.168.127.1".parse().expect("ip")],
            |_, t| said.push(t),
        );
        assert_eq!(got, vec!["192.168.127.1".parse::<Ipv4Addr>().expect("ip")]);
        assert!(
            said.iter().any(|s| s.contains("no usable nameserver")),
            "{said:?}"
        );
    }

    #[test]
    fn resolv_conf_is_replaced_whole() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join("etc/resolv.conf");
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        std::os::unix::fs::symlink("/run/systemd/resolve/stub-resolv.conf", &p).expect("link");
        let gw: Ipv4Addr = "192.168.127.1".parse().expect("ip");
        assert!(write_resolv_conf(&p, &[gw]).expect("write"));
        let meta = std::fs::symlink_metadata(&p).expect("meta");
        assert!(meta.is_file());
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "# written by openshell-init\nnameserver 192.168.127.1\n"
        );
        assert_eq!(
            std::fs::read_dir(p.parent().expect("dir"))
                .expect("ls")
                .count(),
            1
        );
        // The same servers again: the file is left as it is (same inode, not replaced).
        use std::os::unix::fs::MetadataExt;
        assert!(!write_resolv_conf(&p, &[gw]).expect("again"));
        assert_eq!(std::fs::metadata(&p).expect("meta").ino(), meta.ino());
        // Other servers: replaced.
        assert!(write_resolv_conf(&p, &["10.0.2.3".parse().expect("ip")]).expect("other"));
        assert_ne!(std::fs::metadata(&p).expect("meta").ino(), meta.ino());
        assert!(std::fs::read_to_string(&p)
            .expect("read")
            .ends_with("nameserver 10.0.2.3\n"));
        // A symlink to a file that says exactly this is still replaced by a file of our own.
        let target = t.path().join("elsewhere.conf");
        std::fs::write(&target, std::fs::read(&p).expect("read")).expect("write");
        std::fs::remove_file(&p).expect("rm");
        std::os::unix::fs::symlink(&target, &p).expect("link");
        assert!(write_resolv_conf(&p, &["10.0.2.3".parse().expect("ip")]).expect("link"));
        assert!(std::fs::symlink_metadata(&p).expect("meta").is_file());
    }
}
