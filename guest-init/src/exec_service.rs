//! The exec service: runs commands for `openshell-host exec` and streams their input and output
//! ([`openshell_shared::exec`] frames). In the VM it listens on vsock port 10777; on a host,
//! `openshell-init exec-serve --unix PATH` serves the same protocol on a unix socket for tests.
//!
//! One thread per connection. Commands run in their own session, with pipes or a pty, and their
//! exit status comes from whoever reaps children: PID 1's supervisor (which reaps everything, so
//! the pid is claimed before it can be reaped) or, outside the VM, `Child::wait`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use openshell_shared::exec::{
    ExecDecoder, ExecRequest, Frame, GuestFrame, HostFrame, ReadError, MAX_DATA_CHUNK,
};

use crate::k3s::paths::KUBECONFIG;

/// PATH when the service's own environment has none (PID 1 gets none from the kernel).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// TERM in tty mode unless the request sets it.
const DEFAULT_TERM: &str = "xterm-256color";
/// How long output may keep flowing after the command ended (a background process can hold the
/// pipe or pty open forever); the exit frame goes out after this at the latest.
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);

/// Who collects the commands' exit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaping {
    /// PID 1's supervisor reaps every child; statuses arrive through its claim registry.
    Supervisor,
    /// Nobody else reaps: wait for the child directly.
    Own,
}

/// Who connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A vsock peer, by context id: 2 is the host, anything else another VM or the guest itself.
    Vsock { cid: u32 },
    /// A unix socket client (`exec-serve` on a host): the socket's permissions decide who may
    /// connect.
    Unix,
}

/// The one vsock peer that may run commands: the host (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vsock peer with CID {cid} is not the host (CID {HOST_CID}): the exec service serves the host only")]
pub struct ForeignPeer {
    pub cid: u32,
}

/// Whether `peer` may use the service. A guest process reaching the port through a loopback
/// transport (CID 1 or the guest's own CID; the kernel has none, see the README) or a sibling VM
/// behind the same vsock device would otherwise get a root shell in the VM.
pub fn admit(peer: Peer) -> Result<(), ForeignPeer> {
    match peer {
        Peer::Vsock { cid } if cid != HOST_CID => Err(ForeignPeer { cid }),
        _ => Ok(()),
    }
}

/// Accepts connections: vsock in the VM, a unix socket on a host.
pub trait Listener: Send + 'static {
    fn accept_conn(&self) -> io::Result<(File, Peer)>;
    fn describe(&self) -> String;
}

impl Listener for UnixListener {
    fn accept_conn(&self) -> io::Result<(File, Peer)> {
        let (stream, _) = self.accept()?;
        Ok((File::from(OwnedFd::from(stream)), Peer::Unix))
    }
    fn describe(&self) -> String {
        match self
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
        {
            Some(p) => format!("unix socket {}", p.display()),
            None => "unix socket".into(),
        }
    }
}

/// A listening AF_VSOCK stream socket.
pub struct VsockListener {
    fd: OwnedFd,
    port: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on vsock port {port}: {call}: {errno}")]
pub struct VsockError {
    port: u32,
    call: &'static str,
    errno: nix::errno::Errno,
}

impl VsockListener {
    /// Binds (VMADDR_CID_ANY, `port`).
    pub fn bind(port: u32) -> Result<Self, VsockError> {
        use nix::sys::socket::{
            bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
            VsockAddr,
        };
        let err = |call| move |errno| VsockError { port, call, errno };
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(err("socket"))?;
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(err("SO_REUSEADDR"))?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port)).map_err(err("bind"))?;
        listen(&fd, Backlog::new(16).map_err(err("listen"))?).map_err(err("listen"))?;
        Ok(Self { fd, port })
    }
}

impl Listener for VsockListener {
    fn accept_conn(&self) -> io::Result<(File, Peer)> {
        use nix::sys::socket::{accept4, getpeername, SockFlag, VsockAddr};
        let raw = accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 just returned this descriptor; nothing else owns it.
        let conn = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let peer = getpeername::<VsockAddr>(conn.as_raw_fd())?;
        Ok((conn, Peer::Vsock { cid: peer.cid() }))
    }
    fn describe(&self) -> String {
        format!("vsock port {}", self.port)
    }
}

