#!/usr/bin/env bash
# Fetches the instruction and preference demo sets of the PyPI sdist llamafactory==0.9.5
# (Apache-2.0 package; see docs/sft-lora.md for what is known of the data's origin), checks
# the archive's and each file's sha256, and copies them into DEST (default .cache/sft-data):
#
#   alpaca_en_demo.json   999 records {instruction, input, output}
#   dpo_en_demo.json      300 preference pairs (sharegpt conversations + chosen/rejected)
#   kto_en_demo.json      300 records {messages, label}
#   identity.json         91 records {instruction, input, output}
#   glaive_toolcall_en_demo.json  300 tool-calling conversations (sharegpt with
#                         function_call / observation turns and tools)
#
# Idempotent: a second run with everything present does nothing.
set -euo pipefail
DEST=${1:-.cache/sft-data}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
if [ -f "$DEST/.complete" ]; then
    echo "fetch-sft-data: $DEST is complete"
    exit 0
fi
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

check() { # FILE SHA256
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    if [ "$got" != "$2" ]; then
        echo "fetch-sft-data: sha256 mismatch for $1: expected $2, got $got" >&2
        exit 1
    fi
}

"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --no-cache-dir -d "$work" llamafactory==0.9.5
check "$work/llamafactory-0.9.5.tar.gz" 1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f
d=llamafactory-0.9.5/data
tar -xzf "$work/llamafactory-0.9.5.tar.gz" -C "$work" \
    $d/alpaca_en_demo.json $d/dpo_en_demo.json $d/kto_en_demo.json $d/identity.json \
    $d/glaive_toolcall_en_demo.json llamafactory-0.9.5/LICENSE
cp "$work"/$d/*.json "$DEST/"
cp "$work/llamafactory-0.9.5/LICENSE" "$DEST/llamafactory.LICENSE"
check "$DEST/alpaca_en_demo.json" bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318
check "$DEST/dpo_en_demo.json" b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3
check "$DEST/kto_en_demo.json" 9891687dea7c00e54af2e39534085c151ce3462d073574eeff2af927cc56fb74
check "$DEST/identity.json" fd029da7dd3df283ed034c82375d16d125a7b07cf1cb0316d03fb8743057d5f2
check "$DEST/glaive_toolcall_en_demo.json" 8b84773e44e71881f32490080350734cad3069dc227eafd771ccfb80732f6437
touch "$DEST/.complete"
echo "fetch-sft-data: $(ls "$DEST"/*.json | wc -l) files in $DEST"
