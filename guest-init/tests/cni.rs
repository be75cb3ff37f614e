//! `network-cleanup` against real pod-network state: Debian's CNI plugins (bridge + host-local)
//! set up two pods the way k3s's CNI does, in network namespaces made by the test; then the
//! phase runs in the "node" namespace and must remove the bridge, the veths, the IPAM leases,
//! the results cache and the netns bind mount, and nothing else.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_openshell-init");
const PLUGINS: &str = "/usr/lib/cni";

/// Network namespaces that are deleted when the test ends, however it ends.
struct Netns(Vec<String>);

impl Netns {
    fn add(&mut self, name: &str) {
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        self.0.push(name.to_string());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root for network namespaces");
        return false;
    }
    if !Path::new(PLUGINS).join("bridge").exists() {
        eprintln!("skipped: Debian's containernetworking-plugins are not installed");
        return false;
    }
    if Command::new("ip").args(["netns", "list"]).output().is_err() {
        eprintln!("skipped: no `ip` (iproute2)");
        return false;
    }
    true
}

/// `cmd` run inside network namespace `ns` (and only that namespace: `ip netns exec` would also
/// give it a mount namespace of its own, hiding the mounts the phase must undo).
fn in_netns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg(program);
    c
}

fn links(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cni_add(node: &str, pod: &str, id: &str, conf: &str) {
    let mut child = in_netns(node, &format!("{PLUGINS}/bridge"))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", format!("/run/netns/{pod}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", PLUGINS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bridge plugin");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.as_bytes())
        .expect("conf");
    let out = child.wait_with_output().expect("plugin");
    assert!(
        out.status.success(),
        "bridge plugin ADD failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn real_cni_state_is_removed_and_nothing_else() {
    if !can_run() {
        return;
    }
    let tag = std::process::id();
    let (node, pod1, pod2) = (
        format!("oshn{tag}"),
        format!("oshp{tag}a"),
        format!("oshp{tag}b"),
    );
    let mut ns = Netns(Vec::new());
    for n in [&node, &pod1, &pod2] {
        ns.add(n);
    }
    let root = tempfile::tempdir().expect("tmp");
    let r = root.path();
    let ipam: PathBuf = r.join("var/lib/cni/networks");
    let conf = format!(
        r#"{{"cniVersion":"0.4.0","name":"cbr0","type":"bridge","bridge":"cni0","isGateway":true,
            "ipam":{{"type":"host-local","subnet":"10.42.0.0/24","dataDir":"{}"}}}}"#,
        ipam.display()
    );
    cni_add(&node, &pod1, "pod1", &conf);
    cni_add(&node, &pod2, "pod2", &conf);
    // What libcni and containerd add around the plugin: the results cache and the netns file.
    let results = r.join("var/lib/cni/results");
    std::fs::create_dir_all(&results).expect("mkdir");
    std::fs::write(results.join("cbr0-pod1-eth0"), "{}").expect("results");
    let netns_file = r.join("run/netns/cni-pod1");
    std::fs::create_dir_all(netns_file.parent().expect("parent")).expect("mkdir");
    std::fs::write(&netns_file, "").expect("netns file");
    let bound = Command::new("mount")
        .args(["--bind", &format!("/run/netns/{pod1}")])
        .arg(&netns_file)
        .status()
        .expect("mount");
    assert!(bound.success());
    // State that is not the pod network's and must stay.
    let keep = Command::new("ip")
        .args(["-n", &node, "link", "add", "keep0", "type", "bridge"])
        .status()
        .expect("ip");
    assert!(keep.success());
    std::fs::create_dir_all(r.join("var/lib/cni/cache")).expect("mkdir");
    std::fs::write(r.join("var/lib/cni/cache/other"), "keep").expect("write");

    let before = links(&node);
    assert!(
        before.contains("cni0") && before.contains("veth"),
        "{before}"
    );
    let leases = std::fs::read_dir(ipam.join("cbr0"))
        .expect("leases")
        .count();
    assert!(leases >= 2, "host-local wrote {leases} files");

    let run = || {
        let out = in_netns(&node, BIN)
            .args(["phase", "network-cleanup", "--in-place", "--root"])
            .arg(r)
            .output()
            .expect("phase");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = run();
    let after = links(&node);
    assert!(!after.contains("cni0:"), "{after}");
    assert!(!after.contains("veth"), "{after}");
    assert!(after.contains("keep0"), "unrelated link removed: {after}");
    assert!(first.contains("cni0"), "{first}");
    assert_eq!(std::fs::read_dir(&ipam).expect("ipam").count(), 0);
    assert!(!results.join("cbr0-pod1-eth0").exists());
    assert!(!netns_file.exists());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mountinfo.contains(&netns_file.display().to_string()));
    assert_eq!(
        std::fs::read_to_string(r.join("var/lib/cni/cache/other")).expect("kept"),
        "keep"
    );

    let second = run();
    assert!(second.contains("nothing stale to remove"), "{second}");
}
