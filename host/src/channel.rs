//! The host end of the boot channel: a unix socket the vsock device connects guest streams to.
//! Guest frames are decoded and validated on a reader thread and handed to the main loop as
//! [`Event`]s; the main loop writes [`HostMessage`]s back.
//!
//! The guest is untrusted: reads are bounded, one bad frame ends the connection with a typed
//! error, and nothing the guest sends can make the host buffer more than one frame.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::time::Instant;

use openshell_shared::protocol::{
    encode, Envelope, FrameDecoder, GuestMessage, HostMessage, ProtocolError, StreamValidator,
};

/// What the reader thread reports.
#[derive(Debug)]
pub enum ChannelEvent {
    Connected,
    Message {
        host_us: u64,
        envelope: Envelope<GuestMessage>,
    },
    Protocol(ProtocolError),
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot send to the guest: {0}")]
    Send(std::io::Error),
    #[error("cannot encode host message: {0}")]
    Encode(ProtocolError),
}

pub struct Channel {
    listener: UnixListener,
}

impl Channel {
    /// Listens before the VM starts, so the guest's first connect succeeds.
    pub fn listen(path: &Path) -> Result<Self, ChannelError> {
        let listener = UnixListener::bind(path).map_err(|source| ChannelError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self { listener })
    }

    /// Accepts the guest's connection on a thread and streams its events to `events`, each
    /// mapped through `wrap`. Returns a writer for host messages once connected.
    pub fn serve<E: Send + 'static>(
        self,
        start: Instant,
        events: SyncSender<E>,
        wrap: fn(ChannelEvent) -> E,
        writer: std::sync::Arc<std::sync::Mutex<Option<UnixStream>>>,
    ) {
        std::thread::spawn(move || {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(_) => return,
            };
            if let Ok(w) = stream.try_clone() {
                *writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
            }
            let _ = events.send(wrap(ChannelEvent::Connected));
            read_guest(stream, start, |e| events.send(wrap(e)).is_ok());
        });
    }
}

/// Reads and validates guest frames until the stream ends or breaks the protocol. `emit`
/// returns false when nobody listens any more.
pub fn read_guest(
    mut stream: impl Read,
    start: Instant,
    mut emit: impl FnMut(ChannelEvent) -> bool,
) {
    let mut decoder = FrameDecoder::default();
    let mut validator = StreamValidator::default();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => {
                let event = match decoder.finish() {
                    Ok(()) => ChannelEvent::Closed,
                    Err(e) => ChannelEvent::Protocol(e),
                };
                emit(event);
                return;
            }
            Ok(n) => n,
        };
        decoder.push(&buf[..n]);
        loop {
            let result = decoder.next_frame::<GuestMessage>().and_then(|f| match f {
                Some(envelope) => validator.check(&envelope).map(|()| Some(envelope)),
                None => Ok(None),
            });
            match result {
                Ok(Some(envelope)) => {
                    let host_us = start.elapsed().as_micros() as u64;
                    if !emit(ChannelEvent::Message { host_us, envelope }) {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    emit(ChannelEvent::Protocol(e));
                    return;
                }
            }
        }
    }
}

/// Sends one host message; `seq` counts host frames.
pub fn send(
    stream: &mut UnixStream,
    seq: u64,
    start: Instant,
    msg: HostMessage,
) -> Result<(), ChannelError> {
    let frame = encode(&Envelope {
        seq,
        t_us: start.elapsed().as_micros() as u64,
        msg,
    })
    .map_err(ChannelError::Encode)?;
    stream.write_all(&frame).map_err(ChannelError::Send)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use openshell_shared::PROTOCOL_VERSION;

    /// One guest frame as the wire carries it (also the event loop's flood test).
    pub(crate) fn frame(seq: u64, msg: GuestMessage) -> Vec<u8> {
        encode(&Envelope { seq, t_us: 1, msg }).expect("encode")
    }

    /// A guest's hello, the first frame of every boot.
    pub(crate) fn hello() -> GuestMessage {
        GuestMessage::Hello {
            protocol: PROTOCOL_VERSION,
            init_version: "t".into(),
            arch: "x86_64".into(),
            kernel_release: "6.1".into(),
            boot_id: "b".into(),
            init_entry_us: 1,
            ready_stages: Vec::new(),
        }
    }

    /// Feeds `bytes` through a real socket pair and collects the events.
    fn run(bytes: Vec<u8>) -> Vec<ChannelEvent> {
        let (mut a, b) = UnixStream::pair().expect("pair");
        let writer = std::thread::spawn(move || {
            let _ = a.write_all(&bytes);
        });
        let mut events = Vec::new();
        read_guest(b, Instant::now(), |e| {
            events.push(e);
            true
        });
        writer.join().expect("writer");
        events
    }

    #[test]
    fn good_stream_arrives_in_order_then_closes() {
        let mut bytes = frame(0, hello());
        bytes.extend(frame(1, GuestMessage::Ready { stage: "s".into() }));
        let events = run(bytes);
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(matches!(&events[0], ChannelEvent::Message { envelope, .. } if envelope.seq == 0));
        assert!(
            matches!(&events[1], ChannelEvent::Message { envelope, .. } if matches!(envelope.msg, GuestMessage::Ready { .. }))
        );
        assert!(matches!(events[2], ChannelEvent::Closed));
    }

    #[test]
    fn garbage_missing_hello_oversize_and_truncation_are_protocol_errors() {
        type Check = fn(&ProtocolError) -> bool;
        let cases: Vec<(Vec<u8>, Check)> = vec![
            (b"\x00\x00\x00\x05hello".to_vec(), |e| {
                matches!(e, ProtocolError::Malformed { .. })
            }),
            (frame(0, GuestMessage::Ready { stage: "s".into() }), |e| {
                matches!(e, ProtocolError::NoHello { .. })
            }),
            ([0xff, 0xff, 0xff, 0xff].to_vec(), |e| {
                matches!(e, ProtocolError::Oversized { .. })
            }),
            (frame(0, hello())[..10].to_vec(), |e| {
                matches!(e, ProtocolError::Truncated { .. })
            }),
            ([frame(0, hello()), frame(5, hello())].concat(), |e| {
                matches!(e, ProtocolError::Sequence { .. })
            }),
        ];
        for (bytes, want) in cases {
            let events = run(bytes);
            match events.last() {
                Some(ChannelEvent::Protocol(e)) => assert!(want(e), "unexpected {e}"),
                other => panic!("expected a protocol error, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_flood_is_cut_off_without_buffering_it() {
        // A 64 MiB "frame" announced and then streamed: the reader must stop at the header.
        let (mut a, b) = UnixStream::pair().expect("pair");
        let flooder = std::thread::spawn(move || {
            let _ = a.write_all(&u32::MAX.to_be_bytes());
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..64 {
                if a.write_all(&chunk).is_err() {
                    break; // reader hung up: good
                }
            }
        });
        let mut events = Vec::new();
        read_guest(b, Instant::now(), |e| {
            events.push(e);
            true
        });
        assert!(matches!(
            events.as_slice(),
            [ChannelEvent::Protocol(ProtocolError::Oversized { .. })]
        ));
        flooder.join().expect("flooder");
    }
}
