//! The boot as PID 1: phases, then the workload, then power-off. Nothing here returns.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openshell_shared::{BootConfig, GuestMessage};

use crate::context::Ctx;
use crate::engine;
use crate::phases;
use crate::power;
use crate::reporter::{Reporter, Sink};
use crate::supervisor::{self, Scope};

pub fn boot(init_entry_us: u64) -> ! {
    let reporter = Reporter::new(Sink::Console, init_entry_us);
    crate::panic::install(Arc::clone(&reporter), true);
    if let Err(e) = supervisor::block_signals() {
        crate::console::log(&format!("cannot block signals: {e}"));
    }
    crate::console::log(&format!(
        "openshell-init {} starting as PID 1 ({} us after kernel start)",
        env!("CARGO_PKG_VERSION"),
        init_entry_us
    ));
    let ctx = Ctx::new(Path::new("/"), Arc::clone(&reporter), true);
    if let Err(fatal) = engine::run(&ctx, phases::PLAN) {
        fail(&ctx, &reporter, fatal);
    }
    let config = ctx.config().clone();
    let grace = Duration::from_millis(config.shutdown.grace_ms);
    let status = match &config.k3s {
        Some(k3s) => crate::k3s::supervise(&ctx, k3s, grace, Scope::Everything),
        None => supervisor::run(&config.workload, grace, Scope::Everything, &reporter),
    };
    reporter.wait_connected();
    power::finish(&reporter, status, true)
}

/// A fatal boot error: make sure the host hears about it (the channel may not be started yet:
/// the configuration itself was bad, or a fatal phase failed before the `channel` phase ran),
/// then power off.
fn fail(ctx: &Ctx, reporter: &Arc<Reporter>, fatal: engine::Fatal) -> ! {
    if !reporter.channel_started() {
        let channel = match ctx.config.get() {
            Some(c) => c.channel.clone(),
            None => BootConfig::default().channel,
        };
        reporter.connect(
            channel.port,
            Duration::from_millis(channel.connect_timeout_ms),
            supervisor::host_handler(),
        );
    }
    reporter.emit(GuestMessage::Fatal {
        phase: fatal.phase.to_string(),
        error: fatal.error,
    });
    reporter.wait_connected();
    power::finish(reporter, power::STATUS_FATAL_BOOT, true)
}
