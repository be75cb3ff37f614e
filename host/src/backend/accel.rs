//! qemu's accelerator for one boot (`--accel auto|kvm|tcg`). `auto` runs KVM where KVM can run
//! the guest: `/dev/kvm` must make a VM, and a paused qemu with the boot's machine and vCPU
//! model must come up under KVM. On some machines (these CI hosts) the first passes and qemu
//! aborts setting the vCPU's MSRs ("failed to set MSR 0x10a"), within 0.1 s and before any guest
//! code runs; the probe sees that and the boot falls back to software emulation, saying why.
//!
//! A probe rather than restarting a failed boot: it costs a user whose KVM works one paused
//! qemu start (about 0.1 s, measured) and no changes to the boot itself, where a restart would
//! have to tear down and restart the vhost-user daemons, which exit with their first qemu.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use openshell_shared::Arch;

use super::kvm;
use super::qemu::{kvm_probe_args, Accel};
use super::spec::Engine;

/// How long the paused qemu may take to come up and quit before KVM counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The accelerator picked for a boot, and why (for the summary line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub engine: Engine,
    /// What `--accel` asked for and what it got, e.g. `auto: tcg, since ...`.
    pub why: String,
    /// Whether `auto` wanted KVM and fell back.
    pub fell_back: bool,
}

/// Resolves `--accel` for a guest of `arch` run by `program`. `kvm` is checked (the device
/// makes a VM) but not probed: the user asked for it, and qemu's own error then says why.
pub fn resolve(
    accel: Accel,
    arch: Arch,
    program: &Path,
) -> Result<AccelChoice, kvm::HypervisorError> {
    let chosen = |engine, why: String, fell_back| AccelChoice {
        engine,
        why,
        fell_back,
    };
    match accel {
        Accel::Tcg => Ok(chosen(Engine::Tcg, "tcg (--accel tcg)".into(), false)),
        Accel::Kvm => {
            kvm::check_kvm(Path::new(kvm::KVM_DEVICE))?;
            Ok(chosen(Engine::Kvm, "kvm (--accel kvm)".into(), false))
        }
        Accel::Auto if arch != Arch::host() => Ok(chosen(
            Engine::Tcg,
            format!(
                "auto: tcg, since KVM runs only {} guests here",
                Arch::host().name()
            ),
            false,
        )),
        Accel::Auto if cfg!(target_os = "macos") => Ok(chosen(
            Engine::Tcg,
            "auto: tcg, since qemu has no KVM on macOS (libkrun runs on Hypervisor.framework)"
                .into(),
            false,
        )),
        Accel::Auto => Ok(match kvm::check_kvm(Path::new(kvm::KVM_DEVICE)) {
            Err(e) => chosen(Engine::Tcg, format!("auto: tcg, since {e}"), true),
            Ok(()) => match probe(program, arch, PROBE_TIMEOUT) {
                Ok(took) => chosen(
                    Engine::Kvm,
                    format!(
                        "auto: kvm (qemu set up a KVM vCPU in {} ms)",
                        took.as_millis()
                    ),
                    false,
                ),
                Err(why) => chosen(
                    Engine::Tcg,
                    format!("auto: tcg, since KVM cannot run a guest here: {why}"),
                    true,
                ),
            },
        }),
    }
}

/// Starts `program` paused under KVM with the boot's machine and vCPU model and tells it to
/// quit; `Ok` with the time it took when it quits cleanly, else what went wrong (its exit
/// status and first line of stderr).
pub fn probe(program: &Path, arch: Arch, timeout: Duration) -> Result<Duration, String> {
    run_paused(program, kvm_probe_args(arch), timeout)
}

/// Runs `program` with `args` (a paused qemu with its monitor on stdin), tells it to quit, and
/// judges how it ended.
fn run_paused(
    program: &Path,
    args: Vec<std::ffi::OsString>,
    timeout: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let name = program.display();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    // A qemu that already died has closed its end: the write's error says nothing more.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"quit\n");
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < timeout => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{name} -accel kvm did not come up and quit within {} s",
                    timeout.as_secs()
                ));
            }
            Err(e) => return Err(format!("cannot wait for {name}: {e}")),
        }
    };
    if status.success() {
        return Ok(started.elapsed());
    }
    let mut stderr = String::new();
    if let Some(pipe) = child.stderr.take() {
        let _ = pipe.take(4096).read_to_string(&mut stderr);
    }
    let first = stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no message");
    Err(format!("{name} -accel kvm {}: {first}", describe(status)))
}

