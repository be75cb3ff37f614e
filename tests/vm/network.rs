//! VM network tests: the guest's own DHCP client against passt's DHCP, and port forwards from
//! 127.0.0.1 on the host into a service the guest runs, on both architectures.

use std::path::Path;
use std::time::{Duration, Instant};

use openshell_shared::GuestMessage;
use openshell_tests::{
    both_arches, free_port, listeners_on, serve_web, vm_slot, Boot, Finished, BOOT_DEADLINE,
};

// The gateway's health method and the host tests' gateway serving it: one copy, the host's.
#[path = "../../host/src/health_proto.rs"]
mod health_proto;
#[path = "../../host/src/health_server.rs"]
#[allow(dead_code)]
mod health_server;

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

/// `-p HOST:GUEST` with passt: a web server the guest starts on GUEST answers on 127.0.0.1:HOST
/// on the host, and only on the loopback address.
fn forwarded_port_reaches_a_guest_service(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let host_port = free_port();
    let (running, answer) = serve_web(boot.net("passt"), host_port);
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

/// Installs the test's stand-in k3s in the guest's root and makes it the workload (a `k3s`
/// section in the boot configuration), serving the gateway on `port` inside the guest.
fn with_stand_in_k3s(boot: &Boot, port: u16, never_ready: bool) {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-init/tests/fixtures/fake-k3s.sh");
    let k3s = boot.root_path("usr/local/bin/k3s");
    std::fs::create_dir_all(k3s.parent().expect("dir")).expect("mkdir");
    std::fs::copy(&fixture, &k3s).expect("install the stand-in k3s");
    let state = boot.root_path("fake-k3s");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("gateway-port"), port.to_string()).expect("port");
    if never_ready {
        std::fs::write(state.join("never-ready"), "").expect("never-ready");
    }
    let config = boot.root_path("etc/openshell/init.yaml");
    let mut text = std::fs::read_to_string(&config).expect("init.yaml");
    // The base root boots without a state disk (it cannot format one), and containerd's
    // overlayfs snapshotter cannot work on the virtio-fs root, which the capabilities phase
    // refuses; the stand-in runs no containers, so it gets the snapshotter that works there.
    text.push_str(&format!(
        "k3s:\n  gateway_port: {port}\n  snapshotter: native\n"
    ));
    std::fs::write(&config, text).expect("write init.yaml");
}

