//! One nftables transaction over NETLINK_NETFILTER, with no `nft` binary in the guest: the
//! `openshell` table of destinations nothing in the guest may reach. Each [`Refusal`] is one
//! rule in the `forward` chain (pods) and one in `output` (the guest's own processes,
//! host-network pods included): an address, a protocol, and either the one port refused or every
//! port but the allowed ones. TCP gets a reset, UDP an ICMP port-unreachable, so a caller fails
//! at once instead of hanging. What is refused is the network phase's policy
//! (`phases::network::guard`); this module only builds and applies the batch.
//!
//! At boot no table exists (netfilter state does not outlive a boot), so the batch creates it
//! outright. If one is there (the phase run again, or the rules redone once the router is
//! known), the kernel refuses that whole batch and the table is replaced whole in a second one
//! (create, delete, create again, then its chains and rules): one transaction, so the guest is
//! never without the table, a second run leaves exactly one copy and a failure leaves the
//! previous one. Tearing down a table is kernel work worth sparing at boot under emulation.
//!
//! The table lives in the guest's network namespace. A pod has a namespace of its own (unless it
//! asks for the host's network), so deleting or flushing an `openshell` table there, even with
//! CAP_NET_ADMIN in it, touches only the pod's own.
//!
//! For the tests of the refusal inside a VM (`openshell-init nft-test`, never run at boot): the
//! masquerade k3s's CNI gives pods, so a test's pod namespace gets answers from outside the
//! guest as a real pod does, and the removal of the `openshell` table, so a test can show that
//! what it refused is otherwise answered.

use std::net::Ipv4Addr;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
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
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_REJECT_TYPE: u16 = 1;
const NFTA_REJECT_ICMP_CODE: u16 = 2;
const NFT_REG_1: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CT_STATE: u32 = 0;
/// Conntrack state bits (NF_CT_STATE_BIT): established and related.
const CT_ESTABLISHED_OR_RELATED: u32 = 0b110;
const NFT_REJECT_ICMP_UNREACH: u32 = 0;
const NFT_REJECT_TCP_RST: u32 = 1;
/// ICMP destination unreachable, code 3: port unreachable (what a closed UDP port answers).
const ICMP_PORT_UNREACH: u8 = 3;
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
        self.compare(NFT_CMP_EQ, value)
    }

    /// Goes on with the rule only if register 1 does not hold `value`.
    fn differs(&mut self, value: &[u8]) -> &mut Self {
        self.compare(NFT_CMP_NEQ, value)
    }

    fn compare(&mut self, op: u32, value: &[u8]) -> &mut Self {
        self.expr("cmp", |d| {
            d.be32(NFTA_CMP_SREG, NFT_REG_1)
                .be32(NFTA_CMP_OP, op)
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

/// A transport protocol the table refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Tcp => libc::IPPROTO_TCP as u8,
            Proto::Udp => libc::IPPROTO_UDP as u8,
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// Which destination ports of an address a rule refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    /// This one.
    Only(u16),
    /// Every port but these.
    AllBut(Vec<u16>),
}

/// One refused destination: `proto` to `addr` on `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub addr: Ipv4Addr,
    pub proto: Proto,
    pub ports: Ports,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.ports {
            Ports::Only(p) => write!(f, "{} {}:{p}", self.proto, self.addr),
            Ports::AllBut(allowed) if allowed.is_empty() => {
                write!(f, "{} {}:*", self.proto, self.addr)
            }
            Ports::AllBut(allowed) => {
                let list: Vec<String> = allowed.iter().map(u16::to_string).collect();
                write!(f, "{} {}:* but {}", self.proto, self.addr, list.join(","))
            }
        }
    }
}

