#!/usr/bin/env bash
# Run every chatwall fuzz target for TIME_PER_TARGET seconds (default 60).
#
#   fuzz/run-all.sh [TIME_PER_TARGET] [extra libFuzzer options...]
#
# Each target reads its seeds from fuzz/seeds/<target>/ and keeps what it
# learns in fuzz/corpus/<target>/ (git-ignored); a crash is saved under
# fuzz/artifacts/<target>/. Works on stable Rust: RUSTC_BOOTSTRAP=1 lets it
# accept the -Z flags cargo-fuzz passes. Needs `cargo install cargo-fuzz`.
# Exits non-zero if any target failed, after running all of them.
set -uo pipefail

time_per_target="${1:-60}"
shift || true
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$fuzz_dir/.."
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2
    exit 2
fi
cargo fuzz build || exit 2

failed=()
total=0
for target in $(cargo fuzz list); do
    total=$((total + 1))
    echo "=== $target: ${time_per_target}s"
    mkdir -p "fuzz/corpus/$target"
    if ! cargo fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$time_per_target" -timeout=10 -rss_limit_mb=4096 \
        -print_final_stats=1 "$@"; then
        failed+=("$target")
    fi
done

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    echo "fuzz: $((total - ${#failed[@]})) passed, ${#failed[@]} failed"
    exit 1
fi
echo "all targets ran ${time_per_target}s without a failure"
echo "fuzz: ${total} passed, 0 failed"
