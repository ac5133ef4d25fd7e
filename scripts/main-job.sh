#!/usr/bin/env bash
# The main job on the embedded default (QEMU microvm; KVM when hardware-backed, TCG otherwise):
# build the node image, start a local cluster of 6 VMs on 2 "servers" (their certificates
# issued by each server's front-end under the trusted authority), watch them form one sealed
# overlay, store a record in the DHT, kill a VM and a replica still answers, partition and heal
# the network, and tear everything down. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build -q --release -p unipeer
U=./target/release/unipeer
$U image build --release

$U down >/dev/null 2>&1 || true
trap '$U down >/dev/null 2>&1 || true' EXIT

echo "== up: 6 nodes on 2 servers, 5 ms between servers"
$U up -n 6 --servers 2 --server-delay 5ms --leaf-set 8

echo "== waiting for every node to join the overlay"
for _ in $(seq 120); do
    if $U status --json | grep -o '"overlay_joined": *[a-z]*' | grep -q false; then
        sleep 0.5
    else
        break
    fi
done
$U status

echo "== lookups: the root of a key is the live node numerically closest to it"
$U lookup hello
$U lookup unipeer --from n6

echo "== the DHT: put on n2, get on n5 (k = 3 copies on the root's leaf set)"
$U ask n2 put greeting hello-from-unipeer
$U ask n5 get greeting

ROOT=$($U lookup greeting --json | sed -n 's/.*"root_addr": *"10\.77\.0\.1\([0-9]\):.*/n\1/p')
echo "== killing the record's root ($ROOT); a replica takes over"
$U vm kill "$ROOT"
READER=n1; [ "$ROOT" = n1 ] && READER=n2
for i in $(seq 60); do
    if $U ask "$READER" get greeting | grep -q "value=hello-from-unipeer"; then
        $U ask "$READER" get greeting
        echo "   (answered after $i attempt(s))"
        break
    fi
    sleep 1
done

echo "== restarting $ROOT: it rejoins the overlay with the same identity"
$U vm restart "$ROOT"

A=n1; [ "$ROOT" = n1 ] && A=n2
B=n6; [ "$ROOT" = n6 ] && B=n4
echo "== partition {n1,n2,n3} | {n4,n5,n6}: $A cannot reach $B; heal: it can"
$U net partition n1,n2,n3 n4,n5,n6
$U vm ping "$A" "$B" --count 3 || true
$U net heal
$U vm ping "$A" "$B" --count 3
$U status

$U down
trap - EXIT
echo "== done"
