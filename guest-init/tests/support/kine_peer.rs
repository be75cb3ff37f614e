//! Real kine, the datastore k3s embeds, as a child process, driven through its etcd v3 API with
//! etcdctl (Debian's `etcd-client`, API 3). Started as k3s starts it: in k3s's server directory
//! with no endpoint, so kine opens its default DSN (`./db/state.db` with its default SQLite
//! parameters: WAL, `synchronous=NORMAL`, immediate transactions) and listens on `./kine.sock`.
//!
//! Also what a gateway's cluster keeps in it, as keys and values the API server would write.
//!
//! One copy for the real-kine test (`guest-init/tests/kine_real.rs`), the pre-initialised root's
//! test and `cargo xtask bench kine`, which include this file with `#[path]`: it uses std, libc
//! and serde_json only, nothing of either crate.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The environment variable that names kine's binary for the tests (`cargo xtask test` sets it
/// to the pinned build, `cargo xtask peers` prints its path).
pub const KINE_ENV: &str = "OPENSHELL_TEST_KINE";

/// Where k3s's database sits under its server directory.
pub const DB: &str = "db/state.db";

pub type Result<T> = std::result::Result<T, String>;

/// kine's binary from [`KINE_ENV`], or `None` with the reason printed. Under CI (`CI` set) a
/// missing kine is a failure: CI must never pass by skipping.
pub fn from_env() -> Option<PathBuf> {
    match std::env::var_os(KINE_ENV) {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            let why = format!(
                "{KINE_ENV} is not set: the real-kine tests run through `cargo xtask test` \
                 (or set it to the path `cargo xtask peers` prints)"
            );
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("skipped: {why}");
            None
        }
    }
}

/// A gateway's long-running pods.
pub const PODS: [&str; 4] = [
    "openshell/openshell-0",
    "openshell/sandbox-7f3c",
    "kube-system/coredns-6799fbcd5-x2x9q",
    "agent-sandbox-system/agent-sandbox-controller-0",
];
/// The control plane's leader-election leases.
pub const LEADERS: [&str; 3] = [
    "kube-system/kube-scheduler",
    "kube-system/kube-controller-manager",
    "kube-system/k3s",
];
/// The node's heartbeat lease.
pub const NODE_LEASE: &str = "/registry/leases/kube-node-lease/openshell-vm";

/// The objects of a gateway's cluster, one key each: the bootstrap lock, namespaces, custom
/// resource definitions and resources, secrets, config maps, services, the node, its master
/// lease, endpoint slices and pods (one of them a finished install job's).
pub fn gateway_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "/bootstrap/5a4f0c1d9e2b7a36",
        "/registry/apiextensions.k8s.io/customresourcedefinitions/helmcharts.helm.cattle.io",
        "/registry/apiextensions.k8s.io/customresourcedefinitions/sandboxes.agents.x-k8s.io",
        "/registry/helm.cattle.io/helmcharts/kube-system/openshell",
        "/registry/agents.x-k8s.io/sandboxes/openshell/sandbox-7f3c",
        "/registry/secrets/openshell/openshell-server-tls",
        "/registry/secrets/openshell/sh.helm.release.v1.openshell.v1",
        "/registry/configmaps/kube-system/coredns",
        "/registry/configmaps/openshell/openshell-config",
        "/registry/configmaps/kube-system/extension-apiserver-authentication",
        "/registry/services/specs/default/kubernetes",
        "/registry/services/specs/openshell/openshell",
        "/registry/minions/openshell-vm",
        "/registry/masterleases/192.168.127.2",
        "/registry/endpointslices/default/kubernetes",
        "/registry/endpointslices/openshell/openshell-x7k2p",
        "/registry/pods/openshell/openshell-install-z9x8w",
    ]
    .map(String::from)
    .to_vec();
    for ns in [
        "default",
        "kube-system",
        "openshell",
        "agent-sandbox-system",
    ] {
        keys.push(format!("/registry/namespaces/{ns}"));
    }
    keys.extend(PODS.iter().map(|p| format!("/registry/pods/{p}")));
    keys
}

