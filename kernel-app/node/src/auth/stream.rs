//! Sealed byte streams: length-prefixed frames over TCP, each sealed with ChaCha20-Poly1305
//! under a per-direction key, the nonce a frame counter. TCP delivers in order, so a frame must
//! carry exactly the next counter: a replayed, dropped, reordered or altered frame fails to open
//! and the stream is dropped by the caller.
//!
//! Both ends derive their keys from a 32-byte session secret (the user↔peer session key of
//! [`super::user_auth`]) with HKDF-SHA256 and a label per direction, so one secret never seals
//! two streams the same way.
//!
//! ```text
//! frame = len: u32 big-endian | body (len bytes)
//! sealed body = ciphertext | tag (16)
//! ```

use alloc::vec::Vec;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Tag};
use hkdf::Hkdf;
use sha2::Sha256;

/// Bytes a sealed frame adds to its plaintext (the tag; the length prefix is not counted).
pub const STREAM_TAG_LEN: usize = 16;
/// Bytes of a frame's length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// Which end of a stream this is (each direction has its own key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamRole {
    /// The end that opened the connection (the Application Agent, or a connecting node).
    Initiator,
    Responder,
}

/// Why a frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamError {
    /// A length prefix above the reader's bound.
    TooLong,
    /// The frame did not open: tampered, replayed, reordered or from another session.
    Unauthentic,
    /// 2^64 frames in one direction (never in practice).
    Exhausted,
}

impl core::fmt::Display for StreamError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StreamError::TooLong => write!(f, "frame longer than allowed"),
            StreamError::Unauthentic => write!(f, "frame failed authentication"),
            StreamError::Exhausted => write!(f, "frame counter exhausted"),
        }
    }
}

impl core::error::Error for StreamError {}

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// One end's sealing state: a key and counter for each direction.
pub struct StreamSealer {
    send: ChaCha20Poly1305,
    recv: ChaCha20Poly1305,
    send_ctr: u64,
    recv_ctr: u64,
}

impl core::fmt::Debug for StreamSealer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "StreamSealer {{ sent: {}, received: {} }}",
            self.send_ctr, self.recv_ctr
        )
    }
}

impl StreamSealer {
    /// Keys for `role` from the session `secret`; `context` binds the stream to its use
    /// (e.g. `b"unipeer client stream"`).
    pub fn new(secret: &[u8; 32], context: &[u8], role: StreamRole) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(context), secret);
        let mut i2r = [0u8; 32];
        let mut r2i = [0u8; 32];
        hk.expand(b"initiator to responder", &mut i2r)
            .expect("32 bytes is a valid HKDF length");
        hk.expand(b"responder to initiator", &mut r2i)
            .expect("32 bytes is a valid HKDF length");
        let (send, recv) = match role {
            StreamRole::Initiator => (i2r, r2i),
            StreamRole::Responder => (r2i, i2r),
        };
        StreamSealer {
            send: ChaCha20Poly1305::new(&send.into()),
            recv: ChaCha20Poly1305::new(&recv.into()),
            send_ctr: 0,
            recv_ctr: 0,
        }
    }

    /// Seals `plaintext` as the next frame's body.
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, StreamError> {
        let ctr = self.send_ctr;
        self.send_ctr = ctr.checked_add(1).ok_or(StreamError::Exhausted)?;
        let mut out = Vec::with_capacity(plaintext.len() + STREAM_TAG_LEN);
        out.extend_from_slice(plaintext);
        let tag = self
            .send
            .encrypt_in_place_detached(&nonce(ctr).into(), b"", &mut out)
            .map_err(|_| StreamError::Exhausted)?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Opens the next frame's body in place; answers the plaintext's length.
    pub fn open(&mut self, body: &mut [u8]) -> Result<usize, StreamError> {
        if body.len() < STREAM_TAG_LEN {
            return Err(StreamError::Unauthentic);
        }
        let split = body.len() - STREAM_TAG_LEN;
        let (data, tag) = body.split_at_mut(split);
        let tag = Tag::clone_from_slice(tag);
        self.recv
            .decrypt_in_place_detached(&nonce(self.recv_ctr).into(), b"", data, &tag)
            .map_err(|_| StreamError::Unauthentic)?;
        self.recv_ctr = self.recv_ctr.checked_add(1).ok_or(StreamError::Exhausted)?;
        Ok(split)
    }
}

