//! k3s's staged readiness: a thread started once k3s is spawned that reports each stage to the
//! host as `GuestMessage::Ready`, in order, each within its own deadline.
//!
//! The API server is asked through k3s's own kubectl: k3s turns anonymous auth off and init has
//! no TLS client (nor should it carry one for this), while k3s's kubectl reads the admin
//! kubeconfig. The gateway is a TCP connect to its NodePort on the node IP, the way traffic from
//! outside reaches it: kube-proxy in nftables mode serves NodePorts on the node's addresses and
//! never on 127.0.0.1 (it has no `route_localnet` trick), so a loopback probe would never succeed.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openshell_shared::config::K3s;
use openshell_shared::{GuestMessage, Level};

use crate::reporter::Reporter;

pub use openshell_shared::protocol::stage::{
    APISERVER_READY, GATEWAY_READY, K3S_STARTED, NODE_READY,
};

/// Time between two attempts of a probe.
const RETRY: Duration = Duration::from_millis(250);
/// Bounds one kubectl call, so a server that accepts and never answers cannot hold a stage
/// far past its deadline.
const REQUEST_TIMEOUT: &str = "--request-timeout=5s";
/// Probe output past this is not what we wait for anyway.
const MAX_OUTPUT: u64 = 4096;
/// k3s's admin kubeconfig is about 3 KiB; the bound keeps the message well inside a frame.
pub const MAX_KUBECONFIG: u64 = 32 * 1024;

/// What the probes need, resolved against the root before the thread starts.
#[derive(Debug, Clone)]
pub struct Probes {
    /// The k3s binary (its `kubectl` subcommand), as a path init can execute.
    pub k3s: PathBuf,
    /// The whole environment of each kubectl call.
    pub env: BTreeMap<String, String>,
    /// k3s's admin kubeconfig under the root, sent to the host once the API server is ready.
    pub kubeconfig: PathBuf,
    /// The node's name: the hostname, which k3s registers the node under.
    pub node: String,
    /// k3s's `--node-ip`: where the gateway's NodePort answers.
    pub node_ip: Ipv4Addr,
    pub gateway_port: u16,
    pub apiserver_timeout: Duration,
    pub node_timeout: Duration,
    pub gateway_timeout: Duration,
}

impl Probes {
    pub fn new(
        cfg: &K3s,
        k3s: PathBuf,
        kubeconfig: PathBuf,
        path_var: Option<&str>,
        node: &str,
        node_ip: Ipv4Addr,
    ) -> Self {
        let mut env = BTreeMap::new();
        if let Some(p) = path_var {
            env.insert("PATH".to_string(), p.to_string());
        }
        env.insert(
            "KUBECONFIG".to_string(),
            kubeconfig.to_string_lossy().into_owned(),
        );
        let r = &cfg.readiness;
        Self {
            k3s,
            env,
            kubeconfig,
            node: node.to_string(),
            node_ip,
            gateway_port: cfg.gateway_port,
            apiserver_timeout: Duration::from_millis(r.apiserver_ready_ms),
            node_timeout: Duration::from_millis(r.node_ready_ms),
            gateway_timeout: Duration::from_millis(r.gateway_ready_ms),
        }
    }

    fn kubectl(&self, args: &[&str]) -> Option<String> {
        let mut cmd = Command::new(&self.k3s);
        cmd.arg("kubectl")
            .args(args)
            .arg(REQUEST_TIMEOUT)
            .env_clear()
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // PID 1's reaper collects every child: claimed, this one's status comes back to us
        // instead of being waited for (a wait could race the reaper, or a reused pid).
        let (mut child, exited) = crate::supervisor::spawn_claimed(&mut cmd).ok()?;
        let mut out = String::new();
        let read = child
            .stdout
            .take()
            .map(|s| s.take(MAX_OUTPUT).read_to_string(&mut out));
        // The answer is the output; the status only tells the reaper is done with it.
        let _ = exited.recv_timeout(Duration::from_secs(10));
        read?.ok()?;
        Some(out)
    }

    fn apiserver_ready(&self) -> bool {
        self.kubectl(&["get", "--raw", "/readyz"])
            .is_some_and(|o| o.trim() == "ok")
    }