/// The rule's expressions: a packet that neither belongs to nor relates to a known connection
/// (replies, such as the guest's answers on a connection a port forward made, pass), to the
/// address, protocol and ports; then reject.
fn refusal_rule(l: &mut Attrs<'_>, r: &Refusal) {
    // ct state & (established | related) == 0; conntrack keeps the state in host order.
    l.expr("ct", |d| {
        d.be32(NFTA_CT_DREG, NFT_REG_1)
            .be32(NFTA_CT_KEY, NFT_CT_STATE);
    });
    l.expr("bitwise", |d| {
        d.be32(NFTA_BITWISE_SREG, NFT_REG_1)
            .be32(NFTA_BITWISE_DREG, NFT_REG_1)
            .be32(NFTA_BITWISE_LEN, 4)
            .nest(NFTA_BITWISE_MASK, |v| {
                v.put(NFTA_DATA_VALUE, &CT_ESTABLISHED_OR_RELATED.to_ne_bytes());
            })
            .nest(NFTA_BITWISE_XOR, |v| {
                v.put(NFTA_DATA_VALUE, &0u32.to_ne_bytes());
            });
    });
    l.equals(&0u32.to_ne_bytes());
    // ip daddr == addr; meta l4proto == proto
    l.payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4)
        .equals(&r.addr.octets());
    l.expr("meta", |d| {
        d.be32(NFTA_META_DREG, NFT_REG_1)
            .be32(NFTA_META_KEY, NFT_META_L4PROTO);
    });
    l.equals(&[r.proto.number()]);
    // th dport (the same offset for TCP and UDP)
    let refused = match &r.ports {
        Ports::Only(_) => true,
        Ports::AllBut(allowed) => !allowed.is_empty(),
    };
    if refused {
        l.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
    }
    match &r.ports {
        Ports::Only(port) => {
            l.equals(&port.to_be_bytes());
        }
        Ports::AllBut(allowed) => {
            for port in allowed {
                l.differs(&port.to_be_bytes());
            }
        }
    }
    // A reset or port-unreachable, not a drop: the caller fails at once instead of hanging.
    l.expr("reject", |d| match r.proto {
        Proto::Tcp => {
            d.be32(NFTA_REJECT_TYPE, NFT_REJECT_TCP_RST);
        }
        Proto::Udp => {
            d.be32(NFTA_REJECT_TYPE, NFT_REJECT_ICMP_UNREACH)
                .put(NFTA_REJECT_ICMP_CODE, &[ICMP_PORT_UNREACH]);
        }
    });
}

/// The batch that creates the table (`replace`: whatever table of that name exists is replaced;
/// else an existing one makes the kernel refuse the batch with EEXIST) with one rule per chain
/// and refusal.
fn refusal_batch(refusals: &[Refusal], replace: bool) -> Finished {
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
        for r in refusals {
            let flags = create | libc::NLM_F_APPEND as u16;
            b.nft(NFT_MSG_NEWRULE, flags, format!("rule {chain} {r}"), |a| {
                a.str(NFTA_RULE_TABLE, TABLE)
                    .str(NFTA_RULE_CHAIN, chain)
                    .nest(NFTA_RULE_EXPRESSIONS, |l| refusal_rule(l, r));
            });
        }
    }
    b.finish()
}

