#!/usr/bin/env bash
# Runs the README's five-minute tour without a terminal and checks every
# answer: demo mode, two alice connections and one bob connection with
# wsdump (PyPI websocket-client, installed into a private venv), a send, a
# forged user_id, and an API publish. Everything stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

venv=target/tour-venv
if [ ! -x "$venv/bin/wsdump" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet websocket-client
fi
wsdump="$venv/bin/wsdump"

cargo build --release --quiet
env -u SHARDGATE_JWT_SECRET -u SHARDGATE_API_KEY \
    ./target/release/shardgate serve --listen 127.0.0.1:0 >"$work/banner" 2>"$work/log" &
server_pid=$!

# The banner is complete once the publish line is printed.
for _ in $(seq 100); do
    grep -q "publish:" "$work/banner" && break
    sleep 0.1
done
base=$(sed -n 's|^shardgate listening on ||p' "$work/banner")
alice=$(sed -n 's|^  alice: ||p' "$work/banner")
bob=$(sed -n 's|^  bob:   ||p' "$work/banner")
key=$(sed -n 's|^  API key: ||p' "$work/banner")
[ -n "$base" ] && [ -n "$alice" ] && [ -n "$bob" ] && [ -n "$key" ] || {
    echo "tour: demo banner incomplete" >&2; cat "$work/banner" "$work/log" >&2; exit 1; }

api() {
    curl -s -H "Authorization: Bearer $key" -d "$2" "$base/api/v1/$1"
}
wait_connections() {
    for _ in $(seq 100); do
        api presence "{\"user\":\"$1\"}" | grep -q "\"connections\":$2" && return 0
        sleep 0.1
    done
    echo "tour: $1 never reached $2 connections" >&2
    exit 1
}

# Second alice tab and bob listen for a few seconds.
"$wsdump" -r --eof-wait 4 "$alice" </dev/null >"$work/alice2" 2>&1 &
listener_a=$!
"$wsdump" -r --eof-wait 4 "$bob" </dev/null >"$work/bob" 2>&1 &
listener_b=$!
wait_connections alice 1
wait_connections bob 1

# First alice tab sends, then tries to reach bob.
"$wsdump" -r --eof-wait 1 -t '{"type":"send","id":1,"data":{"text":"hi from tab one"}}' \
    "$alice" </dev/null >"$work/alice1" 2>&1 &
sender=$!
wait_connections alice 2
"$wsdump" -r --eof-wait 1 -t '{"type":"send","id":2,"data":"psst","user_id":"bob"}' \
    "$alice" </dev/null >"$work/forged" 2>&1
published=$(api publish '{"user":"alice","data":"hello"}')
wait "$sender" "$listener_a" "$listener_b" || true

check() {
    if ! grep -qF -- "$2" "$work/$1"; then
        echo "tour: expected $1 to contain: $2" >&2
        cat "$work/$1" >&2
        exit 1
    fi
}
check alice1 '"type":"welcome","user":"alice"'
check alice1 '"type":"ack","id":1'
check alice2 '"source":"client","data":{"text":"hi from tab one"}'
check alice2 '"source":"server","data":"hello"'
check forged '"code":"forbidden","id":2'
check bob '"type":"welcome","user":"bob"'
if grep -q '"type":"message"' "$work/bob"; then
    echo "tour: bob received a message meant for alice" >&2
    exit 1
fi
case "$published" in
    *'"delivered":'[12]*) ;;
    *) echo "tour: unexpected publish answer: $published" >&2; exit 1 ;;
esac
if grep -qF "${alice##*token=}" "$work/log"; then
    echo "tour: a token appeared in the server log" >&2
    exit 1
fi
echo "tour: all answers as documented"
