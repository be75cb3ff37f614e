//! VM network tests: the guest's own DHCP client against passt's DHCP, and port forwards from
//! 127.0.0.1 on the host into a service the guest runs, on both architectures.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use openshell_shared::GuestMessage;
use openshell_tests::{both_arches, vm_slot, Boot, BOOT_DEADLINE};

/// With passt as the network, the guest's own DHCP client gets its lease from passt's DHCP.
fn passt_gives_the_guest_a_lease(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let done = boot
        .net("passt")
        .arg("--port")
        .arg(&free_port().to_string())
        .exec(&["/bin/true"])
        .start()
        .wait(BOOT_DEADLINE);
    assert!(done.status.success(), "{}", done.output());
    let network = done
        .guest_messages()
        .into_iter()
        .find_map(|m| match m {
            GuestMessage::Log { text, .. } if text.starts_with("network: ") => Some(text),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no network report\n{}", done.output()));
    assert!(
        network.contains("eth0") && network.contains("DHCP from"),
        "{network}"
    );
    // The guest kernel took the nftables batch that keeps pods off gvproxy's control API.
    assert!(
        network.contains("TCP to 192.168.127.1:80 refused"),
        "{network}"
    );
}
both_arches!(passt_gives_the_guest_a_lease);

/// A port nothing listens on right now (the kernel picks it; racy only against other binders).
fn free_port() -> u16 {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Local addresses (hex `ADDR:PORT` as in /proc/net/tcp) listening on `port`.
fn listeners_on(port: u16) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let suffix = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // st 0A is LISTEN.
            (cols.get(3) == Some(&"0A") && cols.get(1)?.ends_with(&suffix))
                .then(|| cols[1].to_string())
        })
        .collect()
}

/// One HTTP GET through the forward; `None` while nothing in the guest answers yet.
fn get(port: u16) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    (!answer.is_empty()).then_some(answer)
}

/// `-p HOST:GUEST` with passt: a web server the guest starts on GUEST answers on 127.0.0.1:HOST
/// on the host, and only on the loopback address.
fn forwarded_port_reaches_a_guest_service(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let host_port = free_port();
    let script = "mkdir -p /tmp/www && echo \"served by $(uname -m)\" > /tmp/www/index.html \
                  && exec busybox httpd -f -p 8080 -h /tmp/www";
    let mut running = boot
        .net("passt")
        .arg("-p")
        .arg(&format!("{host_port}:8080"))
        .exec(&["/bin/sh", "-c", script])
        .start();
    let deadline = Instant::now() + BOOT_DEADLINE;
    let answer = loop {
        assert!(
            running.is_running(),
            "host exited before the service answered"
        );
        if let Some(a) = get(host_port) {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no answer on 127.0.0.1:{host_port}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let listening = listeners_on(host_port);
    running.signal(libc::SIGTERM);
    let done = running.wait(BOOT_DEADLINE);
    assert!(
        answer.starts_with("HTTP/1.") && answer.contains(" 200 "),
        "{answer}"
    );
    assert!(answer.contains(&format!("served by {arch}")), "{answer}");
    // 0100007F is 127.0.0.1 in /proc/net/tcp's byte order; never 00000000 (all interfaces).
    assert_eq!(
        listening,
        vec![format!("0100007F:{host_port:04X}")],
        "forward must listen on loopback only"
    );
    assert!(
        done.stdout
            .contains(&format!("127.0.0.1:{host_port} -> guest:8080")),
        "{}",
        done.output()
    );
    let (status, _, synced) = done.exit_message();
    assert_eq!(status, 128 + libc::SIGTERM, "{}", done.output());
    assert!(synced);
}
both_arches!(forwarded_port_reaches_a_guest_service);
