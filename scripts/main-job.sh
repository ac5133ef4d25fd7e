#!/usr/bin/env bash
# The main job, end to end on the embedded default (QEMU microvm; KVM when hardware-backed,
# TCG otherwise): build the node image, boot a node, probe its diagnostic service over the
# network from the host, and shut it down. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build -q --release -p unipeer
UNIPEER=./target/release/unipeer
$UNIPEER image build --release

mkdir -p run
INFO=run/main-job.json
rm -f "$INFO"
$UNIPEER vm run --name main-0 --json >"$INFO" &
VM=$!
trap 'kill $VM 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    [ -s "$INFO" ] && break
    kill -0 $VM 2>/dev/null || { echo "main-job: the VM failed to start" >&2; exit 1; }
    sleep 0.1
done
[ -s "$INFO" ] || { echo "main-job: the VM did not get ready in 60 s" >&2; exit 1; }
UDP=$(sed -E 's/.*"diag_udp":([0-9]+).*/\1/' "$INFO")
TCP=$(sed -E 's/.*"diag_tcp":([0-9]+).*/\1/' "$INFO")
echo "== node ready: $(cat "$INFO")"
echo "== diagnostic report over UDP (127.0.0.1:$UDP -> guest 7001)"
$UNIPEER vm probe "127.0.0.1:$UDP"
echo "== shutting the node down over TCP (127.0.0.1:$TCP -> guest 7002)"
echo shutdown | nc -w 5 127.0.0.1 "$TCP" || true
wait $VM
trap - EXIT
echo "== done: the node exited cleanly"
