//! Which user-mode network a boot gets and where gvproxy comes from. `--net auto` (the default)
//! takes gvproxy whenever one is found, on Linux as on macOS, so the path every macOS user boots
//! is the one CI runs; without one Linux falls back to passt and macOS stops, naming every place
//! it looked. gvproxy is `--gvproxy PATH`, else `gvproxy` on PATH, else the newest version
//! `cargo xtask` built into the artifact cache, else podman's helper directories.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::NetBackend;

/// `--net`: a network by name, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetChoice {
    /// gvproxy when one is found, else passt (Linux) or an error (macOS).
    Auto,
    /// gvisor-tap-vsock's `gvproxy`.
    Gvproxy,
    /// Debian's `passt`, over a unix stream socket (Linux only).
    Passt,
    /// No network device: the guest comes up on a dummy interface.
    None,
}

/// The network a boot gets, the gvproxy it runs (when it is gvproxy), and why, for `up`'s line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub backend: NetBackend,
    pub gvproxy: Option<PathBuf>,
    pub why: String,
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "network: {} ({})", self.backend, self.why)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetChoiceError {
    #[error("--gvproxy {path}: {reason}")]
    Given { path: PathBuf, reason: String },
    #[error("no gvproxy: {searched}; build it with `cargo xtask peers`, install podman, or pass --gvproxy PATH{alternative}")]
    NotFound {
        searched: String,
        alternative: &'static str,
    },
}

/// Where gvproxy is looked for besides `--gvproxy`: the environment's PATH, the artifact cache,
/// podman's helper directories. Explicit so the lookup is tested without touching the machine's.
#[derive(Debug, Clone, Default)]
pub struct Search {
    pub path: Option<OsString>,
    pub cache: Option<PathBuf>,
    pub podman: Vec<PathBuf>,
}

impl Search {
    /// This machine's places.
    pub fn from_env() -> Self {
        Self {
            path: std::env::var_os("PATH"),
            cache: Some(openshell_shared::cache::root()),
            podman: PODMAN_DIRS.iter().map(PathBuf::from).collect(),
        }
    }
}

/// Where podman's packages put their helpers (podman's own `helper_binaries_dir` defaults):
/// Homebrew's and the macOS installer's first, then the Linux distributions'.
const PODMAN_DIRS: &[&str] = &[
    "/opt/podman/bin",
    "/opt/homebrew/opt/podman/libexec/podman",
    "/usr/local/opt/podman/libexec/podman",
    "/usr/local/libexec/podman",
    "/usr/local/lib/podman",
    "/usr/libexec/podman",
    "/usr/lib/podman",
];

/// Picks the network for `asked`; `gvproxy` is `--gvproxy`, `macos` whether passt is missing
/// from this platform.
pub fn choose(
    asked: NetChoice,
    gvproxy: Option<&Path>,
    search: &Search,
    macos: bool,
) -> Result<Network, NetChoiceError> {
    let plain = |backend| Network {
        backend,
        gvproxy: None,
        why: format!("asked for with --net {backend}"),
    };
    let found = match asked {
        NetChoice::None => return Ok(plain(NetBackend::None)),
        NetChoice::Passt => return Ok(plain(NetBackend::Passt)),
        NetChoice::Gvproxy | NetChoice::Auto => find_gvproxy(gvproxy, search),
    };
    match (found, asked) {
        (Ok((path, how)), _) => Ok(Network {
            backend: NetBackend::Gvproxy,
            why: match asked {
                NetChoice::Auto => format!("found {how}: {}", path.display()),
                _ => format!("asked for with --net gvproxy; {how}: {}", path.display()),
            },
            gvproxy: Some(path),
        }),
        (Err(Missing::Given(e)), _) => Err(e),
        (Err(Missing::Nowhere(searched)), NetChoice::Auto) if !macos => Ok(Network {
            backend: NetBackend::Passt,
            gvproxy: None,
            why: format!("no gvproxy: {searched}"),
        }),
        (Err(Missing::Nowhere(searched)), _) => Err(NetChoiceError::NotFound {
            searched,
            alternative: if macos { "" } else { ", or use --net passt" },
        }),
    }
}

