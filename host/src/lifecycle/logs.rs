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
    format!(
        "+{ms:>10.1} ms {:<5} {what}",
        e["source"].as_str().unwrap_or("?")
    )
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
    let _ = out.write_all(&buf);
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
            let _ = out.write_all(&chunk);
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
}
