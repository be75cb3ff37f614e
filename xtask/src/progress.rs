//! Progress for the long build steps: indicatif bars and spinners on a terminal; plain lines with
//! the elapsed time otherwise (CI logs), so a slow step is never silent.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub fn is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// A byte counter (with a bar when the total is known).
pub fn bytes(total: Option<u64>, msg: &str) -> ProgressBar {
    if !is_terminal() {
        eprintln!("xtask: {msg}");
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(msg.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A named step whose current state changes (debootstrap's stages).
pub struct Steps {
    bar: ProgressBar,
    started: Instant,
    what: String,
    last: String,
}

impl Steps {
    pub fn new(what: &str) -> Self {
        let bar = if is_terminal() {
            let b = ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_prefix(what.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        } else {
            ProgressBar::hidden()
        };
        Self {
            bar,
            started: Instant::now(),
            what: what.to_string(),
            last: String::new(),
        }
    }

    /// The current detail (shown on the spinner); `stage` changes are also printed as lines
    /// off a terminal.
    pub fn update(&mut self, stage: &str, detail: &str) {
        self.bar.set_message(detail.to_string());
        if stage != self.last {
            self.last = stage.to_string();
            let line = format!(
                "xtask: {}: {stage} ({:.0} s)",
                self.what,
                self.started.elapsed().as_secs_f64()
            );
            if self.bar.is_hidden() {
                eprintln!("{line}");
            } else {
                self.bar.println(line);
            }
        }
    }

    pub fn finish(self) -> Duration {
        self.bar.finish_and_clear();
        self.started.elapsed()
    }
}
