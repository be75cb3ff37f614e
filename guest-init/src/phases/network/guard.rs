//! What the guest refuses its pods and its own processes on the way out, from the configuration
//! and the default router: TCP to `network.blocked_tcp` (gvproxy's control API), and TCP and UDP
//! to every address where the user-mode network reaches the host's loopback, except the host
//! ports the user listed (`network.host_ports`, none by default). gvproxy translates
//! 192.168.127.254 to the host's 127.0.0.1 (`network.host_loopback`); passt does the same with
//! its gateway address unless the host started it with `--no-map-gw` (it does when no host port
//! is listed), so when the host says so (`network.router_is_host_loopback`, assumed without
//! word) the router is refused the same way, DNS and DHCP to it excepted: the guest's resolver
//! and its lease renewals go there.
//!
//! Only packets that open something are refused (conntrack: neither established nor related):
//! the guest's answers on connections a port forward made from the router pass.
//!
//! The network phase installs this before the link comes up (without the router, unknown until
//! the lease) and again, whole, once the router is known; the lease keeper again if a renewal
//! changes the router. The phase then tells the host ([`confirmation`]): the host exposes
//! gvproxy's forwards only after that.

use std::net::Ipv4Addr;

use openshell_shared::config::Network;
use openshell_shared::GuestMessage;

use crate::nftables::{self, NftError, Ports, Proto, Refusal};

/// TCP ports of the router that stay open: DNS.
const ROUTER_TCP: &[u16] = &[53];
/// UDP ports of the router that stay open: DNS, and DHCP (renewals are unicast to the server).
const ROUTER_UDP: &[u16] = &[53, 67];

/// The refusals could not be installed: the boot must not go on without them.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the refusals ({list}): {source}; not going on without them")]
pub struct GuardError {
    list: String,
    source: NftError,
}

