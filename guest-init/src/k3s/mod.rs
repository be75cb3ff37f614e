//! k3s as the workload: its command line ([`args`]), its layout on disk ([`paths`]), its
//! readiness stages ([`readiness`]), and [`supervise`], which PID 1 and the `k3s` command both
//! use to start it under the supervisor.

pub mod paths;
pub mod readiness;

pub use openshell_init::k3s_args as args;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openshell_shared::config::{K3s, Workload};
use openshell_shared::Level;

use crate::context::Ctx;
use crate::supervisor::{self, Scope};

/// The node IP the `network` phase configured; without one (the phase failed, or a host run
/// without `--node-ip`), the configured static fallback, which is what gvproxy routes to.
pub fn node_ip(ctx: &Ctx) -> Ipv4Addr {
    if let Some(ip) = ctx.node_ip.get() {
        return *ip;
    }
    let ip = ctx.config().network.fallback.address;
    ctx.reporter.log(
        Level::Warn,
        format!("no node IP from the network phase: k3s gets the fallback address {ip}"),
    );
    ip
}

/// The workload PID 1 runs for `cfg`: k3s's argv with the binary under the root, and the
/// configured workload's environment and working directory.
pub fn workload(ctx: &Ctx, cfg: &K3s, node_ip: Ipv4Addr) -> Workload {
    let mut argv = args::argv(cfg, node_ip);
    argv[0] = ctx.path(&cfg.binary).to_string_lossy().into_owned();
    let w = &ctx.config().workload;
    Workload {
        argv,
        env: w.env.clone(),
        cwd: w.cwd.clone(),
    }
}

/// Runs k3s under the supervisor with the readiness thread; returns its exit status.
pub fn supervise(ctx: &Ctx, cfg: &K3s, grace: Duration, scope: Scope) -> i32 {
    let node_ip = node_ip(ctx);
    let workload = workload(ctx, cfg, node_ip);
    let probes = readiness::Probes::new(
        cfg,
        ctx.path(&cfg.binary),
        ctx.path(paths::KUBECONFIG),
        workload.env.get("PATH").map(String::as_str),
        &ctx.config().hostname,
        node_ip,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let status = supervisor::run_watched(&workload, grace, scope, &ctx.reporter, || {
        readiness::spawn(probes, Arc::clone(&ctx.reporter), Arc::clone(&stop))
    });
    stop.store(true, Ordering::SeqCst);
    status
}
