//! Seed inputs for the fuzz targets, one file per input under fuzz/corpus/TARGET/, named by
//! what they are. Deterministic: running it again rewrites the same bytes.

use std::fs;
use std::path::Path;
use unipeer_node::auth::delegation::{DelegationMessage, RefuseReason};
use unipeer_node::auth::stream::frame;
use unipeer_node::auth::user_auth::Transcript;
use unipeer_node::auth::{
    Allowance, IdentityKey, RevocationList, TrustMessage, UserAuthMessage, UserEntry, UserList,
};
use unipeer_node::id::{Id, Key, ServerTag};
use unipeer_node::jobs::client::{ClientReply, ClientRequest, RecordAnswer, SubmitRequest};
use unipeer_node::jobs::wire::{JOB_WIRE_VERSION, JobMessage, JobPacket};
use unipeer_node::launch::{LaunchConfig, LogLevel, NetConfig, PeerAddr};
use unipeer_node::wire::{
    Contact, Header, LeafKind, Message, Packet, Routed, RoutedBody, WIRE_VERSION, encode,
};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target);
    fs::create_dir_all(&dir).expect("corpus directory");
    fs::write(dir.join(name), bytes).expect("seed file");
}

fn contact(i: u8) -> Contact {
    Contact {
        id: Id(u128::from(i) << 100 | 7),
        addr: PeerAddr {
            ipv4: [10, 77, 0, i],
            port: 7000,
        },
        server: ServerTag(1),
    }
}

fn overlay() {
    let header = Header {
        version: WIRE_VERSION,
        sender: Id(0x1234),
        server: ServerTag(1),
        joined: true,
    };
    let messages = [
        ("ping", Message::Ping { echo: Some(99) }),
        (
            "leafset",
            Message::LeafSet {
                kind: LeafKind::Exchange,
                members: (1..5).map(contact).collect(),
            },
        ),
        (
            "routed-put",
            Message::Routed(Routed {
                nonce: 5,
                key: Key::for_name(b"greeting"),
                origin: contact(1),
                path: vec![Id(1), Id(2)],
                body: RoutedBody::Put {
                    value: b"hello".to_vec(),
                },
            }),
        ),
        (
            "row",
            Message::Row {
                row: 3,
                entries: vec![contact(9)],
            },
        ),
    ];
    for (name, message) in messages {
        let p = Packet { header, message };
        write("overlay_wire", name, &encode(&p, 1400).expect("encodes"));
    }
}

fn jobs() {
    let sender = contact(2);
    let messages = [
        (
            "capacity",
            JobMessage::Capacity {
                apps: vec!["wordcount".into(), "primes".into()],
                slots: 2,
                free: 1,
            },
        ),
        (
            "chunk-put",
            JobMessage::ChunkPut {
                id: Key::for_content(b"the quick brown fox"),
                data: b"the quick brown fox".to_vec(),
                replicate: true,
            },
        ),
        (
            "chunk-want",
            JobMessage::ChunkWant {
                id: Key::for_content(b"x"),
            },
        ),
    ];
    let mut stream = Vec::new();
    for (name, message) in messages {
        let p = JobPacket {
            version: JOB_WIRE_VERSION,
            sender,
            message,
        };
        let bytes = unipeer_node::jobs::wire::encode(&p).expect("encodes");
        stream.extend(frame(&bytes));
        write("job_frames", name, &bytes);
    }
    write("job_frames", "stream-of-three", &stream);
}

fn client() {
    let hello = UserAuthMessage::Hello {
        user: "demo".into(),
        nonce: [1; 32],
        ephemeral: [9; 32],
    };
    let requests = [
        ("hello", ClientRequest::Auth(hello.clone())),
        ("ping", ClientRequest::Ping),
        (
            "records",
            ClientRequest::Records {
                keys: vec![Key::for_name(b"a"), Key::for_name(b"b")],
            },
        ),
        (
            "submit",
            ClientRequest::Submit(SubmitRequest {
                name: "wc".into(),
                app: "wordcount".into(),
                nonce: 3,
                tasks: vec![(vec![1, 2], vec![Key::for_content(b"c")])],
                reducers: 2,
                exec_copies: 1,
                only: Some(vec![0]),
            }),
        ),
    ];
    let mut stream = Vec::new();
    for (name, r) in requests {
        stream.extend(frame(&r.encode()));
        write("client_frames", &format!("request-{name}"), &r.encode());
    }
    write("client_frames", "request-stream", &stream);
    let replies = [
        (
            "challenge",
            ClientReply::Auth(UserAuthMessage::Challenge {
                nonce: [2; 32],
                ephemeral: [3; 32],
                node: Id(5),
                proof: [4; 32],
            }),
        ),
        (
            "records",
            ClientReply::Records(vec![
                (Key::for_name(b"a"), RecordAnswer::Value(vec![1, 2, 3])),
                (Key::for_name(b"b"), RecordAnswer::Absent),
            ]),
        ),
        (
            "ready",
            ClientReply::Ready {
                node: Id(5),
                authenticated: true,
            },
        ),
    ];
    for (name, r) in replies {
        write("client_frames", &format!("reply-{name}"), &r.encode());
    }
    write("trust_datagram", "user-hello", &hello.encode());
}

