//! The boot timeline: every host event and guest message with the host's and the guest's
//! clocks, written as JSON for `--report` and for the boot benchmark.
//!
//! The guest decides how many messages it sends, so what the timeline keeps is bounded: the
//! newest [`MAX_EVENTS`] entries within [`MAX_EVENT_BYTES`] (older ones are dropped and counted
//! in `summary.events_dropped`), and at most [`MAX_PHASES`] phase summaries. A boot sends a
//! hundred or so, far below either bound.

use std::path::{Path, PathBuf};

use openshell_shared::{GuestMessage, Outcome};
use serde::Serialize;
use serde_json::Value;

/// Most entries kept; the oldest go first.
pub const MAX_EVENTS: usize = 4096;
/// Most bytes (as JSON) the kept entries may take: a guest's frames are up to 64 KiB each.
pub const MAX_EVENT_BYTES: usize = 4 << 20;
/// Most phase summaries kept (the guest's plan has about twenty).
pub const MAX_PHASES: usize = 256;

#[derive(Debug, Serialize)]
pub struct Entry {
    /// Microseconds since `openshell-host` started.
    pub host_us: u64,
    /// The guest's CLOCK_BOOTTIME for guest messages.
    pub guest_us: Option<u64>,
    pub seq: Option<u64>,
    pub source: &'static str,
    pub event: Value,
    /// The entry's size as JSON, for the byte bound.
    #[serde(skip)]
    size: usize,
}

