//! The `loopback` phase: `lo` up over rtnetlink (no `ip` binary in the guest). k3s and its
//! components talk to each other on 127.0.0.1.

use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;

use crate::netlink::{self, NetlinkError};

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};

pub const PHASE: Phase = Phase {
    name: "loopback",
    after: &["config"],
    fatal: false,
    waits: false,
    purpose: "bring the loopback interface up over netlink",
    run,
};

#[derive(Debug, thiserror::Error)]
#[error("interface {name}: {source}")]
pub struct LinkError {
    pub name: String,
    pub source: NetlinkError,
}

fn run(_ctx: &Ctx) -> PhaseResult {
    set_up("lo")?;
    Ok(Done::Ok(None))
}

/// Sets IFF_UP on `name` and waits for the kernel's acknowledgement.
pub fn set_up(name: &str) -> Result<(), LinkError> {
    netlink::request(RouteNetlinkMessage::SetLink(up_message(name)), 0).map_err(|source| {
        LinkError {
            name: name.into(),
            source,
        }
    })
}

/// RTM_SETLINK payload that sets IFF_UP (and only that flag) on the link named `name`.
pub fn up_message(name: &str) -> LinkMessage {
    let mut link = netlink::named_link(name);
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    link
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_are_an_rtm_setlink_with_ack() {
        let req = netlink::encode(RouteNetlinkMessage::SetLink(up_message("lo")), 0, 7);
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
                netlink::check_ack(reply),
                Err(NetlinkError::BadReply(_))
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
        let child = crate::netlink::in_new_netns(|| {
            // In a fresh namespace lo is down.
            let before = lo_is_up();
            // A link that does not exist is the kernel's ENODEV, named.
            match set_up("nosuchlink0") {
                Err(LinkError {
                    name,
                    source: NetlinkError::Refused(errno),
                }) => assert_eq!(
                    (name.as_str(), errno),
                    ("nosuchlink0", nix::errno::Errno::ENODEV)
                ),
                other => panic!("expected ENODEV, got {other:?}"),
            }
            set_up("lo").expect("lo up");
            Some((before, lo_is_up()))
        });
        if let Some((before, after)) = child {
            assert!(!before, "lo already up in a fresh namespace");
            assert!(after, "lo not up after the phase");
        }
    }
}
