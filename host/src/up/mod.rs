//! `openshell-host up`: starts the helper daemons and the VMM, follows the guest's boot over the
//! boot channel, and ends with the workload's exit status.
//!
//! Everything the main loop reacts to (guest messages, host signals, VMM exit) arrives as an
//! [`event::Event`] on one queue, so there is a single place that decides what happens next.
//! `--detach` is decided before `run` (in `main`): this module never detaches.

pub mod args;
mod client_config;
mod error;
mod event;
mod event_loop;
mod helpers;
mod outcome;
mod session;
mod start;
mod vmm;

use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Instant;

use args::{code, UpArgs};
use error::UpError;
use event::Event;
use event_loop::{EventLoop, Live, Run};
use session::Session;

use crate::progress::Progress;
use crate::report::Timeline;

/// Runs a boot in the foreground; returns the workload's status or one of [`code`]'s. An error
/// that ends the boot is also recorded in the last-boot timeline before it is returned.
pub fn run(args: UpArgs) -> Result<i32, UpError> {
    let clock = Instant::now();
    let progress = Progress::new(args.json);
    let mut timeline = Timeline::new();
    // Before signals are blocked: Ctrl+C must still end a `--reset` (y/N) prompt.
    let mut session = Session::claim(&args, &progress)?;
    let (tx, rx) = mpsc::channel();
    event::watch_signals(tx.clone())?;
    // Replace the previous boot's timeline at once: `status` must not show it as this one's.
    session.publish(&timeline, &progress);
    let result = boot(
        &args,
        clock,
        tx,
        &rx,
        &progress,
        &mut timeline,
        &mut session,
    );
    let code = match &result {
        Ok(code) => *code,
        Err(e) => {
            timeline.summary.error = Some(e.to_string());
            code::SETUP
        }
    };
    session.close(&mut timeline, clock, code, args.report.as_deref());
    result
}

/// Starts the VM and follows it until the VMM exits.
fn boot(
    args: &UpArgs,
    clock: Instant,
    tx: Sender<Event>,
    rx: &Receiver<Event>,
    progress: &Progress,
    timeline: &mut Timeline,
    session: &mut Session,
) -> Result<i32, UpError> {
    let started = start::start(args, clock, &tx, progress, timeline, session)?;
    let run = Run {
        args,
        clock,
        vmm: &started.vmm,
        vmm_started_us: started.vmm_started_us,
        console_log: &started.console_log,
        gateway_forward: started.gateway_forward,
        api_forward: started.api_forward,
        writer: &started.writer,
        gvproxy_forwards: started.gvproxy_forwards.as_ref(),
    };
    // The loop keeps `tx` for the gateway probe, which starts only once the guest says the
    // gateway is up.
    let effects = Live {
        vmm_pid: started.vmm.pid,
        tx,
    };
    let code = EventLoop::new(run, effects, progress, timeline, session).run(rx);
    started.reaped(&mut session.helpers);
    progress.finish(&timeline.summary, code);
    Ok(code)
}
