//! One nftables transaction over NETLINK_NETFILTER, with no `nft` binary in the guest: the
//! `openshell` table that denies TCP destinations nothing in the guest may reach. gvproxy serves
//! its control API (which can open ports on the user's host) on the guest's gateway at port 80,
//! and every pod could otherwise talk to it.
//!
//! At boot no table exists (netfilter state does not outlive a boot), so the batch creates it
//! outright. If one is there (the phase run again), the kernel refuses that whole batch and the
//! table is replaced whole in a second one (create, delete, create again, then its chains and
//! rules): a second run leaves exactly one copy and a failure leaves the previous one. Tearing
//! down a table is kernel work worth sparing at boot under emulation.
//!
//! For the tests of that refusal inside a VM (`openshell-init nft-test`, never run at boot): the
//! masquerade k3s's CNI gives pods, so a test's pod namespace gets answers from outside the
//! guest as a real pod does, and the removal of the `openshell` table, so a test can show that
//! what it refused is otherwise answered.

use std::net::SocketAddrV4;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const IFNAMSIZ: usize = 16;
const NFPROTO_IPV4: u8 = 2;
const NLA_F_NESTED: u16 = 0x8000;

// Attribute numbers from linux/netfilter/nf_tables.h.
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_REJECT_TYPE: u16 = 1;
const NFT_REG_1: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_L4PROTO: u32 = 16;
const NFT_REJECT_TCP_RST: u32 = 1;
const NF_ACCEPT: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_INET_POST_ROUTING: u32 = 4;
/// Source NAT's place among the post-routing hooks (nft's `srcnat`).
const NF_IP_PRI_NAT_SRC: u32 = 100;

/// The table's name; its chains are `forward` (pods) and `output` (the guest's own processes,
/// host-network pods included).
pub const TABLE: &str = "openshell";
const CHAINS: [(&str, u32); 2] = [("forward", NF_INET_FORWARD), ("output", NF_INET_LOCAL_OUT)];
/// The tests' masquerade table (see the module doc).
pub const TEST_NAT_TABLE: &str = "openshell-test-nat";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("NETLINK_NETFILTER socket: {0}")]
    Socket(std::io::Error),
    #[error("nf_tables refused {what}: {errno}")]
    Refused {
        what: String,
        errno: nix::errno::Errno,
    },
    #[error("nf_tables did not acknowledge {0}")]
    NoAck(String),
    #[error("interface name `{0}`: 1 to 15 bytes, no NUL")]
    BadName(String),
}

/// Netlink attributes, appended to a message buffer.
struct Attrs<'a>(&'a mut Vec<u8>);

impl Attrs<'_> {
    fn put(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.pad();
        self
    }
    fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(ty, &b)
    }
    /// nf_tables numbers are big-endian on the wire.
    fn be32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_be_bytes())
    }
    fn nest(&mut self, ty: u16, body: impl FnOnce(&mut Attrs<'_>)) -> &mut Self {
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        body(&mut Attrs(self.0));
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }
    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }
    /// Loads `len` bytes at `offset` of the packet's `base` header into register 1.
    fn payload(&mut self, base: u32, offset: u32, len: u32) -> &mut Self {
        self.expr("payload", |d| {
            d.be32(NFTA_PAYLOAD_DREG, NFT_REG_1)
                .be32(NFTA_PAYLOAD_BASE, base)
                .be32(NFTA_PAYLOAD_OFFSET, offset)
                .be32(NFTA_PAYLOAD_LEN, len);
        })
    }
    /// Goes on with the rule only if register 1 holds `value`.
    fn equals(&mut self, value: &[u8]) -> &mut Self {
        self.expr("cmp", |d| {
            d.be32(NFTA_CMP_SREG, NFT_REG_1)
                .be32(NFTA_CMP_OP, NFT_CMP_EQ)
                .nest(NFTA_CMP_DATA, |v| {
                    v.put(NFTA_DATA_VALUE, value);
                });
        })
    }
    /// One expression: `{ name, data { ... } }` inside the rule's list.
    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Attrs<'_>)) -> &mut Self {
        self.nest(NFTA_LIST_ELEM, |e| {
            e.str(NFTA_EXPR_NAME, name).nest(NFTA_EXPR_DATA, data);
        })
    }
}

