#!/usr/bin/env bash
# Train zoo models on a GPU machine, several at once (one per GPU or sharing one), then export them.
#
#   bash zoo/gpu_train.sh OUT_DIR RUNS_DIR JOB [JOB ...]
#
# JOB is NAME@GPU:MINUTES[:WORKERS], e.g. faces-vae@1:8 or faces-landmarks@0:4:6: train zoo model NAME on
# GPU index GPU for at most MINUTES of wall time with WORKERS data-loading processes (default: the trainer's
# own choice), resuming from RUNS_DIR/NAME when a checkpoint is there, then export its fp16 weights and model
# card into the package (zoo/weights/NAME). Jobs run in parallel; each logs to OUT_DIR/NAME.log. Measured on an
# H200 pair: several trainings on one GPU time-slice it (StyleGAN2 ran at ~1 step/s next to three others), so
# give each long job its own GPU. Metrics of
# every job are collected in metrics.json; see the end of this file for what lands in OUT_DIR.
# Wheels the machine lacks are installed from .whl/ (see bench/gpu.sh).
set -uo pipefail
out=${1:?usage: bash zoo/gpu_train.sh OUT_DIR RUNS_DIR NAME@GPU:MINUTES[:WORKERS] ...}
runs=${2:?usage: bash zoo/gpu_train.sh OUT_DIR RUNS_DIR NAME@GPU:MINUTES[:WORKERS] ...}
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" "$runs"
cd "$root" || exit 1
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# ../shared does not travel to the device machine: a copy of its assets in the ignored .assets/ (carry it) serves.
[ -d "$root/.assets" ] && export DRAGRT_ASSETS=${DRAGRT_ASSETS:-$root/.assets}

wheels=${DRAGRT_WHEELS:-$root/.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  site=/tmp/dragrt-site
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
    || { echo "gpu_train.sh: installing the wheels in $wheels failed" >&2; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
$py -m pip install -q --no-index --no-deps --no-build-isolation -e "$root" >"$out/install.log" 2>&1 \
  || { echo "gpu_train.sh: pip install -e failed (see $out/install.log)" >&2; cat "$out/install.log" >&2; exit 1; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv >"$out/gpus.csv" 2>&1

t0=$(date +%s)
deadline=$(( t0 + ${DRAGRT_DEADLINE_S:-570} ))  # every job is cut here, so that what it exported still comes back
pids=()
names=()
for job in "$@"; do
  name=${job%%@*}
  rest=${job#*@}
  gpu=${rest%%:*}
  rest=${rest#*:}
  minutes=${rest%%:*}
  workers=""
  [ "$rest" != "$minutes" ] && workers=${rest#*:}
  (
    export CUDA_VISIBLE_DEVICES=$gpu
    [ -n "$workers" ] && export DRAGRT_ZOO_WORKERS=$workers
    timeout $(( deadline - $(date +%s) )) \
      $py -m dragrt.zoo.train "$name" --run-dir "$runs/$name" --minutes "$minutes" --export
    rc=$?
    echo "gpu_train.sh: $name exit $rc after $(( $(date +%s) - t0 )) s"
    # pack at once: a later job running into the deadline must not take this one's results with it
    [ -d "zoo/weights/$name" ] && (cd zoo/weights && tar -cf "$out/$name.tar" "$name")
    exit $rc
  ) >"$out/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
done

status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "gpu_train.sh: ${names[$i]} failed (see $out/${names[$i]}.log)"; status=1; }
done

$py - "$runs" "$out/metrics.json" "${names[@]}" <<'EOF'
import json, sys
from pathlib import Path
runs, dest, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
metrics = {}
for n in names:
    f = runs / n / "metrics.json"
    metrics[n] = json.loads(f.read_text()) if f.is_file() else None
dest.write_text(json.dumps(metrics, indent=2, sort_keys=True))
print(json.dumps(metrics, indent=1, sort_keys=True)[:6000])
EOF
# What comes back (at most 8 files of at most 16 MiB): logs.tar (logs, metrics, GPU list), one NAME.tar of
# each exported weights folder, and the checkpoint files of the runs named in DRAGRT_ZOO_KEEP (space-separated),
# to carry into a resumed chunk.
for n in "${names[@]}"; do tail -n 25 "$out/$n.log"; done
for n in ${DRAGRT_ZOO_KEEP:-}; do
  for f in "$runs/$n"/checkpoint*.pt; do [ -f "$f" ] && cp "$f" "$out/$n--$(basename "$f")"; done
done
(cd "$out" && tar -cf logs.tar ./*.log metrics.json gpus.csv && rm -f ./*.log metrics.json gpus.csv)
exit $status
