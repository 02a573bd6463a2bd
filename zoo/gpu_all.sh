#!/usr/bin/env bash
# Every zoo model plus the DragDiffusion GPU check and benchmark in one call of a 2-GPU machine (<= 600 s):
#
#   bash zoo/gpu_all.sh OUT_DIR [RUNS_DIR]
#
# GPU 0: faces-landmarks, faces-attributes, faces-clip (together), then faces-sd (needs the VAE, CLIP and
#        attribute model); faces-stylegan2 alongside, the whole call long.
# GPU 1: faces-vae, then the DragDiffusion CUDA test and benchmark (bench:dragdiffusion-step/-edit/-lora), so
#        that no training shares its GPU while it is timed.
# Each job is cut at DRAGRT_DEADLINE_S (default 555 s after the start) and packs what it exported at once, so a
# late job cannot lose the others' results. OUT_DIR receives: logs.tar (logs, metrics, benchmark JSON),
# small.tar (landmarks, attributes, clip, vae weights), faces-sd.tar, faces-stylegan2.tar and the StyleGAN2
# checkpoints (to carry into a resumed chunk: RUNS_DIR/faces-stylegan2/).
set -uo pipefail
out=${1:?usage: bash zoo/gpu_all.sh OUT_DIR [RUNS_DIR]}
runs=${2:-.zoo_runs}
t0=$(date +%s)
deadline=$(( t0 + ${DRAGRT_DEADLINE_S:-555} ))
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out/results" "$runs"
cd "$root" || exit 1
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DRAGRT_BENCH_RESULTS="$out/results"
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dragrt-site .whl/*.whl \
    || { echo "gpu_all.sh: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/dragrt-site${PYTHONPATH:+:$PYTHONPATH}"
fi
$py -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || exit 1
nvidia-smi --query-gpu=index,name,memory.total --format=csv >"$out/gpus.csv" 2>&1

left() { echo $(( deadline - $(date +%s) )); }
minutes_left() { $py -c "print(max(0.5, ($(left) - ${1:-20}) / 60))"; }

train() {  # NAME GPU MINUTES WORKERS
  local name=$1 gpu=$2 minutes=$3 workers=$4
  echo "start $(( $(date +%s) - t0 )) s, minutes $minutes" >"$out/$name.log"
  CUDA_VISIBLE_DEVICES=$gpu DRAGRT_ZOO_WORKERS=$workers timeout "$(left)" \
    $py -m dragrt.zoo.train "$name" --run-dir "$runs/$name" --minutes "$minutes" --export >>"$out/$name.log" 2>&1
  echo "gpu_all.sh: $name exit $? at $(( $(date +%s) - t0 )) s" >>"$out/$name.log"
  cp "$runs/$name/metrics.json" "$out/$name.metrics.json" 2>/dev/null
}

(  # GPU 0
  train faces-landmarks 0 2 5 & train faces-attributes 0 2 5 & train faces-clip 0 3.3 6 & wait
  (cd zoo/weights && tar -cf "$out/small-0.tar" faces-landmarks faces-attributes faces-clip)
  while [ ! -e "$out/vae.done" ] && [ "$(left)" -gt 60 ]; do sleep 2; done
  train faces-sd 0 "$(minutes_left 15)" 8
  (cd zoo/weights && tar -cf "$out/faces-sd.tar" faces-sd)
) &
g0=$!
(  # GPU 0, alongside
  train faces-stylegan2 0 "$(minutes_left 10)" 6
  (cd zoo/weights && tar -cf "$out/faces-stylegan2.tar" faces-stylegan2)
  for f in "$runs"/faces-stylegan2/checkpoint*.pt; do cp "$f" "$out/sg2--$(basename "$f")"; done
) &
g0b=$!
(  # GPU 1
  train faces-vae 1 3.5 6
  (cd zoo/weights && tar -cf "$out/small-1.tar" faces-vae)
  touch "$out/vae.done"
  export CUDA_VISIBLE_DEVICES=1
  timeout "$(left)" $py -m pytest -m cuda --require-cuda -q -p no:cacheprovider \
    tests/runtime/engines/test_dragdiffusion.py >"$out/cuda-test.log" 2>&1
  echo "exit $?" >>"$out/cuda-test.log"
  timeout "$(left)" $py -m dragrt bench run dragdiffusion-step dragdiffusion-edit dragdiffusion-lora --quick --budget-ms 300 \
    --out "$out/results" >"$out/bench.log" 2>&1
  echo "exit $?" >>"$out/bench.log"
) &
g1=$!
wait $g0 $g0b $g1

cd "$out" || exit 1
tar -cf small.tar small-0.tar small-1.tar 2>/dev/null && rm -f small-0.tar small-1.tar
tar -cf logs.tar ./*.log ./*.metrics.json gpus.csv results 2>/dev/null
rm -rf ./*.log ./*.metrics.json gpus.csv results vae.done
ls -la
