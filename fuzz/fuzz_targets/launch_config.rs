//! The launch-config blob a VM reads at boot (`unipeer_node::launch`), and the trust material
//! inside it: nothing panics; a blob that decodes encodes back to a blob that decodes to the
//! same config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unipeer_node::auth::TrustConfig;
use unipeer_node::launch::LaunchConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = LaunchConfig::decode(data) {
        let blob = config.encode().expect("a decoded config encodes");
        assert_eq!(
            LaunchConfig::decode(&blob).as_ref(),
            Ok(&config),
            "round trip"
        );
        let _ = TrustConfig::from_launch(&config);
    }
});
