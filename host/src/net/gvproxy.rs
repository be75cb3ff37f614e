//! gvproxy (gvisor-tap-vsock): the macOS user-mode network, also usable on Linux. Its subnet is
//! 192.168.127.0/24 with itself at .1 (gateway, DNS, DHCP) and the guest at .2 through a static
//! lease tied to [`crate::backend::spec::GUEST_MAC`]. Port forwards are made after start through
//! its HTTP API on a unix socket, and that API answers 500 while its network stack is still
//! coming up, so exposing retries with backoff inside one budget.
//!
//! The VM tests run real gvproxy (`tests/vm/gvproxy.rs`). The unit tests here script its API's
//! answers on a local socket instead, for what real gvproxy gives only by chance of timing (500
//! while its network stack starts, "already running" after a lost answer) or never (a 400).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{Forward, FORWARD_LISTEN};

/// The address gvproxy's DHCP hands the guest (static lease for our MAC).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 2);

/// gvproxy's control API as the guest reaches it: it can open ports on every host interface.
pub const API: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 1), 80);

/// The address gvproxy translates to the host's 127.0.0.1 (its NAT table, and what its DNS
/// calls `host.containers.internal`).
pub const HOST_LOOPBACK: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 254);

/// Why the guest's confirmation (`network_guarded`) does not allow exposing forwards.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotGuarded {
    #[error(
        "the guest did not confirm that it refuses gvproxy's control API ({API}): no forwards"
    )]
    Api,
    #[error("the guest did not confirm that it guards the host's loopback ({HOST_LOOPBACK}): no forwards")]
    HostLoopback,
    #[error("the guest allows host ports {extra:?} that were not asked for with --host-port: no forwards")]
    ExtraPorts { extra: Vec<u16> },
    #[error("the guest reported ready without confirming its refusals: no forwards")]
    Missing,
}

/// Checks the guest's confirmation before its forwards are exposed: gvproxy's API refused, its
/// host address guarded, and no host port open there beyond `asked`.
pub fn check_guarded(
    refused_tcp: &[SocketAddrV4],
    host_loopback: &[Ipv4Addr],
    host_ports: &[u16],
    asked: &[u16],
) -> Result<(), NotGuarded> {
    if !refused_tcp.contains(&API) {
        return Err(NotGuarded::Api);
    }
    if !host_loopback.contains(&HOST_LOOPBACK) {
        return Err(NotGuarded::HostLoopback);
    }
    let extra: Vec<u16> = host_ports
        .iter()
        .copied()
        .filter(|p| !asked.contains(p))
        .collect();
    if !extra.is_empty() {
        return Err(NotGuarded::ExtraPorts { extra });
    }
    Ok(())
}

/// How frames cross the data socket: qemu's length-prefixed stream (`-netdev stream`, libkrun's
/// `krun_add_net_unixstream`) or vfkit's datagrams (libkrun's `krun_add_net_unixgram` on macOS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    QemuStream,
    /// For the libkrun backend on macOS, which does not exist yet.
    #[allow(dead_code)]
    VfkitDatagram,
}

