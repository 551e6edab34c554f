#!/usr/bin/env bash
# `kiln serve` from the outside: starts the server on a free loopback port with the test
# SmolLM2 GGUF, then runs, in a virtualenv this script makes (pinned versions from PyPI):
#   tests/serve/test_openai_client.py  the official `openai` client against every endpoint;
#   tests/serve/test_chat_page.py      the chat page at / in headless Chromium (Debian's
#                                      `chromium`, installed with apt-get when missing),
#                                      driven by Playwright.
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
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai, jsonschema, playwright" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "openai==3.63.0" "jsonschema==4.26.0" "playwright==1.65.3"
fi

PORT=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
LOG=$(mktemp)
"$KILN" serve --model "$MODEL" --name smol --port "$PORT" --api-key test-key \
  --max-batch 4 --max-queue 2 --ctx 1024 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { cat "$LOG" >&2; exit 1; }
  sleep 0.2
done
KILN_URL="http://127.0.0.1:$PORT/v1" KILN_KEY=test-key KILN_BIN="$KILN" KILN_MODEL_FILE="$MODEL" \
  "$VENV/bin/python" tests/serve/test_openai_client.py
KILN_PAGE="http://127.0.0.1:$PORT/" KILN_KEY=test-key "$VENV/bin/python" tests/serve/test_chat_page.py
kill -0 $SERVER || { echo "the server died:" >&2; cat "$LOG" >&2; exit 1; }
