//! Newline framing with a length limit, used by both ends of the socket.
//!
//! Unlike `tokio_util::codec::LinesCodec`, it yields raw bytes (so invalid UTF-8 is reported as
//! a protocol error, not an I/O error that ends the stream) and reports an overlong line once,
//! then skips to the next newline and carries on.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A line, without its newline (a trailing `\r` is removed too).
    Line(BytesMut),
    /// A line longer than the limit was skipped.
    TooLong,
}

/// Splits a byte stream into lines of at most `max` bytes.
#[derive(Debug, Clone)]
pub struct LineCodec {
    max: usize,
    /// Skipping the rest of an overlong line.
    discarding: bool,
    /// Bytes of the buffer already searched for a newline.
    searched: usize,
}

impl LineCodec {
    pub fn new(max: usize) -> Self {
        LineCodec {
            max,
            discarding: false,
            searched: 0,
        }
    }
}

impl Decoder for LineCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        loop {
            let newline = buf[self.searched..]
                .iter()
                .position(|b| *b == b'\n')
                .map(|i| i + self.searched);
            match (newline, self.discarding) {
                (Some(i), true) => {
                    let _ = buf.split_to(i + 1);
                    self.discarding = false;
                    self.searched = 0;
                    continue;
                }
                (None, true) => {
                    buf.clear();
                    self.searched = 0;
                    return Ok(None);
                }
                (Some(i), false) => {
                    self.searched = 0;
                    if i > self.max {
                        let _ = buf.split_to(i + 1);
                        return Ok(Some(Frame::TooLong));
                    }
                    let mut line = buf.split_to(i + 1);
                    line.truncate(i);
                    if line.last() == Some(&b'\r') {
                        line.truncate(i - 1);
                    }
                    return Ok(Some(Frame::Line(line)));
                }
                (None, false) => {
                    if buf.len() > self.max {
                        buf.clear();
                        self.searched = 0;
                        self.discarding = true;
                        return Ok(Some(Frame::TooLong));
                    }
                    self.searched = buf.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        match self.decode(buf)? {
            Some(f) => Ok(Some(f)),
            None if buf.is_empty() || self.discarding => Ok(None),
            None => {
                // A last line without a newline still counts.
                let line = buf.split();
                self.searched = 0;
                Ok(Some(Frame::Line(line)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_limits_and_recovers() {
        let mut c = LineCodec::new(8);
        let mut buf = BytesMut::from(&b"ab\r\ncd\n0123456789abc\nok\n"[..]);
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(Frame::Line(BytesMut::from(&b"ab"[..])))
        );
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(Frame::Line(BytesMut::from(&b"cd"[..])))
        );
        assert_eq!(c.decode(&mut buf).unwrap(), Some(Frame::TooLong));
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(Frame::Line(BytesMut::from(&b"ok"[..])))
        );
        // An overlong line arriving in pieces is reported once and skipped.
        let mut buf = BytesMut::from(&b"0123456789"[..]);
        assert_eq!(c.decode(&mut buf).unwrap(), Some(Frame::TooLong));
        buf.extend_from_slice(b"more garbage");
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"end\nnext\n");
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(Frame::Line(BytesMut::from(&b"next"[..])))
        );
    }
}
