//! The `manifests` phase: the Kubernetes manifests and Helm charts the root filesystem bundles,
//! deployed into k3s's auto-deploy directories before k3s starts, on every boot (so a reset or
//! a recreated database gets them back).
//!
//! It owns the files named like ours in `server/manifests` (`openshell-*.yaml`, `agent-*.yaml`)
//! except the TLS Secret manifest the `pki` phase writes; k3s's packaged components and anything
//! else there are never touched. A file is replaced (atomically) only when its bytes change:
//! k3s redeploys a manifest whose file changed, so an unchanged file keeps its mtime. Links are
//! never followed, neither in the bundle nor at the destination.
//!
//! Patching is structural (YAML parsed, values set, YAML written), never text substitution:
//! every `__PLACEHOLDER__` scalar is filled from [`placeholder_table`], which takes its values
//! from the typed `manifests.gateway` configuration the rootfs build also uses ([`render`] is
//! the one function both call), so build-time and boot-time values cannot drift. A placeholder
//! left over, or a file that does not parse, is an error naming the file, and that file's
//! deployed copy is left as it was.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use openshell_init::guest_path::under;
use openshell_shared::config::HelmValues;
use openshell_shared::fsutil::write_atomic;
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};
use crate::k3s::paths::{K3S_CHARTS, K3S_MANIFESTS, TLS_SECRETS_MANIFEST};

pub const PHASE: Phase = Phase {
    name: "manifests",
    after: &["config", "state-disk"],
    fatal: false,
    waits: false,
    purpose: "deploy the bundled manifests and charts for k3s, HelmChart values from the config",
    run,
};

