//! The host's boot report (`openshell-host up --report`), read as JSON by the benchmarks that
//! time boots.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// The report at `path`; a parse error names the file.
pub fn read(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::msg(format!("{}: {e}", path.display())))
}

/// Guest clock, in ms: from init's entry to the end of its last phase; `None` when the report
/// lacks either (the boot did not get that far).
pub fn phases_done_ms(t: &Value) -> Option<f64> {
    let us = |v: &Value| v.as_u64().map(|n| n as f64 / 1000.0);
    let entry = us(&t["summary"]["init_entry_guest_us"])?;
    let done = t["events"]
        .as_array()?
        .iter()
        .filter(|e| e["event"]["type"] == "phase_finished")
        .filter_map(|e| us(&e["guest_us"]))
        .reduce(f64::max)?;
    Some(done - entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_end_at_the_last_one_to_finish() {
        let t = serde_json::json!({
            "summary": {"init_entry_guest_us": 300_000},
            "events": [
                {"guest_us": 350_000, "event": {"type": "phase_finished"}},
                {"guest_us": 480_000, "event": {"type": "phase_finished"}},
                {"guest_us": 420_000, "event": {"type": "phase_finished"}},
                {"guest_us": 500_000, "event": {"type": "ready"}}
            ]
        });
        assert_eq!(phases_done_ms(&t), Some(180.0));
        assert_eq!(phases_done_ms(&serde_json::json!({"summary": {}})), None);
    }

    #[test]
    fn reads_a_report_and_names_the_file_it_cannot_parse() {
        let dir = tempfile::tempdir().expect("tmp");
        let good = dir.path().join("good.json");
        std::fs::write(&good, r#"{"summary": {"vmm_started_us": 12000}}"#).expect("write");
        assert_eq!(
            read(&good).expect("parsed")["summary"]["vmm_started_us"],
            12000
        );
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "not json").expect("write");
        assert!(read(&bad).unwrap_err().to_string().contains("bad.json"));
        let missing = dir.path().join("missing.json");
        assert!(matches!(
            read(&missing),
            Err(Error::Io { what: "read", .. })
        ));
    }
}
