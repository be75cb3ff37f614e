//! The gateway's payload in the gateway root: the OpenShell Helm chart (`--chart`), the container
//! image archives k3s imports at boot (`--images`) and the sandbox supervisor
//! (`--sandbox-bin`). Checked before anything is built (the chart against the HelmChart that
//! names it, each archive as k3s would import it, the supervisor's ELF machine against the
//! root's arch), placed where the old system put them, keyed by content, recorded in the
//! manifest; without a piece, one line says what the gateway will lack.
//!
//! The chart's image repository and tag are not set here: the HelmChart's `valuesContent` gets
//! them from the boot configuration (`manifests.gateway.image_repository`/`image_tag`) through
//! the manifests phase, at build time and at every boot. This module reads the deployed result
//! back to say which images the archives do not hold.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use openshell_shared::Arch;
use serde_yaml::Value;

use crate::cache::Key;
use crate::elf;
use crate::image_archive::{self, Archive};
use crate::k3s::{self, Input};

/// k3s imports every archive here at start (its airgap directory).
pub const IMAGES_DIR: &str = "var/lib/rancher/k3s/agent/images";
/// The bundle's charts; the manifests phase copies them into [`K3S_CHARTS`] at build time and
/// every boot, so a reset state keeps them.
pub const BUNDLED_CHARTS: &str = "opt/openshell/charts";
/// Where k3s serves charts from (`https://%{KUBERNETES_API}%/static/charts/<file>`).
pub const K3S_CHARTS: &str = "var/lib/rancher/k3s/server/static/charts";
/// The sandbox supervisor, as the old system installed it.
pub const SUPERVISOR: &str = "opt/openshell/bin/openshell-sandbox";
/// The bundled HelmChart manifest that names the chart file.
pub const HELMCHART: &str = "opt/openshell/manifests/openshell-helmchart.yaml";
/// k3s's auto-deploy directory, where the build pre-deploys the rendered manifests.
const DEPLOYED: &str = "var/lib/rancher/k3s/server/manifests";

/// The payload flags of `rootfs --profile gateway` and `up`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// The OpenShell Helm chart archive (`helm package` output: a .tgz holding
    /// `<name>/Chart.yaml`); must be the file the bundled HelmChart names.
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
    /// Image archives for k3s to import (docker-archive or OCI tar, optionally .gz/.zst/.bz2/.lz4
    /// as k3s names them): the gateway, controller and sandbox images, k3s's airgap images.
    /// Repeatable; a directory stands for every file in it.
    #[arg(long = "images", value_name = "FILE|DIR")]
    pub images: Vec<PathBuf>,
    /// The sandbox supervisor (`openshell-sandbox`), an executable for the root's arch.
    #[arg(long, value_name = "FILE")]
    pub sandbox_bin: Option<PathBuf>,
}

