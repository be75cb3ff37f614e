//! The `config` phase: the boot configuration from the guest's YAML file, overridden by
//! `openshell.*` keys on the kernel command line (how the host passes per-boot choices).
//! A bad value is fatal: booting on a half-understood configuration would hide the mistake.

use std::path::PathBuf;

use openshell_shared::config::{BootConfig, Cmdline, DEFAULT_CONFIG_PATH};

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};

pub const PHASE: Phase = Phase {
    name: "config",
    after: &["mounts"],
    fatal: true,
    waits: false,
    purpose: "read the boot configuration file and kernel command-line overrides",
    run,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigPhaseError {
    #[error("cannot read kernel command line {path}: {source}")]
    Cmdline {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] openshell_shared::ConfigError),
}

fn run(ctx: &Ctx) -> PhaseResult {
    let text = match &ctx.cmdline {
        Some(text) => text.clone(),
        None => {
            let path = ctx.path("/proc/cmdline");
            std::fs::read_to_string(&path)
                .map_err(|source| ConfigPhaseError::Cmdline { path, source })?
        }
    };
    let cmdline = Cmdline::parse(&text);
    let (config, shown) = load(ctx, &cmdline)?;
    let mut detail = format!(
        "{shown}: hostname {}, workload {}",
        config.hostname,
        config.workload.argv.join(" ")
    );
    if let (Some(host), true) = (config.host_time_s, ctx.pid1) {
        detail.push_str(&clock_note(host));
    }
    // A second run in the same context keeps the first result.
    let _ = ctx.config.set(config);
    Ok(Done::Ok(Some(detail)))
}

/// Sets the clock from the host's when it is behind (before the PKI dates certificates); what
/// happened, for the phase's line. A failure is said, not fatal: certificates would be
/// misdated, which the host warns about when it checks them.
fn clock_note(host: u64) -> String {
    match crate::host_clock::apply(host) {
        Ok(crate::host_clock::Outcome::Set { from }) => {
            format!("; clock set to the host's ({host} s since the epoch; it read {from})")
        }
        Ok(crate::host_clock::Outcome::Kept) => String::new(),
        Err(e) => format!("; the clock reads before the host's and cannot be set: {e}"),
    }
}

/// Loads the file and applies the overrides. The file read is the host path given with
/// `--config`, else the one `openshell.config=` names, else the default, under the root.
pub fn load(ctx: &Ctx, cmdline: &Cmdline) -> Result<(BootConfig, String), ConfigPhaseError> {
    let guest_path = cmdline
        .get("openshell.config")
        .unwrap_or(DEFAULT_CONFIG_PATH)
        .to_string();
    let file = ctx
        .config_file
        .clone()
        .unwrap_or_else(|| ctx.path(&guest_path));
    let mut config =
        BootConfig::load(&file).map_err(|e| rename_file(e, &file, &guest_path, ctx))?;
    config.apply_cmdline(cmdline)?;
    let shown = if file.exists() {
        format!("{}", shown_path(&file, &guest_path, ctx).display())
    } else {
        format!("{guest_path} absent, defaults")
    };
    Ok((config, shown))
}

/// Errors name the file as the guest sees it (`/etc/openshell/init.yaml`), not the host path of a
/// scratch root, unless an explicit file was given.
fn shown_path(file: &std::path::Path, guest_path: &str, ctx: &Ctx) -> PathBuf {
    if ctx.config_file.is_some() {
        file.to_path_buf()
    } else {
        PathBuf::from(guest_path)
    }
}

fn rename_file(
    e: openshell_shared::ConfigError,
    file: &std::path::Path,
    guest_path: &str,
    ctx: &Ctx,
) -> ConfigPhaseError {
    use openshell_shared::config::{ConfigError, Source};
    let shown = Source::File(shown_path(file, guest_path, ctx));
    ConfigPhaseError::Config(match e {
        ConfigError::Read { reason, .. } => ConfigError::Read {
            origin: shown,
            reason,
        },
        ConfigError::Parse { reason, .. } => ConfigError::Parse {
            origin: shown,
            reason,
        },
        ConfigError::Invalid { field, reason, .. } => ConfigError::Invalid {
            origin: shown,
            field,
            reason,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(root: &std::path::Path, cmdline: &str) -> Ctx {
        let mut c = Ctx::for_test(root);
        c.cmdline = Some(cmdline.to_string());
        c
    }

    #[test]
    fn file_then_cmdline() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("etc/openshell")).expect("mkdir");
        std::fs::write(
            dir.path().join("etc/openshell/init.yaml"),
            "hostname: from-file\nshutdown:\n  grace_ms: 42\n",
        )
        .expect("write");
        let c = ctx(dir.path(), "quiet openshell.exec=/bin/echo,hi");
        (PHASE.run)(&c).expect("valid");
        let cfg = c.config();
        assert_eq!(cfg.hostname, "from-file");
        assert_eq!(cfg.shutdown.grace_ms, 42);
        assert_eq!(cfg.workload.argv, ["/bin/echo", "hi"]);
    }

    #[test]
    fn cmdline_picks_another_file() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("alt.yaml"), "hostname: alt\n").expect("write");
        let c = ctx(dir.path(), "openshell.config=/alt.yaml");
        (PHASE.run)(&c).expect("valid");
        assert_eq!(c.config().hostname, "alt");
    }

    #[test]
    fn missing_file_means_defaults() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = ctx(dir.path(), "");
        match (PHASE.run)(&c).expect("valid") {
            Done::Ok(Some(d)) => assert!(d.contains("absent, defaults"), "{d}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_value_names_guest_path_and_field() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("etc/openshell")).expect("mkdir");
        std::fs::write(
            dir.path().join("etc/openshell/init.yaml"),
            "shutdown:\n  grace_ms: later\n",
        )
        .expect("write");
        let err = (PHASE.run)(&ctx(dir.path(), "")).unwrap_err().to_string();
        assert!(err.starts_with("/etc/openshell/init.yaml:"), "{err}");
        assert!(err.contains("shutdown.grace_ms"), "{err}");
    }
}
