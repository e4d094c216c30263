#!/usr/bin/env bash
# A load run of the live service on this machine: a local nats-server, `afflio serve`
# (release build), and N events of the demo's traffic for one program posted as NDJSON
# batches by parallel curl clients. Prints sustained events/s and the service's
# capture-to-ledger latency quantiles. Usage: scripts/load-live.sh [EVENTS] [CLIENTS] [BATCH]
set -euo pipefail
events=${1:-200000}
clients=${2:-4}
batch=${3:-1000}
root="$(cd "$(dirname "$0")/.." && pwd)"
afflio="${AFFLIO_BIN:-$root/target/release/afflio}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
nats_port=$(free_port)
http_port=$(free_port)
nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$work/js" >/dev/null 2>&1 &
sleep 1
# The demo's generator, one program (acme), with an API key.
"$afflio" demo --events "$((events * 2))" --seed 5 --out "$work/demo" --quiet >/dev/null
grep '"program_id":"acme"' "$work/demo/input/events.jsonl" > "$work/acme.jsonl"
head -n "$events" "$work/acme.jsonl" > "$work/events.jsonl"
cp "$work/demo/input/rules.toml" "$work/rules.toml"
printf '\n[[api_keys]]\nprogram_id = "acme"\nkey = "load-test-key-0123456789"\n' >> "$work/rules.toml"
n=$(wc -l < "$work/events.jsonl")
split -l "$batch" -d -a 6 "$work/events.jsonl" "$work/chunk-"
"$afflio" serve --config "$work/rules.toml" --nats "nats://127.0.0.1:$nats_port" --http "127.0.0.1:$http_port" \
  --data "$work/data" --state "$work/state" ${SERVE_ARGS:-} >"$work/serve.log" 2>&1 &
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$http_port/readyz" >/dev/null && break; sleep 0.1; done
if ! curl -sf "http://127.0.0.1:$http_port/readyz" >/dev/null; then
  echo "afflio serve is not ready:" >&2
  cat "$work/serve.log" >&2
  exit 1
fi
start=$(date +%s.%N)
ls "$work"/chunk-* | xargs -P "$clients" -I{} curl -s -o /dev/null -w '%{http_code}\n' \
  -H 'Authorization: Bearer load-test-key-0123456789' -H 'Content-Type: application/x-ndjson' \
    --data-binary @{} "http://127.0.0.1:$http_port/v1/events" > "$work/codes.txt" || true
posted=$(date +%s.%N)
# Wait until the engine applied everything the broker stored.
stored=$(curl -s "http://127.0.0.1:$http_port/metrics" | awk '/^afflio_events_accepted_total/ {print $2}')
while :; do
  at=$(curl -s "http://127.0.0.1:$http_port/metrics" | awk '/^afflio_engine_stream_seq/ {print $2}')
  [ "${at:-0}" -ge "$stored" ] && break
  sleep 0.05
done
done_t=$(date +%s.%N)
sleep 1.5
metrics=$(curl -s "http://127.0.0.1:$http_port/metrics")
echo "events posted: $n in batches of $batch by $clients clients; HTTP codes: $(sort "$work/codes.txt" | uniq -c | tr '\n' ' ')"
echo "stored by the broker: $stored"
awk -v n="$n" -v s="$start" -v p="$posted" -v d="$done_t" 'BEGIN {
  printf "ingest (HTTP -> JetStream acked): %.0f events/s\n", n / (p - s);
  printf "end to end (HTTP -> engine applied): %.0f events/s over %.2fs\n", n / (d - s), d - s }'
echo "$metrics" | grep -E '^afflio_capture_to_ledger_seconds|^afflio_flush_latency_seconds' 
