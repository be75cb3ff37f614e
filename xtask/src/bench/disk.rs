//! The state disk's rounds of `cargo xtask bench boot`: a copy of the base root that can format
//! a disk (e2fsprogs and the glibc it links against, taken from the gateway's cached Debian
//! stage, as the gateway root has them) and ships a kine database, booted three ways each round:
//! without a disk (kine on the virtio-fs root), with a fresh blank disk (the state-disk phase
//! formats and seeds it, the database copied onto it) and again with that disk (a warm boot:
//! mount, journal check, binds; kine on the disk). The rows are the phases' own durations.
//!
//! What a warm disk adds to init's time is measured on a second copy without the database
//! (with it, kine's own time on each side would swamp the difference): booted without a disk and
//! with a warm one, paired each round. The warm boot's workload then runs the phase again in the
//! same boot ([`AGAIN_SCRIPT`]): the same steps on the same disk once the kernel has run their
//! code, which under emulation means once qemu has translated it.

use std::path::{Path, PathBuf};
use std::process::Command;

use openshell_shared::Arch;
use serde_json::Value;

use crate::artifacts::Artifacts;
use crate::build_names::BuildNames;
use crate::error::{Error, Result};
use crate::fixtures::crashed_root::{kine_database, KINE_DB};
use crate::{gateway, rootfs, up};

/// Copies `rel` (under the Debian stage `stage`) to `to` under the root, making its directory.
fn install(stage: &Path, rel: &str, root: &Path, to: &str, mode: u32) -> Result<()> {
    rootfs::copy(&stage.join(rel), &root.join(to), mode)
}

/// Rows of the boot bench's table.
pub const FIRST: &str = "state-disk phase, first boot (format + seed)";
pub const WARM: &str = "state-disk phase, warm boot (mount + binds)";
pub const KINE_ROOT: &str = "kine phase, database on the virtio-fs root";
pub const KINE_DISK: &str = "kine phase, database on the state disk";
/// Per round: init entry to phases done with a warm disk minus the same without a disk.
pub const ADDED: &str = "state disk: what a warm one adds to init entry -> phases done";
pub const AGAIN: &str = "state-disk phase again in the same warm boot (its code run once)";
/// The warm boot's workload that runs the phase again (in the base root).
pub const AGAIN_SCRIPT: &str = "/opt/bench/state-disk-again.sh";
/// The instances of the two roots.
pub const WITH_KINE: &str = "bench-disk";
pub const PLAIN: &str = "bench-disk-plain";
/// What a warm disk may add to init's time under TCG (issue 13).
pub const ADDED_TARGET_MS: f64 = 15.0;
/// The disk the rounds give the guest: small, so a blank one formats as users' 32 GiB would
/// (lazy inode tables make the size matter little), and sparse on the host.
pub const SIZE: &str = "1G";
/// Rows in the shipped kine database: a gateway's worth of history.
const KINE_ROWS: u64 = 5_000;
/// What mke2fs, e2fsck and resize2fs need, from the Debian stage's `usr/lib/<triple>/`.
const LIBS: &[&str] = &[
    "libext2fs.so.2",
    "libcom_err.so.2",
    "libblkid.so.1",
    "libuuid.so.1",
    "libe2p.so.2",
    "libc.so.6",
];
const TOOLS: &[&str] = &["mke2fs", "e2fsck", "resize2fs"];

