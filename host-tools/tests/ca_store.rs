//! The authority store and `unipeer ca` commands, driven through the library API.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use unipeer::ca::{self, AuthorityStore, CaCommand, FrontEndIssuer, StoreArg};
use unipeer_node::auth::{CertChain, CertError, TrustConfig};
use unipeer_node::launch::{LaunchConfig, LogLevel, NetConfig};

fn temp_store(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("unipeer-ca-{}-{tag}", std::process::id()));
    let _ = fs::remove_dir_all(&p);
    p.join("ca")
}

fn arg(p: &Path) -> StoreArg {
    StoreArg {
        store: p.to_path_buf(),
    }
}

fn launch_config(m: &ca::LaunchMaterial) -> LaunchConfig {
    LaunchConfig {
        node_name: "node-1".into(),
        server_id: "server-a".into(),
        net: NetConfig {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            ipv4: [10, 0, 2, 15],
            prefix_len: 24,
            gateway: None,
            overlay_port: 7000,
            diag_udp_port: 7001,
            diag_tcp_port: 7002,
            echo_port: 7007,
        },
        bootstrap: vec![],
        rng_seed: [1; 32],
        launch_unix_ms: ca::store::now_unix_ms(),
        tsc_khz_hint: 0,
        log_level: LogLevel::Info,
        node_key: m.node_key.clone(),
        certificate: m.certificate.clone(),
        extra: m.extra.clone(),
    }
}

#[test]
fn full_lifecycle_through_commands() {
    let p = temp_store("life");
    let out = ca::execute(CaCommand::Init { store: arg(&p) }).unwrap();
    assert!(out.contains("authority public key"));
    let mode = |q: &PathBuf| fs::metadata(q).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&p), 0o700);
    assert_eq!(mode(&p.join("authority.key")), 0o600);
    // A second init on the same store is refused.
    assert!(ca::execute(CaCommand::Init { store: arg(&p) }).is_err());

    let add = |name: &str| {
        ca::execute(CaCommand::AddPeer {
            name: name.into(),
            server: "server-a".into(),
            valid_days: 30,
            store: arg(&p),
        })
    };
    add("node-1").unwrap();
    assert!(add("node-1").is_err(), "duplicate peer names are refused");
    assert!(add("../evil").is_err(), "path-like names are refused");
    let out = ca::execute(CaCommand::AddUser {
        name: "alice".into(),
        allow: vec!["server:server-a".into()],
        store: arg(&p),
    })
    .unwrap();
    assert!(out.contains("alice.psk"));
    assert_eq!(mode(&p.join("users/alice.psk")), 0o600);
    assert!(
        ca::execute(CaCommand::AddUser {
            name: "bob".into(),
            allow: vec!["peer:nothex".into()],
            store: arg(&p),
        })
        .is_err()
    );

    // The launch material decodes into a node's trust config, and the chain verifies.
    let s = AuthorityStore::open(&p).unwrap();
    let psk = s.user_psk("alice").unwrap();
    let m = ca::launch_material(&s, "node-1", &["alice"]).unwrap();
    let cfg = launch_config(&m);
    let blob = cfg.encode().unwrap();
    let tc = TrustConfig::from_launch(&LaunchConfig::decode(&blob).unwrap()).unwrap();
    assert_eq!(tc.authority, s.authority_public());
    assert_eq!(tc.credentials.len(), 1);
    assert_eq!(tc.credentials[0].psk, psk);
    let now = ca::store::now_unix_ms();
    let v = tc.chain.verify(&tc.authority, now, |_| false).unwrap();
    assert_eq!(v.node_id, tc.identity.node_id());
    assert!(
        tc.users
            .as_ref()
            .unwrap()
            .allows("alice", v.node_id, "server-a")
    );

    // Secrets never appear in any command's output.
    let list = |json| {
        ca::execute(CaCommand::List {
            json,
            store: arg(&p),
        })
        .unwrap()
    };
    let psk_hex = ca::store::hex(&psk);
    let key_hex = ca::store::hex(&m.node_key);
    let auth_seed = ca::store::hex(&fs::read(p.join("authority.key")).unwrap());
    for out in [list(false), list(true)] {
        assert!(out.contains("node-1") && out.contains("alice"));
        for secret in [&psk_hex, &key_hex, &auth_seed] {
            assert!(!out.contains(secret.as_str()), "secret printed");
        }
    }

    // Revoke by name: the signed list names the serial, and the chain now fails.
    let out = ca::execute(CaCommand::Revoke {
        target: "node-1".into(),
        store: arg(&p),
    })
    .unwrap();
    assert!(out.contains("revocation list version 2"), "{out}");
    let s = AuthorityStore::open(&p).unwrap();
    let rl = s.revocations().unwrap();
    assert_eq!(
        tc.chain.verify(&tc.authority, now, |x| rl.is_revoked(x)),
        Err(CertError::Revoked)
    );
    assert!(
        ca::execute(CaCommand::Revoke {
            target: "999".into(),
            store: arg(&p),
        })
        .is_err(),
        "unknown serials are refused"
    );
    assert!(list(false).contains("REVOKED"));
    fs::remove_dir_all(p.parent().unwrap()).unwrap();
}

