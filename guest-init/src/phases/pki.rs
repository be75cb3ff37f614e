//! The `pki` phase: the gateway's mutual-TLS material, and the manifest that hands it to
//! Kubernetes as Secrets. One phase for both, because the manifest is derived from the files
//! alone and must be in place before k3s reads `server/manifests`: a separate phase would only
//! add an ordering edge.
//!
//! It owns `/opt/openshell/pki/` (a CA, a server and a client certificate with their keys, and
//! the SSH handshake secret) and `server/manifests/openshell-tls-secrets.yaml`. Material is kept
//! across boots (clients trust the CA) and issued again only when a file is missing or does not
//! parse, a key does not match its certificate, a certificate is not signed by the current CA
//! or no longer has the names and usages it must have, or it expires within the configured
//! margin. A leaf is re-issued under the kept CA when only the leaf is at fault; a new CA
//! re-issues both leaves. Keys are created with mode 0600 in a 0700 directory and every file is
//! replaced atomically, so a crash leaves the previous file or the new one; a pair torn by a
//! crash between its two files fails the key check on the next boot and is issued again.
//!
//! The Secret manifest is rewritten every boot from the files (so a reset or a recreated
//! database gets the Secrets back) but only touched when its bytes change: k3s re-applies a
//! manifest whose file changed. A root filesystem without `/opt/openshell` (the base profile)
//! is not a gateway: the phase skips.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use openshell_shared::fsutil::write_atomic_mode;
use openshell_shared::GuestMessage;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use serde::Serialize;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};
use crate::k3s::paths::{K3S_MANIFESTS, TLS_SECRETS_MANIFEST};
use openshell_init::guest_path::under;

pub const PHASE: Phase = Phase {
    name: "pki",
    after: &["config", "state-disk"],
    fatal: false,
    waits: false,
    purpose: "keep or issue the gateway's CA, server and client certificates; write their Secrets",
    run,
};

pub const PKI_DIR: &str = "/opt/openshell/pki";
pub const SSH_SECRET: &str = "ssh-handshake-secret";
/// Lifetime of every certificate issued here.
pub const VALIDITY_DAYS: u64 = 3650;
/// Certificates start this long before issue, so a guest clock somewhat behind the host's
/// (the VM's clock starts from the RTC) does not make them "not yet valid" elsewhere.
const BACKDATE: Duration = Duration::from_secs(24 * 3600);
const NAMESPACE: &str = "openshell";

/// The server certificate's names: the gateway's Service from inside the cluster, and the
/// host's forwarded port from outside.
pub const SERVER_DNS_NAMES: &[&str] = &[
    "openshell",
    "openshell.openshell.svc",
    "openshell.openshell.svc.cluster.local",
    "localhost",
    "host.docker.internal",
];
pub const SERVER_IPS: &[std::net::IpAddr] = &[std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)];

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: not a directory (links are not followed)")]
    NotDir { path: PathBuf },
    #[error("{what}: cannot issue: {source}")]
    Issue {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("{what}: no random bytes: {reason}")]
    Random { what: &'static str, reason: String },
    #[error("{path}: cannot write YAML: {source}")]
    Serialize {
        path: PathBuf,
        source: serde_yaml::Error,
    },
}

/// The two leaves; the CA is handled on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    Server,
    Client,
}

impl Leaf {
    pub fn name(self) -> &'static str {
        match self {
            Leaf::Server => "server",
            Leaf::Client => "client",
        }
    }

    fn common_name(self) -> &'static str {
        match self {
            Leaf::Server => "openshell-server",
            Leaf::Client => "openshell-client",
        }
    }
}

/// What one run did: each item kept, or issued with the reason.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub issued: Vec<(&'static str, String)>,
    pub kept: Vec<&'static str>,
    pub manifest_written: bool,
}

impl Report {
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.issued.is_empty() {
            let issued: Vec<String> = self
                .issued
                .iter()
                .map(|(what, why)| format!("{what} ({why})"))
                .collect();
            parts.push(format!("issued {}", issued.join(", ")));
        }
        if !self.kept.is_empty() {
            parts.push(format!("kept {}", self.kept.join(", ")));
        }
        parts.push(format!(
            "secret manifest {}",
            if self.manifest_written {
                "written"
            } else {
                "unchanged"
            }
        ));
        parts.join("; ")
    }
}

