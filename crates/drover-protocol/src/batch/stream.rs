//! The telemetry stream: batches on one long-lived request instead of one request each
//! (`POST /device/v1/batches/stream`, see docs/protocol.md, "Telemetry stream").
//!
//! A request per batch costs a request head, a TLS record for it, a TCP segment for each, and
//! the ACK of the answer: about 290 bytes a batch over HTTP/2, more than the batch itself at one
//! minute. On the stream a batch costs its frame, a varint, and the HTTP/2 DATA frame, TLS
//! record and TCP segment that carry it; and the hub answers only when asked, for every batch up
//! to then at once, so the ACKs of answers are shared too.
//!
//! **Up** (device → hub), the request body: messages, each a LEB128 varint holding
//! `frame length × 2 + ack`, then the frame (a batch frame, as `POST /device/v1/batches` takes).
//! `ack` = 1 asks the hub to answer once this message is handled. A message with an empty frame
//! is only a request for an answer.
//!
//! **Stream frames.** Besides plain frames, the stream carries frames of version
//! [`STREAM_FORMAT_VERSION`](super::STREAM_FORMAT_VERSION), written against what the frames
//! before them on the same stream said ([`StreamContext`]): no device ID, the sequence number
//! as one bit when it is the next one, the base time as a step from the last frame's latest
//! reading, known meters by index with their series headers as one bit, and values relative to
//! each series' last value. A one-minute batch of a 3-channel meter shrinks from 106 to about
//! 80 bytes. Each end starts a context when the stream opens (with the device and
//! `Drover-Last-Seq`) and advances it with every frame, in order.
//!
//! **Down** (hub → device), the response body: one JSON object per line ([`Reply`]).

use serde::{Deserialize, Serialize};

use super::MAX_BATCH_BYTES;
pub use super::frame::{MAX_STREAM_METERS, MAX_STREAM_SERIES, StreamContext};

/// The `Content-Type` of the stream's request body.
pub const CONTENT_TYPE: &str = "application/x-drover-batch-stream";

/// The `Content-Type` of the stream's response body: JSON lines.
pub const REPLY_CONTENT_TYPE: &str = "application/x-ndjson";

/// The longest message header: a varint of at most `MAX_BATCH_BYTES × 2 + 1` (23 bits).
const MAX_HEADER_BYTES: usize = 4;

/// One message of the request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Whether the device asks for an answer once this message is handled.
    pub ack: bool,
    /// The batch frame; empty for a bare request for an answer.
    pub frame: Vec<u8>,
}

/// Appends one message to `out`.
///
/// # Panics
/// If `frame` is longer than [`MAX_BATCH_BYTES`] (no encoded batch is).
pub fn encode_message(frame: &[u8], ack: bool, out: &mut Vec<u8>) {
    assert!(frame.len() <= MAX_BATCH_BYTES, "frame past the limit");
    let mut v = (frame.len() as u64) << 1 | u64::from(ack);
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(frame);
}

/// Why the request body is not a valid stream. The hub answers with [`StreamError::code`] and
/// ends the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// A message header longer than any valid one.
    #[error("a stream message header is longer than {MAX_HEADER_BYTES} bytes")]
    BadHeader,
    /// A message declares a frame past the limit.
    #[error(
        "a stream message declares a {declared}-byte frame; a frame is at most {MAX_BATCH_BYTES} bytes"
    )]
    TooLarge {
        /// The declared length.
        declared: u64,
    },
    /// The body ended inside a message.
    #[error("the stream ended inside a message ({missing} bytes missing)")]
    Truncated {
        /// Bytes the message still needed (at least).
        missing: usize,
    },
}

impl StreamError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            StreamError::BadHeader => "stream_header",
            StreamError::TooLarge { .. } => "batch_too_large",
            StreamError::Truncated { .. } => "batch_truncated",
        }
    }
}

/// Splits a request body that arrives in pieces into messages.
#[derive(Debug, Default)]
pub struct MessageReader {
    buf: Vec<u8>,
    start: usize,
}

impl MessageReader {
    /// A reader with nothing buffered.
    pub fn new() -> MessageReader {
        MessageReader::default()
    }

