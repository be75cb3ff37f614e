//! Our DHCPv4 client (on dhcproto): DISCOVER/OFFER/REQUEST/ACK with Rapid Commit offered, NAK
//! handled, short timers under one overall deadline. No duplicate-address probing: the VM's
//! network is the VMM's, with nobody else on it.
//!
//! Every reply is untrusted: one that does not decode, is not a BOOTREPLY for our transaction
//! id and our MAC, or lacks what a lease needs, is ignored and the wait goes on.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};

/// What a lease gives the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub lease_secs: u32,
    pub mtu: Option<u16>,
}

/// A reply that belongs to our exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Offer(Lease),
    /// `rapid`: the server committed straight from our DISCOVER.
    Ack {
        lease: Lease,
        rapid: bool,
    },
    Nak,
}

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("interface {ifname}: DHCP socket: {source}")]
    Socket {
        ifname: String,
        source: std::io::Error,
    },
    #[error("interface {ifname}: no lease within {waited_ms} ms ({discovers} DISCOVERs sent, {offers} OFFERs, {naks} NAKs)")]
    NoLease {
        ifname: String,
        waited_ms: u128,
        discovers: u32,
        offers: u32,
        naks: u32,
    },
}

/// MTU values outside this range are ignored (a hostile or broken server must not cut the
/// guest off with MTU 68 or ask for jumbo frames the device cannot send).
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 576..=9000;

fn base(xid: u32, mac: &[u8; 6], kind: MessageType) -> Message {
    let zero = Ipv4Addr::UNSPECIFIED;
    let mut msg = Message::new_with_id(xid, zero, zero, zero, zero, mac);
    msg.set_opcode(Opcode::BootRequest);
    // Ask for broadcast replies: we have no address to receive unicast on.
    msg.set_flags(Flags::default().set_broadcast());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(mac);
    opts.insert(DhcpOption::ClientIdentifier(client_id));
    opts.insert(DhcpOption::MaxMessageSize(1500));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::InterfaceMtu,
        OptionCode::AddressLeaseTime,
        OptionCode::Renewal,
        OptionCode::Rebinding,
    ]));
    msg
}

pub fn discover(xid: u32, mac: &[u8; 6], rapid_commit: bool) -> Message {
    let mut msg = base(xid, mac, MessageType::Discover);
    if rapid_commit {
        msg.opts_mut().insert(DhcpOption::RapidCommit);
    }
    msg
}

pub fn request(xid: u32, mac: &[u8; 6], offer: &Lease) -> Message {
    let mut msg = base(xid, mac, MessageType::Request);
    msg.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(offer.address));
    msg.opts_mut()
        .insert(DhcpOption::ServerIdentifier(offer.server));
    msg
}

/// Decodes `bytes` and keeps it only if it answers our transaction.
pub fn classify(bytes: &[u8], xid: u32, mac: &[u8; 6]) -> Option<Reply> {
    let msg = Message::from_bytes(bytes).ok()?;
    if msg.opcode() != Opcode::BootReply || msg.xid() != xid || msg.chaddr().get(..6)? != mac {
        return None;
    }
    let opts = msg.opts();
    match opts.msg_type()? {
        MessageType::Nak => Some(Reply::Nak),
        MessageType::Offer => lease(&msg).map(Reply::Offer),
        MessageType::Ack => lease(&msg).map(|lease| Reply::Ack {
            lease,
            rapid: opts.get(OptionCode::RapidCommit).is_some(),
        }),
        _ => None,
    }
}

fn lease(msg: &Message) -> Option<Lease> {
    let opts = msg.opts();
    let address = msg.yiaddr();
    if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
        return None;
    }
    let server = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ => return None,
    };
    let prefix = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(m)) => {
            let bits = u32::from(*m);
            // A mask must be contiguous ones; anything else is garbage.
            if bits.leading_ones() + bits.trailing_zeros() != 32 || bits == 0 {
                return None;
            }
            bits.leading_ones() as u8
        }
        _ => 24,
    };
    let router = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    };
    let dns = match opts.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(d)) => d.clone(),
        _ => Vec::new(),
    };
    let lease_secs = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(t)) => *t,
        _ => 3600,
    };
    let mtu = match opts.get(OptionCode::InterfaceMtu) {
        Some(DhcpOption::InterfaceMtu(m)) if MTU_RANGE.contains(m) => Some(*m),
        _ => None,
    };
    Some(Lease {
        address,
        prefix,
        router,
        dns,
        server,
        lease_secs,
        mtu,
    })
}

