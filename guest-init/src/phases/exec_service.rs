//! The `exec-service` phase: starts the exec service (vsock port 10777) in the background, so
//! `openshell-host exec` works from early boot on, k3s or not. Not fatal: a VM without it still
//! runs its workload. After `mounts` (ptys need /dev/pts) and `config`.

use openshell_shared::exec::EXEC_PORT;

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};
use crate::exec_service::{self, Reaping, VsockListener};

pub const PHASE: Phase = Phase {
    name: "exec-service",
    after: &["mounts", "config"],
    fatal: false,
    waits: false,
    purpose: "serve `openshell-host exec` on vsock port 10777 (in the background)",
    run,
};

fn run(ctx: &Ctx) -> PhaseResult {
    if !ctx.pid1 {
        // Only PID 1's reaper delivers the statuses the service waits for.
        return Ok(Done::Skipped(
            "not PID 1: `openshell-init exec-serve --unix PATH` serves it on a host".into(),
        ));
    }
    let listener = VsockListener::bind(EXEC_PORT)?;
    std::thread::Builder::new()
        .name("exec-service".into())
        .spawn(move || exec_service::serve(listener, Reaping::Supervisor, crate::console::log))?;
    Ok(Done::Ok(Some(format!(
        "listening on vsock port {EXEC_PORT}"
    ))))
}
