//! `openshell-init k3s --root DIR` against a stand-in k3s (`fixtures/fake-k3s.sh`; real k3s
//! cannot be downloaded here): the command line and environment it was started with, the
//! readiness stages in order, k3s's admin kubeconfig sent after `apiserver-ready`, the CNI
//! configuration and plugin links (made by the inotify watcher, since the stand-in extracts its
//! data directory only once started), a second `k3s-prep` that changes nothing, a stage that
//! times out, and SIGTERM within the grace period.
//!
//! Each run has a network namespace of its own whose `eth0` holds the node IP: the stand-in serves
//! the gateway's NodePort there and not on 127.0.0.1, as kube-proxy's nftables mode does, so
//! `gateway-ready` is only reached by a probe of the node IP.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use openshell_init::guest_path::under;
use openshell_shared::BootConfig;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_openshell-init");
const FAKE_K3S: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fake-k3s.sh");
const HASH: &str = "0123456789abcdef";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const GRACE_MS: u64 = 3000;
/// The node IP the runs get, on their namespace's `eth0`.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 9);
/// The gateway's NodePort; each run's namespace is its own, so no VM on this host is in the way.
const GATEWAY_PORT: u16 = 30051;

/// The stand-in needs busybox (for nc); the namespace needs root, util-linux's `unshare` and
/// iproute2's `ip` (busybox's cannot make veth links).
fn can_run() -> bool {
    let works = |prog: &str, arg: &str| {
        Command::new(prog)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing = if !nix::unistd::geteuid().is_root() {
        "root, for a network namespace"
    } else if !works("busybox", "true") {
        "busybox, for the stand-in's nc"
    } else if !works("unshare", "--version") {
        "util-linux's unshare"
    } else if !works("ip", "-V") {
        "iproute2's ip"
    } else {
        return true;
    };
    eprintln!("skipped: needs {missing}");
    false
}

/// A root with the stand-in as its k3s and a configuration with a k3s section.
struct Root {
    dir: tempfile::TempDir,
    config: BootConfig,
}

impl Root {
    fn new(apiserver_ready_ms: u64) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let bin = dir.path().join("usr/local/bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        std::fs::copy(FAKE_K3S, bin.join("k3s")).expect("install stand-in");
        let state = dir.path().join("fake-k3s");
        std::fs::create_dir_all(&state).expect("mkdir");
        let port = GATEWAY_PORT;
        std::fs::write(state.join("gateway-port"), port.to_string()).expect("port");
        // Stale configurations k3s-prep must remove.
        for stale in [
            "etc/cni/net.d/10-ptp.conflist",
            "var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist",
        ] {
            let p = dir.path().join(stale);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, "{}").expect("stale");
        }
        let yaml = format!(
            "hostname: k3s-test\nworkload:\n  argv: [/bin/sh]\n  env:\n    PATH: {PATH}\n    HOME: /root\n  cwd: /\nshutdown:\n  grace_ms: {GRACE_MS}\nk3s:\n  gateway_port: {port}\n  readiness:\n    apiserver_ready_ms: {apiserver_ready_ms}\n    node_ready_ms: 10000\n    gateway_ready_ms: 10000\n"
        );
        let cfg_path = dir.path().join("etc/openshell/init.yaml");
        std::fs::create_dir_all(cfg_path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&cfg_path, &yaml).expect("config");
        let config = BootConfig::from_yaml(&yaml, &cfg_path).expect("valid config");
        Self { dir, config }
    }

    fn path(&self, p: &str) -> PathBuf {
        under(self.dir.path(), p)
    }

    fn state(&self, name: &str) -> PathBuf {
        self.path("fake-k3s").join(name)
    }
}

/// The CLI running k3s, with its JSON events arriving on a channel.
struct Running {
    child: Child,
    events: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

/// Brings up loopback and an `eth0` (one end of a veth pair) with the node IP in the fresh
/// namespace, then becomes the command given after it. The namespace ends with its processes.
const NODE_NETWORK: &str = r#"set -e
ip link set lo up
ip link add eth0 type veth peer name peer0
ip addr add "$NODE_IP/24" dev eth0
ip link set peer0 up
ip link set eth0 up
exec "$@""#;

impl Running {
    fn start(root: &Root) -> Self {
        let node_ip = NODE_IP.to_string();
        // unshare and sh exec in turn: the child's pid is the CLI's, for SIGTERM.
        let mut child = Command::new("unshare")
            .args(["--net", "--", "sh", "-c", NODE_NETWORK, "sh", BIN])
            .args(["k3s", "--node-ip", &node_ip, "--root"])
            .arg(root.dir.path())
            .env("NODE_IP", &node_ip)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start openshell-init k3s");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            events,
            seen: Vec::new(),
        }
    }