/// Prefixes `body` with its length.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Cuts a byte stream into frames, holding at most one partial frame (bounded by `max`).
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    max: usize,
}

impl FrameReader {
    /// A reader refusing frames whose body is longer than `max`.
    pub fn new(max: usize) -> Self {
        FrameReader {
            buf: Vec::new(),
            max,
        }
    }

    /// Bytes held (a partial frame).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes the reader can take before it holds a whole frame (at least 1),
    /// so a caller never reads past the current frame into a buffer it cannot bound.
    pub fn wants(&self) -> usize {
        if self.buf.len() < FRAME_HEADER_LEN {
            return FRAME_HEADER_LEN - self.buf.len();
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        (FRAME_HEADER_LEN + len as usize)
            .saturating_sub(self.buf.len())
            .max(1)
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame's body, if one is held. `Err(TooLong)` poisons the stream: the
    /// caller drops the connection.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, StreamError> {
        if self.buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(StreamError::TooLong);
        }
        if self.buf.len() < FRAME_HEADER_LEN + len {
            return Ok(None);
        }
        let body = self.buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len].to_vec();
        self.buf.drain(..FRAME_HEADER_LEN + len);
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (StreamSealer, StreamSealer) {
        let secret = [7u8; 32];
        (
            StreamSealer::new(&secret, b"test", StreamRole::Initiator),
            StreamSealer::new(&secret, b"test", StreamRole::Responder),
        )
    }

    #[test]
    fn frames_round_trip_both_ways() {
        let (mut a, mut b) = pair();
        for i in 0..5u8 {
            let mut f = a.seal(&[i; 10]).unwrap();
            let n = b.open(&mut f).unwrap();
            assert_eq!(&f[..n], &[i; 10]);
            let mut g = b.seal(&[i + 100; 3]).unwrap();
            let n = a.open(&mut g).unwrap();
            assert_eq!(&g[..n], &[i + 100; 3]);
        }
    }

    #[test]
    fn replayed_reordered_tampered_and_foreign_frames_fail() {
        let (mut a, mut b) = pair();
        let f0 = a.seal(b"zero").unwrap();
        let f1 = a.seal(b"one").unwrap();
        // Reordered: frame 1 first.
        assert_eq!(b.open(&mut f1.clone()), Err(StreamError::Unauthentic));
        assert_eq!(b.open(&mut f0.clone()), Ok(4));
        // Replayed.
        assert_eq!(b.open(&mut f0.clone()), Err(StreamError::Unauthentic));
        // Tampered.
        let mut t = f1.clone();
        t[0] ^= 1;
        assert_eq!(b.open(&mut t), Err(StreamError::Unauthentic));
        assert_eq!(b.open(&mut f1.clone()), Ok(3));
        // Another context's key, and a frame sealed in the wrong direction.
        let mut other = StreamSealer::new(&[7u8; 32], b"other", StreamRole::Initiator);
        let mut o = other.seal(b"x").unwrap();
        assert_eq!(b.open(&mut o), Err(StreamError::Unauthentic));
        let mut own = b.seal(b"y").unwrap();
        assert_eq!(b.open(&mut own), Err(StreamError::Unauthentic));
        assert_eq!(b.open(&mut [0u8; 3]), Err(StreamError::Unauthentic));
    }

    #[test]
    fn reader_cuts_frames_and_bounds_them() {
        let mut r = FrameReader::new(8);
        let mut bytes = frame(b"abc");
        bytes.extend(frame(b""));
        bytes.extend(frame(b"12345678"));
        for b in &bytes {
            assert!(r.wants() >= 1);
            r.push(core::slice::from_ref(b));
        }
        assert_eq!(r.next_frame().unwrap().unwrap(), b"abc");
        assert_eq!(r.next_frame().unwrap().unwrap(), b"");
        assert_eq!(r.next_frame().unwrap().unwrap(), b"12345678");
        assert_eq!(r.next_frame().unwrap(), None);
        r.push(&frame(b"123456789"));
        assert_eq!(r.next_frame(), Err(StreamError::TooLong));
        let mut half = FrameReader::new(8);
        half.push(&[0, 0]);
        assert_eq!(half.next_frame().unwrap(), None);
        assert_eq!(half.wants(), 2);
    }
}
