//! The gateway's client credentials on the user's machine: the mTLS bundle the guest sends over
//! the boot channel, kept where the OpenShell CLI looks for it
//! (`$XDG_CONFIG_HOME/openshell/gateways/openshell-vm-<instance>/mtls/`); the gateway's
//! registration beside it is `gateway_metadata`'s.
//! Files are replaced atomically, the directory is 0700 and the key 0600. A CA other than the
//! stored one (the guest made its PKI anew, after a reset, or a guest is lying) replaces the
//! bundle, and both CAs' SHA-256 fingerprints are reported so the user can tell which is which.
//!
//! The guest is untrusted input: each part must be exactly one PEM block of the expected kind,
//! small, and parse whole; the CA must be a self-signed CA, the client certificate must be
//! signed by it, and the key must be the client certificate's.

use std::path::{Path, PathBuf};

use openshell_shared::fsutil::write_atomic_mode;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// Each PEM is a few KiB; more is not a certificate or key of ours.
const MAX_PEM: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("the guest's {what} is not a PEM {label} of at most {MAX_PEM} bytes")]
    NotPem {
        what: &'static str,
        label: &'static str,
    },
    #[error("the guest's {what} holds {count} PEM blocks where exactly one {label} belongs")]
    Count {
        what: &'static str,
        label: &'static str,
        count: usize,
    },
    #[error("the guest's {what} does not parse: {reason}")]
    Parse { what: &'static str, reason: String },
    #[error("the guest's CA certificate is not a self-signed CA: {0}")]
    NotCa(&'static str),
    #[error("the guest's client certificate is not from its CA: {0}")]
    NotFromCa(String),
    #[error("the guest's client key is not the client certificate's key")]
    KeyMismatch,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("credentials directory: {0}")]
    Unsafe(#[from] crate::private_dir::DirError),
    #[error("no configuration directory: set XDG_CONFIG_HOME or HOME")]
    NoConfigDir,
}

impl CredentialsError {
    /// The bundle itself was refused, as opposed to a place to store it missing or unsafe.
    pub fn refused(&self) -> bool {
        !matches!(
            self,
            CredentialsError::Io { .. }
                | CredentialsError::Unsafe(_)
                | CredentialsError::NoConfigDir
        )
    }
}

/// How storing went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    New,
    Unchanged,
    /// The guest's CA differs from the stored one: the bundle was replaced. Both CAs' SHA-256
    /// fingerprints (the old one's, or why it could not be read).
    Replaced {
        old: String,
        new: String,
    },
}

pub fn gateway_name(instance: &str) -> String {
    format!("openshell-vm-{instance}")
}

/// `$XDG_CONFIG_HOME/openshell/gateways/<gateway>`, else under `~/.config`.
pub fn gateway_dir(instance: &str) -> Result<PathBuf, CredentialsError> {
    let base =
        crate::gateway_metadata::openshell_dir().map_err(|_| CredentialsError::NoConfigDir)?;
    Ok(base.join("gateways").join(gateway_name(instance)))
}

/// The DER inside `text`, which must be exactly one PEM block labelled `label` and nothing else.
fn one_pem(
    what: &'static str,
    text: &str,
    label: &'static str,
) -> Result<Vec<u8>, CredentialsError> {
    let t = text.trim();
    let count = t
        .matches("-----BEGIN ")
        .count()
        .max(t.matches("-----END ").count());
    if count > 1 {
        return Err(CredentialsError::Count { what, label, count });
    }
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    if t.len() > MAX_PEM || !t.starts_with(&begin) || !t.ends_with(&end) {
        return Err(CredentialsError::NotPem { what, label });
    }
    let parse = |reason: String| CredentialsError::Parse { what, reason };
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(t.as_bytes()).map_err(|e| parse(e.to_string()))?;
    if pem.label != label {
        return Err(CredentialsError::NotPem { what, label });
    }
    Ok(pem.contents)
}

