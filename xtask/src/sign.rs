//! `cargo xtask sign [--binary P] [--identity ID]`: on macOS, signs openshell-host with the
//! entitlements in `host/entitlements.plist` (Hypervisor.framework refuses a VM to a process
//! without `com.apple.security.hypervisor`) and checks that the signature carries them.
//! Elsewhere a no-op that says so: Linux has no code signatures to satisfy.
//!
//! Ad hoc (`-`, the default) is enough on the machine that signs; an identity (a Developer ID
//! for others' machines) also turns on the hardened runtime, under which the other two
//! entitlements in the plist let the host load libkrun and keep DYLD_LIBRARY_PATH.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::paths::workspace;
use crate::process::{run, run_output};

/// The entitlements the signature must carry.
pub const REQUIRED: &[&str] = &[
    "com.apple.security.hypervisor",
    "com.apple.security.cs.disable-library-validation",
    "com.apple.security.cs.allow-dyld-environment-variables",
];

#[derive(Debug, Clone, clap::Args)]
pub struct SignArgs {
    /// The binary to sign; by default openshell-host, built in release mode first.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// codesign identity; `-` signs ad hoc (this machine only).
    #[arg(long, default_value = "-", value_name = "ID")]
    pub identity: String,
}

/// The entitlements file, in the host crate.
pub fn entitlements() -> PathBuf {
    workspace().join("host/entitlements.plist")
}

pub fn run_sign(args: &SignArgs) -> Result<()> {
    if !cfg!(target_os = "macos") {
        eprintln!(
            "xtask: sign: nothing to do on {}: code signatures and the hypervisor entitlement are macOS's (run this on the Mac that runs openshell-host)",
            std::env::consts::OS
        );
        return Ok(());
    }
    let plist = entitlements();
    check_plist(&std::fs::read_to_string(&plist).map_err(|e| Error::io("read", &plist, e))?)
        .map_err(|e| Error::msg(format!("{}: {e}", plist.display())))?;
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => crate::tools::host(true)?,
    };
    run(Command::new("codesign").args(codesign_args(&args.identity, &plist, &binary)))?;
    let shown = run_output(
        Command::new("codesign")
            .args(["-d", "--entitlements", "-", "--xml"])
            .arg(&binary),
    )?;
    check_plist(&shown).map_err(|e| {
        Error::msg(format!(
            "{} was signed but its signature lacks entitlements: {e}",
            binary.display()
        ))
    })?;
    eprintln!(
        "xtask: signed {} ({}) with {}",
        binary.display(),
        if args.identity == "-" {
            "ad hoc"
        } else {
            &args.identity
        },
        REQUIRED.join(", ")
    );
    Ok(())
}

/// codesign's arguments: replace any signature, with the entitlements; a real identity also
/// gets the hardened runtime (what notarization requires).
pub fn codesign_args(identity: &str, plist: &Path, binary: &Path) -> Vec<String> {
    let mut args = vec!["--force".to_string(), "--sign".into(), identity.into()];
    if identity != "-" {
        args.extend(["--options".into(), "runtime".into()]);
    }
    args.extend([
        "--entitlements".into(),
        plist.display().to_string(),
        binary.display().to_string(),
    ]);
    args
}

/// Every [`REQUIRED`] key is in `plist` (the file, or what `codesign -d --entitlements - --xml`
/// printed), each followed by `<true/>`.
pub fn check_plist(plist: &str) -> std::result::Result<(), String> {
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|key| {
            let tag = format!("<key>{key}</key>");
            plist
                .find(&tag)
                .is_none_or(|at| !is_true_after_comments(&plist[at + tag.len()..]))
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing or not true: {}", missing.join(", ")))
    }
}

/// The next element after skipping whitespace and comments is `<true/>`.
fn is_true_after_comments(mut rest: &str) -> bool {
    loop {
        rest = rest.trim_start();
        match rest
            .strip_prefix("<!--")
            .and_then(|r| r.find("-->").map(|at| &r[at + 3..]))
        {
            Some(after) => rest = after,
            None => return rest.starts_with("<true/>"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_plist_grants_what_the_host_needs() {
        let text = std::fs::read_to_string(entitlements()).expect("plist");
        check_plist(&text).expect("complete");
        // codesign's own XML form: no comments, tabs.
        let printed = "<?xml version=\"1.0\"?><plist version=\"1.0\"><dict>\
            <key>com.apple.security.cs.allow-dyld-environment-variables</key><true/>\
            <key>com.apple.security.cs.disable-library-validation</key><true/>\
            <key>com.apple.security.hypervisor</key>\n\t<true/></dict></plist>";
        check_plist(printed).expect("codesign's form");
        let off = printed.replace("hypervisor</key>\n\t<true/>", "hypervisor</key><false/>");
        let err = check_plist(&off).unwrap_err();
        assert_eq!(err, "missing or not true: com.apple.security.hypervisor");
        let err = check_plist("<plist/>").unwrap_err();
        assert!(err.contains("hypervisor") && err.contains("disable-library-validation"));
    }

    #[test]
    fn ad_hoc_signs_without_the_hardened_runtime() {
        let plist = Path::new("/w/host/entitlements.plist");
        let bin = Path::new("/t/openshell-host");
        assert_eq!(
            codesign_args("-", plist, bin).join(" "),
            "--force --sign - --entitlements /w/host/entitlements.plist /t/openshell-host"
        );
        assert_eq!(
            codesign_args("Developer ID Application: X", plist, bin).join(" "),
            "--force --sign Developer ID Application: X --options runtime --entitlements \
             /w/host/entitlements.plist /t/openshell-host"
        );
    }

    /// Off macOS the command says so and succeeds without building or touching anything.
    #[test]
    fn elsewhere_it_is_a_no_op() {
        if cfg!(target_os = "macos") {
            return;
        }
        let args = SignArgs {
            binary: Some(PathBuf::from("/nonexistent/openshell-host")),
            identity: "-".into(),
        };
        run_sign(&args).expect("no-op");
    }
}
