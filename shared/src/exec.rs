//! The exec service protocol: how `openshell-host exec` runs a command inside the guest and
//! streams its input and output, over vsock port [`EXEC_PORT`] (host-initiated).
//!
//! Same framing style as the boot channel, but the body starts with a one-byte kind so that the
//! bulk of the traffic (terminal bytes) travels raw instead of as JSON or base64:
//!
//! ```text
//! frame := length:u32 (big-endian, 1..=MAX_EXEC_FRAME_LEN)  kind:u8  payload:[u8; length - 1]
//!
//! host -> guest                          guest -> host
//! 0x01 request   JSON ExecRequest        0x81 stdout  raw bytes
//! 0x02 stdin     raw bytes               0x82 stderr  raw bytes
//! 0x03 stdin_close  (empty)              0x83 exit    code: i32 big-endian
//! 0x04 resize    cols:u16 rows:u16 (BE)  0x84 error   UTF-8 message
//! ```
//!
//! The host sends exactly one `request` first. The guest answers with output frames and ends
//! with `exit` once the output is drained, or with `error` (and then closes) when the request or
//! a later frame is refused. Both sides distrust each other: lengths are checked before
//! allocation, every frame is validated when decoded, and nothing here panics on bad input.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::valid_env_name;

/// vsock port the guest's exec service listens on.
pub const EXEC_PORT: u32 = 10777;

/// Largest frame body (kind byte included).
pub const MAX_EXEC_FRAME_LEN: usize = 64 * 1024;

/// Largest data payload a sender puts in one stdin/stdout/stderr frame.
pub const MAX_DATA_CHUNK: usize = 16 * 1024;

/// Largest error message, in bytes; longer ones are cut by the sender.
pub const MAX_ERROR_LEN: usize = 4096;

/// Most argv and env entries a request may carry (well under what a frame could hold, so that a
/// request cannot make the guest build a huge command line).
pub const MAX_ARGS: usize = 1024;

/// Shell used when the request's argv is empty.
pub const DEFAULT_ARGV: &[&str] = &["sh"];

use crate::framing::{BadLength, FrameBuffer, HEADER_LEN};

mod kind {
    pub const REQUEST: u8 = 0x01;
    pub const STDIN: u8 = 0x02;
    pub const STDIN_CLOSE: u8 = 0x03;
    pub const RESIZE: u8 = 0x04;
    pub const STDOUT: u8 = 0x81;
    pub const STDERR: u8 = 0x82;
    pub const EXIT: u8 = 0x83;
    pub const ERROR: u8 = 0x84;
}

/// What to run. `env` is merged over the service's own environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    #[serde(default)]
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute); `/` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub tty: bool,
    /// Initial terminal size (tty mode); 0 means unknown.
    #[serde(default)]
    pub cols: u16,
    #[serde(default)]
    pub rows: u16,
}

impl ExecRequest {
    /// The command to run: argv, or [`DEFAULT_ARGV`] when it is empty.
    pub fn command(&self) -> Vec<String> {
        if self.argv.is_empty() {
            DEFAULT_ARGV.iter().map(|s| s.to_string()).collect()
        } else {
            self.argv.clone()
        }
    }

    /// The working directory to use.
    pub fn cwd(&self) -> &str {
        self.cwd.as_deref().unwrap_or("/")
    }

    /// Checks what both sides require: valid env names (as the boot configuration), no NUL
    /// anywhere (it cannot reach execve), an absolute cwd, bounded counts.
    pub fn validate(&self) -> Result<(), ExecError> {
        if self.argv.len() > MAX_ARGS || self.env.len() > MAX_ARGS {
            return Err(ExecError::TooManyArgs {
                argv: self.argv.len(),
                env: self.env.len(),
                max: MAX_ARGS,
            });
        }
        for (i, a) in self.argv.iter().enumerate() {
            if a.contains('\0') {
                return Err(ExecError::Nul {
                    field: format!("argv[{i}]"),
                });
            }
        }
        for (k, v) in &self.env {
            if !valid_env_name(k) {
                return Err(ExecError::EnvName { name: k.clone() });
            }
            if v.contains('\0') {
                return Err(ExecError::Nul {
                    field: format!("env {k}"),
                });
            }
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') || cwd.contains('\0') {
                return Err(ExecError::Cwd { cwd: cwd.clone() });
            }
        }
        Ok(())
    }
}

