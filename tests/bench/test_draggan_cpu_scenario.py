"""The CPU scenario runs end to end on the embedded zoo model and reports parity with the reference mode."""

from __future__ import annotations

import pytest

from dragrt.bench import scenarios
from dragrt.zoo import registry


@pytest.mark.skipif(not registry.installed("faces-stylegan2"), reason="zoo:faces-stylegan2 is not installed")
def test_draggan_cpu_scenario_times_both_modes_on_the_zoo_model() -> None:
    s = scenarios.get("draggan-cpu")
    assert not s.needs_cuda
    records = s(1.0, True)
    assert [r["scenario"] for r in records] == ["draggan-cpu.128.h1", "draggan-cpu.128.h2"]
    for r in records:
        assert r["config"]["handles"] in (1, 2) and r["config"]["device"] == "cpu"
        assert r["ours"]["n"] >= 10 and r["reference"]["n"] >= 10
        assert r["extra"]["max_tracked_point_diff_px_5_steps"] == 0.0
        assert r["extra"]["converged_while_timed"] == {"fast": False, "reference": False}
        finished = r["extra"]["finished_step"]
        assert set(finished) == {"fast", "reference"}
        assert all(f["still_done"] and f["p50_ms"] > 0 for f in finished.values())
        assert r["speedup"] > 0