/// A certificate that is all of `der`.
fn certificate<'a>(
    what: &'static str,
    der: &'a [u8],
) -> Result<X509Certificate<'a>, CredentialsError> {
    let parse = |reason: String| CredentialsError::Parse { what, reason };
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(parse(format!("{} bytes after the certificate", rest.len()))),
        Err(e) => Err(parse(e.to_string())),
    }
}

/// Checks the bundle as a whole; returns the CA's DER.
fn check(ca: &str, cert: &str, key: &str) -> Result<Vec<u8>, CredentialsError> {
    let ca_der = one_pem("CA certificate", ca, "CERTIFICATE")?;
    let crt_der = one_pem("client certificate", cert, "CERTIFICATE")?;
    one_pem("client key", key, "PRIVATE KEY")?;
    let ca_cert = certificate("CA certificate", &ca_der)?;
    if !ca_cert.is_ca() {
        return Err(CredentialsError::NotCa(
            "its basic constraints do not make it a CA",
        ));
    }
    ca_cert
        .verify_signature(None)
        .map_err(|_| CredentialsError::NotCa("its signature does not verify with its own key"))?;
    let client = certificate("client certificate", &crt_der)?;
    if client.issuer() != ca_cert.subject() {
        return Err(CredentialsError::NotFromCa(format!(
            "issued by `{}`, the CA is `{}`",
            client.issuer(),
            ca_cert.subject()
        )));
    }
    client
        .verify_signature(Some(ca_cert.public_key()))
        .map_err(|_| {
            CredentialsError::NotFromCa("its signature does not verify with the CA's key".into())
        })?;
    let pair = rcgen::KeyPair::from_pem(key.trim()).map_err(|e| CredentialsError::Parse {
        what: "client key",
        reason: e.to_string(),
    })?;
    if pair.public_key_raw() != client.public_key().subject_public_key.data.as_ref() {
        return Err(CredentialsError::KeyMismatch);
    }
    Ok(ca_der)
}

/// `SHA256:AB:CD:...` of a certificate's DER, as `openssl x509 -fingerprint -sha256` shows it.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    format!("SHA256:{}", hex.join(":"))
}

/// The stored CA's fingerprint, or what keeps it from having one.
fn stored_fingerprint(text: &str) -> String {
    match one_pem("stored CA", text, "CERTIFICATE") {
        Ok(der) => fingerprint(&der),
        Err(e) => format!("unreadable ({e})"),
    }
}

/// Makes `dir/mtls`, 0700. As root, every directory on the way must be root's and none of
/// ours a link (see `private_dir`): the key must not land where a user can redirect it.
fn make_dirs(dir: &Path, mtls: &Path) -> Result<(), CredentialsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CredentialsError::Io { path, source }
    };
    if nix::unistd::geteuid().is_root() {
        let (base, rest) = crate::private_dir::split_existing(mtls);
        crate::private_dir::ensure(&base, &rest, crate::private_dir::NO_SHARED_WRITE)?;
    }
    for d in [dir, mtls] {
        std::fs::create_dir_all(d).map_err(io(d))?;
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io(d))?;
    }
    Ok(())
}

/// Stores the bundle in `dir/mtls`.
pub fn store(dir: &Path, ca: &str, cert: &str, key: &str) -> Result<Stored, CredentialsError> {
    let ca_der = check(ca, cert, key)?;
    let mtls = dir.join("mtls");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CredentialsError::Io { path, source }
    };
    make_dirs(dir, &mtls)?;
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
        Some(old) if old.trim() != ca.trim() => Stored::Replaced {
            old: stored_fingerprint(&old),
            new: fingerprint(&ca_der),
        },
        Some(_) => Stored::Unchanged,
        None => Stored::New,
    };
    if !unchanged {
        for (path, text, mode) in &files {
            write_atomic_mode(path, text.as_bytes(), *mode).map_err(io(path))?;
        }
    }
    Ok(stored)
}

