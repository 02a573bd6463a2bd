#!/usr/bin/env bash
# Run dragrt's GPU work on a bare GPU machine that has torch and triton but no network.
#
#   bash bench/gpu.sh OUT_DIR [STEP ...]
#
# Steps (default: info cuda-tests):
#   info          dragrt info (text and JSON)
#   cuda-tests    the tests marked cuda, with skips turned into failures (--require-cuda)
#   tests         the whole test suite on this machine (GPU tests included)
#   bench:NAME    one benchmark scenario (dragrt bench list names them); results JSON under OUT_DIR/results
#   pack-cache    with DRAGRT_COMPILE_CACHE: the compile cache as OUT_DIR/compile-cache.tgz.aa, .ab, ... (15 MiB
#                 pieces, at most 3: what a device call can return), to carry into the next call
#
# Wheels of packages the machine lacks (diffusers, importlib_metadata, xformers, ...) are installed from
# the folder .whl/ at the repository root, or from $DRAGRT_WHEELS, without touching the network
# (CONTRIBUTING.md says how to fetch them). Logs and results go to OUT_DIR. DRAGRT_SKIP_INSTALL=1 skips both
# installs (a second gpu.sh running beside a first one, e.g. one per GPU, reuses its install).
# DRAGRT_COMPILE_CACHE=DIR (e.g. .compile-cache, git-ignored and carried): torch.compile's Inductor and Triton
# caches live there, so a call that carries the previous call's cache skips most of its compiling; records say
# whether it was warm (env.compile_cache).
set -uo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR [STEP ...]}
shift
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(info cuda-tests)
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out/results"
cd "$root" || exit 1
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DRAGRT_BENCH_RESULTS="$out/results"
# ../shared does not travel to the device machine: a copy of its assets in the ignored .assets/ (carry it) serves.
[ -d "$root/.assets" ] && export DRAGRT_ASSETS=${DRAGRT_ASSETS:-$root/.assets}

site=/tmp/dragrt-site
if [ -n "${DRAGRT_SKIP_INSTALL:-}" ]; then  # a second gpu.sh on the same machine (e.g. one per GPU): reuse the install
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
wheels=${DRAGRT_WHEELS:-$root/.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
    || { echo "gpu.sh: installing the wheels in $wheels failed" >&2; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# dragrt itself: an editable install from this checkout, with no dependency resolution (offline).
$py -m pip install -q --no-index --no-deps --no-build-isolation -e "$root" >"$out/install.log" 2>&1 \
  || { echo "gpu.sh: pip install -e failed (see $out/install.log)" >&2; cat "$out/install.log" >&2; exit 1; }
fi

cache=${DRAGRT_COMPILE_CACHE:-}
if [ -n "$cache" ]; then
  case "$cache" in /*) ;; *) cache="$root/$cache" ;; esac
  mkdir -p "$cache"
  export TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton"
  if [ -n "$(find "$cache" -type f -print -quit)" ]; then state=warm; else state=cold; fi
  export DRAGRT_COMPILE_CACHE_STATE=${DRAGRT_COMPILE_CACHE_STATE:-$state}
  echo "gpu.sh: compile cache $cache ($DRAGRT_COMPILE_CACHE_STATE, $(du -sm "$cache" | cut -f1) MiB)"
fi

status=0
for step in "${steps[@]}"; do
  echo "=== gpu.sh: $step"
  case "$step" in
    info)
      $py -m dragrt info | tee "$out/info.txt" || status=1
      $py -m dragrt info --json >"$out/info.json" || status=1 ;;
    cuda-tests)
      $py -m pytest -m cuda --require-cuda -q -p no:cacheprovider 2>&1 | tee "$out/cuda-tests.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    tests)
      $py -m pytest --require-cuda -q -p no:cacheprovider 2>&1 | tee "$out/tests.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    bench:*)
      $py -m dragrt bench run "${step#bench:}" --out "$out/results" 2>&1 | tee -a "$out/bench.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    pack-cache)
      if [ -z "$cache" ]; then
        echo "gpu.sh: pack-cache needs DRAGRT_COMPILE_CACHE" >&2; status=2
      else
        rm -f "$out"/compile-cache.tgz.*
        tar -C "$(dirname "$cache")" -czf - "$(basename "$cache")" | split -b 15m - "$out/compile-cache.tgz."
        pieces=$(ls "$out"/compile-cache.tgz.* | wc -l)
        if [ "$pieces" -gt 3 ]; then
          echo "gpu.sh: the compile cache packs into $pieces pieces of 15 MiB (more than 3): not returned" >&2
          rm -f "$out"/compile-cache.tgz.*
        else
          echo "gpu.sh: compile cache packed: $(du -ch "$out"/compile-cache.tgz.* | tail -1 | cut -f1) in $pieces piece(s)"
        fi
      fi ;;
    *)
      echo "gpu.sh: unknown step '$step' (info, cuda-tests, tests, bench:NAME, pack-cache)" >&2; status=2 ;;
  esac
done
exit $status
