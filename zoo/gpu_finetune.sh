#!/usr/bin/env bash
# One device call that improves the shipped diffusion zoo in place: fine-tune zoo:faces-vae's decoder (encoder
# frozen, so the latent space stays), then zoo:faces-sd's UNet on it, each from the weights shipped in this
# checkout, and export both into zoo/weights (packed into OUT_DIR).
#
#   bash zoo/gpu_finetune.sh OUT_DIR [VAE_MINUTES] [END_S]
#
# VAE_MINUTES (default 3.5; 0 skips the VAE round) goes to the VAE; the UNet gets the rest up to END_S seconds
# after the start (default 540, inside the device's 600 s per command; its evaluation and export included). Run it again in a
# later call (after committing what came back) for another round: the model cards record the chain of runs.
# DRAGRT_ZOO_COMPILE=MODE passes --compile MODE to both trainers (torch.compile). Measured on an H100 (2026-12-05,
# bench/tools/zoo_step_variants.py): the VAE step 67.5 -> 42.3 ms after ~60 s of compiling, the UNet step (replayed)
# 74 -> 37 ms after ~145 s: within one call's minutes the compile costs about what it saves, so it stays off.
# DRAGRT_ZOO_GRAPHS=0 drops the UNet's --cuda-graphs (on by default: its step 166 -> 74 ms, ~20 s to capture; the
# call first runs the CUDA test that holds the graphed step to the eager one, ~1 min, and trains eagerly if it fails).
# DRAGRT_VAE_MSE=W gives the VAE fine-tune an MSE term of weight W (--mse-weight; PSNR's own loss).
# DRAGRT_VAE_LR=LR gives the VAE fine-tune another peak learning rate (--lr; default 3e-4 from shipped weights).
# DRAGRT_VAE_EYE_WEIGHT=W gives the VAE round's pixel losses a weight 1 + W on the eyes (--eye-weight: where glasses'
# frames are drawn, which cost its round trips 1.9 dB; `bench/tools/vae_psnr_by_attribute.py` measures it per class).
# DRAGRT_SD_FACE_WEIGHT=W gives the UNet round's loss a weight 1 + W on the lower face (--lower-face-weight: where
# faces-sd draws beards its captions do not ask for; `bench/tools/negative_extras.py` measures those).
# DRAGRT_ZOO_UNET=0 skips the UNet round (and its CUDA test): the VAE round alone, up to END_S. After an encoder
# round, `python -m dragrt.zoo.unet adopt-vae` gives the shipped faces-sd the new encoder (its samples unchanged).
# DRAGRT_VAE_PART=encoder fine-tunes the encoder instead (--encoder-only: the decoder, which faces-sd's samples go
# through, stays bit for bit; worth it while bench/tools/vae_decoder_bound.py finds the decoder far better on
# optimised latents than on the encoder's). Default: decoder.
# A VAE round whose held-out PSNR does not beat the shipped card's is dropped (no faces-vae.tar; the UNet round
# trains on the shipped VAE).
# OUT_DIR receives faces-vae.tar and faces-sd.tar (the exported folders: untar them in zoo/weights, then run
# `python -m dragrt.zoo.registry`, which stores zoo:faces-vae once, as faces-sd's vae/, when identical), logs.tgz
# (logs, metrics, the UNet's sample grid) and the runs' checkpoints (faces-sd's split into 15 MiB parts).
# Measured on one H200 (2026-12-04): two calls took faces-vae from 25.0 to 26.1 dB and faces-sd from 0.49 to
# 0.56 of sampled attributes (decoder 17 steps/s at batch 32, UNet 4.7 steps/s at batch 256). On an H100
# (2026-12-05), with --cuda-graphs: UNet 10.2-10.65 steps/s; faces-sd 0.556 -> 0.725 (this script, encoder
# round first) -> 0.783 (a UNet-only call of ~6 min); faces-vae's encoder 26.59 -> 26.69 dB. 2026-12-06, H100:
# DRAGRT_SD_FACE_WEIGHT=4 with VAE_MINUTES 0, END_S 565 took faces-sd 0.7834 -> 0.8025 (4 145 steps, 9.77 steps/s);
# a compiled decoder round (DRAGRT_VAE_PART=decoder DRAGRT_VAE_EYE_WEIGHT=2 DRAGRT_ZOO_COMPILE=default
# DRAGRT_ZOO_UNET=0 DRAGRT_VAE_MSE=1, VAE_MINUTES 9.4, END_S 585: 8.32 min) took faces-vae 27.633 -> 29.963 dB
# (11 544 steps, 25.95 steps/s).
set -uo pipefail
out=${1:?usage: bash zoo/gpu_finetune.sh OUT_DIR [VAE_MINUTES] [END_S]}
vae_minutes=${2:-3.5}
end_s=${3:-540}
case "${DRAGRT_VAE_PART:-decoder}" in
  decoder) part=--decoder-only ;;
  encoder) part=--encoder-only ;;
  *) echo "DRAGRT_VAE_PART=${DRAGRT_VAE_PART} is not allowed; use decoder or encoder" >&2; exit 2 ;;
