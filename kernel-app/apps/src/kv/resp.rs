//! RESP2, the Redis serialization protocol: an incremental request decoder (multibulk and
//! inline requests, pipelining, limits) and reply encoders.
//!
//! Redis closes the connection after every protocol error (it replies `-ERR Protocol error:
//! ...` first); so does this decoder. Over-limit frames are told apart from malformed ones so
//! the caller can count them separately.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use unipeer_node::replication::service::{Decoded, FatalFrame, Request, RequestDecoder};

/// Largest bulk argument (Redis's `proto-max-bulk-len` is 512 MiB; a unikernel's is smaller).
pub const MAX_BULK_BYTES: usize = 512 * 1024;
/// Most arguments in one request.
pub const MAX_ARGS: usize = 1024;
/// Longest inline request or header line without its newline (Redis's PROTO_INLINE_MAX_SIZE).
pub const MAX_INLINE_BYTES: usize = 64 * 1024;
/// Most bytes one request's arguments may add up to.
pub const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;

/// The incremental decoder of one client connection.
#[derive(Debug, Default)]
pub struct RespDecoder {
    buf: Vec<u8>,
    /// Start of the undecoded bytes in `buf`.
    pos: usize,
    failed: bool,
}

enum Step {
    NeedMore,
    /// Bytes consumed, and the request if the frame held one (`*0`, empty lines hold none).
    Frame(usize, Option<Request>),
    Fatal(String, FatalFrame),
}

impl RespDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    fn step(&self) -> Step {
        let b = &self.buf[self.pos..];
        if b.is_empty() {
            return Step::NeedMore;
        }
        if b[0] == b'*' {
            parse_multibulk(b)
        } else {
            parse_inline(b)
        }
    }
}

impl RequestDecoder for RespDecoder {
    fn feed(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    fn next_request(&mut self) -> Option<Decoded> {
        while !self.failed {
            match self.step() {
                Step::NeedMore => return None,
                Step::Frame(used, req) => {
                    self.pos += used;
                    if let Some(r) = req {
                        return Some(Decoded::Request(r));
                    }
                }
                Step::Fatal(msg, why) => {
                    self.failed = true;
                    self.buf = Vec::new();
                    self.pos = 0;
                    return Some(Decoded::Fatal {
                        reply: error(&format!("ERR Protocol error: {msg}")),
                        why,
                    });
                }
            }
        }
        None
    }

    fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Redis's `string2ll`: an optional `-`, then `0` alone or a digit 1-9 and digits; no spaces,
/// no `+`, no leading zeros, within i64.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: i128 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as i128;
        if v > i64::MAX as i128 + 1 {
            return None;
        }
    }
    let v = if neg { -v } else { v };
    i64::try_from(v).ok()
}

fn parse_multibulk(b: &[u8]) -> Step {
    let Some(nl) = find_crlf(b) else {
        if b.len() > MAX_INLINE_BYTES {
            return Step::Fatal("too big mbulk count string".into(), FatalFrame::OverLimit);
        }
        return Step::NeedMore;
    };
    let count = match parse_i64(&b[1..nl]) {
        Some(n) if n <= i32::MAX as i64 => n,
        _ => return Step::Fatal("invalid multibulk length".into(), FatalFrame::Malformed),
    };
    let mut at = nl + 2;
    if count <= 0 {
        return Step::Frame(at, None);
    }
    if count as usize > MAX_ARGS {
        return Step::Fatal("invalid multibulk length".into(), FatalFrame::OverLimit);
    }
    let mut args = Vec::with_capacity(count as usize);
    let mut total = 0usize;
    for _ in 0..count {
        let rest = &b[at..];
        let Some(nl) = find_crlf(rest) else {
            if rest.len() > MAX_INLINE_BYTES {
                return Step::Fatal("too big bulk count string".into(), FatalFrame::OverLimit);
            }
            if let Some(&c) = rest.first()
                && c != b'$'
            {
                return Step::Fatal(expected_dollar(c), FatalFrame::Malformed);
            }
            return Step::NeedMore;
        };
        if rest[0] != b'$' {
            return Step::Fatal(expected_dollar(rest[0]), FatalFrame::Malformed);
        }
        let len = match parse_i64(&rest[1..nl]) {
            Some(n) if n >= 0 => n as usize,
            _ => return Step::Fatal("invalid bulk length".into(), FatalFrame::Malformed),
        };
        if len > MAX_BULK_BYTES {
            return Step::Fatal("invalid bulk length".into(), FatalFrame::OverLimit);
        }
        total += len;
        if total > MAX_REQUEST_BYTES {
            return Step::Fatal("too big request".into(), FatalFrame::OverLimit);
        }
        let start = at + nl + 2;
        // Redis skips the two bytes after a bulk without looking at them; so do we.
        if b.len() < start + len + 2 {
            return Step::NeedMore;
        }
        args.push(b[start..start + len].to_vec());
        at = start + len + 2;
    }
    Step::Frame(at, Some(Request::new(args)))
}

