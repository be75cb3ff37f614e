//! What the OpenShell CLI reads to find this gateway on its own: its registration
//! `$XDG_CONFIG_HOME/openshell/gateways/<gateway>/metadata.json` and the name of the gateway it
//! talks to, `$XDG_CONFIG_HOME/openshell/active_gateway`. The record has every field of the
//! CLI's `GatewayMetadata` under the CLI's names, with its defaults, so the CLI parses it as one
//! of its own (docs/host-cli.md names the upstream definition matched). Both files are replaced
//! atomically; a link in their place is replaced, never followed.

use std::path::{Path, PathBuf};

use openshell_shared::fsutil::write_atomic_mode;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("no configuration directory: set XDG_CONFIG_HOME or HOME")]
    NoConfigDir,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gateway metadata for {name}: {source}")]
    Json {
        name: String,
        source: serde_json::Error,
    },
}

/// The CLI's gateway record, field for field. The optional fields are left out when unset and
/// read as unset when missing, as the CLI does; `edge_*` also accept the CLI's older `cf_*`
/// names. A local VM gateway sets only the first four: no SSH host, mutual TLS (the CLI's
/// default, `auth_mode` unset), no edge proxy, no OIDC, and not the CLI's own VM driver.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayMetadata {
    pub name: String,
    /// `https://127.0.0.1:<forwarded port>`.
    pub gateway_endpoint: String,
    pub is_remote: bool,
    pub gateway_port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resolved_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_mode: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "cf_team_domain"
    )]
    pub edge_team_domain: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "cf_auth_url"
    )]
    pub edge_auth_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_audience: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_scopes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_driver_state_dir: Option<PathBuf>,
}

impl GatewayMetadata {
    /// A gateway on this machine, reached at the port forwarded to it.
    pub fn local(name: &str, port: u16) -> Self {
        Self {
            name: name.to_string(),
            gateway_endpoint: format!("https://127.0.0.1:{port}"),
            is_remote: false,
            gateway_port: port,
            ..Self::default()
        }
    }
}

/// `$XDG_CONFIG_HOME/openshell`, else `~/.config/openshell`: where the CLI keeps its gateways.
/// An empty `XDG_CONFIG_HOME` counts as unset (the XDG rule; the CLI would take it as the
/// current directory).
pub fn openshell_dir() -> Result<PathBuf, MetadataError> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .ok_or(MetadataError::NoConfigDir)?;
    Ok(base.join("openshell"))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MetadataError + '_ {
    move |source| MetadataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `gateway_dir/metadata.json` (the directory exists: the credentials made it), only
/// when its bytes change. Returns whether it wrote.
pub fn store(gateway_dir: &Path, meta: &GatewayMetadata) -> Result<bool, MetadataError> {
    let path = gateway_dir.join("metadata.json");
    let bytes = serde_json::to_vec_pretty(meta).map_err(|source| MetadataError::Json {
        name: meta.name.clone(),
        source,
    })?;
    if std::fs::read(&path).ok().as_deref() == Some(bytes.as_slice()) {
        return Ok(false);
    }
    write_atomic_mode(&path, &bytes, 0o644).map_err(io(&path))?;
    Ok(true)
}

/// Makes `name` the gateway the CLI talks to: `openshell_dir/active_gateway` holds the bare
/// name, as the CLI writes it. Returns whether it changed (another gateway was active).
pub fn activate(openshell_dir: &Path, name: &str) -> Result<bool, MetadataError> {
    let path = openshell_dir.join("active_gateway");
    let current = std::fs::read_to_string(&path).ok();
    if current.as_deref().map(str::trim) == Some(name) {
        return Ok(false);
    }
    write_atomic_mode(&path, name.as_bytes(), 0o644).map_err(io(&path))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CLI's own record for a local gateway, as its serializer writes it: ours is the same
    /// JSON, and the CLI's older and fuller records read back into ours.
    #[test]
    fn the_record_is_the_clis() {
        let meta = GatewayMetadata::local("openshell-vm-default", 30051);
        let json: serde_json::Value = serde_json::to_value(&meta).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "name": "openshell-vm-default",
                "gateway_endpoint": "https://127.0.0.1:30051",
                "is_remote": false,
                "gateway_port": 30051,
            })
        );
        let old: GatewayMetadata = serde_json::from_str(
            r#"{"name":"g","gateway_endpoint":"https://h:1","is_remote":true,"gateway_port":1,
                "remote_host":"u@h","cf_team_domain":"t.example","cf_auth_url":"https://a"}"#,
        )
        .expect("older record");
        assert_eq!(old.edge_team_domain.as_deref(), Some("t.example"));
        assert_eq!(old.edge_auth_url.as_deref(), Some("https://a"));
        let full = serde_json::json!({
            "name": "g", "gateway_endpoint": "https://h:1", "is_remote": true,
            "gateway_port": 1, "remote_host": "u@h", "resolved_host": "10.0.0.1",
            "auth_mode": "oidc", "edge_team_domain": "t", "edge_auth_url": "u",
            "oidc_issuer": "i", "oidc_client_id": "c", "oidc_audience": "a",
            "oidc_scopes": "s", "vm_driver_state_dir": "/v",
        });
        let parsed: GatewayMetadata = serde_json::from_value(full.clone()).expect("full");
        assert_eq!(serde_json::to_value(&parsed).expect("back"), full);
        let missing = serde_json::from_str::<GatewayMetadata>(r#"{"name":"g"}"#);
        assert!(missing.is_err(), "the four plain fields are required");
    }

    #[test]
    fn stored_once_then_unchanged_and_a_link_is_replaced_not_followed() {
        let t = tempfile::tempdir().expect("tmp");
        let meta = GatewayMetadata::local("openshell-vm-a", 30051);
        assert!(store(t.path(), &meta).expect("store"));
        assert!(!store(t.path(), &meta).expect("again"), "same bytes");
        let back: GatewayMetadata =
            serde_json::from_slice(&std::fs::read(t.path().join("metadata.json")).expect("read"))
                .expect("parse");
        assert_eq!(back, meta);

        let victim = t.path().join("victim");
        std::fs::write(&victim, "keep").expect("victim");
        std::os::unix::fs::symlink(&victim, t.path().join("active_gateway")).expect("link");
        assert!(activate(t.path(), "openshell-vm-a").expect("activate"));
        let active = t.path().join("active_gateway");
        assert!(std::fs::symlink_metadata(&active)
            .expect("meta")
            .file_type()
            .is_file());
        assert_eq!(
            std::fs::read_to_string(&active).expect("read"),
            "openshell-vm-a"
        );
        assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "keep");
        assert!(!activate(t.path(), "openshell-vm-a").expect("again"));
        // The CLI writes the bare name; one written with a newline is the same name.
        std::fs::write(&active, "openshell-vm-a\n").expect("newline");
        assert!(!activate(t.path(), "openshell-vm-a").expect("trimmed"));
        assert!(activate(t.path(), "openshell-vm-b").expect("switch"));
        assert_eq!(
            std::fs::read_to_string(&active).expect("read"),
            "openshell-vm-b"
        );
    }

    #[test]
    fn an_unwritable_directory_is_named() {
        let t = tempfile::tempdir().expect("tmp");
        let missing = t.path().join("no-such-dir");
        let err = activate(&missing, "g").expect_err("no directory");
        assert!(
            err.to_string()
                .contains(&missing.join("active_gateway").display().to_string()),
            "{err}"
        );
    }
}
