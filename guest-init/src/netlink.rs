//! One rtnetlink request and its acknowledgement: what the link-handling phases (loopback, the
//! capability probes) need, on a plain blocking socket (no async runtime in the guest).

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("kernel refused: {0}")]
    Refused(nix::errno::Errno),
    #[error("malformed netlink reply: {0}")]
    BadReply(String),
}

/// Serialises `msg` as a request with `flags` (plus REQUEST and ACK).
pub fn encode(msg: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// Interprets the kernel's reply: an ACK (error code 0) or an error. Read by hand: the reply
/// echoes the request, and netlink-packet-route's full parse of it costs far more than the four
/// bytes wanted (boot runs under emulation, where every instruction counts).
pub fn check_ack(reply: &[u8]) -> Result<(), NetlinkError> {
    let (kind, len) = header(reply)?;
    if kind != NLMSG_ERROR {
        return Err(NetlinkError::BadReply(format!(
            "expected an acknowledgement, got message type {kind}"
        )));
    }
    acknowledged(&reply[..len])
}

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
/// `struct ifinfomsg`: family, pad, type, index, flags, change.
const IFINFOMSG_LEN: usize = 16;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
/// NLA_F_NESTED and NLA_F_NET_BYTEORDER share an attribute type's top bits.
const NLA_TYPE_MASK: u16 = 0x3fff;

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The type and length of the netlink message at the start of `buf`, checked against `buf`.
fn header(buf: &[u8]) -> Result<(u16, usize), NetlinkError> {
    let (Some(len), Some(kind)) = (read_u32(buf, 0), read_u16(buf, 4)) else {
        return Err(NetlinkError::BadReply(format!(
            "{} bytes: shorter than a netlink header",
            buf.len()
        )));
    };
    let len = len as usize;
    if len < NLMSG_HDRLEN || len > buf.len() {
        return Err(NetlinkError::BadReply(format!(
            "message length {len} outside 16..={} (type {kind})",
            buf.len()
        )));
    }
    Ok((kind, len))
}

/// What an NLMSG_ERROR message says: code 0 acknowledges, a negative errno refuses.
fn acknowledged(msg: &[u8]) -> Result<(), NetlinkError> {
    match read_u32(msg, NLMSG_HDRLEN).map(|c| c as i32) {
        None => Err(NetlinkError::BadReply(
            "error message without its code".into(),
        )),
        Some(0) => Ok(()),
        Some(code) => Err(NetlinkError::Refused(nix::errno::Errno::from_raw(-code))),
    }
}

/// The attributes (type without flag bits, payload) in `buf`, stopping at the first malformed
/// one: a truncated attribute is an error naming where it starts.
fn attributes(buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), NetlinkError>> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at + 4 > buf.len() {
            return None;
        }
        let len = read_u16(buf, at)? as usize;
        let kind = read_u16(buf, at + 2)? & NLA_TYPE_MASK;
        if len < 4 || at + len > buf.len() {
            let start = at;
            // Nothing after a malformed attribute can be found: end the iteration.
            at = buf.len();
            return Some(Err(NetlinkError::BadReply(format!(
                "attribute of type {kind} at byte {start} claims {len} bytes"
            ))));
        }
        let payload = &buf[at + 4..at + len];
        // Attributes are 4-byte aligned.
        at += (len + 3) & !3;
        Some(Ok((kind, payload)))
    })
}