/// Only a gateway root filesystem has this; elsewhere (the base profile) there is nothing to
/// secure and key generation would only cost boot time.
pub const GATEWAY_TREE: &str = "/opt/openshell";

fn run(ctx: &Ctx) -> PhaseResult {
    if !ctx.path(GATEWAY_TREE).is_dir() {
        return Ok(Done::Skipped(format!(
            "no {GATEWAY_TREE}: not a gateway root filesystem"
        )));
    }
    let days = u64::from(ctx.config().pki.renew_before_days);
    let margin = Duration::from_secs(days * 24 * 3600);
    let report = ensure(&ctx.root, margin, SystemTime::now())?;
    // The host stores the client bundle for the user's tools (issue: no exec-agent polling).
    let dir = ctx.path(PKI_DIR);
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| PkiError::Io {
            path,
            what: "read for the host",
            source,
        })
    };
    ctx.reporter.emit(GuestMessage::Credentials {
        ca_crt: read("ca.crt")?,
        client_crt: read("client.crt")?,
        client_key: read("client.key")?,
    });
    Ok(Done::Ok(Some(report.describe())))
}

/// Keeps or issues the PKI under `root` as of `now`, then writes the Secret manifest if its
/// content changed.
pub fn ensure(root: &Path, renew_before: Duration, now: SystemTime) -> Result<Report, PkiError> {
    let dir = under(root, PKI_DIR);
    private_dir(&dir)?;
    let mut report = Report::default();
    let check = Check { now, renew_before };

    // The CA: kept if sound, else a new one (and then new leaves).
    let ca_files = (dir.join("ca.crt"), dir.join("ca.key"));
    let kept_ca = load_pair(&ca_files.0, &ca_files.1).and_then(|(cert, key)| {
        check.cert(&cert, &key, None, None)?;
        let issuer = Issuer::from_ca_cert_pem(&cert, key)
            .map_err(|e| format!("cannot sign with it: {e}"))?;
        Ok((cert, issuer))
    });
    let (ca_pem, issuer, new_ca) = match kept_ca {
        Ok((cert, issuer)) => {
            report.kept.push("ca");
            fix_key_mode(&ca_files.1)?;
            (cert, issuer, false)
        }
        Err(why) => {
            let (cert, key, params) = issue_ca(now)?;
            write_key(&ca_files.1, &key.serialize_pem())?;
            write_cert(&ca_files.0, &cert)?;
            report.issued.push(("ca", why));
            (cert, Issuer::new(params, key), true)
        }
    };
    let ca_der = pem_to_der(&ca_pem).map_err(|reason| PkiError::Io {
        path: ca_files.0.clone(),
        what: "reading back the CA",
        source: std::io::Error::other(reason),
    })?;

    for leaf in [Leaf::Server, Leaf::Client] {
        let crt = dir.join(format!("{}.crt", leaf.name()));
        let key = dir.join(format!("{}.key", leaf.name()));
        let verdict = if new_ca {
            Err("new CA".to_string())
        } else {
            load_pair(&crt, &key)
                .and_then(|(cert, key)| check.cert(&cert, &key, Some(&ca_der), Some(leaf)))
        };
        match verdict {
            Ok(()) => {
                report.kept.push(leaf.name());
                fix_key_mode(&key)?;
            }
            Err(why) => {
                let not_before = now - BACKDATE;
                let not_after = now + Duration::from_secs(VALIDITY_DAYS * 24 * 3600);
                let (cert_pem, key_pem) = issue_leaf(leaf, &issuer, not_before, not_after)?;
                write_key(&key, &key_pem)?;
                write_cert(&crt, &cert_pem)?;
                report.issued.push((leaf.name(), why));
            }
        }
    }

    let secret_path = dir.join(SSH_SECRET);
    match read_private(&secret_path) {
        Ok(s) if is_handshake_secret(&s) => {
            report.kept.push("ssh secret");
            fix_key_mode(&secret_path)?;
        }
        other => {
            let why = match other {
                Ok(_) => "not 64 hex characters".to_string(),
                Err(e) => e,
            };
            let secret = hex(&random::<32>("ssh handshake secret")?);
            write_key(&secret_path, &secret)?;
            report.issued.push(("ssh secret", why));
        }
    }

    let manifest = secrets_manifest(&dir)?;
    let dest_dir = under(root, K3S_MANIFESTS);
    std::fs::create_dir_all(&dest_dir).map_err(|source| PkiError::Io {
        path: dest_dir.clone(),
        what: "cannot create",
        source,
    })?;
    let dest = dest_dir.join(TLS_SECRETS_MANIFEST);
    let current = read_private(&dest).ok();
    if current.as_deref() != Some(manifest.as_str()) {
        write_key(&dest, &manifest)?;
        report.manifest_written = true;
    } else {
        fix_key_mode(&dest)?;
    }
    Ok(report)
}

