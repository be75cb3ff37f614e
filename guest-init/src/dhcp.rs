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
    /// T1 and T2 as the server sent them (options 58 and 59), if it did.
    pub renew_secs: Option<u32>,
    pub rebind_secs: Option<u32>,
}

/// Lease time meaning "never expires" (RFC 2131): nothing to renew.
pub const INFINITE: u32 = u32::MAX;

/// When to renew (T1), rebind (T2) and give the address up, counted from the request that got
/// the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    pub t1: Duration,
    pub t2: Duration,
    pub expiry: Duration,
}

impl Lease {
    /// `None` for an infinite lease. T1/T2 from the server are used when they are ordered
    /// (0 < T1 < T2 < lease); otherwise RFC 2131's defaults, 0.5 and 0.875 of the lease.
    pub fn timers(&self) -> Option<Timers> {
        if self.lease_secs == INFINITE {
            return None;
        }
        let lease = u64::from(self.lease_secs.max(1));
        let ms = |secs: u64| Duration::from_millis(secs * 1000);
        let (t1, t2) = match (self.renew_secs, self.rebind_secs) {
            (Some(t1), Some(t2)) if 0 < t1 && t1 < t2 && u64::from(t2) < lease => {
                (ms(u64::from(t1)), ms(u64::from(t2)))
            }
            _ => (
                Duration::from_millis(lease * 500),
                Duration::from_millis(lease * 875),
            ),
        };
        Some(Timers {
            t1,
            t2,
            expiry: ms(lease),
        })
    }
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

/// An empty BOOTREQUEST, decoded from bytes: dhcproto's constructors draw a random xid through
/// `rand`, whose first use blocks in getrandom(2) until the kernel's entropy pool is ready —
/// about a second into a fresh VM without a hardware RNG. We pick the xid ourselves.
fn blank() -> Message {
    let mut bytes = [0u8; 241];
    bytes[0] = 1; // BOOTREQUEST
    bytes[1] = 1; // Ethernet
    bytes[2] = 6; // hardware address length
    bytes[236..240].copy_from_slice(&[99, 130, 83, 99]); // magic cookie
    bytes[240] = 255; // end of options
                      // A fixed, valid template: decoding cannot fail.
    Message::from_bytes(&bytes).unwrap_or_default()
}

fn base(xid: u32, mac: &[u8; 6], kind: MessageType) -> Message {
    let mut msg = blank();
    msg.set_xid(xid);
    msg.set_chaddr(mac);
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

/// A REQUEST that extends the lease on `address` (RENEWING, unicast to the server, or
/// REBINDING, broadcast): `ciaddr` set, no requested address or server id (RFC 2131 4.3.2), and
/// no broadcast flag, since the client can now receive unicast.
pub fn extend(xid: u32, mac: &[u8; 6], address: Ipv4Addr) -> Message {
    let mut msg = base(xid, mac, MessageType::Request);
    msg.set_flags(Flags::default());
    msg.set_ciaddr(address);
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

/// Encodes a request, padded to the 300-byte minimum BOOTP message (RFC 1542): some servers
/// (passt among them) drop shorter ones.
pub fn encode(msg: &Message) -> std::io::Result<Vec<u8>> {
    let mut out = msg
        .to_vec()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    if out.len() < 300 {
        out.resize(300, 0);
    }
    Ok(out)
}

/// Decodes `bytes` and keeps it only if it answers our transaction.
pub fn classify(bytes: &[u8], xid: u32, mac: &[u8; 6]) -> Option<Reply> {
    let msg = Message::from_bytes(bytes).ok()?;
    // dhcproto's `chaddr()` slices its 16-byte field by the packet's own `hlen`, which a
    // hostile reply sets past 16 (found by the fuzzer): check it before asking.
    if !(6..=16).contains(&msg.hlen()) {
        return None;
    }
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
    // Option 54 is required by RFC 2131 but not sent by every server (passt omits it): fall
    // back to the BOOTP server address, then the router.
    let server = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ if !msg.siaddr().is_unspecified() => msg.siaddr(),
        _ => router?,
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
    let renew_secs = match opts.get(OptionCode::Renewal) {
        Some(DhcpOption::Renewal(t)) => Some(*t),
        _ => None,
    };
    let rebind_secs = match opts.get(OptionCode::Rebinding) {
        Some(DhcpOption::Rebinding(t)) => Some(*t),
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
        renew_secs,
        rebind_secs,
    })
}

/// How one exchange went, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub lease: Lease,
    pub rapid: bool,
    pub discovers: u32,
    pub elapsed: Duration,
    /// From the first DISCOVER to the first answer: the server's share of `elapsed`.
    pub first_answer: Option<Duration>,
}

/// Replies arrive before the interface has an address, and servers such as passt send them
/// unicast to the offered address, which the IP stack drops for an unconfigured interface. So
/// replies are read from a packet socket on the interface (IP packets, link header stripped);
/// requests still go out through the UDP socket.
///
/// Packet sockets are costly to rebind and to close: the kernel waits for an RCU grace period
/// (`synchronize_net`, 10-20 ms) whenever a protocol hook is removed. So the socket is created
/// with no protocol (no hook yet) and bound once to the interface and protocol, and it is closed
/// on a thread of its own rather than on the boot path.
pub struct PacketSocket(Option<std::os::fd::OwnedFd>);

impl Drop for PacketSocket {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            // Without a thread to spare, the closure is dropped at once and closes it here.
            let _ = std::thread::Builder::new()
                .name("packet-close".into())
                .spawn(move || drop(fd));
        }
    }
}