/// An object as the API server stores it: protobuf behind the `k8s\0` magic, so binary, with
/// NUL bytes, and a little different at every generation.
pub fn object(key: &str, generation: usize) -> Vec<u8> {
    let mut v = b"k8s\0\n\x02v1\x12".to_vec();
    v.extend_from_slice(key.as_bytes());
    v.extend_from_slice(&(generation as u32).to_le_bytes());
    v.extend(std::iter::repeat_n(0xa5u8, 64 + (generation * 37) % 400));
    v
}

/// One key as kine serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
}

/// A range read: the store's revision when it was served, and the keys.
#[derive(Debug, Clone)]
pub struct Range {
    pub revision: i64,
    pub kvs: Vec<Kv>,
}

/// A running kine.
pub struct Kine {
    child: Option<Child>,
    server: PathBuf,
    log: PathBuf,
}

impl Kine {
    /// Starts `bin` in `server` (k3s's server directory, created if missing) with `args` added,
    /// and waits until it answers. Its log goes to `<server>/kine.log`, appended to.
    pub fn start(bin: &Path, server: &Path, args: &[&str]) -> Result<Kine> {
        std::fs::create_dir_all(server).map_err(|e| format!("{}: {e}", server.display()))?;
        let log = server.join("kine.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .current_dir(server)
            .args(["--listen-address", "unix://kine.sock"])
            .args(["--metrics-bind-address", "0", "--log-format", "json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run kine {}: {e}", bin.display()))?;
        let mut kine = Kine {
            child: Some(child),
            server: server.to_path_buf(),
            log,
        };
        kine.wait_until_serving(Duration::from_secs(60))?;
        Ok(kine)
    }

    fn wait_until_serving(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("kine exited ({status}):\n{}", self.log()));
            }
            if self.socket().exists() && self.etcdctl(&["get", "compact_rev_key"], b"").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("kine not serving after {limit:?}:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.server.join("kine.sock")
    }