impl Args {
    pub fn given(&self) -> bool {
        self.chart.is_some() || !self.images.is_empty() || self.sandbox_bin.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("{flag} {file}: cannot read: {source}")]
    Read {
        flag: &'static str,
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {file}: not a regular file")]
    NotFile { flag: &'static str, file: PathBuf },
    #[error("--chart {file}: {reason}")]
    Chart { file: PathBuf, reason: String },
    /// `found`: the chart's name, version and packaged file name.
    #[error("--chart {file} is {found}, but {helmchart} spec.chart asks k3s for {wanted}")]
    ChartMismatch {
        file: PathBuf,
        found: String,
        helmchart: PathBuf,
        wanted: String,
    },
    #[error("{file}: {reason}")]
    HelmChart { file: PathBuf, reason: String },
    #[error("--images: {first} and {second} would both be {IMAGES_DIR}/{name}")]
    SameName {
        first: PathBuf,
        second: PathBuf,
        name: String,
    },
    #[error("--images {0}")]
    Archive(#[from] image_archive::ArchiveError),
    #[error("--sandbox-bin {0}")]
    Elf(#[from] elf::ElfError),
    #[error(transparent)]
    Pin(#[from] k3s::PinError),
}

/// A file going into the root as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub source: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// The chart: its file, and its name and version from `Chart.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chart {
    pub file: Placed,
    pub name: String,
    pub version: String,
}

impl Chart {
    /// The file name `helm package` gives it, which the HelmChart asks for.
    pub fn packaged(&self) -> String {
        format!("{}-{}.tgz", self.name, self.version)
    }
}

/// An image archive: where it came from (and whether it is k3s's pinned airgap tarball), and
/// what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub input: Input,
    pub size: u64,
    pub archive: Archive,
}

/// Everything resolved, before the root is assembled.
#[derive(Debug, Clone, Default)]
pub struct Payload {
    pub chart: Option<Chart>,
    pub images: Vec<Image>,
    /// Why there are no images (nothing given and no verified download).
    pub images_note: Option<String>,
    pub supervisor: Option<Placed>,
}

fn placed(flag: &'static str, file: &Path) -> Result<Placed, PayloadError> {
    let meta = std::fs::metadata(file).map_err(|source| PayloadError::Read {
        flag,
        file: file.into(),
        source,
    })?;
    if !meta.is_file() {
        return Err(PayloadError::NotFile {
            flag,
            file: file.into(),
        });
    }
    Ok(Placed {
        source: file.into(),
        sha256: k3s::sha256_of(file)?,
        size: meta.len(),
    })
}

/// Checks every given piece; `helmchart` is the bundled HelmChart manifest (in the overlay).
pub fn resolve(
    arch: Arch,
    args: &Args,
    extra_images: Option<&Path>,
    helmchart: &Path,
) -> Result<Payload, PayloadError> {
    let chart = match &args.chart {
        Some(file) => Some(resolve_chart(file, helmchart)?),
        None => None,
    };
    let supervisor = match &args.sandbox_bin {
        Some(file) => {
            let p = placed("--sandbox-bin", file)?;
            elf::check_executable(file, arch)?;
            Some(p)
        }
        None => None,
    };
    let paths: Vec<PathBuf> = extra_images
        .into_iter()
        .map(Path::to_path_buf)
        .chain(args.images.iter().cloned())
        .collect();
    let (images, images_note) = resolve_images(arch, &paths)?;
    Ok(Payload {
        chart,
        images,
        images_note,
        supervisor,
    })
}

/// The chart file: a gzip tar whose top directory holds `Chart.yaml`, and the file the
/// HelmChart manifest asks for.
fn resolve_chart(file: &Path, helmchart: &Path) -> Result<Chart, PayloadError> {
    let placed = placed("--chart", file)?;
    let bad = |reason: String| PayloadError::Chart {
        file: file.into(),
        reason,
    };
    let kept = image_archive::read_files(file, image_archive::Compression::Gzip, |n| {
        n.ends_with("/Chart.yaml") && n.matches('/').count() == 1
    })
    .map_err(|e| bad(format!("not a Helm chart archive (a gzip tar): {e}")))?;
    let Some((path, text)) = kept.files.first() else {
        return Err(bad(format!(
            "not a Helm chart archive: no <chart>/Chart.yaml among its {} entries",
            kept.entries
        )));
    };
    let doc: Value = serde_yaml::from_slice(text).map_err(|e| bad(format!("{path}: {e}")))?;
    let field = |k: &str| {
        doc.get(k)
            .and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad(format!("{path}: no `{k}`")))
    };
    let chart = Chart {
        file: placed,
        name: field("name")?,
        version: field("version")?,
    };
    let wanted = chart_file_named(helmchart)?;
    if chart.packaged() != wanted {
        return Err(PayloadError::ChartMismatch {
            file: file.into(),
            found: format!(
                "chart {} {}, packaged as {}",
                chart.name,
                chart.version,
                chart.packaged()
            ),
            helmchart: helmchart.into(),
            wanted,
        });
    }
    Ok(chart)
}

/// The chart file a HelmChart manifest asks k3s for: the last part of its `spec.chart` URL
/// under `/static/charts/`.
pub fn chart_file_named(helmchart: &Path) -> Result<String, PayloadError> {
    let bad = |reason: String| PayloadError::HelmChart {
        file: helmchart.into(),
        reason,
    };
    let text = std::fs::read_to_string(helmchart).map_err(|e| bad(e.to_string()))?;
    let doc: Value = serde_yaml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let url = doc
        .get("spec")
        .and_then(|s| s.get("chart"))
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no spec.chart".into()))?;
    url.split_once("/static/charts/")
        .map(|(_, f)| f.to_string())
        .filter(|f| !f.is_empty() && !f.contains('/'))
        .ok_or_else(|| bad(format!("spec.chart {url} is not a chart k3s serves itself")))
}

/// Image archives: each path a file or a directory of them; with none, k3s's airgap tarball if
/// a verified download exists.
fn resolve_images(
    arch: Arch,
    paths: &[PathBuf],
) -> Result<(Vec<Image>, Option<String>), PayloadError> {
    let pin = k3s::images_pin(arch);
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let (inputs, _) = k3s::resolve_images(arch, Some(p))?;
            files.extend(inputs);
        } else {
            files.push(k3s::local(p, pin)?);
        }
    }
    let note = if paths.is_empty() {
        let (inputs, note) = k3s::resolve_images(arch, None)?;
        files = inputs;
        note
    } else if files.is_empty() {
        Some(format!(
            "{} hold no files",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    } else {
        None
    };
    let mut images: Vec<Image> = Vec::new();
    for input in files {
        if let Some(other) = images.iter().find(|i| i.input.name == input.name) {
            return Err(PayloadError::SameName {
                first: other.input.path.clone(),
                second: input.path,
                name: input.name,
            });
        }
        let archive = image_archive::inspect(&input.path)?;
        let size = std::fs::metadata(&input.path)
            .map_err(|source| PayloadError::Read {
                flag: "--images",
                file: input.path.clone(),
                source,
            })?
            .len();
        images.push(Image {
            input,
            size,
            archive,
        });
    }
    Ok((images, note))
}

impl Payload {
    /// Adds the payload's content to a cache key: a changed file is a new root, the same files
    /// are the same root.
    pub fn key(&self, key: &mut Key) {
        key.str("chart");
        if let Some(c) = &self.chart {
            key.str(&c.packaged()).str(&c.file.sha256);
        }
        key.str("images");
        for i in &self.images {
            key.str(&i.input.name).str(&i.input.sha256);
        }
        key.str("supervisor");
        if let Some(s) = &self.supervisor {
            key.str(&s.sha256);
        }
    }

    /// Copies the chart and the supervisor into `root` (the images are copied by the caller,
    /// with progress); before the manifests are pre-deployed, which copies the chart on.
    pub fn place(&self, root: &Path) -> crate::error::Result<()> {
        if let Some(c) = &self.chart {
            let dir = root.join(BUNDLED_CHARTS);
            std::fs::create_dir_all(&dir)
                .map_err(|e| crate::error::Error::io("create", &dir, e))?;
            crate::rootfs::copy(&c.file.source, &dir.join(c.packaged()), 0o644)?;
        }
        if let Some(s) = &self.supervisor {
            let to = root.join(SUPERVISOR);
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| crate::error::Error::io("create", dir, e))?;
            }
            crate::rootfs::copy(&s.source, &to, 0o755)?;
        }
        Ok(())
    }