    /// Collects events until one matches or `timeout` passes; returns whether one matched.
    fn until(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        if self.seen.iter().any(&pred) {
            return true;
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    let hit = pred(&v);
                    self.seen.push(v);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    fn ready_stages(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter(|e| e["msg"]["type"] == "ready")
            .filter_map(|e| e["msg"]["stage"].as_str().map(String::from))
            .collect()
    }

    fn logs(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter(|e| e["msg"]["type"] == "log")
            .map(|e| format!("{} {}", e["msg"]["level"], e["msg"]["text"]))
            .collect()
    }

    /// SIGTERM to the CLI; returns its exit status and how long it took to exit.
    fn terminate(mut self) -> (Option<i32>, Duration, Vec<Value>) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let sent = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
        let status = self.child.wait().expect("wait");
        let took = sent.elapsed();
        self.seen.extend(self.events.try_iter());
        // The reader thread ends at EOF; what it still had is collected here.
        std::thread::sleep(Duration::from_millis(100));
        self.seen.extend(self.events.try_iter());
        (status.code(), took, std::mem::take(&mut self.seen))
    }
}

/// A failed assertion must not leave the CLI and the stand-in running (and holding the test
/// harness's output pipe): SIGTERM, as on a clean stop, then SIGKILL.
impl Drop for Running {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_millis(GRACE_MS + 2000);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a TCP connect to `ip`:`port` succeeds inside the network namespace of process `pid`
/// (from a thread of its own: `setns` moves only the calling thread).
fn connects_in(pid: u32, ip: Ipv4Addr, port: u16) -> bool {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("netns of the run");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let addr = std::net::SocketAddr::from((ip, port));
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    })
    .join()
    .expect("probe thread")
}

fn is_stage(stage: &'static str) -> impl Fn(&Value) -> bool {
    move |e| e["msg"]["type"] == "ready" && e["msg"]["stage"] == stage
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(String::from)
        .collect()
}

/// The admin kubeconfig the stand-in wrote reaches the host once, after apiserver-ready.
fn assert_kubeconfig_sent_once(root: &Root, run: &Running) {
    let kubeconfig = std::fs::read_to_string(root.path("/etc/rancher/k3s/k3s.yaml"))
        .expect("the stand-in writes k3s.yaml");
    assert!(kubeconfig.contains("client-key-data: "), "{kubeconfig}");
    let pos = |pred: &dyn Fn(&Value) -> bool| run.seen.iter().position(pred);
    let sent = pos(&|e| e["msg"]["type"] == "kubeconfig").expect("kubeconfig event");
    let api = pos(&is_stage("apiserver-ready")).expect("apiserver-ready");
    assert!(
        api < sent,
        "kubeconfig before apiserver-ready: {:#?}",
        run.seen
    );
    // Sent whole over the boot channel; on stdout, like every private key, redacted.
    assert_eq!(run.seen[sent]["msg"]["yaml"], "<redacted>");
    let printed = serde_json::to_string(&run.seen).expect("json");
    assert!(!printed.contains("client-key-data"), "{printed}");
    assert_eq!(
        run.seen
            .iter()
            .filter(|e| e["msg"]["type"] == "kubeconfig")
            .count(),
        1
    );
}

/// The bridge CNI configuration k3s-prep wrote, and the plugins linked into k3s's data directory.
fn assert_cni_config(root: &Root) {
    let conflist: Value = serde_json::from_slice(
        &std::fs::read(root.path("/etc/cni/net.d/10-bridge.conflist")).expect("conflist"),
    )
    .expect("conflist is JSON");
    assert_eq!(conflist["cniVersion"], "1.0.0");
    assert_eq!(conflist["plugins"][0]["bridge"], "cni0");
    assert_eq!(
        conflist["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
        "10.42.0.0/24"
    );
    assert_eq!(conflist["plugins"][1]["type"], "portmap");
    assert_eq!(conflist["plugins"][2]["type"], "loopback");
    assert!(!root.path("/etc/cni/net.d/10-ptp.conflist").exists());
    assert!(!root
        .path("/var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist")
        .exists());
    for plugin in ["bridge", "host-local", "loopback", "bandwidth", "portmap"] {
        let target = std::fs::read_link(root.path("/opt/cni/bin").join(plugin))
            .unwrap_or_else(|e| panic!("{plugin}: {e}"));
        assert_eq!(
            target,
            PathBuf::from(format!("/var/lib/rancher/k3s/data/{HASH}/bin/{plugin}"))
        );
    }
    assert!(!root.path("/opt/cni/bin/flannel").exists());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(root.path(&format!("/var/lib/rancher/k3s/data/{HASH}/bin/cni")))
            .expect("cni")
            .permissions(),
    );
    assert_eq!(mode & 0o111, 0o111, "made executable");
}