/// The guest announces k3s's stages in `hello`; the host prints `ready` only after the last one,
/// `gateway-ready`, and after its own probe of the forwarded gateway port answered like a TLS
/// server (accept, then silence). A stand-in k3s plays k3s (it cannot be downloaded here); its
/// gateway is a TCP listener that speaks neither TLS nor gRPC, so the host is told to use the
/// TCP probe (`--ready-probe tcp`); the gRPC health probe is tested against a real gRPC server
/// in the host's own tests.
fn ready_waits_for_the_gateway_and_the_hosts_probe(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let host_port = free_port();
    let api_port = free_port();
    with_stand_in_k3s(&boot, 30051, false);
    let mut running = boot
        .net("passt")
        .arg("--ready-probe")
        .arg("tcp")
        .arg("-p")
        .arg(&format!("{host_port}:30051"))
        .arg("-p")
        .arg(&format!("{api_port}:6443"))
        .start();
    let deadline = Instant::now() + BOOT_DEADLINE;
    while !running.boot.root_path("fake-k3s/node").exists() || !running.is_running() {
        assert!(
            running.is_running(),
            "host exited before the stand-in k3s ran"
        );
        assert!(
            Instant::now() < deadline,
            "the stand-in k3s never got going"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Give the host time to see gateway-ready and probe; then stop the VM.
    let report_ready = loop {
        std::thread::sleep(Duration::from_millis(500));
        let log = std::fs::read_to_string(running.boot.run_dir.path().join("run/console.log"))
            .unwrap_or_default();
        if log.contains("ready: gateway-ready") || Instant::now() > deadline {
            break log.contains("ready: gateway-ready");
        }
    };
    std::thread::sleep(Duration::from_secs(2));
    running.signal(libc::SIGTERM);
    let done = running.wait(BOOT_DEADLINE);
    assert!(
        report_ready,
        "no gateway-ready on the console\n{}",
        done.output()
    );
    let stages: Vec<String> = done
        .guest_messages()
        .into_iter()
        .filter_map(|m| match m {
            GuestMessage::Ready { stage } => Some(stage),
            _ => None,
        })
        .collect();
    assert_eq!(
        stages,
        [
            "workload-started",
            "k3s-started",
            "apiserver-ready",
            "node-ready",
            "gateway-ready"
        ],
        "{}",
        done.output()
    );
    let out = &done.stdout;
    let gateway = out
        .find("ready: gateway-ready")
        .expect("gateway-ready shown");
    let ready = out
        .find("\nready (")
        .unwrap_or_else(|| panic!("no host ready\n{}", done.output()));
    assert!(
        ready > gateway,
        "ready before the last stage\n{}",
        done.output()
    );
    let (status, _, synced) = done.exit_message();
    assert_eq!(
        status,
        0,
        "the stand-in exits 0 on SIGTERM\n{}",
        done.output()
    );
    assert!(synced);
    // The cluster's kubeconfig came over the boot channel and points at the forwarded API port.
    let kubeconfig = done.boot.home_dir().join(".kube/openshell-default.yaml");
    let text = std::fs::read_to_string(&kubeconfig)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", kubeconfig.display(), done.output()));
    assert!(
        text.contains(&format!("server: https://127.0.0.1:{api_port}")),
        "{text}"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&kubeconfig).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}
both_arches!(ready_waits_for_the_gateway_and_the_hosts_probe);

/// Boots the stand-in k3s with its gateway port relayed to a tonic server on the host (passt
/// maps the guest's gateway address to the host's loopback) that answers `Health` with `status`,
/// serving with the certificate the guest's `pki` phase made and accepting only clients of the
/// guest's CA; waits for the host to activate the gateway or end, then stops it. Returns the
/// finished boot, the forwarded port and the guest's CA. What the real gateway does
/// differently: it runs in a pod behind kube-proxy's NodePort, has every other method too, and
/// reports its own health.
fn boot_grpc_gateway(
    arch: &str,
    status: health_proto::ServiceStatus,
    extra: &[&str],
) -> Option<(Finished, u16, String)> {
    let boot = Boot::new(arch)?;
    let _slot = vm_slot();
    let host_port = free_port();
    let relay = free_port();
    with_stand_in_k3s(&boot, 30051, false);
    // A gateway root: the `pki` phase makes the PKI and sends the client bundle.
    std::fs::create_dir_all(boot.root_path("opt/openshell")).expect("gateway tree");
    std::fs::write(boot.root_path("fake-k3s/gateway-relay"), relay.to_string()).expect("relay");
    let active = boot.config_dir().join("openshell/active_gateway");
    // The relay reaches this machine's loopback through passt's gateway: allowed for its port
    // only, as a gateway's own needs from the host are.
    let mut boot = boot
        .net("passt")
        .arg("-p")
        .arg(&format!("{host_port}:30051"))
        .arg("--host-port")
        .arg(&relay.to_string());
    for a in extra {
        boot = boot.arg(a);
    }
    let mut running = boot.start();
    // Each file is replaced atomically: once all three are there, all are whole.
    for name in ["ca.crt", "server.key", "server.crt"] {
        running.wait_for_file(&format!("opt/openshell/pki/{name}"), BOOT_DEADLINE);
    }
    let read = |name: &str| {
        std::fs::read_to_string(running.boot.root_path(&format!("opt/openshell/pki/{name}")))
            .expect(name)
    };
    let (ca, server) = (read("ca.crt"), (read("server.crt"), read("server.key")));
    health_server::serve(health_server::Answer::Status(status), &server, &ca, relay);
    let deadline = Instant::now() + BOOT_DEADLINE;
    while !active.exists() && running.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    // A host that found the gateway not healthy has stopped the VM itself.
    if running.is_running() {
        running.signal(libc::SIGTERM);
    }
    Some((running.wait(BOOT_DEADLINE), host_port, ca))
}

/// The hand-off to the OpenShell CLI: after `gateway-ready` the host calls the gateway's gRPC
/// health method over mutual TLS through the forward, with the bundle the guest sent, and is
/// ready only on a HEALTHY answer; then the CLI's `metadata.json` and `active_gateway` name the
/// gateway, beside the guest's bundle.
fn ready_means_the_gateway_says_healthy_over_grpc(arch: &str) {
    let healthy = health_proto::ServiceStatus::Healthy;
    let Some((done, host_port, ca)) = boot_grpc_gateway(arch, healthy, &[]) else {
        return;
    };
    let out = &done.stdout;
    let said = format!(
        "https://127.0.0.1:{host_port} is healthy (version `{}`)",
        health_server::VERSION
    );
    let said_at = out
        .find(&said)
        .unwrap_or_else(|| panic!("no `{said}`\n{}", done.output()));
    let ready = out
        .find("\nready (")
        .unwrap_or_else(|| panic!("no host ready\n{}", done.output()));
    assert!(said_at < ready, "ready before healthy\n{}", done.output());
    let config = done.boot.config_dir().join("openshell");
    assert_eq!(
        std::fs::read_to_string(config.join("active_gateway")).expect("active_gateway"),
        "openshell-vm-default"
    );
    let gateway = config.join("gateways/openshell-vm-default");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(gateway.join("metadata.json")).expect("metadata.json"),
    )
    .expect("json");
    assert_eq!(
        meta,
        serde_json::json!({
            "name": "openshell-vm-default",
            "gateway_endpoint": format!("https://127.0.0.1:{host_port}"),
            "is_remote": false,
            "gateway_port": host_port,
        })
    );
    assert_eq!(
        std::fs::read_to_string(gateway.join("mtls/ca.crt")).expect("ca"),
        ca
    );
}
both_arches!(ready_means_the_gateway_says_healthy_over_grpc);

/// A gateway that answers UNHEALTHY is not ready: at the stage's deadline the host names the
/// endpoint and the answer, asks the guest to shut down and exits 5; the CLI's active gateway is
/// left alone (`metadata.json` is there: the gateway exists, it is just not healthy).
fn an_unhealthy_gateway_is_not_ready(arch: &str) {
    let unhealthy = health_proto::ServiceStatus::Unhealthy;
    let extra = ["--stage-timeout", "15"];
    let Some((done, host_port, _)) = boot_grpc_gateway(arch, unhealthy, &extra) else {
        return;
    };
    assert_eq!(done.status.code(), Some(5), "{}", done.output());
    let said = format!(
        "the guest reported the gateway up, but https://127.0.0.1:{host_port}: not healthy \
         within 15 s; last: the gateway answered SERVICE_STATUS_UNHEALTHY"
    );
    assert!(
        done.stderr.contains(&said),
        "no `{said}`\n{}",
        done.output()
    );
    assert!(!done.stdout.contains("\nready ("), "{}", done.output());
    let config = done.boot.config_dir().join("openshell");
    assert!(!config.join("active_gateway").exists());
    assert!(config
        .join("gateways/openshell-vm-default/metadata.json")
        .exists());
}
both_arches!(an_unhealthy_gateway_is_not_ready);

/// A stage that never comes is named, and the host stops the VM instead of waiting forever: by
/// asking the guest to shut down, so k3s gets SIGTERM and the filesystems are synced, not by
/// killing the VMM under it.
fn a_missing_stage_is_named_and_the_vm_stopped(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    with_stand_in_k3s(&boot, 30051, true);
    let done = boot
        .arg("--stage-timeout")
        .arg("8")
        .start()
        .wait(BOOT_DEADLINE);
    assert_eq!(done.status.code(), Some(5), "{}", done.output());
    assert!(
        done.stderr
            .contains("readiness stage `apiserver-ready` did not arrive within 8 s"),
        "{}",
        done.output()
    );
    assert!(
        done.stdout.contains("asking the guest to shut down"),
        "{}",
        done.output()
    );
    assert!(
        !done.output().contains("killing the VM"),
        "{}",
        done.output()
    );
    // The guest's own shutdown: the stand-in got SIGTERM and exited 0, filesystems synced.
    let (status, _, synced) = done.exit_message();
    assert_eq!(status, 0, "{}", done.output());
    assert!(synced, "{}", done.output());
    let log = std::fs::read_to_string(done.boot.root_path("fake-k3s/log")).unwrap_or_default();
    assert_eq!(
        log,
        "term\n",
        "the stand-in k3s saw SIGTERM\n{}",
        done.output()
    );
}
both_arches!(a_missing_stage_is_named_and_the_vm_stopped);
