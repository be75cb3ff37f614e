//! The panic hook. A panic in PID 1 must not end in a kernel panic: it is reported over the boot
//! channel (if the reporter lock is free) and on the console, then the VM is powered off with a
//! status of its own.

use std::sync::Arc;

use openshell_shared::GuestMessage;

use crate::console;
use crate::power;
use crate::reporter::Reporter;

pub fn install(reporter: Arc<Reporter>, pid1: bool) {
    std::panic::set_hook(Box::new(move |info| {
        let text = format!("init panicked: {info}");
        console::log(&text);
        let fatal = GuestMessage::Fatal {
            phase: std::thread::current().name().unwrap_or("init").to_string(),
            error: text,
        };
        if reporter.try_emit(fatal) {
            let exit = GuestMessage::Exit {
                status: power::STATUS_INIT_PANIC,
                peak_rss_kib: power::peak_rss_kib(),
                synced: {
                    nix::unistd::sync();
                    true
                },
            };
            reporter.try_emit(exit);
            reporter.close(std::time::Duration::from_millis(500));
        }
        if pid1 {
            power::power_off(power::STATUS_INIT_PANIC, true);
        }
    }));
}