/// A frame from the host to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostFrame {
    Request(ExecRequest),
    Stdin(Vec<u8>),
    StdinClose,
    Resize { cols: u16, rows: u16 },
}

/// A frame from the guest to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestFrame {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Shell convention: exit code, or 128 + the signal that killed the command.
    Exit {
        code: i32,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExecError {
    #[error("exec frame {frame} announces {len} bytes, more than the limit of {max}")]
    Oversized { frame: u64, len: usize, max: usize },
    #[error("exec frame {frame} announces an empty body")]
    Empty { frame: u64 },
    #[error("exec frame {frame} has unknown kind 0x{kind:02x}")]
    UnknownKind { frame: u64, kind: u8 },
    #[error("exec frame {frame} ({kind}) is malformed: {reason}")]
    Malformed {
        frame: u64,
        kind: &'static str,
        reason: String,
    },
    #[error("connection closed in the middle of exec frame {frame} ({have} of {need} bytes)")]
    Truncated {
        frame: u64,
        have: usize,
        need: usize,
    },
    #[error("{kind} frame of {len} bytes does not fit in an exec frame (limit {max})")]
    TooLargeToSend {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("invalid environment variable name {name:?}: letters, digits and _ only, not starting with a digit")]
    EnvName { name: String },
    #[error("{field} contains a NUL byte")]
    Nul { field: String },
    #[error("working directory {cwd:?} must be an absolute path")]
    Cwd { cwd: String },
    #[error("request has {argv} argv and {env} env entries; at most {max} each")]
    TooManyArgs { argv: usize, env: usize, max: usize },
}

/// Something that travels in an exec frame.
pub trait Frame: Sized {
    /// Serialises the frame: length prefix, kind, payload.
    fn encode(&self) -> Result<Vec<u8>, ExecError>;
    /// Parses and validates one frame body (kind byte first); `frame` is its index, for errors.
    fn decode(frame: u64, body: &[u8]) -> Result<Self, ExecError>;
}

fn frame_bytes(kind_name: &'static str, kind: u8, payload: &[u8]) -> Result<Vec<u8>, ExecError> {
    let len = payload.len() + 1;
    if len > MAX_EXEC_FRAME_LEN {
        return Err(ExecError::TooLargeToSend {
            kind: kind_name,
            len,
            max: MAX_EXEC_FRAME_LEN,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    Ok(out)
}

fn malformed(frame: u64, kind: &'static str, reason: impl Into<String>) -> ExecError {
    ExecError::Malformed {
        frame,
        kind,
        reason: reason.into(),
    }
}

impl Frame for HostFrame {
    fn encode(&self) -> Result<Vec<u8>, ExecError> {
        match self {
            HostFrame::Request(req) => {
                req.validate()?;
                let json =
                    serde_json::to_vec(req).map_err(|e| malformed(0, "request", e.to_string()))?;
                frame_bytes("request", kind::REQUEST, &json)
            }
            HostFrame::Stdin(data) => frame_bytes("stdin", kind::STDIN, data),
            HostFrame::StdinClose => frame_bytes("stdin_close", kind::STDIN_CLOSE, &[]),
            HostFrame::Resize { cols, rows } => {
                let mut p = [0u8; 4];
                p[..2].copy_from_slice(&cols.to_be_bytes());
                p[2..].copy_from_slice(&rows.to_be_bytes());
                frame_bytes("resize", kind::RESIZE, &p)
            }
        }
    }

    fn decode(frame: u64, body: &[u8]) -> Result<Self, ExecError> {
        let (&k, payload) = body.split_first().ok_or(ExecError::Empty { frame })?;
        match k {
            kind::REQUEST => {
                let req: ExecRequest = serde_json::from_slice(payload)
                    .map_err(|e| malformed(frame, "request", e.to_string()))?;
                req.validate()?;
                Ok(HostFrame::Request(req))
            }
            kind::STDIN => Ok(HostFrame::Stdin(payload.to_vec())),
            kind::STDIN_CLOSE if payload.is_empty() => Ok(HostFrame::StdinClose),
            kind::STDIN_CLOSE => Err(malformed(frame, "stdin_close", "carries a payload")),
            kind::RESIZE => match payload {
                [c0, c1, r0, r1] => Ok(HostFrame::Resize {
                    cols: u16::from_be_bytes([*c0, *c1]),
                    rows: u16::from_be_bytes([*r0, *r1]),
                }),
                _ => Err(malformed(
                    frame,
                    "resize",
                    format!("{} payload bytes, expected 4", payload.len()),
                )),
            },
            other => Err(ExecError::UnknownKind { frame, kind: other }),
        }
    }
}

impl Frame for GuestFrame {
    fn encode(&self) -> Result<Vec<u8>, ExecError> {
        match self {
            GuestFrame::Stdout(data) => frame_bytes("stdout", kind::STDOUT, data),
            GuestFrame::Stderr(data) => frame_bytes("stderr", kind::STDERR, data),
            GuestFrame::Exit { code } => frame_bytes("exit", kind::EXIT, &code.to_be_bytes()),
            GuestFrame::Error { message } => frame_bytes(
                "error",
                kind::ERROR,
                truncate(message, MAX_ERROR_LEN).as_bytes(),
            ),
        }
    }

    fn decode(frame: u64, body: &[u8]) -> Result<Self, ExecError> {
        let (&k, payload) = body.split_first().ok_or(ExecError::Empty { frame })?;
        match k {
            kind::STDOUT => Ok(GuestFrame::Stdout(payload.to_vec())),
            kind::STDERR => Ok(GuestFrame::Stderr(payload.to_vec())),
            kind::EXIT => match payload {
                [a, b, c, d] => Ok(GuestFrame::Exit {
                    code: i32::from_be_bytes([*a, *b, *c, *d]),
                }),
                _ => Err(malformed(
                    frame,
                    "exit",
                    format!("{} payload bytes, expected 4", payload.len()),
                )),
            },
            kind::ERROR => {
                if payload.len() > MAX_ERROR_LEN {
                    return Err(malformed(
                        frame,
                        "error",
                        format!("message of {} bytes, limit {MAX_ERROR_LEN}", payload.len()),
                    ));
                }
                let message = std::str::from_utf8(payload)
                    .map_err(|e| malformed(frame, "error", e.to_string()))?;
                Ok(GuestFrame::Error {
                    message: message.to_string(),
                })
            }
            other => Err(ExecError::UnknownKind { frame, kind: other }),
        }
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Incremental decoder: push bytes as they arrive, take out whole validated frames. Memory stays
/// bounded by one frame plus one read; after an error it refuses further input (the stream is
/// out of sync and the connection should be closed).
#[derive(Debug, Default)]
pub struct ExecDecoder {
    frames: FrameBuffer,
}

impl ExecDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.frames.push(bytes);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame<F: Frame>(&mut self) -> Result<Option<F>, ExecError> {
        self.frames
            .next_frame(MAX_EXEC_FRAME_LEN, F::decode, |frame, bad| match bad {
                BadLength::Empty => ExecError::Empty { frame },
                BadLength::Oversized { len, max } => ExecError::Oversized { frame, len, max },
            })
    }

    /// Reads from `r` until a whole frame is in; `Ok(None)` on a clean end of stream.
    pub fn read_frame<F: Frame>(
        &mut self,
        r: &mut impl std::io::Read,
    ) -> Result<Option<F>, ReadError> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(f) = self.next_frame()? {
                return Ok(Some(f));
            }
            let n = match r.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ReadError::Io(e)),
            };
            if n == 0 {
                self.finish()?;
                return Ok(None);
            }
            self.push(&chunk[..n]);
        }
    }

    /// At end of stream: a partial frame left over is an error.
    pub fn finish(&self) -> Result<(), ExecError> {
        match self.frames.truncated() {
            None => Ok(()),
            Some(t) => Err(ExecError::Truncated {
                frame: t.frame,
                have: t.have,
                need: t.need,
            }),
        }
    }
}

/// Why reading a frame from a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] ExecError),
    #[error("exec connection read failed: {0}")]
    Io(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req() -> ExecRequest {
        ExecRequest {
            argv: vec!["uname".into(), "-m".into()],
            env: [("A_1".to_string(), "x y".to_string())]
                .into_iter()
                .collect(),
            cwd: Some("/tmp".into()),
            tty: true,
            cols: 80,
            rows: 24,
        }
    }

    fn decode_all<F: Frame>(bytes: &[u8]) -> Result<Vec<F>, ExecError> {
        let mut d = ExecDecoder::new();
        d.push(bytes);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame()? {
            out.push(f);
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn every_frame_round_trips() {
        let host = vec![
            HostFrame::Request(req()),
            HostFrame::Stdin(b"hello\0\xff".to_vec()),
            HostFrame::StdinClose,
            HostFrame::Resize {
                cols: 132,
                rows: 43,
            },
        ];
        let bytes: Vec<u8> = host.iter().flat_map(|f| f.encode().unwrap()).collect();
        assert_eq!(decode_all::<HostFrame>(&bytes).unwrap(), host);

        let guest = vec![
            GuestFrame::Stdout(b"x86_64\n".to_vec()),
            GuestFrame::Stderr(vec![]),
            GuestFrame::Exit { code: -1 },
            GuestFrame::Error {
                message: "nope ✓".into(),
            },
        ];
        let bytes: Vec<u8> = guest.iter().flat_map(|f| f.encode().unwrap()).collect();
        assert_eq!(decode_all::<GuestFrame>(&bytes).unwrap(), guest);
    }

    #[test]
    fn empty_argv_means_sh_and_cwd_defaults_to_root() {
        let r = ExecRequest::default();
        assert_eq!(r.command(), vec!["sh".to_string()]);
        assert_eq!(r.cwd(), "/");
        // Fields may be left out on the wire.
        let mut d = ExecDecoder::new();
        let body = b"\x01{}";
        d.push(&(body.len() as u32).to_be_bytes());
        d.push(body);
        assert_eq!(
            d.next_frame::<HostFrame>().unwrap(),
            Some(HostFrame::Request(ExecRequest::default()))
        );
    }

    #[test]
    fn invalid_env_names_are_refused_on_both_sides() {
        let mut r = req();
        r.env.insert("1BAD".into(), "v".into());
        assert_eq!(
            HostFrame::Request(r.clone()).encode(),
            Err(ExecError::EnvName {
                name: "1BAD".into()
            })
        );
        let json = serde_json::to_vec(&r).unwrap();
        let mut bytes = ((json.len() + 1) as u32).to_be_bytes().to_vec();
        bytes.push(0x01);
        bytes.extend_from_slice(&json);
        let err = decode_all::<HostFrame>(&bytes).unwrap_err();
        assert_eq!(
            err,
            ExecError::EnvName {
                name: "1BAD".into()
            }
        );
        assert!(err.to_string().contains("1BAD"));
    }

    #[test]
    fn other_request_fields_are_checked() {
        let mut r = req();
        r.cwd = Some("relative".into());
        assert!(matches!(r.validate(), Err(ExecError::Cwd { .. })));
        let mut r = req();
        r.argv.push("a\0b".into());
        assert_eq!(
            r.validate(),
            Err(ExecError::Nul {
                field: "argv[2]".into()
            })
        );
        let mut r = req();
        r.argv = vec!["x".into(); MAX_ARGS + 1];
        assert!(matches!(r.validate(), Err(ExecError::TooManyArgs { .. })));
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        assert_eq!(
            decode_all::<HostFrame>(&[0, 0, 0, 0]),
            Err(ExecError::Empty { frame: 0 })
        );
        assert_eq!(
            decode_all::<HostFrame>(&[0, 0, 0, 1, 0x42]),
            Err(ExecError::UnknownKind {
                frame: 0,
                kind: 0x42
            })
        );
        // Guest kinds are not host kinds.
        assert!(matches!(
            decode_all::<HostFrame>(&GuestFrame::Exit { code: 0 }.encode().unwrap()),
            Err(ExecError::UnknownKind { kind: 0x83, .. })
        ));
        assert!(matches!(
            decode_all::<HostFrame>(&[0, 0, 0, 3, 0x04, 0, 1]),
            Err(ExecError::Malformed { kind: "resize", .. })
        ));
        assert!(matches!(
            decode_all::<GuestFrame>(&[0, 0, 0, 3, 0x84, 0xff, 0xfe]),
            Err(ExecError::Malformed { kind: "error", .. })
        ));
        assert_eq!(
            decode_all::<GuestFrame>(&[0, 0, 0, 9, 0x81]),
            Err(ExecError::Truncated {
                frame: 0,
                have: 5,
                need: 13
            })
        );
    }

    #[test]
    fn oversized_lengths_are_refused_before_the_body_arrives() {
        let mut d = ExecDecoder::new();
        d.push(&((MAX_EXEC_FRAME_LEN + 1) as u32).to_be_bytes());
        assert!(matches!(
            d.next_frame::<GuestFrame>(),
            Err(ExecError::Oversized { .. })
        ));
        // Refuses further input afterwards.
        d.push(&[0; 100]);
        assert_eq!(d.next_frame::<GuestFrame>(), Ok(None));
        assert!(matches!(
            GuestFrame::Stdout(vec![0; MAX_EXEC_FRAME_LEN]).encode(),
            Err(ExecError::TooLargeToSend { .. })
        ));
    }

    #[test]
    fn long_error_messages_are_cut_on_a_char_boundary() {
        let msg = "é".repeat(MAX_ERROR_LEN);
        let bytes = GuestFrame::Error { message: msg }.encode().unwrap();
        match decode_all::<GuestFrame>(&bytes).unwrap().as_slice() {
            [GuestFrame::Error { message }] => assert!(message.len() <= MAX_ERROR_LEN),
            other => panic!("{other:?}"),
        }
    }

    fn arb_guest() -> impl Strategy<Value = GuestFrame> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(GuestFrame::Stdout),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(GuestFrame::Stderr),
            any::<i32>().prop_map(|code| GuestFrame::Exit { code }),
            ".{0,40}".prop_map(|message| GuestFrame::Error { message }),
        ]
    }

    fn arb_host() -> impl Strategy<Value = HostFrame> {
        prop_oneof![
            (
                proptest::collection::vec("[a-z/ -]{0,8}", 0..4),
                proptest::collection::btree_map("[A-Z_][A-Z0-9_]{0,6}", ".{0,8}", 0..3),
                any::<bool>(),
                any::<u16>(),
                any::<u16>()
            )
                .prop_map(|(argv, env, tty, cols, rows)| HostFrame::Request(
                    ExecRequest {
                        argv,
                        env: env
                            .into_iter()
                            .map(|(k, v): (String, String)| (k, v.replace('\0', "")))
                            .collect(),
                        cwd: None,
                        tty,
                        cols,
                        rows
                    }
                )),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(HostFrame::Stdin),
            Just(HostFrame::StdinClose),
            (any::<u16>(), any::<u16>()).prop_map(|(cols, rows)| HostFrame::Resize { cols, rows }),
        ]
    }

    /// Feeds `bytes` in pieces cut at `cuts`, collecting frames as they complete.
    fn split_decode<F: Frame>(bytes: &[u8], cuts: &[usize]) -> Vec<F> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut d = ExecDecoder::new();
        let mut out = Vec::new();
        let mut last = 0;
        for p in points.into_iter().chain([bytes.len()]) {
            d.push(&bytes[last..p]);
            last = p;
            while let Some(f) = d.next_frame().unwrap() {
                out.push(f);
            }
        }
        d.finish().unwrap();
        out
    }

    proptest! {
        #[test]
        fn guest_frames_survive_any_read_split(
            frames in proptest::collection::vec(arb_guest(), 0..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let bytes: Vec<u8> = frames.iter().flat_map(|f| f.encode().unwrap()).collect();
            prop_assert_eq!(split_decode::<GuestFrame>(&bytes, &cuts), frames);
        }

        #[test]
        fn host_frames_survive_any_read_split(
            frames in proptest::collection::vec(arb_host(), 0..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let bytes: Vec<u8> = frames.iter().flat_map(|f| f.encode().unwrap()).collect();
            prop_assert_eq!(split_decode::<HostFrame>(&bytes, &cuts), frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = ExecDecoder::new();
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame::<HostFrame>() {}
            let _ = d.finish();
            let mut d = ExecDecoder::new();
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame::<GuestFrame>() {}
            let _ = d.finish();
        }
    }
}
