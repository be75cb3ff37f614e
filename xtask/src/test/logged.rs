//! Programs whose output goes to a log file instead of the terminal: the steps that run beside
//! the foreground's, whose lines would otherwise interleave with the VM tests'. A failure carries
//! the end of the log.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::paths::target_dir;

/// Where the logs of one `cargo xtask test` run go.
pub fn dir() -> PathBuf {
    target_dir().join("xtask-test-logs")
}

/// Runs `cmd` with stdout and stderr in `dir()/<name>.log`; returns what it wrote.
pub fn run(name: &str, cmd: &mut Command) -> Result<String> {
    let dir = dir();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    let log = dir.join(format!("{name}.log"));
    let out = File::create(&log).map_err(|e| Error::io("create", &log, e))?;
    let err = out.try_clone().map_err(|e| Error::io("open", &log, e))?;
    let status = cmd
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .status()
        .map_err(|e| Error::msg(format!("cannot run {:?}: {e}", cmd.get_program())))?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if status.success() {
        Ok(text)
    } else {
        Err(Error::msg(format!(
            "{status}; the end of {}:\n{}",
            log.display(),
            tail(&text, 40)
        )))
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_goes_to_the_log_and_a_failure_carries_its_end() {
        let text = run(
            "logged-ok",
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
        )
        .expect("sh succeeds");
        assert!(text.contains("out") && text.contains("err"), "{text}");
        let e = run(
            "logged-fail",
            Command::new("sh").args(["-c", "for i in $(seq 1 60); do echo line$i; done; exit 3"]),
        )
        .expect_err("exit 3");
        let msg = e.to_string();
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("line60") && !msg.contains("line20\n"), "{msg}");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
