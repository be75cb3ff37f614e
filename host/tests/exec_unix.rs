//! `openshell-host exec` end to end without a VM: `openshell-init exec-serve` serves the exec
//! protocol on `<run dir>/exec.sock` (where libkrun would listen), and the host command runs
//! against it as a user would: exit codes, output streams, stdin, refusals, and `-t` driven
//! from a real pty (raw mode, window size changes through SIGWINCH).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const HOST: &str = env!("CARGO_BIN_EXE_openshell-host");

/// The init binary cargo built next to ours, or `None` (with a message) when it was not built.
fn init_bin() -> Option<PathBuf> {
    let bin = Path::new(HOST).with_file_name("openshell-init");
    if bin.exists() {
        Some(bin)
    } else {
        eprintln!(
            "skipped: {} not built (cargo build -p openshell-init)",
            bin.display()
        );
        None
    }
}

struct Service {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn service() -> Option<Service> {
    let init = init_bin()?;
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("exec.sock");
    let child = Command::new(init)
        .arg("exec-serve")
        .arg("--unix")
        .arg(&sock)
        .spawn()
        .expect("start exec-serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "exec-serve did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(Service { child, dir })
}

/// Collects the output while the command runs (a full pipe would stall it), within a deadline.
fn wait_output(child: Child) -> Output {
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output().expect("output"));
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out,
        Err(_) => {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("openshell-host exec did not finish");
        }
    }
}

fn exec(svc: &Service, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(HOST)
        .arg("exec")
        .arg("--run-dir")
        .arg(svc.dir.path())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start exec");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    wait_output(child)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn exit_codes_streams_and_stdin() {
    let Some(svc) = service() else { return };
    let out = exec(
        &svc,
        &["--", "sh", "-c", "echo out; echo err >&2; exit 7"],
        b"",
    );
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    let out = exec(&svc, &["--", "sh", "-c", "kill -TERM $$"], b"");
    assert_eq!(out.status.code(), Some(128 + 15));

    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let out = exec(&svc, &["--", "cat"], &data);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout == data,
        "cat returned {} bytes",
        out.stdout.len()
    );

    let out = exec(
        &svc,
        &[
            "--env",
            "A=1",
            "--cwd",
            "/tmp",
            "--",
            "sh",
            "-c",
            "echo $A; pwd",
        ],
        b"",
    );
    assert_eq!(text(&out.stdout), "1\n/tmp\n");
}

#[test]
fn refusals_name_what_is_wrong() {
    let Some(svc) = service() else { return };
    let out = exec(&svc, &["--env", "9LIVES=x", "--", "true"], b"");
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("9LIVES"),
        "{}",
        text(&out.stderr)
    );

    let out = exec(&svc, &["--", "/no/such/thing"], b"");
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("/no/such/thing"),
        "{}",
        text(&out.stderr)
    );

    let none = tempfile::tempdir().expect("tmp");
    let out = Command::new(HOST)
        .args(["exec", "--run-dir"])
        .arg(none.path())
        .args(["--", "true"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("no VM running"),
        "{}",
        text(&out.stderr)
    );
}

/// `-t` from a real terminal: the command gets a pty of the terminal's size, a window change
/// reaches it, and the local terminal is back in its original mode afterwards.
#[test]
fn tty_mode_follows_the_local_terminal() {
    let Some(svc) = service() else { return };
    let size = nix::pty::Winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
    let before = nix::sys::termios::tcgetattr(&pty.slave).expect("tcgetattr");
    let slave = std::fs::File::from(pty.slave);
    let child = Command::new(HOST)
        .arg("exec")
        .arg("--run-dir")
        .arg(svc.dir.path())
        .args(["-t", "--", "sh", "-c", "tty; stty size; read x; stty size"])
        .stdin(slave.try_clone().expect("dup"))
        .stdout(slave.try_clone().expect("dup"))
        .stderr(slave.try_clone().expect("dup"))
        .spawn()
        .expect("start exec -t");
    let pid = child.id() as i32;
    let mut master = std::fs::File::from(pty.master);

    let mut seen = String::new();
    read_until("24 80", &mut master, &mut seen);
    assert!(seen.contains("/dev/pts/"), "{seen:?}");
    // Raw mode while it runs.
    let during = nix::sys::termios::tcgetattr(&slave).expect("tcgetattr");
    assert!(!during
        .local_flags
        .contains(nix::sys::termios::LocalFlags::ICANON));

    let bigger = libc::winsize {
        ws_row: 50,
        ws_col: 132,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer on our pty master.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &bigger) };
    // The kernel sends SIGWINCH only to the terminal's foreground group; ours is not a session
    // leader's terminal here, so signal it directly as the terminal would.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGWINCH) };
    std::thread::sleep(Duration::from_millis(300));
    master.write_all(b"go\r").expect("type");
    read_until("50 132", &mut master, &mut seen);

    let out = wait_output(child);
    assert_eq!(out.status.code(), Some(0));
    let after = nix::sys::termios::tcgetattr(&slave).expect("tcgetattr");
    assert_eq!(after.local_flags, before.local_flags, "terminal restored");
    assert_eq!(after.input_flags, before.input_flags, "terminal restored");
}

/// Reads the pty into `seen` until it contains `what`.
fn read_until(what: &str, master: &mut std::fs::File, seen: &mut String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 1024];
    while !seen.contains(what) {
        assert!(Instant::now() < deadline, "{what:?} not in {seen:?}");
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&*master),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)).unwrap_or(0) > 0 {
            match master.read(&mut buf) {
                Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => break,
            }
        }
    }
}