/// The addresses where the host's loopback may appear: the configured ones, then the router
/// when it is the host's loopback too.
pub fn guarded(cfg: &Network, router: Option<Ipv4Addr>) -> Vec<Ipv4Addr> {
    let router = router.filter(|_| cfg.router_is_host_loopback);
    let mut addrs: Vec<Ipv4Addr> = Vec::new();
    for a in cfg.host_loopback.iter().copied().chain(router) {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    addrs
}

/// Every rule of the table, in order: the outright refusals first.
pub fn refusals(cfg: &Network, router: Option<Ipv4Addr>) -> Vec<Refusal> {
    let mut rules: Vec<Refusal> = cfg
        .blocked_tcp
        .iter()
        .map(|d| Refusal {
            addr: *d.ip(),
            proto: Proto::Tcp,
            ports: Ports::Only(d.port()),
        })
        .collect();
    for addr in guarded(cfg, router) {
        let is_router = Some(addr) == router && !cfg.host_loopback.contains(&addr);
        for (proto, extra) in [(Proto::Tcp, ROUTER_TCP), (Proto::Udp, ROUTER_UDP)] {
            let mut allowed = cfg.host_ports.clone();
            if is_router {
                allowed.extend(extra.iter().filter(|p| !cfg.host_ports.contains(p)));
            }
            rules.push(Refusal {
                addr,
                proto,
                ports: Ports::AllBut(allowed),
            });
        }
    }
    rules
}

/// Installs the table for `cfg` and `router`, replacing any earlier one in the same transaction.
/// Returns a note for the phase's line.
pub fn install(cfg: &Network, router: Option<Ipv4Addr>) -> Result<String, GuardError> {
    let rules = refusals(cfg, router);
    if rules.is_empty() {
        return Ok(String::new());
    }
    match nftables::refuse(&rules) {
        Ok(_) => Ok(note(cfg, router)),
        Err(source) => Err(GuardError {
            list: rules
                .iter()
                .map(Refusal::to_string)
                .collect::<Vec<_>>()
                .join("; "),
            source,
        }),
    }
}

/// What the phase's line says about the refusals.
fn note(cfg: &Network, router: Option<Ipv4Addr>) -> String {
    let mut text = String::new();
    if !cfg.blocked_tcp.is_empty() {
        let list: Vec<String> = cfg.blocked_tcp.iter().map(|d| d.to_string()).collect();
        text.push_str(&format!("; TCP to {} refused", list.join(", ")));
    }
    let addrs = guarded(cfg, router);
    if !addrs.is_empty() {
        let shown: Vec<String> = addrs
            .iter()
            .map(|a| {
                if Some(*a) == router && !cfg.host_loopback.contains(a) {
                    format!("{a} (router)")
                } else {
                    a.to_string()
                }
            })
            .collect();
        let ports = if cfg.host_ports.is_empty() {
            "no port".to_string()
        } else {
            let list: Vec<String> = cfg.host_ports.iter().map(u16::to_string).collect();
            format!("ports {}", list.join(","))
        };
        text.push_str(&format!("; host loopback at {}: {ports}", shown.join(", ")));
    }
    text
}

/// The message that tells the host what holds (see `GuestMessage::NetworkGuarded`).
pub fn confirmation(cfg: &Network, router: Option<Ipv4Addr>) -> GuestMessage {
    GuestMessage::NetworkGuarded {
        refused_tcp: cfg.blocked_tcp.clone(),
        host_loopback: guarded(cfg, router),
        host_ports: cfg.host_ports.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    /// The defaults on gvproxy: its API refused, its host address closed to every port, the
    /// router closed but for DNS and DHCP.
    #[test]
    fn defaults_refuse_the_api_and_all_of_the_hosts_loopback() {
        let cfg = Network::default();
        let shown: Vec<String> = refusals(&cfg, Some(ip("192.168.127.1")))
            .iter()
            .map(Refusal::to_string)
            .collect();
        assert_eq!(
            shown,
            [
                "tcp 192.168.127.1:80",
                "tcp 192.168.127.254:*",
                "udp 192.168.127.254:*",
                "tcp 192.168.127.1:* but 53",
                "udp 192.168.127.1:* but 53,67",
            ]
        );
        assert_eq!(
            note(&cfg, Some(ip("192.168.127.1"))),
            "; TCP to 192.168.127.1:80 refused; host loopback at 192.168.127.254, 192.168.127.1 (router): no port"
        );
    }

    /// Listed host ports open at every host-loopback address; before the lease there is no
    /// router to refuse, and a router that is a configured address is not listed twice.
    #[test]
    fn listed_ports_stay_open_everywhere_the_host_appears() {
        let cfg = Network {
            host_ports: vec![8080, 53],
            host_loopback: vec![ip("10.0.2.2")],
            blocked_tcp: Vec::new(),
            ..Network::default()
        };
        let shown: Vec<String> = refusals(&cfg, None)
            .iter()
            .map(Refusal::to_string)
            .collect();
        assert_eq!(
            shown,
            ["tcp 10.0.2.2:* but 8080,53", "udp 10.0.2.2:* but 8080,53"]
        );
        let with_router = refusals(&cfg, Some(ip("192.0.2.1")));
        assert_eq!(with_router[3].to_string(), "udp 192.0.2.1:* but 8080,53,67");
        assert_eq!(refusals(&cfg, Some(ip("10.0.2.2"))).len(), 2);
        let not_host = Network {
            router_is_host_loopback: false,
            ..cfg.clone()
        };
        assert_eq!(refusals(&not_host, Some(ip("192.0.2.1"))).len(), 2);
        assert_eq!(guarded(&not_host, Some(ip("192.0.2.1"))), [ip("10.0.2.2")]);
        assert_eq!(
            confirmation(&cfg, Some(ip("192.0.2.1"))),
            GuestMessage::NetworkGuarded {
                refused_tcp: Vec::new(),
                host_loopback: vec![ip("10.0.2.2"), ip("192.0.2.1")],
                host_ports: vec![8080, 53],
            }
        );
        assert_eq!(
            note(&cfg, None),
            "; host loopback at 10.0.2.2: ports 8080,53"
        );
    }

    /// How a TCP connection from this namespace to `to` ends: "open" or the error's kind.
    fn tcp(to: (Ipv4Addr, u16)) -> String {
        let addr = std::net::SocketAddr::from(to);
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)) {
            Ok(_) => "open".into(),
            Err(e) => format!("{:?}", e.kind()),
        }
    }

    /// How a UDP datagram to `to` fares: "delivered" when the listener there got it, else the
    /// error the port-unreachable turned into.
    fn udp(to: (Ipv4Addr, u16), listener: Option<&std::net::UdpSocket>) -> String {
        let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("udp");
        s.connect(to).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .expect("timeout");
        if let Err(e) = s.send(b"x") {
            return format!("{:?}", e.kind());
        }
        if let Some(l) = listener {
            l.set_read_timeout(Some(std::time::Duration::from_millis(500)))
                .expect("timeout");
            if l.recv(&mut [0u8; 8]).is_ok() {
                return "delivered".into();
            }
        }
        match s.recv(&mut [0u8; 8]) {
            Ok(_) => "answered".into(),
            Err(e) => format!("{:?}", e.kind()),
        }
    }

    /// A connection from `from` (any port) to `to`, as a port forward opens one: "open" or the
    /// error's kind.
    fn forwarded(from: Ipv4Addr, to: (Ipv4Addr, u16)) -> String {
        use nix::sys::socket::{
            bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn,
        };
        let sock = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .expect("socket");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        let local = SockaddrIn::from(std::net::SocketAddrV4::new(from, 0));
        bind(fd, &local).expect("bind");
        let remote = SockaddrIn::from(std::net::SocketAddrV4::new(to.0, to.1));
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: a valid timeval for SO_SNDTIMEO, which bounds connect.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                std::ptr::addr_of!(timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        match connect(fd, &remote) {
            Ok(()) => "open".into(),
            Err(e) => format!("{e}"),
        }
    }

    /// Brings up this namespace's loopback with each of `addrs` on it (/32).
    fn loopback_with(addrs: &[Ipv4Addr]) {
        crate::netlink::set_up_with_mtu("lo", None).expect("lo up");
        let lo = crate::netlink::links()
            .expect("links")
            .into_iter()
            .find(|l| l.name == "lo")
            .expect("lo")
            .index;
        for a in addrs {
            crate::netlink::add_address(lo, *a, 32).expect("address");
        }
    }

    /// Against the real kernel, in a namespace of its own: addresses standing for gvproxy's API,
    /// the host's loopback and the router, with listeners on allowed and unlisted ports. What
    /// the rules allow connects, the rest is refused at once; installed again, the table is
    /// replaced; and a "pod" (another namespace, with CAP_NET_ADMIN there) that flushes or
    /// deletes the `openshell` table touches only its own: the refusal here still holds, until
    /// the same flush is made here.
    #[test]
    fn the_kernel_refuses_what_the_policy_says_and_a_pod_cannot_lift_it() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root for a network namespace");
            return;
        }
        let seen = crate::netlink::in_new_netns(|| {
            let (api, host, router) = (ip("192.168.127.1"), ip("192.168.127.254"), ip("192.0.2.1"));
            let guest = ip("192.0.2.2");
            loopback_with(&[api, host, router, guest]);
            let mut keep = Vec::new();
            for to in [
                (api, 80),
                (api, 81),
                (host, 8080),
                (host, 9090),
                (router, 53),
                (router, 9090),
                (guest, 30051),
            ] {
                keep.push(std::net::TcpListener::bind(to).expect("listen"));
            }
            let udp_open = std::net::UdpSocket::bind((host, 8080)).expect("udp");
            let _udp_closed = std::net::UdpSocket::bind((host, 9090)).expect("udp");
            let cfg = Network {
                host_ports: vec![8080],
                ..Network::default()
            };
            let before = tcp((host, 9090));
            if let Err(e) = install(&cfg, None) {
                eprintln!("skipped: this kernel has no usable nf_tables ({e})");
                return None;
            }
            install(&cfg, Some(router)).expect("replaced with the router");
            let pod = std::thread::spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("pod netns");
                let flushed = crate::nftables::flush_refusal().map_err(|e| e.to_string());
                (
                    flushed,
                    crate::nftables::remove_refusal().map_err(|e| e.to_string()),
                )
            })
            .join()
            .expect("pod");
            Some(vec![
                ("before", before),
                ("api:80", tcp((api, 80))),
                ("api:81", tcp((api, 81))),
                ("host:8080", tcp((host, 8080))),
                ("host:9090", tcp((host, 9090))),
                ("router:53", tcp((router, 53))),
                ("router:9090", tcp((router, 9090))),
                ("udp host:8080", udp((host, 8080), Some(&udp_open))),
                ("udp host:9090", udp((host, 9090), None)),
                ("pod flushes", format!("{:?}", pod.0)),
                ("pod removes", format!("{:?}", pod.1)),
                ("forward from router", forwarded(router, (guest, 30051))),
                ("host:9090 after", tcp((host, 9090))),
                (
                    "flush here",
                    format!("{:?}", crate::nftables::flush_refusal()),
                ),
                ("host:9090 flushed here", tcp((host, 9090))),
            ])
        });
        let Some(seen) = seen else { return };
        let seen: std::collections::BTreeMap<&str, String> = seen.into_iter().collect();
        let expect = [
            ("before", "open"),
            ("api:80", "ConnectionRefused"),
            ("api:81", "open"),
            ("host:8080", "open"),
            ("host:9090", "ConnectionRefused"),
            ("router:53", "open"),
            ("router:9090", "ConnectionRefused"),
            ("udp host:8080", "delivered"),
            // A datagram the output chain rejects fails its send at once (a pod's, in the
            // forward chain, gets the ICMP port-unreachable instead).
            ("udp host:9090", "PermissionDenied"),
            ("host:9090 after", "ConnectionRefused"),
            // A connection the router opens to the guest (a port forward): the guest's replies
            // go to the router's unlisted port, and pass.
            ("forward from router", "open"),
            // The same flush in this namespace empties the table: the pod's found nothing.
            ("flush here", "Ok(())"),
            ("host:9090 flushed here", "open"),
        ];
        for (what, outcome) in expect {
            assert_eq!(seen[what], outcome, "{what}: {seen:#?}");
        }
        for what in ["pod flushes", "pod removes"] {
            assert!(
                seen[what].contains("No such file or directory"),
                "{what}: {seen:#?}"
            );
        }
    }
}
