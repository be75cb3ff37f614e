//! A kubeconfig for the gateway's cluster on the user's machine, `~/.kube/openshell-<instance>.yaml`,
//! made from k3s's admin kubeconfig that the guest sends over the boot channel once its API
//! server is ready (no exec agent to poll).
//!
//! The guest is untrusted input. Its file is not copied: the few fields a kubeconfig for k3s
//! needs (server, CA, client certificate and key) are taken out, checked, and written into a
//! fresh file, so nothing else the guest put there (an `exec` credential plugin, a token file
//! path, a remote server) reaches the user's kubectl. The server points at the host port
//! forwarded to the API port when there is one; names become `openshell-<instance>`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use openshell_shared::fsutil::write_atomic_mode;

/// k3s's API server port in the guest.
pub const API_PORT: u16 = 6443;
/// k3s's admin kubeconfig is about 3 KiB; the guest bounds what it sends at 32 KiB.
const MAX_KUBECONFIG: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("the guest's kubeconfig is {len} bytes, more than {MAX_KUBECONFIG}")]
    TooLarge { len: usize },
    #[error("the guest's kubeconfig is not a YAML kubeconfig: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("the guest's kubeconfig has {field} {got:?}, expected {want:?}")]
    Header {
        field: &'static str,
        want: &'static str,
        got: Option<String>,
    },
    #[error("the guest's kubeconfig has {n} {what}, expected exactly one")]
    Count { what: &'static str, n: usize },
    #[error("the guest's kubeconfig has no {what}")]
    Missing { what: &'static str },
    #[error("the guest's kubeconfig {what} is not base64")]
    NotBase64 { what: &'static str },
    #[error("the guest's kubeconfig names server {server:?}, not https on the guest's loopback")]
    Server { server: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kubeconfig directory: {0}")]
    Unsafe(#[from] crate::private_dir::DirError),
    #[error("no home directory: set HOME")]
    NoHome,
}

/// How writing went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    New,
    Updated,
    Unchanged,
}

/// `~/.kube/openshell-<instance>.yaml`: always this path (not `$KUBECONFIG`, which may name the
/// user's own file), so it is never merged into or overwriting anything of theirs.
pub fn path(instance: &str) -> Result<PathBuf, KubeconfigError> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or(KubeconfigError::NoHome)?;
    Ok(PathBuf::from(home)
        .join(".kube")
        .join(format!("{}.yaml", name(instance))))
}

/// The cluster, user and context name.
pub fn name(instance: &str) -> String {
    format!("openshell-{instance}")
}

// What is read from the guest: only these fields, unknown ones ignored (and so dropped).
#[derive(Deserialize)]
struct GuestFile {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    clusters: Vec<Named<GuestCluster>>,
    #[serde(default)]
    users: Vec<Named<GuestUser>>,
}

/// A `clusters` or `users` entry: the payload is under `cluster` or `user`; names are replaced.
#[derive(Deserialize)]
struct Named<T> {
    #[serde(alias = "user")]
    cluster: Option<T>,
}

#[derive(Deserialize)]
struct GuestCluster {
    server: Option<String>,
    #[serde(rename = "certificate-authority-data")]
    ca: Option<String>,
}

#[derive(Deserialize)]
struct GuestUser {
    #[serde(rename = "client-certificate-data")]
    cert: Option<String>,
    #[serde(rename = "client-key-data")]
    key: Option<String>,
}

// What is written: a whole kubeconfig built from the checked fields.
#[derive(Serialize)]
struct OutFile<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    clusters: [OutNamed<'a, OutCluster<'a>>; 1],
    users: [OutUser<'a>; 1],
    contexts: [OutContext<'a>; 1],
    #[serde(rename = "current-context")]
    current_context: &'a str,
    preferences: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize)]
struct OutNamed<'a, T> {
    name: &'a str,
    cluster: T,
}

#[derive(Serialize)]
struct OutCluster<'a> {
    server: String,
    #[serde(rename = "certificate-authority-data")]
    ca: &'a str,
}

#[derive(Serialize)]
struct OutUser<'a> {
    name: &'a str,
    user: OutCredentials<'a>,
}

#[derive(Serialize)]
struct OutCredentials<'a> {
    #[serde(rename = "client-certificate-data")]
    cert: &'a str,
    #[serde(rename = "client-key-data")]
    key: &'a str,
}

#[derive(Serialize)]
struct OutContext<'a> {
    name: &'a str,
    context: OutContextRef<'a>,
}

#[derive(Serialize)]
struct OutContextRef<'a> {
    cluster: &'a str,
    user: &'a str,
}

fn one<T>(what: &'static str, mut items: Vec<Named<T>>) -> Result<T, KubeconfigError> {
    if items.len() != 1 {
        return Err(KubeconfigError::Count {
            what,
            n: items.len(),
        });
    }
    items
        .pop()
        .and_then(|n| n.cluster)
        .ok_or(KubeconfigError::Missing { what })
}