/// A finished batch: its bytes, and the sequence number and name of each message acknowledged.
type Finished = (Vec<u8>, Vec<(u32, String)>);

/// A batch of nfnetlink messages, each remembered by sequence number for error reports.
struct Batch {
    buf: Vec<u8>,
    acked: Vec<(u32, String)>,
    seq: u32,
}

impl Batch {
    fn new() -> Self {
        let mut b = Batch {
            buf: Vec::new(),
            acked: Vec::new(),
            seq: 0,
        };
        b.message(NFNL_MSG_BATCH_BEGIN, 0, libc::AF_UNSPEC as u8, None, |_| {});
        b
    }

    /// Appends one message; `what` names it in errors and asks for an acknowledgement.
    fn message(
        &mut self,
        kind: u16,
        flags: u16,
        family: u8,
        what: Option<String>,
        attrs: impl FnOnce(&mut Attrs<'_>),
    ) {
        self.seq += 1;
        let start = self.buf.len();
        let mut flags = flags | libc::NLM_F_REQUEST as u16;
        if let Some(w) = what {
            flags |= libc::NLM_F_ACK as u16;
            self.acked.push((self.seq, w));
        }
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version 0, resource id (the subsystem, for batch messages).
        self.buf.push(family);
        self.buf.push(0);
        self.buf
            .extend_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
        attrs(&mut Attrs(&mut self.buf));
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn nft(&mut self, msg: u16, flags: u16, what: String, attrs: impl FnOnce(&mut Attrs<'_>)) {
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | msg;
        self.message(kind, flags, NFPROTO_IPV4, Some(what), attrs);
    }

    fn finish(mut self) -> Finished {
        self.message(NFNL_MSG_BATCH_END, 0, libc::AF_UNSPEC as u8, None, |_| {});
        (self.buf, self.acked)
    }
}

/// The batch that creates the table (`replace`: whatever table of that name exists is replaced;
/// else an existing one makes the kernel refuse the batch with EEXIST) with one rejecting rule
/// per chain and destination.
fn deny_batch(blocked: &[SocketAddrV4], replace: bool) -> Finished {
    let create = (libc::NLM_F_CREATE) as u16;
    let mut b = Batch::new();
    let table = |a: &mut Attrs<'_>| {
        a.str(NFTA_TABLE_NAME, TABLE);
    };
    if replace {
        b.nft(NFT_MSG_NEWTABLE, create, format!("table {TABLE}"), table);
        b.nft(
            NFT_MSG_DELTABLE,
            0,
            format!("replacing table {TABLE}"),
            table,
        );
        b.nft(NFT_MSG_NEWTABLE, create, format!("table {TABLE}"), table);
    } else {
        let exclusive = create | libc::NLM_F_EXCL as u16;
        b.nft(NFT_MSG_NEWTABLE, exclusive, format!("table {TABLE}"), table);
    }
    for (chain, hook) in CHAINS {
        b.nft(NFT_MSG_NEWCHAIN, create, format!("chain {chain}"), |a| {
            a.str(NFTA_CHAIN_TABLE, TABLE)
                .str(NFTA_CHAIN_NAME, chain)
                .nest(NFTA_CHAIN_HOOK, |h| {
                    h.be32(NFTA_HOOK_HOOKNUM, hook).be32(NFTA_HOOK_PRIORITY, 0);
                })
                .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
                .str(NFTA_CHAIN_TYPE, "filter");
        });
        for dest in blocked {
            let flags = create | libc::NLM_F_APPEND as u16;
            b.nft(
                NFT_MSG_NEWRULE,
                flags,
                format!("rule {chain} {dest}"),
                |a| {
                    a.str(NFTA_RULE_TABLE, TABLE)
                        .str(NFTA_RULE_CHAIN, chain)
                        .nest(NFTA_RULE_EXPRESSIONS, |l| {
                            // ip daddr == dest.ip
                            l.payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4)
                                .equals(&dest.ip().octets());
                            // meta l4proto == tcp
                            l.expr("meta", |d| {
                                d.be32(NFTA_META_DREG, NFT_REG_1)
                                    .be32(NFTA_META_KEY, NFT_META_L4PROTO);
                            });
                            l.equals(&[libc::IPPROTO_TCP as u8]);
                            // tcp dport == dest.port
                            l.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2)
                                .equals(&dest.port().to_be_bytes());
                            // A reset, not a drop: the caller fails at once instead of hanging.
                            l.expr("reject", |d| {
                                d.be32(NFTA_REJECT_TYPE, NFT_REJECT_TCP_RST);
                            });
                        });
                },
            );
        }
    }
    b.finish()
}