/// A bench instance's root for the disk rounds ([`WITH_KINE`] or [`PLAIN`]), made from `base`
/// once and given e2fsprogs, and for [`WITH_KINE`] the kine database; reused while `base` is
/// unchanged.
pub fn prepare_root(arch: Arch, base: &Path, instance: &str) -> Result<PathBuf> {
    let root = up::instance_root(instance, arch, base)?;
    let marker = root.join("opt/bench/disk-ready");
    if marker.exists() {
        return Ok(root);
    }
    let stage = gateway::debootstrap(arch)?.join("root");
    let triple = format!("usr/lib/{}", arch.gnu_triple());
    for tool in TOOLS {
        let rel = format!("usr/sbin/{tool}");
        install(&stage, &rel, &root, &rel, 0o755)?;
    }
    let loader = loader(arch);
    for lib in LIBS.iter().chain([&loader.0]) {
        let rel = format!("{triple}/{lib}");
        install(&stage, &rel, &root, &rel, 0o755)?;
    }
    // The interpreter path the binaries name.
    let ld = format!("{triple}/{}", loader.0);
    install(&stage, &ld, &root, loader.1, 0o755)?;
    install(&stage, "etc/mke2fs.conf", &root, "etc/mke2fs.conf", 0o644)?;
    let db = root.join(KINE_DB);
    let _ = std::fs::remove_file(&db);
    std::fs::create_dir_all(db.parent().unwrap_or(&root))
        .map_err(|e| Error::io("create", &db, e))?;
    if instance == WITH_KINE {
        kine_database(&db, KINE_ROWS).map_err(|e| Error::msg(format!("{}: {e}", db.display())))?;
    }
    std::fs::write(&marker, b"").map_err(|e| Error::io("write", &marker, e))?;
    Ok(root)
}

/// The disk rounds' own state directory (their boots' `XDG_STATE_HOME`): each bench run starts
/// from no disk image, and the user's instances are neither seen nor touched.
pub struct StateHome(tempfile::TempDir);

impl StateHome {
    pub fn new() -> Result<Self> {
        tempfile::Builder::new()
            .prefix("osh-bench-disk-")
            .tempdir()
            .map(Self)
            .map_err(|e| Error::io("create", &std::env::temp_dir(), e))
    }

    /// `openshell-host up` of instance `name` booting `root` here, with a state disk of
    /// [`SIZE`] or without one.
    pub fn up(
        &self,
        host: &Path,
        arch: Arch,
        a: &Artifacts,
        (name, root): (&str, &Path),
        with_disk: bool,
    ) -> Command {
        let mut cmd = if with_disk {
            up::host_up_with_disk(host, arch, name, a, root, SIZE)
        } else {
            up::host_up(host, arch, name, a, root)
        };
        cmd.env("XDG_STATE_HOME", self.0.path());
        cmd
    }

    /// Where the rounds' boots write their timelines.
    pub fn report(&self) -> PathBuf {
        self.0.path().join("report.json")
    }

    /// Instance `name`'s disk image.
    pub fn image(&self, name: &str) -> PathBuf {
        self.0.path().join(format!("openshell/{name}/state.img"))
    }
}

/// The dynamic loader's name in `usr/lib/<triple>/` and the interpreter path in the binaries.
fn loader(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::X86_64 => ("ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"),
        Arch::Aarch64 => ("ld-linux-aarch64.so.1", "lib/ld-linux-aarch64.so.1"),
    }
}