impl Entry {
    fn new(
        host_us: u64,
        guest_us: Option<u64>,
        seq: Option<u64>,
        source: &'static str,
        event: Value,
    ) -> Self {
        // Host and guest clocks, sequence and source: under 100 bytes of JSON.
        let size = 100 + serde_json::to_string(&event).map_or(0, |t| t.len());
        Self {
            host_us,
            guest_us,
            seq,
            source,
            event,
            size,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub exit_status: Option<i32>,
    pub host_exit_code: i32,
    pub vmm_started_us: Option<u64>,
    pub hello_us: Option<u64>,
    pub ready_us: Option<u64>,
    pub init_entry_guest_us: Option<u64>,
    pub phases: Vec<PhaseSummary>,
    pub error: Option<String>,
    /// Entries dropped from the front of `events` to keep it bounded.
    pub events_dropped: u64,
    /// Phase summaries not kept past [`MAX_PHASES`].
    pub phases_dropped: u64,
}

#[derive(Debug, Serialize)]
pub struct PhaseSummary {
    pub name: String,
    pub duration_us: u64,
    pub outcome: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Timeline {
    pub host_start_unix_ms: u128,
    /// Where the guest console of this boot went, so `logs` finds it after the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_log: Option<PathBuf>,
    pub events: Vec<Entry>,
    pub summary: Summary,
    /// Sum of the kept entries' sizes.
    #[serde(skip)]
    event_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write report {path}: {source}")]
pub struct ReportError {
    path: PathBuf,
    source: std::io::Error,
}

impl Timeline {
    pub fn new() -> Self {
        Self {
            host_start_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            ..Self::default()
        }
    }

    pub fn host(&mut self, host_us: u64, what: &str, detail: Value) {
        let event = serde_json::json!({ "type": what, "detail": detail });
        self.push(Entry::new(host_us, None, None, "host", event));
    }

    /// Appends `entry`; past either bound the oldest entries go, down to three quarters of it
    /// (one move of the rest per quarter of the bound, not one per entry).
    fn push(&mut self, entry: Entry) {
        self.event_bytes += entry.size;
        self.events.push(entry);
        if self.events.len() <= MAX_EVENTS && self.event_bytes <= MAX_EVENT_BYTES {
            return;
        }
        let (mut n, mut bytes) = (0, self.event_bytes);
        while self.events.len() - n > MAX_EVENTS * 3 / 4 || bytes > MAX_EVENT_BYTES * 3 / 4 {
            bytes -= self.events[n].size;
            n += 1;
        }
        self.events.drain(..n);
        self.event_bytes = bytes;
        self.summary.events_dropped += n as u64;
    }

    pub fn guest(&mut self, host_us: u64, seq: u64, guest_us: u64, msg: &GuestMessage) {
        match msg {
            GuestMessage::PhaseFinished { .. } if self.summary.phases.len() >= MAX_PHASES => {
                self.summary.phases_dropped += 1
            }
            GuestMessage::PhaseFinished {
                phase,
                duration_us,
                outcome,
            } => self.summary.phases.push(PhaseSummary {
                name: phase.clone(),
                duration_us: *duration_us,
                outcome: match outcome {
                    Outcome::Ok => "ok".into(),
                    Outcome::Skipped(_) => "skipped".into(),
                    Outcome::Failed(_) => "failed".into(),
                },
            }),
            GuestMessage::Hello { init_entry_us, .. } => {
                self.summary.hello_us = Some(host_us);
                self.summary.init_entry_guest_us = Some(*init_entry_us);
            }
            GuestMessage::Exit { status, .. } => self.summary.exit_status = Some(*status),
            _ => {}
        }
        let event = serde_json::to_value(&*msg.redacted()).unwrap_or(Value::Null);
        self.push(Entry::new(
            host_us,
            Some(guest_us),
            Some(seq),
            "guest",
            event,
        ));
    }

    /// Writes atomically: a reader never sees half a report.
    pub fn write(&self, path: &Path) -> Result<(), ReportError> {
        let err = |source| ReportError {
            path: path.to_path_buf(),
            source,
        };
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| err(e.into()))?;
        bytes.push(b'\n');
        openshell_shared::fsutil::write_atomic(path, &bytes).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_guest_messages() {
        let mut t = Timeline::new();
        t.host(5, "vmm-started", Value::Null);
        let msg = GuestMessage::PhaseFinished {
            phase: "mounts".into(),
            duration_us: 40,
            outcome: Outcome::Ok,
        };
        t.guest(90, 3, 1000, &msg);
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("r.json");
        t.write(&path).expect("write");
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(v["events"][0]["source"], "host");
        let back: GuestMessage =
            serde_json::from_value(v["events"][1]["event"].clone()).expect("message");
        assert_eq!(back, msg);
        assert_eq!(v["summary"]["phases"][0]["name"], "mounts");
        assert_eq!(
            std::fs::read_dir(tmp.path()).expect("ls").count(),
            1,
            "no temporary left"
        );
    }

    /// A guest flooding the channel (100k log lines, then a thousand phases) leaves the
    /// timeline within its bounds, the newest entries kept and the rest counted.
    #[test]
    fn a_flood_of_guest_messages_stays_bounded_and_counted() {
        let mut t = Timeline::new();
        t.host(0, "vmm-started", Value::Null);
        let total: u64 = 100_000;
        for seq in 1..=total {
            let msg = GuestMessage::Log {
                level: openshell_shared::Level::Info,
                text: format!("line {seq} {}", "x".repeat(200)),
            };
            t.guest(seq, seq, seq, &msg);
            assert!(t.events.len() <= MAX_EVENTS && t.event_bytes <= MAX_EVENT_BYTES);
        }
        assert_eq!(
            t.summary.events_dropped + t.events.len() as u64,
            total + 1,
            "every entry is kept or counted"
        );
        assert_eq!(
            t.events.last().and_then(|e| e.seq),
            Some(total),
            "newest kept"
        );
        // Big frames hit the byte bound long before the count.
        for seq in 0..200 {
            let msg = GuestMessage::Log {
                level: openshell_shared::Level::Info,
                text: "y".repeat(60_000),
            };
            t.guest(seq, seq, seq, &msg);
        }
        assert!(t.event_bytes <= MAX_EVENT_BYTES);
        let written = serde_json::to_vec(&t).expect("json").len();
        assert!(written <= MAX_EVENT_BYTES + 64 * 1024, "{written}");
        for i in 0..1000u64 {
            let msg = GuestMessage::PhaseFinished {
                phase: format!("p{i}"),
                duration_us: i,
                outcome: Outcome::Ok,
            };
            t.guest(i, i, i, &msg);
        }
        assert_eq!(t.summary.phases.len(), MAX_PHASES);
        assert_eq!(t.summary.phases_dropped, 1000 - MAX_PHASES as u64);
        let v = serde_json::to_value(&t).expect("json");
        assert!(v["summary"]["events_dropped"].as_u64().unwrap_or(0) > 0);
    }
}
