//! `cargo xtask test`: every check, in an order that fails fast and keeps both cores busy.
//!
//! 1. Formatting and lints.
//! 2. Builds: the two kernels, the gateway's Debian stages and the Go peers on threads of their
//!    own (make, debootstrap, go and cargo each leave a core idle in their serial stretches:
//!    links, downloads, dpkg) while cargo builds init, the host, libkrun and the test binaries.
//! 3. `cargo test --workspace` (unit, property and VM tests; a VM under TCG takes one core) in
//!    the foreground, while a background lane, at a lower priority so the VMs keep their core,
//!    runs what needs no VM: the gateway roots (and the x86_64 rebuild from scratch), the aarch64
//!    unit tests under qemu-user, the macOS build of the host, the fuzz targets' builds.
//! 4. The gateway roots' boots, with the fuzzing runs beside them.
//!
//! Every step's time is printed at the end, failures included.

mod embedded;
mod gateway;
mod logged;
mod tally;
mod timing;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use openshell_shared::Arch;

use crate::artifacts::artifacts;
use crate::error::{Error, Result};
use crate::paths::{target_dir, workspace};
use crate::peers;
use crate::tools::{self, cargo};
use crate::{cache, kernel};
use tally::Tally;
use timing::Clock;

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Skip everything aarch64 (VM tests, qemu-user tests).
    #[arg(long)]
    pub skip_aarch64: bool,
    /// Seconds of fuzzing (0 skips it).
    #[arg(long, default_value_t = 30)]
    pub fuzz_seconds: u32,
    /// Run only the gateway root filesystem step (build twice, manifest checks, boot).
    #[arg(long)]
    pub gateway_only: bool,
    /// Extra arguments for `cargo test` (e.g. a test name filter).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

/// The lane names in the step table.
const MAIN: &str = "main";
const BESIDE: &str = "beside";

pub fn run(args: TestArgs) -> Result<()> {
    let arches: Vec<Arch> = Arch::ALL
        .into_iter()
        .filter(|a| !(args.skip_aarch64 && *a == Arch::Aarch64))
        .collect();
    let clock = Arc::new(Clock::default());
    let start = Instant::now();
    let result = if args.gateway_only {
        gateway_only(&clock, &arches)
    } else {
        everything(&clock, &args, &arches)
    };
    eprint!("{}", clock.table(start.elapsed()));
    let tally = result?;
    eprintln!("xtask test: all steps passed");
    // One closing line with the totals of every test run above.
    println!("tests: {} passed, {} failed", tally.passed, tally.failed);
    Ok(())
}

fn gateway_only(clock: &Arc<Clock>, arches: &[Arch]) -> Result<Tally> {
    let mut inits = Vec::new();
    for arch in arches {
        inits.push((*arch, tools::init(*arch)?));
    }
    let Some(roots) = gateway::build_all(clock, BESIDE, &inits)? else {
        return Ok(Tally::default());
    };
    gateway::boot_all(clock, MAIN, &roots)?;
    Ok(Tally::default())
}

