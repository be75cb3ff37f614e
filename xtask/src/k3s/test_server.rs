//! A small HTTP/1.1 file server on 127.0.0.1 for the download tests: the real curl talks to it
//! over a real socket, as it talks to GitHub's release server. It answers GET and HEAD with
//! `Content-Length` and closes each connection; it can also misbehave the ways a server or a
//! network does (a body cut short, a body that never ends).
//!
//! What GitHub does differently: HTTPS, and a redirect from the release URL to a storage host;
//! curl follows both the same way (`-L`), so neither is exercised here.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// What the server sends for one path.
#[derive(Debug, Clone)]
pub enum Reply {
    /// The whole body.
    Whole(Vec<u8>),
    /// Announces `announced` bytes, sends `body` (fewer), then closes: a cut connection.
    Truncated { body: Vec<u8>, announced: usize },
    /// No length, and bytes until the client goes away (capped at 1 GiB).
    Endless,
}

#[derive(Default)]
struct State {
    files: BTreeMap<String, Reply>,
    gets: BTreeMap<String, usize>,
}

pub struct Server {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl Server {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = shared.clone();
                std::thread::spawn(move || serve(conn, &s));
            }
        });
        Self { url, state }
    }

    /// Serves `reply` at `path` (which starts with `/`), replacing what was there.
    pub fn put(&self, path: &str, reply: Reply) {
        self.lock().files.insert(path.to_string(), reply);
    }

    /// How many GET requests `path` has had.
    pub fn gets(&self, path: &str) -> usize {
        self.lock().gets.get(path).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("server state")
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>) {
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    // The headers are read and ignored.
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let reply = {
        let mut st = state.lock().expect("server state");
        if method == "GET" {
            *st.gets.entry(path.to_string()).or_default() += 1;
        }
        st.files.get(path).cloned()
    };
    let _ = respond(conn, method == "HEAD", reply);
}

fn respond(mut conn: TcpStream, head: bool, reply: Option<Reply>) -> std::io::Result<()> {
    let header = |status: &str, len: Option<usize>| {
        let len = len
            .map(|n| format!("Content-Length: {n}\r\n"))
            .unwrap_or_default();
        format!("HTTP/1.1 {status}\r\n{len}Connection: close\r\n\r\n")
    };
    match reply {
        None => conn.write_all(header("404 Not Found", Some(0)).as_bytes()),
        Some(Reply::Whole(body)) => {
            conn.write_all(header("200 OK", Some(body.len())).as_bytes())?;
            if !head {
                conn.write_all(&body)?;
            }
            Ok(())
        }
        Some(Reply::Truncated { body, announced }) => {
            conn.write_all(header("200 OK", Some(announced)).as_bytes())?;
            if !head {
                conn.write_all(&body)?;
            }
            Ok(())
        }
        Some(Reply::Endless) => {
            conn.write_all(header("200 OK", None).as_bytes())?;
            if head {
                return Ok(());
            }
            let chunk = vec![b'0'; 1 << 16];
            for _ in 0..(1 << 14) {
                conn.write_all(&chunk)?;
            }
            Ok(())
        }
    }
}
