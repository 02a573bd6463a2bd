"""The benchmark harness on a CPU: structure and arithmetic only, never timing values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dragrt.bench import cli, harness, report, scenarios
from dragrt.bench.harness import Timing

HAS_CUDA = torch.cuda.is_available() and torch.cuda.device_count() > 0
TIMING_KEYS = {"p50_ms", "p90_ms", "p95_ms", "p99_ms", "min_ms", "mean_ms", "n", "clock", "peak_mem_mb"}


def fake_env(gpu: str = "Fake GPU 80GB", time_utc: str = "2025-01-02T03:04:05+00:00") -> dict:
    return {
        "gpu": gpu,
        "driver": None,
        "cuda": None,
        "torch": torch.__version__,
        "triton": None,
        "diffusers": None,
        "xformers": None,
        "python": "3",
        "commit": "abc1234",
        "hostname": "test",
        "time_utc": time_utc,
    }


def rec(scenario: str = "s1", ours_ms: float = 2.0, ref_ms: float = 5.0, **env_kw) -> dict:
    ours = Timing([ours_ms] * 10)
    ref = Timing([ref_ms] * 10)
    return harness.make_record(scenario, {"k": 1}, ours, ref, env=fake_env(**env_kw))


@pytest.fixture(autouse=True)
def _no_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(harness.COMMIT_ENV, "testcommit")
    monkeypatch.setenv(harness.RESULTS_ENV, str(tmp_path / "default_results"))


def test_percentiles_of_known_times() -> None:
    t = Timing(times_ms=[float(i) for i in range(100, 0, -1)])
    assert t.n == 100
    assert t.p50_ms == pytest.approx(50.5)
    assert t.p90_ms == pytest.approx(90.1)
    assert t.p95_ms == pytest.approx(95.05)
    assert t.p99_ms == pytest.approx(99.01)
    assert t.min_ms == 1.0
    assert t.mean_ms == pytest.approx(50.5)
    assert harness.percentile([3.0], 99) == 3.0
    assert harness.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert math.isnan(Timing([]).p50_ms)


def test_timing_to_dict_rounds_to_four_significant_digits() -> None:
    d = Timing([1.234567, 1.234567], clock="cuda_events", peak_mem_mb=12.3456).to_dict()
    assert TIMING_KEYS <= set(d)
    assert d["p50_ms"] == 1.235
    assert d["n"] == 2 and d["clock"] == "cuda_events"
    assert d["peak_mem_mb"] == 12.35
    assert Timing([1.0]).to_dict()["peak_mem_mb"] is None


def test_make_record_keys_and_speedup() -> None:
    r = harness.make_record(
        "demo",
        {"shape": torch.Size([2, 3]), "dtype": torch.float16},
        Timing([3.0] * 5),
        {"p50_ms": 10.0, "p95_ms": 11.0, "peak_mem_mb": 7.0},
        compile_s=1.23456,
        extra={"gbs": 100.0},
        env=fake_env(),
    )
    for key in ("scenario", "env", "config", "ours", "reference", "speedup", "compile_s"):
        assert key in r
    assert r["scenario"] == "demo"
    for side in ("ours", "reference"):
        assert {"p50_ms", "p95_ms", "peak_mem_mb"} <= set(r[side])
    assert TIMING_KEYS <= set(r["ours"])
    assert r["speedup"] == 3.33
    assert r["compile_s"] == 1.235
    assert r["extra"] == {"gbs": 100.0}
    assert r["config"] == {"shape": [2, 3], "dtype": "torch.float16"}
    json.dumps(r, allow_nan=False)


def test_make_record_stages_and_default_env() -> None:
    flat = harness.make_record("x", {}, Timing([1.0]), Timing([2.0]), stages={"a": Timing([0.4]), "b": Timing([0.6])})
    assert set(flat["ours"]["stages"]) == {"a", "b"} and "stages" not in flat["reference"]
    assert flat["ours"]["stages"]["a"]["p50_ms"] == 0.4
    per_side = harness.make_record(
        "x",
        {},
        Timing([1.0]),
        Timing([2.0]),
        stages={"ours": {"a": Timing([1.0])}, "reference": {"a": Timing([2.0])}},
    )
    assert per_side["reference"]["stages"]["a"]["p50_ms"] == 2.0
    env = flat["env"]
    for key in (
        "gpu",
        "driver",
        "cuda",
        "torch",
        "triton",
        "diffusers",
        "xformers",
        "python",
        "commit",
        "hostname",
        "time_utc",
    ):
        assert key in env
    assert env["commit"] == "testcommit"
    assert harness.parse_time_utc(env["time_utc"]).year >= 2024
    assert flat["speedup"] == 2.0


def test_make_record_rejects_bad_timing() -> None:
    with pytest.raises(ValueError):
        harness.make_record("x", {}, {"p95_ms": 1.0}, Timing([1.0]), env=fake_env())
    zero = harness.make_record("x", {}, {"p50_ms": 0.0, "p95_ms": 0.0}, Timing([1.0]), env=fake_env())
    assert zero["speedup"] is None


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    r = rec("round/trip")
    p = harness.write_record(r, tmp_path)
    assert p.parent == tmp_path
    assert p.name == "round-trip__fake-gpu-80gb__20250102T030405.json"
    text = p.read_text()
    assert text.endswith("\n") and json.loads(text) == r
    assert list(json.loads(text)) == sorted(json.loads(text))
    p2 = harness.write_record(r, tmp_path)
    assert p2 != p and p2.exists()
    (tmp_path / "junk.json").write_text("not json")
    assert harness.load_records(tmp_path) == [r, r]


def test_results_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(harness.RESULTS_ENV, str(tmp_path / "env_dir"))
    p = harness.write_record(rec())
    assert p.parent == tmp_path / "env_dir"
    assert len(harness.load_records()) == 1
    assert harness.load_records(tmp_path / "missing") == []


def test_latest_by_scenario_picks_newest() -> None:
    old = rec("a", ours_ms=1.0, time_utc="2025-01-01T00:00:00+00:00")
    new = rec("a", ours_ms=2.0, time_utc="2025-03-01T00:00:00Z")
    other_gpu = rec("a", ours_ms=3.0, gpu="Other", time_utc="2024-01-01T00:00:00+00:00")
    b = rec("b", time_utc="2025-02-01T00:00:00+00:00")
    latest = harness.latest_by_scenario([new, old, other_gpu, b])
    assert len(latest) == 3
    assert latest[harness.record_key(new)] is new
    assert latest[harness.record_key(other_gpu)] is other_gpu
    assert {v["scenario"] for v in latest.values()} == {"a", "b"}


def test_format_table_contains_scenario() -> None:
    r = rec("my-scenario")
    table = report.format_table([r])
    lines = table.strip().splitlines()
    assert len(lines) == 3
    assert "my-scenario" in lines[2] and "Fake GPU 80GB" in lines[2] and "2.5x" in lines[2]
    assert "abc1234" in lines[2]
    assert len(report.format_table([]).strip().splitlines()) == 2


def test_plot_writes_png(tmp_path: Path) -> None:
    staged = harness.make_record(
        "staged",
        {},
        Timing([3.0]),
        Timing([9.0]),
        stages={"ours": {"unet": Timing([2.0]), "vae": Timing([1.0])}, "reference": {"unet": Timing([8.0])}},
        env=fake_env(),
    )
    for records, name in (([rec("a"), staged], "two.png"), ([], "empty.png")):
        out = report.plot(records, tmp_path / name)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_cuda_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "cuda_available", lambda: False)
    calls = []
    t = harness.time_cuda(lambda: calls.append(1), warmup_ms=1, budget_ms=1, min_reps=12, max_reps=1000)
    assert t.clock == "perf_counter"
    assert t.n >= 12 and t.n <= 1000
    assert len(calls) == t.n + t.warmup_reps and t.warmup_reps >= 1
    assert t.peak_mem_mb is None
    assert all(x >= 0 for x in t.times_ms)
    capped = harness.time_cuda(lambda: None, warmup_ms=0, budget_ms=10_000, min_reps=3, max_reps=5)
    assert capped.n == 5
    with pytest.raises(ValueError):
        harness.time_cuda(lambda: None, min_reps=5, max_reps=4)


def test_measure_compile_and_sync_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "cuda_available", lambda: False)
    assert harness.measure_compile(lambda: sum(range(10))) >= 0.0
    wrapped = harness.sync_wrapper(lambda a, b=1: a + b)
    assert wrapped(1, b=2) == 3


def test_copy_bandwidth_helper() -> None:
    assert harness.gbs(2e9, 1000.0) == pytest.approx(2.0)
    assert harness.copy_bandwidth_gbs(1 << 16, 1, device="cpu") > 0
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="CUDA"):
            harness.copy_bandwidth_gbs(1 << 16, 1)


def test_env_info_never_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    env = harness.env_info()
    assert env["torch"] == torch.__version__
    assert env["commit"] == "testcommit"
    assert env["gpu"] == ("cpu" if not HAS_CUDA else env["gpu"])
    monkeypatch.delenv(harness.COMMIT_ENV)
    assert harness._git_commit(Path("/nonexistent-dir")) is None
    monkeypatch.delenv("DRAGRT_COMPILE_CACHE_STATE", raising=False)
    assert harness.env_info()["compile_cache"] is None  # no cache set up by bench/gpu.sh
    monkeypatch.setenv("DRAGRT_COMPILE_CACHE_STATE", "warm")
    assert harness.env_info()["compile_cache"] == "warm"  # compile times measured against a carried cache


def test_gpu_script_packs_a_compile_cache_into_returnable_pieces(tmp_path: Path) -> None:
    """bench/gpu.sh pack-cache (no install, no GPU needed): the cache folder as 15 MiB tar.gz pieces that
    concatenate back into it; without DRAGRT_COMPILE_CACHE it is a usage error."""
    import os
    import subprocess

    script = Path(harness.__file__).parent / "gpu.sh"
    cache = tmp_path / ".compile-cache"
    (cache / "inductor").mkdir(parents=True)
    (cache / "inductor" / "kernel.bin").write_bytes(os.urandom(1 << 16))
    env = {**os.environ, "DRAGRT_SKIP_INSTALL": "1", "DRAGRT_COMPILE_CACHE": str(cache)}
    env.pop("DRAGRT_COMPILE_CACHE_STATE", None)
    done = subprocess.run(["bash", str(script), str(tmp_path / "out"), "pack-cache"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(warm, " in done.stdout and "packed" in done.stdout
    pieces = sorted((tmp_path / "out").glob("compile-cache.tgz.*"))
    assert [p.name for p in pieces] == ["compile-cache.tgz.aa"]
    back = tmp_path / "back"
    back.mkdir()
    subprocess.run(["tar", "-xzf", str(pieces[0]), "-C", str(back)], check=True)
    assert (back / ".compile-cache" / "inductor" / "kernel.bin").read_bytes() == (
        cache / "inductor" / "kernel.bin").read_bytes()
    env.pop("DRAGRT_COMPILE_CACHE")
    refused = subprocess.run(["bash", str(script), str(tmp_path / "out2"), "pack-cache"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pack-cache needs DRAGRT_COMPILE_CACHE" in refused.stderr


def test_registry() -> None:
    assert "device-copy" in scenarios.names()
    s = scenarios.get("device-copy")
    assert s.needs_cuda and s.description
    with pytest.raises(KeyError, match="device-copy"):
        scenarios.get("no-such-scenario")
    with pytest.raises(ValueError):
        scenarios.register("device-copy")(lambda budget_ms, quick: [])


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    assert "device-copy" in capsys.readouterr().out


def test_cli_run_without_cuda_fails(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(harness, "cuda_available", lambda: False)
    code = cli.main(["run", "device-copy", "--out", str(tmp_path / "out")])
    assert code != 0
    assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli.main(["run", "no-such-scenario"]) != 0
    for bad in ("-5", "nan", "1e9"):
        assert cli.main(["run", "device-copy", "--budget-ms", bad, "--out", str(tmp_path / "out")]) == cli.EXIT_USAGE
        assert "--budget-ms" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_run_cpu_scenario_writes_records(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(harness, "cuda_available", lambda: False)

    def cpu_add(budget_ms: float, quick: bool) -> list[dict]:
        x = torch.ones(64)
        ours = harness.time_cuda(lambda: x + x, warmup_ms=0, budget_ms=1, min_reps=3)
        ref = harness.time_cuda(lambda: x * 2, warmup_ms=0, budget_ms=1, min_reps=3)
        return [harness.make_record("cpu-add", {"quick": quick}, ours, ref)]

    monkeypatch.setitem(scenarios._REGISTRY, "cpu-add", scenarios.Scenario("cpu-add", cpu_add, needs_cuda=False))
    out = tmp_path / "out"
    assert cli.main(["run", "cpu-add", "--quick", "--out", str(out)]) == 0
    assert "cpu-add" in capsys.readouterr().out
    [r] = harness.load_records(out)
    assert r["config"] == {"quick": True} and r["ours"]["clock"] == "perf_counter"
    assert cli.main(["compare", "--results", str(out)]) == 0
    assert "cpu-add" in capsys.readouterr().out
    assert cli.main(["plot", str(tmp_path / "p.png"), "--results", str(out)]) == 0
    assert (tmp_path / "p.png").exists()


def test_cli_run_writes_each_yielded_record_before_a_later_failure(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A scenario that yields keeps what it measured: the first record is on disk when the second part fails
    (as a cold DragDiffusion LoRA run cut off at a device call's limit keeps its LoRA record)."""
    monkeypatch.setattr(harness, "cuda_available", lambda: False)
    x = torch.ones(8)

    def two_parts(budget_ms: float, quick: bool):
        t = harness.time_cuda(lambda: x + x, warmup_ms=0, budget_ms=1, min_reps=2)
        yield harness.make_record("two-parts.first", {}, t, t)
        harness.progress("second part")
        raise RuntimeError("the second part broke")

    monkeypatch.setitem(scenarios._REGISTRY, "two-parts",
                        scenarios.Scenario("two-parts", two_parts, needs_cuda=False))
    out = tmp_path / "out"
    assert cli.main(["run", "two-parts", "--out", str(out)]) == cli.EXIT_SCENARIO_FAILED
    written = harness.load_records(out)
    assert [r["scenario"] for r in written] == ["two-parts.first"]
    captured = capsys.readouterr()
    assert "two-parts.first" in captured.out
    assert "scenario two-parts failed (after writing 1 record(s))" in captured.err
    assert "the second part broke" in captured.err and "] second part" in captured.err


