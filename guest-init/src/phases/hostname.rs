//! The `hostname` phase. k3s derives the node name from it, so it must be set before k3s starts.

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};

pub const PHASE: Phase = Phase {
    name: "hostname",
    after: &["config"],
    fatal: false,
    waits: false,
    purpose: "set the hostname from the configuration",
    run,
};

#[derive(Debug, thiserror::Error)]
#[error("sethostname({name}) failed: {errno}")]
pub struct HostnameError {
    name: String,
    errno: nix::errno::Errno,
}

fn run(ctx: &Ctx) -> PhaseResult {
    let name = &ctx.config().hostname;
    if nix::unistd::gethostname().is_ok_and(|h| h.to_str() == Some(name.as_str())) {
        return Ok(Done::Skipped(format!("already {name}")));
    }
    nix::unistd::sethostname(name).map_err(|errno| HostnameError {
        name: name.clone(),
        errno,
    })?;
    Ok(Done::Ok(Some(name.clone())))
}
