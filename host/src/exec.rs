//! `openshell-host exec`: runs a command in a running VM through the guest's exec service
//! (vsock port 10777) and relays its terminal, input, output and exit code.
//!
//! How the connection is made depends on the VMM, and the run directory tells which one runs:
//! under libkrun `<run dir>/exec.sock` exists (libkrun listens there and forwards to the guest
//! port); under qemu, vhost-device-vsock's `<run dir>/vsock.sock` takes a `CONNECT <port>\n`
//! line and answers `OK <local port>\n` before the stream becomes the guest connection.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::termios::{self, SetArg, Termios};
use openshell_shared::exec::{
    ExecDecoder, ExecError, ExecRequest, Frame, GuestFrame, HostFrame, ReadError, EXEC_PORT,
    MAX_DATA_CHUNK,
};

use crate::failure::Failure;
use crate::rundir::RunDir;

/// The exit code for "the command's status never arrived" (transport or protocol failure).
pub const TRANSPORT_FAILURE: i32 = 255;

/// How long the vsock device may take to answer the `CONNECT` line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct ExecArgs {
    /// Instance name (its default run directory).
    #[arg(long, default_value = "default", conflicts_with = "run_dir")]
    pub name: String,
    /// Run directory of the instance (as given to `up --run-dir`).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Allocate a terminal: local terminal in raw mode, window size followed.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Environment variable for the command (repeatable).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Working directory in the guest (default /).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Command and arguments (default: sh).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostExecError {
    #[error("--env {0:?}: expected NAME=VALUE")]
    EnvSyntax(String),
    #[error(transparent)]
    Request(#[from] ExecError),
    #[error("no VM running in {dir}: neither {exec} (libkrun) nor {vsock} (qemu) exists")]
    NotRunning {
        dir: PathBuf,
        exec: PathBuf,
        vsock: PathBuf,
    },
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("{path}: vsock device answered {reply:?} to CONNECT {EXEC_PORT} (is the guest's exec service up?)")]
    Handshake { path: PathBuf, reply: String },
    #[error("exec connection: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("the guest closed the connection without an exit status")]
    NoExit,
}

/// The command's status never arrived: the process ends with [`TRANSPORT_FAILURE`].
impl Failure for HostExecError {
    fn exit_code(&self) -> i32 {
        TRANSPORT_FAILURE
    }
}

/// Runs the command and returns the exit code for this process. On an error the terminal is
/// back in its own mode before the error is returned to be printed.
pub fn run(args: ExecArgs) -> Result<i32, HostExecError> {
    exec(args).inspect_err(|_| restore_terminal())
}

fn parse_env(
    pairs: &[String],
) -> Result<std::collections::BTreeMap<String, String>, HostExecError> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(HostExecError::EnvSyntax(p.clone())),
        })
        .collect()
}

fn exec(args: ExecArgs) -> Result<i32, HostExecError> {
    let tty = args.tty;
    let (cols, rows) = if tty {
        terminal_size().unwrap_or((0, 0))
    } else {
        (0, 0)
    };
    let request = ExecRequest {
        argv: args.command,
        env: parse_env(&args.env)?,
        cwd: args.cwd,
        tty,
        cols,
        rows,
    };
    // Refused here already, with the same rule the guest applies.
    let request = HostFrame::Request(request).encode()?;
    let dir = RunDir {
        path: args
            .run_dir
            .unwrap_or_else(|| RunDir::default_path(&args.name)),
    };
    let mut conn = connect(&dir)?;
    conn.write_all(&request)?;
    let conn_out = Arc::new(Mutex::new(conn.try_clone()?));

    // Signals go to one thread; every thread started below inherits the mask.
    let signals = handled_signals();
    let _ = signals.thread_block();
    if tty {
        enter_raw_mode();
    }
    // Unwinding out of here (a panic) restores the terminal too.
    let _restore = RestoreOnDrop;
    {
        let out = Arc::clone(&conn_out);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || signal_loop(signals, tty, &out))?;
    }
    {
        let out = Arc::clone(&conn_out);
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || pump_stdin(&out))?;
    }

    let mut decoder = ExecDecoder::new();
    let mut stdout = io::stdout();
    let mut stderr = io::stderr();
    let mut refused = false;
    loop {
        match decoder.read_frame::<GuestFrame>(&mut conn)? {
            Some(GuestFrame::Stdout(d)) => {
                stdout.write_all(&d)?;
                stdout.flush()?;
            }
            Some(GuestFrame::Stderr(d)) => {
                stderr.write_all(&d)?;
                stderr.flush()?;
            }
            Some(GuestFrame::Error { message }) => {
                restore_terminal();
                eprintln!("openshell-host exec: guest: {message}");
                refused = true;
            }
            Some(GuestFrame::Exit { code }) => {
                restore_terminal();
                return Ok(code);
            }
            None if refused => return Ok(TRANSPORT_FAILURE),
            None => return Err(HostExecError::NoExit),
        }
    }
}