    /// The database file kine serves.
    pub fn db(&self) -> PathBuf {
        self.server.join(DB)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What kine logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines at warning level or above.
    pub fn complaints(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| {
                // kine's JSON log names the level `severity`.
                let level = serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["severity"].as_str().map(str::to_string));
                // A line that is not kine's JSON (a Go panic) counts as a complaint too.
                !matches!(level.as_deref(), Some("info" | "debug" | "trace"))
            })
            .map(str::to_string)
            .collect()
    }

    /// Runs etcdctl against this kine with `stdin` as its input; its stdout, or an error with
    /// its stderr.
    pub fn etcdctl(&self, args: &[&str], stdin: &[u8]) -> Result<String> {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=unix://{}", self.socket().display()))
            .args(["--dial-timeout=5s", "--command-timeout=30s"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run etcdctl (Debian package etcd-client): {e}"))?;
        if let Some(mut input) = child.stdin.take() {
            input
                .write_all(stdin)
                .map_err(|e| format!("etcdctl stdin: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "etcdctl {}: {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Creates or updates `key` (kine's own create-else-update); the revision it was written at.
    pub fn put(&self, key: &str, value: &[u8]) -> Result<i64> {
        let out = self.etcdctl(&["put", key, "-w", "json"], value)?;
        header_revision(&out)
    }

    /// Deletes `key` as the API server does: a transaction on its current mod revision (kine
    /// serves no plain delete); the revision of its tombstone.
    pub fn delete(&self, key: &str) -> Result<i64> {
        let current = self.etcdctl(&["get", key, "-w", "json"], b"")?;
        let v: serde_json::Value =
            serde_json::from_str(&current).map_err(|e| format!("{e}: {current}"))?;
        let rev = v["kvs"][0]["mod_revision"]
            .as_i64()
            .ok_or_else(|| format!("delete {key}: no such key"))?;
        let txn = format!("mod(\"{key}\") = \"{rev}\"\n\ndel {key}\n\nget {key}\n\n");
        let out = self.etcdctl(&["txn", "-w", "json"], txn.as_bytes())?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        if v["succeeded"] != serde_json::Value::Bool(true) {
            return Err(format!("delete {key} did not succeed: {out}"));
        }
        header_revision(&out)
    }

    /// Every key under `prefix` (all keys for ""), at the current revision or at `rev`.
    pub fn range(&self, prefix: &str, rev: Option<i64>) -> Result<Range> {
        let rev = rev.map(|r| format!("--rev={r}"));
        let mut args = vec!["get", "--prefix", prefix, "-w", "json"];
        args.extend(rev.as_deref());
        let out = self.etcdctl(&args, b"")?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        let kvs = match v["kvs"].as_array() {
            Some(kvs) => kvs.iter().map(kv).collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        Ok(Range {
            revision: header_revision(&out)?,
            kvs,
        })
    }

    /// Compacts the history up to `rev`.
    pub fn compact(&self, rev: i64) -> Result<()> {
        self.etcdctl(&["compact", &rev.to_string()], b"").map(drop)
    }

    /// Watches `prefix` from revision `from` on.
    pub fn watch(&self, prefix: &str, from: i64) -> Result<Watch> {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=unix://{}", self.socket().display()))
            .args(["watch", "--prefix", prefix, "-w", "json"])
            .arg(format!("--rev={from}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run etcdctl watch: {e}"))?;
        let stdout = child.stdout.take().ok_or("etcdctl watch: no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Watch {
            child,
            lines: rx,
            pending: Default::default(),
        })
    }

    /// Sends SIGKILL without waiting, for a kine other threads are still talking to; [`Kine::kill`]
    /// or dropping it reaps it.
    pub fn sigkill(&self) -> Result<()> {
        let pid = self.pid().ok_or("kine already stopped")?;
        let pid = i32::try_from(pid).map_err(|e| e.to_string())?;
        // SAFETY: kill(2) on our own child, not yet waited for, so the pid is still its.
        if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
            Ok(())
        } else {
            Err(format!("kill {pid}: {}", std::io::Error::last_os_error()))
        }
    }

    /// SIGKILL, as a VM killed under it would leave it.
    pub fn kill(mut self) -> Result<()> {
        let mut child = self.child.take().ok_or("kine already stopped")?;
        child.kill().map_err(|e| format!("kill kine: {e}"))?;
        child
            .wait()
            .map(drop)
            .map_err(|e| format!("wait for kine: {e}"))
    }

    /// SIGTERM and wait (kine closes its database); SIGKILL after 20 s.
    pub fn stop(mut self) -> Result<()> {
        let mut child = self.child.take().ok_or("kine already stopped")?;
        let pid = i32::try_from(child.id()).map_err(|e| e.to_string())?;
        // SAFETY: kill(2) on our own child, which has not been waited for, so the pid is its.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if child.try_wait().map_err(|e| e.to_string())?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!("kine ignored SIGTERM for 20 s:\n{}", self.log()))
    }
}

impl Drop for Kine {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running `etcdctl watch`.
pub struct Watch {
    child: Child,
    lines: mpsc::Receiver<String>,
    pending: std::collections::VecDeque<Event>,
}

/// One watch event: the key as it is after it, and whether it was a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub delete: bool,
    pub kv: Kv,
}

impl Watch {
    /// The next event, waiting at most `limit`.
    pub fn next(&mut self, limit: Duration) -> Result<Event> {
        let deadline = Instant::now() + limit;
        while self.pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .map_err(|e| format!("no watch event within {limit:?}: {e}"))?;
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
            if v["Canceled"] == serde_json::Value::Bool(true) {
                return Err(format!("watch cancelled: {line}"));
            }
            // A response may carry several events, or none (the watch's confirmation).
            for event in v["Events"].as_array().into_iter().flatten() {
                self.pending.push_back(Event {
                    delete: event["type"] == "DELETE" || event["type"] == 1,
                    kv: kv(&event["kv"])?,
                });
            }
        }
        self.pending.pop_front().ok_or_else(|| "no event".into())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn header_revision(json: &str) -> Result<i64> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("{e}: {json}"))?;
    v["header"]["revision"]
        .as_i64()
        .ok_or_else(|| format!("no header revision in {json}"))
}

fn kv(v: &serde_json::Value) -> Result<Kv> {
    let bytes = |field: &str| match v[field].as_str() {
        Some(text) => base64(text).ok_or_else(|| format!("{field}: not base64: {text}")),
        None => Ok(Vec::new()),
    };
    Ok(Kv {
        key: String::from_utf8(bytes("key")?).map_err(|e| e.to_string())?,
        value: bytes("value")?,
        create_revision: v["create_revision"].as_i64().unwrap_or(0),
        mod_revision: v["mod_revision"].as_i64().unwrap_or(0),
    })
}

/// Standard base64 (how etcdctl's JSON carries bytes).
fn base64(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let text = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= digit(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}