/// How one exchange went, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub lease: Lease,
    pub rapid: bool,
    pub discovers: u32,
    pub elapsed: Duration,
}

/// The socket: UDP port 68 on `ifname` only, broadcast allowed, source 0.0.0.0.
pub fn socket(ifname: &str) -> Result<UdpSocket, DhcpError> {
    let err = |source| DhcpError::Socket {
        ifname: ifname.to_string(),
        source,
    };
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)).map_err(err)?;
    sock.set_broadcast(true).map_err(err)?;
    nix::sys::socket::setsockopt(
        &sock.as_fd(),
        nix::sys::socket::sockopt::BindToDevice,
        &std::ffi::OsString::from(ifname),
    )
    .map_err(|e| err(e.into()))?;
    Ok(sock)
}

/// Runs the exchange on `sock` until a lease or `deadline`.
pub fn obtain(
    sock: &UdpSocket,
    ifname: &str,
    mac: &[u8; 6],
    rapid_commit: bool,
    timeout: Duration,
) -> Result<Exchange, DhcpError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let server = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let io = |source| DhcpError::Socket {
        ifname: ifname.to_string(),
        source,
    };
    let (mut discovers, mut offers, mut naks) = (0u32, 0u32, 0u32);
    let mut wait = Duration::from_millis(100);
    let mut buf = vec![0u8; 1500];
    'discover: while Instant::now() < deadline {
        let xid = random_xid();
        let out = discover(xid, mac, rapid_commit)
            .to_vec()
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        sock.send_to(&out, server).map_err(io)?;
        discovers += 1;
        let mut offered: Option<Lease> = None;
        let mut requests = 0;
        let mut round_end = (Instant::now() + wait).min(deadline);
        loop {
            let now = Instant::now();
            if now >= round_end {
                match &offered {
                    // Resend the REQUEST a couple of times before starting over.
                    Some(offer) if requests < 3 && now < deadline => {
                        let out = request(xid, mac, offer)
                            .to_vec()
                            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
                        sock.send_to(&out, server).map_err(io)?;
                        requests += 1;
                        round_end = (Instant::now() + wait).min(deadline);
                        continue;
                    }
                    _ => {
                        wait = (wait * 2).min(Duration::from_secs(1));
                        continue 'discover;
                    }
                }
            }
            sock.set_read_timeout(Some(round_end - now)).map_err(io)?;
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(io(e)),
            };
            match classify(&buf[..n], xid, mac) {
                Some(Reply::Ack { lease, rapid }) => {
                    return Ok(Exchange {
                        lease,
                        rapid,
                        discovers,
                        elapsed: start.elapsed(),
                    })
                }
                Some(Reply::Offer(lease)) if offered.is_none() => {
                    offers += 1;
                    let out = request(xid, mac, &lease)
                        .to_vec()
                        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
                    sock.send_to(&out, server).map_err(io)?;
                    requests = 1;
                    offered = Some(lease);
                    round_end = (Instant::now() + wait).min(deadline);
                }
                Some(Reply::Nak) => {
                    naks += 1;
                    continue 'discover;
                }
                // Foreign, malformed or duplicate: keep waiting.
                _ => {}
            }
        }
    }
    Err(DhcpError::NoLease {
        ifname: ifname.to_string(),
        waited_ms: start.elapsed().as_millis(),
        discovers,
        offers,
        naks,
    })
}