esac
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
py=${PYTHON:-python3}
logs="$out/logs"
runs=${DRAGRT_ZOO_RUNS:-$root/.zoo_runs}
mkdir -p "$logs" "$runs"
# Installs the wheels in .whl/ and dragrt itself (see bench/gpu.sh), then reuses that install.
bash bench/gpu.sh "$logs/gpu" info >"$logs/info.log" 2>&1 || { cat "$logs/info.log"; exit 1; }
export DRAGRT_SKIP_INSTALL=1 PYTHONPATH="/tmp/dragrt-site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ -d "$root/.assets" ] && export DRAGRT_ASSETS=${DRAGRT_ASSETS:-$root/.assets}
compile=()
[ -n "${DRAGRT_ZOO_COMPILE:-}" ] && compile=(--compile "$DRAGRT_ZOO_COMPILE")
graphs=(--cuda-graphs)
[ "${DRAGRT_ZOO_GRAPHS:-1}" = 0 ] && graphs=()
unet=${DRAGRT_ZOO_UNET:-1}
case "$unet" in 0|1) ;; *) echo "DRAGRT_ZOO_UNET=$unet is not allowed; use 0 or 1" >&2; exit 2 ;; esac
if [ "$unet" = 1 ] && [ ${#graphs[@]} -gt 0 ]; then  # the graphed step must train as the eager one (same draws): checked here first
  timeout 240 $py -m pytest -q -p no:cacheprovider -m cuda --require-cuda tests/zoo/test_unet.py -k cuda_graphs \
    >"$logs/graphs-test.log" 2>&1 \
    || { echo "the CUDA-graph test failed (logs/graphs-test.log): faces-sd trains without --cuda-graphs"; graphs=(); }
  echo "CUDA-graph test done at $(el) s"
fi
sd_opts=()
[ -n "${DRAGRT_SD_FACE_WEIGHT:-}" ] && sd_opts=(--lower-face-weight "$DRAGRT_SD_FACE_WEIGHT")
vae_opts=()
[ -n "${DRAGRT_VAE_MSE:-}" ] && vae_opts=(--mse-weight "$DRAGRT_VAE_MSE")
[ -n "${DRAGRT_VAE_LR:-}" ] && vae_opts+=(--lr "$DRAGRT_VAE_LR")
[ -n "${DRAGRT_VAE_EYE_WEIGHT:-}" ] && vae_opts+=(--eye-weight "$DRAGRT_VAE_EYE_WEIGHT")
stamp=$(date +%Y%m%dT%H%M%S)
vae_run="$runs/faces-vae-$stamp" sd_run="$runs/faces-sd-$stamp"

if [ "$vae_minutes" = 0 ]; then  # the UNet alone (VAE_MINUTES 0)
  echo "faces-vae skipped (VAE_MINUTES 0)"
else
  # The round gets at most what its timeout leaves (60 s kept for packing, 15 s for the trainer's start): a longer
  # --minutes had the timeout kill it mid-schedule, before its checkpoint and export (2026-12-06: 9.4 min in 516 s).
  vae_window=$(( end_s - $(el) - 60 ))
  # one check prints the minutes the round gets; exit 2: VAE_MINUTES is not a positive number; 3: END_S leaves too
  # little; 4: the minutes were capped
  capped=$($py -c 'import math, sys
try:
    m = float(sys.argv[1]); assert m > 0 and math.isfinite(m)
except (ValueError, AssertionError):
    sys.exit(2)
c = round(min(m, (int(sys.argv[2]) - 15) / 60), 2)
print(c)
sys.exit(3 if c < 0.5 else 4 if c < m else 0)' "$vae_minutes" "$vae_window")
  case $? in
    0) ;;
    2) echo "VAE_MINUTES=$vae_minutes is not allowed; use a positive number of minutes (0 skips the VAE round)" >&2
       exit 2 ;;
    3) echo "END_S $end_s leaves the VAE round $capped min: too short to train, evaluate and export; use a larger END_S" >&2
       exit 2 ;;
    4) echo "VAE_MINUTES $vae_minutes capped to $capped: what END_S $end_s leaves the round" ;;
  esac
  echo "faces-vae ($part) from $(el) s"
  # A round that does not beat the shipped PSNR is not kept: the UNet round then trains on the shipped VAE.
  shipped_db=$(sed -n 's/^- psnr_db: //p' zoo/weights/faces-vae/MODEL_CARD.md | head -1)
  rm -rf "$runs/faces-vae.shipped" && cp -a zoo/weights/faces-vae "$runs/faces-vae.shipped"
  DRAGRT_ZOO_WORKERS=${DRAGRT_ZOO_WORKERS:-6} timeout "$vae_window" $py -m dragrt.zoo.train faces-vae \
    --run-dir "$vae_run" --minutes "$capped" --init zoo:faces-vae "$part" "${compile[@]}" "${vae_opts[@]}" --export \
    >"$logs/faces-vae.log" 2>&1
  echo "faces-vae exit $? at $(el) s"
  # one check: prints the round's PSNR, succeeds only when it beats the shipped one
  if new_db=$($py - "$vae_run/metrics.json" "$shipped_db" 2>/dev/null <<'EOF'
import json, sys
db = json.load(open(sys.argv[1]))["psnr_db"]
print(db)
sys.exit(0 if db > float(sys.argv[2]) else 1)
EOF
  ); then
    echo "faces-vae: $new_db dB against the shipped $shipped_db dB: kept"
    (cd zoo/weights && tar -cf "$out/faces-vae.tar" faces-vae)
  else
    echo "faces-vae: ${new_db:-no} dB against the shipped ${shipped_db:-unknown} dB: not kept (the shipped VAE restored)"
    rm -rf zoo/weights/faces-vae && cp -a "$runs/faces-vae.shipped" zoo/weights/faces-vae
  fi
