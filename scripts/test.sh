#!/usr/bin/env bash
# The test command of the README: everything a fresh machine needs, then the
# whole suite (unit tests beside the code, integration tests in tests/ that
# start the real server on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
. ./scripts/setup.sh
cargo test --all-targets --features fault-injection "$@"