enum Missing {
    /// `--gvproxy` names something that cannot be run: an error whatever `--net` says.
    Given(NetChoiceError),
    /// Looked everywhere; the text says where.
    Nowhere(String),
}

/// gvproxy and how it was found, or where it was looked for.
fn find_gvproxy(given: Option<&Path>, search: &Search) -> Result<(PathBuf, &'static str), Missing> {
    if let Some(path) = given {
        return runnable(path)
            .map(|()| (path.to_path_buf(), "given with --gvproxy"))
            .map_err(|reason| {
                Missing::Given(NetChoiceError::Given {
                    path: path.to_path_buf(),
                    reason,
                })
            });
    }
    let on_path = search
        .path
        .iter()
        .flat_map(std::env::split_paths)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join("gvproxy"))
        .find(|p| runnable(p).is_ok());
    if let Some(p) = on_path {
        return Ok((p, "on PATH"));
    }
    if let Some(p) = search.cache.as_deref().and_then(newest_cached) {
        return Ok((p, "in the cache"));
    }
    let podman = search
        .podman
        .iter()
        .map(|d| d.join("gvproxy"))
        .find(|p| runnable(p).is_ok());
    if let Some(p) = podman {
        return Ok((p, "in podman's helpers"));
    }
    let mut places = vec!["not given with --gvproxy".to_string(), "not on PATH".into()];
    if let Some(cache) = &search.cache {
        places.push(format!("not in {}/go/gvproxy-*", cache.display()));
    }
    if !search.podman.is_empty() {
        let dirs: Vec<String> = search
            .podman
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        places.push(format!("not in {}", dirs.join(", ")));
    }
    Err(Missing::Nowhere(places.join("; ")))
}

/// The newest gvproxy in the cache (versions compared number by number, so v0.10 beats v0.9).
fn newest_cached(cache: &Path) -> Option<PathBuf> {
    openshell_shared::cache::go_programs(cache, "gvproxy")
        .into_iter()
        .filter(|(_, p)| runnable(p).is_ok())
        .max_by_key(|(v, _)| version_key(v))
        .map(|(_, p)| p)
}

/// `v0.8.9` → [0, 8, 9]; parts that are not numbers count as 0.
fn version_key(version: &str) -> Vec<u64> {
    version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|part| part.parse().unwrap_or(0))
        .collect()
}

