//! Boot event reporting: every event goes to the console (or, for the host-side `phase` command,
//! to stdout as JSON lines) and, once connected, over the vsock boot channel to the host.
//!
//! The channel is best effort by design: events emitted before the connection are buffered (up to
//! a bound) and sent in order after `hello`; when no host listens, boot goes on console-only.
//! Sequence numbers are assigned when a frame is written, so the host always sees `hello` as 0.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use openshell_shared::protocol::{encode, Envelope, FrameDecoder, GuestMessage, HostMessage};
use openshell_shared::{Level, Outcome, PROTOCOL_VERSION};

use crate::console;
use openshell_init::clock::boottime_us;

/// Events kept while the channel is not up yet. A normal boot emits a few dozen.
const MAX_PENDING: usize = 1024;
/// vsock address of the host.
pub(crate) const HOST_CID: u32 = 2;

/// Where events are printed besides the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// Human-readable lines on the console (PID 1).
    Console,
    /// One JSON envelope per line on stdout (`openshell-init phase`), private keys redacted.
    JsonLines,
}

/// Called with every message the host sends.
pub type HostHandler = Box<dyn Fn(HostMessage) + Send + Sync>;

enum Conn {
    /// Not attempted yet, or attempt in progress: buffer.
    Pending,
    Connected(File),
    /// No host, or it went away: console only.
    Unavailable,
}

struct Inner {
    conn: Conn,
    pending: VecDeque<(u64, GuestMessage)>,
    dropped: u64,
    next_seq: u64,
}

pub struct Reporter {
    sink: Sink,
    init_entry_us: u64,
    inner: Mutex<Inner>,
    connector: Mutex<Option<JoinHandle<()>>>,
    host_closed: Arc<(Mutex<bool>, Condvar)>,
    ready_stages: Mutex<Vec<String>>,
}

impl Reporter {
    pub fn new(sink: Sink, init_entry_us: u64) -> Arc<Self> {
        Arc::new(Self {
            sink,
            init_entry_us,
            inner: Mutex::new(Inner {
                conn: Conn::Pending,
                pending: VecDeque::new(),
                dropped: 0,
                next_seq: 0,
            }),
            connector: Mutex::new(None),
            host_closed: Arc::new((Mutex::new(false), Condvar::new())),
            ready_stages: Mutex::new(Vec::new()),
        })
    }

    /// Locks the state even if a panicking thread poisoned it: reporting must outlive panics.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Like [`Reporter::lock`] but gives up instead of waiting (the panic hook must not deadlock
    /// on a lock its own thread holds).
    fn try_lock(&self) -> Option<MutexGuard<'_, Inner>> {
        match self.inner.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    pub fn emit(&self, msg: GuestMessage) {
        let mut inner = self.lock();
        self.emit_locked(&mut inner, msg);
    }

    /// Best-effort emit for the panic path.
    pub fn try_emit(&self, msg: GuestMessage) -> bool {
        match self.try_lock() {
            Some(mut inner) => {
                self.emit_locked(&mut inner, msg);
                true
            }
            None => false,
        }
    }