pub const BUNDLED_MANIFESTS: &str = "/opt/openshell/manifests";
pub const BUNDLED_CHARTS: &str = "/opt/openshell/charts";
/// Name prefixes of the deployed manifests this phase owns.
const OWNED_PREFIXES: &[&str] = &["openshell-", "agent-"];
/// A mapping entry or list item whose value holds this is dropped, not filled: the chart's
/// checksum annotation exists to force a redeploy, which a pre-deployed release must not get.
pub const CHART_CHECKSUM: &str = "__CHART_CHECKSUM__";
/// Files whose workloads are moved from the host network to pod networking (kube-proxy makes
/// `kubernetes.default.svc` reachable from pods, and host ports belong to k3s).
const POD_NETWORK_FILES: &[&str] = &["agent-sandbox.yaml"];

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a regular file (links are not followed); not deployed")]
    NotRegular { path: PathBuf },
    #[error("{path}: line {line}: {reason}; not deployed")]
    Malformed {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: `{field}` line {line}: {reason}; not deployed")]
    MalformedValues {
        path: PathBuf,
        field: &'static str,
        line: usize,
        reason: String,
    },
    #[error("{path}: placeholder {placeholder} at `{at}` has no value; not deployed")]
    Placeholder {
        path: PathBuf,
        placeholder: String,
        at: String,
    },
    #[error("{path}: cannot write YAML: {source}")]
    Serialize {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot remove: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One run's failures; the files they name were not deployed, the rest were.
#[derive(Debug, thiserror::Error)]
#[error("{} file(s) not deployed ({summary}): {}", errors.len(), errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct DeployFailed {
    pub summary: String,
    pub errors: Vec<ManifestError>,
}

/// What one run did.
#[derive(Debug, Default)]
pub struct Report {
    pub manifests_unchanged: usize,
    pub manifests_written: usize,
    pub manifests_removed: usize,
    pub charts_unchanged: usize,
    pub charts_written: usize,
    /// Files not deployed; their previous deployed copies, if any, are untouched.
    pub failed: Vec<ManifestError>,
}

impl Report {
    pub fn describe(&self) -> String {
        format!(
            "{} manifests unchanged, {} written, {} removed; {} charts unchanged, {} written",
            self.manifests_unchanged,
            self.manifests_written,
            self.manifests_removed,
            self.charts_unchanged,
            self.charts_written
        )
    }
}

fn run(ctx: &Ctx) -> PhaseResult {
    if !ctx.path(BUNDLED_MANIFESTS).is_dir() && !ctx.path(BUNDLED_CHARTS).is_dir() {
        return Ok(Done::Skipped(format!(
            "no {BUNDLED_MANIFESTS} or {BUNDLED_CHARTS} in this root filesystem"
        )));
    }
    let mut report = deploy(&ctx.root, &ctx.config().manifests.gateway)?;
    if report.failed.is_empty() {
        Ok(Done::Ok(Some(report.describe())))
    } else {
        Err(Box::new(DeployFailed {
            summary: report.describe(),
            errors: std::mem::take(&mut report.failed),
        }))
    }
}

/// Deploys the bundle under `root`. Per-file problems are collected in [`Report::failed`] so one
/// bad file does not keep the others from deploying; the error is for what stops everything.
pub fn deploy(root: &Path, values: &HelmValues) -> Result<Report, ManifestError> {
    let mut report = Report::default();

    let (dest, src) = (under(root, K3S_MANIFESTS), under(root, BUNDLED_MANIFESTS));
    let bundled = list_bundle(&src, ".yaml", &mut report.failed)?;
    if !bundled.is_empty() {
        ensure_dir(&dest)?;
    }
    for name in &bundled {
        let path = src.join(name);
        let rendered = read_regular(&path).and_then(|bytes| render(name, &path, &bytes, values));
        match rendered.and_then(|bytes| install(&dest.join(name), &bytes)) {
            Ok(true) => report.manifests_written += 1,
            Ok(false) => report.manifests_unchanged += 1,
            Err(e) => report.failed.push(e),
        }
    }
    report.manifests_removed = remove_stale(&dest, &bundled)?;

    let (dest, src) = (under(root, K3S_CHARTS), under(root, BUNDLED_CHARTS));
    let charts = list_bundle(&src, ".tgz", &mut report.failed)?;
    if !charts.is_empty() {
        ensure_dir(&dest)?;
    }
    for name in &charts {
        let path = src.join(name);
        match read_regular(&path).and_then(|bytes| install(&dest.join(name), &bytes)) {
            Ok(true) => report.charts_written += 1,
            Ok(false) => report.charts_unchanged += 1,
            Err(e) => report.failed.push(e),
        }
    }
    Ok(report)
}

/// The value each placeholder of the bundled manifests gets. A placeholder is a whole YAML
/// scalar and is replaced by a typed value (string, bool or number), so `"false"` and `false`
/// cannot be confused. The OIDC placeholders have no configuration yet: they get empty strings,
/// which the gateway reads as "OIDC off" (it then relies on mTLS, as the VM always has).
pub fn placeholder_table(v: &HelmValues) -> Vec<(&'static str, Value)> {
    let s = |x: &str| Value::String(x.to_string());
    vec![
        ("__IMAGE_PULL_POLICY__", s(v.image_pull_policy.as_str())),
        (
            "__SANDBOX_IMAGE_PULL_POLICY__",
            s(v.sandbox_image_pull_policy.as_str()),
        ),
        ("__DB_URL__", s(&v.db_url)),
        ("__SSH_GATEWAY_HOST__", s(&v.ssh_gateway_host)),
        ("__SSH_GATEWAY_PORT__", Value::from(v.ssh_gateway_port)),
        (
            "__DISABLE_GATEWAY_AUTH__",
            Value::Bool(v.disable_gateway_auth),
        ),
        ("__DISABLE_TLS__", Value::Bool(v.disable_tls)),
        ("__HOST_GATEWAY_IP__", s(&v.host_gateway_ip)),
        ("__OIDC_ISSUER__", s("")),
        ("__OIDC_AUDIENCE__", s("")),
        ("__OIDC_CLIENT_ID__", s("")),
        ("__OIDC_ROLES_CLAIM__", s("")),
    ]
}

/// The deployed bytes of bundled manifest `name` (read from `path`, which only names it in
/// errors). A file that needs no change is deployed byte for byte, comments included; a patched
/// one is written back from its parsed form, deterministically, so the same values give the
/// same bytes at build time and at boot.
pub fn render(
    name: &str,
    path: &Path,
    bytes: &[u8],
    values: &HelmValues,
) -> Result<Vec<u8>, ManifestError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ManifestError::Malformed {
        path: path.to_path_buf(),
        line: 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        reason: "not UTF-8".into(),
    })?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).map_err(|e| ManifestError::Malformed {
            path: path.to_path_buf(),
            line: e.location().map_or(0, |l| l.line()),
            reason: e.to_string(),
        })?;
        docs.push(value);
    }
    let table = placeholder_table(values);
    let mut changed = false;
    for doc in &mut docs {
        // The values first: they are one string, which the document-wide pass must not see.
        if is_helm_chart(doc) {
            changed |= patch_helm_values(doc, path, &table, values)?;
        }
        changed |= fill(doc, &table);
        if POD_NETWORK_FILES.contains(&name) {
            changed |= pod_networking(doc);
        }
        let mut at = Vec::new();
        if let Some((placeholder, at)) = leftover(doc, &mut at) {
            return Err(ManifestError::Placeholder {
                path: path.to_path_buf(),
                placeholder,
                at,
            });
        }
    }
    if !changed {
        return Ok(bytes.to_vec());
    }
    let mut out = String::new();
    for doc in docs.iter().filter(|d| !d.is_null()) {
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&to_yaml(doc, path)?);
    }
    Ok(out.into_bytes())
}

