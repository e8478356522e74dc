#!/usr/bin/env bash
# Installs what shardgate needs beyond a Rust toolchain, and checks the
# process limits glommio needs. Safe to run more than once.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi

# glommio's executors refuse to start below 512 KiB of lockable memory.
memlock=$(ulimit -l)
if [ "$memlock" != "unlimited" ] && [ "$memlock" -lt 512 ]; then
    ulimit -l 512 2>/dev/null || {
        echo "setup: RLIMIT_MEMLOCK is ${memlock} KiB; shardgate needs 512 KiB." >&2
        echo "setup: raise it (ulimit -l 512 as root, or see tuning.md)." >&2
        exit 1
    }
fi