fn everything(clock: &Arc<Clock>, args: &TestArgs, arches: &[Arch]) -> Result<Tally> {
    lint(clock)?;
    // Started now, joined when their results are needed.
    let kernels = spawn(clock, "kernels", arches.to_vec(), |clock, arches| {
        for arch in arches {
            clock.step(BESIDE, &format!("kernel {}", arch.name()), || {
                kernel::build(arch)
            })?;
        }
        Ok(())
    });
    let debian = spawn(clock, "debian", arches.to_vec(), |clock, arches| {
        let ok = gateway::debootstrap_all(&clock, BESIDE, &arches)?;
        // Real containerd and runc, for the VM tests on each arch.
        if ok {
            for arch in &arches {
                clock.step(
                    BESIDE,
                    &format!("containerd packages {}", arch.name()),
                    || crate::containerd_root::package_stage(*arch),
                )?;
            }
        }
        Ok(ok)
    });
    let go_peers = spawn(clock, "go peers", (), |clock, ()| {
        let gvproxy = clock.step(BESIDE, "gvproxy", || peers::GVPROXY.build())?;
        let kine = clock.step(BESIDE, "kine", || peers::KINE.build())?;
        Ok([
            ("OPENSHELL_TEST_GVPROXY", gvproxy),
            ("OPENSHELL_TEST_KINE", kine),
        ])
    });
    let mut cmd = Command::new(cargo());
    cmd.current_dir(workspace())
        .args(["test", "--workspace"])
        .args(&args.cargo_test_args);
    let inits = prepare_foreground(clock, arches, &mut cmd)?;
    cmd.envs(join(go_peers)?);
    join(kernels)?;
    let embedded = base_roots_and_bundles(clock, arches, &mut cmd)?;
    let debian_ok = join(debian)?;
    containerd_roots(clock, &inits, debian_ok, &mut cmd)?;
    let lane = spawn(
        clock,
        "beside the VM tests",
        (inits, args.fuzz_seconds > 0, debian_ok, embedded),
        |clock, (inits, fuzz, debian_ok, embedded)| {
            beside_vm_tests(&clock, &inits, fuzz, debian_ok, embedded)
        },
    );
    let mut tally = Tally::default();
    let foreground = clock.step(
        MAIN,
        "cargo test --workspace (unit, property and VM tests)",
        || echo_and_count(&mut cmd, &mut tally),
    );
    // The lane is joined even when the foreground failed, so its result is reported too.
    let beside = join(lane);
    foreground?;
    let (aarch64_text, roots) = beside?;
    tally.add_text(&aarch64_text);
    let fuzzing = spawn(clock, "fuzzing", args.fuzz_seconds, |clock, seconds| {
        fuzz_all(&clock, seconds, false)
    });
    if let Some(roots) = roots {
        gateway::boot_all(clock, MAIN, &roots)?;
    }
    join(fuzzing)?;
    Ok(tally)
}

