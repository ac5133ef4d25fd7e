//! Job manifests (`unipeer::job::manifest`, TOML written by users): any text parses or is
//! refused with a reason, never a panic; a parsed manifest plans its tasks without one either
//! (inputs are files: planned against an empty directory, so only listed and range tasks).
#![no_main]

use libfuzzer_sys::fuzz_target;
use unipeer::job::manifest::JobManifest;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(m) = JobManifest::parse(&text) {
        let _ = m.plan(std::path::Path::new("/nonexistent-unipeer-fuzz"));
    }
});
