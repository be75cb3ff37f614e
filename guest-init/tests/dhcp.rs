//! The `network` phase against real DHCP servers from Debian (dnsmasq, busybox udhcpd), each in
//! a pair of network namespaces made by the test: the server on one end of a veth pair, our
//! client on the other end, named eth0 as in the VM.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_openshell-init");

/// Two namespaces joined by a veth pair, removed on drop (with the server process).
struct Net {
    srv: String,
    cli: String,
    server: Option<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        for n in [&self.srv, &self.cli] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let ok = Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip {}", args.join(" "));
}

fn can_run(server: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root for network namespaces");
        return false;
    }
    if Command::new(server)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("skipped: {server} is not installed");
        return false;
    }
    true
}

fn net(tag: &str) -> Net {
    let id = format!("{}{tag}", std::process::id());
    let (srv, cli) = (format!("ds{id}"), format!("dc{id}"));
    ip(&["netns", "add", &srv]);
    let n = Net {
        srv: srv.clone(),
        cli: cli.clone(),
        server: None,
        dir: tempfile::tempdir().expect("tmp"),
    };
    ip(&["netns", "add", &cli]);
    ip(&[
        "-n", &srv, "link", "add", "srv0", "type", "veth", "peer", "name", "eth0", "netns", &cli,
    ]);
    ip(&["-n", &srv, "addr", "add", "10.77.0.1/24", "dev", "srv0"]);
    ip(&["-n", &srv, "link", "set", "srv0", "up"]);
    ip(&["-n", &cli, "link", "set", "lo", "up"]);
    n
}

fn in_netns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg(program);
    c
}

fn dnsmasq(n: &mut Net, rapid: bool) {
    let mut cmd = in_netns(&n.srv, "dnsmasq");
    cmd.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=0",
        "--user=root",
        "--interface=srv0",
        "--bind-interfaces",
        // dnsmasq pings an address before offering it; nobody else is on this link.
        "--no-ping",
        "--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,2m",
        "--dhcp-option=option:router,10.77.0.1",
        "--dhcp-option=option:dns-server,10.77.0.1",
    ])
    .arg(format!(
        "--dhcp-leasefile={}",
        n.dir.path().join("leases").display()
    ))
    .arg(format!("--pid-file={}", n.dir.path().join("pid").display()))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if rapid {
        cmd.arg("--dhcp-rapid-commit");
    }
    n.server = Some(cmd.spawn().expect("dnsmasq"));
    wait_listening(n);
}

fn udhcpd(n: &mut Net) {
    let conf = n.dir.path().join("udhcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "start 10.77.0.70\nend 10.77.0.80\ninterface srv0\noption subnet 255.255.255.0\noption router 10.77.0.1\noption dns 10.77.0.1\noption lease 120\nlease_file {}\npidfile {}\n",
            n.dir.path().join("udhcpd.leases").display(),
            n.dir.path().join("udhcpd.pid").display()
        ),
    )
    .expect("conf");
    let child = in_netns(&n.srv, "udhcpd")
        .arg("-f")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("udhcpd");
    n.server = Some(child);
    wait_listening(n);
}

/// Until the server's UDP port 67 is bound in its namespace.
fn wait_listening(n: &Net) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = in_netns(&n.srv, "cat")
            .arg("/proc/net/udp")
            .output()
            .expect("cat");
        // Port 67 is 0043 in /proc/net/udp.
        if String::from_utf8_lossy(&out.stdout).contains(":0043 ") {
            return;
        }
        assert!(Instant::now() < deadline, "DHCP server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the phase in the client namespace; returns the phase's detail line.
fn run_phase(n: &Net, root: &Path, extra: &str) -> String {
    let out = in_netns(&n.cli, BIN)
        .args([
            "phase",
            "network",
            "--in-place",
            "--cmdline",
            extra,
            "--root",
        ])
        .arg(root)
        .output()
        .expect("phase");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn client(n: &Net, what: &[&str]) -> String {
    let mut args = vec!["-n", n.cli.as_str()];
    args.extend_from_slice(what);
    let out = Command::new("ip").args(&args).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn full_exchange(rapid: bool, tag: &str) {
    if !can_run("dnsmasq") {
        return;
    }
    let mut n = net(tag);
    dnsmasq(&mut n, rapid);
    let root = tempfile::tempdir().expect("root");
    let events = run_phase(&n, root.path(), "openshell.dhcp_timeout_ms=5000");
    assert!(events.contains("DHCP from 10.77.0.1"), "{events}");
    assert_eq!(events.contains("(rapid commit)"), rapid, "{events}");
    let addr = client(&n, &["-4", "addr", "show", "eth0"]);
    assert!(
        addr.contains("inet 10.77.0.5") || addr.contains("inet 10.77.0.60/24"),
        "{addr}"
    );
    let route = client(&n, &["route"]);
    assert!(route.contains("default via 10.77.0.1 dev eth0"), "{route}");
    let resolv = std::fs::read_to_string(root.path().join("etc/resolv.conf")).expect("resolv.conf");
    assert_eq!(
        resolv,
        "# written by openshell-init\nnameserver 10.77.0.1\n"
    );
}

#[test]
fn dnsmasq_full_exchange() {
    full_exchange(false, "f");
}

#[test]
fn dnsmasq_rapid_commit() {
    full_exchange(true, "r");
}

#[test]
fn udhcpd_lease() {
    if !can_run("udhcpd") {
        return;
    }
    let mut n = net("u");
    udhcpd(&mut n);
    let root = tempfile::tempdir().expect("root");
    let events = run_phase(&n, root.path(), "openshell.dhcp_timeout_ms=5000");
    assert!(events.contains("DHCP from 10.77.0.1"), "{events}");
    assert!(events.contains("lease 120 s"), "{events}");
    let addr = client(&n, &["-4", "addr", "show", "eth0"]);
    assert!(
        addr.contains("inet 10.77.0.7") || addr.contains("inet 10.77.0.80/24"),
        "{addr}\n{events}"
    );
}

#[test]
fn no_server_means_the_static_plan_said_out_loud() {
    if !can_run("ip") {
        return;
    }
    let n = net("n");
    let root = tempfile::tempdir().expect("root");
    let started = Instant::now();
    let events = run_phase(&n, root.path(), "openshell.dhcp_timeout_ms=400");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "deadline not kept"
    );
    assert!(
        events.contains("falling back to the static plan 192.168.127.2/24"),
        "{events}"
    );
    assert!(events.contains("no lease within"), "{events}");
    assert!(client(&n, &["-4", "addr", "show", "eth0"]).contains("inet 192.168.127.2/24"));
    assert!(client(&n, &["route"]).contains("default via 192.168.127.1 dev eth0"));
    let resolv = std::fs::read_to_string(root.path().join("etc/resolv.conf")).expect("resolv.conf");
    assert!(resolv.contains("nameserver 192.168.127.1"), "{resolv}");
}