impl PacketSocket {
    pub fn open(ifindex: u32) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_IP as u16).to_be();
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor we own.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_ll is valid; the fields we need are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: addr is a properly sized sockaddr_ll for this AF_PACKET socket.
        let rc = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(Some(owned)))
    }

    fn raw(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.0.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }

    /// Waits up to `timeout` for one IP packet; `Ok(0)` on timeout.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut pfd = libc::pollfd {
            fd: self.raw(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        if ready == 0 {
            return Ok(0);
        }
        // SAFETY: reads at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(self.raw(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// The DHCP payload of an IPv4/UDP packet to port 68, or `None` for anything else or anything
/// malformed (lengths are checked against the buffer, never trusted).
pub fn dhcp_payload(packet: &[u8]) -> Option<&[u8]> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    if ihl < 20 || total < ihl + 8 || total > packet.len() || *packet.get(9)? != 17 {
        return None;
    }
    // Fragments are not reassembled; DHCP replies fit in one packet.
    let frag = u16::from_be_bytes([packet[6], packet[7]]);
    if frag & 0x3fff != 0 {
        return None;
    }
    let udp = &packet[ihl..total];
    let dst_port = u16::from_be_bytes([udp[2], udp[3]]);
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if dst_port != 68 || udp_len < 8 || udp_len > udp.len() {
        return None;
    }
    Some(&udp[8..udp_len])
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
    replies: &PacketSocket,
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
    let mut first_answer: Option<Duration> = None;
    let mut wait = Duration::from_millis(100);
    let mut buf = vec![0u8; 1500];
    // One xid per exchange, kept across retransmissions: a slow server's answer to an earlier
    // DISCOVER (udhcpd probes an address by ARP for 2 s before offering it) still counts.
    let mut xid = random_xid();
    'discover: while Instant::now() < deadline {
        let out = encode(&discover(xid, mac, rapid_commit)).map_err(io)?;
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
                        let out = encode(&request(xid, mac, offer)).map_err(io)?;
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
            let n = replies.recv(&mut buf, round_end - now).map_err(io)?;
            let Some(payload) = dhcp_payload(&buf[..n]) else {
                continue;
            };
            match classify(payload, xid, mac) {
                Some(Reply::Ack { lease, rapid }) => {
                    return Ok(Exchange {
                        lease,
                        rapid,
                        discovers,
                        elapsed: start.elapsed(),
                        first_answer: first_answer.or(Some(start.elapsed())),
                    })
                }
                Some(Reply::Offer(lease)) if offered.is_none() => {
                    first_answer.get_or_insert(start.elapsed());
                    offers += 1;
                    let out = encode(&request(xid, mac, &lease)).map_err(io)?;
                    sock.send_to(&out, server).map_err(io)?;
                    requests = 1;
                    offered = Some(lease);
                    round_end = (Instant::now() + wait).min(deadline);
                }
                Some(Reply::Nak) => {
                    naks += 1;
                    xid = random_xid();
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

pub fn random_xid() -> u32 {
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
    fn the_blank_template_decodes() {
        let m = blank();
        assert_eq!(m.opcode(), Opcode::BootRequest);
        assert!(m.opts().msg_type().is_none());
        assert_eq!(base(42, &MAC, MessageType::Discover).xid(), 42);
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
                renew_secs: None,
                rebind_secs: None,
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

    fn ip_udp(payload: &[u8], dst_port: u16) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
            0,
            0,
        ];
        p.extend_from_slice(&[10, 0, 0, 1, 255, 255, 255, 255]);
        let ulen = 8 + payload.len();
        p.extend_from_slice(&[
            0,
            67,
            (dst_port >> 8) as u8,
            dst_port as u8,
            (ulen >> 8) as u8,
            ulen as u8,
            0,
            0,
        ]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn dhcp_payload_is_cut_out_of_ip_udp() {
        let pkt = ip_udp(b"hello", 68);
        assert_eq!(dhcp_payload(&pkt), Some(&b"hello"[..]));
        assert_eq!(dhcp_payload(&ip_udp(b"hello", 53)), None, "other port");
        let mut tcp = pkt.clone();
        tcp[9] = 6;
        assert_eq!(dhcp_payload(&tcp), None, "not UDP");
        let mut frag = pkt.clone();
        frag[7] = 1;
        assert_eq!(dhcp_payload(&frag), None, "fragment");
        let mut lying = pkt.clone();
        lying[3] = 200; // total length beyond the buffer
        assert_eq!(dhcp_payload(&lying), None);
        let mut udp_lie = pkt.clone();
        udp_lie[25] = 250;
        assert_eq!(dhcp_payload(&udp_lie), None);
        for cut in 0..pkt.len() {
            let _ = dhcp_payload(&pkt[..cut]); // never panics
        }
        assert_eq!(dhcp_payload(&[0x60; 40]), None, "IPv6");
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
        // A hardware address length past chaddr's 16 bytes (the fuzzer's find).
        let mut long_hlen = bytes(&reply(MessageType::Offer, 9, &MAC));
        long_hlen[2] = 255;
        assert_eq!(classify(&long_hlen, 9, &MAC), None);
    }

    fn lease(secs: u32, t1: Option<u32>, t2: Option<u32>) -> Lease {
        Lease {
            address: Ipv4Addr::new(10, 0, 0, 9),
            prefix: 24,
            router: None,
            dns: vec![],
            server: Ipv4Addr::new(10, 0, 0, 1),
            lease_secs: secs,
            mtu: None,
            renew_secs: t1,
            rebind_secs: t2,
        }
    }

    #[test]
    fn timers_follow_the_server_when_sane_and_the_rfc_otherwise() {
        let s = Duration::from_secs;
        assert_eq!(
            lease(120, Some(2), Some(4)).timers(),
            Some(Timers {
                t1: s(2),
                t2: s(4),
                expiry: s(120)
            })
        );
        let rfc = Some(Timers {
            t1: s(60),
            t2: Duration::from_millis(105_000),
            expiry: s(120),
        });
        assert_eq!(lease(120, None, None).timers(), rfc);
        assert_eq!(lease(120, Some(5), Some(3)).timers(), rfc, "T1 after T2");
        assert_eq!(lease(120, Some(5), Some(120)).timers(), rfc, "T2 at expiry");
        assert_eq!(lease(120, Some(0), Some(3)).timers(), rfc, "T1 zero");
        assert_eq!(lease(INFINITE, None, None).timers(), None);
        assert!(lease(0, None, None)
            .timers()
            .is_some_and(|t| t.expiry == s(1)));
    }

    #[test]
    fn extending_requests_carry_ciaddr_and_nothing_of_an_offer() {
        let m = extend(5, &MAC, Ipv4Addr::new(10, 0, 0, 9));
        let back = Message::from_bytes(&encode(&m).expect("encode")).expect("decode");
        assert_eq!(back.ciaddr(), Ipv4Addr::new(10, 0, 0, 9));
        assert!(!back.flags().broadcast());
        assert_eq!(back.opts().msg_type(), Some(MessageType::Request));
        assert!(back.opts().get(OptionCode::RequestedIpAddress).is_none());
        assert!(back.opts().get(OptionCode::ServerIdentifier).is_none());
    }

    #[test]
    fn t1_and_t2_are_read_from_the_reply() {
        let mut m = reply(MessageType::Ack, 9, &MAC);
        m.opts_mut().insert(DhcpOption::Renewal(2));
        m.opts_mut().insert(DhcpOption::Rebinding(4));
        match classify(&bytes(&m), 9, &MAC) {
            Some(Reply::Ack { lease, .. }) => {
                assert_eq!((lease.renew_secs, lease.rebind_secs), (Some(2), Some(4)))
            }
            other => panic!("{other:?}"),
        }
    }
}
