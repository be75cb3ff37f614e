//! `openshell-host logs`: the last boot's events as readable lines (from last-boot.json), then
//! the guest console log; `-f` keeps following the console until the instance stops.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Duration;

use openshell_shared::GuestMessage;
use serde_json::Value;

use super::state::{self, StateDir, StateError};

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Follow the console log until the instance stops.
    #[arg(short, long)]
    pub follow: bool,
}

/// One boot event as a line: `+<ms> host|guest <what>`.
pub fn event_line(e: &Value) -> String {
    let ms = e["host_us"].as_u64().unwrap_or(0) as f64 / 1000.0;
    let ev = &e["event"];
    let what = if e["source"] == "host" {
        match &ev["detail"] {
            Value::Null => ev["type"].as_str().unwrap_or("?").to_string(),
            d => format!("{} {d}", ev["type"].as_str().unwrap_or("?")),
        }
    } else {
        match serde_json::from_value::<GuestMessage>(ev.clone()) {
            Ok(msg) => msg.describe(),
            Err(_) => format!("unrecognised {ev}"),
        }
    };
    let line = format!(
        "+{ms:>10.1} ms {:<5} {what}",
        e["source"].as_str().unwrap_or("?")
    );
    crate::safe_text::escape(&line).into_owned()
}

/// The guest's console as it may reach a terminal: escaped there (see `safe_text`), raw into
/// a file or pipe.
fn console_bytes(chunk: &[u8], terminal: bool) -> std::borrow::Cow<'_, [u8]> {
    if terminal {
        std::borrow::Cow::Owned(crate::safe_text::escape_console(chunk))
    } else {
        std::borrow::Cow::Borrowed(chunk)
    }
}

pub fn run(args: &LogsArgs) -> Result<i32, StateError> {
    let sdir = StateDir::for_name(&args.name)?;
    let boot = state::read_json(&sdir.last_boot_path());
    let running = sdir.is_running()?;
    let console: Option<PathBuf> = match (running, sdir.read_state()?) {
        (true, Some(s)) => Some(s.console_log),
        _ => boot
            .as_ref()
            .and_then(|b| b["console_log"].as_str().map(PathBuf::from)),
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut out = std::io::stdout().lock();
    match &boot {
        Some(b) => {
            let _ = writeln!(out, "== boot events ({})", sdir.last_boot_path().display());
            for e in b["events"].as_array().into_iter().flatten() {
                let _ = writeln!(out, "{}", event_line(e));
            }
        }
        None => {
            let _ = writeln!(out, "== no boot recorded for instance {:?}", args.name);
        }
    }
    let Some(console) = console else {
        return Ok(if boot.is_some() { 0 } else { 1 });
    };
    let _ = writeln!(out, "== console ({})", console.display());
    let mut file = match std::fs::File::open(&console) {
        Ok(f) => f,
        Err(e) => {
            let _ = writeln!(out, "(cannot open: {e})");
            return Ok(1);
        }
    };
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    let _ = out.write_all(&console_bytes(&buf, terminal));
    let _ = out.flush();
    if !args.follow {
        return Ok(0);
    }
    let mut pos = file.stream_position().unwrap_or(0);
    loop {
        // Read what is there before checking: the last lines land just before the stop.
        let still_running = sdir.is_running()?;
        let mut chunk = Vec::new();
        if file.seek(SeekFrom::Start(pos)).is_ok() {
            let _ = file.read_to_end(&mut chunk);
        }
        pos += chunk.len() as u64;
        if !chunk.is_empty() {
            let _ = out.write_all(&console_bytes(&chunk, terminal));
            let _ = out.flush();
        }
        if !still_running {
            let _ = writeln!(out, "== instance {:?} stopped", args.name);
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_read_as_lines() {
        let phase = json!({"host_us": 1500, "source": "guest", "event":
            {"type": "phase_finished", "phase": "mounts", "duration_us": 2000, "outcome": {"kind": "ok"}}});
        assert_eq!(
            event_line(&phase),
            "+       1.5 ms guest phase mounts: ok in 2.000 ms"
        );
        let host = json!({"host_us": 0, "source": "host", "event": {"type": "vmm-started", "detail": null}});
        assert!(event_line(&host).ends_with("host  vmm-started"));
    }

    /// A guest's phase name and log text with escape sequences come out escaped, on one line.
    #[test]
    fn guest_text_in_events_is_escaped() {
        let log = json!({"host_us": 0, "source": "guest", "event":
            {"type": "log", "level": "warn", "text": "\u{1b}]0;pwned\u{7}\nfake"}});
        let line = event_line(&log);
        assert!(!line.chars().any(char::is_control), "{line}");
        assert!(line.contains("\\u{1b}]0;pwned\\u{7}\\nfake"), "{line}");
        let raw = b"\x1b[2Jcleared\r\n";
        assert_eq!(
            &*console_bytes(raw, false),
            raw,
            "a file gets the console as is"
        );
        assert_eq!(&*console_bytes(raw, true), b"\\u{1b}[2Jcleared\r\n");
    }
}
