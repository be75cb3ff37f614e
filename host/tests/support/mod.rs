//! What the host's command-line tests share: a scratch directory closed to other users (as root,
//! `up` refuses a root filesystem they can reach) and a bounded wait for a run to end.
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

/// Closes `dir` to other users.
pub fn close_to_others(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
}

/// The output of `child` once it has ended; killed, and the test failed naming `what`, if it
/// is still running after `limit`.
pub fn output_within(mut child: Child, limit: Duration, what: &str) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{what} did not end within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}