/// Serves connections forever, one thread each.
pub fn serve(listener: impl Listener, reaping: Reaping, log: fn(&str)) {
    let mut failures = 0u32;
    let mut refused = 0u32;
    loop {
        match listener.accept_conn() {
            Ok((conn, peer)) => {
                failures = 0;
                if let Err(foreign) = admit(peer) {
                    refused += 1;
                    // A peer that keeps trying must not flood the console.
                    if refused == 1 || refused.is_multiple_of(100) {
                        log(&format!(
                            "exec service: refused a connection ({refused} so far): {foreign}"
                        ));
                    }
                    turn_away(conn, &foreign);
                    continue;
                }
                let spawned = std::thread::Builder::new()
                    .name("exec-conn".into())
                    .spawn(move || serve_conn(conn, reaping, log));
                if let Err(e) = spawned {
                    log(&format!(
                        "exec service: cannot start a connection thread: {e}"
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(100) {
                    log(&format!(
                        "exec service: accept on {} failed: {e}",
                        listener.describe()
                    ));
                }
                // Out of descriptors and the like: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The sending half of a connection, shared by the output pumps. Once the host is gone or the
/// exit frame is out, nothing more is sent.
struct Outbox {
    conn: Mutex<File>,
    closed: AtomicBool,
}

impl Outbox {
    fn send(&self, frame: &GuestFrame) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let Ok(bytes) = frame.encode() else {
            return false;
        };
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(Ordering::Acquire) || conn.write_all(&bytes).is_err() {
            self.closed.store(true, Ordering::Release);
            return false;
        }
        true
    }

    /// Sends a last frame and closes both directions (which also ends the input thread).
    fn finish(&self, last: Option<&GuestFrame>) {
        if let Some(f) = last {
            self.send(f);
        }
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        self.closed.store(true, Ordering::Release);
        let _ = nix::sys::socket::shutdown(conn.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Read(#[from] ReadError),
    #[error("connection closed before the request")]
    NoRequest,
    #[error("first frame must be a request")]
    NotRequest,
}

fn serve_conn(conn: File, reaping: Reaping, log: fn(&str)) {
    let mut input = match conn.try_clone() {
        Ok(c) => c,
        Err(e) => {
            log(&format!(
                "exec service: cannot duplicate the connection: {e}"
            ));
            return;
        }
    };
    let out = Arc::new(Outbox {
        conn: Mutex::new(conn),
        closed: AtomicBool::new(false),
    });
    let mut decoder = ExecDecoder::new();
    let request = match decoder.read_frame::<HostFrame>(&mut input) {
        Ok(Some(HostFrame::Request(req))) => req,
        Ok(Some(_)) => return refuse(&out, ConnError::NotRequest),
        Ok(None) => return refuse(&out, ConnError::NoRequest),
        Err(e) => return refuse(&out, ConnError::Read(e)),
    };
    let running = match start(&request, reaping) {
        Ok(r) => r,
        Err(e) => {
            let code = match e.kind() {
                io::ErrorKind::NotFound => 127,
                _ => 126,
            };
            out.send(&GuestFrame::Error {
                message: format!("cannot run {}: {e}", request.command().join(" ")),
            });
            out.finish(Some(&GuestFrame::Exit { code }));
            return;
        }
    };
    let Running {
        pid,
        status,
        stdin,
        pty,
        outputs,
    } = running;

    // Output pumps; each reports when its stream ends.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let pumps = outputs.len();
    for (source, to_stderr) in outputs {
        let out = Arc::clone(&out);
        let done = done_tx.clone();
        let _ = std::thread::Builder::new()
            .name("exec-out".into())
            .spawn(move || {
                pump_output(source, to_stderr, &out, pid);
                let _ = done.send(());
            });
    }
    drop(done_tx);

    // Input: the host's frames, until it closes the connection.
    {
        let out = Arc::clone(&out);
        let _ = std::thread::Builder::new()
            .name("exec-in".into())
            .spawn(move || pump_input(input, decoder, stdin, pty, &out, pid));
    }

    let code = status.wait();
    let deadline = Instant::now() + DRAIN_DEADLINE;
    for _ in 0..pumps {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    out.finish(Some(&GuestFrame::Exit { code }));
}

/// Tells a refused peer why in one error frame and closes, never acting on what it sent.
fn turn_away(mut conn: File, why: &ForeignPeer) {
    // Never block the accept loop on the peer: one small frame or nothing.
    let nonblocking = nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK);
    let _ = nix::fcntl::fcntl(conn.as_raw_fd(), nonblocking);
    // What it already sent is discarded (a bounded amount): closing on unread bytes would reset
    // the connection and lose the error frame.
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        if !matches!(conn.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
    let out = Outbox {
        conn: Mutex::new(conn),
        closed: AtomicBool::new(false),
    };
    out.finish(Some(&GuestFrame::Error {
        message: why.to_string(),
    }));
}

fn refuse(out: &Outbox, why: ConnError) {
    out.finish(Some(&GuestFrame::Error {
        message: why.to_string(),
    }));
}

/// How the command's exit status will arrive.
enum Status {
    Claimed(Receiver<i32>),
    Own(Child),
}

impl Status {
    fn wait(self) -> i32 {
        match self {
            // A closed channel means the supervisor is gone: the VM is going down anyway.
            Status::Claimed(rx) => rx.recv().unwrap_or(255),
            Status::Own(mut child) => match child.wait() {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    s.code()
                        .or_else(|| s.signal().map(|sig| 128 + sig))
                        .unwrap_or(255)
                }
                Err(_) => 255,
            },
        }
    }
}

struct Running {
    pid: Pid,
    status: Status,
    /// Where the host's stdin goes: the pipe, or (tty mode) a copy of the pty master.
    stdin: Option<File>,
    /// The pty master, for resizes and end-of-input.
    pty: Option<Arc<File>>,
    /// Output streams and whether each goes out as stderr.
    outputs: Vec<(File, bool)>,
}

/// The environment a command sees: ours, the defaults, then the request's. Ours is taken as
/// bytes: PID 1's comes from the kernel command line and need not be UTF-8.
fn environment(req: &ExecRequest) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    // Unless the environment or the request sets it: kubectl in the guest then just works.
    env.entry("KUBECONFIG".into())
        .or_insert_with(|| KUBECONFIG.into());
    if req.tty {
        env.insert("TERM".into(), DEFAULT_TERM.into());
    }
    env.extend(req.env.iter().map(|(k, v)| (k.into(), v.into())));
    env
}

fn start(req: &ExecRequest, reaping: Reaping) -> io::Result<Running> {
    let argv = req.command();
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(environment(req))
        .current_dir(req.cwd());

    let mut pty_master = None;
    if req.tty {
        let size = nix::pty::Winsize {
            ws_row: req.rows,
            ws_col: req.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None)?;
        // The command must not inherit the master, or the pty never reports hang-up.
        nix::fcntl::fcntl(
            pty.master.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        cmd.stdin(Stdio::from(pty.slave.try_clone()?))
            .stdout(Stdio::from(pty.slave.try_clone()?))
            .stderr(Stdio::from(pty.slave));
        pty_master = Some(File::from(pty.master));
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    let tty = req.tty;
    // SAFETY: between fork and exec only async-signal-safe calls (setsid, sigaction,
    // sigprocmask, ioctl).
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(io::Error::from)?;
            // PID 1 blocks its signals in every thread; the command must not inherit that.
            crate::supervisor::reset_signals_in_child().map_err(io::Error::from)?;
            if tty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (mut child, claimed) = match reaping {
        Reaping::Supervisor => {
            let (child, rx) = crate::supervisor::spawn_claimed(&mut cmd)?;
            (child, Some(rx))
        }
        Reaping::Own => (cmd.spawn()?, None),
    };
    drop(cmd); // closes our copies of the pty slave
    let pid = Pid::from_raw(child.id() as i32);
    let (stdin, pty, outputs) = match pty_master {
        Some(master) => {
            let reader = master.try_clone()?;
            let writer = master.try_clone()?;
            (Some(writer), Some(Arc::new(master)), vec![(reader, false)])
        }
        None => {
            let stdin = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
            let mut outputs = Vec::new();
            if let Some(s) = child.stdout.take() {
                outputs.push((File::from(OwnedFd::from(s)), false));
            }
            if let Some(s) = child.stderr.take() {
                outputs.push((File::from(OwnedFd::from(s)), true));
            }
            (stdin, None, outputs)
        }
    };
    let status = match claimed {
        Some(rx) => Status::Claimed(rx),
        None => Status::Own(child),
    };
    Ok(Running {
        pid,
        status,
        stdin,
        pty,
        outputs,
    })
}

/// Sends one output stream to the host until it ends. If the host is gone, the command goes too.
fn pump_output(mut source: File, to_stderr: bool, out: &Outbox, pid: Pid) {
    let mut buf = vec![0u8; MAX_DATA_CHUNK];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // EIO: the pty's last slave descriptor closed.
            Err(_) => return,
        };
        let data = buf[..n].to_vec();
        let frame = if to_stderr {
            GuestFrame::Stderr(data)
        } else {
            GuestFrame::Stdout(data)
        };
        if !out.send(&frame) {
            kill_group(pid);
            return;
        }
    }
}

/// Applies the host's frames until it closes the connection. A bad frame is answered with an
/// error and ends the connection and the command; so does the host going away.
fn pump_input(
    mut conn: File,
    mut decoder: ExecDecoder,
    mut stdin: Option<File>,
    pty: Option<Arc<File>>,
    out: &Outbox,
    pid: Pid,
) {
    loop {
        match decoder.read_frame::<HostFrame>(&mut conn) {
            Ok(Some(HostFrame::Stdin(data))) => {
                if let Some(s) = stdin.as_mut() {
                    if s.write_all(&data).is_err() {
                        // The command stopped reading; later input has nowhere to go.
                        stdin = None;
                    }
                }
            }
            Ok(Some(HostFrame::StdinClose)) => match &pty {
                // A terminal has no end of file of its own: type the EOF character.
                Some(_) => {
                    if let Some(s) = stdin.as_mut() {
                        let _ = s.write_all(&[4]);
                    }
                }
                None => stdin = None,
            },
            Ok(Some(HostFrame::Resize { cols, rows })) => {
                if let Some(master) = &pty {
                    resize(master, cols, rows);
                }
            }
            Ok(Some(HostFrame::Request(_))) => {
                return abort(out, pid, "a connection carries one request".into());
            }
            Ok(None) => {
                // The host is gone (it never half-closes): nobody will read the output.
                if !out.closed.load(Ordering::Acquire) {
                    kill_group(pid);
                }
                return;
            }
            Err(e) => {
                if out.closed.load(Ordering::Acquire) {
                    return; // our own shutdown after the exit frame
                }
                return abort(out, pid, e.to_string());
            }
        }
    }
}

fn abort(out: &Outbox, pid: Pid, message: String) {
    out.finish(Some(&GuestFrame::Error { message }));
    kill_group(pid);
}

/// The command runs in its own session, so its pid is also its process group.
fn kill_group(pid: Pid) {
    let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
}

fn resize(master: &File, cols: u16, rows: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer; the fd is a live pty master.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A service on a fresh unix socket, as `exec-serve --unix` runs it.
    fn server() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exec.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || serve(listener, Reaping::Own, |_| {}));
        (dir, path)
    }

    #[test]
    fn only_the_host_is_admitted() {
        assert_eq!(admit(Peer::Vsock { cid: 2 }), Ok(()));
        assert_eq!(admit(Peer::Unix), Ok(()));
        // 0: the hypervisor; 1: the local loopback; 3 and up: guests, this one included.
        for cid in [0, 1, 3, 4, u32::MAX] {
            let refused = admit(Peer::Vsock { cid }).expect_err("not the host");
            assert_eq!(refused, ForeignPeer { cid });
            assert!(
                refused.to_string().contains(&format!("CID {cid} ")),
                "{refused}"
            );
        }
    }

    /// The guest kernel has no vsock loopback transport (allnoconfig leaves it off and no
    /// fragment may turn it on): with it, every guest process could reach this port as a peer.
    #[test]
    fn the_kernel_fragments_leave_vsock_loopback_off() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../kernel-config");
        let mut read = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            read += 1;
            for line in text.lines() {
                assert!(
                    !line.starts_with("CONFIG_VSOCKETS_LOOPBACK=y")
                        && !line.starts_with("CONFIG_VSOCKETS_LOOPBACK=m"),
                    "{}: {line}",
                    path.display()
                );
            }
        }
        assert!(read >= 3, "common, x86_64 and aarch64 fragments");
    }

    /// Hands out one end of a socket pair as a connection from `peer`, then nothing more.
    struct OneConnection(Mutex<Option<(File, Peer)>>);

    impl Listener for OneConnection {
        fn accept_conn(&self) -> io::Result<(File, Peer)> {
            match self.0.lock().unwrap().take() {
                Some(c) => Ok(c),
                None => loop {
                    std::thread::park();
                },
            }
        }
        fn describe(&self) -> String {
            "one connection".into()
        }
    }

    /// A request from a peer other than the host gets an error frame naming its CID and runs
    /// nothing.
    #[test]
    fn a_foreign_peer_is_told_why_and_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let touch = format!("touch {}", marker.display());
        let request = HostFrame::Request(request(&["/bin/sh", "-c", &touch]));
        ours.write_all(&frames(&[request])).unwrap();
        let conn = File::from(OwnedFd::from(theirs));
        let listener = OneConnection(Mutex::new(Some((conn, Peer::Vsock { cid: 3 }))));
        std::thread::spawn(move || serve(listener, Reaping::Own, |_| {}));
        let mut decoder = ExecDecoder::new();
        let mut got = Vec::new();
        while let Some(frame) = decoder.read_frame::<GuestFrame>(&mut ours).unwrap() {
            got.push(frame);
        }
        assert_eq!(
            got,
            [GuestFrame::Error {
                message: "vsock peer with CID 3 is not the host (CID 2): the exec service serves the host only".into()
            }]
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(!marker.exists(), "the command ran");
    }

    #[derive(Debug, Default)]
    struct Outcome {
        stdout: String,
        stderr: String,
        exit: Option<i32>,
        errors: Vec<String>,
    }

    /// Sends `raw` bytes, then reads every frame until the service closes.
    fn exchange(raw: &[u8]) -> Outcome {
        let (_dir, path) = server();
        let mut conn = UnixStream::connect(&path).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        conn.write_all(raw).unwrap();
        let mut decoder = ExecDecoder::new();
        let mut out = Outcome::default();
        while let Some(frame) = decoder.read_frame::<GuestFrame>(&mut conn).unwrap() {
            match frame {
                GuestFrame::Stdout(d) => out.stdout.push_str(&String::from_utf8_lossy(&d)),
                GuestFrame::Stderr(d) => out.stderr.push_str(&String::from_utf8_lossy(&d)),
                GuestFrame::Exit { code } => out.exit = Some(code),
                GuestFrame::Error { message } => out.errors.push(message),
            }
        }
        out
    }

    fn frames(frames: &[HostFrame]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.encode().unwrap()).collect()
    }

    fn request(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn run(argv: &[&str]) -> Outcome {
        exchange(&frames(&[
            HostFrame::Request(request(argv)),
            HostFrame::StdinClose,
        ]))
    }

    #[test]
    fn pipes_carry_output_and_the_exit_code() {
        let o = run(&["sh", "-c", "echo out; echo err >&2; exit 7"]);
        assert_eq!(o.stdout, "out\n");
        assert_eq!(o.stderr, "err\n");
        assert_eq!(o.exit, Some(7));
        assert!(o.errors.is_empty(), "{o:?}");
    }

    #[test]
    fn signals_follow_the_shell_convention() {
        assert_eq!(run(&["sh", "-c", "kill -9 $$"]).exit, Some(137));
    }

    #[test]
    fn stdin_reaches_the_command() {
        let o = exchange(&frames(&[
            HostFrame::Request(request(&["cat"])),
            HostFrame::Stdin(b"hello ".to_vec()),
            HostFrame::Stdin(b"world\n".to_vec()),
            HostFrame::StdinClose,
        ]));
        assert_eq!(o.stdout, "hello world\n");
        assert_eq!(o.exit, Some(0));
    }

    #[test]
    fn environment_cwd_and_defaults_apply() {
        let mut req = request(&["sh", "-c", "echo $FOO $KUBECONFIG; pwd"]);
        req.env.insert("FOO".into(), "bar".into());
        req.cwd = Some("/tmp".into());
        let o = exchange(&frames(&[HostFrame::Request(req), HostFrame::StdinClose]));
        let kubeconfig = std::env::var("KUBECONFIG").unwrap_or_else(|_| KUBECONFIG.into());
        assert_eq!(o.stdout, format!("bar {kubeconfig}\n/tmp\n"));
    }

    #[test]
    fn empty_argv_runs_sh() {
        let o = exchange(&frames(&[
            HostFrame::Request(ExecRequest::default()),
            HostFrame::Stdin(b"echo from-sh\n".to_vec()),
            HostFrame::StdinClose,
        ]));
        assert_eq!(o.stdout, "from-sh\n");
        assert_eq!(o.exit, Some(0));
    }

    #[test]
    fn a_missing_program_is_an_error_and_127() {
        let o = run(&["/nonexistent/prog"]);
        assert_eq!(o.exit, Some(127));
        assert!(o.errors[0].contains("/nonexistent/prog"), "{o:?}");
    }

    #[test]
    fn invalid_env_names_are_refused_by_the_service() {
        // Built by hand: the encoder would refuse it already.
        let json = br#"{"argv":["true"],"env":{"BAD-NAME":"x"}}"#;
        let mut raw = ((json.len() + 1) as u32).to_be_bytes().to_vec();
        raw.push(0x01);
        raw.extend_from_slice(json);
        let o = exchange(&raw);
        assert_eq!(o.exit, None);
        assert!(o.errors[0].contains("BAD-NAME"), "{o:?}");
    }

    #[test]
    fn garbage_gets_an_error_frame_and_the_connection_closes() {
        let mut raw = frames(&[HostFrame::Request(request(&["sleep", "30"]))]);
        raw.extend_from_slice(&[0, 0, 0, 2, 0x42, 0x42]);
        let started = Instant::now();
        let o = exchange(&raw);
        assert!(o.errors[0].contains("unknown kind 0x42"), "{o:?}");
        assert_eq!(o.exit, None);
        assert!(started.elapsed() < Duration::from_secs(10));
        // A first frame that is not a request.
        let o = exchange(&frames(&[HostFrame::StdinClose]));
        assert!(o.errors[0].contains("request"), "{o:?}");
    }

    #[test]
    fn tty_mode_gives_a_pty_with_the_size_and_term() {
        let mut req = request(&["sh", "-c", "tty; echo $TERM; stty size"]);
        req.tty = true;
        req.cols = 91;
        req.rows = 17;
        let o = exchange(&frames(&[HostFrame::Request(req)]));
        assert!(o.stdout.contains("/dev/pts/"), "{o:?}");
        assert!(o.stdout.contains("xterm-256color"), "{o:?}");
        assert!(o.stdout.contains("17 91"), "{o:?}");
        assert_eq!(o.exit, Some(0));
    }

    #[test]
    fn resize_reaches_the_pty() {
        let mut req = request(&["sh", "-c", "read x; stty size"]);
        req.tty = true;
        req.cols = 80;
        req.rows = 24;
        let o = exchange(&frames(&[
            HostFrame::Request(req),
            HostFrame::Resize {
                cols: 120,
                rows: 40,
            },
            HostFrame::Stdin(b"go\n".to_vec()),
        ]));
        assert!(o.stdout.contains("40 120"), "{o:?}");
        assert_eq!(o.exit, Some(0));
    }
}