#[test]
fn stand_in_k3s_runs_as_built_reports_stages_in_order_and_stops_on_sigterm() {
    if !can_run() {
        return;
    }
    let root = Root::new(10_000);
    let mut run = Running::start(&root);
    let all_ready = run.until(Duration::from_secs(20), is_stage("gateway-ready"));
    assert!(all_ready, "no gateway-ready: {:#?}", run.seen);
    // The stand-in serves the NodePort as nftables-mode kube-proxy does: on the node IP only.
    let pid = run.child.id();
    assert!(connects_in(pid, NODE_IP, GATEWAY_PORT));
    assert!(!connects_in(pid, Ipv4Addr::LOCALHOST, GATEWAY_PORT));
    assert_eq!(
        run.ready_stages(),
        [
            "workload-started",
            "k3s-started",
            "apiserver-ready",
            "node-ready",
            "gateway-ready"
        ]
    );
    assert_kubeconfig_sent_once(&root, &run);

    // The watcher links the plugins once the stand-in has renamed its data directory.
    let linked = run.until(Duration::from_secs(5), |e| {
        e["msg"]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("cni-links: "))
    });
    assert!(linked, "no cni-links report: {:#?}", run.logs());

    // Command line and environment: what the builder makes of this configuration.
    let k3s_cfg = root.config.k3s.clone().expect("k3s section");
    let expected = openshell_init::k3s_args::argv(&k3s_cfg, NODE_IP);
    assert_eq!(lines_of(&root.state("argv")), expected[1..]);
    assert!(expected.contains(&format!("--node-ip={NODE_IP}")));
    let env: BTreeMap<String, String> = lines_of(&root.state("env"))
        .iter()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.into(), v.into())))
        .collect();
    assert_eq!(env, root.config.workload.env);

    assert_cni_config(&root);

    // SIGTERM: the stand-in gets it and exits 0, well within the grace period.
    let (code, took, events) = run.terminate();
    assert_eq!(code, Some(0), "{events:#?}");
    assert!(
        took < Duration::from_millis(GRACE_MS),
        "took {took:?} to stop"
    );
    assert_eq!(lines_of(&root.state("log")), ["term"]);
    assert!(
        !events.iter().any(|e| e["msg"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("killing"))),
        "{events:#?}"
    );

    // A second k3s-prep changes nothing and says so (the `phase` command needs root for its
    // private namespaces).
    if !nix::unistd::geteuid().is_root() {
        eprintln!("second k3s-prep run skipped: `phase` needs root");
        return;
    }
    let out = Command::new(BIN)
        .args(["phase", "k3s-prep", "--root"])
        .arg(root.dir.path())
        .output()
        .expect("run phase");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("k3s-prep: nothing changed"), "{text}");
}

#[test]
fn a_stage_that_never_arrives_is_reported_by_name_and_later_ones_not_awaited() {
    if !can_run() {
        return;
    }
    let root = Root::new(1500);
    std::fs::write(root.state("never-ready"), "").expect("knob");
    let mut run = Running::start(&root);
    let timed_out = run.until(Duration::from_secs(10), |e| {
        e["msg"]["type"] == "log"
            && e["msg"]["level"] == "error"
            && e["msg"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("apiserver-ready"))
    });
    assert!(timed_out, "no timeout error: {:#?}", run.logs());
    // Long enough for the stand-in's node and gateway to be up: still no later stage.
    run.until(Duration::from_secs(2), is_stage("node-ready"));
    assert_eq!(run.ready_stages(), ["workload-started", "k3s-started"]);
    let (code, _, _) = run.terminate();
    assert_eq!(code, Some(0));
}