/// Replaces the `openshell` table so that TCP to each of `blocked` is refused for pods and for
/// the guest itself. Returns the number of rules installed.
pub fn deny_tcp(blocked: &[SocketAddrV4]) -> Result<usize, NftError> {
    match apply(deny_batch(blocked, false)) {
        Err(NftError::Refused {
            errno: nix::errno::Errno::EEXIST,
            ..
        }) => apply(deny_batch(blocked, true))?,
        other => other?,
    }
    Ok(blocked.len() * CHAINS.len())
}

/// The batch that masquerades traffic leaving interface `out` (`oifname OUT masquerade` in a
/// post-routing NAT chain of [`TEST_NAT_TABLE`]), made or added to without touching anything else.
fn masquerade_batch(out: &str) -> Result<Finished, NftError> {
    if out.is_empty() || out.len() >= IFNAMSIZ || out.contains('\0') {
        return Err(NftError::BadName(out.to_string()));
    }
    let create = libc::NLM_F_CREATE as u16;
    let mut b = Batch::new();
    b.nft(
        NFT_MSG_NEWTABLE,
        create,
        format!("table {TEST_NAT_TABLE}"),
        |a| {
            a.str(NFTA_TABLE_NAME, TEST_NAT_TABLE);
        },
    );
    b.nft(NFT_MSG_NEWCHAIN, create, "chain postrouting".into(), |a| {
        a.str(NFTA_CHAIN_TABLE, TEST_NAT_TABLE)
            .str(NFTA_CHAIN_NAME, "postrouting")
            .nest(NFTA_CHAIN_HOOK, |h| {
                h.be32(NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING)
                    .be32(NFTA_HOOK_PRIORITY, NF_IP_PRI_NAT_SRC);
            })
            .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
            .str(NFTA_CHAIN_TYPE, "nat");
    });
    let flags = create | libc::NLM_F_APPEND as u16;
    b.nft(
        NFT_MSG_NEWRULE,
        flags,
        format!("masquerade out {out}"),
        |a| {
            a.str(NFTA_RULE_TABLE, TEST_NAT_TABLE)
                .str(NFTA_RULE_CHAIN, "postrouting")
                .nest(NFTA_RULE_EXPRESSIONS, |l| {
                    // The kernel compares the whole name buffer: the name, then zeros.
                    let mut name = [0u8; IFNAMSIZ];
                    name[..out.len()].copy_from_slice(out.as_bytes());
                    l.expr("meta", |d| {
                        d.be32(NFTA_META_DREG, NFT_REG_1)
                            .be32(NFTA_META_KEY, NFT_META_OIFNAME);
                    })
                    .equals(&name)
                    .expr("masq", |_| {});
                });
        },
    );
    Ok(b.finish())
}

/// Masquerades traffic leaving interface `out`, as k3s's CNI does for pods (tests only).
pub fn masquerade(out: &str) -> Result<(), NftError> {
    apply(masquerade_batch(out)?)
}

/// Deletes the `openshell` table, lifting the refusal (tests only: see the module doc).
pub fn remove_refusal() -> Result<(), NftError> {
    let mut b = Batch::new();
    b.nft(NFT_MSG_DELTABLE, 0, format!("delete table {TABLE}"), |a| {
        a.str(NFTA_TABLE_NAME, TABLE);
    });
    apply(b.finish())
}