    fn node_ready(&self) -> bool {
        self.kubectl(&[
            "get",
            "node",
            &self.node,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .is_some_and(|o| o.trim() == "True")
    }

    fn gateway_ready(&self) -> bool {
        let addr = SocketAddr::from((self.node_ip, self.gateway_port));
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    }
}

/// Starts the readiness thread. It ends after the last stage, at the first stage that misses
/// its deadline, or soon after `stop` is set (the workload has exited).
pub fn spawn(probes: Probes, reporter: Arc<Reporter>, stop: Arc<AtomicBool>) {
    let started = std::thread::Builder::new()
        .name("k3s-readiness".into())
        .spawn({
            let reporter = Arc::clone(&reporter);
            move || watch(&probes, &reporter, &stop)
        });
    if let Err(e) = started {
        reporter.log(
            Level::Error,
            format!(
                "cannot start the k3s readiness thread: {e}; no readiness stages will be reported"
            ),
        );
    }
}

fn watch(probes: &Probes, reporter: &Reporter, stop: &AtomicBool) {
    reporter.emit(GuestMessage::Ready {
        stage: K3S_STARTED.into(),
    });
    type Probe = fn(&Probes) -> bool;
    let stages: [(&str, Duration, Probe); 3] = [
        (
            APISERVER_READY,
            probes.apiserver_timeout,
            Probes::apiserver_ready,
        ),
        (NODE_READY, probes.node_timeout, Probes::node_ready),
        (GATEWAY_READY, probes.gateway_timeout, Probes::gateway_ready),
    ];
    let k3s_started = Instant::now();
    for (stage, timeout, probe) in stages {
        let since = Instant::now();
        let deadline = since + timeout;
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            if probe(probes) {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                reporter.log(
                    Level::Info,
                    format!(
                        "{stage} after {} ms ({} ms since k3s started)",
                        since.elapsed().as_millis(),
                        k3s_started.elapsed().as_millis()
                    ),
                );
                reporter.emit(GuestMessage::Ready {
                    stage: stage.into(),
                });
                if stage == APISERVER_READY {
                    send_kubeconfig(&probes.kubeconfig, reporter);
                }
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let probed = if stage == GATEWAY_READY {
                    format!(
                        " (nothing accepted on {}:{})",
                        probes.node_ip, probes.gateway_port
                    )
                } else {
                    String::new()
                };
                reporter.log(
                    Level::Error,
                    format!(
                        "readiness stage {stage} did not arrive within {} ms{probed}; later stages are not awaited",
                        timeout.as_millis()
                    ),
                );
                return;
            }
            std::thread::sleep(RETRY.min(deadline - now));
        }
    }
}

/// Reads k3s's admin kubeconfig (k3s writes it before its API server answers) for the host.
/// Missing, unreadable or oversized is a warning: the cluster works, only the host's copy is
/// missing.
pub fn read_kubeconfig(path: &std::path::Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut yaml = String::new();
    file.take(MAX_KUBECONFIG + 1)
        .read_to_string(&mut yaml)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if yaml.len() as u64 > MAX_KUBECONFIG {
        return Err(format!(
            "{}: larger than {MAX_KUBECONFIG} bytes",
            path.display()
        ));
    }
    Ok(yaml)
}

fn send_kubeconfig(path: &std::path::Path, reporter: &Reporter) {
    match read_kubeconfig(path) {
        Ok(yaml) => reporter.emit(GuestMessage::Kubeconfig { yaml }),
        Err(e) => reporter.log(Level::Warn, format!("kubeconfig not sent to the host: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_read_bounded_and_missing_is_an_error_naming_the_path() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join("k3s.yaml");
        let missing = read_kubeconfig(&p).expect_err("missing");
        assert!(missing.contains("k3s.yaml"), "{missing}");
        std::fs::write(&p, "apiVersion: v1\n").expect("write");
        assert_eq!(read_kubeconfig(&p).expect("read"), "apiVersion: v1\n");
        std::fs::write(&p, "a".repeat(MAX_KUBECONFIG as usize + 1)).expect("write");
        let big = read_kubeconfig(&p).expect_err("oversized");
        assert!(big.contains("larger than"), "{big}");
    }
}
