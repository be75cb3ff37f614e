//! The `loopback` phase: `lo` up over rtnetlink (no `ip` binary in the guest). k3s and its
//! components talk to each other on 127.0.0.1.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::{Ctx, Done, Phase, PhaseResult};

pub const PHASE: Phase = Phase {
    name: "loopback",
    after: &["config"],
    fatal: false,
    purpose: "bring the loopback interface up over netlink",
    run,
};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("interface {name}: netlink socket: {source}")]
    Socket {
        name: String,
        source: std::io::Error,
    },
    #[error("interface {name}: kernel refused RTM_SETLINK: {errno}")]
    Refused {
        name: String,
        errno: nix::errno::Errno,
    },
    #[error("interface {name}: malformed netlink reply: {reason}")]
    BadReply { name: String, reason: String },
}

fn run(_ctx: &Ctx) -> PhaseResult {
    set_up("lo")?;
    Ok(Done::Ok(None))
}

/// Sets IFF_UP on `name` and waits for the kernel's acknowledgement. The link is named in the
/// request itself (the kernel resolves it), which saves a round trip to look up its index.
pub fn set_up(name: &str) -> Result<(), LinkError> {
    let request = set_up_request(name, 1);
    let sock_err = |source| LinkError::Socket {
        name: name.into(),
        source,
    };
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(sock_err)?;
    socket.bind_auto().map_err(sock_err)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(sock_err)?;
    socket.send(&request, 0).map_err(sock_err)?;
    let mut buf = vec![0u8; 8192];
    let n = socket.recv(&mut &mut buf[..], 0).map_err(sock_err)?;
    check_ack(name, &buf[..n])
}

/// The RTM_SETLINK request that sets IFF_UP (and only that flag) on the link named `name`.
pub fn set_up_request(name: &str, seq: u32) -> Vec<u8> {
    let mut link = LinkMessage::default();
    link.attributes
        .push(LinkAttribute::IfName(name.to_string()));
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::SetLink(link)),
    );
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// Interprets the kernel's reply: an ACK (error code 0) or an error.
pub fn check_ack(name: &str, reply: &[u8]) -> Result<(), LinkError> {
    let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(reply).map_err(|e| {
        LinkError::BadReply {
            name: name.into(),
            reason: e.to_string(),
        }
    })?;
    match msg.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(LinkError::Refused {
                name: name.into(),
                errno: nix::errno::Errno::from_raw(-code.get()),
            }),
        },
        other => Err(LinkError::BadReply {
            name: name.into(),
            reason: format!("expected an acknowledgement, got {other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_are_an_rtm_setlink_with_ack() {
        let req = set_up_request("lo", 7);
        let len = u32::from_ne_bytes(req[0..4].try_into().expect("len"));
        assert_eq!(len as usize, req.len());
        assert_eq!(
            u16::from_ne_bytes(req[4..6].try_into().expect("type")),
            libc::RTM_SETLINK
        );
        let flags = u16::from_ne_bytes(req[6..8].try_into().expect("flags"));
        assert_eq!(flags, (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16);
        assert_eq!(u32::from_ne_bytes(req[8..12].try_into().expect("seq")), 7);
        // ifinfomsg: family, pad, type, index, flags, change
        let index = i32::from_ne_bytes(req[20..24].try_into().expect("index"));
        let iff = u32::from_ne_bytes(req[24..28].try_into().expect("iff"));
        let change = u32::from_ne_bytes(req[28..32].try_into().expect("change"));
        // Index 0: the kernel finds the link by the IFLA_IFNAME attribute that follows.
        assert_eq!(
            (index, iff, change),
            (0, libc::IFF_UP as u32, libc::IFF_UP as u32)
        );
        // rtattr: len 7 (4 + "lo\0"), type IFLA_IFNAME, then the name.
        assert_eq!(
            u16::from_ne_bytes(req[32..34].try_into().expect("rta_len")),
            7
        );
        assert_eq!(
            u16::from_ne_bytes(req[34..36].try_into().expect("rta_type")),
            libc::IFLA_IFNAME
        );
        assert_eq!(&req[36..39], b"lo\0");
    }

    #[test]
    fn garbage_reply_is_an_error_not_a_panic() {
        for reply in [&[][..], &[1, 2, 3][..], &[0xff; 64][..]] {
            assert!(matches!(
                check_ack("lo", reply),
                Err(LinkError::BadReply { .. })
            ));
        }
    }

    /// IFF_UP of lo as the kernel sees it in the calling thread's network namespace.
    fn lo_is_up() -> bool {
        // SAFETY: a plain socket and SIOCGIFFLAGS on a zeroed ifreq naming "lo".
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket");
            let mut req: libc::ifreq = std::mem::zeroed();
            for (i, b) in b"lo".iter().enumerate() {
                req.ifr_name[i] = *b as libc::c_char;
            }
            let rc = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req);
            libc::close(fd);
            assert_eq!(rc, 0, "SIOCGIFFLAGS");
            req.ifr_ifru.ifru_flags as i32 & libc::IFF_UP != 0
        }
    }

    /// Real kernel round trip in a private network namespace, where lo starts down.
    #[test]
    fn brings_lo_up_in_a_new_netns() {
        let child = std::thread::spawn(|| {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                eprintln!("skipped: cannot create a network namespace here ({e})");
                return None;
            }
            // In a fresh namespace lo is down.
            let before = lo_is_up();
            // A link that does not exist is the kernel's ENODEV, named.
            match set_up("nosuchlink0") {
                Err(LinkError::Refused { name, errno }) => {
                    assert_eq!(
                        (name.as_str(), errno),
                        ("nosuchlink0", nix::errno::Errno::ENODEV)
                    )
                }
                other => panic!("expected ENODEV, got {other:?}"),
            }
            set_up("lo").expect("lo up");
            Some((before, lo_is_up()))
        });
        if let Some((before, after)) = child.join().expect("thread") {
            assert!(!before, "lo already up in a fresh namespace");
            assert!(after, "lo not up after the phase");
        }
    }
}