/// A regular file someone may execute.
fn runnable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("not executable".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(path: &Path) -> PathBuf {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path.to_path_buf()
    }

    /// A machine with nothing installed: an empty PATH directory, an empty cache, no podman.
    fn empty(t: &Path) -> Search {
        std::fs::create_dir_all(t.join("bin")).expect("bin");
        Search {
            path: Some(t.join("bin").into_os_string()),
            cache: Some(t.join("cache")),
            podman: vec![t.join("podman")],
        }
    }

    #[test]
    fn auto_takes_gvproxy_when_found_and_says_where() {
        let t = tempfile::tempdir().expect("tmp");
        let mut search = empty(t.path());
        let cached = program(&t.path().join("cache/go/gvproxy-v0.8.9/gvproxy"));
        let n = choose(NetChoice::Auto, None, &search, false).expect("cache");
        assert_eq!(n.backend, NetBackend::Gvproxy);
        assert_eq!(n.gvproxy.as_deref(), Some(cached.as_path()));
        assert_eq!(
            n.to_string(),
            format!(
                "network: gvproxy (found in the cache: {})",
                cached.display()
            )
        );
        // PATH comes before the cache; --gvproxy before both.
        let on_path = program(&t.path().join("bin/gvproxy"));
        let n = choose(NetChoice::Auto, None, &search, true).expect("path");
        assert_eq!(n.gvproxy.as_deref(), Some(on_path.as_path()));
        assert!(n.why.starts_with("found on PATH"), "{}", n.why);
        let given = program(&t.path().join("mine/gv"));
        let n = choose(NetChoice::Auto, Some(&given), &search, false).expect("given");
        assert_eq!(n.gvproxy.as_deref(), Some(given.as_path()));
        assert!(n.why.contains("given with --gvproxy"), "{}", n.why);
        // Podman's helpers come last.
        search.path = None;
        search.cache = None;
        let podman = program(&t.path().join("podman/gvproxy"));
        let n = choose(NetChoice::Auto, None, &search, false).expect("podman");
        assert_eq!(n.gvproxy.as_deref(), Some(podman.as_path()));
    }

    #[test]
    fn the_newest_cached_version_wins_and_unrunnable_files_are_passed_over() {
        let t = tempfile::tempdir().expect("tmp");
        let search = empty(t.path());
        program(&t.path().join("cache/go/gvproxy-v0.8.9/gvproxy"));
        let newest = program(&t.path().join("cache/go/gvproxy-v0.10.0/gvproxy"));
        // A newer version whose binary is missing, and a file on PATH that cannot be run.
        std::fs::create_dir_all(t.path().join("cache/go/gvproxy-v0.11.0")).expect("mkdir");
        std::fs::write(t.path().join("bin/gvproxy"), b"data").expect("write");
        let n = choose(NetChoice::Gvproxy, None, &search, false).expect("found");
        assert_eq!(n.gvproxy.as_deref(), Some(newest.as_path()));
        assert!(n
            .why
            .starts_with("asked for with --net gvproxy; in the cache"));
        assert!(version_key("v0.10.0") > version_key("v0.9.9"));
    }

    #[test]
    fn without_gvproxy_linux_falls_back_to_passt_and_macos_stops() {
        let t = tempfile::tempdir().expect("tmp");
        let search = empty(t.path());
        let n = choose(NetChoice::Auto, None, &search, false).expect("passt");
        assert_eq!((n.backend, n.gvproxy.clone()), (NetBackend::Passt, None));
        let line = n.to_string();
        assert!(
            line.starts_with("network: passt (no gvproxy: not given with --gvproxy; not on PATH; "),
            "{line}"
        );
        assert!(line.contains(&format!(
            "{}/go/gvproxy-*",
            t.path().join("cache").display()
        )));
        assert!(line.contains(&t.path().join("podman").display().to_string()));
        let e = choose(NetChoice::Auto, None, &search, true).expect_err("macOS");
        assert!(matches!(e, NetChoiceError::NotFound { .. }), "{e}");
        assert!(!e.to_string().contains("passt"), "{e}");
        let e = choose(NetChoice::Gvproxy, None, &search, false).expect_err("asked");
        assert!(e.to_string().ends_with("or use --net passt"), "{e}");
    }

    #[test]
    fn a_bad_gvproxy_flag_is_an_error_even_for_auto() {
        let t = tempfile::tempdir().expect("tmp");
        let search = empty(t.path());
        program(&t.path().join("bin/gvproxy"));
        let missing = t.path().join("nope/gvproxy");
        let e = choose(NetChoice::Auto, Some(&missing), &search, false).expect_err("missing");
        assert!(
            e.to_string()
                .starts_with(&format!("--gvproxy {}: ", missing.display())),
            "{e}"
        );
        let dir = t.path().join("bin");
        let e = choose(NetChoice::Gvproxy, Some(&dir), &search, false).expect_err("dir");
        assert!(e.to_string().ends_with("not a file"), "{e}");
    }

    #[test]
    fn named_networks_need_no_search() {
        let search = Search::default();
        let n = choose(NetChoice::Passt, None, &search, true).expect("passt");
        assert_eq!(n.to_string(), "network: passt (asked for with --net passt)");
        let n = choose(NetChoice::None, Some(Path::new("/nope")), &search, false).expect("none");
        assert_eq!((n.backend, n.gvproxy), (NetBackend::None, None));
    }
}