/// Sends one batch on a socket of its own and waits for every acknowledgement it asked for.
fn apply((bytes, mut waiting): Finished) -> Result<(), NftError> {
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(NftError::Socket)?;
    sock.bind_auto().map_err(NftError::Socket)?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(NftError::Socket)?;
    sock.send(&bytes, 0).map_err(NftError::Socket)?;
    let mut buf = [0u8; 16 * 1024];
    while !waiting.is_empty() {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 2000) } <= 0 {
            return Err(NftError::NoAck(waiting[0].1.clone()));
        }
        let n = sock.recv(&mut &mut buf[..], 0).map_err(NftError::Socket)?;
        let mut at = 0;
        // Each reply is an NLMSG_ERROR: code 0 acknowledges, anything else refuses.
        while at + 20 <= n {
            let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            let seq = u32::from_ne_bytes([buf[at + 8], buf[at + 9], buf[at + 10], buf[at + 11]]);
            if len < 16 || at + len > n {
                break;
            }
            if kind == libc::NLMSG_ERROR as u16 {
                let code =
                    i32::from_ne_bytes([buf[at + 16], buf[at + 17], buf[at + 18], buf[at + 19]]);
                let Some(pos) = waiting.iter().position(|(s, _)| *s == seq) else {
                    at += (len + 3) & !3;
                    continue;
                };
                let (_, what) = waiting.remove(pos);
                if code != 0 {
                    return Err(NftError::Refused {
                        what,
                        errno: nix::errno::Errno::from_raw(-code),
                    });
                }
            }
            at += (len + 3) & !3;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_is_framed_and_every_change_is_acknowledged() {
        let dest: SocketAddrV4 = "192.168.127.1:80".parse().expect("addr");
        let (bytes, acked) = deny_batch(&[dest], true);
        // Walk the messages: lengths add up, begin and end frame the batch.
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < bytes.len() {
            let len = u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("len")) as usize;
            assert!(len >= 20 && len.is_multiple_of(4), "message length {len}");
            kinds.push(u16::from_ne_bytes([bytes[at + 4], bytes[at + 5]]));
            at += len;
        }
        assert_eq!(at, bytes.len());
        assert_eq!(kinds.first(), Some(&NFNL_MSG_BATCH_BEGIN));
        assert_eq!(kinds.last(), Some(&NFNL_MSG_BATCH_END));
        // table x3, 2 chains, 1 rule each.
        assert_eq!(acked.len(), 7);
        assert!(acked
            .iter()
            .any(|(_, w)| w == "rule forward 192.168.127.1:80"));
        // The address and port are in the rule as network-order bytes.
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(has(&[192, 168, 127, 1]));
        assert!(has(&80u16.to_be_bytes()));
        assert!(has(b"reject\0"));
        // Without replacing: one exclusive table creation instead of create, delete, create.
        let (fresh, fresh_acked) = deny_batch(&[dest], false);
        assert_eq!(fresh_acked.len(), 5);
        assert_eq!(fresh_acked[0].1, "table openshell");
        let flags = u16::from_ne_bytes([fresh[26], fresh[27]]);
        assert_ne!(
            flags & libc::NLM_F_EXCL as u16,
            0,
            "the fresh table is exclusive"
        );
        assert_eq!(bytes.len() - fresh.len(), 2 * (message_len(&bytes, 1)));
    }

    #[test]
    fn masquerade_matches_the_whole_interface_name() {
        let (bytes, acked) = masquerade_batch("eth0").expect("batch");
        let what: Vec<&str> = acked.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(
            what,
            [
                "table openshell-test-nat",
                "chain postrouting",
                "masquerade out eth0"
            ]
        );
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"eth0\0\0\0\0\0\0\0\0\0\0\0\0"), "padded to IFNAMSIZ");
        assert!(has(b"masq\0") && has(b"nat\0"));
        for bad in ["", "a-name-of-16-chr", "et\0h"] {
            assert!(
                matches!(masquerade_batch(bad), Err(NftError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    /// The length of the `i`th message of a batch.
    fn message_len(bytes: &[u8], i: usize) -> usize {
        let mut at = 0;
        for _ in 0..i {
            at += u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("len")) as usize;
        }
        u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("len")) as usize
    }
}