/// When a kept certificate is still good enough.
struct Check {
    now: SystemTime,
    renew_before: Duration,
}

impl Check {
    /// `issuer` is the CA's DER for a leaf, `None` for the self-signed CA itself. The error is
    /// the reason to issue again.
    fn cert(
        &self,
        pem: &str,
        key: &KeyPair,
        issuer: Option<&[u8]>,
        leaf: Option<Leaf>,
    ) -> Result<(), String> {
        let der = pem_to_der(pem)?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| format!("unparseable: {e}"))?;
        let now = unix(self.now);
        let validity = cert.validity();
        if validity.not_before.timestamp() > now {
            return Err("not yet valid".into());
        }
        let renew_at = validity
            .not_after
            .timestamp()
            .saturating_sub(self.renew_before.as_secs() as i64);
        if renew_at <= now {
            return Err(format!("expires {}", validity.not_after));
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err("key does not match the certificate".into());
        }
        match issuer {
            None => {
                if !cert.is_ca() {
                    return Err("not a CA".into());
                }
                cert.verify_signature(None)
                    .map_err(|_| "not self-signed".to_string())?;
            }
            Some(ca_der) => {
                let (_, ca) = X509Certificate::from_der(ca_der)
                    .map_err(|e| format!("CA unparseable: {e}"))?;
                cert.verify_signature(Some(ca.public_key()))
                    .map_err(|_| "not signed by the current CA".to_string())?;
            }
        }
        if let Some(leaf) = leaf {
            let cn = cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok());
            if cn != Some(leaf.common_name()) {
                return Err(format!("common name {cn:?}"));
            }
            let eku = cert
                .extended_key_usage()
                .ok()
                .flatten()
                .map(|e| (e.value.server_auth, e.value.client_auth));
            let wanted = match leaf {
                Leaf::Server => (true, false),
                Leaf::Client => (false, true),
            };
            if eku != Some(wanted) {
                return Err("extended key usage differs".into());
            }
            if leaf == Leaf::Server && server_names(&cert) != expected_server_names() {
                return Err("subject alternative names differ".into());
            }
        }
        Ok(())
    }
}

/// The server certificate's names as strings (IP addresses in their usual notation), sorted.
pub fn server_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::DNSName(d) => (*d).to_string(),
                    GeneralName::IPAddress(b) => match <[u8; 4]>::try_from(*b) {
                        Ok(v4) => std::net::Ipv4Addr::from(v4).to_string(),
                        Err(_) => format!("{b:?}"),
                    },
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn expected_server_names() -> Vec<String> {
    let mut names: Vec<String> = SERVER_DNS_NAMES
        .iter()
        .map(|s| s.to_string())
        .chain(SERVER_IPS.iter().map(|ip| ip.to_string()))
        .collect();
    names.sort();
    names
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("unparseable: {e}"))?;
    if pem.label != "CERTIFICATE" {
        return Err(format!("unparseable: PEM holds {}", pem.label));
    }
    Ok(pem.contents)
}