fi

if [ "$unet" = 0 ]; then
  echo "faces-sd skipped (DRAGRT_ZOO_UNET=0)"
else
  minutes=$($py -c "print(round(($end_s - 15 - $(el)) / 60, 2))")
  echo "faces-sd (UNet) from $(el) s, $minutes min"
  DRAGRT_ZOO_WORKERS=${DRAGRT_ZOO_WORKERS:-6} timeout $(( end_s - $(el) )) $py -m dragrt.zoo.train faces-sd \
    --run-dir "$sd_run" --minutes "$minutes" --init zoo:faces-sd "${compile[@]}" "${graphs[@]}" "${sd_opts[@]}" \
    --export \
    >"$logs/faces-sd.log" 2>&1
  echo "faces-sd exit $? at $(el) s"
  (cd zoo/weights && tar -cf "$out/faces-sd.tar" faces-sd)
fi

cp "$vae_run/metrics.json" "$logs/faces-vae.metrics.json" 2>/dev/null
cp "$sd_run/metrics.json" "$logs/faces-sd.metrics.json" 2>/dev/null
cp "$sd_run/samples.png" "$sd_run/samples.json" "$logs/" 2>/dev/null
cp "$vae_run/checkpoint.pt" "$out/faces-vae--checkpoint.pt" 2>/dev/null
[ -f "$sd_run/checkpoint.pt" ] && (cd "$sd_run" && tar -cf - checkpoint.pt | split -b 15M - "$out/faces-sd--checkpoint.tar.part")
$py - "$logs" <<'EOF'
import json, sys
from pathlib import Path
logs = Path(sys.argv[1])
for name, keys in (("faces-vae", ("psnr_db", "ssim", "step", "steps_per_second", "compile_mode")),
                   ("faces-sd", ("attribute_accuracy", "classifier_on_vae_round_trips", "step", "steps_per_second",
                                "compile_mode"))):
    f = logs / f"{name}.metrics.json"
    m = json.loads(f.read_text()) if f.is_file() else {}
    print(name, {k: m.get(k) for k in keys})
EOF
(cd "$out" && tar -czf logs.tgz logs && rm -rf logs)