/// Replaces the `openshell` table so that each of `refusals` holds for pods and for the guest
/// itself. Returns the number of rules installed.
pub fn refuse(refusals: &[Refusal]) -> Result<usize, NftError> {
    match apply(refusal_batch(refusals, false)) {
        Err(NftError::Refused {
            errno: nix::errno::Errno::EEXIST,
            ..
        }) => apply(refusal_batch(refusals, true))?,
        other => other?,
    }
    Ok(refusals.len() * CHAINS.len())
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

/// Deletes every rule of the `openshell` table and keeps its chains, as `nft flush table` does
/// (tests only: a pod trying to lift the refusal without deleting the table).
pub fn flush_refusal() -> Result<(), NftError> {
    let mut b = Batch::new();
    // A rule deletion naming the table and no chain: every rule of every chain in it.
    b.nft(NFT_MSG_DELRULE, 0, format!("flush table {TABLE}"), |a| {
        a.str(NFTA_RULE_TABLE, TABLE);
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

    fn api() -> Refusal {
        Refusal {
            addr: Ipv4Addr::new(192, 168, 127, 1),
            proto: Proto::Tcp,
            ports: Ports::Only(80),
        }
    }

    #[test]
    fn batch_is_framed_and_every_change_is_acknowledged() {
        let (bytes, acked) = refusal_batch(&[api()], true);
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
            .any(|(_, w)| w == "rule forward tcp 192.168.127.1:80"));
        // The address and port are in the rule as network-order bytes.
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(has(&[192, 168, 127, 1]));
        assert!(has(&80u16.to_be_bytes()));
        assert!(has(b"reject\0"));
        // Without replacing: one exclusive table creation instead of create, delete, create.
        let (fresh, fresh_acked) = refusal_batch(&[api()], false);
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

    /// The expressions of the one rule in `output` of a batch made of `r`, as (name, data).
    fn expressions(r: &Refusal) -> Vec<(String, Vec<u8>)> {
        let (bytes, _) = refusal_batch(std::slice::from_ref(r), false);
        // Messages: begin, table, chain, rule (forward), chain, rule (output), end.
        let mut at = 0;
        for _ in 0..5 {
            at += message_len(&bytes[at..], 0);
        }
        let rule = &bytes[at..at + message_len(&bytes[at..], 0)];
        let attrs = parse_attrs(&rule[20..]);
        let list = attrs
            .iter()
            .find(|(ty, _)| ty & !NLA_F_NESTED == NFTA_RULE_EXPRESSIONS)
            .expect("expressions");
        parse_attrs(&list.1)
            .iter()
            .map(|(_, elem)| {
                let parts = parse_attrs(elem);
                let name = parts
                    .iter()
                    .find(|(t, _)| *t == NFTA_EXPR_NAME)
                    .expect("name");
                let data = parts
                    .iter()
                    .find(|(t, _)| t & !NLA_F_NESTED == NFTA_EXPR_DATA)
                    .map(|(_, d)| d.clone())
                    .unwrap_or_default();
                let name = String::from_utf8_lossy(&name.1)
                    .trim_end_matches('\0')
                    .to_string();
                (name, data)
            })
            .collect()
    }

    /// Netlink attributes as (type, payload), padding skipped.
    fn parse_attrs(mut b: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        while b.len() >= 4 {
            let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
            let ty = u16::from_ne_bytes([b[2], b[3]]);
            out.push((ty, b[4..len].to_vec()));
            b = &b[((len + 3) & !3).min(b.len())..];
        }
        out
    }

    /// The values the rule's comparisons hold, with their operators.
    fn comparisons(exprs: &[(String, Vec<u8>)]) -> Vec<(u32, Vec<u8>)> {
        exprs
            .iter()
            .filter(|(n, _)| n == "cmp")
            .map(|(_, d)| {
                let a = parse_attrs(d);
                let op = a.iter().find(|(t, _)| *t == NFTA_CMP_OP).expect("op");
                let value = a
                    .iter()
                    .find(|(t, _)| t & !NLA_F_NESTED == NFTA_CMP_DATA)
                    .map(|(_, v)| parse_attrs(v)[0].1.clone())
                    .expect("data");
                (u32::from_be_bytes(op.1[..4].try_into().expect("op")), value)
            })
            .collect()
    }

    /// Every port but the allowed ones: the address and protocol must match, then each allowed
    /// port must differ; UDP is refused with port-unreachable, TCP with a reset.
    #[test]
    fn all_but_the_allowed_ports_are_refused() {
        let host = Ipv4Addr::new(192, 168, 127, 254);
        let udp = Refusal {
            addr: host,
            proto: Proto::Udp,
            ports: Ports::AllBut(vec![8080, 53]),
        };
        assert_eq!(udp.to_string(), "udp 192.168.127.254:* but 8080,53");
        let exprs = expressions(&udp);
        let names: Vec<&str> = exprs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "ct", "bitwise", "cmp", "payload", "cmp", "meta", "cmp", "payload", "cmp", "cmp",
                "reject"
            ]
        );
        assert_eq!(
            comparisons(&exprs),
            [
                (NFT_CMP_EQ, 0u32.to_ne_bytes().to_vec()),
                (NFT_CMP_EQ, host.octets().to_vec()),
                (NFT_CMP_EQ, vec![libc::IPPROTO_UDP as u8]),
                (NFT_CMP_NEQ, 8080u16.to_be_bytes().to_vec()),
                (NFT_CMP_NEQ, 53u16.to_be_bytes().to_vec()),
            ]
        );
        let reject = parse_attrs(&exprs.last().expect("reject").1);
        assert_eq!(
            reject[0],
            (
                NFTA_REJECT_TYPE,
                NFT_REJECT_ICMP_UNREACH.to_be_bytes().to_vec()
            )
        );
        assert_eq!(reject[1].0, NFTA_REJECT_ICMP_CODE);
        assert_eq!(reject[1].1[0], ICMP_PORT_UNREACH);
        // Nothing allowed: the port is not even looked at.
        let tcp = Refusal {
            addr: host,
            proto: Proto::Tcp,
            ports: Ports::AllBut(vec![]),
        };
        assert_eq!(tcp.to_string(), "tcp 192.168.127.254:*");
        let names: Vec<String> = expressions(&tcp).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["ct", "bitwise", "cmp", "payload", "cmp", "meta", "cmp", "reject"]
        );
        let one = expressions(&api());
        assert_eq!(
            comparisons(&one)[3],
            (NFT_CMP_EQ, 80u16.to_be_bytes().to_vec())
        );
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
