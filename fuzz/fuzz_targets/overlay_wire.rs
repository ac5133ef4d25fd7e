//! The overlay's datagram decoder (`unipeer_node::wire`): any bytes decode or are refused
//! without a panic, and a decoded packet encodes again (within the datagram bound) to bytes
//! that decode to the same packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unipeer_node::wire::{MAX_DATAGRAM, decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = decode(data) {
        let bytes = encode(&packet, MAX_DATAGRAM).expect("a decoded packet encodes");
        assert_eq!(decode(&bytes).as_ref(), Ok(&packet), "round trip");
    }
});
