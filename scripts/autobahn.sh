#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzing client (RFC 6455 conformance, cases 1
# to 10) against /ws/echo of a release build on loopback, then summarises
# the verdicts. Exit status 0 when every case ends OK, NON-STRICT or
# INFORMATIONAL (and its close OK or INFORMATIONAL), 1 otherwise, 2 when
# the suite cannot run here.
#
# The suite runs only on Python 2.7. The script looks for `python2.7` on
# PATH and in pyenv's versions, and installs the suite and what it needs
# into target/autobahn/ (nothing system-wide). The full reports land in
# target/autobahn/reports/ (open index.html there).
#
# Environment: AUTOBAHN_PORT (default 9301), AUTOBAHN_CASES (a JSON list,
# default ["1.*", ..., "10.*"]).
set -euo pipefail
cd "$(dirname "$0")/.."

work=target/autobahn
port=${AUTOBAHN_PORT:-9301}
cases=${AUTOBAHN_CASES:-'["1.*","2.*","3.*","4.*","5.*","6.*","7.*","8.*","9.*","10.*"]'}

# pyenv puts shims on PATH that fail when their version is not selected, so
# each candidate must run.
python2=
for candidate in "$(command -v python2.7 || true)" \
    "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python2.7; do
    if [[ -n $candidate ]] && "$candidate" -c 'import sys' >/dev/null 2>&1; then
        python2=$candidate
        break
    fi
done
if [[ -z $python2 ]]; then
    echo "autobahn: the Autobahn|Testsuite needs Python 2.7, and none was found" >&2
    echo "autobahn: (looked for python2.7 on PATH and under pyenv's versions)" >&2
    exit 2
fi

mkdir -p "$work"
venv=$work/venv
if [[ ! -x $venv/bin/wstest ]]; then
    echo "autobahn: installing the suite with $python2 into $venv"
    "$python2" -m pip install --quiet --disable-pip-version-check \
        --target "$work/virtualenv" 'virtualenv<20.22' 2>&1 | grep -v DEPRECATION || true
    PYTHONPATH=$work/virtualenv "$python2" -m virtualenv --quiet "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'autobahntestsuite==25.10.1' 2>&1 | grep -v DEPRECATION || true
    [[ -x $venv/bin/wstest ]] || { echo "autobahn: installing the suite failed" >&2; exit 2; }
fi

cargo build --release --quiet

# A secret and a token for this run only, readable by us alone.
umask 077
head -c 48 /dev/urandom | base64 -w0 >"$work/secret"
token=$(target/release/shardgate token --sub autobahn --ttl 2h --jwt-secret-file "$work/secret")

# The suite sends messages of up to 16 MiB, thousands of fragments, and as
# fast as it can: the limits it exceeds on purpose are raised.
log=$work/server.log
target/release/shardgate serve --listen "127.0.0.1:$port" --shards 1 \
    --jwt-secret-file "$work/secret" --enable-echo \
    --max-message-size 67108864 --max-fragments 1000000 --rate-limit 0 \
    --outbound-queue-bytes 67108864 --outbound-queue-messages 100000 \
    >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 100); do
    grep -q "shardgate listening" "$log" && break
    if ! kill -0 "$server" 2>/dev/null; then
        echo "autobahn: the server did not start:" >&2
        tail "$log" >&2
        exit 2
    fi
    sleep 0.1
done

rm -rf "$work/reports"
cat >"$work/fuzzingclient.json" <<EOF
{
  "outdir": "$PWD/$work/reports",
  "servers": [{"agent": "shardgate", "url": "ws://127.0.0.1:$port/ws/echo?token=$token"}],
  "cases": $cases,
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
EOF
echo "autobahn: running the fuzzing client against 127.0.0.1:$port/ws/echo"
(cd "$work" &&
    timeout 1800 venv/bin/wstest -m fuzzingclient -s fuzzingclient.json >wstest.log 2>&1) || {
    echo "autobahn: wstest failed; see $work/wstest.log" >&2
    exit 2
}

python3 - "$work/reports/index.json" <<'EOF'
import collections, json, sys

results = json.load(open(sys.argv[1]))["shardgate"]
passing = {"OK", "NON-STRICT", "INFORMATIONAL"}
closing = {"OK", "INFORMATIONAL"}
counts = collections.Counter(r["behavior"] for r in results.values())
failed = []
for case in sorted(results, key=lambda c: [int(p) for p in c.split(".")]):
    r = results[case]
    if r["behavior"] not in passing or r["behaviorClose"] not in closing:
        failed.append(case)
    if (r["behavior"], r["behaviorClose"]) != ("OK", "OK"):
        print(f"  {case}: {r['behavior']}, close {r['behaviorClose']}"
              f" (code {r['remoteCloseCode']})")
summary = ", ".join(f"{n} {b}" for b, n in sorted(counts.items()))
print(f"autobahn: {len(results)} cases: {summary}")
if failed:
    print(f"autobahn: not passing: {' '.join(failed)}")
    sys.exit(1)
EOF