    fn emit_locked(&self, inner: &mut Inner, msg: GuestMessage) {
        let t_us = boottime_us();
        match self.sink {
            Sink::Console => console::log(&human(&msg)),
            Sink::JsonLines => {
                // stdout is a terminal or a log file: private keys stay out of it.
                let envelope = Envelope {
                    seq: inner.next_seq,
                    t_us,
                    msg: msg.redacted().into_owned(),
                };
                if let Ok(line) = serde_json::to_string(&envelope) {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
                if matches!(inner.conn, Conn::Unavailable) {
                    inner.next_seq += 1;
                }
            }
        }
        match &mut inner.conn {
            Conn::Pending => {
                if inner.pending.len() >= MAX_PENDING {
                    inner.pending.pop_front();
                    inner.dropped += 1;
                }
                inner.pending.push_back((t_us, msg));
            }
            Conn::Connected(_) => send(inner, t_us, msg),
            Conn::Unavailable => {}
        }
    }

    pub fn log(&self, level: Level, text: impl Into<String>) {
        self.emit(GuestMessage::Log {
            level,
            text: text.into(),
        });
    }

    pub fn phase_finished(&self, phase: &str, duration_us: u64, outcome: Outcome) {
        self.emit(GuestMessage::PhaseFinished {
            phase: phase.to_string(),
            duration_us,
            outcome,
        });
    }

    /// Never connect: the host-side `phase` command has no host to talk to.
    pub fn disable_channel(&self) {
        let mut inner = self.lock();
        inner.pending.clear();
        inner.conn = Conn::Unavailable;
    }

    /// Starts connecting to the host in the background, retrying for up to `timeout`.
    pub fn connect(self: &Arc<Self>, port: u32, timeout: Duration, on_host: HostHandler) {
        let me = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("boot-channel".into())
            .spawn(move || me.connect_loop(port, timeout, on_host));
        match handle {
            Ok(h) => *self.connector.lock().unwrap_or_else(|p| p.into_inner()) = Some(h),
            Err(e) => {
                self.lock().conn = Conn::Unavailable;
                console::log(&format!("boot channel: cannot start connector thread: {e}"));
            }
        }
    }

    fn connect_loop(self: Arc<Self>, port: u32, timeout: Duration, on_host: HostHandler) {
        let deadline = Instant::now() + timeout;
        let mut last_err = String::new();
        let mut attempts = 0u32;
        let stream = loop {
            attempts += 1;
            match connect_vsock(HOST_CID, port) {
                Ok(f) => break Some(f),
                Err(e) => last_err = e.to_string(),
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let Some(stream) = stream else {
            let mut inner = self.lock();
            inner.pending.clear();
            inner.conn = Conn::Unavailable;
            drop(inner);
            console::log(&format!(
                "boot channel: no host on vsock {HOST_CID}:{port} after {attempts} attempts ({last_err}); events go to the console only"
            ));
            return;
        };
        let reader = stream.try_clone();
        {
            let mut inner = self.lock();
            inner.conn = Conn::Connected(stream);
            let mut backlog = vec![(boottime_us(), self.hello())];
            if inner.dropped > 0 {
                let text = format!("{} early events dropped (buffer full)", inner.dropped);
                backlog.push((
                    boottime_us(),
                    GuestMessage::Log {
                        level: Level::Warn,
                        text,
                    },
                ));
            }
            backlog.extend(inner.pending.drain(..));
            send_all(&mut inner, backlog);
        }
        match reader {
            Ok(r) => read_host(r, on_host, Arc::clone(&self.host_closed)),
            Err(e) => console::log(&format!("boot channel: cannot read host messages: {e}")),
        }
    }

    fn hello(&self) -> GuestMessage {
        let uname = nix::sys::utsname::uname().ok();
        GuestMessage::Hello {
            protocol: PROTOCOL_VERSION,
            init_version: env!("CARGO_PKG_VERSION").to_string(),
            arch: std::env::consts::ARCH.to_string(),
            kernel_release: uname
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            init_entry_us: self.init_entry_us,
            ready_stages: self
                .ready_stages
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
        }
    }

    /// The readiness stages `hello` announces: set from the configuration before connecting.
    pub fn set_ready_stages(&self, stages: Vec<String>) {
        if let Ok(mut s) = self.ready_stages.lock() {
            *s = stages;
        }
    }

    /// Waits for the connection attempt to finish (connected or given up).
    pub fn wait_connected(&self) {
        let handle = self
            .connector
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            // The connector thread ends after the connect attempt only when the connection
            // failed; when connected it becomes the reader, so wait on the state instead.
            while !h.is_finished() {
                if !matches!(self.lock().conn, Conn::Pending) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }

    /// Whether [`Reporter::connect`] was called, or the channel given up or disabled.
    pub fn channel_started(&self) -> bool {
        self.connector
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
            || !matches!(self.lock().conn, Conn::Pending)
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.lock().conn, Conn::Connected(_))
    }

    /// After the last message: half-close and give the host up to `wait` to read everything and
    /// close its end, so nothing is lost when the VM resets its devices.
    pub fn close(&self, wait: Duration) {
        {
            let inner = self.lock();
            match &inner.conn {
                Conn::Connected(f) => {
                    let _ = nix::sys::socket::shutdown(
                        std::os::fd::AsRawFd::as_raw_fd(&f.as_fd()),
                        nix::sys::socket::Shutdown::Write,
                    );
                }
                _ => return,
            }
        }
        let (lock, cvar) = &*self.host_closed;
        let closed = lock.lock().unwrap_or_else(|p| p.into_inner());
        let _ = cvar.wait_timeout_while(closed, wait, |c| !*c);
    }
}

fn send(inner: &mut Inner, t_us: u64, msg: GuestMessage) {
    send_all(inner, [(t_us, msg)]);
}

/// Sends events as consecutive frames in one write: the backlog of a whole boot is one system
/// call and one train of vsock packets, not one of each per event (each costs the guest a trip
/// through the vsock stack and a notification of the host under emulation). An event that does
/// not encode is said on the console and skipped; a failed write ends the channel.
fn send_all(inner: &mut Inner, events: impl IntoIterator<Item = (u64, GuestMessage)>) {
    if !matches!(inner.conn, Conn::Connected(_)) {
        return;
    }
    let mut frames = Vec::new();
    let mut seq = inner.next_seq;
    for (t_us, msg) in events {
        match encode(&Envelope { seq, t_us, msg }) {
            Ok(frame) => {
                frames.extend_from_slice(&frame);
                seq += 1;
            }
            Err(e) => console::log(&format!("boot channel: event not sent: {e}")),
        }
    }
    let Conn::Connected(stream) = &mut inner.conn else {
        return;
    };
    if let Err(e) = stream.write_all(&frames) {
        console::log(&format!(
            "boot channel: host went away ({e}); events go to the console only"
        ));
        inner.conn = Conn::Unavailable;
        return;
    }
    inner.next_seq = seq;
}

/// A vsock stream to `cid`:`port` (the host, [`HOST_CID`], for the boot channel).
pub(crate) fn connect_vsock(cid: u32, port: u32) -> nix::Result<File> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(cid, port),
    )?;
    Ok(File::from(fd))
}

/// Reads host frames until the host closes; malformed input ends the reading, never init.
fn read_host(mut stream: File, on_host: HostHandler, closed: Arc<(Mutex<bool>, Condvar)>) {
    let mut decoder = FrameDecoder::default();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_frame::<HostMessage>() {
                Ok(Some(envelope)) => on_host(envelope.msg),
                Ok(None) => break,
                Err(e) => {
                    console::log(&format!("boot channel: bad frame from host: {e}"));
                    break;
                }
            }
        }
    }
    let (lock, cvar) = &*closed;
    *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
    cvar.notify_all();
}

