//! The boot channel: messages between openshell-init (guest) and openshell-host over vsock.
//!
//! The guest connects to the host (CID 2) on [`BOOT_CHANNEL_PORT`]; the host listens before the VM
//! starts, so the guest never waits for the host to come up. The connection carries frames in both
//! directions:
//!
//! ```text
//! frame := length:u32 (big-endian, 1..=MAX_FRAME_LEN)  body:[u8; length]
//! body  := UTF-8 JSON object  {"seq": u64, "t_us": u64, "msg": {"type": "<kind>", ...fields}}
//! ```
//!
//! `seq` counts frames from 0 per sender, so a dropped or reordered frame is visible. `t_us` is the
//! sender's clock in microseconds: CLOCK_BOOTTIME for the guest (it starts near zero at kernel
//! entry, before /proc or the wall clock exist), the host's monotonic time since `up` started for
//! the host. The first guest frame is always `hello`, which carries [`PROTOCOL_VERSION`]; a host
//! that sees another major version ends the connection with [`ProtocolError::Version`].
//!
//! The peer is untrusted in both directions: frames are bounded by [`MAX_FRAME_LEN`] before any
//! allocation, and every malformed frame is a typed error, never a panic.

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to the messages below (2: `network_guarded`).
pub const PROTOCOL_VERSION: u16 = 2;

/// vsock port the host listens on for the guest-initiated boot channel.
pub const BOOT_CHANNEL_PORT: u32 = 10700;

/// Largest frame body accepted. Boot events are small; 64 KiB leaves room for long error texts
/// while keeping a hostile peer from making the decoder buffer more than this.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Size of the length prefix in front of every frame body.
pub use crate::framing::HEADER_LEN;
use crate::framing::{BadLength, FrameBuffer};

/// Readiness stages, in the order a boot reports them: the workload started, and with k3s as the
/// workload, the API server, the node and the gateway's port. The host learns in `hello` which of
/// them this boot will report; the last one is "ready".
pub mod stage {
    pub const WORKLOAD_STARTED: &str = "workload-started";
    pub const K3S_STARTED: &str = "k3s-started";
    pub const APISERVER_READY: &str = "apiserver-ready";
    pub const NODE_READY: &str = "node-ready";
    pub const GATEWAY_READY: &str = "gateway-ready";
}

/// A message from the guest (openshell-init) to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestMessage {
    /// First frame on every connection.
    Hello {
        protocol: u16,
        init_version: String,
        arch: String,
        kernel_release: String,
        boot_id: String,
        /// CLOCK_BOOTTIME at the first instruction of init, in microseconds: kernel boot time.
        init_entry_us: u64,
        /// The readiness stages this boot will report, in order (see [`stage`]); the host takes
        /// the last one as "ready". Empty from a guest that does not say: then the first is.
        #[serde(default)]
        ready_stages: Vec<String>,
    },
    PhaseStarted {
        phase: String,
    },
    PhaseFinished {
        phase: String,
        duration_us: u64,
        outcome: Outcome,
    },
    Log {
        level: Level,
        text: String,
    },
    /// A readiness stage was reached (e.g. `workload-started`; later `apiserver-ready`).
    Ready {
        stage: String,
    },
    /// Boot cannot go on; init powers off after sending this.
    Fatal {
        phase: String,
        error: String,
    },
    /// The gateway's mTLS client bundle (PEM), sent once the PKI is in place, so the host can
    /// store it for the user's tools without asking the guest again.
    Credentials {
        ca_crt: String,
        client_crt: String,
        client_key: String,
    },
    /// k3s's admin kubeconfig (`/etc/rancher/k3s/k3s.yaml`), sent once the API server is ready,
    /// so the host can write one for the user's kubectl without an exec agent. It embeds the
    /// admin client key: [`GuestMessage::redacted`] hides it whole.
    Kubeconfig {
        yaml: String,
    },
    /// The `network` phase's refusals are in place, sent once when it succeeded: TCP refused
    /// outright (`network.blocked_tcp`), the addresses where the host's loopback appears
    /// (`network.host_loopback` and the default router, if any) and the host ports still
    /// allowed there. On gvproxy the host exposes forwards only after this, and only when its
    /// control API and host address are in it.
    NetworkGuarded {
        refused_tcp: Vec<std::net::SocketAddrV4>,
        host_loopback: Vec<std::net::Ipv4Addr>,
        host_ports: Vec<u16>,
    },
    /// Init is about to power off.
    Exit {
        /// Shell convention: the workload's exit code, or 128 + signal number.
        status: i32,
        /// Peak resident set size of init itself, in KiB.
        peak_rss_kib: u64,
        /// Whether `sync()` and the read-only remount of the root finished.
        synced: bool,
    },
}

