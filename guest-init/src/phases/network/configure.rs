//! What the `network` phase and its lease keeper both do to the guest's network: one DHCP
//! exchange, a lease or the static plan put on a link, the nameservers k3s accepts written to
//! `resolv.conf`, and a lease time as the reports say it. Neither the phase's plan (which
//! interface, when to fall back) nor the keeper's timers live here.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use openshell_shared::config::{Network, StaticPlan};
use openshell_shared::Level;

use crate::netlink::{self, NetlinkError};
use openshell_init::dhcp;

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

/// Maps a netlink failure on `ifname` doing `what` to the phase's error.
pub fn link_err(ifname: &str, what: &'static str) -> impl FnOnce(NetlinkError) -> NetworkError {
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

/// Puts the static `plan` on the link: up, address, default route.
pub fn apply_static(ifname: &str, index: u32, plan: &StaticPlan) -> Result<(), NetworkError> {
    let err = |what| link_err(ifname, what);
    netlink::set_up_with_mtu(ifname, None).map_err(err("bring up"))?;
    netlink::add_address(index, plan.address, plan.prefix).map_err(err("add address"))?;
    netlink::set_default_route(index, plan.gateway).map_err(err("add default route"))
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

/// A lease time as people read it.
pub fn describe_time(secs: u32) -> String {
    if secs == dhcp::INFINITE {
        "infinite".into()
    } else {
        format!("{secs} s")
    }
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

    #[test]
    fn lease_times_read_as_people_say_them() {
        assert_eq!(describe_time(120), "120 s");
        assert_eq!(describe_time(u32::MAX), "infinite");
    }
}
