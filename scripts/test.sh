#!/usr/bin/env bash
# Runs every test: style, unit, simulator and QEMU tests (boot tests included). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
# Root is needed up front: the cluster, overlay, trust and jobs tests put each cluster in a
# network namespace of its own with a tap uplink (ip netns, /dev/net/tun), and the switch
# tests drop to an unprivileged user with setpriv to show what one can and cannot reach.
if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh needs root: its cluster tests create network namespaces and tap" \
        "devices, and its security tests switch users. Run it as root (e.g. sudo $0)," \
        "or run single crates' tests without it (cargo test -p unipeer-node)." >&2
    exit 1
fi
scripts/setup.sh

echo "== style"
cargo fmt --all --check
cargo clippy -q --all-targets -- -D warnings
cargo clippy -q -p unipeer-kernel --target x86_64-unknown-none --release -- -D warnings
cargo clippy -q -p unipeer-kernel --target x86_64-unknown-none --release --features diag-test -- -D warnings

echo "== build the test images once"
cargo build -q -p unipeer
./target/debug/unipeer image build --release --diag-test --name test
./target/debug/unipeer image build --release --diag-test --name test-wc --apps wordcount,sha256

echo "== tests"
# QEMU tests serialise themselves; the image above is reused by every one of them.
UNIPEER_TEST_IMAGE_PREBUILT=1 cargo test 2>&1 | tee target/test.log

echo "== fuzz (every decoder facing the network or a file, a few seconds each over fuzz/corpus)"
scripts/fuzz.sh "${UNIPEER_FUZZ_SECONDS:-5}"