fn load_pair(crt: &Path, key: &Path) -> Result<(String, KeyPair), String> {
    let cert = read_private(crt)?;
    let key_pem = read_private(key)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| format!("key unparseable: {e}"))?;
    Ok((cert, key))
}

fn random<const N: usize>(what: &'static str) -> Result<[u8; N], PkiError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| PkiError::Random {
        what,
        reason: e.to_string(),
    })?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_handshake_secret(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Common parameters: a random positive serial (the first byte's top bit clear, the next set
/// so the encoding keeps its length) and the validity window.
fn params(
    what: &'static str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, PkiError> {
    let mut serial = random::<16>(what)?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    let mut p = CertificateParams::default();
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    p.not_before = not_before.into();
    p.not_after = not_after.into();
    p.distinguished_name = rcgen::DistinguishedName::new();
    Ok(p)
}

/// A new self-signed CA (EC P-256): its PEM certificate, key and the parameters to sign with.
pub fn issue_ca(now: SystemTime) -> Result<(String, KeyPair, CertificateParams), PkiError> {
    let err = |source| PkiError::Issue { what: "ca", source };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut p = params(
        "ca",
        now - BACKDATE,
        now + Duration::from_secs(VALIDITY_DAYS * 24 * 3600),
    )?;
    p.distinguished_name
        .push(DnType::OrganizationName, "openshell");
    p.distinguished_name
        .push(DnType::CommonName, "openshell-ca");
    // It signs the two leaves and nothing that signs further.
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key, p))
}

/// A new leaf signed by `issuer`: its PEM certificate and PEM key.
pub fn issue_leaf(
    leaf: Leaf,
    issuer: &Issuer<'_, KeyPair>,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(String, String), PkiError> {
    let err = |source| PkiError::Issue {
        what: leaf.name(),
        source,
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut p = params(leaf.name(), not_before, not_after)?;
    p.distinguished_name
        .push(DnType::CommonName, leaf.common_name());
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    match leaf {
        Leaf::Server => {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            for name in SERVER_DNS_NAMES {
                let dns = (*name).try_into().map_err(err)?;
                p.subject_alt_names.push(rcgen::SanType::DnsName(dns));
            }
            for ip in SERVER_IPS {
                p.subject_alt_names.push(rcgen::SanType::IpAddress(*ip));
            }
        }
        Leaf::Client => p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
    }
    let cert = p.signed_by(&key, issuer).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A Kubernetes object of the Secret manifest; `data` values are base64 as the API wants.
#[derive(Serialize)]
struct Object {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    secret_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<BTreeMap<&'static str, String>>,
}

#[derive(Serialize)]
struct Metadata {
    name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'static str>,
}

/// The manifest k3s applies: the `openshell` Namespace and the four Secrets the gateway chart
/// mounts, built from the files in `dir`.
pub fn secrets_manifest(dir: &Path) -> Result<String, PkiError> {
    let read = |name: &str| -> Result<String, PkiError> {
        let path = dir.join(name);
        read_private(&path).map_err(|reason| PkiError::Io {
            path,
            what: "reading for the Secret manifest",
            source: std::io::Error::other(reason),
        })
    };
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let (ca, server_crt, server_key) = (read("ca.crt")?, read("server.crt")?, read("server.key")?);
    let (client_crt, client_key) = (read("client.crt")?, read("client.key")?);
    let ssh = read(SSH_SECRET)?;
    let secret = |name, secret_type, data: &[(&'static str, &str)]| Object {
        api_version: "v1",
        kind: "Secret",
        metadata: Metadata {
            name,
            namespace: Some(NAMESPACE),
        },
        secret_type: Some(secret_type),
        data: Some(data.iter().map(|(k, v)| (*k, b64(v))).collect()),
    };
    let objects = [
        Object {
            api_version: "v1",
            kind: "Namespace",
            metadata: Metadata {
                name: NAMESPACE,
                namespace: None,
            },
            secret_type: None,
            data: None,
        },
        secret(
            "openshell-server-tls",
            "kubernetes.io/tls",
            &[("tls.crt", &server_crt), ("tls.key", &server_key)],
        ),
        secret("openshell-server-client-ca", "Opaque", &[("ca.crt", &ca)]),
        secret(
            "openshell-client-tls",
            "Opaque",
            &[
                ("tls.crt", &client_crt),
                ("tls.key", &client_key),
                ("ca.crt", &ca),
            ],
        ),
        secret("openshell-ssh-handshake", "Opaque", &[("secret", &ssh)]),
    ];
    let mut out = String::new();
    for object in &objects {
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(
            &serde_yaml::to_string(object).map_err(|source| PkiError::Serialize {
                path: dir.join(TLS_SECRETS_MANIFEST),
                source,
            })?,
        );
    }
    Ok(out)
}

/// Creates `dir` with mode 0700, or tightens an existing one; a link in its place is refused.
fn private_dir(dir: &Path) -> Result<(), PkiError> {
    let io = |what, source| PkiError::Io {
        path: dir.to_path_buf(),
        what,
        source,
    };
    match dir.symlink_metadata() {
        Ok(m) if !m.is_dir() => {
            return Err(PkiError::NotDir {
                path: dir.to_path_buf(),
            })
        }
        Ok(_) => {}
        Err(_) => std::fs::create_dir_all(dir).map_err(|e| io("cannot create", e))?,
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("cannot set mode 0700", e))
}

/// Reads a UTF-8 file without following a link in its place; the error is a reason to
/// regenerate it.
fn read_private(path: &Path) -> Result<String, String> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "missing".to_string(),
            _ => format!("unreadable: {e}"),
        })?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("unreadable: {e}"))?;
    Ok(text)
}

