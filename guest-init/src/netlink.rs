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

/// Interprets the kernel's reply: an ACK (error code 0) or an error.
pub fn check_ack(reply: &[u8]) -> Result<(), NetlinkError> {
    let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(reply)
        .map_err(|e| NetlinkError::BadReply(e.to_string()))?;
    match msg.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(NetlinkError::Refused(nix::errno::Errno::from_raw(
                -code.get(),
            ))),
        },
        other => Err(NetlinkError::BadReply(format!(
            "expected an acknowledgement, got {other:?}"
        ))),
    }
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
    let mut buf = vec![0u8; 8192];
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
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket
            .recv(&mut &mut buf[..], 0)
            .map_err(NetlinkError::Socket)?;
        if n == 0 {
            return Err(NetlinkError::BadReply(
                "dump ended without NLMSG_DONE".into(),
            ));
        }
        let mut offset = 0;
        while offset < n {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n])
                .map_err(|e| NetlinkError::BadReply(e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    if let Some(code) = e.code {
                        return Err(NetlinkError::Refused(nix::errno::Errno::from_raw(
                            -code.get(),
                        )));
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    out.push(describe(&link))
                }
                _ => {}
            }
            if len == 0 {
                return Err(NetlinkError::BadReply("zero-length message in dump".into()));
            }
            // Messages are 4-byte aligned.
            offset += (len + 3) & !3;
        }
    }
}

fn describe(link: &LinkMessage) -> Link {
    let mut name = String::new();
    let mut kind = None;
    let mut mac = None;
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    Link {
        index: link.header.index,
        name,
        kind,
        mac,
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