#[test]
fn front_end_intermediate_certifies_vms_on_its_server() {
    let p = temp_store("inter");
    ca::execute(CaCommand::Init { store: arg(&p) }).unwrap();
    let mut s = AuthorityStore::open(&p).unwrap();
    let (rec, kp, cp) = s.add_intermediate("server-b", 86_400_000).unwrap();
    let mut issuer = FrontEndIssuer::load(&kp, &cp).unwrap();
    assert_eq!(issuer.server(), "server-b");
    let now = ca::store::now_unix_ms();
    let a = issuer.issue_peer(now, 3_600_000).unwrap();
    let b = issuer.issue_peer(now, 3_600_000).unwrap();
    assert_ne!(a.serial, b.serial);
    let chain = CertChain::decode(&a.chain).unwrap();
    let v = chain.verify(&s.authority_public(), now, |_| false).unwrap();
    assert_eq!(v.server, "server-b");
    assert_eq!(v.node_id, a.node_id);
    // A reloaded issuer continues the serial sequence.
    let mut again = FrontEndIssuer::load(&kp, &cp).unwrap();
    assert!(again.issue_peer(now, 1000).unwrap().serial > b.serial);
    // A VM certified by this front-end can be revoked alone, by serial.
    s.revoke(b.serial).unwrap();
    assert!(
        chain
            .verify(&s.authority_public(), now, |x| s
                .revocations()
                .unwrap()
                .is_revoked(x))
            .is_ok()
    );
    // Revoking the intermediate cuts off every VM it certified.
    s.revoke(rec.serial).unwrap();
    let rl = s.revocations().unwrap();
    assert_eq!(
        chain.verify(&s.authority_public(), now, |x| rl.is_revoked(x)),
        Err(CertError::Revoked)
    );
    fs::remove_dir_all(p.parent().unwrap()).unwrap();
}

#[test]
fn loose_corrupt_or_missing_stores_are_clear_errors() {
    let p = temp_store("bad");
    let e = AuthorityStore::open(&p).err().unwrap().to_string();
    assert!(e.contains("no authority store"), "{e}");

    ca::execute(CaCommand::Init { store: arg(&p) }).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    let e = AuthorityStore::open(&p).err().unwrap().to_string();
    assert!(e.contains("owner-only"), "{e}");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).unwrap();

    let key = p.join("authority.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let e = AuthorityStore::open(&p).err().unwrap().to_string();
    assert!(e.contains("owner-only"), "{e}");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    AuthorityStore::open(&p).unwrap();

    fs::write(p.join("state.json"), b"{ not json").unwrap();
    let e = format!("{:#}", AuthorityStore::open(&p).err().unwrap());
    assert!(e.contains("corrupt"), "{e}");

    fs::write(&key, [1u8; 5]).unwrap();
    let e = format!("{:#}", AuthorityStore::open(&p).err().unwrap());
    assert!(e.contains("corrupt"), "{e}");
    fs::remove_dir_all(p.parent().unwrap()).unwrap();
}