    /// One line per piece that is missing, saying what the gateway will lack; `wanted` are the
    /// images the deployed manifests name ([`wanted_images`]).
    pub fn lacks(&self, wanted: &[Wanted], chart_file: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.chart.is_none() {
            out.push(format!(
                "no chart (--chart FILE): /{HELMCHART} asks k3s for /static/charts/{chart_file}, \
                 which the root lacks, so the HelmChart install will fail and the gateway is never deployed"
            ));
        }
        let held: BTreeSet<String> = self
            .images
            .iter()
            .flat_map(|i| i.archive.refs.iter().map(|r| image_archive::normalize(r)))
            .collect();
        for w in wanted {
            if !held.contains(&image_archive::normalize(&w.reference)) {
                out.push(format!(
                    "no image archive (--images FILE) holds {} ({}): k3s pulls it from the network when it starts; offline, it never starts",
                    w.reference, w.role
                ));
            }
        }
        if self.supervisor.is_none() {
            out.push(format!(
                "no sandbox supervisor (--sandbox-bin FILE): /{SUPERVISOR} is missing, so the sandboxes the gateway creates have no supervisor to run"
            ));
        }
        out
    }
}

/// An image a deployed manifest names, and what for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub reference: String,
    pub role: String,
}

/// The images the pre-deployed manifests in `root` name: the HelmChart's values (the gateway's
/// `image.repository:tag`, `server.sandboxImage`) and every container `image` of the others.
pub fn wanted_images(root: &Path) -> Result<Vec<Wanted>, PayloadError> {
    let dir = root.join(DEPLOYED);
    let mut out = Vec::new();
    for name in ["openshell-helmchart.yaml", "agent-sandbox.yaml"] {
        let file = dir.join(name);
        let bad = |reason: String| PayloadError::HelmChart {
            file: file.clone(),
            reason,
        };
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let doc =
                <Value as serde::Deserialize>::deserialize(doc).map_err(|e| bad(e.to_string()))?;
            if let Some(values) = doc
                .get("spec")
                .and_then(|s| s.get("valuesContent"))
                .and_then(Value::as_str)
            {
                let v: Value = serde_yaml::from_str(values)
                    .map_err(|e| bad(format!("spec.valuesContent: {e}")))?;
                helm_values_images(&v, name, &mut out);
            } else {
                container_images(&doc, name, &mut out);
            }
        }
    }
    Ok(out)
}

