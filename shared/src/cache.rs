//! Where the artifact cache lives and where in it the programs built from Go modules go: `cargo
//! xtask` builds into it, `openshell-host up` looks there for gvproxy. Outside any checkout, so
//! clean clones and CI runs on one machine share it.

use std::path::{Path, PathBuf};

/// `$OPENSHELL_CACHE_DIR`, else `$XDG_CACHE_HOME/openshell-vm`, else `~/.cache/openshell-vm`.
pub fn root() -> PathBuf {
    if let Some(dir) = std::env::var_os("OPENSHELL_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("openshell-vm");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/openshell-vm")
}

/// The directory holding program `name` built from its Go module at `version`:
/// `<cache>/go/<name>-<version>/`, the binary inside it under its own name.
pub fn go_program_dir(cache: &Path, name: &str, version: &str) -> PathBuf {
    cache.join("go").join(format!("{name}-{version}"))
}

/// Every version of program `name` in the cache, as (version, binary path), in no set order.
/// Entries still being built are hidden (their directories start with a dot).
pub fn go_programs(cache: &Path, name: &str) -> Vec<(String, PathBuf)> {
    let prefix = format!("{name}-");
    let Ok(entries) = std::fs::read_dir(cache.join("go")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let dir = e.file_name().to_string_lossy().into_owned();
            let version = dir.strip_prefix(&prefix)?.to_string();
            Some((version, e.path().join(name)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_listed_and_unfinished_builds_hidden() {
        let t = std::env::temp_dir().join(format!("osh-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        for dir in [
            "gvproxy-v0.8.9",
            "gvproxy-v0.10.0",
            ".gvproxy-v0.9.0.tmp-1",
            "kine-v1",
        ] {
            std::fs::create_dir_all(t.join("go").join(dir)).expect("mkdir");
        }
        let mut found = go_programs(&t, "gvproxy");
        found.sort();
        assert_eq!(
            found,
            vec![
                ("v0.10.0".to_string(), t.join("go/gvproxy-v0.10.0/gvproxy")),
                ("v0.8.9".to_string(), t.join("go/gvproxy-v0.8.9/gvproxy")),
            ]
        );
        assert_eq!(
            go_program_dir(&t, "gvproxy", "v0.8.9"),
            t.join("go/gvproxy-v0.8.9")
        );
        assert!(go_programs(&t.join("nothing"), "gvproxy").is_empty());
        std::fs::remove_dir_all(&t).expect("clean up");
    }
}
