//! What `up` prints while the guest boots: one line per phase with its duration, log lines,
//! readiness, errors, and a closing summary. With `--json`, one JSON object per line instead.

use std::io::Write;

use openshell_shared::{GuestMessage, Level, Outcome};

use crate::report::Summary;

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

    fn line(&self, text: &str) {
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
            bar.set_message(text);
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
        } else if let Some(bar) = &self.live {
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
        if let (Some(vmm), Some(ready)) = (summary.vmm_started_us, summary.ready_us) {
            self.line(&format!(
                "boot: {:.1} ms from VM start to ready; slowest phases: {}; exit {code}",
                (ready - vmm) as f64 / 1000.0,
                slowest.join(", ")
            ));
        }
    }
}