def test_cli_readme_rewrites_only_marked_section(tmp_path: Path) -> None:
    results = tmp_path / "results"
    harness.write_record(rec("readme-scenario"), results)
    head = "# Title\n\nkept text\n\n" + report.BEGIN_MARKER + "\n"
    tail = report.END_MARKER + "\n\nmore kept text\n"
    readme = tmp_path / "README.md"
    readme.write_text(head + "old generated stuff\n" + tail)
    assert cli.main(["readme", "--results", str(results), "--readme", str(readme)]) == 0
    new = readme.read_text()
    assert new.startswith(head) and new.endswith(tail)
    assert "old generated stuff" not in new and "readme-scenario" in new
    assert cli.main(["readme", "--results", str(results), "--readme", str(readme)]) == 0
    assert readme.read_text() == new
    bad = tmp_path / "BAD.md"
    bad.write_text("no markers\n")
    assert cli.main(["readme", "--results", str(results), "--readme", str(bad)]) != 0
    assert bad.read_text() == "no markers\n"


def test_shipped_readme_has_markers() -> None:
    text = (Path(harness.__file__).parent / "README.md").read_text()
    assert text.index(report.BEGIN_MARKER) < text.index(report.END_MARKER)
    assert (Path(harness.__file__).parent / "results" / ".gitkeep").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_time_cuda_events_and_graph_on_gpu() -> None:
    x = torch.randn(1 << 20, device="cuda")
    eager = harness.time_cuda(lambda: x * 2, warmup_ms=5, budget_ms=20, min_reps=10)
    assert eager.clock == "cuda_events" and eager.n >= 10 and not eager.graph
    assert eager.peak_mem_mb is not None and eager.peak_mem_mb >= 0
    graphed = harness.time_cuda(lambda: x * 2, warmup_ms=5, budget_ms=20, min_reps=10, graph=True)
    assert graphed.clock == "cuda_events" and graphed.graph and graphed.n >= 10
    assert harness.copy_bandwidth_gbs(1 << 24, 20) > 0
    assert harness.env_info()["gpu"] != "cpu"
    count = torch.zeros((), device="cuda")
    replay = harness.captured(lambda: count.add_(1), warmup_calls=3)
    torch.cuda.synchronize()
    assert float(count) == 3  # the warm-up calls ran, the capture did not
    replay()
    replay()
    assert float(count) == 5