/// A warning when the guest's CA is not valid at `now` by the host's clock: TLS clients (the
/// OpenShell CLI, the host's health probe) refuse such a chain. The usual cause is a guest clock
/// that was wrong when the `pki` phase issued it (a guest without a real-time clock starts at
/// 1970). `None` when it is valid, or does not parse (storing reports that).
pub fn validity_warning(ca: &str, now: std::time::SystemTime) -> Option<String> {
    let der = one_pem("CA certificate", ca, "CERTIFICATE").ok()?;
    let cert = certificate("CA certificate", &der).ok()?;
    let secs = now.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    let now = x509_parser::time::ASN1Time::from_timestamp(i64::try_from(secs).ok()?).ok()?;
    let v = cert.validity();
    if v.not_before <= now && now <= v.not_after {
        return None;
    }
    Some(format!(
        "WARNING: the guest's CA is valid from {} to {}, not now ({now}): TLS clients will refuse \
         the gateway; the guest's clock was likely wrong when it issued its PKI",
        v.not_before, v.not_after
    ))
}

/// What `up` says when the CA changed: loud, with both fingerprints, so a user who did not reset
/// the gateway sees that something else now speaks for it.
pub fn replaced_warning(dir: &Path, old: &str, new: &str) -> String {
    format!(
        "WARNING: the gateway's CA changed (stored {old}, now {new}); the client credentials in \
         {} were replaced. Expected after `up --reset`; otherwise treat the guest as suspect.",
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::{ca, client};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn stored_private_then_unchanged_then_replaced_on_a_new_ca() {
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path().join("openshell-vm-default");
        let (ca1, ca1_der, issuer1) = ca("openshell-ca");
        let (crt, key) = client(&issuer1);
        assert_eq!(store(&dir, &ca1, &crt, &key).expect("store"), Stored::New);
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("mtls")), 0o700);
        assert_eq!(mode(&dir.join("mtls/tls.key")), 0o600);
        assert_eq!(
            std::fs::read_to_string(dir.join("mtls/tls.key")).expect("key"),
            key
        );
        let mtime = || {
            std::fs::metadata(dir.join("mtls/tls.key"))
                .expect("meta")
                .modified()
                .expect("mtime")
        };
        let before = mtime();
        assert_eq!(
            store(&dir, &ca1, &crt, &key).expect("again"),
            Stored::Unchanged
        );
        assert_eq!(before, mtime(), "unchanged files are not rewritten");

        // A swapped CA of the same name: replaced, with both fingerprints.
        let (ca2, ca2_der, issuer2) = ca("openshell-ca");
        let (crt2, key2) = client(&issuer2);
        let stored = store(&dir, &ca2, &crt2, &key2).expect("drift");
        assert_eq!(
            stored,
            Stored::Replaced {
                old: fingerprint(&ca1_der),
                new: fingerprint(&ca2_der)
            }
        );
        assert_ne!(fingerprint(&ca1_der), fingerprint(&ca2_der));
        assert_eq!(
            std::fs::read_to_string(dir.join("mtls/ca.crt")).expect("ca"),
            ca2
        );
        let warning = replaced_warning(&dir, &fingerprint(&ca1_der), &fingerprint(&ca2_der));
        assert!(
            warning.contains(&fingerprint(&ca1_der)) && warning.contains(&fingerprint(&ca2_der)),
            "{warning}"
        );
    }

    /// A CA valid now passes; one the host's clock is past (as it is past a CA a guest clock at
    /// 1970 issued) is named with its dates.
    #[test]
    fn a_ca_not_valid_by_the_hosts_clock_is_a_warning() {
        use std::time::{Duration, SystemTime};
        let (pem, _, _) = ca("openshell-ca");
        assert_eq!(validity_warning(&pem, SystemTime::now()), None);
        let far = SystemTime::now() + Duration::from_secs(11 * 365 * 24 * 3600);
        let warning = validity_warning(&pem, far).expect("expired by then");
        assert!(
            warning.contains("valid from") && warning.contains("clock"),
            "{warning}"
        );
        assert_eq!(validity_warning("garbage", SystemTime::now()), None);
    }

    /// The fingerprint is the one openssl shows for the same certificate.
    #[test]
    fn the_fingerprint_is_openssls() {
        let (pem, der, _) = ca("openshell-ca");
        let t = tempfile::tempdir().expect("tmp");
        let path = t.path().join("ca.crt");
        std::fs::write(&path, &pem).expect("write");
        let out = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(&path)
            .output();
        let Ok(out) = out else {
            eprintln!("skipped: no openssl");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let theirs = text.trim().rsplit('=').next().expect("value");
        assert_eq!(fingerprint(&der), format!("SHA256:{theirs}"));
    }

    /// As root, a configuration directory in a home another user owns is refused: the key
    /// never lands where that user could redirect it.
    #[test]
    fn as_root_a_config_directory_in_another_users_home_is_refused() {
        let t = tempfile::tempdir().expect("tmp");
        let Some(home) = crate::private_dir::home_of_another_user(t.path()) else {
            return;
        };
        let (ca_pem, _, issuer) = ca("openshell-ca");
        let (crt, key) = client(&issuer);
        let dir = home.join(".config/openshell/gateways/openshell-vm-default");
        let err = store(&dir, &ca_pem, &crt, &key).expect_err("refused");
        assert!(
            matches!(err, CredentialsError::Unsafe(_)) && err.to_string().contains("uid 65534"),
            "{err}"
        );
        assert!(!err.refused(), "the bundle was fine, its place was not");
        assert_eq!(std::fs::read_dir(&home).expect("ls").count(), 0);
    }

    /// A hostile guest's bundles: each refused with the reason, and nothing written.
    #[test]
    fn a_bundle_that_does_not_hold_together_is_refused_and_nothing_written() {
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path().join("g");
        let (ca_pem, _, issuer) = ca("openshell-ca");
        let (crt, key) = client(&issuer);
        let (_, other_key) = client(&issuer);
        let (other_ca, _, other_issuer) = ca("openshell-ca");
        let (foreign_crt, foreign_key) = client(&other_issuer);
        let huge = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            "A".repeat(MAX_PEM)
        );
        let two = format!("{ca_pem}{other_ca}");
        let garbage_body =
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n";
        type Check = fn(&CredentialsError) -> bool;
        let cases: Vec<(&str, &str, &str, Check)> = vec![
            ("garbage", &crt, &key, |e| {
                matches!(e, CredentialsError::NotPem { .. })
            }),
            (&ca_pem, &crt, &crt, |e| {
                matches!(
                    e,
                    CredentialsError::NotPem {
                        what: "client key",
                        ..
                    }
                )
            }),
            (&huge, &crt, &key, |e| {
                matches!(e, CredentialsError::NotPem { .. })
            }),
            (&two, &crt, &key, |e| {
                matches!(e, CredentialsError::Count { count: 2, .. })
            }),
            (garbage_body, &crt, &key, |e| {
                matches!(
                    e,
                    CredentialsError::Parse {
                        what: "CA certificate",
                        ..
                    }
                )
            }),
            (&crt, &crt, &key, |e| {
                matches!(e, CredentialsError::NotCa(_))
            }),
            (&ca_pem, &foreign_crt, &foreign_key, |e| {
                matches!(e, CredentialsError::NotFromCa(_))
            }),
            (&ca_pem, &crt, &other_key, |e| {
                matches!(e, CredentialsError::KeyMismatch)
            }),
        ];
        for (i, (ca, crt, key, want)) in cases.into_iter().enumerate() {
            let err = store(&dir, ca, crt, key).expect_err("refused");
            assert!(want(&err), "case {i}: {err}");
            assert!(err.refused(), "case {i}: {err}");
        }
        assert!(!dir.exists());
        store(&dir, &ca_pem, &crt, &key).expect("the consistent bundle");
    }
}
