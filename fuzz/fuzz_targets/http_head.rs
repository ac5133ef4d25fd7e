//! The front-end's HTTP request reader (`unipeer::frontend`): the head parser on any bytes,
//! and the whole request reader over a byte stream, never panic, and bound what they accept.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unipeer::frontend::{parse_connect_target, parse_head, read_request};

fuzz_target!(|data: &[u8]| {
    if let Ok((method, target, headers)) = parse_head(data) {
        assert!(!method.is_empty() && !target.is_empty());
        assert!(headers.len() <= data.len());
        if method == "CONNECT" {
            let _ = parse_connect_target(&target);
        }
    }
    let mut stream = std::io::Cursor::new(data);
    if let Ok(req) = read_request(&mut stream) {
        assert!(req.body.len() + req.rest.len() <= data.len());
    }
});
