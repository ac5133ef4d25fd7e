//! The client port (`unipeer_node::jobs::client`): requests as a node reads them, replies as
//! the Application Agent reads them, and the user-authentication messages inside. Nothing
//! panics, and whatever decodes round-trips through its encoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unipeer_node::auth::UserAuthMessage;
use unipeer_node::auth::stream::FrameReader;
use unipeer_node::jobs::client::{ClientReply, ClientRequest, MAX_CLIENT_FRAME};

fn check(body: &[u8]) {
    if let Ok(r) = ClientRequest::decode(body) {
        assert_eq!(
            ClientRequest::decode(&r.encode()),
            Ok(r),
            "request round trip"
        );
    }
    if let Ok(r) = ClientReply::decode(body) {
        assert_eq!(ClientReply::decode(&r.encode()), Ok(r), "reply round trip");
    }
    if let Some(m) = UserAuthMessage::decode(body) {
        assert_eq!(
            UserAuthMessage::decode(&m.encode()),
            Some(m),
            "auth round trip"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut reader = FrameReader::new(MAX_CLIENT_FRAME);
    reader.push(data);
    while let Ok(Some(body)) = reader.next_frame() {
        check(&body);
    }
});