/// Connects to the guest's exec service through whichever VMM runs the instance.
fn connect(dir: &RunDir) -> Result<UnixStream, HostExecError> {
    let direct = dir.exec_socket();
    if direct.exists() {
        return UnixStream::connect(&direct).map_err(|source| HostExecError::Connect {
            path: direct,
            source,
        });
    }
    let uds = dir.vsock_uds();
    if !uds.exists() {
        return Err(HostExecError::NotRunning {
            dir: dir.path.clone(),
            exec: direct,
            vsock: uds,
        });
    }
    let conn_err = |source| HostExecError::Connect {
        path: uds.clone(),
        source,
    };
    let mut conn = UnixStream::connect(&uds).map_err(conn_err)?;
    conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(conn_err)?;
    conn.write_all(format!("CONNECT {EXEC_PORT}\n").as_bytes())
        .map_err(conn_err)?;
    // Byte by byte, bounded: nothing past the newline may be consumed.
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.len() < 64 {
        match conn.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => reply.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(conn_err(e)),
        }
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    if !reply.starts_with("OK ") {
        return Err(HostExecError::Handshake { path: uds, reply });
    }
    conn.set_read_timeout(None).map_err(conn_err)?;
    Ok(conn)
}

fn send(out: &Mutex<UnixStream>, frame: &HostFrame) -> bool {
    let Ok(bytes) = frame.encode() else {
        return false;
    };
    let mut conn = out.lock().unwrap_or_else(|p| p.into_inner());
    conn.write_all(&bytes).is_ok()
}

fn pump_stdin(out: &Mutex<UnixStream>) {
    let mut stdin = io::stdin().lock();
    let mut buf = vec![0u8; MAX_DATA_CHUNK];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                send(out, &HostFrame::StdinClose);
                return;
            }
            Ok(n) => {
                if !send(out, &HostFrame::Stdin(buf[..n].to_vec())) {
                    return;
                }
            }
        }
    }
}

fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGWINCH,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        set.add(s);
    }
    set
}

/// Window changes become resize frames; anything that ends us restores the terminal first and
/// exits with the shell's 128 + N (the guest sees the connection close and kills the command).
fn signal_loop(set: SigSet, tty: bool, out: &Mutex<UnixStream>) {
    loop {
        let Ok(sig) = set.wait() else { continue };
        if sig == Signal::SIGWINCH {
            if tty {
                if let Some((cols, rows)) = terminal_size() {
                    send(out, &HostFrame::Resize { cols, rows });
                }
            }
            continue;
        }
        restore_terminal();
        std::process::exit(128 + sig as i32);
    }
}

/// The local terminal's size (columns, rows), from whichever standard stream is a terminal.
fn terminal_size() -> Option<(u16, u16)> {
    for fd in [0, 1, 2] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize through a valid pointer; a bad fd is ENOTTY.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 {
            return Some((ws.ws_col, ws.ws_row));
        }
    }
    None
}

struct RestoreOnDrop;

impl Drop for RestoreOnDrop {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// The terminal settings to put back, while raw mode is on.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// Raw mode on stdin, if it is a terminal; [`restore_terminal`] undoes it on every way out.
fn enter_raw_mode() {
    let stdin = io::stdin();
    let Ok(saved) = termios::tcgetattr(&stdin) else {
        return; // not a terminal: nothing to do
    };
    let mut raw = saved.clone();
    termios::cfmakeraw(&mut raw);
    if termios::tcsetattr(&stdin, SetArg::TCSADRAIN, &raw).is_ok() {
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(saved);
    }
}

fn restore_terminal() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(saved) = saved {
        let stdin = io::stdin();
        let _ = termios::tcsetattr(&stdin, SetArg::TCSADRAIN, &saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_pairs_parse_and_bad_ones_are_named() {
        let env = parse_env(&["A=1".into(), "B=x=y".into(), "C=".into()]).unwrap();
        assert_eq!(env["B"], "x=y");
        assert_eq!(env["C"], "");
        match parse_env(&["NOVALUE".into()]) {
            Err(e) => assert!(e.to_string().contains("NOVALUE")),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn a_missing_run_dir_names_both_sockets() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RunDir {
            path: tmp.path().join("none"),
        };
        let err = connect(&dir).unwrap_err().to_string();
        assert!(
            err.contains("exec.sock") && err.contains("vsock.sock"),
            "{err}"
        );
    }

    #[test]
    fn the_connect_handshake_is_spoken_and_checked() {
        use std::os::unix::net::UnixListener;
        let tmp = tempfile::tempdir().unwrap();
        let dir = RunDir {
            path: tmp.path().to_path_buf(),
        };
        let listener = UnixListener::bind(dir.vsock_uds()).unwrap();
        let server = std::thread::spawn(move || {
            for reply in ["OK 1073741824\nrest", "FAILED\n"] {
                let (mut s, _) = listener.accept().unwrap();
                let mut line = [0u8; 14];
                s.read_exact(&mut line).unwrap();
                assert_eq!(&line, b"CONNECT 10777\n");
                s.write_all(reply.as_bytes()).unwrap();
            }
        });
        let mut conn = connect(&dir).unwrap();
        let mut rest = [0u8; 4];
        conn.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"rest");
        let err = connect(&dir).unwrap_err().to_string();
        assert!(err.contains("FAILED"), "{err}");
        server.join().unwrap();
    }
}