/// A NUL-terminated (or not) string attribute.
fn attr_str(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

/// One RTM_NEWLINK message of a dump (its body after the netlink header) as a [`Link`].
fn parse_link(body: &[u8]) -> Result<Link, NetlinkError> {
    let index = read_u32(body, 4)
        .ok_or_else(|| NetlinkError::BadReply(format!("link message of {} bytes", body.len())))?;
    let mut link = Link {
        index,
        name: String::new(),
        kind: None,
        mac: None,
    };
    for attr in attributes(&body[IFINFOMSG_LEN.min(body.len())..]) {
        let (kind, payload) = attr?;
        match kind {
            IFLA_IFNAME => link.name = attr_str(payload),
            IFLA_ADDRESS => link.mac = <[u8; 6]>::try_from(payload).ok(),
            IFLA_LINKINFO => {
                for info in attributes(payload) {
                    let (k, p) = info?;
                    if k == IFLA_INFO_KIND {
                        link.kind = Some(attr_str(p));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(link)
}

/// Reads one chunk of a link dump: the links in it, and whether the dump is done.
fn parse_link_dump(buf: &[u8], out: &mut Vec<Link>) -> Result<bool, NetlinkError> {
    let mut offset = 0;
    while offset < buf.len() {
        let (kind, len) = header(&buf[offset..])?;
        let msg = &buf[offset..offset + len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => acknowledged(msg)?,
            RTM_NEWLINK => out.push(parse_link(&msg[NLMSG_HDRLEN..])?),
            _ => {}
        }
        // Messages are 4-byte aligned.
        offset += (len + 3) & !3;
    }
    Ok(false)
}

/// Sends one request and waits for its acknowledgement.
pub fn request(msg: RouteNetlinkMessage, flags: u16) -> Result<(), NetlinkError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
    socket.bind_auto().map_err(NetlinkError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(NetlinkError::Socket)?;
    socket
        .send(&encode(msg, flags, 1), 0)
        .map_err(NetlinkError::Socket)?;
    // On the stack: a heap buffer this size is a fresh mapping (faulted in and zeroed by the
    // kernel) for every request.
    let mut buf = [0u8; 8192];
    let n = socket
        .recv(&mut &mut buf[..], 0)
        .map_err(NetlinkError::Socket)?;
    check_ack(&buf[..n])
}

/// A link message naming `name` (the kernel resolves it; no index lookup needed).
pub fn named_link(name: &str) -> LinkMessage {
    let mut link = LinkMessage::default();
    link.attributes
        .push(LinkAttribute::IfName(name.to_string()));
    link
}

/// Creates a link of `kind` named `name`; for veth, `peer` names the other end.
pub fn create_link(name: &str, kind: InfoKind, peer: Option<&str>) -> Result<(), NetlinkError> {
    let mut link = named_link(name);
    let mut info = vec![LinkInfo::Kind(kind)];
    if let Some(peer) = peer {
        info.push(LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(named_link(
            peer,
        )))));
    }
    link.attributes.push(LinkAttribute::LinkInfo(info));
    request(
        RouteNetlinkMessage::NewLink(link),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// Whether rtnetlink knows link type `kind`, without creating anything. The request names a
/// link that does not exist, without NLM_F_CREATE, and carries a multicast MAC: a registered
/// type's own validator refuses that address (EADDRNOTAVAIL) before the kernel looks for the
/// device, while an unknown type gets as far as "no such device" (ENODEV). `Some(true)` only for
/// EADDRNOTAVAIL; `Some(false)` for ENODEV; `None` for anything else. ENODEV is not proof of
/// absence (a modular kernel loads the type's module only on creation), so callers treat
/// anything but `Some(true)` as "create one to find out".
pub fn link_kind_known(kind: InfoKind) -> Result<Option<bool>, NetlinkError> {
    let mut link = named_link("_osh_kindprobe");
    link.attributes
        .push(LinkAttribute::Address(vec![0x01, 0, 0x5e, 0, 0, 1]));
    link.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
    match request(RouteNetlinkMessage::NewLink(link), 0) {
        Err(NetlinkError::Refused(nix::errno::Errno::EADDRNOTAVAIL)) => Ok(Some(true)),
        Err(NetlinkError::Refused(nix::errno::Errno::ENODEV)) => Ok(Some(false)),
        Err(NetlinkError::Refused(_)) | Ok(()) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn delete_link(name: &str) -> Result<(), NetlinkError> {
    request(RouteNetlinkMessage::DelLink(named_link(name)), 0)
}

/// A link as a dump lists it: its name and, when it has one, its kind (`veth`, `bridge`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<String>,
    pub mac: Option<[u8; 6]>,
}

/// Every link of the calling thread's network namespace.
pub fn links() -> Result<Vec<Link>, NetlinkError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
    socket.bind_auto().map_err(NetlinkError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(NetlinkError::Socket)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    msg.finalize();
    let mut req = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut req);
    socket.send(&req, 0).map_err(NetlinkError::Socket)?;
    let mut out = Vec::new();
    // The kernel sizes a dump chunk to the reader's buffer, up to 32 KiB; on the stack, like
    // `request`'s.
    let mut buf = [0u8; 32 * 1024];
    loop {
        let n = socket
            .recv(&mut &mut buf[..], 0)
            .map_err(NetlinkError::Socket)?;
        if n == 0 {
            return Err(NetlinkError::BadReply(
                "dump ended without NLMSG_DONE".into(),
            ));
        }
        if parse_link_dump(&buf[..n], &mut out)? {
            return Ok(out);
        }
    }
}

fn address_message(
    index: u32,
    address: std::net::Ipv4Addr,
    prefix: u8,
) -> netlink_packet_route::address::AddressMessage {
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};
    let mut msg = AddressMessage::default();
    msg.header.family = netlink_packet_route::AddressFamily::Inet;
    msg.header.prefix_len = prefix;
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(address.into()));
    msg.attributes
        .push(AddressAttribute::Address(address.into()));
    msg
}

/// Adds `address/prefix` to link `index` (replacing an identical one).
pub fn add_address(
    index: u32,
    address: std::net::Ipv4Addr,
    prefix: u8,
) -> Result<(), NetlinkError> {
    request(
        RouteNetlinkMessage::NewAddress(address_message(index, address, prefix)),
        NLM_F_CREATE | netlink_packet_core::NLM_F_REPLACE,
    )
}

/// Removes `address/prefix` from link `index`; the kernel drops the routes that used it.
pub fn delete_address(
    index: u32,
    address: std::net::Ipv4Addr,
    prefix: u8,
) -> Result<(), NetlinkError> {
    request(
        RouteNetlinkMessage::DelAddress(address_message(index, address, prefix)),
        0,
    )
}

/// The default route: via `gateway`, or straight out of link `index` when there is none.
pub fn set_default_route(
    index: u32,
    gateway: Option<std::net::Ipv4Addr>,
) -> Result<(), NetlinkError> {
    use netlink_packet_route::route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    };
    let mut msg = RouteMessage::default();
    msg.header.address_family = netlink_packet_route::AddressFamily::Inet;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.kind = RouteType::Unicast;
    msg.header.scope = if gateway.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    if let Some(gw) = gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
    }
    msg.attributes.push(RouteAttribute::Oif(index));
    request(
        RouteNetlinkMessage::NewRoute(msg),
        NLM_F_CREATE | netlink_packet_core::NLM_F_REPLACE,
    )
}

/// Sets the MTU and IFF_UP of the link named `name`.
pub fn set_up_with_mtu(name: &str, mtu: Option<u16>) -> Result<(), NetlinkError> {
    use netlink_packet_route::link::LinkFlags;
    let mut link = named_link(name);
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    if let Some(mtu) = mtu {
        link.attributes.push(LinkAttribute::Mtu(u32::from(mtu)));
    }
    request(RouteNetlinkMessage::SetLink(link), 0)
}

/// Runs `f` on a thread of its own in a new network namespace, for tests against the real
/// kernel; `None` (said on stderr) where no namespace can be made.
#[cfg(test)]
pub fn in_new_netns<T: Send + 'static>(
    f: impl FnOnce() -> Option<T> + Send + 'static,
) -> Option<T> {
    std::thread::spawn(move || {
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            eprintln!("skipped: cannot create a network namespace here ({e})");
            return None;
        }
        f()
    })
    .join()
    .expect("netns test thread")
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    fn nlmsg(kind: u16, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn link_body(index: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![0u8; IFINFOMSG_LEN];
        b[4..8].copy_from_slice(&index.to_ne_bytes());
        for a in attrs {
            b.extend_from_slice(a);
        }
        b
    }

    #[test]
    fn a_dump_chunk_gives_names_kinds_and_macs_then_done() {
        let info = attr(IFLA_INFO_KIND, b"veth\0");
        let mut buf = nlmsg(
            RTM_NEWLINK,
            &link_body(
                7,
                &[
                    attr(IFLA_IFNAME, b"veth1234\0"),
                    attr(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 9]),
                    // Nested, with NLA_F_NESTED set as newer kernels do.
                    attr(IFLA_LINKINFO | 0x8000, &info),
                ],
            ),
        );
        buf.extend(nlmsg(
            RTM_NEWLINK,
            &link_body(1, &[attr(IFLA_IFNAME, b"lo")]),
        ));
        let mut out = Vec::new();
        assert!(!parse_link_dump(&buf, &mut out).expect("chunk"));
        buf = nlmsg(NLMSG_DONE, &0u32.to_ne_bytes());
        assert!(parse_link_dump(&buf, &mut out).expect("done"));
        assert_eq!(
            out,
            vec![
                Link {
                    index: 7,
                    name: "veth1234".into(),
                    kind: Some("veth".into()),
                    mac: Some([2, 0, 0, 0, 0, 9]),
                },
                Link {
                    index: 1,
                    name: "lo".into(),
                    kind: None,
                    mac: None,
                },
            ]
        );
    }

    #[test]
    fn truncated_or_lying_messages_are_errors_naming_the_fault() {
        let good = nlmsg(RTM_NEWLINK, &link_body(3, &[attr(IFLA_IFNAME, b"eth0\0")]));
        // Cut short: the header claims more than the buffer holds.
        let err = parse_link_dump(&good[..good.len() - 4], &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("message length"), "{err}");
        // An attribute claiming more bytes than its message has, after a good one.
        let mut bad = link_body(3, &[attr(IFLA_IFNAME, b"eth\0")]);
        bad.extend_from_slice(&200u16.to_ne_bytes());
        bad.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        let err = parse_link_dump(&nlmsg(RTM_NEWLINK, &bad), &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("claims 200 bytes"), "{err}");
        // Named by where it starts among the attributes: after the 8-byte name.
        assert!(err.to_string().contains("at byte 8 claims"), "{err}");
        // A link message too short for its index.
        let err = parse_link_dump(&nlmsg(RTM_NEWLINK, &[0; 3]), &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("link message of"), "{err}");
    }

    #[test]
    fn acknowledgements_and_refusals() {
        assert!(check_ack(&nlmsg(NLMSG_ERROR, &0i32.to_ne_bytes())).is_ok());
        let refused = check_ack(&nlmsg(NLMSG_ERROR, &(-libc::ENODEV).to_ne_bytes()));
        assert!(matches!(
            refused,
            Err(NetlinkError::Refused(nix::errno::Errno::ENODEV))
        ));
        let err = check_ack(&nlmsg(RTM_NEWLINK, &link_body(1, &[]))).unwrap_err();
        assert!(err.to_string().contains("message type 16"), "{err}");
        let err = check_ack(&nlmsg(NLMSG_ERROR, &[])).unwrap_err();
        assert!(err.to_string().contains("without its code"), "{err}");
        // An error in the middle of a dump stops it.
        let err = parse_link_dump(
            &nlmsg(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes()),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            NetlinkError::Refused(nix::errno::Errno::EPERM)
        ));
    }

    proptest::proptest! {
        /// Whatever the socket hands over, reading it ends in links or an error, never a panic,
        /// and an acknowledgement check likewise.
        #[test]
        fn arbitrary_replies_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut out = Vec::new();
            let _ = parse_link_dump(&bytes, &mut out);
            let _ = check_ack(&bytes);
        }

        /// Well-formed links survive being followed by garbage: they are read, then the garbage
        /// is an error or ignored.
        #[test]
        fn links_before_garbage_are_read(name in "[a-z][a-z0-9]{0,14}", index in 1u32..1000,
                                         tail in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let mut z = name.clone().into_bytes();
            z.push(0);
            let mut buf = nlmsg(RTM_NEWLINK, &link_body(index, &[attr(IFLA_IFNAME, &z)]));
            buf.extend_from_slice(&tail);
            let mut out = Vec::new();
            let _ = parse_link_dump(&buf, &mut out);
            proptest::prop_assert_eq!(out.first().map(|l| (l.index, l.name.clone())), Some((index, name)));
        }
    }

    /// The real kernel's dump, in a namespace of our own: a dummy link we made is listed with
    /// its kind and a MAC, lo without a kind.
    #[test]
    fn the_kernels_dump_lists_what_was_made() {
        let listed = in_new_netns(|| {
            create_link("osh-dump0", InfoKind::Dummy, None).ok()?;
            Some(links().expect("dump"))
        });
        let Some(listed) = listed else { return };
        let lo = listed.iter().find(|l| l.name == "lo").expect("lo listed");
        assert_eq!(lo.kind, None);
        let d = listed
            .iter()
            .find(|l| l.name == "osh-dump0")
            .expect("dummy listed");
        assert_eq!(d.kind.as_deref(), Some("dummy"));
        assert!(d.mac.is_some() && d.index > lo.index);
    }
}