/// Arguments for gvproxy with its data socket at `net` and its API at `api`. `-ssh-port -1`:
/// gvproxy's own SSH forward is unused, and its default port 2222 collides with other VMs.
pub fn args(framing: Framing, net: &Path, api: &Path) -> Vec<OsString> {
    let listen = match framing {
        Framing::QemuStream => ("-listen-qemu", format!("unix://{}", net.display())),
        Framing::VfkitDatagram => ("-listen-vfkit", format!("unixgram://{}", net.display())),
    };
    vec![
        listen.0.into(),
        listen.1.into(),
        "-listen".into(),
        format!("unix://{}", api.display()).into(),
        "-ssh-port".into(),
        "-1".into(),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum ExposeError {
    #[error("gvproxy refused forward {forward}: HTTP {status}: {body}")]
    Refused {
        forward: Forward,
        status: u16,
        body: String,
    },
    #[error("gvproxy did not expose forward {forward} within {budget:?} ({attempts} attempts; last: {last})")]
    GaveUp {
        forward: Forward,
        budget: Duration,
        attempts: u32,
        last: String,
    },
}

/// How one request went.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// Done (or already done by an earlier attempt whose answer was lost).
    Exposed,
    /// Worth another try: the API is not up yet, or its network stack is not ready.
    Retry(String),
    /// The request itself is wrong: trying again cannot help.
    Refused(u16, String),
}

/// The request body: listen on loopback on the host, connect to the guest's address.
pub fn expose_body(forward: Forward, guest: Ipv4Addr) -> String {
    serde_json::json!({
        "local": format!("{FORWARD_LISTEN}:{}", forward.host),
        "remote": format!("{guest}:{}", forward.guest),
        "protocol": "tcp",
    })
    .to_string()
}

fn request(body: &str) -> String {
    format!(
        "POST /services/forwarder/expose HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Answers are small; a longer one is cut, not buffered without bound.
const MAX_ANSWER: u64 = 64 * 1024;

fn attempt(api: &Path, body: &str) -> Answer {
    let mut stream = match UnixStream::connect(api) {
        Ok(s) => s,
        Err(e) => return Answer::Retry(format!("connect {}: {e}", api.display())),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if let Err(e) = stream.write_all(request(body).as_bytes()) {
        return Answer::Retry(format!("send: {e}"));
    }
    let mut raw = Vec::new();
    if let Err(e) = (&mut stream).take(MAX_ANSWER).read_to_end(&mut raw) {
        return Answer::Retry(format!("read: {e}"));
    }
    classify(&String::from_utf8_lossy(&raw))
}

/// Reads an HTTP/1.x answer: 200/204 is done; "already running" (a 500) means an earlier attempt
/// got through; other 5xx and garbage are retried; 4xx is final.
fn classify(answer: &str) -> Answer {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    let body = body.trim().to_string();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1."))
        .and_then(|l| l.get(2..5))
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(200 | 204) => Answer::Exposed,
        Some(500) if body.contains("already running") => Answer::Exposed,
        Some(s) if (400..500).contains(&s) => Answer::Refused(s, body),
        Some(s) => Answer::Retry(format!("HTTP {s}: {body}")),
        None => Answer::Retry(format!(
            "not an HTTP answer: {:?}",
            answer.chars().take(80).collect::<String>()
        )),
    }
}

/// Exposes `forward` through gvproxy's API at `api`, retrying from 100 ms to 1 s apart until
/// `budget` is spent. Returns the number of attempts.
pub fn expose(
    api: &Path,
    forward: Forward,
    guest: Ipv4Addr,
    budget: Duration,
) -> Result<u32, ExposeError> {
    let body = expose_body(forward, guest);
    let deadline = Instant::now() + budget;
    let mut pause = Duration::from_millis(100);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match attempt(api, &body) {
            Answer::Exposed => return Ok(attempts),
            Answer::Refused(status, body) => {
                return Err(ExposeError::Refused {
                    forward,
                    status,
                    body,
                })
            }
            Answer::Retry(last) => {
                let now = Instant::now();
                if now + pause > deadline {
                    return Err(ExposeError::GaveUp {
                        forward,
                        budget,
                        attempts,
                        last,
                    });
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    /// A stand-in for gvproxy's API: answers each connection with the next scripted reply and
    /// records the request bytes it got. Real gvproxy decides its answers itself (see the module
    /// doc); its reply shapes (status line, plain-text error body) are the ones scripted here.
    fn api(
        dir: &Path,
        replies: Vec<&'static str>,
    ) -> (std::path::PathBuf, Arc<Mutex<Vec<String>>>) {
        let path = dir.join("api.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            for reply in replies {
                let Ok((mut conn, _)) = listener.accept() else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                // Headers, then as many body bytes as Content-Length says.
                loop {
                    let n = conn.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
                log.lock()
                    .expect("lock")
                    .push(String::from_utf8_lossy(&buf).into());
                let _ = conn.write_all(reply.as_bytes());
            }
        });
        (path, seen)
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    const NOT_READY: &str =
        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\nconnect: network is unreachable\n";

    #[test]
    fn arguments_per_framing() {
        let q = args(
            Framing::QemuStream,
            Path::new("/r/gv.sock"),
            Path::new("/r/gv-api.sock"),
        );
        assert_eq!(
            q,
            [
                "-listen-qemu",
                "unix:///r/gv.sock",
                "-listen",
                "unix:///r/gv-api.sock",
                "-ssh-port",
                "-1"
            ]
            .map(OsString::from)
        );
        let v = args(
            Framing::VfkitDatagram,
            Path::new("/r/gv.sock"),
            Path::new("/a"),
        );
        assert_eq!(v[0], "-listen-vfkit");
        assert_eq!(v[1], "unixgram:///r/gv.sock");
    }

    #[test]
    fn exact_request_and_retry_until_the_netstack_is_ready() {
        let t = tempfile::tempdir().expect("tmp");
        let (path, seen) = api(t.path(), vec![NOT_READY, NOT_READY, OK]);
        let fwd = Forward {
            host: 30051,
            guest: 30051,
        };
        let attempts = expose(&path, fwd, GUEST_IP, Duration::from_secs(5)).expect("exposed");
        assert_eq!(attempts, 3);
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.len(), 3);
        let body = r#"{"local":"127.0.0.1:30051","protocol":"tcp","remote":"192.168.127.2:30051"}"#;
        assert_eq!(
            seen[0],
            format!(
                "POST /services/forwarder/expose HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        );
        let parsed: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(parsed["local"], "127.0.0.1:30051", "loopback only");
    }

    #[test]
    fn already_exposed_counts_as_done() {
        let t = tempfile::tempdir().expect("tmp");
        let (path, _) = api(
            t.path(),
            vec!["HTTP/1.1 500 Internal Server Error\r\n\r\nproxy already running for tcp on 127.0.0.1:8080\n"],
        );
        let fwd = Forward {
            host: 8080,
            guest: 80,
        };
        assert_eq!(
            expose(&path, fwd, GUEST_IP, Duration::from_secs(2)).expect("ok"),
            1
        );
    }

    #[test]
    fn a_bad_request_is_not_retried() {
        let t = tempfile::tempdir().expect("tmp");
        let (path, seen) = api(
            t.path(),
            vec!["HTTP/1.1 400 Bad Request\r\n\r\ninvalid remote addr\n", OK],
        );
        let fwd = Forward { host: 1, guest: 2 };
        match expose(&path, fwd, GUEST_IP, Duration::from_secs(5)) {
            Err(ExposeError::Refused { status, body, .. }) => {
                assert_eq!(status, 400);
                assert_eq!(body, "invalid remote addr");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(seen.lock().expect("lock").len(), 1);
    }

    #[test]
    fn no_api_socket_gives_up_within_the_budget_naming_the_forward() {
        let t = tempfile::tempdir().expect("tmp");
        let start = Instant::now();
        let fwd = Forward { host: 9, guest: 10 };
        let err = expose(
            &t.path().join("nothing.sock"),
            fwd,
            GUEST_IP,
            Duration::from_millis(350),
        )
        .expect_err("no api");
        assert!(start.elapsed() < Duration::from_secs(2));
        let text = err.to_string();
        assert!(text.contains("127.0.0.1:9 -> guest:10"), "{text}");
        assert!(text.contains("nothing.sock"), "{text}");
        assert!(matches!(err, ExposeError::GaveUp { attempts, .. } if attempts >= 2));
    }

    /// Forwards only for a guest that refuses the API and guards the host's address with no
    /// more ports than asked for.
    #[test]
    fn forwards_need_the_guests_confirmation() {
        let guarded = |refused: &[SocketAddrV4], loopback: &[Ipv4Addr], ports: &[u16]| {
            check_guarded(refused, loopback, ports, &[8080])
        };
        assert_eq!(guarded(&[API], &[HOST_LOOPBACK], &[]), Ok(()));
        assert_eq!(guarded(&[API], &[HOST_LOOPBACK], &[8080]), Ok(()));
        assert_eq!(guarded(&[], &[HOST_LOOPBACK], &[]), Err(NotGuarded::Api));
        let other_port = SocketAddrV4::new(*API.ip(), 81);
        assert_eq!(
            guarded(&[other_port], &[HOST_LOOPBACK], &[]),
            Err(NotGuarded::Api)
        );
        assert_eq!(guarded(&[API], &[], &[]), Err(NotGuarded::HostLoopback));
        let e = guarded(&[API], &[HOST_LOOPBACK], &[8080, 22]).expect_err("22");
        assert_eq!(e, NotGuarded::ExtraPorts { extra: vec![22] });
        assert!(e.to_string().contains("[22]"), "{e}");
    }

    #[test]
    fn garbage_answers_are_retried_not_trusted() {
        assert!(matches!(classify("SSH-2.0-x"), Answer::Retry(_)));
        assert!(matches!(classify(""), Answer::Retry(_)));
        assert_eq!(classify("HTTP/1.0 204 No Content\r\n\r\n"), Answer::Exposed);
        assert!(
            matches!(classify("HTTP/1.1 503 x\r\n\r\nbusy"), Answer::Retry(t) if t.contains("503"))
        );
    }
}
