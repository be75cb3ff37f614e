//! What `up` prints while the guest boots: one line per phase with its duration, log lines,
//! readiness, errors, and a closing summary. With `--json`, one JSON object per line instead.
//! Every line goes through `safe_text` on its way out: much of it is the guest's text.

use std::io::Write;

use openshell_shared::{GuestMessage, Level, Outcome};

use crate::report::Summary;
use crate::safe_text;

pub struct Progress {
    json: bool,
    /// On a terminal: a spinner naming the phase that runs, with finished lines printed above it.
    live: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub fn new(json: bool) -> Self {
        use std::io::IsTerminal;
        let live = (!json && std::io::stdout().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            let style = indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.set_message("starting the VM");
            bar.enable_steady_tick(std::time::Duration::from_millis(100));
            bar
        });
        Self { json, live }
    }

    /// `text` as it may reach the terminal: one line, no control characters.
    fn shown<'t>(&self, text: &'t str) -> std::borrow::Cow<'t, str> {
        if self.json {
            safe_text::escape_json(text)
        } else {
            safe_text::escape(text)
        }
    }

    fn line(&self, text: &str) {
        let text = self.shown(text);
        let text = text.as_ref();
        if let Some(bar) = &self.live {
            bar.println(text);
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }

    /// What the spinner says, on a terminal.
    fn status(&self, text: String) {
        if let Some(bar) = &self.live {
            bar.set_message(safe_text::escape(&text).into_owned());
        }
    }

    pub fn note(&self, text: &str) {
        if self.json {
            self.line(&serde_json::json!({ "type": "host", "text": text }).to_string());
        } else {
            self.line(text);
        }
    }

    pub fn error(&self, text: &str) {
        if self.json {
            self.line(&serde_json::json!({ "type": "host_error", "text": text }).to_string());
            return;
        }
        let text = safe_text::escape(text);
        if let Some(bar) = &self.live {
            bar.suspend(|| eprintln!("openshell-host: {text}"));
        } else {
            eprintln!("openshell-host: {text}");
        }
    }

    pub fn guest(&self, msg: &GuestMessage, host_us: u64, vmm_started_us: u64) {
        if self.json {
            if let Ok(v) = serde_json::to_value(&*msg.redacted()) {
                self.line(&serde_json::json!({ "host_us": host_us, "guest": v }).to_string());
            }
            return;
        }
        let since_vmm = host_us.saturating_sub(vmm_started_us) as f64 / 1000.0;
        match msg {
            GuestMessage::Hello {
                init_version,
                kernel_release,
                init_entry_us,
                ..
            } => self.line(&format!(
                "  guest: openshell-init {init_version}, kernel {kernel_release}, init entered {:.1} ms after kernel start",
                *init_entry_us as f64 / 1000.0
            )),
            GuestMessage::PhaseStarted { phase } => self.status(format!("booting: {phase}")),
            GuestMessage::PhaseFinished {
                phase,
                duration_us,
                outcome,
            } => {
                let (word, extra) = match outcome {
                    Outcome::Ok => ("ok", String::new()),
                    Outcome::Skipped(why) => ("skipped", format!("  ({why})")),
                    Outcome::Failed(err) => ("FAILED", format!("  {err}")),
                };
                self.line(&format!(
                    "  {phase:<16} {word:<8} {:>9.3} ms{extra}",
                    *duration_us as f64 / 1000.0
                ));
            }
            GuestMessage::Log { level, text } => {
                if *level >= Level::Warn {
                    self.line(&format!("  guest {level}: {text}"));
                }
            }
            GuestMessage::Ready { stage } => {
                self.status(format!("running (ready: {stage})"));
                self.line(&format!("ready: {stage} ({since_vmm:.1} ms after VM start)"))
            }
            GuestMessage::Fatal { phase, error } => {
                self.error(&format!("guest boot failed in phase {phase}: {error}"))
            }
            // `up` stores them and says where.
            GuestMessage::Credentials { .. } | GuestMessage::Kubeconfig { .. } => {}
            GuestMessage::NetworkGuarded { .. } => self.line(&format!("  {}", msg.describe())),
            GuestMessage::Exit {
                status,
                peak_rss_kib,
                synced,
            } => self.line(&format!(
                "guest exited with status {status} (init peak RSS {peak_rss_kib} KiB, {})",
                if *synced { "filesystems synced" } else { "filesystems NOT synced" }
            )),
        }
    }

    pub fn finish(&self, summary: &Summary, code: i32) {
        if let Some(bar) = &self.live {
            bar.finish_and_clear();
        }
        if self.json {
            return;
        }
        let mut slow: Vec<_> = summary.phases.iter().collect();
        slow.sort_by_key(|p| std::cmp::Reverse(p.duration_us));
        let slowest: Vec<String> = slow
            .iter()
            .take(3)
            .map(|p| format!("{} {:.1} ms", p.name, p.duration_us as f64 / 1000.0))
            .collect();
        if summary.events_dropped > 0 {
            self.line(&format!(
                "the guest sent more than the timeline keeps: its {} oldest events were dropped",
                summary.events_dropped
            ));
        }
        if let (Some(vmm), Some(ready)) = (summary.vmm_started_us, summary.ready_us) {
            self.line(&format!(
                "boot: {:.1} ms from VM start to ready; slowest phases: {}; exit {code}",
                (ready - vmm) as f64 / 1000.0,
                slowest.join(", ")
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest log line with a screen clear and a fake host line reaches the terminal as one
    /// escaped line; in JSON mode the line stays JSON with the same text.
    #[test]
    fn guest_text_is_escaped_on_the_way_out() {
        let hostile = "x\u{1b}[2J\nopenshell-host: ready\u{9b}";
        let text = Progress::new(false);
        let shown = text.shown(hostile);
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert!(shown.contains("\\u{1b}[2J\\nopenshell-host"), "{shown}");
        let json = Progress::new(true);
        let line = serde_json::json!({ "text": hostile }).to_string();
        let shown = json.shown(&line);
        assert!(!shown.chars().any(char::is_control), "{shown}");
        let back: serde_json::Value = serde_json::from_str(&shown).expect("JSON");
        assert_eq!(back["text"], hostile);
    }
}
