#!/bin/sh
# Readiness check for headrace (or any vLLM-compatible server).
#   deploy/readiness_probe.sh [PORT] [HOST]      env: READINESS_TIMEOUT (seconds, default 5)
# Exit 0 only when /health answers 200 and /v1/models lists at least one model; exit 1 when the
# server is down, loading, draining, failed, lists no model, or does not answer in time.
# HEADRACE_API_KEY (or VLLM_API_KEY) is sent as a Bearer token to /v1/models when set.
PORT="${1:-8000}"
HOST="${2:-127.0.0.1}"
TIMEOUT="${READINESS_TIMEOUT:-5}"
BASE="http://${HOST}:${PORT}"
KEY="${HEADRACE_API_KEY:-${VLLM_API_KEY:-}}"

curl -fsS -o /dev/null --max-time "$TIMEOUT" "$BASE/health" || exit 1
if [ -n "$KEY" ]; then
    MODELS=$(curl -fsS --max-time "$TIMEOUT" -H "Authorization: Bearer $KEY" "$BASE/v1/models") || exit 1
else
    MODELS=$(curl -fsS --max-time "$TIMEOUT" "$BASE/v1/models") || exit 1
fi
# A non-empty list: "data" followed by "[" and then an object.
printf '%s' "$MODELS" | tr -d ' \n\t\r' | grep -q '"data":\[{' || exit 1
exit 0
