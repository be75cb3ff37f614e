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
    let extra: &[&str] = if rapid { &["--dhcp-rapid-commit"] } else { &[] };
    dnsmasq_with(n, "10.77.0.50,10.77.0.60", extra);
}

/// dnsmasq handing out `range` with a two-minute lease (its minimum), plus `extra` options.
fn dnsmasq_with(n: &mut Net, range: &str, extra: &[&str]) {
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
        "--dhcp-option=option:router,10.77.0.1",
        "--dhcp-option=option:dns-server,10.77.0.1",
    ])
    .arg(format!("--dhcp-range={range},255.255.255.0,2m"))
    .args(extra)
    .arg(format!(
        "--dhcp-leasefile={}",
        n.dir.path().join("leases").display()
    ))
    .arg(format!("--pid-file={}", n.dir.path().join("pid").display()))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    n.server = Some(cmd.spawn().expect("dnsmasq"));
    wait_listening(n);
}

fn udhcpd(n: &mut Net) {
    udhcpd_leasing(n, 120, 2000);
}

/// busybox udhcpd handing out `lease_secs` leases (it allows shorter ones than dnsmasq), probing
/// each address by ARP for `arp_ms` before offering it (2000 by default).
fn udhcpd_leasing(n: &mut Net, lease_secs: u32, arp_ms: u32) {
    let conf = n.dir.path().join("udhcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "start 10.77.0.70\nend 10.77.0.80\ninterface srv0\noption subnet 255.255.255.0\noption router 10.77.0.1\noption dns 10.77.0.1\nmin_lease {lease_secs}\noption lease {lease_secs}\nlease_file {}\npidfile {}\n",
            n.dir.path().join("udhcpd.leases").display(),
            n.dir.path().join("udhcpd.pid").display()
        ),
    )
    .expect("conf");
    let child = in_netns(&n.srv, "udhcpd")
        .arg("-f")
        .arg(format!("-a{arp_ms}"))
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

/// Runs the phase in the client namespace; returns the phase's events (JSON lines).
fn run_phase(n: &Net, root: &Path, extra: &str) -> String {
    run_phase_lingering(n, root, extra, 0)
}

