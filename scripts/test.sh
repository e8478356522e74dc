#!/usr/bin/env bash
# The test command of the README: everything a fresh machine needs, then the
# whole suite (unit tests beside the code, integration tests in tests/ that
# start the real server on loopback, including the isolation suite and the
# fault-injection tests), and a one-line summary.
set -euo pipefail
cd "$(dirname "$0")/.."
. ./scripts/setup.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets --features fault-injection "$@" 2>&1 | tee "$log" || status=$?

# Sum cargo's per-binary result lines into one closing line.
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed/) p += $i
            if ($(i + 1) ~ /^failed/) f += $i
            if ($(i + 1) ~ /^ignored/) s += $i
        }
    }
    END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
