//! The gateway's client credentials on the user's machine: the mTLS bundle the guest sends over
//! the boot channel, kept where the OpenShell CLI looks for it
//! (`$XDG_CONFIG_HOME/openshell/gateways/openshell-vm-<instance>/`), with the gateway's metadata.
//! Files are replaced atomically, the directory is 0700 and the key 0600. A CA other than the
//! stored one (the guest made its PKI anew, after a reset) replaces the bundle, said out loud.
//!
//! The guest is untrusted input: each part must be a PEM of the expected kind and small.

use std::path::{Path, PathBuf};

use openshell_shared::fsutil::write_atomic_mode;

/// Each PEM is a few KiB; more is not a certificate or key of ours.
const MAX_PEM: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("the guest's {what} is not a PEM {label} of at most {MAX_PEM} bytes")]
    NotPem {
        what: &'static str,
        label: &'static str,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no configuration directory: set XDG_CONFIG_HOME or HOME")]
    NoConfigDir,
}

/// How storing went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    New,
    Unchanged,
    /// The guest's CA differs from the stored one: the bundle was replaced.
    Replaced,
}

pub fn gateway_name(instance: &str) -> String {
    format!("openshell-vm-{instance}")
}

/// `$XDG_CONFIG_HOME/openshell/gateways/<gateway>`, else under `~/.config`.
pub fn gateway_dir(instance: &str) -> Result<PathBuf, CredentialsError> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .ok_or(CredentialsError::NoConfigDir)?;
    Ok(base
        .join("openshell")
        .join("gateways")
        .join(gateway_name(instance)))
}

fn check_pem(what: &'static str, text: &str, label: &'static str) -> Result<(), CredentialsError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let t = text.trim();
    if t.len() > MAX_PEM || !t.starts_with(&begin) || !t.ends_with(&end) {
        return Err(CredentialsError::NotPem { what, label });
    }
    Ok(())
}

/// Stores the bundle (and, when the gateway port is forwarded, the metadata naming its endpoint)
/// in `dir`.
pub fn store(
    dir: &Path,
    ca: &str,
    cert: &str,
    key: &str,
    gateway_port: Option<u16>,
) -> Result<Stored, CredentialsError> {
    check_pem("CA certificate", ca, "CERTIFICATE")?;
    check_pem("client certificate", cert, "CERTIFICATE")?;
    check_pem("client key", key, "PRIVATE KEY")?;
    let mtls = dir.join("mtls");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CredentialsError::Io { path, source }
    };
    for d in [dir, &mtls] {
        std::fs::create_dir_all(d).map_err(io(d))?;
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io(d))?;
    }
    let files = [
        (mtls.join("ca.crt"), ca, 0o644),
        (mtls.join("tls.crt"), cert, 0o644),
        (mtls.join("tls.key"), key, 0o600),
    ];
    let old_ca = std::fs::read_to_string(&files[0].0).ok();
    let unchanged = files
        .iter()
        .all(|(p, text, _)| std::fs::read_to_string(p).ok().as_deref() == Some(text));
    let stored = match old_ca {
        _ if unchanged => Stored::Unchanged,
        Some(old) if old.trim() != ca.trim() => Stored::Replaced,
        Some(_) => Stored::Unchanged,
        None => Stored::New,
    };
    if !unchanged {
        for (path, text, mode) in &files {
            write_atomic_mode(path, text.as_bytes(), *mode).map_err(io(path))?;
        }
    }
    if let Some(port) = gateway_port {
        let meta = serde_json::json!({
            "name": dir.file_name().map(|n| n.to_string_lossy().into_owned()),
            "gateway_endpoint": format!("https://127.0.0.1:{port}"),
            "gateway_port": port,
        });
        let path = dir.join("metadata.json");
        let bytes = serde_json::to_vec_pretty(&meta).unwrap_or_default();
        if std::fs::read(&path).ok() != Some(bytes.clone()) {
            write_atomic_mode(&path, &bytes, 0o644).map_err(io(&path))?;
        }
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn pem(label: &str, body: &str) -> String {
        format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n")
    }

    #[test]
    fn stored_private_then_unchanged_then_replaced_on_a_new_ca() {
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path().join("openshell-vm-default");
        let (ca, crt, key) = (
            pem("CERTIFICATE", "ca1"),
            pem("CERTIFICATE", "crt"),
            pem("PRIVATE KEY", "key"),
        );
        assert_eq!(
            store(&dir, &ca, &crt, &key, Some(30051)).expect("store"),
            Stored::New
        );
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("mtls")), 0o700);
        assert_eq!(mode(&dir.join("mtls/tls.key")), 0o600);
        assert_eq!(
            std::fs::read_to_string(dir.join("mtls/tls.key")).expect("key"),
            key
        );
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("metadata.json")).expect("meta"))
                .expect("json");
        assert_eq!(meta["gateway_endpoint"], "https://127.0.0.1:30051");
        let before = std::fs::metadata(dir.join("mtls/tls.key"))
            .expect("meta")
            .modified()
            .expect("mtime");
        assert_eq!(
            store(&dir, &ca, &crt, &key, Some(30051)).expect("again"),
            Stored::Unchanged
        );
        let after = std::fs::metadata(dir.join("mtls/tls.key"))
            .expect("meta")
            .modified()
            .expect("mtime");
        assert_eq!(before, after, "unchanged files are not rewritten");
        let ca2 = pem("CERTIFICATE", "ca2");
        assert_eq!(
            store(&dir, &ca2, &crt, &key, None).expect("drift"),
            Stored::Replaced
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("mtls/ca.crt")).expect("ca"),
            ca2
        );
    }

    #[test]
    fn anything_but_the_expected_pem_is_refused_and_nothing_written() {
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path().join("g");
        let good = pem("CERTIFICATE", "x");
        let key = pem("PRIVATE KEY", "k");
        let huge = pem("CERTIFICATE", &"A".repeat(MAX_PEM));
        for (ca, crt, k) in [
            ("garbage", good.as_str(), key.as_str()),
            (good.as_str(), good.as_str(), good.as_str()),
            (huge.as_str(), good.as_str(), key.as_str()),
        ] {
            assert!(matches!(
                store(&dir, ca, crt, k, None),
                Err(CredentialsError::NotPem { .. })
            ));
        }
        assert!(!dir.exists());
    }
}
