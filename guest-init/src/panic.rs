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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reporter::Sink;

    const CHILD: &str = "OPENSHELL_PANIC_HOOK_CHILD";

    /// Runs itself again in a child process (the hook is process-wide), panics there, and checks
    /// the hook reported a fatal event and an exit with the init-panic status.
    #[test]
    fn panic_is_reported_as_fatal_and_exit() {
        if std::env::var_os(CHILD).is_some() {
            let reporter = Reporter::new(Sink::JsonLines, 0);
            reporter.disable_channel();
            install(reporter, false);
            let _ = std::thread::Builder::new()
                .name("mounts".into())
                .spawn(|| panic!("simulated failure"))
                .map(|h| h.join());
            return;
        }
        let exe = std::env::current_exe().expect("test binary");
        let args = [
            "--exact",
            "panic::tests::panic_is_reported_as_fatal_and_exit",
            "--nocapture",
            "--test-threads=1",
        ];
        let run = |cmd: &mut std::process::Command| cmd.args(args).env(CHILD, "1").output();
        let out = match run(&mut std::process::Command::new(&exe)) {
            // A foreign-arch test binary under qemu-user: run the child through qemu too.
            Err(e) if e.raw_os_error() == Some(libc::ENOEXEC) => run(std::process::Command::new(
                format!("qemu-{}-static", std::env::consts::ARCH),
            )
            .arg(&exe)),
            other => other,
        }
        .expect("run child");
        let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            // The harness prints `test ... ` in front of the first line.
            .filter_map(|l| l.find('{').and_then(|i| serde_json::from_str(&l[i..]).ok()))
            .collect();
        let fatal = events
            .iter()
            .find(|e| e["msg"]["type"] == "fatal")
            .unwrap_or_else(|| panic!("no fatal event: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(fatal["msg"]["phase"], "mounts");
        assert!(fatal["msg"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("simulated failure"));
        let exit = events
            .iter()
            .find(|e| e["msg"]["type"] == "exit")
            .expect("exit event");
        assert_eq!(exit["msg"]["status"], power::STATUS_INIT_PANIC);
    }
}
