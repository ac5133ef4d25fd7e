//! What the host tests share.

/// Whether this run is CI's (`CI=true`, as `.ci/run` sets it): there a missing prerequisite is
/// the machine's fault, and a test that cannot run fails instead of passing unseen.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// A test that cannot run here: prints why and returns (the caller returns at once), or fails
/// under CI, where scripts/setup.sh installs everything and tests run as root.
pub fn skip(reason: &str) {
    if under_ci() {
        panic!("cannot run under CI=true: {reason} (scripts/setup.sh installs it; run as root)");
    }
    eprintln!("skipped: {reason} (this fails under CI=true)");
}
