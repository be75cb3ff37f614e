//! One rtnetlink request and its acknowledgement: what the link-handling phases (loopback, the
//! capability probes) need, on a plain blocking socket (no async runtime in the guest).

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
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

pub fn delete_link(name: &str) -> Result<(), NetlinkError> {
    request(RouteNetlinkMessage::DelLink(named_link(name)), 0)
}
