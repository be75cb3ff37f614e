//! `cargo xtask test`: every check, in the order that fails fastest: formatting, lints, unit and
//! property tests, artifacts for both arches, VM tests, guest tests on aarch64 under qemu-user,
//! the gateway root filesystem (built, rebuilt from scratch, booted with the stand-in k3s; see
//! test_gateway.rs), the macOS build of the host, and short fuzzing runs of the boot channel decoder and the DHCP
//! reply parser.

use std::process::Command;

use openshell_shared::Arch;

use crate::artifacts::artifacts;
use crate::error::{Error, Result};
use crate::paths::workspace;
use crate::tools::cargo;
use crate::{cache, tools};

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

fn step(name: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("xtask test: {name}");
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(workspace());
    }
    crate::process::run(cmd).map_err(|e| Error::msg(format!("step `{name}` failed: {e}")))
}

/// Passed and failed counts from cargo test's `test result:` lines.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
}

impl Tally {
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let n: u64 = n
                .trim_start_matches("ok.")
                .trim_start_matches("FAILED.")
                .parse()
                .unwrap_or(0);
            match label {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Runs a cargo test step, echoing its output and counting its results.
fn test_step(name: &str, cmd: &mut Command, tally: &mut Tally) -> Result<()> {
    use std::io::BufRead;
    eprintln!("xtask test: {name}");
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(workspace());
    }
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
        Err(Error::msg(format!("step `{name}` failed ({status})")))
    }
}

pub fn run(args: TestArgs) -> Result<()> {
    let arches: Vec<Arch> = Arch::ALL
        .into_iter()
        .filter(|a| !(args.skip_aarch64 && *a == Arch::Aarch64))
        .collect();
    if args.gateway_only {
        return crate::test_gateway::run(&arches);
    }
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
    // For the host's libkrun unit tests only: OPENSHELL_LIBKRUN itself would reach the hosts the
    // VM tests start.
    eprintln!("xtask test: libkrun");
    cmd.env("OPENSHELL_TEST_LIBKRUN", crate::libkrun::build()?);
    let mut tally = Tally::default();
    test_step(
        "cargo test --workspace (unit, property and VM tests)",
        &mut cmd,
        &mut tally,
    )?;
    if arches.contains(&Arch::Aarch64) {
        // Unit tests only: the integration tests exec the binary, which needs binfmt_misc.
        for (package, kinds) in [
            ("openshell-init", "--lib --bins"),
            ("openshell-shared", "--lib"),
        ] {
            test_step(
                &format!("{package} unit tests on aarch64 under qemu-user"),
                Command::new(cargo())
                    .args(["test", "-p", package])
                    .args(kinds.split(' '))
                    .args(["--target", "aarch64-unknown-linux-musl"]),
                &mut tally,
            )?;
        }
    }
    // After the VM tests: a Debian root, built twice and booted with the stand-in k3s.
    eprintln!("xtask test: gateway root filesystem (stand-in k3s)");
    crate::test_gateway::run(&arches)
        .map_err(|e| Error::msg(format!("step `gateway root filesystem` failed: {e}")))?;
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
        // (what, crate dir, target, extra flags). The DHCP parser is fuzzed as the guest ships
        // it (-O): dhcproto has debug_assert!s on option lengths that hostile input trips, and
        // the release guest has them compiled out.
        let targets: [(&str, &str, &str, &[&str]); 2] = [
            (
                "the boot channel decoder",
                "shared/fuzz",
                "frame_decoder",
                &[],
            ),
            (
                "the DHCP reply parser",
                "guest-init/fuzz",
                "dhcp_reply",
                &["-O"],
            ),
        ];
        for (what, dir, target, flags) in targets {
            step(
                &format!("fuzz {what}"),
                // The rustup proxy, not $CARGO: `+nightly` picks the toolchain.
                Command::new("cargo")
                    .current_dir(workspace().join(dir))
                    .args(["+nightly", "fuzz", "run"])
                    .args(flags)
                    .args([target, "--"])
                    .arg(format!("-max_total_time={}", args.fuzz_seconds))
                    .env_remove("CARGO_TARGET_DIR"),
            )?;
        }
    }
    eprintln!("xtask test: all steps passed");
    // One closing line with the totals of every test run above.
    println!("tests: {} passed, {} failed", tally.passed, tally.failed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cargo_test_result_lines() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 17.68s");
        t.add_line(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("test foo ... ok");
        assert_eq!(
            t,
            Tally {
                passed: 15,
                failed: 2
            }
        );
    }
}
