//! The `kv` service's RESP2 decoder and command layer (`unipeer_apps::kv`): bytes as a client
//! connection delivers them, in two pieces split where the first byte says. Nothing panics;
//! a fatal frame ends the connection; every request decoded is applied on a master (small
//! `maxmemory`, so `-OOM` paths run too) and its change records, replayed on a fresh slave,
//! give the master's state hash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unipeer_apps::kv::Kv;
use unipeer_node::replication::service::{
    Decoded, ReplicatedService, ReplicationView, RequestClass, ServiceLimits,
};

/// Requests applied per input at the most (a pipelined input holds many).
const MAX_REQUESTS: usize = 256;

fuzz_target!(|data: &[u8]| {
    let kv = Kv;
    let limits = ServiceLimits {
        max_memory_bytes: 64 * 1024,
    };
    let mut master = kv.new_state(limits);
    let mut slave = kv.new_state(limits);
    let view = ReplicationView::standalone();
    let mut decoder = kv.decoder();
    let split = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    let mut applied = 0;
    for piece in [&data[..split], &data[split..]] {
        decoder.feed(piece);
        while applied < MAX_REQUESTS {
            match decoder.next_request() {
                None => break,
                Some(Decoded::Fatal { reply, .. }) => {
                    assert!(reply.starts_with(b"-"), "a fatal frame is answered with an error");
                    applied = MAX_REQUESTS;
                }
                Some(Decoded::Request(r)) => {
                    applied += 1;
                    // Dispatched as a node does: by the class decided before applying.
                    match kv.classify(&r) {
                        RequestClass::Connection => {
                            let reply = kv.answer_connection(&r);
                            assert!(!reply.bytes.is_empty(), "every request gets a reply");
                        }
                        RequestClass::Rejected(reply) => {
                            assert!(reply.starts_with(b"-"), "a refusal is an error reply");
                        }
                        RequestClass::WaitReplicas { .. } => {}
                        RequestClass::Read | RequestClass::Write => {
                            let out = master.apply(1_000 + applied as u64, &r, &view);
                            assert!(!out.reply.is_empty(), "every request gets a reply");
                            if let Some(change) = out.change {
                                slave
                                    .apply_change(&change)
                                    .expect("the master's own change record applies on a slave");
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(
        master.state_hash(),
        slave.state_hash(),
        "the slave replaying the change records equals the master"
    );
});
