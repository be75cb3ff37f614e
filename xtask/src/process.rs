//! Runs external programs to completion; a failure names the command line that failed.

use std::process::Command;

use crate::error::{Error, Result};

/// Runs a command to completion, failing with its command line when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .map_err(|e| Error::msg(format!("cannot run {:?}: {e}", cmd.get_program())))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::msg(format!("{} failed ({status})", describe(cmd))))
    }
}

/// Runs a command and returns its stdout.
pub fn run_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| Error::msg(format!("cannot run {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(Error::msg(format!(
            "{} failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line, for error messages.
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_the_command_line_and_its_stderr() {
        let err = run(Command::new("sh").args(["-c", "exit 3"])).unwrap_err();
        assert!(err.to_string().starts_with("sh -c exit 3 failed"), "{err}");
        let err = run_output(Command::new("sh").args(["-c", "echo oops >&2; exit 1"])).unwrap_err();
        assert!(err.to_string().ends_with(": oops"), "{err}");
        assert_eq!(
            run_output(Command::new("sh").args(["-c", "echo hi"])).expect("runs"),
            "hi\n"
        );
        let err = run(&mut Command::new("/nonexistent/program")).unwrap_err();
        assert!(err.to_string().contains("cannot run"), "{err}");
    }
}