/// One console line per event.
pub fn human(msg: &GuestMessage) -> String {
    msg.describe()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_say_what_happened() {
        let line = human(&GuestMessage::PhaseFinished {
            phase: "mounts".into(),
            duration_us: 1500,
            outcome: Outcome::Failed("/proc: EPERM".into()),
        });
        assert_eq!(line, "phase mounts: FAILED after 1.500 ms: /proc: EPERM");
    }

    #[test]
    fn pending_events_are_bounded() {
        let r = Reporter::new(Sink::Console, 1);
        for i in 0..(MAX_PENDING + 10) {
            r.log(Level::Debug, format!("e{i}"));
        }
        let inner = r.lock();
        assert_eq!(inner.pending.len(), MAX_PENDING);
        assert_eq!(inner.dropped, 10);
        assert!(matches!(&inner.pending[0].1, GuestMessage::Log { text, .. } if text == "e10"));
    }

    /// The backlog leaves in one write, as consecutive frames the host's decoder reads back in
    /// order; a host that went away ends the channel without losing the sequence count.
    #[test]
    fn the_backlog_is_one_write_of_consecutive_frames() {
        use std::os::unix::net::UnixStream;
        let (ours, mut host) = UnixStream::pair().expect("socketpair");
        let mut inner = Inner {
            conn: Conn::Connected(File::from(std::os::fd::OwnedFd::from(ours))),
            pending: VecDeque::new(),
            dropped: 0,
            next_seq: 5,
        };
        let events = (0..3).map(|i| {
            (
                100 + i,
                GuestMessage::Log {
                    level: Level::Info,
                    text: format!("e{i}"),
                },
            )
        });
        send_all(&mut inner, events);
        assert_eq!(inner.next_seq, 8);
        let mut bytes = vec![0u8; 1 << 16];
        // One read takes all three: they were written together.
        let n = host.read(&mut bytes).expect("read");
        let mut decoder = FrameDecoder::new(openshell_shared::MAX_FRAME_LEN);
        decoder.push(&bytes[..n]);
        for i in 0..3u64 {
            let frame: Envelope<GuestMessage> = decoder
                .next_frame()
                .expect("decodes")
                .expect("a whole frame");
            assert_eq!((frame.seq, frame.t_us), (5 + i, 100 + i));
            assert!(matches!(frame.msg, GuestMessage::Log { text, .. } if text == format!("e{i}")));
        }
        assert_eq!(decoder.buffered(), 0);
        drop(host);
        send(
            &mut inner,
            200,
            GuestMessage::Log {
                level: Level::Info,
                text: "gone".into(),
            },
        );
        assert!(matches!(inner.conn, Conn::Unavailable));
        assert_eq!(inner.next_seq, 8, "nothing counted as sent");
    }

    #[test]
    fn unreachable_host_means_console_only() {
        let r = Reporter::new(Sink::Console, 1);
        r.log(Level::Info, "before");
        // No vsock host here (or no vsock at all): the connector gives up quickly.
        r.connect(
            openshell_shared::BOOT_CHANNEL_PORT,
            Duration::from_millis(30),
            Box::new(|_| {}),
        );
        r.wait_connected();
        assert!(!r.is_connected());
        assert!(r.lock().pending.is_empty());
        r.log(Level::Info, "after");
        assert!(r.lock().pending.is_empty());
    }
}
