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

#[cfg(test)]
mod tests {
    use super::*;

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