@pytest.mark.cuda
def test_peak_memory_counts_what_the_block_allocates() -> None:
    keep = torch.empty(4 * 2**20, dtype=torch.uint8, device="cuda")  # allocated before: not counted
    with harness.PeakMemory() as mem:
        tmp = torch.empty(16 * 2**20, dtype=torch.uint8, device="cuda")
        del tmp
    assert 16.0 <= mem.mb < 20.0
    del keep


def test_kernel_profile_counts_calls_and_writes_its_tables(tmp_path):
    x = torch.randn(64, 64)
    out = harness.kernel_profile(lambda: (x @ x).sum(), 3, tmp_path / "prof.txt")
    assert out["prof_wall_ms"] > 0
    assert set(out) == {"prof_wall_ms", "kernels_per_call", "gpu_busy_ms", "gpu_ms_by_kind"}
    if not harness.cuda_available():
        assert out["kernels_per_call"] == 0 and out["gpu_busy_ms"] == 0 and out["gpu_ms_by_kind"] == {}
    else:
        assert sum(out["gpu_ms_by_kind"].values()) == pytest.approx(out["gpu_busy_ms"], abs=0.01)
    table = (tmp_path / "prof.txt").read_text()
    assert "aten::mm" in table and "Self CPU time total" in table


@pytest.mark.parametrize("name, kind", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
    ("fmha_cutlassB_f16aligned_64x64_k64_sm80", "attention"),
    ("void cudnn::fusion::compute_dot_do_o<false>(void const*, void const*, void*, void*, unsigned int)", "attention"),
    ("void cudnn::fusion::convert_dq_to_16bits<false>(void const*, void*, unsigned int, unsigned int)", "attention"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, true>", "layout"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT", "matmul"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("triton_per_fused_native_group_norm_silu_12", "norm"),
    ("triton_poi_fused_add_mul_7", "fused (triton)"),
    ("triton_poi_fused_convolution_silu_3", "fused (triton)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "elementwise"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int>", "layout"),
    ("Memcpy DtoD (Device -> Device)", "layout"),
    ("some_new_kernel", "other"),
])
def test_kernel_kinds_split_a_profile_by_name(name, kind):
    assert harness.kernel_kind(name) == kind
