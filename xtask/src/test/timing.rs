//! How long each step of `cargo xtask test` took, kept for the table printed at the end (on
//! failure too), so the next slow step shows itself. Steps run on more than one thread, so the
//! record is shared.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// One step's outcome.
#[derive(Debug, Clone)]
struct Step {
    name: String,
    /// Which lane ran it: the foreground, or a background lane's name.
    lane: &'static str,
    took: Duration,
    ok: bool,
}

/// Every step's time, in the order the steps finished.
#[derive(Debug, Default)]
pub struct Clock {
    steps: Mutex<Vec<Step>>,
}

impl Clock {
    /// Runs `f` as step `name` of `lane`, saying when it starts and how it ended. A failure
    /// names the step.
    pub fn step<T>(
        &self,
        lane: &'static str,
        name: &str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        eprintln!("xtask test: [{lane}] {name}");
        let start = Instant::now();
        let result = f();
        let took = start.elapsed();
        let ok = result.is_ok();
        eprintln!(
            "xtask test: [{lane}] {name}: {} in {:.1} s",
            if ok { "done" } else { "FAILED" },
            took.as_secs_f64()
        );
        if let Ok(mut steps) = self.steps.lock() {
            steps.push(Step {
                name: name.to_string(),
                lane,
                took,
                ok,
            });
        }
        result.map_err(|e| Error::msg(format!("step `{name}` failed: {e}")))
    }

    /// The table: one line per step, then the wall-clock total.
    pub fn table(&self, total: Duration) -> String {
        let steps = self.steps.lock().map(|s| s.clone()).unwrap_or_default();
        let width = steps.iter().map(|s| s.name.len()).max().unwrap_or(0);
        let mut out = String::from("xtask test: step times\n");
        for s in &steps {
            out.push_str(&format!(
                "  {:>7}  {:<width$}  {:>8}{}\n",
                s.lane,
                s.name,
                minutes(s.took),
                if s.ok { "" } else { "  FAILED" },
            ));
        }
        out.push_str(&format!(
            "  {:>7}  {:<width$}  {:>8}\n",
            "",
            "total (wall clock)",
            minutes(total)
        ));
        out
    }
}

/// `m:ss`.
fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_every_step_with_its_lane_time_and_failure() {
        let clock = Clock::default();
        clock.step("main", "quick", || Ok(())).expect("ok step");
        let err = clock
            .step("lane", "broken", || -> Result<()> { Err(Error::msg("no")) })
            .expect_err("failing step");
        assert!(
            err.to_string().contains("step `broken` failed: no"),
            "{err}"
        );
        let table = clock.table(Duration::from_secs(125));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(
            lines[1].contains("main") && lines[1].contains("quick") && lines[1].contains("0:00")
        );
        assert!(
            lines[2].contains("lane") && lines[2].ends_with("FAILED"),
            "{table}"
        );
        assert!(lines[3].contains("total (wall clock)") && lines[3].contains("2:05"));
    }
}
