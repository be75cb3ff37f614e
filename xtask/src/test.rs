//! `cargo xtask test`: every check, in the order that fails fastest: formatting, lints, unit and
//! property tests, artifacts for both arches, VM tests, guest tests on aarch64 under qemu-user,
//! the macOS build of the host, and a short fuzzing run of the boot channel decoder.

use std::process::Command;

use crate::tools::cargo;
use crate::{artifacts, cache, tools, workspace, Arch, Error, Result};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Skip everything aarch64 (VM tests, qemu-user tests).
    #[arg(long)]
    pub skip_aarch64: bool,
    /// Seconds of fuzzing (0 skips it).
    #[arg(long, default_value_t = 30)]
    pub fuzz_seconds: u32,
    /// Extra arguments for `cargo test` (e.g. a test name filter).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

fn step(name: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("xtask test: {name}");
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(workspace());
    }
    crate::run(cmd).map_err(|e| Error::msg(format!("step `{name}` failed: {e}")))
}

pub fn run(args: TestArgs) -> Result<()> {
    step(
        "cargo fmt --check",
        Command::new(cargo()).args(["fmt", "--all", "--", "--check"]),
    )?;
    step(
        "cargo clippy",
        Command::new(cargo()).args([
            "clippy",
            "--quiet",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    let arches: Vec<Arch> = Arch::ALL
        .into_iter()
        .filter(|a| !(args.skip_aarch64 && *a == Arch::Aarch64))
        .collect();
    let mut cmd = Command::new(cargo());
    cmd.args(["test", "--workspace"])
        .args(&args.cargo_test_args);
    for arch in &arches {
        eprintln!("xtask test: artifacts for {}", arch.name());
        let a = artifacts(*arch)?;
        let list = cache::root().join(format!("test-artifacts-{}.json", arch.name()));
        std::fs::write(&list, a.to_json()).map_err(|e| Error::io("write", &list, e))?;
        cmd.env(
            format!("OPENSHELL_TEST_ARTIFACTS_{}", arch.name().to_uppercase()),
            &list,
        );
    }
    let host = tools::host(false)?;
    cmd.env("OPENSHELL_HOST_BIN", host);
    step(
        "cargo test --workspace (unit, property and VM tests)",
        &mut cmd,
    )?;
    if arches.contains(&Arch::Aarch64) {
        // Unit tests only: the integration tests exec the binary, which needs binfmt_misc.
        for (package, kind) in [("openshell-init", "--bins"), ("openshell-shared", "--lib")] {
            step(
                &format!("{package} unit tests on aarch64 under qemu-user"),
                Command::new(cargo()).args([
                    "test",
                    "-p",
                    package,
                    kind,
                    "--target",
                    "aarch64-unknown-linux-musl",
                ]),
            )?;
        }
    }
    step(
        "openshell-host builds for macOS",
        Command::new(cargo()).args([
            "check",
            "--quiet",
            "-p",
            "openshell-host",
            "--target",
            "aarch64-apple-darwin",
        ]),
    )?;
    if args.fuzz_seconds > 0 {
        step(
            "fuzz the boot channel decoder",
            // The rustup proxy, not $CARGO: `+nightly` picks the toolchain.
            Command::new("cargo")
                .current_dir(workspace().join("shared/fuzz"))
                .args([
                    "+nightly",
                    "fuzz",
                    "run",
                    "frame_decoder",
                    "--",
                    &format!("-max_total_time={}", args.fuzz_seconds),
                ])
                .env_remove("CARGO_TARGET_DIR"),
        )?;
    }
    eprintln!("xtask test: all steps passed");
    Ok(())
}
