#!/usr/bin/env bash
# The main job on the embedded default (QEMU microvm; KVM when hardware-backed, TCG otherwise):
# build the node image, start a front-end, and run a word count over 3 MB of text as a user's
# job: the Application Agent authenticates, has the front-end deploy 6 VMs, waits for their
# sealed overlay, stores the inputs and task records in the DHT, follows the tasks (map tasks,
# then reduce tasks spawned inside the overlay), kills a VM when a quarter of the tasks are final and still finishes,
# retrieves the outputs and checks them against a word count computed on the host.
# Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build -q --release -p unipeer
U=./target/release/unipeer
$U image build --release

FE=127.0.0.1:7700
$U down >/dev/null 2>&1 || true
pkill -f "unipeer frontend --listen $FE" 2>/dev/null || true
mkdir -p run
$U frontend --listen "$FE" >run/frontend.log 2>&1 &
FE_PID=$!
trap 'kill $FE_PID 2>/dev/null || true; $U down >/dev/null 2>&1 || true' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/${FE%:*}/${FE#*:}") 2>/dev/null && break
    sleep 0.1
done

echo "== input: 3 MB of text in examples/data/"
$U job sample-text --words 250000 --seed 1 examples/data/part-1.txt
$U job sample-text --words 130000 --seed 2 examples/data/part-2.txt

echo "== the job: unipeer submit examples/wordcount.toml (a VM is killed when a quarter of the tasks are final)"
(
    # The fault: once 5 of the 20 tasks are final, kill one of its VMs (kill -9 on its QEMU).
    for _ in $(seq 600); do
        sleep 0.5
        J=$(ls -t run/jobs/*.json 2>/dev/null | head -1) || true
        [ -n "$J" ] || continue
        ID=$(basename "$J" .json)
        if $U job status "$ID" --frontend "http://$FE" --json 2>/dev/null |
            grep -Eq '"done":([5-9]|[1-9][0-9])'; then
            echo "   -- killing n6 mid-job"
            $U vm kill n6
            break
        fi
    done
) &
KILLER=$!
$U submit examples/wordcount.toml --frontend "http://$FE" --check
wait $KILLER 2>/dev/null || true

echo "== the cluster after the job"
$U status

$U down
kill $FE_PID 2>/dev/null || true
trap - EXIT
echo "== done"