/// Redis names the byte it found (as `%c`; a non-printable byte is shown as `?` here so the
/// reply stays one valid line).
fn expected_dollar(c: u8) -> String {
    let shown = if c.is_ascii_graphic() || c == b' ' {
        c as char
    } else {
        '?'
    };
    format!("expected '$', got '{shown}'")
}

fn parse_inline(b: &[u8]) -> Step {
    let Some(nl) = b.iter().position(|&c| c == b'\n') else {
        if b.len() > MAX_INLINE_BYTES {
            return Step::Fatal("too big inline request".into(), FatalFrame::OverLimit);
        }
        return Step::NeedMore;
    };
    if nl > MAX_INLINE_BYTES {
        return Step::Fatal("too big inline request".into(), FatalFrame::OverLimit);
    }
    let line = b[..nl].strip_suffix(b"\r").unwrap_or(&b[..nl]);
    match split_args(line) {
        None => Step::Fatal("unbalanced quotes in request".into(), FatalFrame::Malformed),
        Some(args) if args.is_empty() => Step::Frame(nl + 1, None),
        Some(args) if args.len() > MAX_ARGS => {
            Step::Fatal("invalid multibulk length".into(), FatalFrame::OverLimit)
        }
        Some(args) => Step::Frame(nl + 1, Some(Request::new(args))),
    }
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Splits an inline request into arguments the way `redis-cli` quotes them (Redis's
/// `sdssplitargs`): blanks separate, `"..."` takes `\n \r \t \b \a \\ \" \xHH`, `'...'` takes
/// `\'`; a closing quote must be followed by a blank. `None` on unbalanced quotes.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut i = 0;
    let blank = |c: u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    loop {
        while i < line.len() && blank(line[i]) {
            i += 1;
        }
        if i >= line.len() {
            return Some(args);
        }
        let mut cur = Vec::new();
        let mut dq = false;
        let mut sq = false;
        loop {
            if dq {
                let c = *line.get(i)?;
                if c == b'\\'
                    && i + 3 < line.len()
                    && line[i + 1] == b'x'
                    && let (Some(h), Some(l)) = (hex(line[i + 2]), hex(line[i + 3]))
                {
                    cur.push(h * 16 + l);
                    i += 4;
                    continue;
                }
                if c == b'\\' && i + 1 < line.len() {
                    i += 1;
                    cur.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    if i + 1 < line.len() && !blank(line[i + 1]) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
                i += 1;
            } else if sq {
                let c = *line.get(i)?;
                if c == b'\\' && i + 1 < line.len() && line[i + 1] == b'\'' {
                    i += 1;
                    cur.push(b'\'');
                } else if c == b'\'' {
                    if i + 1 < line.len() && !blank(line[i + 1]) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
                i += 1;
            } else {
                match line.get(i) {
                    None => break,
                    Some(&c) if blank(c) => break,
                    Some(b'"') => dq = true,
                    Some(b'\'') => sq = true,
                    Some(&c) => cur.push(c),
                }
                i += 1;
            }
        }
        args.push(cur);
    }
}

/// `+text\r\n`
pub fn simple(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 3);
    v.push(b'+');
    v.extend_from_slice(s.as_bytes());
    v.extend_from_slice(b"\r\n");
    v
}

/// `-text\r\n`, with CR and LF turned into spaces so the reply stays one line.
pub fn error(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 3);
    v.push(b'-');
    v.extend(
        s.bytes()
            .map(|c| if c == b'\r' || c == b'\n' { b' ' } else { c }),
    );
    v.extend_from_slice(b"\r\n");
    v
}

/// `:n\r\n`
pub fn integer(n: i64) -> Vec<u8> {
    format!(":{n}\r\n").into_bytes()
}

/// `$len\r\nbytes\r\n`
pub fn bulk(b: &[u8]) -> Vec<u8> {
    let mut v = format!("${}\r\n", b.len()).into_bytes();
    v.extend_from_slice(b);
    v.extend_from_slice(b"\r\n");
    v
}

/// The null bulk string, `$-1\r\n`.
pub fn null() -> Vec<u8> {
    b"$-1\r\n".to_vec()
}

/// An array header for `n` elements that follow.
pub fn array_header(n: usize) -> Vec<u8> {
    format!("*{n}\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn decode_all(d: &mut RespDecoder) -> Vec<Decoded> {
        core::iter::from_fn(|| d.next_request()).collect()
    }

    fn req(args: &[&[u8]]) -> Decoded {
        Decoded::Request(Request::new(args.iter().map(|a| a.to_vec()).collect()))
    }

    #[test]
    fn multibulk_pipelined_and_split_anywhere() {
        let stream =
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\nPING\r\n";
        for cut in 0..stream.len() {
            let mut d = RespDecoder::new();
            d.feed(&stream[..cut]);
            let mut got = decode_all(&mut d);
            d.feed(&stream[cut..]);
            got.extend(decode_all(&mut d));
            assert_eq!(
                got,
                vec![
                    req(&[b"GET", b"k"]),
                    req(&[b"SET", b"k", b""]),
                    req(&[b"PING"])
                ],
                "cut at {cut}"
            );
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn inline_quotes_and_empty_lines() {
        let mut d = RespDecoder::new();
        d.feed(b"\r\n  set \"a b\" 'c\\'d' \"\\x41\\n\"\nget x\r\n");
        assert_eq!(
            decode_all(&mut d),
            vec![req(&[b"set", b"a b", b"c'd", b"A\n"]), req(&[b"get", b"x"])]
        );
        let mut d = RespDecoder::new();
        d.feed(b"set \"abc\r\n");
        let got = decode_all(&mut d);
        assert!(matches!(
            &got[..],
            [Decoded::Fatal { why: FatalFrame::Malformed, reply }]
                if reply == b"-ERR Protocol error: unbalanced quotes in request\r\n"
        ));
        d.feed(b"PING\r\n");
        assert!(d.next_request().is_none(), "nothing after a fatal error");
    }

    #[test]
    fn limits_close_the_connection() {
        let cases: [(Vec<u8>, FatalFrame, &[u8]); 5] = [
            (
                format!("*1\r\n${}\r\n", MAX_BULK_BYTES + 1).into_bytes(),
                FatalFrame::OverLimit,
                b"-ERR Protocol error: invalid bulk length\r\n",
            ),
            (
                format!("*{}\r\n", MAX_ARGS + 1).into_bytes(),
                FatalFrame::OverLimit,
                b"-ERR Protocol error: invalid multibulk length\r\n",
            ),
            (
                vec![b'a'; MAX_INLINE_BYTES + 1],
                FatalFrame::OverLimit,
                b"-ERR Protocol error: too big inline request\r\n",
            ),
            (
                b"*1\r\n+OK\r\n".to_vec(),
                FatalFrame::Malformed,
                b"-ERR Protocol error: expected '$', got '+'\r\n",
            ),
            (
                b"*x\r\n".to_vec(),
                FatalFrame::Malformed,
                b"-ERR Protocol error: invalid multibulk length\r\n",
            ),
        ];
        for (bytes, why, reply) in cases {
            let mut d = RespDecoder::new();
            d.feed(&bytes);
            assert_eq!(
                d.next_request(),
                Some(Decoded::Fatal {
                    reply: reply.to_vec(),
                    why
                })
            );
            assert_eq!(d.buffered(), 0, "a failed decoder holds nothing");
        }
        // A bulk at the limit is fine.
        let mut d = RespDecoder::new();
        let mut f = format!("*1\r\n${MAX_BULK_BYTES}\r\n").into_bytes();
        f.extend(vec![b'v'; MAX_BULK_BYTES]);
        f.extend_from_slice(b"\r\n");
        d.feed(&f);
        assert!(
            matches!(d.next_request(), Some(Decoded::Request(r)) if r.args[0].len() == MAX_BULK_BYTES)
        );
    }

    #[test]
    fn zero_and_negative_counts_are_skipped() {
        let mut d = RespDecoder::new();
        d.feed(b"*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n");
        assert_eq!(decode_all(&mut d), vec![req(&[b"PING"])]);
    }

    #[test]
    fn integers_parse_like_redis() {
        for (s, v) in [
            (&b"0"[..], Some(0)),
            (b"-1", Some(-1)),
            (b"9223372036854775807", Some(i64::MAX)),
            (b"-9223372036854775808", Some(i64::MIN)),
            (b"9223372036854775808", None),
            (b"007", None),
            (b"-0", None),
            (b"+1", None),
            (b" 1", None),
            (b"1x", None),
            (b"", None),
            (b"-", None),
        ] {
            assert_eq!(parse_i64(s), v, "{:?}", core::str::from_utf8(s));
        }
    }
}
