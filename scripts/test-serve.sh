#!/usr/bin/env bash
# `kiln serve` from the outside: starts the server on a free loopback port with the test
# SmolLM2 GGUF, then runs, in a virtualenv this script makes (pinned versions from PyPI):
#   tests/serve/test_openai_client.py  the official `openai` client against every endpoint
#                                      (and `anthropic`'s against /v1/messages);
#   tests/serve/test_chat_page.py      the chat page at / in headless Chromium (Debian's
#                                      `chromium`, installed with apt-get when missing),
#                                      driven by Playwright;
#   bench/serve/load_serve.py          128 streaming requests, 64 at once, all complete.
#
#   scripts/test-serve.sh [path/to/kiln]   (default: target/debug/kiln, built if missing)
#   KILN_SCREENSHOT=docs/serve-chat.png scripts/test-serve.sh   also saves the page
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${1:-target/debug/kiln}
[ -x "$KILN" ] || cargo build -p kiln-cli
MODEL=${KILN_ASSETS:-.cache/assets}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$MODEL" ] || { echo "missing $MODEL: run scripts/fetch-test-assets.sh" >&2; exit 1; }

if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "test-serve: apt-get install chromium" >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium >/tmp/kiln-chromium.log 2>&1 || {
    $SUDO apt-get update >>/tmp/kiln-chromium.log 2>&1
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium >>/tmp/kiln-chromium.log 2>&1
  } || { tail -20 /tmp/kiln-chromium.log >&2; echo "test-serve: installing chromium failed" >&2; exit 1; }
fi

VENV=.cache/venv-serve
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai, anthropic, jsonschema, playwright" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "openai==3.63.0" "anthropic==2.17.0" "jsonschema==4.26.0" "playwright==1.65.3"
fi

free_port() {
  "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
PIDS=()
LOGS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -f "${LOGS[@]}"' EXIT
# start_server PORT ARGS...: a kiln serve in the background, waited for until /health is 200.
start_server() {
  local port=$1; shift
  local log; log=$(mktemp); LOGS+=("$log")
  "$KILN" serve --port "$port" --api-key test-key "$@" >"$log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.2
  done
  echo "test-serve: the server on $port never became ready" >&2; cat "$log" >&2; exit 1
}
PORT=$(free_port)
start_server "$PORT" --model "$MODEL" --name smol --max-batch 4 --max-queue 2 --ctx 1024
# Tool calls need a template with a tool format: Qwen2.5-Coder-0.5B-Instruct's.
QWEN=${KILN_ASSETS:-.cache/assets}/qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
TOOL_PORT=$(free_port)
start_server "$TOOL_PORT" --model "$QWEN" --name qwen --max-batch 2 --ctx 2048
KILN_URL="http://127.0.0.1:$PORT/v1" KILN_TOOL_URL="http://127.0.0.1:$TOOL_PORT/v1" \
  KILN_KEY=test-key KILN_BIN="$KILN" KILN_MODEL_FILE="$MODEL" \
  "$VENV/bin/python" tests/serve/test_openai_client.py
KILN_PAGE="http://127.0.0.1:$PORT/" KILN_KEY=test-key "$VENV/bin/python" tests/serve/test_chat_page.py
# 64 streaming requests at once on 64 slots: every one completes (bench/serve/load_serve.py
# runs 1,000 and checks memory; here a short, bounded run).
"$VENV/bin/python" bench/serve/load_serve.py --kiln "$KILN" --model "$MODEL" \
  --requests 128 --concurrency 64 --max-tokens 8 --max-growth 0.5
for pid in "${PIDS[@]}"; do
  kill -0 "$pid" || { echo "test-serve: a server died:" >&2; cat "${LOGS[@]}" >&2; exit 1; }
done