fn base64_field(what: &'static str, v: Option<String>) -> Result<String, KubeconfigError> {
    let v = v.ok_or(KubeconfigError::Missing { what })?;
    let ok = !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if !ok {
        return Err(KubeconfigError::NotBase64 { what });
    }
    Ok(v)
}

/// Loopback only: a kubeconfig from the guest must not send the user's kubectl elsewhere.
fn check_server(server: Option<String>) -> Result<String, KubeconfigError> {
    let server = server.ok_or(KubeconfigError::Missing {
        what: "cluster server",
    })?;
    let port = ["https://127.0.0.1:", "https://localhost:", "https://[::1]:"]
        .iter()
        .find_map(|p| server.strip_prefix(p));
    match port.map(|p| p.trim_end_matches('/').parse::<u16>()) {
        Some(Ok(_)) => Ok(server),
        _ => Err(KubeconfigError::Server { server }),
    }
}

/// Turns the guest's kubeconfig into the user's: checked, renamed to `openshell-<instance>`,
/// server `https://127.0.0.1:<api_forward>` when the API port is forwarded (else the guest's).
pub fn render(
    guest_yaml: &str,
    instance: &str,
    api_forward: Option<u16>,
) -> Result<String, KubeconfigError> {
    if guest_yaml.len() > MAX_KUBECONFIG {
        return Err(KubeconfigError::TooLarge {
            len: guest_yaml.len(),
        });
    }
    let file: GuestFile = serde_yaml::from_str(guest_yaml)?;
    if file.api_version.as_deref() != Some("v1") {
        return Err(KubeconfigError::Header {
            field: "apiVersion",
            want: "v1",
            got: file.api_version,
        });
    }
    if file.kind.as_deref() != Some("Config") {
        return Err(KubeconfigError::Header {
            field: "kind",
            want: "Config",
            got: file.kind,
        });
    }
    let cluster = one("clusters", file.clusters)?;
    let user = one("users", file.users)?;
    let server = check_server(cluster.server)?;
    let ca = base64_field("certificate-authority-data", cluster.ca)?;
    let cert = base64_field("client-certificate-data", user.cert)?;
    let key = base64_field("client-key-data", user.key)?;
    let name = name(instance);
    let out = OutFile {
        api_version: "v1",
        kind: "Config",
        clusters: [OutNamed {
            name: &name,
            cluster: OutCluster {
                server: match api_forward {
                    Some(port) => format!("https://127.0.0.1:{port}"),
                    None => server,
                },
                ca: &ca,
            },
        }],
        users: [OutUser {
            name: &name,
            user: OutCredentials {
                cert: &cert,
                key: &key,
            },
        }],
        contexts: [OutContext {
            name: &name,
            context: OutContextRef {
                cluster: &name,
                user: &name,
            },
        }],
        current_context: &name,
        preferences: Default::default(),
    };
    Ok(serde_yaml::to_string(&out)?)
}

