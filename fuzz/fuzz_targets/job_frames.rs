//! The job channel (`unipeer_node::jobs::wire`) as a node reads it: the byte stream cut into
//! frames by a bounded `FrameReader`, each frame decoded as a `JobPacket`. Nothing panics, no
//! frame exceeds the bound, and a decoded packet round-trips through `encode`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unipeer_node::auth::stream::FrameReader;
use unipeer_node::jobs::wire::{MAX_JOB_MESSAGE, decode, encode};

fn check(body: &[u8]) {
    if let Ok(packet) = decode(body) {
        let bytes = encode(&packet).expect("a decoded packet encodes within the bound");
        assert_eq!(decode(&bytes).as_ref(), Ok(&packet), "round trip");
    }
}

fuzz_target!(|data: &[u8]| {
    // The whole input as one message body ...
    check(data);
    // ... and as a stream of frames, fed in pieces as a socket would.
    let mut reader = FrameReader::new(MAX_JOB_MESSAGE);
    for piece in data.chunks(7) {
        reader.push(piece);
        loop {
            match reader.next_frame() {
                Ok(Some(body)) => {
                    assert!(body.len() <= MAX_JOB_MESSAGE);
                    check(&body);
                }
                Ok(None) => break,
                // Too long: the node drops the connection.
                Err(_) => return,
            }
        }
    }
});
