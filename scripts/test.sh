#!/usr/bin/env bash
# Runs every test: style, unit, simulator and QEMU tests (boot tests included). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

echo "== style"
cargo fmt --all --check
cargo clippy -q --all-targets -- -D warnings
cargo clippy -q -p unipeer-kernel --target x86_64-unknown-none --release -- -D warnings

echo "== build the test images once"
cargo build -q -p unipeer
./target/debug/unipeer image build --release --name test
./target/debug/unipeer image build --release --name test-wc --apps wordcount,sha256

echo "== tests"
# QEMU tests serialise themselves; the image above is reused by every one of them.
UNIPEER_TEST_IMAGE_PREBUILT=1 cargo test 2>&1 | tee target/test.log

echo "== fuzz (every decoder facing the network or a file, a few seconds each over fuzz/corpus)"
scripts/fuzz.sh "${UNIPEER_FUZZ_SECONDS:-5}"

