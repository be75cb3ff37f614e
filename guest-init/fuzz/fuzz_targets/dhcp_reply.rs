//! Whatever arrives on the DHCP client's packet socket: it must never panic, and a reply it
//! accepts must belong to our transaction and carry a usable lease.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openshell_init::dhcp::{classify, dhcp_payload, Reply, MTU_RANGE};

const MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];

fuzz_target!(|data: &[u8]| {
    // Both as a raw IP packet and as a bare DHCP payload.
    let candidates = [dhcp_payload(data), Some(data)];
    for payload in candidates.into_iter().flatten() {
        if let Some(reply) = classify(payload, 0x1234_5678, &MAC) {
            let lease = match reply {
                Reply::Offer(l) | Reply::Ack { lease: l, .. } => l,
                Reply::Nak => continue,
            };
            assert!(!lease.address.is_unspecified() && !lease.address.is_broadcast());
            assert!((1..=32).contains(&lease.prefix));
            assert!(lease.mtu.is_none_or(|m| MTU_RANGE.contains(&m)));
        }
    }
});