impl GuestMessage {
    /// The message as it may be logged or shown: a private key never leaves the process that
    /// received it except into the file meant for it.
    pub fn redacted(&self) -> std::borrow::Cow<'_, GuestMessage> {
        match self {
            GuestMessage::Credentials {
                ca_crt, client_crt, ..
            } => std::borrow::Cow::Owned(GuestMessage::Credentials {
                ca_crt: ca_crt.clone(),
                client_crt: client_crt.clone(),
                client_key: "<redacted>".into(),
            }),
            // The key sits inside the YAML; hiding the whole file is the only safe cut.
            GuestMessage::Kubeconfig { .. } => std::borrow::Cow::Owned(GuestMessage::Kubeconfig {
                yaml: "<redacted>".into(),
            }),
            other => std::borrow::Cow::Borrowed(other),
        }
    }

    /// One line for people (the guest console, `openshell-host logs`); the key stays out.
    pub fn describe(&self) -> String {
        match self {
            GuestMessage::Hello {
                init_version,
                arch,
                kernel_release,
                ..
            } => format!("openshell-init {init_version} on {arch}, kernel {kernel_release}"),
            GuestMessage::PhaseStarted { phase } => format!("phase {phase}: started"),
            GuestMessage::PhaseFinished {
                phase,
                duration_us,
                outcome,
            } => {
                let ms = *duration_us as f64 / 1000.0;
                match outcome {
                    Outcome::Ok => format!("phase {phase}: ok in {ms:.3} ms"),
                    Outcome::Skipped(why) => format!("phase {phase}: skipped ({why})"),
                    Outcome::Failed(err) => {
                        format!("phase {phase}: FAILED after {ms:.3} ms: {err}")
                    }
                }
            }
            GuestMessage::Log { level, text } => format!("{level}: {text}"),
            GuestMessage::Ready { stage } => format!("ready: {stage}"),
            GuestMessage::Fatal { phase, error } => format!("FATAL in phase {phase}: {error}"),
            // The key stays off the console.
            GuestMessage::Credentials { .. } => {
                "credentials: client bundle sent to the host".into()
            }
            GuestMessage::Kubeconfig { yaml } => {
                format!("kubeconfig: {} bytes sent to the host", yaml.len())
            }
            GuestMessage::NetworkGuarded {
                refused_tcp,
                host_loopback,
                host_ports,
            } => format!(
                "network guarded: TCP to {} refused; host loopback at {} open to {}",
                list(refused_tcp),
                list(host_loopback),
                if host_ports.is_empty() {
                    "no port".to_string()
                } else {
                    format!("ports {}", list(host_ports))
                }
            ),
            GuestMessage::Exit {
                status,
                peak_rss_kib,
                synced,
            } => format!(
                "exit status {status}, init peak RSS {peak_rss_kib} KiB, filesystems {}",
                if *synced { "synced" } else { "NOT synced" }
            ),
        }
    }

    /// Short name of the message kind, as it appears in the `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            GuestMessage::Hello { .. } => "hello",
            GuestMessage::PhaseStarted { .. } => "phase_started",
            GuestMessage::PhaseFinished { .. } => "phase_finished",
            GuestMessage::Log { .. } => "log",
            GuestMessage::Ready { .. } => "ready",
            GuestMessage::Fatal { .. } => "fatal",
            GuestMessage::Credentials { .. } => "credentials",
            GuestMessage::Kubeconfig { .. } => "kubeconfig",
            GuestMessage::NetworkGuarded { .. } => "network_guarded",
            GuestMessage::Exit { .. } => "exit",
        }
    }
}