fn trust() {
    let transcript = Transcript {
        user: "demo".into(),
        nonce_u: [1; 32],
        eph_u: [2; 32],
        nonce_p: [3; 32],
        eph_p: [4; 32],
        node: Id(6),
    };
    let messages = [
        (
            "delegation-prove",
            TrustMessage::Delegation(DelegationMessage::Prove { id: 1, transcript }),
        ),
        (
            "delegation-verify",
            TrustMessage::Delegation(DelegationMessage::Verify {
                id: 1,
                proof: [5; 32],
            }),
        ),
        (
            "delegation-refuse",
            TrustMessage::Delegation(DelegationMessage::Refuse {
                id: 1,
                reason: RefuseReason::RateLimited,
            }),
        ),
    ];
    for (name, m) in messages {
        write("trust_datagram", name, &m.encode());
    }
    let authority = IdentityKey::from_seed(&[0xa0; 32]);
    let users = UserList::issue(
        1,
        0,
        vec![UserEntry {
            name: "demo".into(),
            allowed: vec![Allowance::AnyPeer, Allowance::Server("s1".into())],
        }],
        &authority,
    );
    write("trust_datagram", "user-list", &users.encode());
    let revocations = RevocationList::issue(1, 0, vec![3, 4], &authority);
    write(
        "trust_datagram",
        "revocations",
        &TrustMessage::Revocations(revocations.encode()).encode(),
    );
}

fn launch() {
    let config = LaunchConfig {
        node_name: "n1".into(),
        server_id: "s1".into(),
        net: NetConfig {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            ipv4: [10, 77, 0, 11],
            prefix_len: 24,
            gateway: Some([10, 77, 0, 1]),
            overlay_port: 7000,
            diag_udp_port: 7001,
            diag_tcp_port: 7002,
            echo_port: 7007,
        },
        bootstrap: vec![PeerAddr {
            ipv4: [10, 77, 0, 12],
            port: 7000,
        }],
        rng_seed: [7; 32],
        launch_unix_ms: 1_790_000_000_000,
        tsc_khz_hint: 2_400_000,
        log_level: LogLevel::Info,
        node_key: vec![1; 32],
        certificate: vec![],
        extra: vec![("leaf_set".into(), vec![16]), ("replicas".into(), vec![3])],
    };
    write(
        "launch_config",
        "sample",
        &config.encode().expect("encodes"),
    );
}

fn manifests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for name in ["wordcount.toml", "primes.toml"] {
        let text = fs::read(root.join(name)).expect("example manifest");
        write("job_manifest", name, &text);
    }
}

fn http() {
    let heads: [(&str, &[u8]); 4] = [
        (
            "get-info",
            b"GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1:7700\r\n\r\n",
        ),
        (
            "post-deploy",
            b"POST /v1/deploy HTTP/1.1\r\nHost: localhost:7700\r\nContent-Type: application/json\r\nContent-Length: 37\r\n\r\n{\"image\":\"default\",\"count\":2}       ",
        ),
        (
            "connect",
            b"CONNECT n3:7003 HTTP/1.1\r\nHost: n3:7003\r\n\r\nrest",
        ),
        (
            "kill",
            b"POST /v1/nodes/n2/kill HTTP/1.0\r\nOrigin: http://localhost:7700\r\nContent-Length: 0\r\n\r\n",
        ),
    ];
    for (name, bytes) in heads {
        write("http_head", name, bytes);
    }
}

fn main() {
    overlay();
    jobs();
    client();
    trust();
    launch();
    manifests();
    http();
}
