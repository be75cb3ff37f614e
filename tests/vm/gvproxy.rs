//! VM tests against real gvproxy (the pinned build `OPENSHELL_TEST_GVPROXY` names) on both
//! architectures: the guest's DHCP lease and DNS from it, forwards made through its API that
//! reach a guest service and listen on 127.0.0.1 only, the guest's refusal of TCP to its API for
//! the guest and for a pod namespace, and gvproxy gone with its forwards after `down` and after
//! the host is killed.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use openshell_shared::GuestMessage;
use openshell_tests::{
    both_arches, free_port, gvproxy, listeners_on, processes_using, serve_web, vm_slot, Boot,
    Running, BOOT_DEADLINE,
};

/// A boot with real gvproxy as its network, or `None` when gvproxy tests skip.
fn gvproxy_boot(arch: &str) -> Option<(Boot, PathBuf)> {
    let gvproxy = gvproxy()?;
    let boot = Boot::new(arch)?
        .net("gvproxy")
        .arg("--gvproxy")
        .arg(&gvproxy.display().to_string());
    Some((boot, gvproxy))
}

/// The guest's `name: value` lines from the probe script, by name.
fn probe_results(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The guest's DHCP client gets 192.168.127.2 from gvproxy's static lease for our MAC and the
/// resolver at .1, which answers gvproxy's own names. TCP to gvproxy's API (192.168.127.1:80) is
/// refused to the guest and to a pod namespace routed (and masqueraded) through it, while TCP to
/// gvproxy's DNS port opens from both; with the refusal removed, the same requests get the API's
/// answer, listing the forward `up` made: the refusal, not an empty port, is what stops them.
fn lease_dns_and_the_api_refusal(arch: &str) {
    let Some((boot, gvproxy)) = gvproxy_boot(arch) else {
        return;
    };
    let _slot = vm_slot();
    let host_port = free_port();
    let vm = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm");
    std::fs::copy(vm.join("gvproxy-probe.sh"), boot.root_path("probe.sh")).expect("probe");
    std::fs::copy(vm.join("pod-netns.sh"), boot.root_path("pod-netns.sh")).expect("pod");
    let done = boot
        .arg("-p")
        .arg(&format!("{host_port}:8080"))
        .exec(&["/bin/sh", "/probe.sh"])
        .start()
        .wait(BOOT_DEADLINE);
    assert!(done.status.success(), "{}", done.output());
    assert!(
        done.stdout.contains(&format!(
            "network: gvproxy (asked for with --net gvproxy; given with --gvproxy: {})",
            gvproxy.display()
        )),
        "{}",
        done.output()
    );
    let network = done
        .guest_messages()
        .into_iter()
        .find_map(|m| match m {
            GuestMessage::Log { text, .. } if text.starts_with("network: ") => Some(text),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no network report\n{}", done.output()));
    assert!(
        network.starts_with(
            "network: eth0 192.168.127.2/24 via 192.168.127.1 dns 192.168.127.1 (DHCP from 192.168.127.1 in"
        ),
        "{network}"
    );
    assert!(
        network.contains("; TCP to 192.168.127.1:80 refused; host loopback at 192.168.127.254"),
        "{network}"
    );

    let read = |name: &str| std::fs::read_to_string(done.boot.root_path(name)).unwrap_or_default();
    let (results, log) = (probe_results(&read("probe.out")), read("probe.log"));
    let get = |key: &str| results.get(key).map(String::as_str).unwrap_or("(missing)");
    let why = format!("{results:#?}\n{log}\n{}", done.output());
    assert_eq!(get("done"), "yes", "{why}");
    assert_eq!(get("resolv"), "nameserver 192.168.127.1", "{why}");
    assert_eq!(get("dns-host"), "192.168.127.254", "{why}");
    assert_eq!(get("dns-gateway"), "192.168.127.1", "{why}");
    assert_eq!(get("masquerade"), "0", "{why}");
    for ns in ["guest", "pod"] {
        assert_eq!(get(&format!("{ns}-gateway-tcp")), "open", "{why}");
        assert_eq!(
            get(&format!("{ns}-api")),
            "nc: can't connect to remote host (192.168.127.1): Connection refused",
            "{why}"
        );
    }
    assert_eq!(get("removed"), "0", "{why}");
    for ns in ["guest", "pod"] {
        assert_eq!(
            get(&format!("{ns}-api-unrefused")),
            "HTTP/1.0 200 OK",
            "{why}"
        );
    }
    assert_eq!(
        get("api-forwards"),
        format!("\"local\":\"127.0.0.1:{host_port}\",\"remote\":\"192.168.127.2:8080\""),
        "{why}"
    );
}
both_arches!(lease_dns_and_the_api_refusal);

/// One HTTP/1.0 GET of `path` on gvproxy's API socket; the whole answer.
fn api_get(socket: &Path, path: &str) -> String {
    let mut s = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("gvproxy API {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    answer
}

/// Boots a web server in the guest behind `-p HOST:8080` through gvproxy and waits until it
/// answers on 127.0.0.1:HOST. Returns the running boot, the host port and the answer.
fn serving(arch: &str) -> Option<(Running, u16, String)> {
    let (boot, _) = gvproxy_boot(arch)?;
    let host_port = free_port();
    let (running, answer) = serve_web(boot, host_port);
    Some((running, host_port, answer))
}

/// The gvproxy processes of a boot: those whose command line names its run directory.
fn gvproxies(run_dir: &Path) -> Vec<(i32, String)> {
    processes_using(run_dir)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("-listen-qemu"))
        .collect()
}

/// Waits (a few seconds at most) until gvproxy is gone and nothing listens on `port`.
fn assert_gone(run_dir: &Path, port: u16, after: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gvproxies(run_dir).is_empty() || !listeners_on(port).is_empty() {
        assert!(
            Instant::now() < deadline,
            "after {after}: gvproxy {:?}, listeners on {port}: {:?}",
            gvproxies(run_dir),
            listeners_on(port)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
    assert!(
        refused.is_err(),
        "after {after}: 127.0.0.1:{port} still answers"
    );
}

/// `-p HOST:8080` through gvproxy's API: the guest's web server answers on 127.0.0.1:HOST, gvproxy
/// listens there on the loopback address only, and its API lists the forward and the guest's
/// lease for our MAC. After `down`, gvproxy is gone and so is the forward.
fn forward_reaches_the_guest_and_goes_with_down(arch: &str) {
    let _slot = vm_slot();
    let Some((running, host_port, answer)) = serving(arch) else {
        return;
    };
    let run_dir = running.boot.run_dir.path().join("run");
    let listening = listeners_on(host_port);
    let api = run_dir.join("gvproxy-api.sock");
    let forwards = api_get(&api, "/services/forwarder/all");
    let leases = api_get(&api, "/services/dhcp/leases");
    let alive = gvproxies(&run_dir);
    let down = running.down(60);
    let done = running.wait(BOOT_DEADLINE);
    assert!(down.status.success(), "down: {down:?}\n{}", done.output());
    assert!(answer.contains(" 200 "), "{answer}");
    assert!(answer.contains(&format!("served by {arch}")), "{answer}");
    assert_eq!(
        listening,
        vec![format!("0100007F:{host_port:04X}")],
        "the forward must listen on 127.0.0.1 only"
    );
    assert!(
        forwards.contains(&format!(
            "{{\"local\":\"127.0.0.1:{host_port}\",\"remote\":\"192.168.127.2:8080\",\"protocol\":\"tcp\"}}"
        )),
        "{forwards}"
    );
    assert!(
        leases.contains("\"192.168.127.2\":\"5a:94:ef:e4:0c:ee\""),
        "{leases}"
    );
    assert_eq!(alive.len(), 1, "one gvproxy while it ran: {alive:?}");
    assert_gone(&run_dir, host_port, "down");
}
both_arches!(forward_reaches_the_guest_and_goes_with_down);

/// A host killed with SIGKILL cannot stop gvproxy itself: gvproxy dies with it (parent-death
/// signal) and its forward goes away.
fn gvproxy_dies_with_a_killed_host(arch: &str) {
    let _slot = vm_slot();
    let Some((running, host_port, _)) = serving(arch) else {
        return;
    };
    let run_dir = running.boot.run_dir.path().join("run");
    assert_eq!(gvproxies(&run_dir).len(), 1);
    running.signal(libc::SIGKILL);
    let done = running.wait(BOOT_DEADLINE);
    assert_eq!(
        done.status.signal(),
        Some(libc::SIGKILL),
        "{}",
        done.output()
    );
    assert_gone(&run_dir, host_port, "SIGKILL of the host");
}
both_arches!(gvproxy_dies_with_a_killed_host);
