//! The front-end's HTTP layer (`unipeer::frontend::http`: hyper's parser, the front-end's gate
//! and access rule) on any bytes: it never panics, every connection ends, and no request
//! reaches a handler without the front-end's token (but a browser's `GET /login`).
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use unipeer::frontend::http::{self, BoxFuture, ResBody, Service};
use unipeer::frontend::{
    FrontendConfig, HttpError, RequestHead, Shared, access::AccessRule, limits::FrontendLimits,
    parse_connect_target,
};

struct Checked(Shared);

impl Service for Checked {
    fn gate(&self, head: &RequestHead) -> Result<(), HttpError> {
        self.0.gate(head)
    }

    fn handle(
        self: Arc<Self>,
        _req: hyper::Request<hyper::body::Incoming>,
        head: RequestHead,
    ) -> BoxFuture<hyper::Response<ResBody>> {
        // Without the token only a browser's sign-in passes (no session exists here).
        let signing_in = head.method == "GET" && head.path() == "/login";
        assert!(
            signing_in
                || head.header("authorization")
                    == Some(format!("Bearer {}", "k".repeat(64)).as_str())
        );
        let _ = (head.path(), head.query("probe"), parse_connect_target(&head.target));
        Box::pin(async { http::json_response(200, &serde_json::json!({})) })
    }

    fn deadlines(&self) -> (Duration, Duration) {
        (Duration::from_millis(50), Duration::from_millis(100))
    }
}

fuzz_target!(|data: &[u8]| {
    let service = Arc::new(Checked(Shared::new(
        AccessRule::new("k".repeat(64), 7700, &[]),
        FrontendConfig {
            listen: "127.0.0.1:7700".parse().unwrap(),
            server: "s1".into(),
            run_dir: "/nonexistent".into(),
            daemon_exe: "/nonexistent".into(),
            accel: unipeer::hostinfo::AccelChoice::Tcg,
            ca_store: None,
            replicas: None,
            token_dir: "/nonexistent".into(),
            allow_hosts: Vec::new(),
            limits: FrontendLimits::default(),
        },
    )));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(http::serve_connection(server, service));
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(60), async {
            let _ = client.read_to_end(&mut out).await;
            let _ = task.await;
        })
        .await;
        assert!(ended.is_ok(), "a connection did not end");
    });
});