fn helm_values_images(v: &Value, file: &str, out: &mut Vec<Wanted>) {
    let s = |keys: &[&str]| {
        keys.iter()
            .try_fold(v, |v, k| v.get(*k))
            .and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
    };
    if let Some(repo) = s(&["image", "repository"]) {
        let tag = s(&["image", "tag"]).unwrap_or_else(|| "latest".into());
        out.push(Wanted {
            reference: format!("{repo}:{tag}"),
            role: format!("the gateway, {file} image.repository/tag"),
        });
    }
    if let Some(r) = s(&["server", "sandboxImage"]) {
        out.push(Wanted {
            reference: r,
            role: format!("the sandboxes, {file} server.sandboxImage"),
        });
    }
}

/// Every `image:` string of a container (or init container) in a manifest.
fn container_images(v: &Value, file: &str, out: &mut Vec<Wanted>) {
    match v {
        Value::Mapping(m) => {
            for (k, val) in m {
                if let (Some("containers" | "initContainers"), Value::Sequence(list)) =
                    (k.as_str(), val)
                {
                    for c in list {
                        if let Some(img) = c.get("image").and_then(Value::as_str) {
                            let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
                            out.push(Wanted {
                                reference: img.to_string(),
                                role: format!("container {name} in {file}"),
                            });
                        }
                    }
                } else {
                    container_images(val, file, out);
                }
            }
        }
        Value::Sequence(s) => s.iter().for_each(|x| container_images(x, file, out)),
        _ => {}
    }
}

/// The payload's part of `manifest.json`: each piece with its name, path in the root, SHA-256
/// and size, or `{"absent": <what the gateway lacks>}`.
pub fn manifest_json(p: &Payload, lacks: &[String]) -> serde_json::Value {
    let absent = |prefix: &str| {
        serde_json::json!({
            "absent": lacks.iter().find(|l| l.starts_with(prefix)).cloned().unwrap_or_default()
        })
    };
    let chart = p.chart.as_ref().map_or_else(
        || absent("no chart"),
        |c| {
            serde_json::json!({
                "name": c.name,
                "version": c.version,
                "paths": [
                    format!("{BUNDLED_CHARTS}/{}", c.packaged()),
                    format!("{K3S_CHARTS}/{}", c.packaged()),
                ],
                "sha256": c.file.sha256,
                "size": c.file.size,
            })
        },
    );
    let supervisor = p.supervisor.as_ref().map_or_else(
        || absent("no sandbox supervisor"),
        |s| {
            serde_json::json!({
                "name": "openshell-sandbox",
                "path": SUPERVISOR,
                "sha256": s.sha256,
                "size": s.size,
            })
        },
    );
    serde_json::json!({
        "chart": chart,
        "sandbox_supervisor": supervisor,
        "lacks": lacks,
    })
}

