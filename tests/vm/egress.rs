//! VM tests of the ways out of the VM, tried from a pod namespace as a hostile pod would: the
//! user's host loopback (through real gvproxy's 192.168.127.254 and real passt's gateway), the
//! guest's refusal surviving a pod that flushes and deletes the `openshell` table in its own
//! namespace, and the exec service's vsock port from inside the guest.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

use openshell_shared::exec::{ExecRequest, Frame, HostFrame};
use openshell_shared::GuestMessage;
use openshell_tests::{both_arches, free_port, gvproxy, vm_slot, Boot, Finished, BOOT_DEADLINE};

/// A listener on this machine's 127.0.0.1 that answers every connection with one line naming
/// its port, for as long as the test runs. Returns the port.
fn host_service() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = writeln!(conn, "host service on {port}");
        }
    });
    port
}

/// The exec request a hostile guest process sends to the exec service, in hex.
fn exec_request_hex() -> String {
    let req = HostFrame::Request(ExecRequest {
        argv: ["/bin/sh", "-c", "touch /pwned"].map(String::from).to_vec(),
        ..ExecRequest::default()
    });
    let bytes = req.encode().expect("encode");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Boots `boot` with the probe as its workload against `addr` (see egress-probe.sh) and the
/// host listening on a listed and an unlisted port; returns the run, the ports and the probe's
/// results.
fn probe(boot: Boot, addr: &str) -> (Finished, u16, u16, BTreeMap<String, String>) {
    let vm = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm");
    for (from, to) in [
        ("egress-probe.sh", "probe.sh"),
        ("pod-netns.sh", "pod-netns.sh"),
    ] {
        std::fs::copy(vm.join(from), boot.root_path(to)).expect("install the probe");
    }
    let (listed, unlisted) = (host_service(), host_service());
    let done = boot
        .arg("--host-port")
        .arg(&listed.to_string())
        .exec(&[
            "/bin/sh",
            "/probe.sh",
            addr,
            &listed.to_string(),
            &unlisted.to_string(),
            &exec_request_hex(),
        ])
        .start()
        .wait(BOOT_DEADLINE);
    let text = std::fs::read_to_string(done.boot.root_path("probe.out")).unwrap_or_default();
    let results = text
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect();
    (done, listed, unlisted, results)
}

/// What the run printed, the probe's results and its raw log, for failure messages.
fn why(done: &Finished, results: &BTreeMap<String, String>) -> String {
    let log = std::fs::read_to_string(done.boot.root_path("probe.log")).unwrap_or_default();
    format!("{results:#?}\n{log}\n{}", done.output())
}

/// What every network must show: the listed port answers the guest and a pod, the unlisted one
/// is refused at once; a pod flushing and deleting the `openshell` table touches nothing (its
/// namespace has none) and stays refused; the exec service runs nothing for a guest process.
fn assert_egress(done: &Finished, listed: u16, r: &BTreeMap<String, String>) {
    let get = |k: &str| r.get(k).map(String::as_str).unwrap_or("(missing)");
    let why = why(done, r);
    assert!(done.status.success(), "{why}");
    assert_eq!(get("done"), "yes", "{why}");
    assert_eq!(get("masquerade"), "0", "{why}");
    let addr = get("addr");
    let refused = format!("nc: can't connect to remote host ({addr}): Connection refused");
    for ns in ["guest", "pod"] {
        assert_eq!(
            get(&format!("{ns}-listed")),
            format!("host service on {listed}"),
            "{why}"
        );
        assert_eq!(get(&format!("{ns}-unlisted")), refused, "{ns}: {why}");
    }
    for (what, how) in [("flush", "flush"), ("remove", "delete")] {
        let expected = format!(
            "1 openshell-init: {what} the refusal: nf_tables refused {how} table openshell: ENOENT"
        );
        assert!(
            get(&format!("pod-{what}")).starts_with(&expected),
            "{expected}\n{why}"
        );
    }
    assert_eq!(get("pod-unlisted-after"), refused, "{why}");
    assert_eq!(get("pwned"), "no", "{why}");
    for cid in [1, 3] {
        let answer = get(&format!("vsock-{cid}"));
        // Either the connection never reaches the service (no loopback transport) or the
        // service refuses the peer by its CID.
        assert!(
            answer.contains("vsock connect")
                || answer.contains(&format!("CID {cid} is not the host")),
            "vsock-{cid}: {answer}\n{why}"
        );
    }
    assert_eq!(get("removed"), "0", "{why}");
}

/// The guest's `network_guarded` message, as the host received it.
fn guarded(done: &Finished) -> (Vec<String>, Vec<u16>) {
    done.guest_messages()
        .into_iter()
        .find_map(|m| match m {
            GuestMessage::NetworkGuarded {
                host_loopback,
                host_ports,
                ..
            } => Some((
                host_loopback.iter().map(|a| a.to_string()).collect(),
                host_ports,
            )),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no network_guarded\n{}", done.output()))
}

/// Real gvproxy: the guest refuses 192.168.127.254 (gvproxy's translation of the host's
/// 127.0.0.1) but for the listed port; gvproxy itself would let the unlisted one through, as
/// the pod finds once the guest's table is gone. The forward `-p` asks for is made only after
/// the guest confirmed its refusals.
fn host_loopback_through_gvproxy(arch: &str) {
    let Some(gvproxy) = gvproxy() else { return };
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let boot = boot
        .net("gvproxy")
        .arg("--gvproxy")
        .arg(&gvproxy.display().to_string())
        .arg("-p")
        .arg(&format!("{}:8080", free_port()));
    let (done, listed, unlisted, r) = probe(boot, "192.168.127.254");
    assert_egress(&done, listed, &r);
    let why = why(&done, &r);
    assert_eq!(
        r.get("pod-unlisted-unrefused").map(String::as_str),
        Some(format!("host service on {unlisted}").as_str()),
        "gvproxy itself translates every port: {why}"
    );
    assert!(
        done.stdout.contains(&format!(
            "host loopback: the guest may reach 127.0.0.1 on this machine on port(s) {listed} only (the guest refuses the rest at 192.168.127.254)"
        )),
        "{why}"
    );
    let (loopback, ports) = guarded(&done);
    assert_eq!(loopback, ["192.168.127.254"], "{why}");
    assert_eq!(ports, [listed], "{why}");
    let host_events: Vec<String> = done.report.as_ref().expect("report")["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["source"] == "host")
        .filter_map(|e| e["event"]["type"].as_str().map(String::from))
        .collect();
    let at = |name: &str| host_events.iter().position(|e| e == name);
    let (confirmed, exposed) = (at("network-guarded"), at("forwards-exposed"));
    assert!(
        confirmed.is_some() && confirmed < exposed,
        "forwards before the confirmation: {host_events:?}"
    );
}
both_arches!(host_loopback_through_gvproxy);

/// Real passt with a host port listed: its gateway still maps to this machine's 127.0.0.1, and
/// the guest refuses every other port there (DNS excepted); without the guest's table the
/// unlisted port answers, so the guest's refusal is what holds.
fn host_loopback_through_passt_with_a_listed_port(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let (done, listed, unlisted, r) = probe(boot.net("passt"), "router");
    assert_egress(&done, listed, &r);
    let why = why(&done, &r);
    assert_eq!(
        r.get("pod-unlisted-unrefused").map(String::as_str),
        Some(format!("host service on {unlisted}").as_str()),
        "{why}"
    );
    let (loopback, ports) = guarded(&done);
    let router = r.get("addr").cloned().unwrap_or_default();
    assert_eq!(loopback, ["192.168.127.254".to_string(), router], "{why}");
    assert_eq!(ports, [listed], "{why}");
}
both_arches!(host_loopback_through_passt_with_a_listed_port);

/// Real passt with no host port: `--no-map-gw`, so even with the guest's table removed the
/// gateway does not lead to this machine's 127.0.0.1: the host enforces it.
fn passt_without_host_ports_does_not_map_the_gateway(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let vm = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm");
    std::fs::copy(vm.join("pod-netns.sh"), boot.root_path("pod-netns.sh")).expect("pod");
    let port = host_service();
    let script = format!(
        "log=/probe.log; . /pod-netns.sh; make_pod; \
         gw=$(ip route | awk '/^default/ {{ print $3; exit }}'); \
         /sbin/openshell-init nft-test --remove-refusal >> $log 2>&1; \
         timeout 20 $in_pod nc -w 5 $gw {port} < /dev/null > /probe.out 2>&1; \
         echo \"exit $?\" >> /probe.out; kill $pod"
    );
    let done = boot
        .net("passt")
        .exec(&["/bin/sh", "-c", &script])
        .start()
        .wait(BOOT_DEADLINE);
    let out = std::fs::read_to_string(done.boot.root_path("probe.out")).unwrap_or_default();
    let log = std::fs::read_to_string(done.boot.root_path("probe.log")).unwrap_or_default();
    assert!(done.status.success(), "{out}\n{log}\n{}", done.output());
    assert!(
        !out.contains("host service"),
        "the gateway reached this machine's loopback: {out}\n{log}"
    );
    assert!(out.contains("exit 1"), "{out}\n{log}");
    assert!(
        done.stdout.contains(
            "host loopback: no port of this machine's 127.0.0.1 is reachable from the guest (passt --no-map-gw)"
        ),
        "{}",
        done.output()
    );
}
both_arches!(passt_without_host_ports_does_not_map_the_gateway);
