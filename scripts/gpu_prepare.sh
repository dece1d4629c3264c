#!/usr/bin/env bash
# Download, here (a host that reaches PyPI), the wheels a lent GPU machine lacks for `scripts/gpu_check.sh`.
#
#   bash scripts/gpu_prepare.sh                    # -> .gpu_wheels/ (git-ignored), then carry it to the GPU machine
#   bash scripts/gpu_prepare.sh --check-only       # only measure an existing folder against the carry limit
#
# The GPU image (python3 3.12, torch 2.11, jax 0.11.2 for CUDA 13, flax, optax, orbax-checkpoint, transformers
# 5.17, ...) has everything the check imports except grain and the two runtime needs of grain it lacks
# (array_record, portpicker). Those go to DEST/missing/ and are always installed there. The project's tested
# pins of flax, optax and orbax-checkpoint go to DEST/pins/: gpu_check.sh installs them only if the image's own
# versions fail to import the train step. Versions are read from constraints.txt; wheels are for CPython
# --python-version on x86-64 Linux, without dependencies (each one needed is named here).
#
# What travels to the machine (the working tree plus the carried folders) must stay under 64 MiB: the folder's
# size and the total are printed, and the script refuses (exit 2, one line) when either is over --limit-mib.
# Exit status: 0 ready, 1 a download failed, 2 refused (a bad flag, or over the limit).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST=".gpu_wheels"
PYVER="3.12"   # the lent GPU image's python3 (3.12.3 when last seen); change with --python-version
LIMIT_MIB=64
PINS=1
CHECK_ONLY=0
MISSING=(grain array_record portpicker)
PINNED=(flax optax orbax-checkpoint)

refuse() { echo "gpu_prepare: refused: $*" >&2; exit 2; }

usage() { sed -n '2,18s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; cat <<EOF
Options:
  --dest DIR             where the wheels go (default .gpu_wheels, relative to the repo root)
  --python-version X.Y   the GPU machine's Python (default $PYVER)
  --no-pins              leave out the pinned flax/optax/orbax-checkpoint fallback
  --limit-mib N          the carry limit in MiB (default $LIMIT_MIB)
  --check-only           download nothing; only check an existing DEST against the limit
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --dest) [ $# -ge 2 ] || refuse "--dest needs a folder"; DEST="$2"; shift 2 ;;
    --python-version) [ $# -ge 2 ] || refuse "--python-version needs X.Y"; PYVER="$2"; shift 2 ;;
    --limit-mib) [ $# -ge 2 ] || refuse "--limit-mib needs a number"; LIMIT_MIB="$2"; shift 2 ;;
    --no-pins) PINS=0; shift ;;
    --check-only) CHECK_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) refuse "unknown argument '$1' (see --help)" ;;
  esac
done
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || refuse "--python-version must look like 3.12, not '$PYVER'"
[[ "$LIMIT_MIB" =~ ^[0-9]+$ ]] || refuse "--limit-mib must be a whole number of MiB, not '$LIMIT_MIB'"

cd "$ROOT"
case "$DEST" in /*) ;; *) DEST="$ROOT/$DEST" ;; esac

pin_of() {  # NAME -> NAME==VERSION from constraints.txt (names compared the PEP 503 way: - _ . alike, any case)
  local want line
  want="$(echo "$1" | tr 'A-Z_.' 'a-z--')"
  while IFS= read -r line; do
    line="${line%%#*}"
    [[ "$line" == *==* ]] || continue
    if [ "$(echo "${line%%==*}" | tr 'A-Z_.' 'a-z--' | tr -d ' ')" = "$want" ]; then echo "$1==${line##*==}" | tr -d ' '; return 0; fi
  done < constraints.txt
  echo "gpu_prepare: $1 has no '==' pin in constraints.txt" >&2; return 1
}

download() {  # SUBDIR NAME... : exactly these wheels, no dependencies, for the GPU machine's Python
  local sub="$1"; shift
  local specs=() name tmp
  for name in "$@"; do specs+=("$(pin_of "$name")") || exit 1; done
  tmp="$(mktemp -d "$DEST/.tmp.XXXXXX")"
  echo "gpu_prepare: downloading ${specs[*]} (CPython $PYVER, x86-64 Linux) into $(basename "$DEST")/$sub/"
  if ! "${PYTHON:-python3}" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version "$PYVER" --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" "${specs[@]}" >"$tmp.log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$tmp.log" | tail -20 >&2
    rm -rf "$tmp" "$tmp.log"
    echo "gpu_prepare: the download failed (above); nothing in $(basename "$DEST")/$sub/ was changed" >&2
    exit 1
  fi
  rm -rf "$DEST/$sub" "$tmp.log"    # one version of each package: two would stop the install there
  mv "$tmp" "$DEST/$sub" && chmod 755 "$DEST/$sub"
}

if [ "$CHECK_ONLY" = 0 ]; then
  mkdir -p "$DEST"
  download missing "${MISSING[@]}"
  if [ "$PINS" = 1 ]; then download pins "${PINNED[@]}"; else rm -rf "$DEST/pins"; fi
  {
    echo "# wheels for scripts/gpu_check.sh, made by scripts/gpu_prepare.sh on $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "python_version=$PYVER"
    (cd "$DEST" && ls -1 */*.whl)
  } >"$DEST/MANIFEST.txt"
fi

SHOWN="${DEST#"$ROOT"/}"   # as the carry list names it, when inside the repo
[ -d "$DEST" ] || refuse "no folder $SHOWN (run without --check-only to download)"
bytes="$(du -sb "$DEST" | cut -f1)"
limit=$((LIMIT_MIB * 1048576))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
# What else travels: tracked files and untracked ones git does not ignore (if DEST is one of them, it is counted
# once, above).
tree=0
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  tree="$(git -C "$ROOT" ls-files -z -co --exclude-standard | (cd "$ROOT" && xargs -0 -r stat -c %s 2>/dev/null) \
          | awk '{ s += $1 } END { print s + 0 }')"
fi
if [ "$DEST" = "$ROOT/${DEST#"$ROOT"/}" ] && [ -n "$(git -C "$ROOT" ls-files -co --exclude-standard -- "$DEST" 2>/dev/null | head -1)" ]; then
  tree=$((tree - bytes)); [ "$tree" -ge 0 ] || tree=0
  echo "gpu_prepare: note: $SHOWN is not git-ignored; it travels with the tree anyway"
fi
total=$((bytes + tree))
[ "$bytes" -le "$limit" ] || refuse "$SHOWN is $(mib "$bytes"), over the ${LIMIT_MIB} MiB carry limit"
[ "$total" -le "$limit" ] || refuse "$SHOWN ($(mib "$bytes")) + working tree ($(mib "$tree")) = $(mib "$total"), over the ${LIMIT_MIB} MiB limit"
echo "gpu_prepare: $SHOWN: $(find "$DEST" -name '*.whl' | wc -l) wheels, $(mib "$bytes"); with the working tree ($(mib "$tree")) $(mib "$total") of ${LIMIT_MIB} MiB travels"
echo "gpu_prepare: next: the device tool's run with carry=[\"$SHOWN\"] and command 'bash scripts/gpu_check.sh'"