fn write_key(path: &Path, text: &str) -> Result<(), PkiError> {
    write_atomic_mode(path, text.as_bytes(), 0o600).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        what: "cannot write",
        source,
    })
}

fn write_cert(path: &Path, text: &str) -> Result<(), PkiError> {
    write_atomic_mode(path, text.as_bytes(), 0o644).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        what: "cannot write",
        source,
    })
}

/// A kept secret file gets mode 0600 back if something widened it.
fn fix_key_mode(path: &Path) -> Result<(), PkiError> {
    let meta = path.symlink_metadata().map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        what: "cannot stat",
        source,
    })?;
    if meta.permissions().mode() & 0o777 != 0o600 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| PkiError::Io {
                path: path.to_path_buf(),
                what: "cannot set mode 0600",
                source,
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_yaml::Value;

    const MARGIN: Duration = Duration::from_secs(30 * 24 * 3600);
    const FILES: &[&str] = &[
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
        SSH_SECRET,
    ];

    fn pki(root: &Path) -> PathBuf {
        root.join("opt/openshell/pki")
    }

    fn manifest(root: &Path) -> PathBuf {
        root.join("var/lib/rancher/k3s/server/manifests")
            .join(TLS_SECRETS_MANIFEST)
    }

    fn parse(pem: &str) -> X509Certificate<'static> {
        let der = pem_to_der(pem).expect("pem");
        let der: &'static [u8] = Box::leak(der.into_boxed_slice());
        X509Certificate::from_der(der).expect("x509").1
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).expect("read")
    }

    /// Every file's bytes and mtime, after setting the mtimes an hour back so that a rewrite
    /// within the same clock tick still shows.
    fn snapshot(root: &Path) -> Vec<(Vec<u8>, SystemTime)> {
        let mut paths: Vec<PathBuf> = FILES.iter().map(|f| pki(root).join(f)).collect();
        paths.push(manifest(root));
        paths
            .iter()
            .map(|p| {
                let meta = std::fs::metadata(p).expect("meta");
                (
                    std::fs::read(p).expect("read"),
                    meta.modified().expect("mtime"),
                )
            })
            .collect()
    }

    fn age_all(root: &Path) {
        let old = SystemTime::now() - Duration::from_secs(3600);
        let mut paths: Vec<PathBuf> = FILES.iter().map(|f| pki(root).join(f)).collect();
        paths.push(manifest(root));
        for p in paths {
            let f = std::fs::File::options().write(true).open(&p).expect("open");
            f.set_modified(old).expect("mtime");
        }
    }

    #[test]
    fn fresh_pki_has_the_right_names_usages_and_signatures() {
        let t = tempfile::tempdir().expect("tmp");
        let report = ensure(t.path(), MARGIN, SystemTime::now()).expect("ensure");
        assert_eq!(report.issued.len(), 4, "{}", report.describe());
        assert!(report.manifest_written);
        let dir = pki(t.path());
        let ca = parse(&read(&dir.join("ca.crt")));
        let server = parse(&read(&dir.join("server.crt")));
        let client = parse(&read(&dir.join("client.crt")));

        assert!(ca.is_ca());
        assert_eq!(ca.subject().to_string(), "O=openshell, CN=openshell-ca");
        assert!(ca.verify_signature(None).is_ok());
        let ten_years = (VALIDITY_DAYS * 24 * 3600) as i64;
        let lifetime = ca.validity().not_after.timestamp() - ca.validity().not_before.timestamp();
        assert!(lifetime >= ten_years, "{lifetime}");

        for (cert, cn) in [(&server, "openshell-server"), (&client, "openshell-client")] {
            assert_eq!(cert.subject().to_string(), format!("CN={cn}"));
            assert_eq!(cert.issuer(), ca.subject());
            assert!(cert.verify_signature(Some(ca.public_key())).is_ok());
            assert!(!cert.is_ca());
            let ku = cert.key_usage().expect("ku").expect("present").value;
            assert!(ku.digital_signature() && !ku.key_cert_sign());
            let bc = cert
                .basic_constraints()
                .expect("bc")
                .expect("present")
                .value;
            assert!(!bc.ca);
        }
        let eku = |c: &X509Certificate| {
            let e = c.extended_key_usage().expect("eku").expect("present").value;
            (e.server_auth, e.client_auth)
        };
        assert_eq!(eku(&server), (true, false));
        assert_eq!(eku(&client), (false, true));
        assert_eq!(
            server_names(&server),
            [
                "127.0.0.1",
                "host.docker.internal",
                "localhost",
                "openshell",
                "openshell.openshell.svc",
                "openshell.openshell.svc.cluster.local"
            ]
        );
        let secret = read(&dir.join(SSH_SECRET));
        assert!(is_handshake_secret(&secret), "{secret}");
    }

    #[test]
    fn openssl_accepts_the_chain_for_its_purposes() {
        if std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_err()
        {
            eprintln!("openssl not installed: chain checked with x509-parser only");
            return;
        }
        let t = tempfile::tempdir().expect("tmp");
        ensure(t.path(), MARGIN, SystemTime::now()).expect("ensure");
        let dir = pki(t.path());
        for (cert, purpose, ok) in [
            ("server.crt", "sslserver", true),
            ("client.crt", "sslclient", true),
            ("client.crt", "sslserver", false),
        ] {
            let out = std::process::Command::new("openssl")
                .args(["verify", "-purpose", purpose, "-CAfile"])
                .arg(dir.join("ca.crt"))
                .arg(dir.join(cert))
                .output()
                .expect("openssl");
            assert_eq!(
                out.status.success(),
                ok,
                "{cert} as {purpose}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn modes_are_private() {
        let t = tempfile::tempdir().expect("tmp");
        ensure(t.path(), MARGIN, SystemTime::now()).expect("ensure");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        let dir = pki(t.path());
        assert_eq!(mode(&dir), 0o700);
        for f in ["ca.key", "server.key", "client.key", SSH_SECRET] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        assert_eq!(mode(&manifest(t.path())), 0o600, "the manifest holds keys");
        // A widened key is tightened again on the next boot, without being reissued.
        std::fs::set_permissions(
            dir.join("server.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        let report = ensure(t.path(), MARGIN, SystemTime::now()).expect("again");
        assert!(report.issued.is_empty(), "{}", report.describe());
        assert_eq!(mode(&dir.join("server.key")), 0o600);
    }

    #[test]
    fn second_run_rewrites_nothing() {
        let t = tempfile::tempdir().expect("tmp");
        ensure(t.path(), MARGIN, SystemTime::now()).expect("first");
        age_all(t.path());
        let before = snapshot(t.path());
        let report = ensure(t.path(), MARGIN, SystemTime::now()).expect("second");
        assert_eq!(
            report.describe(),
            "kept ca, server, client, ssh secret; secret manifest unchanged"
        );
        assert_eq!(snapshot(t.path()), before);
    }

    #[test]
    fn corrupt_leaf_is_reissued_under_the_kept_ca() {
        let t = tempfile::tempdir().expect("tmp");
        ensure(t.path(), MARGIN, SystemTime::now()).expect("first");
        let dir = pki(t.path());
        let ca_before = read(&dir.join("ca.crt"));
        let client_before = read(&dir.join("client.crt"));
        std::fs::write(
            dir.join("server.crt"),
            "-----BEGIN CERTIFICATE-----\ngarbage\n",
        )
        .expect("corrupt");
        let report = ensure(t.path(), MARGIN, SystemTime::now()).expect("again");
        assert_eq!(report.issued.len(), 1, "{}", report.describe());
        assert_eq!(report.issued[0].0, "server");
        assert!(
            report.issued[0].1.contains("unparseable"),
            "{:?}",
            report.issued
        );
        assert!(report.manifest_written);
        assert_eq!(read(&dir.join("ca.crt")), ca_before);
        assert_eq!(read(&dir.join("client.crt")), client_before);
        let ca = parse(&ca_before);
        let server = parse(&read(&dir.join("server.crt")));
        assert!(server.verify_signature(Some(ca.public_key())).is_ok());
    }

    #[test]
    fn expiring_leaf_and_mismatched_key_are_reissued() {
        let t = tempfile::tempdir().expect("tmp");
        let now = SystemTime::now();
        ensure(t.path(), MARGIN, now).expect("first");
        let dir = pki(t.path());
        let ca_pem = read(&dir.join("ca.crt"));
        let ca_key = KeyPair::from_pem(&read(&dir.join("ca.key"))).expect("ca key");
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
        // A server certificate that ends within the margin (ten days from now).
        let (cert, key) = issue_leaf(
            Leaf::Server,
            &issuer,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(10 * 24 * 3600),
        )
        .expect("issue");
        std::fs::write(dir.join("server.crt"), cert).expect("write");
        std::fs::write(dir.join("server.key"), key).expect("write");
        // And a client key that belongs to another certificate.
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        std::fs::write(dir.join("client.key"), other.serialize_pem()).expect("write");

        let report = ensure(t.path(), MARGIN, now).expect("again");
        let issued: Vec<_> = report.issued.iter().map(|(w, _)| *w).collect();
        assert_eq!(issued, ["server", "client"], "{}", report.describe());
        assert!(
            report.issued[0].1.starts_with("expires"),
            "{:?}",
            report.issued
        );
        assert!(
            report.issued[1].1.contains("key does not match"),
            "{:?}",
            report.issued
        );
        assert_eq!(read(&dir.join("ca.crt")), ca_pem);
        let server = parse(&read(&dir.join("server.crt")));
        let left = server.validity().not_after.timestamp() - unix(now);
        assert!(left > 3000 * 24 * 3600, "fresh certificate: {left}");
        // With no margin, a ten-day certificate would have been kept.
        let t2 = tempfile::tempdir().expect("tmp");
        ensure(t2.path(), MARGIN, now).expect("first");
        let dir2 = pki(t2.path());
        let issuer2 = Issuer::from_ca_cert_pem(
            &read(&dir2.join("ca.crt")),
            KeyPair::from_pem(&read(&dir2.join("ca.key"))).expect("key"),
        )
        .expect("issuer");
        let (cert, key) = issue_leaf(
            Leaf::Server,
            &issuer2,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(10 * 24 * 3600),
        )
        .expect("issue");
        std::fs::write(dir2.join("server.crt"), cert).expect("write");
        std::fs::write(dir2.join("server.key"), key).expect("write");
        let kept = ensure(t2.path(), Duration::ZERO, now).expect("again");
        assert!(kept.issued.is_empty(), "{}", kept.describe());
    }

    #[test]
    fn expired_ca_reissues_everything() {
        let t = tempfile::tempdir().expect("tmp");
        let now = SystemTime::now();
        ensure(t.path(), MARGIN, now).expect("first");
        let dir = pki(t.path());
        let before: Vec<String> = ["ca.crt", "server.crt", "client.crt", SSH_SECRET]
            .iter()
            .map(|f| read(&dir.join(f)))
            .collect();
        let later = now + Duration::from_secs(11 * 365 * 24 * 3600);
        let report = ensure(t.path(), MARGIN, later).expect("later");
        let issued: Vec<_> = report.issued.iter().map(|(w, _)| *w).collect();
        assert_eq!(issued, ["ca", "server", "client"], "{}", report.describe());
        assert_eq!(report.issued[1].1, "new CA");
        assert_eq!(report.kept, ["ssh secret"]);
        for (f, old) in ["ca.crt", "server.crt", "client.crt"].iter().zip(&before) {
            assert_ne!(&read(&dir.join(f)), old, "{f}");
        }
        assert_eq!(read(&dir.join(SSH_SECRET)), before[3]);
        let ca = parse(&read(&dir.join("ca.crt")));
        let server = parse(&read(&dir.join("server.crt")));
        assert!(server.verify_signature(Some(ca.public_key())).is_ok());
    }

    #[test]
    fn secret_manifest_has_the_five_documents_with_the_files_in_base64() {
        let t = tempfile::tempdir().expect("tmp");
        ensure(t.path(), MARGIN, SystemTime::now()).expect("ensure");
        let dir = pki(t.path());
        let text = read(&manifest(t.path()));
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).expect("yaml"))
            .collect();
        assert_eq!(docs.len(), 5);
        assert_eq!(docs[0]["kind"], "Namespace");
        assert_eq!(docs[0]["metadata"]["name"], "openshell");
        let decode = |v: &Value| {
            let b = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().expect("string"))
                .expect("base64");
            String::from_utf8(b).expect("utf8")
        };
        /// (Secret, type, [(data key, PKI file)])
        type Expected<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
        let expected: [Expected; 4] = [
            (
                "openshell-server-tls",
                "kubernetes.io/tls",
                &[("tls.crt", "server.crt"), ("tls.key", "server.key")],
            ),
            (
                "openshell-server-client-ca",
                "Opaque",
                &[("ca.crt", "ca.crt")],
            ),
            (
                "openshell-client-tls",
                "Opaque",
                &[
                    ("tls.crt", "client.crt"),
                    ("tls.key", "client.key"),
                    ("ca.crt", "ca.crt"),
                ],
            ),
            (
                "openshell-ssh-handshake",
                "Opaque",
                &[("secret", SSH_SECRET)],
            ),
        ];
        for (doc, (name, kind, data)) in docs[1..].iter().zip(expected) {
            assert_eq!(doc["kind"], "Secret");
            assert_eq!(doc["metadata"]["name"], name);
            assert_eq!(doc["metadata"]["namespace"], "openshell");
            assert_eq!(doc["type"], kind);
            let map = doc["data"].as_mapping().expect("data");
            assert_eq!(map.len(), data.len(), "{name}");
            for (key, file) in data {
                assert_eq!(
                    decode(&doc["data"][*key]),
                    read(&dir.join(file)),
                    "{name}/{key}"
                );
            }
        }
    }

    #[test]
    fn links_are_replaced_not_followed() {
        let t = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("outside");
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "precious").expect("write");
        let dir = pki(t.path());
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::os::unix::fs::symlink(&victim, dir.join("ca.key")).expect("link");
        let report = ensure(t.path(), MARGIN, SystemTime::now()).expect("ensure");
        assert_eq!(report.issued[0].0, "ca");
        assert!(dir
            .join("ca.key")
            .symlink_metadata()
            .expect("meta")
            .is_file());
        assert_eq!(read(&victim), "precious");
        // A link in place of the directory is refused.
        let t2 = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(t2.path().join("opt/openshell")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), pki(t2.path())).expect("link");
        let err = ensure(t2.path(), MARGIN, SystemTime::now()).unwrap_err();
        assert!(matches!(err, PkiError::NotDir { .. }), "{err}");
    }
}
