//! The guest's user-mode network: which backend runs it (one module each; `choice` picks one),
//! and the TCP port forwards from the host into the guest. Forwards listen on 127.0.0.1 only:
//! the gateway is for the user on this machine, never for the network the laptop sits on.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

pub mod choice;
pub mod gvproxy;
pub mod passt;

/// The gateway's gRPC NodePort: what `up` forwards when no `-p` is given.
pub const GATEWAY_PORT: u16 = 30051;

/// The address forwards listen on.
pub const FORWARD_LISTEN: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The network a boot runs; `choice` picks it from `--net`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetBackend {
    /// No network device: the guest comes up on a dummy interface.
    None,
    /// Debian's `passt`, over a unix stream socket.
    Passt,
    /// gvisor-tap-vsock's `gvproxy`.
    Gvproxy,
}

impl NetBackend {
    pub fn name(self) -> &'static str {
        match self {
            NetBackend::None => "none",
            NetBackend::Passt => "passt",
            NetBackend::Gvproxy => "gvproxy",
        }
    }
}

impl fmt::Display for NetBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One TCP forward: `127.0.0.1:host` on the host to `guest` in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Forward {
    pub host: u16,
    pub guest: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("port forward `{spec}`: {reason} (expected HOST:GUEST or PORT, ports 1-65535)")]
pub struct ForwardError {
    pub spec: String,
    pub reason: String,
}

impl FromStr for Forward {
    type Err = ForwardError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ForwardError {
            spec: spec.to_string(),
            reason,
        };
        let port = |text: &str, side: &str| -> Result<u16, ForwardError> {
            match text.trim().parse::<u16>() {
                Ok(0) => Err(err(format!("{side} port 0 is not a port"))),
                Ok(p) => Ok(p),
                Err(e) => Err(err(format!("{side} port `{text}`: {e}"))),
            }
        };
        match spec.split_once(':') {
            Some((h, g)) => Ok(Forward {
                host: port(h, "host")?,
                guest: port(g, "guest")?,
            }),
            None => {
                let p = port(spec, "")?;
                Ok(Forward { host: p, guest: p })
            }
        }
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{FORWARD_LISTEN}:{} -> guest:{}", self.host, self.guest)
    }
}

/// The forwards a boot gets: the ones asked for, else the gateway port; none without a network.
/// Two forwards may not share a host port.
pub fn forwards(backend: NetBackend, asked: &[Forward]) -> Result<Vec<Forward>, ForwardError> {
    if backend == NetBackend::None {
        return match asked.first() {
            Some(f) => Err(ForwardError {
                spec: format!("{}:{}", f.host, f.guest),
                reason: "--net none gives the guest no network to forward to".into(),
            }),
            None => Ok(Vec::new()),
        };
    }
    if asked.is_empty() {
        return Ok(vec![Forward {
            host: GATEWAY_PORT,
            guest: GATEWAY_PORT,
        }]);
    }
    let mut seen = std::collections::HashSet::new();
    for f in asked {
        if !seen.insert(f.host) {
            return Err(ForwardError {
                spec: format!("{}:{}", f.host, f.guest),
                reason: format!("host port {} is forwarded twice", f.host),
            });
        }
    }
    Ok(asked.to_vec())
}

/// Whether the guest's default router leads to this machine's loopback: passt maps its gateway
/// address there unless started with `--no-map-gw`, which it is when no host port is listed
/// (`passt::args`). gvproxy's router is gvproxy itself (its loopback address is .254).
pub fn router_is_host_loopback(backend: NetBackend, host_ports: &[u16]) -> bool {
    backend == NetBackend::Passt && !host_ports.is_empty()
}

/// The `up` line that says what of this machine's loopback the guest may reach, and where that
/// is enforced.
pub fn host_loopback_summary(backend: NetBackend, ports: &[u16]) -> String {
    let reach = if ports.is_empty() {
        "no port of this machine's 127.0.0.1 is reachable from the guest".to_string()
    } else {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        format!(
            "the guest may reach 127.0.0.1 on this machine on port(s) {} only",
            list.join(", ")
        )
    };
    let how = match (backend, ports.is_empty()) {
        (NetBackend::None, _) => "no network",
        (NetBackend::Passt, true) => "passt --no-map-gw",
        (NetBackend::Passt, false) => "the guest refuses the other ports at passt's gateway",
        (NetBackend::Gvproxy, _) => "the guest refuses the rest at 192.168.127.254",
    };
    format!("host loopback: {reach} ({how})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_passt_with_listed_ports_maps_the_router_to_this_machine() {
        assert!(router_is_host_loopback(NetBackend::Passt, &[8080]));
        assert!(!router_is_host_loopback(NetBackend::Passt, &[]));
        assert!(!router_is_host_loopback(NetBackend::Gvproxy, &[8080]));
        assert!(!router_is_host_loopback(NetBackend::None, &[8080]));
    }

    #[test]
    fn the_summary_says_what_is_reachable_and_who_enforces_it() {
        assert_eq!(
            host_loopback_summary(NetBackend::Passt, &[]),
            "host loopback: no port of this machine's 127.0.0.1 is reachable from the guest (passt --no-map-gw)"
        );
        assert_eq!(
            host_loopback_summary(NetBackend::Gvproxy, &[8080, 9000]),
            "host loopback: the guest may reach 127.0.0.1 on this machine on port(s) 8080, 9000 only (the guest refuses the rest at 192.168.127.254)"
        );
    }

    #[test]
    fn forward_specs_parse_and_bad_ones_are_named() {
        assert_eq!(
            "8080:80".parse(),
            Ok(Forward {
                host: 8080,
                guest: 80
            })
        );
        assert_eq!(
            "30051".parse(),
            Ok(Forward {
                host: 30051,
                guest: 30051
            })
        );
        for bad in ["", "0", "80:0", "70000:1", "a:80", "80:", ":80", "1:2:3"] {
            let e = bad.parse::<Forward>().expect_err(bad);
            assert_eq!(e.spec, bad);
            assert!(e.to_string().contains(&format!("`{bad}`")), "{e}");
        }
    }

    #[test]
    fn default_is_the_gateway_port_and_duplicates_are_refused() {
        assert_eq!(
            forwards(NetBackend::Passt, &[]).expect("default"),
            vec![Forward {
                host: 30051,
                guest: 30051
            }]
        );
        assert!(forwards(NetBackend::None, &[]).expect("none").is_empty());
        let one = Forward { host: 1, guest: 2 };
        assert!(forwards(NetBackend::None, &[one]).is_err());
        let e = forwards(NetBackend::Gvproxy, &[one, Forward { host: 1, guest: 3 }])
            .expect_err("twice");
        assert!(e.reason.contains("forwarded twice"), "{e}");
    }
}