/// Runs the phase and stays `linger_ms` longer, so the lease keeper's events are in the output.
fn run_phase_lingering(n: &Net, root: &Path, extra: &str, linger_ms: u64) -> String {
    let out = in_netns(&n.cli, BIN)
        .args([
            "phase",
            "network",
            "--in-place",
            "--cmdline",
            extra,
            "--linger-ms",
            &linger_ms.to_string(),
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

/// Starts the phase in the background, staying `linger_ms` after it, events piped.
fn spawn_phase(n: &Net, root: &Path, cmdline: &str, linger_ms: u64) -> Child {
    in_netns(&n.cli, BIN)
        .args(["phase", "network", "--in-place", "--linger-ms"])
        .arg(linger_ms.to_string())
        .args(["--cmdline", cmdline, "--root"])
        .arg(root)
        .stdout(Stdio::piped())
        .spawn()
        .expect("phase")
}

/// The address dnsmasq's lease file records for our client, with its expiry time.
fn leased(n: &Net) -> Vec<(u64, String)> {
    std::fs::read_to_string(n.dir.path().join("leases"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some((cols.first()?.parse().ok()?, cols.get(2)?.to_string()))
        })
        .collect()
}

/// A short T1 and T2 (dnsmasq sends 3 s and 4 s for these settings): the keeper renews with the server, unicast, again and again,
/// and the server extends the same lease each time.
#[test]
fn lease_is_renewed_at_t1() {
    if !can_run("dnsmasq") {
        return;
    }
    let mut n = net("k");
    dnsmasq_with(
        &mut n,
        "10.77.0.50,10.77.0.60",
        &["--dhcp-option=option:T1,2", "--dhcp-option=option:T2,4"],
    );
    let root = tempfile::tempdir().expect("root");
    // Long enough for two renewals at 3 s intervals.
    let events = run_phase_lingering(&n, root.path(), "openshell.dhcp_timeout_ms=5000", 8000);
    let renewals: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("dhcp: renewed 10.77.0."))
        .collect();
    assert!(renewals.len() >= 2, "{events}");
    assert!(
        renewals[0].contains("from 10.77.0.1: lease 120 s, next renewal in 3.0 s"),
        "{events}"
    );
    assert!(
        !events.contains("rebinding"),
        "the server answered every renewal\n{events}"
    );
    let lease = leased(&n);
    assert_eq!(lease.len(), 1, "one lease, extended in place: {lease:?}");
    let addr = client(&n, &["-4", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("inet {}/24", lease[0].1)), "{addr}");
}

/// The server forgets the client (restarted with another range, authoritative): the renewal
/// gets a NAK, the keeper gives the address up and leases a new one from the new range.
#[test]
fn nak_on_renewal_means_a_new_lease() {
    if !can_run("dnsmasq") {
        return;
    }
    let mut n = net("x");
    let t = ["--dhcp-option=option:T1,2", "--dhcp-option=option:T2,4"];
    dnsmasq_with(&mut n, "10.77.0.50,10.77.0.60", &t);
    let root = tempfile::tempdir().expect("root");
    let cli = spawn_phase(&n, root.path(), "openshell.dhcp_timeout_ms=5000", 11000);
    // Wait for the first lease, then replace the server, before T1 unless the machine is slow:
    // then the next renewal meets the new server. The linger leaves room for that.
    let deadline = Instant::now() + Duration::from_secs(15);
    while leased(&n).is_empty() {
        assert!(Instant::now() < deadline, "no first lease");
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = leased(&n)[0].1.clone();
    if let Some(mut s) = n.server.take() {
        let _ = s.kill();
        let _ = s.wait();
    }
    let _ = std::fs::remove_file(n.dir.path().join("leases"));
    let mut t2 = t.to_vec();
    t2.push("--dhcp-authoritative");
    dnsmasq_with(&mut n, "10.77.0.100,10.77.0.110", &t2);
    let out = cli.wait_with_output().expect("phase output");
    let events = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        events.contains(&format!("server refused (NAK) to extend {first}")),
        "{events}"
    );
    assert!(events.contains("new lease 10.77.0.1"), "{events}");
    let addr = client(&n, &["-4", "addr", "show", "eth0"]);
    assert!(
        addr.contains("inet 10.77.0.1") && !addr.contains(&first),
        "{addr}\n{events}"
    );
    assert!(client(&n, &["route"]).contains("default via 10.77.0.1 dev eth0"));
}

/// The server goes away: the renewal and the rebinding get no answer, the lease expires, the
/// address is given up and the static plan holds the link (k3s keeps a default route).
#[test]
fn expired_lease_with_no_server_falls_back_to_the_static_plan() {
    if !can_run("udhcpd") {
        return;
    }
    let mut n = net("e");
    udhcpd_leasing(&mut n, 6, 100);
    let root = tempfile::tempdir().expect("root");
    let cli = spawn_phase(&n, root.path(), "openshell.dhcp_timeout_ms=2000", 14000);
    // The first lease, then the server is gone (before T1 at 3 s, or one renewal later on a
    // loaded machine: the linger leaves room for that).
    let deadline = Instant::now() + Duration::from_secs(15);
    // udhcpd picks the address from a hash of the MAC: anything in 10.77.0.70-80.
    let leased = loop {
        let addr = client(&n, &["-4", "addr", "show", "eth0"]);
        if let Some(at) = addr.find("inet 10.77.0.") {
            let ip = addr[at + 5..].split('/').next().unwrap_or_default();
            break ip.to_string();
        }
        assert!(Instant::now() < deadline, "no first lease: {addr}");
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(mut s) = n.server.take() {
        let _ = s.kill();
        let _ = s.wait();
    }
    let out = cli.wait_with_output().expect("phase output");
    let events = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(events.contains("lease 6 s"), "{events}");
    assert!(
        events.contains(&format!("did not answer the renewal of {leased}")),
        "{events}"
    );
    assert!(
        events.contains("expired with no server answering"),
        "{events}"
    );
    assert!(
        events.contains("static plan 192.168.127.2/24 until a server answers"),
        "{events}"
    );
    let addr = client(&n, &["-4", "addr", "show", "eth0"]);
    assert!(
        addr.contains("inet 192.168.127.2/24") && !addr.contains(&format!("inet {leased}/")),
        "{addr}"
    );
    assert!(client(&n, &["route"]).contains("default via 192.168.127.1 dev eth0"));
    let resolv = std::fs::read_to_string(root.path().join("etc/resolv.conf")).expect("resolv");
    assert!(resolv.contains("nameserver 192.168.127.1"), "{resolv}");
}

/// The network phase in the client namespace with the configuration file `config`, on `root`.
fn phase_with_config(n: &Net, config: &Path, root: &Path) -> std::process::Output {
    in_netns(&n.cli, BIN)
        .args(["phase", "network", "--in-place", "--config"])
        .arg(config)
        .arg("--root")
        .arg(root)
        .output()
        .expect("phase")
}

/// Connects to `addr` from inside network namespace `ns` (a thread that joins it).
fn connect_from(ns: &str, addr: &str) -> std::io::Result<()> {
    let (ns, addr) = (format!("/run/netns/{ns}"), addr.to_string());
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns)?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let sa: std::net::SocketAddr = addr.parse().map_err(std::io::Error::other)?;
        std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(3)).map(drop)
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("connect thread panicked")))
}

