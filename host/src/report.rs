//! The boot timeline: every host event and guest message with the host's and the guest's
//! clocks, written as JSON for `--report` and for the boot benchmark.

use std::path::{Path, PathBuf};

use openshell_shared::{GuestMessage, Outcome};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Serialize)]
pub struct Entry {
    /// Microseconds since `openshell-host` started.
    pub host_us: u64,
    /// The guest's CLOCK_BOOTTIME for guest messages.
    pub guest_us: Option<u64>,
    pub seq: Option<u64>,
    pub source: &'static str,
    pub event: Value,
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
        self.events.push(Entry {
            host_us,
            guest_us: None,
            seq: None,
            source: "host",
            event: serde_json::json!({ "type": what, "detail": detail }),
        });
    }

    pub fn guest(&mut self, host_us: u64, seq: u64, guest_us: u64, msg: &GuestMessage) {
        match msg {
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
        self.events.push(Entry {
            host_us,
            guest_us: Some(guest_us),
            seq: Some(seq),
            source: "guest",
            event: serde_json::to_value(&*msg.redacted()).unwrap_or(Value::Null),
        });
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
}