fn to_yaml(value: &Value, path: &Path) -> Result<String, ManifestError> {
    serde_yaml::to_string(value).map_err(|source| ManifestError::Serialize {
        path: path.to_path_buf(),
        source,
    })
}

fn is_helm_chart(doc: &Value) -> bool {
    doc.get("kind").and_then(Value::as_str) == Some("HelmChart")
        && doc
            .get("apiVersion")
            .and_then(Value::as_str)
            .is_some_and(|v| v.starts_with("helm.cattle.io/"))
}

/// Fills the chart's `spec.valuesContent` (YAML inside a string) and applies the image
/// overrides by key, never by pattern.
fn patch_helm_values(
    doc: &mut Value,
    path: &Path,
    table: &[(&'static str, Value)],
    values: &HelmValues,
) -> Result<bool, ManifestError> {
    let Some(content) = doc.get_mut("spec").and_then(|s| s.get_mut("valuesContent")) else {
        return Ok(false);
    };
    let Some(text) = content.as_str() else {
        return Err(ManifestError::MalformedValues {
            path: path.to_path_buf(),
            field: "spec.valuesContent",
            line: 0,
            reason: "is not a string".into(),
        });
    };
    let mut parsed: Value =
        serde_yaml::from_str(text).map_err(|e| ManifestError::MalformedValues {
            path: path.to_path_buf(),
            field: "spec.valuesContent",
            line: e.location().map_or(0, |l| l.line()),
            reason: e.to_string(),
        })?;
    let mut changed = fill(&mut parsed, table);
    for (key, wanted) in [
        ("repository", &values.image_repository),
        ("tag", &values.image_tag),
    ] {
        if let Some(wanted) = wanted {
            changed |= set_path(&mut parsed, &["image", key], Value::String(wanted.clone()));
        }
    }
    if let Some((placeholder, at)) = leftover(&parsed, &mut vec!["spec.valuesContent".into()]) {
        return Err(ManifestError::Placeholder {
            path: path.to_path_buf(),
            placeholder,
            at,
        });
    }
    if changed {
        *content = Value::String(to_yaml(&parsed, path)?);
    }
    Ok(changed)
}

/// Sets `keys` (mappings created as needed) to `value`; true when something changed.
fn set_path(v: &mut Value, keys: &[&str], value: Value) -> bool {
    let Some((first, rest)) = keys.split_first() else {
        let changed = *v != value;
        *v = value;
        return changed;
    };
    if !v.is_mapping() {
        *v = Value::Mapping(Mapping::new());
    }
    let Some(map) = v.as_mapping_mut() else {
        return false;
    };
    let key = Value::String((*first).to_string());
    if !map.contains_key(&key) {
        map.insert(key.clone(), Value::Null);
    }
    match map.get_mut(&key) {
        Some(child) => set_path(child, rest, value),
        None => false,
    }
}

/// Replaces every scalar that is exactly a known placeholder and drops entries holding the
/// chart checksum; true when something changed.
fn fill(v: &mut Value, table: &[(&'static str, Value)]) -> bool {
    // One-line values only: a block of text that mentions the checksum is not an annotation.
    let holds_checksum = |v: &Value| {
        v.as_str()
            .is_some_and(|s| s.contains(CHART_CHECKSUM) && !s.contains('\n'))
    };
    let mut changed = false;
    match v {
        Value::String(s) => {
            if let Some((_, value)) = table.iter().find(|(p, _)| p == s) {
                *v = value.clone();
                changed = true;
            }
        }
        Value::Mapping(map) => {
            let before = map.len();
            map.retain(|_, value| !holds_checksum(value));
            changed |= map.len() != before;
            for (_, value) in map.iter_mut() {
                changed |= fill(value, table);
            }
        }
        Value::Sequence(items) => {
            let before = items.len();
            items.retain(|item| !holds_checksum(item));
            changed |= items.len() != before;
            for item in items {
                changed |= fill(item, table);
            }
        }
        Value::Tagged(tagged) => changed |= fill(&mut tagged.value, table),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    changed
}

/// Moves the pod templates of workloads from the host network to pod networking (removes
/// `hostNetwork: true` and the DNS policy that only makes sense with it).
fn pod_networking(doc: &mut Value) -> bool {
    let Some(pod) = doc
        .get_mut("spec")
        .and_then(|s| s.get_mut("template"))
        .and_then(|t| t.get_mut("spec"))
        .and_then(Value::as_mapping_mut)
    else {
        return false;
    };
    let before = pod.len();
    pod.retain(|k, v| {
        !(k.as_str() == Some("hostNetwork") && v.as_bool() == Some(true)
            || k.as_str() == Some("dnsPolicy") && v.as_str() == Some("ClusterFirstWithHostNet"))
    });
    pod.len() != before
}

/// The first `__UPPER_CASE__` token left in keys or string values, with where it is.
fn leftover(v: &Value, at: &mut Vec<String>) -> Option<(String, String)> {
    match v {
        Value::String(s) => placeholder_in(s).map(|p| (p.to_string(), at.join("."))),
        Value::Mapping(map) => map.iter().find_map(|(k, value)| {
            let key = match k {
                Value::String(s) => s.clone(),
                other => format!("{other:?}"),
            };
            if let Some(p) = placeholder_in(&key) {
                return Some((p.to_string(), at.join(".")));
            }
            at.push(key);
            let found = leftover(value, at);
            at.pop();
            found
        }),
        Value::Sequence(items) => items.iter().enumerate().find_map(|(i, item)| {
            at.push(format!("[{i}]"));
            let found = leftover(item, at);
            at.pop();
            found
        }),
        Value::Tagged(tagged) => leftover(&tagged.value, at),
        Value::Null | Value::Bool(_) | Value::Number(_) => None,
    }
}

/// Finds `__NAME__` (NAME: an upper-case letter, then upper-case letters, digits, underscores).
pub fn placeholder_in(s: &str) -> Option<&str> {
    let b = s.as_bytes();
    let mut i = 0;
    while i + 4 < b.len() {
        if b[i] == b'_' && b[i + 1] == b'_' && b[i + 2].is_ascii_uppercase() {
            let mut j = i + 2;
            while j < b.len()
                && (b[j].is_ascii_uppercase() || b[j].is_ascii_digit() || b[j] == b'_')
            {
                j += 1;
            }
            let token = &s[i..j];
            if token.len() > 4 && token.ends_with("__") {
                return Some(token);
            }
            i = j;
        } else {
            i += 1;
        }
    }
    None
}

/// The bundle's files ending in `suffix`, sorted; entries that are not regular files are
/// reported and left out. A missing bundle directory bundles nothing.
fn list_bundle(
    dir: &Path,
    suffix: &str,
    failed: &mut Vec<ManifestError>,
) -> Result<Vec<String>, ManifestError> {
    let read_err = |source| ManifestError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let meta = match dir.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_err(e)),
    };
    if !meta.is_dir() {
        return Err(ManifestError::NotRegular {
            path: dir.to_path_buf(),
        });
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !name.ends_with(suffix) || name.starts_with('.') {
            continue;
        }
        if entry.file_type().map_err(read_err)?.is_file() {
            names.push(name);
        } else {
            failed.push(ManifestError::NotRegular { path: entry.path() });
        }
    }
    names.sort();
    Ok(names)
}

fn ensure_dir(dir: &Path) -> Result<(), ManifestError> {
    if dir.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
        return Err(ManifestError::NotRegular {
            path: dir.to_path_buf(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| ManifestError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Reads a regular file without following a link in its place.
fn read_regular(path: &Path) -> Result<Vec<u8>, ManifestError> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => ManifestError::NotRegular {
                path: path.to_path_buf(),
            },
            _ => ManifestError::Read {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(bytes)
}

/// Puts `bytes` at `dest` unless it already holds exactly them; true when written. Whatever is
/// in the way that is not a regular file with those bytes (a link included) is replaced.
pub fn install(dest: &Path, bytes: &[u8]) -> Result<bool, ManifestError> {
    let same = dest.symlink_metadata().is_ok_and(|m| m.is_file())
        && read_regular(dest).is_ok_and(|current| current == bytes);
    if same {
        return Ok(false);
    }
    write_atomic(dest, bytes).map_err(|source| ManifestError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    Ok(true)
}

/// Removes deployed manifests of ours that are no longer bundled; returns how many went.
fn remove_stale(dest: &Path, bundled: &[String]) -> Result<usize, ManifestError> {
    let entries = match std::fs::read_dir(dest) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(ManifestError::Read {
                path: dest.to_path_buf(),
                source,
            })
        }
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let ours = OWNED_PREFIXES.iter().any(|p| name.starts_with(p)) && name.ends_with(".yaml");
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !ours || is_dir || name == TLS_SECRETS_MANIFEST || bundled.contains(&name) {
            continue;
        }
        let path = entry.path();
        std::fs::remove_file(&path).map_err(|source| ManifestError::Remove { path, source })?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../rootfs/gateway/opt/openshell/manifests"
    );

    /// A root whose bundle is the gateway rootfs's own manifests plus one chart.
    fn bundled_root() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tmp");
        let src = t.path().join("opt/openshell/manifests");
        std::fs::create_dir_all(&src).expect("mkdir");
        for entry in std::fs::read_dir(FIXTURES).expect("fixtures") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), src.join(entry.file_name())).expect("copy");
        }
        let charts = t.path().join("opt/openshell/charts");
        std::fs::create_dir_all(&charts).expect("mkdir");
        std::fs::write(charts.join("openshell-0.1.0.tgz"), b"\x1f\x8bchart").expect("chart");
        t
    }

    fn deployed(root: &Path, name: &str) -> PathBuf {
        root.join("var/lib/rancher/k3s/server/manifests").join(name)
    }

    fn parse_docs(path: &Path) -> Vec<Value> {
        let text = std::fs::read_to_string(path).expect("read");
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).expect("yaml"))
            .collect()
    }

    fn values_of(helmchart: &Value) -> Value {
        let text = helmchart["spec"]["valuesContent"].as_str().expect("string");
        serde_yaml::from_str(text).expect("values yaml")
    }

    fn mtime(p: &Path) -> SystemTime {
        std::fs::symlink_metadata(p)
            .expect("meta")
            .modified()
            .expect("mtime")
    }

    fn age(p: &Path) {
        let old = SystemTime::now() - Duration::from_secs(3600);
        let f = std::fs::File::options().write(true).open(p).expect("open");
        f.set_modified(old).expect("set mtime");
    }

    #[test]
    fn helmchart_values_come_from_the_typed_config() {
        let t = bundled_root();
        let mut gw = HelmValues::default();
        let report = deploy(t.path(), &gw).expect("deploy");
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let docs = parse_docs(&deployed(t.path(), "openshell-helmchart.yaml"));
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0]["spec"]["targetNamespace"], "openshell");
        let v = values_of(&docs[0]);
        assert_eq!(v["image"]["pullPolicy"], "IfNotPresent");
        assert_eq!(v["image"]["repository"], "ghcr.io/nvidia/openshell/gateway");
        assert_eq!(v["server"]["sandboxImagePullPolicy"], "IfNotPresent");
        assert_eq!(v["server"]["dbUrl"], "sqlite:/tmp/openshell.db");
        assert_eq!(v["server"]["sshGatewayHost"], "");
        assert_eq!(v["server"]["sshGatewayPort"], 0);
        assert_eq!(v["server"]["disableGatewayAuth"], false);
        assert_eq!(v["server"]["disableTls"], false);
        assert_eq!(v["server"]["hostGatewayIP"], "");
        assert_eq!(v["server"]["oidc"]["issuer"], "");
        assert!(v["podAnnotations"].as_mapping().expect("map").is_empty());
        let text =
            std::fs::read_to_string(deployed(t.path(), "openshell-helmchart.yaml")).expect("read");
        assert_eq!(placeholder_in(&text), None, "{text}");

        // Other values, and the image overrides by key.
        gw.disable_tls = true;
        gw.ssh_gateway_port = 2222;
        gw.image_pull_policy = openshell_shared::config::PullPolicy::Always;
        gw.image_repository = Some("openshell/gateway".into());
        gw.image_tag = Some("dev".into());
        let report = deploy(t.path(), &gw).expect("deploy");
        assert_eq!(report.manifests_written, 1, "{}", report.describe());
        let v = values_of(&parse_docs(&deployed(t.path(), "openshell-helmchart.yaml"))[0]);
        assert_eq!(v["server"]["disableTls"], true);
        assert_eq!(v["server"]["sshGatewayPort"], 2222);
        assert_eq!(v["image"]["pullPolicy"], "Always");
        assert_eq!(v["image"]["repository"], "openshell/gateway");
        assert_eq!(v["image"]["tag"], "dev");
    }

    #[test]
    fn agent_sandbox_moves_to_pod_networking() {
        let t = bundled_root();
        deploy(t.path(), &HelmValues::default()).expect("deploy");
        let docs = parse_docs(&deployed(t.path(), "agent-sandbox.yaml"));
        let deployment = docs
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .expect("deployment");
        let pod = deployment["spec"]["template"]["spec"]
            .as_mapping()
            .expect("pod spec");
        assert!(!pod.contains_key("hostNetwork"), "{pod:?}");
        assert!(!pod.contains_key("dnsPolicy"), "{pod:?}");
        assert_eq!(pod["serviceAccountName"], "agent-sandbox-controller");
        assert_eq!(docs.len(), 3, "other documents kept");
    }

    #[test]
    fn second_run_changes_nothing_and_says_so() {
        let t = bundled_root();
        let first = deploy(t.path(), &HelmValues::default()).expect("first");
        assert_eq!(first.manifests_written, 2, "{}", first.describe());
        assert_eq!(first.charts_written, 1);
        let files = [
            deployed(t.path(), "openshell-helmchart.yaml"),
            deployed(t.path(), "agent-sandbox.yaml"),
            t.path()
                .join("var/lib/rancher/k3s/server/static/charts/openshell-0.1.0.tgz"),
        ];
        for f in &files {
            age(f);
        }
        let before: Vec<_> = files
            .iter()
            .map(|f| (std::fs::read(f).expect("read"), mtime(f)))
            .collect();
        let again = deploy(t.path(), &HelmValues::default()).expect("second");
        assert_eq!(
            again.describe(),
            "2 manifests unchanged, 0 written, 0 removed; 1 charts unchanged, 0 written"
        );
        let after: Vec<_> = files
            .iter()
            .map(|f| (std::fs::read(f).expect("read"), mtime(f)))
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn stale_manifests_of_ours_go_others_stay() {
        let t = bundled_root();
        let dest = t.path().join("var/lib/rancher/k3s/server/manifests");
        std::fs::create_dir_all(&dest).expect("mkdir");
        for name in [
            "openshell-old.yaml",
            "agent-legacy.yaml",
            TLS_SECRETS_MANIFEST,
            "coredns.yaml",
            "local-storage.yaml",
            "openshell-notes.txt",
        ] {
            std::fs::write(dest.join(name), "kind: X\n").expect("write");
        }
        let report = deploy(t.path(), &HelmValues::default()).expect("deploy");
        assert_eq!(report.manifests_removed, 2, "{}", report.describe());
        assert!(!dest.join("openshell-old.yaml").exists());
        assert!(!dest.join("agent-legacy.yaml").exists());
        for kept in [
            TLS_SECRETS_MANIFEST,
            "coredns.yaml",
            "local-storage.yaml",
            "openshell-notes.txt",
        ] {
            assert_eq!(
                std::fs::read_to_string(dest.join(kept)).expect(kept),
                "kind: X\n",
                "{kept} untouched"
            );
        }
    }

    #[test]
    fn unknown_placeholder_is_named_and_the_deployed_copy_kept() {
        let t = bundled_root();
        deploy(t.path(), &HelmValues::default()).expect("deploy");
        let deployed_chart = deployed(t.path(), "openshell-helmchart.yaml");
        let good = std::fs::read(&deployed_chart).expect("read");
        let src = t
            .path()
            .join("opt/openshell/manifests/openshell-helmchart.yaml");
        let text = std::fs::read_to_string(&src).expect("read");
        std::fs::write(
            &src,
            text.replace(
                "rolesClaim: __OIDC_ROLES_CLAIM__",
                "rolesClaim: __OIDC_ROLES_CLAIM__\n        groupsClaim: __OIDC_GROUPS_CLAIM__",
            ),
        )
        .expect("write");
        let report = deploy(t.path(), &HelmValues::default()).expect("deploy");
        assert_eq!(report.failed.len(), 1);
        let msg = report.failed[0].to_string();
        assert!(msg.contains("openshell-helmchart.yaml"), "{msg}");
        assert!(msg.contains("__OIDC_GROUPS_CLAIM__"), "{msg}");
        assert!(
            msg.contains("spec.valuesContent.server.oidc.groupsClaim"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&deployed_chart).expect("read"), good);
        assert_eq!(
            report.manifests_unchanged, 1,
            "the other file still deploys"
        );
    }

    #[test]
    fn malformed_manifest_names_file_and_line_and_is_not_deployed() {
        let t = bundled_root();
        let src = t.path().join("opt/openshell/manifests/agent-extra.yaml");
        std::fs::write(&src, "apiVersion: v1\nkind: ConfigMap\ndata: [unclosed\n").expect("w");
        let report = deploy(t.path(), &HelmValues::default()).expect("deploy");
        assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
        match &report.failed[0] {
            ManifestError::Malformed { path, line, .. } => {
                assert_eq!(path, &src);
                assert!(*line >= 3, "line {line}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!deployed(t.path(), "agent-extra.yaml").exists());
        assert_eq!(report.manifests_written, 2);
    }

    #[test]
    fn links_are_not_followed() {
        let t = bundled_root();
        let outside = tempfile::tempdir().expect("outside");
        let secret = outside.path().join("secret.yaml");
        std::fs::write(&secret, "kind: Secret\n").expect("write");
        // A link in the bundle is reported, not read.
        std::os::unix::fs::symlink(
            &secret,
            t.path().join("opt/openshell/manifests/openshell-x.yaml"),
        )
        .expect("link");
        // A link at the destination is replaced, its target untouched.
        let dest = t.path().join("var/lib/rancher/k3s/server/manifests");
        std::fs::create_dir_all(&dest).expect("mkdir");
        let target = outside.path().join("target.yaml");
        std::fs::write(&target, "mine\n").expect("write");
        std::os::unix::fs::symlink(&target, dest.join("agent-sandbox.yaml")).expect("link");
        let report = deploy(t.path(), &HelmValues::default()).expect("deploy");
        assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
        assert!(matches!(report.failed[0], ManifestError::NotRegular { .. }));
        assert!(!dest.join("openshell-x.yaml").exists());
        assert!(dest
            .join("agent-sandbox.yaml")
            .symlink_metadata()
            .expect("meta")
            .is_file());
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "mine\n");
        assert_eq!(
            std::fs::read_to_string(&secret).expect("read"),
            "kind: Secret\n"
        );
    }

    #[test]
    fn unpatched_manifest_is_deployed_byte_for_byte() {
        let t = bundled_root();
        let text = "# comment kept\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: \"1\"\n";
        std::fs::write(
            t.path().join("opt/openshell/manifests/openshell-cm.yaml"),
            text,
        )
        .expect("write");
        deploy(t.path(), &HelmValues::default()).expect("deploy");
        assert_eq!(
            std::fs::read_to_string(deployed(t.path(), "openshell-cm.yaml")).expect("read"),
            text
        );
    }

    #[test]
    fn rendering_is_deterministic() {
        let path = Path::new(FIXTURES).join("openshell-helmchart.yaml");
        let bytes = std::fs::read(&path).expect("fixture");
        let a = render(
            "openshell-helmchart.yaml",
            &path,
            &bytes,
            &HelmValues::default(),
        )
        .expect("render");
        let b = render(
            "openshell-helmchart.yaml",
            &path,
            &bytes,
            &HelmValues::default(),
        )
        .expect("render");
        assert_eq!(a, b);
        assert_ne!(a, bytes);
    }

    #[test]
    fn placeholder_scanner() {
        assert_eq!(placeholder_in("x __DB_URL__ y"), Some("__DB_URL__"));
        assert_eq!(placeholder_in("__A1__"), Some("__A1__"));
        assert_eq!(placeholder_in("__init__"), None);
        assert_eq!(placeholder_in("a__B"), None);
        assert_eq!(placeholder_in("____"), None);
        assert_eq!(placeholder_in("snake_case_NAME"), None);
    }
}