/// Renders and writes the kubeconfig to `path` (0600, atomically, only when it changes; a new
/// `.kube` directory is made 0700). Nothing is written when the guest's file is refused.
pub fn store(
    path: &Path,
    guest_yaml: &str,
    instance: &str,
    api_forward: Option<u16>,
) -> Result<Written, KubeconfigError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let text = render(guest_yaml, instance, api_forward)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KubeconfigError::Io { path, source }
    };
    let old = std::fs::read(path).ok();
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .ok();
    if old.as_deref() == Some(text.as_bytes()) && mode == Some(0o600) {
        return Ok(Written::Unchanged);
    }
    if let Some(dir) = path.parent() {
        // As root, not into a directory a user could redirect (`sudo` keeping `$HOME`).
        if nix::unistd::geteuid().is_root() {
            let (base, rest) = crate::private_dir::split_existing(dir);
            crate::private_dir::ensure(&base, &rest, crate::private_dir::NO_SHARED_WRITE)?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    write_atomic_mode(path, text.as_bytes(), 0o600).map_err(io(path))?;
    Ok(if old.is_some() {
        Written::Updated
    } else {
        Written::New
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The shape k3s writes to /etc/rancher/k3s/k3s.yaml.
    const K3S_YAML: &str = "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: Q0EK
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {}
users:
- name: default
  user:
    client-certificate-data: Q0VSVAo=
    client-key-data: S0VZCg==
";

    fn parsed(text: &str) -> serde_yaml::Value {
        serde_yaml::from_str(text).expect("yaml")
    }

    #[test]
    fn forwarded_api_port_becomes_the_server_and_names_are_the_instances() {
        let v = parsed(&render(K3S_YAML, "dev", Some(16443)).expect("render"));
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:16443"
        );
        assert_eq!(
            v["clusters"][0]["cluster"]["certificate-authority-data"],
            "Q0EK"
        );
        assert_eq!(v["users"][0]["user"]["client-certificate-data"], "Q0VSVAo=");
        assert_eq!(v["users"][0]["user"]["client-key-data"], "S0VZCg==");
        for field in [
            &v["clusters"][0]["name"],
            &v["users"][0]["name"],
            &v["contexts"][0]["name"],
            &v["contexts"][0]["context"]["cluster"],
            &v["contexts"][0]["context"]["user"],
            &v["current-context"],
        ] {
            assert_eq!(field, "openshell-dev");
        }
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["kind"], "Config");
    }

    /// The kubeconfig the guest's stand-in k3s writes (and the guest test sees sent) is one the
    /// host accepts: both sides agree on the format.
    #[test]
    fn the_stand_in_k3s_kubeconfig_is_accepted() {
        let script = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../guest-init/tests/fixtures/fake-k3s.sh"
        ))
        .expect("stand-in");
        let start = script.find("<<'EOF'\n").expect("heredoc") + "<<'EOF'\n".len();
        let len = script[start..].find("\nEOF\n").expect("heredoc end") + 1;
        let v =
            parsed(&render(&script[start..start + len], "default", Some(6443)).expect("render"));
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:6443"
        );
        assert_eq!(v["current-context"], "openshell-default");
    }

    /// As root, `~/.kube` in a home another user owns is refused and nothing is written there.
    #[test]
    fn as_root_a_kube_directory_in_another_users_home_is_refused() {
        let t = tempfile::tempdir().expect("tmp");
        let Some(home) = crate::private_dir::home_of_another_user(t.path()) else {
            return;
        };
        let path = home.join(".kube/openshell-default.yaml");
        let err = store(&path, K3S_YAML, "default", None).expect_err("refused");
        assert!(
            matches!(err, KubeconfigError::Unsafe(_)) && err.to_string().contains("uid 65534"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(&home).expect("ls").count(), 0);
    }

    #[test]
    fn without_a_forward_the_guests_server_is_kept() {
        let v = parsed(&render(K3S_YAML, "default", None).expect("render"));
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:6443"
        );
        assert_eq!(v["current-context"], "openshell-default");
    }

    #[test]
    fn fields_beyond_the_credentials_do_not_reach_the_users_file() {
        let hostile = K3S_YAML.replace(
            "    client-key-data: S0VZCg==\n",
            "    client-key-data: S0VZCg==\n    exec:\n      command: /bin/evil\n      apiVersion: client.authentication.k8s.io/v1\n",
        );
        let out = render(&hostile, "default", None).expect("render");
        assert!(!out.contains("evil") && !out.contains("exec"), "{out}");
    }

    #[test]
    fn written_0600_then_unchanged_then_updated() {
        let t = tempfile::tempdir().expect("tmp");
        let path = t.path().join(".kube/openshell-default.yaml");
        assert_eq!(
            store(&path, K3S_YAML, "default", Some(6443)).expect("store"),
            Written::New
        );
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
        let mtime = || {
            std::fs::metadata(&path)
                .expect("meta")
                .modified()
                .expect("mtime")
        };
        let before = mtime();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            store(&path, K3S_YAML, "default", Some(6443)).expect("again"),
            Written::Unchanged
        );
        assert_eq!(before, mtime(), "an unchanged file is not rewritten");
        assert_eq!(
            store(&path, K3S_YAML, "default", Some(7443)).expect("moved"),
            Written::Updated
        );
        let v = parsed(&std::fs::read_to_string(&path).expect("read"));
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:7443"
        );
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn garbage_is_refused_by_name_and_nothing_written() {
        let t = tempfile::tempdir().expect("tmp");
        let path = t.path().join(".kube/openshell-default.yaml");
        let two_clusters = K3S_YAML.replace(
            "clusters:\n",
            "clusters:\n- cluster:\n    server: https://127.0.0.1:1\n  name: other\n",
        );
        let cases: Vec<(String, &str)> = vec![
            ("not: [yaml".into(), "not a YAML kubeconfig"),
            ("- a list".into(), "not a YAML kubeconfig"),
            (
                K3S_YAML.replace("apiVersion: v1", "apiVersion: v2"),
                "apiVersion",
            ),
            (K3S_YAML.replace("kind: Config", "kind: Pod"), "kind"),
            (two_clusters, "2 clusters"),
            (K3S_YAML.replace("users:", "userz:"), "0 users"),
            (
                K3S_YAML.replace("https://127.0.0.1:6443", "https://evil.example:6443"),
                "evil.example",
            ),
            (
                K3S_YAML.replace("S0VZCg==", "not base64!"),
                "client-key-data",
            ),
            (
                K3S_YAML.replace("    certificate-authority-data: Q0EK\n", ""),
                "certificate-authority-data",
            ),
            (
                format!("{K3S_YAML}#{}", "x".repeat(MAX_KUBECONFIG)),
                "more than",
            ),
        ];
        for (yaml, says) in cases {
            let err = store(&path, &yaml, "default", None).expect_err(says);
            assert!(err.to_string().contains(says), "{err} should name {says}");
        }
        assert!(!path.parent().expect("dir").exists());
    }
}