fn random_xid() -> u32 {
    let mut b = [0u8; 4];
    // getrandom(2) never blocks for 4 bytes once the kernel is up; fall back to the clock.
    // SAFETY: writes at most 4 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, libc::GRND_NONBLOCK) };
    if n == 4 {
        u32::from_ne_bytes(b)
    } else {
        crate::clock::boottime_us() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];

    fn reply(kind: MessageType, xid: u32, mac: &[u8; 6]) -> Message {
        let z = Ipv4Addr::UNSPECIFIED;
        let mut m = Message::new_with_id(xid, z, Ipv4Addr::new(192, 168, 127, 2), z, z, mac);
        m.set_opcode(Opcode::BootReply);
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(
            192, 168, 127, 1,
        )));
        o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        o.insert(DhcpOption::Router(vec![Ipv4Addr::new(192, 168, 127, 1)]));
        o.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            192, 168, 127, 1,
        )]));
        o.insert(DhcpOption::AddressLeaseTime(600));
        o.insert(DhcpOption::InterfaceMtu(1500));
        m
    }

    fn bytes(m: &Message) -> Vec<u8> {
        m.to_vec().expect("encode")
    }

    #[test]
    fn discover_carries_mac_broadcast_and_rapid_commit() {
        let m = discover(7, &MAC, true);
        let back = Message::from_bytes(&bytes(&m)).expect("decode");
        assert_eq!(back.xid(), 7);
        assert_eq!(&back.chaddr()[..6], &MAC);
        assert!(back.flags().broadcast());
        assert!(back.opts().get(OptionCode::RapidCommit).is_some());
        assert!(discover(7, &MAC, false)
            .opts()
            .get(OptionCode::RapidCommit)
            .is_none());
        let r = request(
            7,
            &MAC,
            &Lease {
                address: Ipv4Addr::new(10, 0, 0, 9),
                prefix: 24,
                router: None,
                dns: vec![],
                server: Ipv4Addr::new(10, 0, 0, 1),
                lease_secs: 60,
                mtu: None,
            },
        );
        assert!(
            matches!(r.opts().get(OptionCode::RequestedIpAddress), Some(DhcpOption::RequestedIpAddress(a)) if *a == Ipv4Addr::new(10, 0, 0, 9))
        );
    }

    #[test]
    fn our_replies_are_understood() {
        let offer = classify(&bytes(&reply(MessageType::Offer, 9, &MAC)), 9, &MAC);
        match offer {
            Some(Reply::Offer(l)) => {
                assert_eq!(l.address, Ipv4Addr::new(192, 168, 127, 2));
                assert_eq!(l.prefix, 24);
                assert_eq!(l.router, Some(Ipv4Addr::new(192, 168, 127, 1)));
                assert_eq!(l.lease_secs, 600);
                assert_eq!(l.mtu, Some(1500));
            }
            other => panic!("{other:?}"),
        }
        let mut ack = reply(MessageType::Ack, 9, &MAC);
        ack.opts_mut().insert(DhcpOption::RapidCommit);
        assert!(matches!(
            classify(&bytes(&ack), 9, &MAC),
            Some(Reply::Ack { rapid: true, .. })
        ));
        assert_eq!(
            classify(&bytes(&reply(MessageType::Nak, 9, &MAC)), 9, &MAC),
            Some(Reply::Nak)
        );
    }

    #[test]
    fn foreign_and_hostile_replies_are_ignored() {
        let other_mac = [1, 2, 3, 4, 5, 6];
        assert_eq!(
            classify(&bytes(&reply(MessageType::Offer, 8, &MAC)), 9, &MAC),
            None,
            "wrong xid"
        );
        assert_eq!(
            classify(&bytes(&reply(MessageType::Offer, 9, &other_mac)), 9, &MAC),
            None,
            "wrong MAC"
        );
        let mut req = reply(MessageType::Offer, 9, &MAC);
        req.set_opcode(Opcode::BootRequest);
        assert_eq!(
            classify(&bytes(&req), 9, &MAC),
            None,
            "a request, not a reply"
        );
        let mut bad_mask = reply(MessageType::Offer, 9, &MAC);
        bad_mask
            .opts_mut()
            .insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 0, 255, 0)));
        assert_eq!(
            classify(&bytes(&bad_mask), 9, &MAC),
            None,
            "non-contiguous mask"
        );
        let mut tiny_mtu = reply(MessageType::Offer, 9, &MAC);
        tiny_mtu.opts_mut().insert(DhcpOption::InterfaceMtu(68));
        assert!(matches!(
            classify(&bytes(&tiny_mtu), 9, &MAC),
            Some(Reply::Offer(Lease { mtu: None, .. }))
        ));
        let good = bytes(&reply(MessageType::Offer, 9, &MAC));
        for cut in [0, 1, 20, 235, 240, good.len() - 1] {
            let _ = classify(&good[..cut], 9, &MAC); // must not panic
        }
        assert_eq!(classify(&[0xff; 600], 9, &MAC), None);
    }
}