/// Items joined with `, ` (`none` for no item), for the lines people read.
fn list<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".into();
    }
    items
        .iter()
        .map(T::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A message from the host to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMessage {
    /// Stop the workload (SIGTERM, then SIGKILL after `grace_ms`), sync and power off.
    Shutdown { grace_ms: u64 },
}

/// How a phase ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    content = "detail",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum Outcome {
    Ok,
    Skipped(String),
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        })
    }
}

/// One frame: a message with its sequence number and the sender's timestamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope<M> {
    pub seq: u64,
    pub t_us: u64,
    pub msg: M,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("frame {seq_hint} announces {len} bytes, more than the limit of {max}")]
    Oversized {
        seq_hint: u64,
        len: usize,
        max: usize,
    },
    #[error("frame {seq_hint} announces an empty body")]
    Empty { seq_hint: u64 },
    #[error("frame {seq_hint} is not a valid message: {reason}")]
    Malformed { seq_hint: u64, reason: String },
    #[error("connection closed in the middle of frame {seq_hint} ({have} of {need} bytes)")]
    Truncated {
        seq_hint: u64,
        have: usize,
        need: usize,
    },
    #[error("peer speaks protocol version {peer}, this side speaks {ours}")]
    Version { peer: u16, ours: u16 },
    #[error("first message must be hello, got {got}")]
    NoHello { got: &'static str },
    #[error("frame carries sequence number {got}, expected {expected}")]
    Sequence { expected: u64, got: u64 },
    #[error("message of {len} bytes does not fit in a frame (limit {max})")]
    TooLargeToSend { len: usize, max: usize },
}

/// Serialises one frame: the length prefix followed by the JSON body.
pub fn encode<M: Serialize>(envelope: &Envelope<M>) -> Result<Vec<u8>, ProtocolError> {
    let body = serde_json::to_vec(envelope).map_err(|e| ProtocolError::Malformed {
        seq_hint: envelope.seq,
        reason: e.to_string(),
    })?;
    if body.len() > MAX_FRAME_LEN {
        return Err(ProtocolError::TooLargeToSend {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Incremental frame decoder: feed it bytes as they arrive, take out whole frames.
///
/// Memory stays bounded by `max + HEADER_LEN + chunk size`: an oversized length prefix is rejected
/// as soon as its four bytes are in, before any body is buffered. After an error the stream is out
/// of sync, so the decoder refuses further input and the caller should close the connection.
#[derive(Debug)]
pub struct FrameDecoder {
    frames: FrameBuffer,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        Self {
            frames: FrameBuffer::default(),
            max,
        }
    }

    /// Appends received bytes. Callers read in bounded chunks and drain with
    /// [`FrameDecoder::next_frame`] after every push, which keeps the buffer under one frame.
    pub fn push(&mut self, bytes: &[u8]) {
        self.frames.push(bytes);
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.frames.buffered()
    }

    /// Returns the next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame<M: serde::de::DeserializeOwned>(
        &mut self,
    ) -> Result<Option<Envelope<M>>, ProtocolError> {
        self.frames.next_frame(
            self.max,
            |seq_hint, body| {
                serde_json::from_slice::<Envelope<M>>(body).map_err(|e| ProtocolError::Malformed {
                    seq_hint,
                    reason: e.to_string(),
                })
            },
            |seq_hint, bad| match bad {
                BadLength::Empty => ProtocolError::Empty { seq_hint },
                BadLength::Oversized { len, max } => {
                    ProtocolError::Oversized { seq_hint, len, max }
                }
            },
        )
    }

    /// Call at end of stream: a partial frame left in the buffer is an error.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        match self.frames.truncated() {
            None => Ok(()),
            Some(t) => Err(ProtocolError::Truncated {
                seq_hint: t.frame,
                have: t.have,
                need: t.need,
            }),
        }
    }
}

/// Checks what the host requires of the guest's message stream as a whole: hello first with a
/// matching protocol version, then gap-free sequence numbers.
#[derive(Debug, Default)]
pub struct StreamValidator {
    next_seq: u64,
}

