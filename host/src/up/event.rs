//! Everything `up`'s loop reacts to, as one [`Event`] type on one queue (guest messages, host
//! signals, the VMM's exit, results of work done off the loop), and the thread that turns host
//! signals into events.

use std::sync::mpsc::SyncSender;

use nix::sys::signal::{SigSet, Signal};

use super::error::UpError;
use crate::channel::ChannelEvent;
use crate::net::gvproxy::ExposeError;
use crate::net::Forward;

pub enum Event {
    Channel(ChannelEvent),
    Signal(Signal),
    VmmExited(Option<i32>),
    /// Port forwards made through the network backend's API after the VMM started.
    Forwarded(Result<Vec<(Forward, u32)>, ExposeError>),
    /// The host's probe of the gateway behind the forwarded port: what it found ready, or why
    /// it is not.
    GatewayProbed(Result<String, String>),
}

/// How the boot channel's reader thread wraps what it reports.
pub fn wrap_channel(e: ChannelEvent) -> Event {
    Event::Channel(e)
}

/// Blocks the signals `up` handles and turns them into events. Must run before any thread or
/// child starts, so every thread inherits the mask and only this one receives them.
pub fn watch_signals(tx: SyncSender<Event>) -> Result<(), UpError> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().map_err(UpError::Signals)?;
    std::thread::spawn(move || loop {
        match set.wait() {
            Ok(sig) => {
                if tx.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    });
    Ok(())
}
