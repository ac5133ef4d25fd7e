#!/usr/bin/env bash
# The main job on the embedded default (QEMU microvm; KVM when hardware-backed, TCG otherwise):
# build the node image, start a front-end, and run a word count over 3 MB of text as a user's
# job: the Application Agent authenticates, has the front-end deploy 6 VMs, waits for their
# sealed overlay, stores the inputs and task records in the DHT, follows the tasks (map tasks,
# then reduce tasks spawned inside the overlay), and retrieves the outputs and checks them
# against a word count computed on the host. Meanwhile a VM is killed once a quarter of the
# tasks are done: the run fails unless that kill happened while the job was unfinished, and it
# says at which progress it landed.
# Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build -q --release -p unipeer
U=./target/release/unipeer
$U image build --release

FE=127.0.0.1:7700
# This script's own state: the front-end's pid and log, the fault's record.
RUN=run/main-job
mkdir -p "$RUN"
FE_PIDFILE=$RUN/frontend.pid
KILL_RECORD=$RUN/kill.txt

# A front-end left by an earlier run of this script (its pid is in our run directory, and the
# process must still be a unipeer front-end: a pid can be reused).
if [ -s "$FE_PIDFILE" ]; then
    old=$(cat "$FE_PIDFILE")
    if [ -r "/proc/$old/cmdline" ] && tr '\0' ' ' <"/proc/$old/cmdline" | grep -q "unipeer frontend"; then
        echo "== stopping the front-end of an earlier run (pid $old)"
        kill "$old"
        for _ in $(seq 50); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$FE_PIDFILE"
fi
$U down >/dev/null 2>&1 || true

$U frontend --listen "$FE" >"$RUN/frontend.log" 2>&1 &
FE_PID=$!
echo "$FE_PID" >"$FE_PIDFILE"
KILLER=""
cleanup() {
    [ -z "$KILLER" ] || kill "$KILLER" 2>/dev/null || true
    kill "$FE_PID" 2>/dev/null || true
    rm -f "$FE_PIDFILE"
    $U down >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The front-end listens within 30 s or the run fails; the listener must be its own process,
# not another one on the same port (then ours exits: address in use).
fe_up=""
for _ in $(seq 300); do
    if ! kill -0 "$FE_PID" 2>/dev/null; then
        echo "main-job: the front-end exited:" >&2
        tail -20 "$RUN/frontend.log" >&2
        exit 1
    fi
    if ss -Hltnp "( sport = :${FE#*:} )" 2>/dev/null | grep -q "pid=$FE_PID,"; then
        fe_up=1
        break
    fi
    sleep 0.1
done
if [ -z "$fe_up" ]; then
    echo "main-job: the front-end did not listen on $FE within 30 s:" >&2
    tail -20 "$RUN/frontend.log" >&2
    exit 1
fi

echo "== input: 3 MB of text in examples/data/"
$U job sample-text --words 250000 --seed 1 examples/data/part-1.txt
$U job sample-text --words 130000 --seed 2 examples/data/part-2.txt

echo "== the job: unipeer submit examples/wordcount.toml (a VM is killed when a quarter of the tasks are done)"
rm -f "$KILL_RECORD"
touch "$RUN/submitted"
(
    # The fault: once a quarter of the tasks are done and the job is not finished, kill n6
    # (kill -9 on its QEMU) and record the progress. Gives up, and says so, after 10 minutes or
    # when the job finishes first; a failed `vm kill` fails the run.
    deadline=$((SECONDS + 600))
    while [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.5
        J=$(find run/jobs -maxdepth 1 -name '*.json' -newer "$RUN/submitted" 2>/dev/null | head -1)
        [ -n "$J" ] || continue
        ID=$(basename "$J" .json)
        P=$($U job status "$ID" --frontend "http://$FE" --json 2>/dev/null) || continue
        done_n=$(grep -o '"done":[0-9]*' <<<"$P" | head -1 | cut -d: -f2)
        total=$(grep -o '"total":[0-9]*' <<<"$P" | head -1 | cut -d: -f2)
        [ -n "$done_n" ] && [ -n "$total" ] && [ "$total" -gt 0 ] || continue
        if [ "$done_n" -ge "$total" ]; then
            echo "   -- the job finished ($done_n/$total) before the kill" | tee "$KILL_RECORD"
            exit 3
        fi
        if [ "$done_n" -ge 1 ] && [ $((done_n * 4)) -ge "$total" ]; then
            echo "   -- killing n6 mid-job at $done_n/$total tasks done"
            if ! $U vm kill n6; then
                echo "   -- vm kill n6 failed" | tee "$KILL_RECORD"
                exit 2
            fi
            echo "killed n6 at $done_n/$total tasks done" >"$KILL_RECORD"
            exit 0
        fi
    done
    echo "   -- no kill: a quarter of the tasks were not done within 10 minutes" | tee "$KILL_RECORD"
    exit 4
) &
KILLER=$!
submit_rc=0
$U submit examples/wordcount.toml --frontend "http://$FE" --check || submit_rc=$?
if [ "$submit_rc" != 0 ]; then
    echo "main-job: the job failed (unipeer submit exited $submit_rc)" >&2
    exit 1
fi
# The job is done: the killer has either killed already or sees the job finished at its next
# look (within seconds).
kill_rc=0
wait "$KILLER" || kill_rc=$?
KILLER=""
if [ "$kill_rc" != 0 ]; then
    echo "main-job: the advertised fault did not happen: $(cat "$KILL_RECORD" 2>/dev/null || echo "the killer exited $kill_rc")" >&2
    exit 1
fi

echo "== the cluster after the job"
$U status

echo "== the fault: $(cat "$KILL_RECORD"); the job finished and matched the host's word count"
$U down
trap - EXIT
cleanup
echo "== done"
