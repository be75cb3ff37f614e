//! The real peers built from their Go modules: gvproxy (the user-mode network of every macOS
//! user) and kine (the datastore behind k3s's SQLite). Each is `go install MODULE@VERSION` at a
//! pinned version into the cache, once per version; the Go module proxy's checksum database
//! (go.sum) is the pin of the code. No Go code lives in this repository.

use std::path::PathBuf;
use std::process::Command;

use crate::cache;
use crate::error::{Error, Result};
use crate::process::run;

/// One program built from a Go module.
pub struct GoPeer {
    /// The binary's name, as `go install` names it.
    pub name: &'static str,
    /// The package path `go install` builds.
    pub package: &'static str,
    pub version: &'static str,
    /// Needs cgo (kine's SQLite driver).
    pub cgo: bool,
}

/// gvproxy from gvisor-tap-vsock, the version CI and the tests run.
pub const GVPROXY: GoPeer = GoPeer {
    name: "gvproxy",
    package: "github.com/containers/gvisor-tap-vsock/cmd/gvproxy",
    version: "v0.8.9",
    cgo: false,
};

/// kine with its SQLite backend, the datastore k3s embeds.
pub const KINE: GoPeer = GoPeer {
    name: "kine",
    package: "github.com/k3s-io/kine",
    version: "v0.17.5",
    cgo: true,
};

impl GoPeer {
    /// The binary, built into the cache when missing (a few minutes the first time: Go
    /// downloads the module and its dependencies through its proxy).
    pub fn build(&self) -> Result<PathBuf> {
        let dir = openshell_shared::cache::go_program_dir(&cache::root(), self.name, self.version);
        let dir = cache::entry(&dir, |tmp| {
            eprintln!(
                "xtask: go install {}@{} (once per version)",
                self.package, self.version
            );
            let mut cmd = Command::new(go()?);
            cmd.arg("install")
                .arg(format!("{}@{}", self.package, self.version))
                .env("GOBIN", tmp)
                // The checksum database is what makes the version a pin: never skip it.
                .env_remove("GONOSUMDB")
                .env_remove("GONOSUMCHECK")
                .env_remove("GOFLAGS")
                .env_remove("GOINSECURE");
            if self.cgo {
                cmd.env("CGO_ENABLED", "1");
            }
            run(&mut cmd)
        })?;
        Ok(dir.join(self.name))
    }
}

/// The Go toolchain: `$GO`, else `go` on PATH, else the usual install location.
fn go() -> Result<PathBuf> {
    if let Some(go) = std::env::var_os("GO") {
        return Ok(PathBuf::from(go));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("go"))
        .find(|p| p.is_file());
    on_path
        .or_else(|| Some(PathBuf::from("/usr/local/go/bin/go")).filter(|p| p.is_file()))
        .ok_or_else(|| {
            Error::msg(
                "the Go toolchain is needed to build gvproxy and kine: no `go` on PATH or at /usr/local/go/bin/go (set GO=PATH)",
            )
        })
}