impl StreamValidator {
    pub fn check(&mut self, envelope: &Envelope<GuestMessage>) -> Result<(), ProtocolError> {
        if envelope.seq != self.next_seq {
            return Err(ProtocolError::Sequence {
                expected: self.next_seq,
                got: envelope.seq,
            });
        }
        if self.next_seq == 0 {
            match &envelope.msg {
                GuestMessage::Hello { protocol, .. } if *protocol == PROTOCOL_VERSION => {}
                GuestMessage::Hello { protocol, .. } => {
                    return Err(ProtocolError::Version {
                        peer: *protocol,
                        ours: PROTOCOL_VERSION,
                    })
                }
                other => return Err(ProtocolError::NoHello { got: other.kind() }),
            }
        }
        self.next_seq += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    fn hello(seq: u64) -> Envelope<GuestMessage> {
        Envelope {
            seq,
            t_us: 12,
            msg: GuestMessage::Hello {
                protocol: PROTOCOL_VERSION,
                init_version: "0.1.0".into(),
                arch: "x86_64".into(),
                kernel_release: "6.1.0".into(),
                boot_id: "b".into(),
                init_entry_us: 5,
                ready_stages: vec!["workload-started".into()],
            },
        }
    }

    fn arb_outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            Just(Outcome::Ok),
            ".*".prop_map(Outcome::Skipped),
            ".*".prop_map(Outcome::Failed),
        ]
    }

    fn arb_level() -> impl Strategy<Value = Level> {
        prop_oneof![
            Just(Level::Debug),
            Just(Level::Info),
            Just(Level::Warn),
            Just(Level::Error)
        ]
    }

    fn arb_guest() -> impl Strategy<Value = GuestMessage> {
        prop_oneof![
            (
                any::<u16>(),
                ".*",
                ".*",
                ".*",
                ".*",
                any::<u64>(),
                proptest::collection::vec(".*", 0..4)
            )
                .prop_map(
                    |(
                        protocol,
                        init_version,
                        arch,
                        kernel_release,
                        boot_id,
                        init_entry_us,
                        ready_stages,
                    )| {
                        GuestMessage::Hello {
                            protocol,
                            init_version,
                            arch,
                            kernel_release,
                            boot_id,
                            init_entry_us,
                            ready_stages,
                        }
                    }
                ),
            ".*".prop_map(|phase| GuestMessage::PhaseStarted { phase }),
            (".*", any::<u64>(), arb_outcome()).prop_map(|(phase, duration_us, outcome)| {
                GuestMessage::PhaseFinished {
                    phase,
                    duration_us,
                    outcome,
                }
            }),
            (arb_level(), ".*").prop_map(|(level, text)| GuestMessage::Log { level, text }),
            ".*".prop_map(|stage| GuestMessage::Ready { stage }),
            (".*", ".*").prop_map(|(phase, error)| GuestMessage::Fatal { phase, error }),
            (".*", ".*", ".*").prop_map(|(ca_crt, client_crt, client_key)| {
                GuestMessage::Credentials {
                    ca_crt,
                    client_crt,
                    client_key,
                }
            }),
            ".*".prop_map(|yaml| GuestMessage::Kubeconfig { yaml }),
            (
                proptest::collection::vec(any::<(u32, u16)>(), 0..3),
                proptest::collection::vec(any::<u32>(), 0..3),
                proptest::collection::vec(any::<u16>(), 0..4)
            )
                .prop_map(|(refused, loopback, host_ports)| {
                    GuestMessage::NetworkGuarded {
                        refused_tcp: refused
                            .into_iter()
                            .map(|(ip, port)| std::net::SocketAddrV4::new(ip.into(), port))
                            .collect(),
                        host_loopback: loopback.into_iter().map(Into::into).collect(),
                        host_ports,
                    }
                }),
            (any::<i32>(), any::<u64>(), any::<bool>()).prop_map(
                |(status, peak_rss_kib, synced)| GuestMessage::Exit {
                    status,
                    peak_rss_kib,
                    synced
                }
            ),
        ]
    }

    #[test]
    fn the_guard_confirmation_reads_as_people_say_it() {
        let g = GuestMessage::NetworkGuarded {
            refused_tcp: vec!["192.168.127.1:80".parse().expect("addr")],
            host_loopback: vec!["192.168.127.254".parse().expect("ip")],
            host_ports: vec![],
        };
        assert_eq!(
            g.describe(),
            "network guarded: TCP to 192.168.127.1:80 refused; host loopback at 192.168.127.254 open to no port"
        );
        let json = serde_json::to_string(&g).expect("json");
        assert_eq!(
            json,
            r#"{"type":"network_guarded","refused_tcp":["192.168.127.1:80"],"host_loopback":["192.168.127.254"],"host_ports":[]}"#
        );
        // A guest that sends an address that is none is a malformed frame, not a panic.
        let bad = r#"{"seq":1,"t_us":0,"msg":{"type":"network_guarded","refused_tcp":["x"],"host_loopback":[],"host_ports":[]}}"#;
        let mut dec = FrameDecoder::default();
        dec.push(&(bad.len() as u32).to_be_bytes());
        dec.push(bad.as_bytes());
        assert!(matches!(
            dec.next_frame::<GuestMessage>(),
            Err(ProtocolError::Malformed { .. })
        ));
    }

    #[test]
    fn keys_are_redacted_and_nothing_else() {
        let c = GuestMessage::Credentials {
            ca_crt: "ca".into(),
            client_crt: "crt".into(),
            client_key: "secret".into(),
        };
        let shown = serde_json::to_string(&*c.redacted()).expect("json");
        assert!(
            !shown.contains("secret") && shown.contains("crt"),
            "{shown}"
        );
        let k = GuestMessage::Kubeconfig {
            yaml: "client-key-data: c2VjcmV0".into(),
        };
        let shown = serde_json::to_string(&*k.redacted()).expect("json");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(!k.describe().contains("c2VjcmV0"));
        assert_eq!(k.redacted().kind(), "kubeconfig");
        let r = GuestMessage::Ready { stage: "s".into() };
        assert_eq!(*r.redacted(), r);
    }

    proptest! {
        #[test]
        fn guest_messages_round_trip(msgs in proptest::collection::vec(arb_guest(), 1..20), split in 1usize..64) {
            let mut wire = Vec::new();
            let sent: Vec<_> = msgs.into_iter().enumerate()
                .map(|(i, msg)| Envelope { seq: i as u64, t_us: i as u64 * 7, msg })
                .collect();
            for e in &sent {
                wire.extend(encode(e).expect("encodes"));
            }
            // Deliver in arbitrary chunk sizes: frames must reassemble across reads.
            let mut dec = FrameDecoder::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(split) {
                dec.push(chunk);
                while let Some(f) = dec.next_frame::<GuestMessage>().expect("valid frame") {
                    got.push(f);
                }
            }
            dec.finish().expect("no partial frame");
            prop_assert_eq!(got, sent);
        }

        #[test]
        fn host_messages_round_trip(grace_ms in any::<u64>(), seq in any::<u64>()) {
            let e = Envelope { seq, t_us: 1, msg: HostMessage::Shutdown { grace_ms } };
            let mut dec = FrameDecoder::default();
            dec.push(&encode(&e).expect("encodes"));
            prop_assert_eq!(dec.next_frame::<HostMessage>().expect("valid"), Some(e));
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_stay_bounded(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut dec = FrameDecoder::new(1024);
            for chunk in data.chunks(97) {
                dec.push(chunk);
                while let Ok(Some(_)) = dec.next_frame::<GuestMessage>() {}
                prop_assert!(dec.buffered() <= 1024 + HEADER_LEN + 97);
            }
            let _ = dec.finish();
        }
    }

    #[test]
    fn oversized_length_is_rejected_before_the_body_arrives() {
        let mut dec = FrameDecoder::default();
        dec.push(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes());
        assert_eq!(
            dec.next_frame::<GuestMessage>(),
            Err(ProtocolError::Oversized {
                seq_hint: 0,
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            })
        );
        // Once out of sync, nothing more is buffered or decoded.
        dec.push(&[0; 100]);
        assert_eq!(dec.buffered(), 0);
        assert_eq!(dec.next_frame::<GuestMessage>(), Ok(None));
    }

    #[test]
    fn empty_and_garbage_frames_are_typed_errors() {
        let mut dec = FrameDecoder::default();
        dec.push(&0u32.to_be_bytes());
        assert_eq!(
            dec.next_frame::<GuestMessage>(),
            Err(ProtocolError::Empty { seq_hint: 0 })
        );

        let mut dec = FrameDecoder::default();
        let mut frame = encode(&hello(0)).expect("encodes");
        frame.extend_from_slice(&5u32.to_be_bytes());
        frame.extend_from_slice(b"{nope");
        dec.push(&frame);
        assert!(dec
            .next_frame::<GuestMessage>()
            .expect("first ok")
            .is_some());
        match dec.next_frame::<GuestMessage>() {
            Err(ProtocolError::Malformed { seq_hint: 1, .. }) => {}
            other => panic!("expected malformed frame 1, got {other:?}"),
        }
    }

    #[test]
    fn unknown_message_type_and_fields_are_rejected() {
        for body in [
            r#"{"seq":0,"t_us":0,"msg":{"type":"reboot_host"}}"#,
            r#"{"seq":0,"t_us":0,"msg":{"type":"ready","stage":"x","extra":1}}"#,
            r#"{"seq":0,"t_us":0,"msg":{"type":"ready"}}"#,
        ] {
            let mut dec = FrameDecoder::default();
            dec.push(&(body.len() as u32).to_be_bytes());
            dec.push(body.as_bytes());
            assert!(
                matches!(
                    dec.next_frame::<GuestMessage>(),
                    Err(ProtocolError::Malformed { .. })
                ),
                "{body} must be rejected"
            );
        }
    }

    #[test]
    fn truncated_stream_is_reported_at_finish() {
        let frame = encode(&hello(0)).expect("encodes");
        let mut dec = FrameDecoder::default();
        dec.push(&frame[..frame.len() - 3]);
        assert_eq!(dec.next_frame::<GuestMessage>(), Ok(None));
        assert_eq!(
            dec.finish(),
            Err(ProtocolError::Truncated {
                seq_hint: 0,
                have: frame.len() - 3,
                need: frame.len()
            })
        );
    }

    #[test]
    fn validator_requires_hello_version_and_order() {
        let mut v = StreamValidator::default();
        let ready = |seq| Envelope {
            seq,
            t_us: 0,
            msg: GuestMessage::Ready { stage: "s".into() },
        };
        assert_eq!(
            v.check(&ready(0)),
            Err(ProtocolError::NoHello { got: "ready" })
        );

        let mut v = StreamValidator::default();
        let mut old = hello(0);
        if let GuestMessage::Hello { protocol, .. } = &mut old.msg {
            *protocol = PROTOCOL_VERSION + 1;
        }
        assert!(matches!(v.check(&old), Err(ProtocolError::Version { .. })));

        let mut v = StreamValidator::default();
        v.check(&hello(0)).expect("hello accepted");
        v.check(&ready(1)).expect("in order");
        assert_eq!(
            v.check(&ready(3)),
            Err(ProtocolError::Sequence {
                expected: 2,
                got: 3
            })
        );
    }

    #[test]
    fn wire_format_is_stable() {
        // The documented format: a change here is a protocol change and needs a version bump.
        let e = Envelope {
            seq: 3,
            t_us: 42,
            msg: GuestMessage::PhaseFinished {
                phase: "mounts".into(),
                duration_us: 180,
                outcome: Outcome::Failed("boom".into()),
            },
        };
        let bytes = encode(&e).expect("encodes");
        let body = br#"{"seq":3,"t_us":42,"msg":{"type":"phase_finished","phase":"mounts","duration_us":180,"outcome":{"kind":"failed","detail":"boom"}}}"#;
        assert_eq!(&bytes[..4], &(body.len() as u32).to_be_bytes());
        assert_eq!(&bytes[4..], &body[..]);
    }
}
