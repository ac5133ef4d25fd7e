#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time over its corpus (fuzz/corpus/TARGET),
# with libFuzzer's coverage instrumentation on stable Rust (no sanitizer, no nightly): the
# flags `cargo fuzz build -s none` uses, plus overflow checks and debug assertions.
# Fails on the first target that panics or fails an assertion; the crashing input is kept in
# fuzz/artifacts/TARGET/. New inputs go to a scratch corpus, so the repository's stays small.
#   scripts/fuzz.sh [SECONDS_PER_TARGET (default 5)] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
shift || true
host="$(rustc -vV | sed -n 's/^host: //p')"
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target: the flags apply to the targets' code only, not to build scripts and proc macros.
RUSTFLAGS="$flags" cargo build -q --release --manifest-path fuzz/Cargo.toml --target "$host" --bins
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(ls fuzz/fuzz_targets | sed 's/\.rs$//')
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "fuzz/corpus/$t" "fuzz/artifacts/$t"
    echo "== fuzz $t (${secs}s, corpus fuzz/corpus/$t: $(ls "fuzz/corpus/$t" | wc -l) inputs)"
    # -seed fixed: a run replays exactly (the corpus is replayed first in any case).
    if ! "fuzz/target/$host/release/$t" "$scratch/$t" "fuzz/corpus/$t" \
        -max_total_time="$secs" -seed=1 -rss_limit_mb=1024 -timeout=10 \
        -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
        tail -40 "$scratch/$t.log"
        echo "fuzz: $t FAILED (input kept in fuzz/artifacts/$t/)"
        exit 1
    fi
    grep -E "^stat::number_of_executed_units|^Done" "$scratch/$t.log" | tr '\n' ' '
    echo
done
