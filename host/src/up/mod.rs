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

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::Instant;

use args::{code, UpArgs};
use error::UpError;
use event::Event;
use event_loop::{EventLoop, Live, Run};
use session::Session;

use crate::progress::Progress;
use crate::report::Timeline;

/// How many events may wait for the loop: the guest's channel reader, the VMM's reaper, the
/// signal watcher and the probes block beyond it until the loop catches up.
pub const EVENT_QUEUE: usize = 1024;

/// The boot's single event queue, bounded at [`EVENT_QUEUE`].
fn event_queue() -> (SyncSender<Event>, Receiver<Event>) {
    mpsc::sync_channel(EVENT_QUEUE)
}

/// Runs a boot in the foreground; returns the workload's status or one of [`code`]'s. An error
/// that ends the boot is also recorded in the last-boot timeline before it is returned.
pub fn run(mut args: UpArgs) -> Result<i32, UpError> {
    let clock = Instant::now();
    let progress = Progress::new(args.json);
    let mut timeline = Timeline::new();
    // Before signals are blocked: Ctrl+C must still end a `--reset` (y/N) prompt.
    let mut session = Session::claim(&mut args, &progress)?;
    // Bounded: a guest that floods the boot channel waits (its frames stay in the vsock
    // connection) instead of growing the host's memory; the loop drains far faster than a
    // well-behaved guest sends.
    let (tx, rx) = event_queue();
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
    tx: SyncSender<Event>,
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use openshell_shared::protocol::{GuestMessage, Level};

    use super::*;
    use crate::channel::tests::{frame, hello};
    use crate::channel::Channel;

    /// A guest that floods the boot channel while the loop is busy is held at the queue's
    /// bound: the channel's reader stops taking frames, the socket fills and the guest's writes
    /// stall, instead of the host keeping every frame it is sent.
    #[test]
    fn a_flooding_guest_stalls_at_the_bounded_queue() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("channel.sock");
        let (tx, rx) = event_queue();
        let writer = Arc::new(Mutex::new(None));
        Channel::listen(&path).expect("listen").serve(
            Instant::now(),
            tx,
            event::wrap_channel,
            writer,
        );
        let mut guest = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        let sent = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&sent);
        let flooder = std::thread::spawn(move || {
            for seq in 0u64.. {
                let msg = match seq {
                    0 => hello(),
                    _ => GuestMessage::Log {
                        level: Level::Info,
                        text: "flood".into(),
                    },
                };
                let frame = frame(seq, msg);
                if guest.write_all(&frame).is_err() {
                    return; // the host hung up
                }
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        // Nobody drains the queue: the count must stop growing, near the bound.
        let mut last = 0;
        let stalled = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(200));
            let now = sent.load(Ordering::SeqCst);
            let still = now == last && now > EVENT_QUEUE;
            last = now;
            still
        });
        assert!(stalled, "the guest never stalled: {last} frames taken");
        // What the socket and the reader hold beyond the queue is bounded by their buffers.
        assert!(last < EVENT_QUEUE + 20_000, "{last} frames taken");
        drop(rx);
        flooder.join().expect("flooder");
    }
}