/// A pod's network namespace, deleted when dropped.
struct Pod(String);

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Web servers, killed when dropped.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for s in &mut self.0 {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// A pod's namespace behind the client's: 10.42.0.5 on a veth whose other end (10.42.0.1) is in
/// the client, routed both ways; deleted when the returned guard drops.
fn pod_behind(n: &Net) -> Pod {
    let pod = format!("dp{}b", std::process::id());
    ip(&["netns", "add", &pod]);
    let guard = Pod(pod.clone());
    ip(&[
        "-n", &n.cli, "link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns", &pod,
    ]);
    ip(&["-n", &n.cli, "addr", "add", "10.42.0.1/24", "dev", "vpod"]);
    ip(&["-n", &n.cli, "link", "set", "vpod", "up"]);
    ip(&["-n", &pod, "addr", "add", "10.42.0.5/24", "dev", "eth0"]);
    ip(&["-n", &pod, "link", "set", "eth0", "up"]);
    ip(&["-n", &pod, "route", "add", "default", "via", "10.42.0.1"]);
    ip(&[
        "-n",
        &n.srv,
        "route",
        "add",
        "10.42.0.0/24",
        "via",
        "10.77.0.2",
    ]);
    guard
}

/// busybox httpd on the server's 10.77.0.1 at each of `ports`.
fn web_servers(n: &Net, ports: &[u16]) -> Servers {
    let www = n.dir.path().join("www");
    std::fs::create_dir_all(&www).expect("www");
    Servers(
        ports
            .iter()
            .map(|port| {
                in_netns(&n.srv, "busybox")
                    .args(["httpd", "-f", "-p", &format!("10.77.0.1:{port}"), "-h"])
                    .arg(&www)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("httpd")
            })
            .collect(),
    )
}

/// `network.blocked_tcp` and the host-loopback refusal at the router (passt's gateway, when it
/// maps to the host): the guest and a pod routed through it get a reset from 10.77.0.1:80 (the
/// blocked one) and :82 (not a listed host port) while :81 (listed) answers; a second run
/// leaves one copy of the rules, which `nft` reads back.
#[test]
fn blocked_destination_is_refused_to_the_guest_and_its_pods() {
    if !can_run("busybox") || !can_run("nft") {
        return;
    }
    let n = net("b");
    let pod_ns = pod_behind(&n);
    let pod = pod_ns.0.clone();
    let fwd = in_netns(&n.cli, "sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"])
        .status()
        .expect("sysctl");
    assert!(fwd.success());
    // Web servers on the "gateway": port 80 is blocked, 81 a listed host port, 82 not listed.
    let _servers = web_servers(&n, &[80, 81, 82]);
    // The server's own check below connects over its loopback.
    ip(&["-n", &n.srv, "link", "set", "lo", "up"]);
    let config = n.dir.path().join("init.yaml");
    std::fs::write(
        &config,
        "network:\n  dhcp_timeout_ms: 100\n  fallback: {address: 10.77.0.2, prefix: 24, gateway: 10.77.0.1}\n  blocked_tcp: [\"10.77.0.1:80\"]\n  host_ports: [81]\n",
    )
    .expect("config");
    let root = tempfile::tempdir().expect("root");
    let run = || {
        let out = phase_with_config(&n, &config, root.path());
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        text
    };
    let note = "TCP to 10.77.0.1:80 refused; host loopback at 192.168.127.254, 10.77.0.1 (router): ports 81";
    let first = run();
    assert!(first.contains(note), "{first}");
    assert!(first.contains(r#""type":"network_guarded""#), "{first}");
    let second = run();
    assert!(second.contains(note), "{second}");
    // Both servers really listen (seen from their own namespace, which has no rules): a refusal
    // below comes from the rule, not from an empty port.
    let deadline = Instant::now() + Duration::from_secs(5);
    while ["10.77.0.1:80", "10.77.0.1:81", "10.77.0.1:82"]
        .iter()
        .any(|to| connect_from(&n.srv, to).is_err())
    {
        assert!(Instant::now() < deadline, "httpd never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    for ns in [n.cli.as_str(), pod.as_str()] {
        let open = connect_from(ns, "10.77.0.1:81");
        assert!(open.is_ok(), "{ns} -> :81: {open:?}");
        for to in ["10.77.0.1:80", "10.77.0.1:82"] {
            let refused = connect_from(ns, to).expect_err("must be refused");
            assert_eq!(
                refused.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "{ns} -> {to}: {refused}"
            );
        }
    }
    let listing = in_netns(&n.cli, "nft")
        .args(["list", "table", "ip", "openshell"])
        .output()
        .expect("nft");
    let rules = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert_eq!(rules.matches("reject with tcp reset").count(), 6, "{rules}");
    for rule in [
        "ct state ! established,related ip daddr 10.77.0.1 tcp dport 80 reject with tcp reset",
        "ip daddr 192.168.127.254 udp dport != 81 reject",
        "ip daddr 10.77.0.1 tcp dport != 81 tcp dport != 53 reject with tcp reset",
        "ip daddr 10.77.0.1 udp dport != 81 udp dport != 53 udp dport != 67 reject",
    ] {
        assert_eq!(rules.matches(rule).count(), 2, "{rule} in\n{rules}");
    }
}

/// Fails closed: when nf_tables refuses the refusal (another process owns a table of that name:
/// the kernel answers EPERM to anyone else's change), the phase fails naming the destination
/// and the kernel's answer, and eth0 is never brought up, although a DHCP server is there.
#[test]
fn the_network_stays_down_when_the_refusal_cannot_be_installed() {
    if !can_run("dnsmasq") || !can_run("nft") {
        return;
    }
    let mut n = net("f");
    dnsmasq(&mut n, false);
    // `nft -i` holds its netlink socket, and with it the owned table, while its input is open.
    let mut owner = in_netns(&n.cli, "nft")
        .arg("-i")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nft -i");
    {
        use std::io::Write;
        let stdin = owner.stdin.as_mut().expect("stdin");
        stdin
            .write_all(b"add table ip openshell { flags owner; }\n")
            .expect("write");
        stdin.flush().expect("flush");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(
        &in_netns(&n.cli, "nft")
            .args(["list", "tables"])
            .output()
            .expect("nft")
            .stdout,
    )
    .contains("table ip openshell")
    {
        assert!(Instant::now() < deadline, "nft -i never made the table");
        std::thread::sleep(Duration::from_millis(20));
    }
    let root = tempfile::tempdir().expect("root");
    let config = n.dir.path().join("init.yaml");
    std::fs::write(&config, "network:\n  blocked_tcp: [\"10.77.0.1:80\"]\n").expect("config");
    let out = phase_with_config(&n, &config, root.path());
    let _ = owner.kill();
    let _ = owner.wait();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("cannot install the refusals (tcp 10.77.0.1:80; tcp 192.168.127.254:*; udp 192.168.127.254:*): nf_tables refused table openshell: EPERM"),
        "{text}"
    );
    let link = client(&n, &["-4", "addr", "show", "eth0"]);
    assert!(!link.contains("inet "), "eth0 got an address: {link}");
    assert!(!link.contains(",UP"), "eth0 was brought up: {link}");
    assert!(!root.path().join("etc/resolv.conf").exists());
}
