//! Length-prefixed frames on a byte stream: a u32 big-endian body length, then the body. The boot
//! channel and the exec service both frame this way; this module owns the buffering and the
//! length checks, each protocol owns its body format and its error type.

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// A length prefix no frame may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadLength {
    Empty,
    Oversized { len: usize, max: usize },
}

/// A stream that ended inside a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    /// Index of the unfinished frame.
    pub frame: u64,
    pub have: usize,
    pub need: usize,
}

/// Buffers received bytes and hands out whole frame bodies. Memory stays bounded by `max` plus one
/// read: an oversized length prefix is refused as soon as its four bytes are in. After any error
/// the stream is out of sync, so the buffer drops its bytes and refuses further input.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    frames: u64,
    failed: bool,
}

impl FrameBuffer {
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.failed {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Frames taken out so far: the index of the next one.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Decodes the next whole frame's body with `decode` (given the frame's index); `Ok(None)`
    /// when more bytes are needed. A bad length prefix becomes an error through `bad_length`.
    pub fn next_frame<T, E>(
        &mut self,
        max: usize,
        decode: impl FnOnce(u64, &[u8]) -> Result<T, E>,
        bad_length: impl FnOnce(u64, BadLength) -> E,
    ) -> Result<Option<T>, E> {
        if self.failed || self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let frame = self.frames;
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        let bad = if len == 0 {
            Some(BadLength::Empty)
        } else if len > max {
            Some(BadLength::Oversized { len, max })
        } else {
            None
        };
        if let Some(bad) = bad {
            self.fail();
            return Err(bad_length(frame, bad));
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let parsed = decode(frame, &self.buf[HEADER_LEN..HEADER_LEN + len]);
        self.buf.drain(..HEADER_LEN + len);
        self.frames += 1;
        if parsed.is_err() {
            self.fail();
        }
        parsed.map(Some)
    }

    /// At end of stream: the frame left unfinished, if any.
    pub fn truncated(&self) -> Option<Truncated> {
        if self.failed || self.buf.is_empty() {
            return None;
        }
        let need = match self.buf[..] {
            [a, b, c, d, ..] => HEADER_LEN + u32::from_be_bytes([a, b, c, d]) as usize,
            _ => HEADER_LEN,
        };
        Some(Truncated {
            frame: self.frames,
            have: self.buf.len(),
            need,
        })
    }

    fn fail(&mut self) {
        self.failed = true;
        self.buf = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(_: u64, b: &[u8]) -> Result<Vec<u8>, String> {
        Ok(b.to_vec())
    }
    fn bad(frame: u64, b: BadLength) -> String {
        format!("{frame}: {b:?}")
    }

    #[test]
    fn frames_come_out_whole_across_splits() {
        let mut f = FrameBuffer::default();
        f.push(&[0, 0, 0, 2, b'a']);
        assert_eq!(f.next_frame(8, body, bad), Ok(None));
        f.push(&[b'b', 0, 0]);
        assert_eq!(f.next_frame(8, body, bad), Ok(Some(b"ab".to_vec())));
        assert_eq!(f.frames(), 1);
        assert_eq!(f.buffered(), 2);
    }

    #[test]
    fn a_partial_frame_needs_its_header_then_its_declared_length() {
        let mut f = FrameBuffer::default();
        assert_eq!(f.truncated(), None);
        f.push(&[0, 0]);
        assert_eq!(f.truncated().map(|t| t.need), Some(4));
        f.push(&[1, 0, b'{']);
        assert_eq!(
            f.truncated(),
            Some(Truncated {
                frame: 0,
                have: 5,
                need: 4 + 256
            })
        );
    }

    #[test]
    fn bad_lengths_and_bodies_stop_the_stream() {
        let mut f = FrameBuffer::default();
        f.push(&[0, 0, 0, 9]);
        assert_eq!(
            f.next_frame(8, body, bad),
            Err("0: Oversized { len: 9, max: 8 }".to_string())
        );
        f.push(&[0, 0, 0, 1, b'x']);
        assert_eq!(f.buffered(), 0, "input refused after an error");
        assert_eq!(f.truncated(), None);

        let mut f = FrameBuffer::default();
        f.push(&[0, 0, 0, 0]);
        assert_eq!(f.next_frame(8, body, bad), Err("0: Empty".to_string()));

        let mut f = FrameBuffer::default();
        f.push(&[0, 0, 0, 1, b'x', 0, 0, 0, 1, b'y']);
        let refuse = |_: u64, _: &[u8]| Err::<(), _>("no".to_string());
        assert_eq!(f.next_frame(8, refuse, bad), Err("no".to_string()));
        assert_eq!(f.buffered(), 0);
    }
}
