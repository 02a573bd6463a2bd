"""zoo/gpu_finetune.sh's decisions, with a stand-in python: which rounds run and which VAE is kept."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Stands in for python3: logs its arguments; "-c" / "-" run the real interpreter (the script's small checks);
# a faces-vae round writes a metrics.json with STUB_DB and overwrites the exported folder, as an export does.
STUB = """#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
if [ "$1" = "-c" ] || [ "$1" = "-" ]; then exec "$REAL_PY" "$@"; fi
if [ "$2" = "dragrt.zoo.train" ] && [ "$3" = "faces-vae" ]; then
  mkdir -p "$5" && echo "{\\"psnr_db\\": $STUB_DB}" > "$5/metrics.json"
  echo new > zoo/weights/faces-vae/exported
fi
exit 0
"""


@pytest.fixture
def tree(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    root = tmp_path / "repo"
    for rel in ("zoo/gpu_finetune.sh", "bench/gpu.sh"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, root / rel)
    vae = root / "zoo/weights/faces-vae"
    vae.mkdir(parents=True)
    (vae / "MODEL_CARD.md").write_text("# zoo:faces-vae\n\n- psnr_db: 26.692\n- psnr_db_min: 21.79\n")
    stub = tmp_path / "py"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return root, stub


def run(tree, db: float, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    root, stub = tree
    log = root.parent / "calls.log"
    log.unlink(missing_ok=True)
    out = root.parent / "out"
    shutil.rmtree(out, ignore_errors=True)
    full = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(log), "STUB_DB": str(db),
            "REAL_PY": shutil.which("python3") or "python3", "DRAGRT_ZOO_RUNS": str(root.parent / "runs"), **env}
    r = subprocess.run(["bash", str(root / "zoo/gpu_finetune.sh"), str(out), "7", "560"], capture_output=True,
                       text=True, env=full, timeout=120)
    return r, log.read_text().splitlines() if log.is_file() else []


def test_a_vae_round_below_the_shipped_psnr_is_dropped_and_the_shipped_vae_restored(tree):
    root, _ = tree
    r, calls = run(tree, 26.5, DRAGRT_ZOO_UNET="0", DRAGRT_VAE_PART="encoder", DRAGRT_VAE_EYE_WEIGHT="3")
    assert r.returncode == 0, r.stderr
    assert "26.5 dB against the shipped 26.692 dB: not kept" in r.stdout
    assert not (root / "zoo/weights/faces-vae/exported").exists()  # the export was undone
    assert (root / "zoo/weights/faces-vae/MODEL_CARD.md").is_file()
    assert not (root.parent / "out/faces-vae.tar").exists()
    assert any("faces-vae" in c and "--encoder-only" in c and "--eye-weight 3" in c for c in calls)
    # DRAGRT_ZOO_UNET=0: no UNet round and no CUDA-graph test
    assert not any("train faces-sd" in c or "-m pytest" in c for c in calls)


def test_a_vae_round_above_the_shipped_psnr_is_kept_and_the_unet_trains_on_it(tree):
    root, _ = tree
    r, calls = run(tree, 26.9, DRAGRT_VAE_LR="1e-3", DRAGRT_ZOO_GRAPHS="0", DRAGRT_SD_FACE_WEIGHT="4")
    assert r.returncode == 0, r.stderr
    assert "26.9 dB against the shipped 26.692 dB: kept" in r.stdout
    assert (root / "zoo/weights/faces-vae/exported").is_file()
    assert (root.parent / "out/faces-vae.tar").is_file()
    vae_call = next(c for c in calls if "train faces-vae" in c)
    assert "--decoder-only" in vae_call and "--lr 1e-3" in vae_call and "--eye-weight" not in vae_call
    assert any("train faces-sd" in c and "--init zoo:faces-sd" in c and "--lower-face-weight 4" in c for c in calls)
    assert not any("-m pytest" in c for c in calls)  # DRAGRT_ZOO_GRAPHS=0: no CUDA-graph test
    r, calls = run(tree, 26.9, DRAGRT_VAE_PART="encoder", DRAGRT_ZOO_GRAPHS="0")
    assert any("train faces-sd" in c and "--lower-face-weight" not in c for c in calls)  # SD's plain loss


def test_bad_switches_are_refused_with_their_allowed_values(tree):
    r, _ = run(tree, 26.9, DRAGRT_ZOO_UNET="yes")
    assert r.returncode == 2 and "DRAGRT_ZOO_UNET=yes is not allowed; use 0 or 1" in r.stderr
    r, _ = run(tree, 26.9, DRAGRT_VAE_PART="both")
    assert r.returncode == 2 and "use decoder or encoder" in r.stderr


def test_the_vae_minutes_are_capped_to_what_the_rounds_timeout_leaves(tree):
    """A VAE round asked for more minutes than END_S leaves is given fewer, so that the trainer stops, saves and
    exports before the timeout instead of being killed mid-schedule (2026-12-06: --minutes 9.4, a 516 s timeout)."""
    root, stub = tree

    def vae_minutes(minutes: str, end_s: str) -> tuple[subprocess.CompletedProcess, float | None]:
        log = root.parent / "calls.log"
        log.unlink(missing_ok=True)
        env = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(log), "STUB_DB": "26.9", "DRAGRT_ZOO_UNET": "0",
               "REAL_PY": shutil.which("python3") or "python3", "DRAGRT_ZOO_RUNS": str(root.parent / "runs")}
        r = subprocess.run(["bash", str(root / "zoo/gpu_finetune.sh"), str(root.parent / "out"), minutes, end_s],
                           capture_output=True, text=True, env=env, timeout=120)
        calls = log.read_text().splitlines() if log.is_file() else []
        call = next((c.split() for c in calls if "train faces-vae" in c), None)
        return r, float(call[call.index("--minutes") + 1]) if call else None

    r, got = vae_minutes("9.4", "596")
    assert r.returncode == 0, r.stderr
    assert got is not None and 8.0 <= got <= (596 - 60 - 15) / 60  # ~8.68 min, less the seconds already spent
    assert f"VAE_MINUTES 9.4 capped to {got}" in r.stdout
    r, got = vae_minutes("3.5", "596")
    assert got == 3.5 and "capped" not in r.stdout
    r, got = vae_minutes("soon", "596")
    assert r.returncode == 2 and got is None and "VAE_MINUTES=soon is not allowed; use a positive number" in r.stderr
    r, got = vae_minutes("-2", "596")
    assert r.returncode == 2 and got is None and "VAE_MINUTES=-2 is not allowed" in r.stderr
    r, got = vae_minutes("3.5", "90")
    assert r.returncode == 2 and got is None and "use a larger END_S" in r.stderr