/// `cargo fmt --check` and clippy over the whole workspace, warnings denied.
fn lint(clock: &Arc<Clock>) -> Result<()> {
    clock.step(MAIN, "cargo fmt --check", || {
        crate::process::run(
            Command::new(cargo())
                .current_dir(workspace())
                .args(["fmt", "--all", "--", "--check"]),
        )
    })?;
    clock.step(MAIN, "cargo clippy", || {
        crate::process::run(Command::new(cargo()).current_dir(workspace()).args([
            "clippy",
            "--quiet",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    Ok(())
}

/// Each arch's base root and its bundle, built and named to `cmd` through the variables the VM
/// tests read; returns the x86_64 bundle and vsock helper, for the host with a bundle built in.
fn base_roots_and_bundles(
    clock: &Arc<Clock>,
    arches: &[Arch],
    cmd: &mut Command,
) -> Result<Option<(PathBuf, PathBuf)>> {
    let mut embedded = None;
    for arch in arches {
        let a = clock.step(MAIN, &format!("base root {}", arch.name()), || {
            artifacts(*arch)
        })?;
        let list = cache::root().join(format!("test-artifacts-{}.json", arch.name()));
        std::fs::write(&list, a.to_json()).map_err(|e| Error::io("write", &list, e))?;
        cmd.env(
            format!("OPENSHELL_TEST_ARTIFACTS_{}", arch.name().to_uppercase()),
            &list,
        );
        // tests/vm/bundle.rs boots this (seconds: the base root is small).
        let bundle = crate::bundle::default_path("base", *arch);
        clock.step(MAIN, &format!("base bundle {}", arch.name()), || {
            crate::bundle::write(&a, *arch, "base", &bundle)
        })?;
        cmd.env(
            format!("OPENSHELL_TEST_BUNDLE_{}", arch.name().to_uppercase()),
            &bundle,
        );
        if *arch == Arch::X86_64 {
            embedded = Some((bundle, a.vsock_helper.clone()));
        }
    }
    Ok(embedded)
}

/// The containerd-test root of each arch, named to `cmd`.
///
/// Without the Debian stages there is no containerd root: its tests then skip, naming the
/// variable (under CI they fail).
fn containerd_roots(
    clock: &Arc<Clock>,
    inits: &[(Arch, PathBuf)],
    debian_ok: bool,
    cmd: &mut Command,
) -> Result<()> {
    if !debian_ok {
        return Ok(());
    }
    for (arch, init) in inits {
        let root = clock.step(
            MAIN,
            &format!("containerd-test root {}", arch.name()),
            || crate::containerd_root::build(*arch, || Ok(init.clone())),
        )?;
        cmd.env(
            format!(
                "OPENSHELL_TEST_CONTAINERD_ROOTFS_{}",
                arch.name().to_uppercase()
            ),
            root,
        );
    }
    Ok(())
}

/// Everything the foreground's `cargo test` needs besides the kernels and base roots, built
/// while the kernels build; sets the variables that point the tests at them. Returns each
/// arch's openshell-init (the background lane must not run cargo in the workspace's target
/// directory while the foreground's `cargo test` holds it).
fn prepare_foreground(
    clock: &Clock,
    arches: &[Arch],
    cmd: &mut Command,
) -> Result<Vec<(Arch, PathBuf)>> {
    let mut inits = Vec::new();
    for arch in arches {
        let init = clock.step(MAIN, &format!("openshell-init {}", arch.name()), || {
            tools::init(*arch)
        })?;
        inits.push((*arch, init));
    }
    let host = clock.step(MAIN, "openshell-host", || tools::host(false))?;
    cmd.env("OPENSHELL_HOST_BIN", host);
    // For the host's libkrun unit tests only: OPENSHELL_LIBKRUN itself would reach the hosts the
    // VM tests start.
    let libkrun = clock.step(MAIN, "libkrun", crate::libkrun::build)?;
    cmd.env("OPENSHELL_TEST_LIBKRUN", libkrun);
    clock.step(MAIN, "vhost-device-vsock", tools::vsock_helper)?;
    clock.step(MAIN, "test binaries", || {
        let mut build = Command::new(cargo());
        build
            .current_dir(workspace())
            .args(["test", "--workspace", "--no-run", "--quiet"]);
        crate::process::run(&mut build)
    })?;
    Ok(inits)
}

/// The background lane while the VM tests run: one job at a time, at a lower priority, output in
/// logs. Returns the aarch64 unit tests' output (for the tally) and the gateway roots. The
/// gateway roots come first: they need no cargo, and by the time the cargo jobs start the
/// foreground's `cargo test` is long past its own build check.
fn beside_vm_tests(
    clock: &Clock,
    inits: &[(Arch, PathBuf)],
    fuzz: bool,
    debian_ok: bool,
    embedded: Option<(PathBuf, PathBuf)>,
) -> Result<(String, Option<gateway::Roots>)> {
    let roots = if debian_ok {
        gateway::build_all(clock, BESIDE, inits)?
    } else {
        None
    };
    let mut aarch64_text = String::new();
    if inits.iter().any(|(a, _)| *a == Arch::Aarch64) {
        // Unit tests only: the integration tests exec the binary, which needs binfmt_misc.
        for (package, kinds) in [
            ("openshell-init", "--lib --bins"),
            ("openshell-shared", "--lib"),
        ] {
            let name = format!("{package} unit tests on aarch64 under qemu-user");
            aarch64_text += &clock.step(BESIDE, &name, || {
                logged::run(
                    &format!("aarch64-{package}"),
                    beside(cargo())
                        .args(["test", "-p", package])
                        .args(kinds.split(' '))
                        .args(["--target", "aarch64-unknown-linux-musl"]),
                )
            })?;
        }
    }
    // xtask too: `cargo xtask sign` runs on the Mac.
    clock.step(BESIDE, "openshell-host and xtask build for macOS", || {
        logged::run(
            "macos-check",
            beside(cargo()).args([
                "check",
                "-p",
                "openshell-host",
                "-p",
                "xtask",
                "--target",
                "aarch64-apple-darwin",
            ]),
        )
    })?;
    if let Some((bundle, vsock_helper)) = embedded {
        clock.step(BESIDE, "the host with a built-in bundle boots it", || {
            embedded::check(&mut beside(cargo()), &bundle, &vsock_helper)
        })?;
    }
    if fuzz {
        fuzz_all(clock, 0, true)?;
    }
    Ok((aarch64_text, roots))
}

/// A command for the background lane: under `nice`, so the VM tests' TCG threads win the CPU,
/// and with a cargo target directory of its own, so the lane's builds never hold the lock the
/// foreground's cargo needs.
fn beside(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "10"])
        .arg(program)
        .current_dir(workspace())
        .env("CARGO_TARGET_DIR", target_dir().join("beside"));
    cmd
}

/// The fuzz targets: (what, crate dir, target, extra flags). The DHCP parser is fuzzed as the
/// guest ships it (-O): dhcproto has debug_assert!s on option lengths that hostile input trips,
/// and the release guest has them compiled out.
const FUZZ_TARGETS: [(&str, &str, &str, &[&str]); 3] = [
    (
        "the boot channel decoder",
        "shared/fuzz",
        "frame_decoder",
        &[],
    ),
    ("the bundle's tar reader", "shared/fuzz", "bundle_tar", &[]),
    (
        "the DHCP reply parser",
        "guest-init/fuzz",
        "dhcp_reply",
        &["-O"],
    ),
];

/// Builds the fuzz targets one after the other (`build_only`), or fuzzes each for `seconds`, all
/// at once: a fuzzer keeps one core busy, and the gateway boots beside them need one more.
fn fuzz_all(clock: &Clock, seconds: u32, build_only: bool) -> Result<()> {
    if !build_only && seconds == 0 {
        return Ok(());
    }
    let fuzz = |(what, dir, target, flags): (&str, &str, &str, &[&str])| {
        // The rustup proxy, not $CARGO: `+nightly` picks the toolchain.
        let mut cmd = beside("cargo");
        cmd.current_dir(workspace().join(dir))
            .arg("+nightly")
            .args(["fuzz", if build_only { "build" } else { "run" }])
            .args(flags)
            .arg(target)
            .env_remove("CARGO_TARGET_DIR");
        if build_only {
            return clock.step(BESIDE, &format!("fuzz build: {what}"), || {
                logged::run(&format!("fuzz-build-{target}"), &mut cmd)
            });
        }
        cmd.arg("--").arg(format!("-max_total_time={seconds}"));
        clock.step(BESIDE, &format!("fuzz {what} for {seconds} s"), || {
            logged::run(&format!("fuzz-{target}"), &mut cmd)
        })
    };
    if build_only {
        for target in FUZZ_TARGETS {
            fuzz(target)?;
        }
        return Ok(());
    }
    std::thread::scope(|s| {
        let runs: Vec<_> = FUZZ_TARGETS.map(|t| s.spawn(move || fuzz(t))).into();
        runs.into_iter()
            .map(|r| {
                r.join()
                    .map_err(|_| Error::msg("a fuzzing thread panicked"))?
            })
            .collect::<Result<Vec<String>>>()
            .map(drop)
    })
}

/// Runs a cargo test command, echoing its output and counting its results.
fn echo_and_count(cmd: &mut Command, tally: &mut Tally) -> Result<()> {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::msg(format!("cannot run cargo: {e}")))?;
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
            println!("{line}");
            tally.add_line(&line);
        }
    }
    let status = child
        .wait()
        .map_err(|e| Error::msg(format!("cargo test: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::msg(format!("cargo test failed ({status})")))
    }
}

/// Runs `f` on a thread of its own with the shared clock.
fn spawn<I: Send + 'static, T: Send + 'static>(
    clock: &Arc<Clock>,
    what: &'static str,
    input: I,
    f: impl FnOnce(Arc<Clock>, I) -> Result<T> + Send + 'static,
) -> (&'static str, JoinHandle<Result<T>>) {
    let clock = Arc::clone(clock);
    (what, std::thread::spawn(move || f(clock, input)))
}

fn join<T>((what, handle): (&'static str, JoinHandle<Result<T>>)) -> Result<T> {
    handle
        .join()
        .map_err(|_| Error::msg(format!("the `{what}` thread panicked")))?
}
