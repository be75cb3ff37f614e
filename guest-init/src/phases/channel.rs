//! The `channel` phase: starts connecting the boot channel to the host. In the VM it does not
//! wait: events are buffered until the connection is up, so boot never waits for the host. Run
//! alone (`openshell-init phase channel`) it waits and reports whether a host answered.

use std::time::Duration;

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};

pub const PHASE: Phase = Phase {
    name: "channel",
    after: &["config"],
    fatal: false,
    waits: false,
    purpose: "connect the vsock boot channel to the host (buffered until connected)",
    run,
};

#[derive(Debug, thiserror::Error)]
#[error("no host listening on vsock port {port}")]
pub struct NoHost {
    port: u32,
}

fn run(ctx: &Ctx) -> PhaseResult {
    let channel = &ctx.config().channel;
    let timeout = Duration::from_millis(channel.connect_timeout_ms);
    // `hello` tells the host which readiness stage this boot ends on.
    ctx.reporter.set_ready_stages(ctx.config().ready_stages());
    ctx.reporter
        .connect(channel.port, timeout, crate::supervisor::host_handler());
    if ctx.pid1 {
        return Ok(Done::Ok(Some(format!(
            "connecting to vsock 2:{} for up to {} ms",
            channel.port, channel.connect_timeout_ms
        ))));
    }
    ctx.reporter.wait_connected();
    if ctx.reporter.is_connected() {
        Ok(Done::Ok(Some(format!(
            "connected to vsock 2:{}",
            channel.port
        ))))
    } else {
        Err(Box::new(NoHost { port: channel.port }))
    }
}