    /// Adds bytes as they arrive.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `None` when more bytes are needed. An error is final.
    pub fn next_message(&mut self) -> Result<Option<Message>, StreamError> {
        let rest = &self.buf[self.start..];
        let mut value = 0u64;
        let mut header = 0;
        loop {
            let Some(&byte) = rest.get(header) else {
                if header >= MAX_HEADER_BYTES {
                    return Err(StreamError::BadHeader);
                }
                return Ok(None);
            };
            if header >= MAX_HEADER_BYTES {
                return Err(StreamError::BadHeader);
            }
            value |= u64::from(byte & 0x7f) << (7 * header);
            header += 1;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let len = value >> 1;
        if len > MAX_BATCH_BYTES as u64 {
            return Err(StreamError::TooLarge { declared: len });
        }
        let len = len as usize;
        if rest.len() < header + len {
            return Ok(None);
        }
        let frame = rest[header..header + len].to_vec();
        self.start += header + len;
        if self.start > 64 * 1024 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some(Message {
            ack: value & 1 == 1,
            frame,
        }))
    }

    /// Checks that the body ended between messages.
    pub fn finish(&self) -> Result<(), StreamError> {
        let rest = self.buf.len() - self.start;
        if rest == 0 {
            Ok(())
        } else {
            Err(StreamError::Truncated { missing: 1 })
        }
    }
}

/// One line of the response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// A message was refused; nothing of it or after it on this stream was stored, and the
    /// hub ends the stream. The fields are those of the `POST /device/v1/batches` answer the
    /// same frame would have had.
    Refused {
        /// The refused frame's sequence number (0 when the frame could not be read).
        refused: u64,
        /// The HTTP status the same batch would have been answered with.
        status: u16,
        /// The stable error code.
        error: String,
        /// What was wrong, for people.
        message: String,
        /// Seconds to wait before sending again (a full queue).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_s: Option<u64>,
    },
    /// Every batch of the device with this sequence number or a lower one is stored durably:
    /// the device's highest stored sequence number.
    Stored {
        /// The highest stored sequence number.
        stored: u64,
    },
}

impl Reply {
    /// The reply as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(body: &[u8], piece: usize) -> Result<Vec<Message>, StreamError> {
        let mut reader = MessageReader::new();
        let mut out = Vec::new();
        for chunk in body.chunks(piece.max(1)) {
            reader.push(chunk);
            while let Some(m) = reader.next_message()? {
                out.push(m);
            }
        }
        reader.finish()?;
        Ok(out)
    }

    #[test]
    fn messages_survive_any_split_of_the_body() {
        let frames: Vec<Vec<u8>> = vec![vec![], vec![7; 1], vec![9; 63], vec![1; 64], vec![3; 300]];
        let mut body = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            encode_message(f, i % 2 == 0, &mut body);
        }
        for piece in [1, 2, 3, 7, 64, body.len()] {
            let got = messages(&body, piece).unwrap();
            assert_eq!(got.len(), frames.len(), "piece {piece}");
            for (i, (m, f)) in got.iter().zip(&frames).enumerate() {
                assert_eq!(&m.frame, f);
                assert_eq!(m.ack, i % 2 == 0);
            }
        }
    }

    #[test]
    fn a_small_frame_costs_one_or_two_header_bytes() {
        let mut body = Vec::new();
        encode_message(&[0; 63], true, &mut body);
        assert_eq!(body.len(), 64);
        body.clear();
        encode_message(&[0; 106], false, &mut body);
        assert_eq!(body.len(), 108);
    }

    #[test]
    fn bad_bodies_are_refused_with_a_code() {
        // A header that never ends.
        assert_eq!(
            messages(&[0x80, 0x80, 0x80, 0x80, 0x01], 1).unwrap_err(),
            StreamError::BadHeader
        );
        // A declared length past the limit.
        let mut huge = Vec::new();
        let v = ((MAX_BATCH_BYTES as u64) + 1) << 1;
        huge.extend_from_slice(&[
            (v & 0x7f) as u8 | 0x80,
            ((v >> 7) & 0x7f) as u8 | 0x80,
            ((v >> 14) & 0x7f) as u8 | 0x80,
            (v >> 21) as u8,
        ]);
        assert!(matches!(
            messages(&huge, 4),
            Err(StreamError::TooLarge { .. })
        ));
        // A body cut inside a message.
        let mut cut = Vec::new();
        encode_message(&[5; 10], false, &mut cut);
        cut.truncate(6);
        assert_eq!(messages(&cut, 3).unwrap_err().code(), "batch_truncated");
    }

    #[test]
    fn replies_are_json_lines() {
        let stored = Reply::Stored { stored: 12 };
        assert_eq!(stored.to_line(), b"{\"stored\":12}\n");
        let refused = Reply::Refused {
            refused: 13,
            status: 422,
            error: "implausible_batch".into(),
            message: "too far ahead".into(),
            retry_after_s: None,
        };
        for reply in [stored, refused] {
            let line = reply.to_line();
            let back: Reply = serde_json::from_slice(&line[..line.len() - 1]).unwrap();
            assert_eq!(back, reply);
        }
    }
}