/// "exited with status N" or "was killed by signal N (SIGNAME)".
fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            let name = nix::sys::signal::Signal::try_from(sig).map_or("?", |s| s.as_str());
            format!("was killed by signal {sig} ({name})")
        }
        (None, None) => "ended".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn qemu_here() -> Option<PathBuf> {
        let program = PathBuf::from(format!("qemu-system-{}", Arch::host().name()));
        Command::new(&program)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| program)
    }

    #[test]
    fn tcg_is_taken_as_asked_and_a_foreign_guest_never_probes() {
        let none = Path::new("/nonexistent/qemu");
        let tcg = resolve(Accel::Tcg, Arch::host(), none).expect("tcg");
        assert_eq!((tcg.engine, tcg.fell_back), (Engine::Tcg, false));
        let other = match Arch::host() {
            Arch::X86_64 => Arch::Aarch64,
            Arch::Aarch64 => Arch::X86_64,
        };
        let foreign = resolve(Accel::Auto, other, none).expect("auto");
        assert_eq!(foreign.engine, Engine::Tcg);
        assert!(foreign.why.contains("KVM runs only"), "{}", foreign.why);
    }

    /// A program that cannot start is a failed probe, named.
    #[test]
    fn a_missing_qemu_fails_the_probe_by_name() {
        let err = probe(Path::new("/nonexistent/qemu"), Arch::host(), PROBE_TIMEOUT).unwrap_err();
        assert!(err.starts_with("cannot run /nonexistent/qemu"), "{err}");
    }

    /// The probe's verdict is qemu's own: the same machine and vCPU started for a boot with
    /// KVM fails exactly when the probe does (on these CI hosts: SIGABRT setting an MSR), and
    /// `auto` picks the engine accordingly. Where KVM works, both succeed and `auto` is KVM.
    #[test]
    fn the_probe_agrees_with_a_real_kvm_start() {
        let Some(qemu) = qemu_here() else {
            eprintln!("skipped: no qemu here");
            return;
        };
        if kvm::check_kvm(Path::new(kvm::KVM_DEVICE)).is_err() {
            let auto = resolve(Accel::Auto, Arch::host(), &qemu).expect("auto");
            assert_eq!((auto.engine, auto.fell_back), (Engine::Tcg, true));
            assert!(auto.why.contains("/dev/kvm"), "{}", auto.why);
            return;
        }
        let verdict = probe(&qemu, Arch::host(), PROBE_TIMEOUT);
        // The same start without the monitor: a failing KVM ends qemu on its own, a working
        // one leaves it paused until it is killed.
        let mut paused = Command::new(&qemu)
            .args(
                kvm_probe_args(Arch::host())
                    .into_iter()
                    .filter(|a| a != "-monitor" && a != "stdio"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run qemu");
        let deadline = Instant::now() + Duration::from_secs(3);
        let ended = loop {
            match paused.try_wait().expect("wait") {
                Some(status) => break Some(status),
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                None => break None,
            }
        };
        if ended.is_none() {
            let _ = paused.kill();
            let _ = paused.wait();
        }
        let kvm_failed = ended.is_some_and(|s| !s.success());
        assert_eq!(
            verdict.is_err(),
            kvm_failed,
            "probe {verdict:?}, paused qemu {ended:?}"
        );
        let auto = resolve(Accel::Auto, Arch::host(), &qemu).expect("auto");
        if kvm_failed {
            assert_eq!((auto.engine, auto.fell_back), (Engine::Tcg, true));
            assert!(
                auto.why.contains("KVM cannot run a guest here"),
                "{}",
                auto.why
            );
        } else {
            assert_eq!(auto.engine, Engine::Kvm, "{}", auto.why);
        }
    }

    /// The probe quits a healthy qemu instead of waiting for its timeout: under TCG the same
    /// paused start succeeds, quickly; a qemu that fails is reported with its status and error.
    #[test]
    fn a_healthy_paused_qemu_quits_when_told() {
        let Some(qemu) = qemu_here() else {
            eprintln!("skipped: no qemu here");
            return;
        };
        let with = |accel: &str, extra: &[&str]| -> Vec<std::ffi::OsString> {
            kvm_probe_args(Arch::host())
                .into_iter()
                .map(|a| if a == "kvm" { accel.into() } else { a })
                .chain(extra.iter().map(Into::into))
                .collect()
        };
        let took = run_paused(&qemu, with("tcg", &[]), PROBE_TIMEOUT).expect("tcg quits");
        assert!(took < PROBE_TIMEOUT, "{took:?}");
        let err = run_paused(&qemu, with("tcg", &["-m", "nonsense"]), PROBE_TIMEOUT).unwrap_err();
        assert!(err.contains("exited with status 1: "), "{err}");
    }
}