/// One image archive's entry in `manifest.json`.
pub fn image_json(i: &Image) -> serde_json::Value {
    serde_json::json!({
        "name": i.input.name,
        "path": format!("{IMAGES_DIR}/{}", i.input.name),
        "sha256": i.input.sha256,
        "size": i.size,
        "pinned": i.input.pinned,
        "origin": i.input.origin,
        "format": i.archive.format.name(),
        "compression": i.archive.compression.name(),
        "refs": i.archive.refs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_archive::{docker_archive_bytes, tar_bytes, write_compressed, Compression};

    /// The repository's bundled HelmChart (the one the build checks `--chart` against).
    fn bundled_helmchart() -> PathBuf {
        crate::paths::workspace()
            .join("rootfs/gateway")
            .join(HELMCHART)
    }

    /// A `helm package`-shaped chart: `<name>/Chart.yaml`, a template, gzip.
    fn chart_tgz(dir: &Path, file: &str, name: &str, version: &str) -> PathBuf {
        let chart_yaml = format!("apiVersion: v2\nname: {name}\nversion: {version}\n");
        let tar = tar_bytes(&[
            (&format!("{name}/Chart.yaml"), chart_yaml.as_bytes()),
            (&format!("{name}/templates/svc.yaml"), b"kind: Service\n"),
            // A subchart's Chart.yaml must not be taken for the chart's.
            (
                &format!("{name}/charts/sub/Chart.yaml"),
                b"name: sub\nversion: 9\n",
            ),
        ]);
        let p = dir.join(file);
        write_compressed(&p, &tar, Compression::Gzip).expect("gzip");
        p
    }

    fn given(dir: &Path) -> Args {
        let images = dir.join("gateway.tar.zst");
        write_compressed(
            &images,
            &docker_archive_bytes(&["ghcr.io/nvidia/openshell/gateway:latest"]),
            Compression::Zstd,
        )
        .expect("zstd");
        let sup = dir.join("openshell-sandbox");
        std::fs::write(&sup, elf::header(elf::machine_of(Arch::X86_64), 3)).expect("write");
        Args {
            chart: Some(chart_tgz(dir, "my-chart.tgz", "openshell", "0.1.0")),
            images: vec![images],
            sandbox_bin: Some(sup),
        }
    }

    #[test]
    fn the_helmchart_names_the_chart_file() {
        assert_eq!(
            chart_file_named(&bundled_helmchart()).expect("named"),
            "openshell-0.1.0.tgz"
        );
    }

    #[test]
    fn a_payload_is_placed_where_the_old_system_put_it_and_recorded() {
        let t = tempfile::tempdir().expect("tmp");
        let args = given(t.path());
        let p = resolve(Arch::X86_64, &args, None, &bundled_helmchart()).expect("resolved");
        let chart = p.chart.as_ref().expect("chart");
        assert_eq!(
            (chart.name.as_str(), chart.version.as_str()),
            ("openshell", "0.1.0")
        );
        let root = t.path().join("root");
        p.place(&root).expect("placed");
        let staged = root.join(BUNDLED_CHARTS).join("openshell-0.1.0.tgz");
        assert_eq!(
            std::fs::read(&staged).expect("chart in the bundle"),
            std::fs::read(args.chart.as_ref().expect("chart")).expect("given")
        );
        let sup = root.join(SUPERVISOR);
        let mode = std::fs::metadata(&sup).expect("supervisor").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o755
        );
        assert_eq!(p.images.len(), 1);
        assert_eq!(
            p.images[0].archive.refs,
            ["ghcr.io/nvidia/openshell/gateway:latest"]
        );
        let img = image_json(&p.images[0]);
        assert_eq!(
            img["path"],
            "var/lib/rancher/k3s/agent/images/gateway.tar.zst"
        );
        assert_eq!(img["compression"], "zstd");
        assert_eq!(
            img["size"],
            std::fs::metadata(&args.images[0]).expect("stat").len()
        );
        assert_eq!(img["sha256"], k3s::sha256_of(&args.images[0]).expect("sha"));
        let m = manifest_json(&p, &[]);
        assert_eq!(
            m["chart"]["paths"],
            serde_json::json!([
                "opt/openshell/charts/openshell-0.1.0.tgz",
                "var/lib/rancher/k3s/server/static/charts/openshell-0.1.0.tgz"
            ])
        );
        assert_eq!(m["chart"]["sha256"], chart.file.sha256);
        assert_eq!(m["chart"]["size"], chart.file.size);
        assert_eq!(m["sandbox_supervisor"]["path"], SUPERVISOR);
        assert_eq!(
            m["sandbox_supervisor"]["sha256"],
            k3s::sha256_of(args.sandbox_bin.as_ref().expect("sup")).expect("sha")
        );
    }

    #[test]
    fn the_cache_key_follows_content_not_paths() {
        let t = tempfile::tempdir().expect("tmp");
        let args = given(t.path());
        let key = |p: &Payload| {
            let mut k = Key::new("t");
            p.key(&mut k);
            k.finish()
        };
        let resolve = |a: &Args| resolve(Arch::X86_64, a, None, &bundled_helmchart()).expect("ok");
        let first = key(&resolve(&args));
        assert_eq!(
            key(&resolve(&args)),
            first,
            "unchanged inputs hit the cache"
        );
        // The same chart bytes under another name and place: the same key.
        let elsewhere = t.path().join("copy.tgz");
        std::fs::copy(args.chart.as_ref().expect("chart"), &elsewhere).expect("copy");
        let moved = Args {
            chart: Some(elsewhere),
            ..args.clone()
        };
        assert_eq!(key(&resolve(&moved)), first);
        // A chart with other content: another key.
        let other = t.path().join("other");
        std::fs::create_dir(&other).expect("mkdir");
        let changed_chart = chart_tgz(&other, "c.tgz", "openshell", "0.1.0");
        let mut bytes = std::fs::read(&changed_chart).expect("read");
        bytes.extend_from_slice(&[0u8; 512]); // trailing zeros: still the same chart for tar
        std::fs::write(&changed_chart, bytes).expect("write");
        let changed = Args {
            chart: Some(changed_chart),
            ..args.clone()
        };
        assert_ne!(key(&resolve(&changed)), first, "a changed chart rebuilds");
        let no_sup = Args {
            sandbox_bin: None,
            ..args.clone()
        };
        assert_ne!(key(&resolve(&no_sup)), first);
        let mut sup = std::fs::read(args.sandbox_bin.as_ref().expect("sup")).expect("read");
        sup.push(0);
        let sup2 = t.path().join("sup2");
        std::fs::write(&sup2, sup).expect("write");
        let new_sup = Args {
            sandbox_bin: Some(sup2),
            ..args
        };
        assert_ne!(
            key(&resolve(&new_sup)),
            first,
            "a changed supervisor rebuilds"
        );
    }

    #[test]
    fn bad_pieces_are_refused_naming_the_file() {
        let t = tempfile::tempdir().expect("tmp");
        let args = given(t.path());
        let refuse = |a: &Args| {
            resolve(Arch::X86_64, a, None, &bundled_helmchart())
                .expect_err("refused")
                .to_string()
        };
        // A chart of another version than the HelmChart asks for.
        let v2 = chart_tgz(t.path(), "v2.tgz", "openshell", "0.2.0");
        let text = refuse(&Args {
            chart: Some(v2.clone()),
            ..args.clone()
        });
        assert!(text.contains(&v2.display().to_string()), "{text}");
        assert!(
            text.contains("openshell-0.2.0.tgz") && text.contains("openshell-0.1.0.tgz"),
            "{text}"
        );
        // A gzip tar without Chart.yaml.
        let plain = t.path().join("plain.tgz");
        write_compressed(
            &plain,
            &tar_bytes(&[("x/values.yaml", b"a: 1\n")]),
            Compression::Gzip,
        )
        .expect("gzip");
        let text = refuse(&Args {
            chart: Some(plain),
            ..args.clone()
        });
        assert!(
            text.contains("plain.tgz: not a Helm chart archive: no <chart>/Chart.yaml"),
            "{text}"
        );
        // An uncompressed chart.
        let raw = t.path().join("raw.tgz");
        std::fs::write(
            &raw,
            tar_bytes(&[("openshell/Chart.yaml", b"name: openshell\n")]),
        )
        .expect("write");
        assert!(refuse(&Args {
            chart: Some(raw),
            ..args.clone()
        })
        .contains("raw.tgz: not a Helm chart archive"));
        // A supervisor for the other arch.
        let arm = t.path().join("openshell-sandbox-arm64");
        std::fs::write(&arm, elf::header(elf::machine_of(Arch::Aarch64), 3)).expect("write");
        let text = refuse(&Args {
            sandbox_bin: Some(arm.clone()),
            ..args.clone()
        });
        assert!(text.starts_with("--sandbox-bin "), "{text}");
        assert!(text.contains(&arm.display().to_string()), "{text}");
        assert!(
            text.contains("aarch64") && text.contains("x86_64"),
            "{text}"
        );
        // An image archive k3s would skip, and two archives with one name.
        let xz = t.path().join("gateway.tar.xz");
        std::fs::write(&xz, b"x").expect("write");
        let text = refuse(&Args {
            images: vec![xz.clone()],
            ..args.clone()
        });
        assert!(
            text.starts_with(&format!("--images {}", xz.display())),
            "{text}"
        );
        let dir = t.path().join("more");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::copy(&args.images[0], dir.join("gateway.tar.zst")).expect("copy");
        let text = refuse(&Args {
            images: vec![args.images[0].clone(), dir],
            ..args
        });
        assert!(
            text.contains("would both be var/lib/rancher/k3s/agent/images/gateway.tar.zst"),
            "{text}"
        );
    }

    /// The images the bundled manifests name, read back as the build reads the deployed ones.
    fn bundled_root(t: &Path) -> PathBuf {
        let root = t.join("root");
        let deployed = root.join(DEPLOYED);
        std::fs::create_dir_all(&deployed).expect("mkdir");
        for f in ["openshell-helmchart.yaml", "agent-sandbox.yaml"] {
            let from = crate::paths::workspace()
                .join("rootfs/gateway/opt/openshell/manifests")
                .join(f);
            std::fs::copy(from, deployed.join(f)).expect("copy");
        }
        root
    }

    #[test]
    fn without_a_payload_one_line_per_missing_piece_says_what_is_lacking() {
        let t = tempfile::tempdir().expect("tmp");
        let wanted = wanted_images(&bundled_root(t.path())).expect("wanted");
        let refs: Vec<&str> = wanted.iter().map(|w| w.reference.as_str()).collect();
        assert!(
            refs.contains(&"ghcr.io/nvidia/openshell/gateway:latest"),
            "{refs:?}"
        );
        assert!(
            refs.contains(&"registry.k8s.io/agent-sandbox/agent-sandbox-controller:v0.1.0"),
            "{refs:?}"
        );
        assert!(
            refs.iter().any(|r| r.contains("sandboxes/base")),
            "{refs:?}"
        );
        let none = Payload::default();
        let lacks = none.lacks(&wanted, "openshell-0.1.0.tgz");
        assert_eq!(lacks.len(), 2 + wanted.len(), "{lacks:#?}");
        assert!(
            lacks[0].starts_with("no chart (--chart FILE)"),
            "{}",
            lacks[0]
        );
        assert!(
            lacks[0].contains("the HelmChart install will fail"),
            "{}",
            lacks[0]
        );
        assert!(lacks
            .iter()
            .any(|l| l.contains("agent-sandbox-controller:v0.1.0")
                && l.contains("agent-sandbox.yaml")));
        assert!(lacks
            .last()
            .expect("line")
            .starts_with("no sandbox supervisor"));
        let m = manifest_json(&none, &lacks);
        assert!(m["chart"]["absent"]
            .as_str()
            .expect("absent")
            .contains("HelmChart install"));
        assert!(m["sandbox_supervisor"]["absent"]
            .as_str()
            .expect("absent")
            .contains("--sandbox-bin"));
        assert_eq!(m["lacks"].as_array().expect("list").len(), lacks.len());
        // With the full payload only the images no archive holds are left (here: the
        // controller and the sandbox base; `openshell/gateway` short names compare as
        // containerd stores them).
        let args = given(t.path());
        let p = resolve(Arch::X86_64, &args, None, &bundled_helmchart()).expect("resolved");
        let lacks = p.lacks(&wanted, "openshell-0.1.0.tgz");
        assert_eq!(lacks.len(), wanted.len() - 1, "{lacks:#?}");
        assert!(
            lacks.iter().all(|l| l.starts_with("no image archive")),
            "{lacks:#?}"
        );
        assert!(
            !lacks.iter().any(|l| l.contains("openshell/gateway:latest")),
            "{lacks:#?}"
        );
    }
}
