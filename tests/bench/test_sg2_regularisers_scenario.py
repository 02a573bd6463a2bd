"""The StyleGAN2 regulariser scenario runs on the CPU (the 64 px preset) and both paths give the same gradients."""

from __future__ import annotations

from dragrt.bench import scenarios


def test_sg2_regularisers_scenario_times_both_paths_with_equal_gradients() -> None:
    s = scenarios.get("sg2-regularisers")
    assert not s.needs_cuda
    records = s(1.0, True)
    assert [r["scenario"] for r in records] == ["sg2-regularisers.64.path-length", "sg2-regularisers.64.r1"]
    for r in records:
        assert r["config"]["device"] == "cpu" and r["config"]["resolution"] == 64
        assert r["config"]["batch"] == (8 if r["scenario"].endswith("path-length") else 16)
        assert r["ours"]["n"] >= 5 and r["reference"]["n"] >= 5
        assert 0 <= r["extra"]["max_relative_grad_diff"] < 1e-4
        assert r["speedup"] > 0