/// One phase of a boot's timeline: its duration in ms and what it reported on success (the
/// `NAME: ...` log line the engine sends); `Err` when the phase did not run to completion.
pub fn phase(t: &Value, name: &str) -> Result<(f64, String)> {
    let p = t["summary"]["phases"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .ok_or_else(|| Error::msg(format!("the boot report has no {name} phase")))?;
    let prefix = format!("{name}: ");
    let detail = t["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["event"]["type"] == "log")
        .filter_map(|e| e["event"]["text"].as_str()?.strip_prefix(&prefix))
        .next_back()
        .unwrap_or_default()
        .to_string();
    if p["outcome"] != "ok" {
        return Err(Error::msg(format!(
            "phase {name} did not run to completion ({})",
            p["outcome"]
        )));
    }
    let ms = p["duration_us"]
        .as_u64()
        .map(|us| us as f64 / 1000.0)
        .ok_or_else(|| Error::msg(format!("phase {name} has no duration")))?;
    Ok((ms, detail))
}

/// Checks that a state-disk phase did what its row says: formatted a blank disk on the first
/// boot, mounted an existing one on a warm boot.
pub fn check_round(detail: &str, first: bool) -> Result<()> {
    let formatted = detail.contains("formatted");
    if formatted != first {
        return Err(Error::msg(format!(
            "state-disk phase on a {} boot said: {detail}",
            if first { "first" } else { "warm" }
        )));
    }
    Ok(())
}

/// The duration of the state-disk phase that [`AGAIN_SCRIPT`] ran, from the console log it
/// printed its events to (JSON lines among the kernel's), after checking it mounted a warm disk.
pub fn again_ms(console: &str) -> std::result::Result<f64, String> {
    let events: Vec<Value> = console
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| v["msg"].clone())
        .collect();
    let detail = events
        .iter()
        .filter(|m| m["type"] == "log")
        .filter_map(|m| m["text"].as_str()?.strip_prefix("state-disk: "))
        .next_back()
        .ok_or("no state-disk line from the phase run again (did the workload run?)")?;
    check_round(detail, false).map_err(|e| e.to_string())?;
    let finished = events
        .iter()
        .find(|m| m["type"] == "phase_finished" && m["phase"] == "state-disk")
        .ok_or("the phase run again never finished")?;
    if finished["outcome"]["kind"] != "ok" {
        return Err(format!("the phase run again: {}", finished["outcome"]));
    }
    finished["duration_us"]
        .as_u64()
        .map(|us| us as f64 / 1000.0)
        .ok_or_else(|| "the phase run again has no duration".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_again_row_is_the_phase_the_workload_ran_on_a_warm_disk() {
        let console = r#"[    0.61] openshell-init: phase state-disk: ok in 162.750 ms
{"seq":0,"t_us":993747,"msg":{"type":"phase_started","phase":"state-disk"}}
[    0.99] random kernel line
{"seq":1,"t_us":1014883,"msg":{"type":"log","level":"info","text":"state-disk: /dev/vda: journal clean; mounted in 4.8 ms"}}
{"seq":2,"t_us":1015652,"msg":{"type":"phase_finished","phase":"state-disk","duration_us":19719,"outcome":{"kind":"ok"}}}
"#;
        assert_eq!(again_ms(console), Ok(19.719));
        let formatted = console.replace("journal clean", "formatted in 9 ms");
        assert!(again_ms(&formatted).unwrap_err().contains("warm"));
        let failed = console.replace(r#"{"kind":"ok"}"#, r#"{"kind":"failed","detail":"x"}"#);
        assert!(again_ms(&failed).unwrap_err().contains("failed"));
        assert!(again_ms("[ 0.1] no workload\n")
            .unwrap_err()
            .contains("no state-disk line"));
    }

    fn report(outcome: &str, detail: &str) -> Value {
        serde_json::json!({
            "summary": {"phases": [{"name": "state-disk", "outcome": outcome, "duration_us": 12_500}]},
            "events": [
                {"source": "guest", "event": {"type": "log", "level": "info", "text": "kine: other"}},
                {"source": "guest", "event": {"type": "log", "level": "info", "text": format!("state-disk: {detail}")}}
            ]
        })
    }

    #[test]
    fn a_phase_row_comes_from_the_timeline_and_must_have_run() {
        let (ms, detail) = phase(&report("ok", "formatted /dev/vda"), "state-disk").expect("row");
        assert_eq!((ms, detail.as_str()), (12.5, "formatted /dev/vda"));
        let err = phase(&report("skipped", "no disk"), "state-disk").unwrap_err();
        assert!(err.to_string().contains("skipped"), "{err}");
        assert!(phase(&report("ok", ""), "kine").is_err());
    }

    #[test]
    fn a_round_is_checked_against_what_the_phase_did() {
        check_round("formatted /dev/vda (ext4)", true).expect("first");
        check_round("mounted /dev/vda, journal clean", false).expect("warm");
        assert!(check_round("mounted /dev/vda", true).is_err());
        assert!(check_round("formatted /dev/vda", false).is_err());
    }
}
